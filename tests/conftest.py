"""Shared fixtures: synthetic checkpoints (made once per session) and the official oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oss_convert import synth

pytest_plugins = ["strict_oracles"]  # in CI a skipped oracle test fails the run


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A tiny repo root (hidden 160 != expert 96, 4 layers, 2 shards) with tokenizer files."""
    return synth.generate(tmp_path_factory.mktemp("tiny") / "repo", "tiny", seed=1, shards=2, tokenizer=True)


@pytest.fixture(scope="session")
def tiny_single_repo(tmp_path_factory) -> Path:
    """The same model as ``tiny_repo`` but in one model.safetensors, no tokenizer files."""
    return synth.generate(tmp_path_factory.mktemp("tiny1") / "repo", "tiny", seed=1, shards=1)


@pytest.fixture(scope="session")
def metal_repo(tmp_path_factory) -> Path:
    """Full-vocab model the Metal converter accepts (needs bpe-openai for the tokenizer)."""
    pytest.importorskip("bpe_openai")
    return synth.generate(tmp_path_factory.mktemp("metal") / "repo", "metal", seed=2, shards=1, tokenizer=True)


@pytest.fixture(scope="session")
def tokens_300() -> np.ndarray:
    """300 token ids (longer than the 128 sliding window) valid for the tiny vocab."""
    return np.random.default_rng(7).integers(0, 1000, size=300).astype(np.int64)
