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

from pathlib import Path

from .. import quantize
from ..formats.original import LAYOUT, folder_files
from ..model import Source, expected_tensors
from ..progress import SILENT, Progress
from ..shards import Planned, write_folder
from ..tokens.files import copy_tokenizer_files

REPORT_FILE = quantize.REPORT_FILE


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT, recipe: str = "ocp",
            shard_size: str | int | None = None, chat_template: str | None = None) -> Path:
    """Write ``out/original/`` from ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    encoder = quantize.ExpertEncoder(src, recipe) if src.experts == "bf16" else None
    planned = [Planned(spec, quantize.encoded_or_copied(src, spec.name, encoder))
               for spec in expected_tensors(src.config, "mxfp4")]
    summary = []

    def root_files(tmp: Path) -> None:
        copy_tokenizer_files(Path(src.repo_root), tmp, chat_template)
        if encoder is not None:
            summary.append(encoder.write_report(tmp))

    out = write_folder(out, LAYOUT, planned, folder_files(src.config), task="original", force=force,
                       progress=progress, shard_size=shard_size, root_files=root_files)
    for line in summary:
        progress.note(line)
    return out
