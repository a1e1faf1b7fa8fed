"""One module per on-disk format: reading and writing it, nothing else; and the registry of them.

Each format module declares one ``FORMAT`` record (``formats.base.Format``): how its format is
recognised, opened and described, which files make one artifact, which a runtime loads, and
whether a path holds one of ours. ``FORMATS`` lists the artifact formats in the order they are
tried; everything that needs to know the kind of a path asks here: ``detect`` (``inspect``,
``verify``, ``compare``), ``artifact_files`` (provenance, the input guard, ``compare``'s sizes)
and ``is_ours`` (what ``--force`` may replace).

Adding a format: write ``formats/<name>.py`` (the reader with the ``CanonicalModel`` interface,
``describe``, its ``FORMAT``), add ``FORMAT`` to ``FORMATS`` below, and, if oss-convert writes it,
a target in ``converters/`` (see the README's "Layout of the code").
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from . import gguf, gguf_lora, hf, metal, mlx, mlx_adapter, original, peft, reference
from .base import Format, folder_files, head

# Tried in this order: a repo holding original/ (which may also hold a transformers root) is
# read as original/, and an MLX folder before the transformers layout it extends.
FORMATS: tuple[Format, ...] = (original.FORMAT, mlx.FORMAT, hf.FORMAT, metal.FORMAT, gguf.FORMAT)
# LoRA adapters: not models, merged into one (``convert --adapter``, ``verify --adapter``).
ADAPTER_FORMATS: tuple[Format, ...] = (peft.FORMAT, mlx_adapter.FORMAT, gguf_lora.FORMAT)
# Files oss-convert writes that are not models.
OTHER_FORMATS: tuple[Format, ...] = (reference.FORMAT,)
# A folder with a config.json that no format recognises is read as MLX: its reader says what
# is missing or wrong (the model_type, the tensors) where a bare "not recognised" would not.
CONFIG_FOLDER_FALLBACK = mlx.FORMAT


def by_name(name: str) -> Format:
    return next(f for f in FORMATS + ADAPTER_FORMATS + OTHER_FORMATS if f.name == name)


def adapter_format(path: str | Path) -> Format | None:
    return next((f for f in ADAPTER_FORMATS if f.recognises(Path(path))), None)


def read_adapter(path: str | Path, base, base_values=None):
    """The LoRA adapter at ``path`` (``lora.Adapter``), placed on and checked against ``base``
    (the ``ModelConfig`` it is merged into); ``base_values(name, rows)`` (float32 rows of the base)
    checks the whole weights an adapter may carry."""
    kind = adapter_format(path)
    if kind is None:
        raise InputError("not a LoRA adapter (expected adapter_config.json with adapter_model.safetensors (PEFT) "
                         "or adapters.safetensors (mlx-lm))", file=path)
    adapter = kind.adapter(path, base)
    adapter.check_against(base)
    if base_values is not None:
        adapter.check_saved_weights(base_values)
    return adapter


def format_of(path: str | Path) -> Format:
    """The format of ``path``, from its files and magic bytes, not its name (an adapter included)."""
    p = Path(path)
    for candidate in FORMATS + ADAPTER_FORMATS:
        if candidate.recognises(p):
            return candidate
    if p.is_dir():
        if (p / "config.json").is_file():
            return CONFIG_FOLDER_FALLBACK
        odd = next((q for q in (p / "config.json", p / "original" / "config.json", p / "model.bin")
                    if os.path.lexists(q) and not q.is_file()), None)
        if odd is not None:
            raise InputError("not a regular file (a FIFO, a device, a socket or a broken link is never read)", file=odd)
        raise InputError("not a recognised artifact folder (no config.json, original/ or model.bin)", file=p)
    if not p.exists():
        raise InputError("path does not exist", file=p)
    if not p.is_file():
        raise InputError("not a regular file (a FIFO, a device or a socket is never read)", file=p)
    magic = head(p, 12)
    raise InputError(f"unrecognised file (magic {magic!r}); expected GGUF or a gpt-oss Metal model.bin", file=p)


def detect(path: str | Path) -> str:
    """Which kind of artifact ``path`` is (``FORMATS``' names)."""
    return format_of(path).name


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """``inspect``'s summary: the kind, then the format module's description (``scan`` reads every byte)."""
    kind = format_of(path)
    return {"kind": kind.name, **kind.describe(path, scan=scan)}


def open_canonical(path: str | Path):
    """A ``CanonicalModel`` for any artifact kind."""
    kind = format_of(path)
    if kind.open is None:
        raise InputError(f"is {kind.summary}, not a model: merge it into its base with "
                         "convert BASE --adapter ADAPTER, or verify against --reference BASE --adapter ADAPTER", file=path)
    return kind.open(path)


def artifact_files(path: str | Path) -> dict[str, Path]:
    """The files that make up the artifact at ``path`` (keyed relative to its folder, or by name
    beside a file artifact): a folder's files, a split GGUF's shards, or the file itself."""
    p = Path(path)
    for candidate in FORMATS + ADAPTER_FORMATS + OTHER_FORMATS:
        if candidate.recognises(p):
            return candidate.artifact_files(p)
    return folder_files(p) if p.is_dir() else {p.name: p}


def weight_files(path: str | Path) -> list[Path]:
    """The files a runtime loads of the artifact at ``path`` (its weights)."""
    return format_of(path).weight_files(Path(path))


def is_ours(path: str | Path) -> bool:
    """Does ``path`` hold a format oss-convert writes (an artifact or a reference cache)?"""
    return any(f.is_ours(Path(path)) for f in FORMATS + OTHER_FORMATS)
