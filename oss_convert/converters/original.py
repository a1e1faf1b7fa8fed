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


from .. import quantize
from ..atomic import atomic_output
from ..errors import InputError
from ..formats.original import dtypes_json
from ..model import Source, expected_tensors
from ..progress import SILENT, Progress
from ..tokens.files import copy_tokenizer_files
from ..shards import Planned, group_by_size, parse_size, shard_names, total_bytes, write_shards

REPORT_FILE = quantize.REPORT_FILE


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT, recipe: str = "ocp",
            shard_size: str | int | None = None, chat_template: str | None = None) -> Path:
    """Write ``out/original/`` from ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    if recipe not in quantize.RECIPES:
        raise InputError(f"unknown recipe {recipe!r} for --to original; choose one of {list(quantize.RECIPES)}")
    encoder = quantize.ExpertEncoder(src, recipe) if src.experts == "bf16" else None
    planned = [Planned(spec, quantize.encoded_or_copied(src, spec.name, encoder)) for spec in expected_tensors(src.config, "mxfp4")]
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
        copy_tokenizer_files(Path(src.repo_root), tmp, chat_template)
        summary = encoder.write_report(tmp) if encoder is not None else None
    if summary:
        progress.note(summary)
    return out
