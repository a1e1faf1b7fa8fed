"""Test inputs in the Hugging Face layout, built from an original/ checkpoint by renaming only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from oss_convert.formats import hf
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.formats.safetensors import SafetensorsWriter
from oss_convert.model import TensorSpec


def write_hub_layout(src: OriginalCheckpoint, out: Path) -> Path:
    """The Hub's MXFP4 HF layout (blocks/scales byte-identical to original/), built by renaming."""
    out.mkdir()
    specs, arrays = [], []
    for spec in src.specs:
        names, data = hf.hf_names(spec.name), src.raw(spec.name)
        parts = np.split(data, np.cumsum(src.config.qkv_rows)[:-1]) if len(names) == 3 else [data]
        for name, part in zip(names, parts):
            specs.append(TensorSpec(name, spec.dtype, part.shape))
            arrays.append(part)
    with open(out / "model.safetensors", "wb") as fh:
        writer = SafetensorsWriter(fh, specs, {"format": "pt"})
        for spec, data in zip(specs, arrays):
            writer.write(spec.name, data)
        writer.finish()
    config = hf.hf_config(src.config)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out
