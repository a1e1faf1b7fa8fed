"""Sharded safetensors folders: planning, naming, writing (support layer).

One home for what every folder target shares (``--to mlx``, ``hf``, ``hf-bf16``, ``original``
and ``synth``): a ``Planned`` tensor is a spec plus a function producing its bytes chunk by
chunk; ``write_folder`` writes a whole folder artifact as its format's ``FolderLayout`` says
(``group_by_size`` cuts the plan into shards of at most ``--shard-size`` bytes, ``write_shards``
streams each group through ``formats.safetensors.SafetensorsWriter``, then the index and the
format's files), so a folder converter is a plan and one call. Also ``parse_size`` (``5G``).
Imports: base modules, ``formats.safetensors``, ``atomic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import hashing
from .atomic import atomic_output
from .formats.safetensors import INDEX_FILE, FolderLayout, SafetensorsWriter
from .model import TensorSpec, iter_chunks
from .progress import SILENT, Advance, Progress
from .sizes import parse_size

@dataclass(frozen=True)
class Planned:
    """One output tensor and how to produce its data, chunk by chunk."""

    spec: TensorSpec
    chunks: Callable[[], Iterator[np.ndarray]]


def copy_chunks(src, name: str, rows: slice | None = None) -> Callable[[], Iterator[np.ndarray]]:
    """The producer of a tensor copied as stored (optionally a row range of it), a chunk at a
    time, each chunk's source pages released once written: RSS stays near one chunk."""
    def chunks() -> Iterator[np.ndarray]:
        data = src.raw(name)
        for piece in iter_chunks(data if rows is None else data[rows]):
            yield piece
            src.release(name)

    return chunks


def group_by_size(planned: list[Planned], max_bytes: int | None) -> list[list[Planned]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own);
    ``None`` keeps everything in one file."""
    if max_bytes is None:
        return [list(planned)]
    groups: list[list[Planned]] = [[]]
    size = 0
    for item in planned:
        if groups[-1] and size + item.spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.spec.nbytes
    return groups


def write_shards(folder: Path, groups: list[list[Planned]], names: list[str], metadata: dict[str, str],
                 advance: Advance | None = None) -> dict[str, str]:
    """Write each group as one safetensors file in ``folder``; returns tensor name -> file name."""
    weight_map = {}
    for file_name, group in zip(names, groups):
        with hashing.HashingWriter(folder / file_name) as fh:  # hashed for the manifest as it goes
            writer = SafetensorsWriter(fh, [p.spec for p in group], metadata)
            for item in group:
                for chunk in item.chunks():
                    writer.write(item.spec.name, chunk)
                    if advance is not None:
                        advance(chunk.nbytes)
                weight_map[item.spec.name] = file_name
            writer.finish()
    return weight_map


def total_bytes(planned: list[Planned]) -> int:
    return sum(p.spec.nbytes for p in planned)


def write_folder(out: Path, layout: FolderLayout, planned: list[Planned], files: dict[str, str], *, task: str,
                 force: bool = False, progress: Progress = SILENT, shard_size: str | int | None = None,
                 groups: list[list[Planned]] | None = None,
                 root_files: Callable[[Path], None] | None = None) -> Path:
    """Write a whole folder artifact as ``layout`` says, atomically: the shards (cut at
    ``shard_size``, the layout's default when not given, or the given ``groups``), the index, the
    format's own ``files`` (config and such, beside the shards) and, through ``root_files``, what
    goes in the folder's root (tokenizer files, a quantization report)."""
    if groups is None:
        limit = parse_size(shard_size) if shard_size is not None else layout.default_shard_size
        groups = group_by_size(planned, limit)
    names = layout.shard_names(len(groups))
    with atomic_output(out, force=force, is_dir=True) as tmp, progress.task(task, total_bytes(planned)) as advance:
        folder = tmp / layout.subfolder if layout.subfolder else tmp
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        weight_map = write_shards(folder, groups, names, dict(layout.metadata), advance)
        if layout.index_always or len(groups) > 1:
            (folder / INDEX_FILE).write_text(layout.index_text([p.spec for p in planned], weight_map))
        if root_files is not None:
            root_files(tmp)
    return Path(out)
