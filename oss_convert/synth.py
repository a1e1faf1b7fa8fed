"""Synthetic checkpoints in the exact ``original/`` layout, for tests and benchmarks.

Real weights cannot be downloaded here, so every test and benchmark runs on checkpoints made
by this module: the real names, dtypes, config keys and file naming, random values with
realistic magnitudes (weights ~ 1/sqrt(fan_in), MXFP4 scales 2**-9..2**-3 chosen per fan-in),
and "tight" MXFP4 blocks like a real quantizer's (see ``mxfp4.tighten``). Data is generated and
written chunk by chunk, so a 120b-shaped checkpoint needs well under 1 GB of memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from functools import partial
from typing import Iterator

import numpy as np

from .tokens.templates import HARMONY_TEMPLATE
from .dtypes import f32_to_bf16
from .formats import mxfp4
from .formats.hf import generation_config
from .formats import original
from .guard import refuse_stranger
from .model import ModelConfig, TensorSpec, expected_tensors
from .progress import SILENT, Progress
from .shards import Planned, total_bytes, write_folder
from .tokens.files import write_tokenizer_files

PRESETS: dict[str, ModelConfig] = {
    # Small and fast; hidden != expert size so transposition mistakes show; 4 layers so both
    # attention kinds appear twice; vocab small enough for quick tests.
    "tiny": ModelConfig(
        num_hidden_layers=4, num_experts=8, experts_per_token=4, vocab_size=1024, hidden_size=160,
        intermediate_size=96, head_dim=64, num_attention_heads=8, num_key_value_heads=2,
    ),
    # What the Metal converter and runtime accept: full vocab, 64/8 heads, 32 experts, top-4.
    "metal": ModelConfig(
        num_hidden_layers=2, num_experts=32, experts_per_token=4, vocab_size=201088, hidden_size=192,
        intermediate_size=96, head_dim=64, num_attention_heads=64, num_key_value_heads=8,
    ),
    "20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    "120b": ModelConfig(num_hidden_layers=36, num_experts=128),
}

CHUNK_BYTES = 32 << 20


def _split(planned: list[Planned], count: int) -> list[list[Planned]]:
    """Consecutive groups of roughly equal bytes; never an empty shard."""
    count = max(1, min(count, len(planned)))
    total = total_bytes(planned)
    groups: list[list[Planned]] = [[] for _ in range(count)]
    done = 0
    for i, item in enumerate(planned):
        remaining_specs = len(planned) - i
        target = min(int(done * count / max(total, 1)), count - 1)
        # keep enough tensors for the shards still empty
        empty_after = sum(1 for g in groups[target + 1:] if not g)
        if remaining_specs <= empty_after and groups[target]:
            target = next(j for j in range(target + 1, count) if not groups[j])
        groups[target].append(item)
        done += item.spec.nbytes
    return groups


def _std(name: str, config: ModelConfig, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a BF16 tensor's synthetic values."""
    H = config.hidden_size
    if name.endswith(("mlp1_weight", "mlp2_weight")):  # dense experts: fan-in is the last axis
        return 0.0, 1 / math.sqrt(shape[-1])
    if name.endswith("norm.scale"):
        return 1.0, 0.1
    if name.endswith("attn.sinks") or name == "embedding.weight":
        return 0.0, 1.0
    if name.endswith(".bias") or name.endswith("_bias"):
        return 0.0, 0.05
    if name.endswith("attn.out.weight"):
        return 0.0, 1 / math.sqrt(config.num_attention_heads * config.head_dim)
    if name == "unembedding.weight":
        return 0.0, 3 / math.sqrt(H)
    return 0.0, 1 / math.sqrt(H)


def _scale_centre(fan_in: int) -> int:
    # E|FP4|^2 over uniform codes is 8.5625, so a code's rms is ~2.93; aim at rms 1/sqrt(fan_in).
    return int(round(127 + math.log2(1 / (2.93 * math.sqrt(fan_in)))))


def _values(spec: TensorSpec, config: ModelConfig, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The tensor's synthetic bytes in row chunks of about ``CHUNK_BYTES``."""
    rows = spec.shape[0]
    row_bytes = spec.nbytes // rows
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        shape = (min(step, rows - start),) + spec.shape[1:]
        if spec.name.endswith(".blocks"):
            chunk = np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.uint8).reshape(shape).copy()
            yield mxfp4.tighten(chunk, rng)
        elif spec.name.endswith(".scales"):
            fan_in = spec.shape[-1] * mxfp4.BLOCK
            yield (_scale_centre(fan_in) + rng.integers(-2, 3, size=shape)).astype(np.uint8)
        else:
            mean, std = _std(spec.name, config, spec.shape)
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean)
            yield f32_to_bf16(values)


def generate(out: str | Path, config: ModelConfig | str = "tiny", *, seed: int = 0, shards: int = 1, experts: str = "mxfp4",
             force: bool = False, progress: Progress = SILENT, tokenizer: bool = False) -> Path:
    """Write ``out/original/{config.json,dtypes.json,*.safetensors}``; returns ``out``.

    With ``tokenizer``, also the Hugging Face tokenizer files in ``out`` (beside ``original/``), as
    the real repos have them; full-vocab presets need the o200k vocabulary (``bpe-openai``).

    Output depends only on (config, seed, shards): each tensor has its own random stream.
    ``experts="bf16"`` writes dense BF16 experts (the shape of a fine-tune before quantization).
    """
    if isinstance(config, str):
        config = PRESETS[config]
    config.check()
    refuse_stranger(out, force)  # --force replaces an earlier synthetic checkpoint, not a stranger's folder
    specs = expected_tensors(config, experts)
    seeds = np.random.SeedSequence(seed).spawn(len(specs))
    planned = [Planned(spec, partial(_values, spec, config, np.random.default_rng(s))) for spec, s in zip(specs, seeds)]
    groups = _split(planned, shards)
    return write_folder(out, original.LAYOUT, planned, original.folder_files(config), task="synth", force=force,
                        progress=progress, groups=groups,
                        root_files=(lambda tmp: write_root_files(tmp, config)) if tokenizer else None)


def write_root_files(root: Path, config: ModelConfig) -> None:
    """The files beside ``original/`` in the real repos: the tokenizer files, a real-style chat
    template (oss-convert's Harmony one) and the Hub's ``generation_config.json``."""
    write_tokenizer_files(root, config.vocab_size, HARMONY_TEMPLATE)
    (root / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")


def preset_with(name: str, **overrides) -> ModelConfig:
    """A preset with some keys changed, e.g. ``preset_with("tiny", sliding_window=16)``."""
    return replace(PRESETS[name], **overrides)
