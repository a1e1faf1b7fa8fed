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

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..formats import mxfp4
from ..formats.hf import BF16_LAYOUT, bf16_files, hf_names
from ..model import Source, TensorSpec, expected_tensors, expert_name, is_expert_weight
from ..progress import SILENT, Progress
from ..tokens.files import copy_tokenizer_files
from ..shards import Planned, copy_chunks, write_folder


def plan(src) -> list[Planned]:
    """Every HF tensor in ``original/`` order (q, k, v in place of qkv), all BF16."""
    config = src.config
    out: list[Planned] = []
    for spec in expected_tensors(config, "bf16"):
        names = hf_names(spec.name)
        if len(names) == 3:
            for hf_name, rows, part in zip(names, config.qkv_rows, config.qkv_slices):
                out.append(Planned(TensorSpec(hf_name, "BF16", (rows,) + spec.shape[1:]),
                                   copy_chunks(src, spec.name, part)))
        elif is_expert_weight(spec.name):
            E, rows, cols = spec.shape
            out.append(Planned(TensorSpec(names[0], "BF16", (E, cols, rows)), _experts_transposed(src, spec.name)))
        else:
            out.append(Planned(TensorSpec(names[0], "BF16", spec.shape), copy_chunks(src, spec.name)))
    return out


def _experts_transposed(src, name: str) -> Callable[[], Iterator[np.ndarray]]:
    """One expert at a time: dequantize (or take the dense BF16) and transpose to ``x @ W``."""
    layer, which = expert_name(name)

    def chunks() -> Iterator[np.ndarray]:
        pair = src.mxfp4(layer, which)
        dense = src.raw(name) if pair is None else None
        for e in range(src.config.num_experts):
            if pair is not None:
                bits = mxfp4.decode(pair.blocks[e], pair.scales[e], dtype="bf16")
            else:
                bits = dense[e]
            yield np.ascontiguousarray(bits.T)
            src.release(name)  # keep RSS at about one expert, not one layer

    return chunks


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT,
            shard_size: str | int | None = None, chat_template: str | None = None) -> Path:
    """Write the HF BF16 folder for ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    return write_folder(out, BF16_LAYOUT, plan(src), bf16_files(src.config), task="hf-bf16", force=force,
                        progress=progress, shard_size=shard_size,
                        root_files=lambda tmp: copy_tokenizer_files(Path(src.repo_root), tmp, chat_template))
