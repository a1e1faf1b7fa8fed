"""The implementations we hold our output against, none of them written by this project.

- OpenAI's torch reference (``gpt_oss.torch.model.Transformer``), on CPU in float32.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest


@lru_cache(maxsize=4)
def _torch_model(original_dir: str, dtype: str):
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("gpt_oss.torch.model")
    model = model_mod.Transformer.from_checkpoint(original_dir, device="cpu")
    return model.float() if dtype == "float32" else model


def torch_reference_logits(repo: Path, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Logits ``[T, vocab]`` of the official torch reference for ``repo/original``."""
    import torch

    original = Path(repo) / "original" if (Path(repo) / "original").is_dir() else Path(repo)
    model = _torch_model(str(original), dtype)
    with torch.inference_mode():
        logits = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    return logits.float().numpy()
