"""``--to hf-bf16``: a Hugging Face transformers folder with every weight in BF16, for fine-tuning.

Experts are dequantized exactly (MXFP4 values are representable in BF16) and transposed to
the layout transformers' ``GptOssExperts`` multiplies with: ``gate_up_proj`` ``[E, H, 2I]``
(gate/linear still interleaved along ``2I``) and ``down_proj`` ``[E, I, H]``. Other tensors are
renamed (spec §1.5) and ``attn.qkv`` is split into q/k/v; their bytes are copied unchanged.
One expert is dequantized at a time, so memory stays at a few expert matrices whatever the
model size. Output: ``config.json``, ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json``, and the source's tokenizer files.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_output
from ..errors import InputError
from ..formats import mxfp4
from ..formats.hf import hf_config, hf_names, is_dense_expert, qkv_split
from ..formats.original import expected_tensors, iter_chunks
from ..formats.safetensors import SafetensorsWriter, TensorSpec
from ..tokenizer import TOKENIZER_FILES

DEFAULT_SHARD_SIZE = "5G"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"5G"`` -> 5 GiB; plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"cannot read size {text!r}; write e.g. 5G, 500M or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class Planned:
    """One output tensor and how to produce its data, chunk by chunk."""

    spec: TensorSpec
    chunks: Callable[[], Iterator[np.ndarray]]


def plan(src) -> list[Planned]:
    """Every HF tensor in ``original/`` order (q, k, v in place of qkv), all BF16."""
    config = src.config
    out: list[Planned] = []
    for spec in expected_tensors(config, "bf16"):
        names = hf_names(spec.name)
        if len(names) == 3:
            start = 0
            for hf_name, rows in zip(names, qkv_split(config)):
                out.append(Planned(TensorSpec(hf_name, "BF16", (rows,) + spec.shape[1:]),
                                   _rows(src, spec.name, start, start + rows)))
                start += rows
        elif is_dense_expert(spec.name):
            E, rows, cols = spec.shape
            out.append(Planned(TensorSpec(names[0], "BF16", (E, cols, rows)), _experts_transposed(src, spec.name)))
        else:
            out.append(Planned(TensorSpec(names[0], "BF16", spec.shape), _whole(src, spec.name)))
    return out


def _whole(src, name: str) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        yield from iter_chunks(src.raw(name))
        release(src, name)

    return chunks


def _rows(src, name: str, start: int, stop: int) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        yield src.raw(name)[start:stop]
        release(src, name)

    return chunks


def _experts_transposed(src, name: str) -> Callable[[], Iterator[np.ndarray]]:
    """One expert at a time: dequantize (or take the dense BF16) and transpose to ``x @ W``."""
    layer, which = int(name.split(".")[1]), name.split(".")[3].split("_")[0]

    def chunks() -> Iterator[np.ndarray]:
        pair = src.mxfp4(layer, which)
        dense = src.raw(name) if pair is None else None
        for e in range(src.config.num_experts):
            if pair is not None:
                bits = mxfp4.decode(pair.blocks[e], pair.scales[e], dtype="bf16")
            else:
                bits = dense[e]
            yield np.ascontiguousarray(bits.T)
            release(src, name)  # keep RSS at about one expert, not one layer

    return chunks


def release(src, name: str) -> None:
    """Unmap the source pages of a tensor we are done with, if the reader supports it."""
    if hasattr(src, "release"):
        src.release(name)


def shard(planned: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    groups: list[list[Planned]] = [[]]
    size = 0
    for item in planned:
        if groups[-1] and size + item.spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.spec.nbytes
    return groups


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def convert(src, out: Path, *, force: bool = False, progress: bool = True,
            shard_size: str | int = DEFAULT_SHARD_SIZE, **options) -> Path:
    """Write the HF BF16 folder for ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    if options:
        raise InputError(f"options {sorted(options)} do not apply to --to hf-bf16 (it takes --shard-size)")
    planned = plan(src)
    groups = shard(planned, parse_size(shard_size))
    names = shard_names(len(groups))
    total = sum(p.spec.nbytes for p in planned)
    out = Path(out)
    with atomic_output(out, force=force, is_dir=True) as tmp, \
            tqdm(total=total, desc="hf-bf16", unit="B", unit_scale=True, unit_divisor=1024,
                 disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for file_name, group in zip(names, groups):
            with open(tmp / file_name, "wb") as fh:
                writer = SafetensorsWriter(fh, [p.spec for p in group], {"format": "pt"})
                for item in group:
                    for chunk in item.chunks():
                        writer.write(item.spec.name, chunk)
                        bar.update(chunk.nbytes)
                writer.finish()
        if len(groups) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {p.spec.name: n for n, g in zip(names, groups) for p in g}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(src.config), indent=2) + "\n")
        copy_tokenizer_files(Path(src.repo_root), tmp)
    return out


def copy_tokenizer_files(root: Path, dest: Path) -> list[str]:
    """Copy the tokenizer and chat template files the source has (none is an error only later)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, dest / name)
            copied.append(name)
    return copied
