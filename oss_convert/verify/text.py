"""Evaluation input: the bundled text, a user's text file, or token ids, tokenized by the checkpoint."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import InputError

BUNDLED = "eval_text.txt"


def bundled_text() -> str:
    """Public-domain US documents (Declaration of Independence, Gettysburg Address, ...)."""
    return resources.files("oss_convert").joinpath("data", BUNDLED).read_text(encoding="utf-8")


def find_tokenizer(path: str | Path, model=None) -> Path | None:
    """``tokenizer.json`` of an artifact: beside its files, its repo root, or the parent folder."""
    candidates = []
    root = getattr(model, "repo_root", None)
    if root is not None:
        candidates.append(Path(root))
    p = Path(path)
    if p.is_file():
        candidates += [p.parent, p.parent.parent]
    else:
        candidates += [p, p.parent]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def tokenize(text: str, tokenizer_json: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise InputError(f"cannot load tokenizer: {exc}", file=tokenizer_json) from exc
    return np.array(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def read_token_ids(path: str | Path) -> np.ndarray:
    """Token ids from ``.npy`` or a text file of integers separated by whitespace or commas."""
    p = Path(path)
    try:
        if p.suffix == ".npy":
            ids = np.load(p, allow_pickle=False)
        else:
            ids = np.array([int(t) for t in p.read_text().replace(",", " ").split()], dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read token ids: {exc}", file=p) from exc
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise InputError("token ids must be one list of non-negative integers", file=p)
    return ids.astype(np.int64)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
