"""Shared fixtures: synthetic checkpoints (made once per session) and the official oracles."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from oss_convert import synth

from helpers import run_sub
from oracles import assert_wide_router_margins

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
def tokens_300(tiny_repo) -> np.ndarray:
    """300 token ids (longer than the 128 sliding window) valid for the tiny vocab, on which
    ``tiny_repo``'s routing has no near-tie (checked: tests compare it across implementations)."""
    tokens = np.random.default_rng(7).integers(0, 1000, size=300).astype(np.int64)
    assert_wide_router_margins(tiny_repo, tokens)
    return tokens


@pytest.fixture(scope="session")
def llama_cpp_source(tmp_path_factory) -> Path:
    """llama.cpp's tree as the llama-cpp-python source distribution of the installed version
    vendors it: ``convert_hf_to_gguf.py`` with its conversion/ and gguf-py, and ``models/templates``
    (the real gpt-oss chat template)."""
    from importlib.metadata import version

    pytest.importorskip("llama_cpp")
    folder = tmp_path_factory.mktemp("llama_cpp_src")
    wanted = version("llama_cpp_python")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                          f"llama-cpp-python=={wanted}", "-d", str(folder)], capture_output=True, text=True)
    archives = list(folder.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode or not archives:
        pytest.skip(f"cannot fetch the llama-cpp-python {wanted} source distribution: {got.stderr[-300:]}")
    root = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    wanted_parts = (root + "conversion/", root + "gguf-py/", root + "models/templates/")
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(root) and (
            m.name == root + "convert_hf_to_gguf.py" or m.name.startswith(wanted_parts))]
        tar.extractall(folder, members=members, filter="data")
    return folder / root


@pytest.fixture(scope="session")
def real_chat_template(llama_cpp_source) -> str:
    """The gpt-oss chat template as llama.cpp vendors it (the one in OpenAI's repos, 16,738 bytes)."""
    return (llama_cpp_source / "models" / "templates" / "openai-gpt-oss-120b.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert run_sub("convert", str(tiny_repo), "--to", "gguf", "-o", str(out), "--quiet").returncode == 0
    return out


@pytest.fixture(scope="session")
def metal_bin(metal_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("metal") / "model.bin"
    result = run_sub("convert", str(metal_repo), "--to", "metal", "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def dense_repo(tmp_path_factory) -> Path:
    """Dense BF16 experts, as a fine-tune: ``--recipe search`` does real numeric work on them."""
    return synth.generate(tmp_path_factory.mktemp("dense") / "repo", "tiny", seed=4, experts="bf16", tokenizer=True)


@pytest.fixture(scope="session")
def tiny_hf(tiny_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert run_sub("convert", str(tiny_repo), "--to", "hf-bf16", "-o", str(out), "--quiet").returncode == 0
    return out
