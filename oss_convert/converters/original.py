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
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import quantize
from ..atomic import atomic_output
from ..dtypes import bf16_to_f32
from ..errors import InputError
from ..formats.original import dtypes_json
from ..model import Source, expected_tensors, iter_chunks
from ..progress import SILENT, Progress
from ..shards import Planned, copy_tokenizer_files, group_by_size, parse_size, shard_names, total_bytes, write_shards

REPORT_FILE = "quantization.json"


class ExpertEncoder:
    """Encodes one layer's dense expert weight to MXFP4, expert by expert, tallying the error."""

    def __init__(self, src: Source, recipe: str):
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
            self.src.release(name)
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


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT, recipe: str = "ocp",
            shard_size: str | int | None = None) -> Path:
    """Write ``out/original/`` from ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    if recipe not in quantize.RECIPES:
        raise InputError(f"unknown recipe {recipe!r} for --to original; choose one of {list(quantize.RECIPES)}")
    encoder = ExpertEncoder(src, recipe) if src.experts == "bf16" else None
    planned = [Planned(spec, _chunks(src, spec.name, encoder)) for spec in expected_tensors(src.config, "mxfp4")]
    groups = group_by_size(planned, parse_size(shard_size) if shard_size is not None else None)
    names = shard_names(len(groups), separator="--")  # the 120b repo's own naming
    out = Path(out)
    with atomic_output(out, force=force, is_dir=True) as tmp, progress.task("original", total_bytes(planned)) as advance:
        original = tmp / "original"
        original.mkdir()
        (original / "config.json").write_text(src.config.to_json())
        (original / "dtypes.json").write_text(dtypes_json(src.config))
        weight_map = write_shards(original, groups, names, {"format": "pt"}, advance)
        if len(groups) > 1:
            index = {"metadata": {"total_size": total_bytes(planned)}, "weight_map": weight_map}
            (original / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        copy_tokenizer_files(Path(src.repo_root), tmp)
        if encoder is not None:
            report = encoder.report()
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if encoder is not None:
        progress.note(f"experts encoded to MXFP4 ({report['recipe']}): relative MSE {report['relative_mse']:.4e} "
                      f"over {len(report['tensors'])} tensors (per tensor: {out / REPORT_FILE})")
    return out


def _chunks(src: Source, name: str, encoder: ExpertEncoder | None):
    """The producer of tensor ``name``: encoded experts from a dense source, else a copy."""
    if encoder is not None and name.endswith(".blocks"):
        return lambda: encoder.blocks(name.removesuffix(".blocks"))
    if encoder is not None and name.endswith(".scales"):
        return lambda: encoder.scales(name.removesuffix(".scales"))

    def copy() -> Iterator[np.ndarray]:
        yield from iter_chunks(src.raw(name))
        src.release(name)

    return copy
