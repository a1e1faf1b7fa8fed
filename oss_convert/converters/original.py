"""``--to original``: OpenAI's ``original/`` layout, the input of every other target.

From a source with dense experts (a BF16 fine-tune in ``original/`` or HF layout, or our own
``hf-bf16`` output) the experts are encoded to MXFP4 one expert at a time with the chosen
recipe (``quantize.py``: ``"ocp"`` plain OCP rounding, ``"search"`` per-block scale search);
the error reached is printed and written to ``OUT/quantization.json``. From an MXFP4 source
the expert bytes are copied. Every other tensor is copied as BF16 bits. Output:
``OUT/original/{config.json,dtypes.json,*.safetensors}`` plus the source's tokenizer files in
``OUT``, so ``OUT`` is a repo root every converter (and the torch reference) accepts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .. import quantize
from ..atomic import atomic_output
from ..dtypes import bf16_to_f32
from ..errors import InputError
from ..formats.original import dtypes_json, expected_tensors, iter_chunks
from ..formats.safetensors import SafetensorsWriter, TensorSpec
from .hf_bf16 import copy_tokenizer_files, parse_size, release

REPORT_FILE = "quantization.json"


def shard_names(count: int) -> list[str]:
    """``model.safetensors``, or the 120b repo's own naming (double dash) for several files."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model--{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _shard(specs: list[TensorSpec], max_bytes: int | None) -> list[list[TensorSpec]]:
    if max_bytes is None:
        return [specs]
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


class ExpertEncoder:
    """Encodes one layer's dense expert weight to MXFP4, expert by expert, tallying the error."""

    def __init__(self, src, recipe: str):
        if recipe not in quantize.RECIPES:
            raise InputError(f"unknown recipe {recipe!r} for --to original; choose one of {list(quantize.RECIPES)}")
        self.src = src
        self.recipe = recipe
        self.errors: dict[str, quantize.ErrorTally] = {}
        self._scales: np.ndarray | None = None  # the layer's scales, written after its blocks

    def blocks(self, name: str) -> Iterator[np.ndarray]:
        dense = self.src.raw(name)  # [E, rows, cols] BF16 bits (a view)
        tally = self.errors.setdefault(name, quantize.ErrorTally())
        scales = []
        for e in range(dense.shape[0]):
            values = bf16_to_f32(np.ascontiguousarray(dense[e]))
            blocks, expert_scales = quantize.encode(values, self.recipe)
            tally.add(values, blocks, expert_scales)
            scales.append(expert_scales)
            yield blocks
            release(self.src, name)
        self._scales = np.stack(scales)

    def scales(self, name: str) -> Iterator[np.ndarray]:
        scales, self._scales = self._scales, None
        assert scales is not None, f"{name}: blocks must be written first"
        yield scales

    def report(self) -> dict:
        overall = quantize.ErrorTally()
        for tally in self.errors.values():
            overall.merge(tally)
        return {
            "recipe": self.recipe,
            "relative_mse": overall.relative_mse,
            "mse": overall.mse,
            "tensors": {name: {"relative_mse": t.relative_mse, "mse": t.mse} for name, t in self.errors.items()},
        }


def convert(src, out: Path, *, force: bool = False, progress: bool = True, recipe: str = "ocp",
            shard_size: str | int | None = None, **options) -> Path:
    """Write ``out/original/`` from ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    if options:
        raise InputError(f"options {sorted(options)} do not apply to --to original (it takes --recipe, --shard-size)")
    encoder = ExpertEncoder(src, recipe) if src.experts == "bf16" else None
    if encoder is None and recipe not in quantize.RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of {list(quantize.RECIPES)}")
    specs = expected_tensors(src.config, "mxfp4")
    groups = _shard(specs, parse_size(shard_size) if shard_size is not None else None)
    names = shard_names(len(groups))
    out = Path(out)
    with atomic_output(out, force=force, is_dir=True) as tmp, \
            tqdm(total=sum(s.nbytes for s in specs), desc="original", unit="B", unit_scale=True,
                 unit_divisor=1024, disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        original = tmp / "original"
        original.mkdir()
        (original / "config.json").write_text(src.config.to_json())
        (original / "dtypes.json").write_text(dtypes_json(src.config))
        for file_name, group in zip(names, groups):
            with open(original / file_name, "wb") as fh:
                writer = SafetensorsWriter(fh, group, {"format": "pt"})
                for spec in group:
                    for chunk in _chunks(src, spec.name, encoder):
                        writer.write(spec.name, chunk)
                        bar.update(chunk.nbytes)
                writer.finish()
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                     "weight_map": {s.name: n for n, g in zip(names, groups) for s in g}}
            (original / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        copy_tokenizer_files(Path(src.repo_root), tmp)
        if encoder is not None:
            report = encoder.report()
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if encoder is not None and progress:
        print(f"experts encoded to MXFP4 ({report['recipe']}): relative MSE {report['relative_mse']:.4e} "
              f"over {len(report['tensors'])} tensors (per tensor: {out / REPORT_FILE})", file=sys.stderr)
    return out


def _chunks(src, name: str, encoder: ExpertEncoder | None) -> Iterator[np.ndarray]:
    if encoder is not None and name.endswith(".blocks"):
        return encoder.blocks(name.removesuffix(".blocks"))
    if encoder is not None and name.endswith(".scales"):
        return encoder.scales(name.removesuffix(".scales"))
    return _copy(src, name)


def _copy(src, name: str) -> Iterator[np.ndarray]:
    yield from iter_chunks(src.raw(name))
    release(src, name)
