"""Streaming plans from an ``original/`` checkpoint to each target format.

Every target module exposes ``convert(src: OriginalCheckpoint, out: Path, *, force=False,
progress=True, **options) -> Path``; options are the target's own (see ``cli/main.py``).
"""

from __future__ import annotations

import importlib
from typing import Callable

TARGETS = ("mlx", "metal", "gguf", "hf-bf16", "original")


def converter(target: str) -> Callable:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    module = importlib.import_module(f".{target.replace('-', '_')}", __name__)
    return module.convert
