"""Recognise an artifact on disk and open it through its format module.

Each ``formats/<kind>.py`` offers ``describe(path) -> dict`` (for ``inspect``) and
``open_canonical(path) -> CanonicalModel`` (for ``verify``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .errors import InputError


def detect(path: str | Path) -> str:
    """Which kind of artifact ``path`` is, from its files and magic bytes, not its name."""
    p = Path(path)
    if p.is_dir():
        if (p / "original" / "config.json").is_file():
            return "original"
        if (p / "config.json").is_file():
            if looks_original(p):
                return "original"
            from .formats.hf import looks_hf
            from .formats.mlx import looks_mlx

            # mlx-lm's layout first: its dequantized folders have no "quantization" key either.
            return "mlx" if looks_mlx(p) or not looks_hf(p) else "hf"
        if (p / "model.bin").is_file():
            return "metal"
        raise InputError("not a recognised artifact folder (no config.json, original/ or model.bin)", file=p)
    if not p.exists():
        from .formats.original import resolve  # maybe a Hugging Face repo id

        resolve(str(path))
        return "original"
    with open(p, "rb") as fh:
        magic = fh.read(12)
    if magic[:4] == b"GGUF":
        return "gguf"
    if magic == b"GPT-OSS v1.0":
        return "metal"
    raise InputError(f"unrecognised file (magic {magic[:12]!r}); expected GGUF or a gpt-oss Metal model.bin", file=p)


def looks_original(folder: Path) -> bool:
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "num_experts" in config and "model_type" not in config


def _module(kind: str):
    return importlib.import_module(f".formats.{kind}", __package__)


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """``inspect``'s summary: the kind, then the format module's description (``scan`` reads every byte)."""
    kind = detect(path)
    return {"kind": kind, **_module(kind).describe(path, scan=scan)}


def open_canonical(path: str | Path):
    """A ``CanonicalModel`` for any artifact kind."""
    return _module(detect(path)).open_canonical(path)
