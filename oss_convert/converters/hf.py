"""``--to hf``: the plan of the Hub's MXFP4 transformers root (what transformers, vLLM, SGLang,
llama.cpp's ``convert_hf_to_gguf.py`` and ``mlx_lm.convert`` read).

The layout (names, 0-based shard names, ``config.json`` with ``quantization_config``,
``generation_config.json``) is ``formats/hf.py``'s. From ``original/`` the expert blocks and
scales are byte copies under their HF names (no decode); from a BF16 fine-tune (either layout)
they are encoded to MXFP4 with ``--recipe ocp|search`` (``quantize.ExpertEncoder``), and the
error reached is written to ``OUT/quantization.json`` and said. Every other tensor is BF16,
bytes copied (``attn.qkv`` split into q/k/v by rows). One expert at a time is in memory.
"""

from __future__ import annotations

from pathlib import Path


from .. import quantize
from ..formats.hf import HUB_LAYOUT, hf_names, hub_files
from ..model import Source, TensorSpec, expected_tensors
from ..progress import SILENT, Progress
from ..shards import Planned, copy_chunks, write_folder
from ..tokens.files import copy_tokenizer_files


def plan(src: Source, encoder: quantize.ExpertEncoder | None) -> list[Planned]:
    """Every root tensor in ``original/`` order (q, k, v in place of qkv), blocks before scales."""
    out: list[Planned] = []
    for spec in expected_tensors(src.config, "mxfp4"):
        names = hf_names(spec.name)
        if len(names) == 3:  # q, k, v rows of the fused qkv
            for hf_name, rows, part in zip(names, src.config.qkv_rows, src.config.qkv_slices):
                out.append(Planned(TensorSpec(hf_name, "BF16", (rows,) + spec.shape[1:]),
                                   copy_chunks(src, spec.name, part)))
        else:
            out.append(Planned(TensorSpec(names[0], spec.dtype, spec.shape), quantize.encoded_or_copied(src, spec.name, encoder)))
    return out


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT, recipe: str = "ocp",
            shard_size: str | int | None = None, chat_template: str | None = None) -> Path:
    """Write the Hub MXFP4 root for ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    encoder = quantize.ExpertEncoder(src, recipe) if src.experts == "bf16" else None
    summary = []

    def root_files(tmp: Path) -> None:
        copy_tokenizer_files(Path(src.repo_root), tmp, chat_template)  # the source's generation_config.json wins
        if encoder is not None:
            summary.append(encoder.write_report(tmp))

    out = write_folder(out, HUB_LAYOUT, plan(src, encoder), hub_files(src.config), task="hf", force=force,
                       progress=progress, shard_size=shard_size, root_files=root_files)
    for line in summary:
        progress.note(line)
    return out
