"""OpenAI's ``original/`` checkpoint: ``config.json`` plus one or more ``*.safetensors``.

Owns: reading ``config.json`` against ``model.ModelConfig``, ``dtypes.json``, locating a
checkpoint (folder, repo root, or a Hugging Face repo id / cached snapshot, offline), indexing
tensors across shards and validating them against ``model.expected_tensors``. Like both
reference loaders it opens every ``*.safetensors`` in the folder and ignores the index file.
Imports: base modules, ``formats.safetensors``, ``formats.mxfp4``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..dtypes import bf16_to_f32
from ..errors import InputError
from ..reading import read_json
from ..tokens.files import FolderTokens
from ..model import (ModelConfig, Mxfp4Pair, TensorSpec, VocabRows, expected_tensors, expert_name, is_expert_weight,
                     iter_chunks)
from . import mxfp4
from .base import Format
from .safetensors import FolderLayout, ShardedReader, TensorEntry, numbered_shard_names


# The 120b repo's own naming (model--00001-of-00007.safetensors), double dash included; one
# file unless --shard-size says otherwise; the index only when split.
LAYOUT = FolderLayout(shard_names=lambda count: numbered_shard_names(count, "--"), subfolder="original",
                      index_newline=False, default_shard_size=None)


def folder_files(config: ModelConfig) -> dict[str, str]:
    """The files beside the shards in ``original/``: ``config.json`` (one line, as the real file)
    and ``dtypes.json``."""
    return {"config.json": config.to_json(), "dtypes.json": dtypes_json(config)}


def dtypes_json(config: ModelConfig) -> str:
    """The companion ``dtypes.json``: logical dtypes FP4 / UE8 / BF16 per tensor."""
    logical = {}
    for spec in expected_tensors(config):
        logical[spec.name] = "FP4" if spec.name.endswith(".blocks") else "UE8" if spec.name.endswith(".scales") else spec.dtype
    return json.dumps(logical)


# --------------------------------------------------------------------------------------
# Locating a checkpoint


def resolve(source: str | Path) -> Path:
    """Find the ``original/`` folder for a path or a Hugging Face repo id, without network.

    Accepts the ``original/`` folder itself, a repo root that contains ``original/``, or a repo id
    (``openai/gpt-oss-20b``) already in the local Hugging Face cache.
    """
    path = Path(source)
    if path.exists():
        if (path / "original" / "config.json").is_file():
            return path / "original"
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return path
        for config in (path / "original" / "config.json", path / "config.json"):
            if os.path.lexists(config) and not config.is_file():
                raise InputError("not a regular file (a FIFO, a device, a socket or a broken link is never read)",
                                 file=config)
        raise InputError("no original/ checkpoint here (expected config.json and *.safetensors, or an original/ folder)", file=path)
    if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot = snapshot_download(source, allow_patterns=["original/*", "*.json", "*.jinja"], local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise InputError(
                f"{source!r} is neither a folder nor a repo id in the local Hugging Face cache "
                f"(download it first: hf download {source} --include 'original/*')",
            ) from exc
        return resolve(snapshot)
    raise InputError("path does not exist", file=path)


# --------------------------------------------------------------------------------------
# Reading


class OriginalCheckpoint(ShardedReader, VocabRows, FolderTokens):
    """A validated, memory-mapped ``original/`` checkpoint.

    ``raw(name)`` gives zero-copy views (BF16 as uint16 bits, MXFP4 parts as uint8); nothing is
    read from disk until a view is touched. Opening checks structure (every expected tensor
    present once, shapes and dtypes as the config implies, files complete); ``scan()`` also
    reads the data to find NaN/Inf and invalid scale bytes.
    """

    def __init__(self, source: str | Path):
        self.path = resolve(source)
        self.config_path = self.path / "config.json"
        self.config = ModelConfig.from_dict(self._read_config(self.config_path), file=self.config_path)
        self._open_shards(self.path, "*.safetensors")
        # A checkpoint whose experts are dense BF16 (a fine-tune) has no .blocks/.scales.
        self.experts = "bf16" if "block.0.mlp.mlp1_weight" in self.entries else "mxfp4"
        self.specs = expected_tensors(self.config, self.experts)
        self._check_against_config()

    @property
    def repo_root(self) -> Path:
        """The folder holding ``tokenizer.json`` and the chat template, beside ``original/``."""
        return self.path.parent if self.path.name == "original" else self.path

    def _check_against_config(self) -> None:
        expected = {s.name: s for s in self.specs}
        for name, spec in expected.items():
            entry = self.entries.get(name)
            if entry is None:
                raise InputError(
                    f"missing from every shard; config.json implies {spec.dtype}{list(spec.shape)}",
                    file=self.path, tensor=name,
                )
            if entry.dtype != spec.dtype or entry.shape != spec.shape:
                raise InputError(
                    f"is {entry.dtype}{list(entry.shape)} but config.json implies {spec.dtype}{list(spec.shape)}",
                    file=entry.file, tensor=name,
                )
        extra = sorted(set(self.entries) - set(expected))
        if extra:
            entry = self.entries[extra[0]]
            raise InputError(
                f"unexpected tensor ({len(extra)} unexpected in all: {extra[:5]}) for a model with this config.json",
                file=entry.file, tensor=extra[0],
            )

    # -- access -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.specs)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise InputError("no such tensor", file=self.path, tensor=name) from None

    def raw(self, name: str) -> np.ndarray:
        entry = self.entry(name)
        return self._file(entry).array(name)

    def _stored(self, name: str) -> list[str]:
        """Logical expert names stand for both ``.blocks`` and ``.scales``."""
        names = [name + ".blocks", name + ".scales"] if name not in self.entries and name.endswith("_weight") else [name]
        for n in names:
            self.entry(n)  # an unknown name says which
        return names

    def chunks(self, name: str, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
        """The raw tensor in pieces along its first axis, each unmapped once the caller moves on."""
        entry = self.entry(name)
        file = self._file(entry)
        offset = 0
        for piece in iter_chunks(self.raw(name), max_bytes):
            yield piece
            file.release(name, offset, piece.nbytes)
            offset += piece.nbytes

    def f32(self, name: str) -> np.ndarray:
        """A tensor as float32 (exact): BF16 widened, logical expert weights dequantized.

        Expert weights (``block.N.mlp.mlp1_weight``) are decoded whole; callers that must stay
        within bounded memory decode ``mxfp4(...)`` one expert at a time instead.
        """
        if is_expert_weight(name) and self.experts == "mxfp4":
            layer, which = expert_name(name)
            pair = self.mxfp4(layer, which)
            return mxfp4.decode(pair.blocks, pair.scales)
        return bf16_to_f32(self.raw(name))

    def expert_f32(self, name: str, expert: int) -> np.ndarray:
        """One expert of ``mlp1``/``mlp2`` as float32, exactly as ``f32(name)[expert]`` but reading
        only that expert: the runner's unit (a 120b layer is 8.5 GB in float32, an expert 66 MB)."""
        if self.experts == "mxfp4":
            pair = self.mxfp4(*expert_name(name))
            return mxfp4.decode(pair.blocks[expert], pair.scales[expert])
        return bf16_to_f32(np.ascontiguousarray(self.raw(name)[expert]))

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        """``which`` is ``"mlp1"`` or ``"mlp2"``; ``None`` when the experts are dense BF16."""
        if self.experts != "mxfp4":
            return None
        prefix = f"block.{layer}.mlp.{which}_weight"
        return Mxfp4Pair(self.raw(prefix + ".blocks"), self.raw(prefix + ".scales"))

    def _bf16_bits(self, name: str) -> np.ndarray | None:
        return self.raw(name) if self.entry(name).dtype == "BF16" else None

    def bf16_bits(self, name: str) -> np.ndarray | None:
        """Every BF16 tensor, dense experts of a fine-tune included: this layout is the canonical one."""
        return self._bf16_bits(name) if self.storage(name) == "BF16" else None

    def storage(self, name: str) -> str:
        if is_expert_weight(name) and self.experts == "mxfp4":
            return "MXFP4"
        return self.entry(name).dtype

    def scan(self, progress=None) -> list[str]:
        """Read every value that can be invalid; return problems (NaN/Inf in BF16, scale byte 255)
        naming file and tensor. The expert blocks are not read: every FP4 code is a number."""
        return self.scan_values(lambda name: name.endswith(".scales"), [spec.name for spec in self.specs], progress)


# --------------------------------------------------------------------------------------
# The registry's record (``formats/__init__.py``)


def open_canonical(path: str | Path) -> OriginalCheckpoint:
    return OriginalCheckpoint(path)


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """Summary for ``inspect``; raises ``InputError`` if the checkpoint does not validate."""
    with OriginalCheckpoint(path) as ckpt:
        return {**ckpt.summary(scan), "experts": ckpt.experts,
                "tokenizer_files": sorted(p.name for p in ckpt.repo_root.glob("tokenizer*.json"))}


def looks_original(folder: Path) -> bool:
    """A folder whose ``config.json`` has the reference's keys (``num_experts``, no ``model_type``)."""
    try:
        config = read_json(Path(folder) / "config.json")
    except InputError:
        return False
    return isinstance(config, dict) and "num_experts" in config and "model_type" not in config


def _is_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/"))


def recognises(path: Path) -> bool:
    """A repo root holding ``original/``, an ``original/`` folder, or (not a path) a repo id in the cache."""
    p = Path(path)
    if p.is_dir():
        return (p / "original" / "config.json").is_file() or looks_original(p)
    return not p.exists() and not p.is_symlink() and _is_repo_id(str(path))


def is_ours(path: Path) -> bool:
    p = Path(path)
    return any(looks_original(f) and any(f.glob("*.safetensors")) for f in (p / "original", p) if f.is_dir())


FORMAT = Format(
    "original", "OpenAI's original/ checkpoint (or its repo, or a cached repo id)", recognises,
    open=open_canonical, describe=describe, ours=is_ours,
    weights=lambda path: sorted(resolve(path).glob("*.safetensors")),
)
