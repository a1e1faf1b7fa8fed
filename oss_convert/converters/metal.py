"""``--to metal``: the gpt-oss Metal ``model.bin``, byte-identical to ``create-local-model.py``.

The layout is in ``formats/metal.py``. This module checks that the model fits what the Metal
runtime hard-codes, gathers the tokenizer, and streams tensors from the memory-mapped source
in file order, padding to the offsets the C loader computes.

Deliberate differences from upstream, none of which changes the bytes of a valid model:
- the scale check is on the maximum (``s + 14`` must fit a byte without reaching 255);
  upstream asserts ``min() < 240``, which lets larger scales wrap around silently;
- inputs the runtime would misread are refused: head_dim != 64, fewer than 200014 vocabulary
  rows (upstream slices silently), experts_per_token != 4 (upstream writes 4 regardless);
- the text tokens come from ``tokenizer.json`` beside ``original/`` or from ``--vocab``
  instead of a tiktoken download; the 16 special-token UUIDs are the table upstream produces,
  including its zero UUID for ``<|endofuntrusted|>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .. import hashing
from ..atomic import atomic_output
from ..errors import InputError
from ..formats.metal import (ACTIVE_EXPERTS, HEAD_DIM, LAYOUT_UUID, MAGIC, MAX_SCALE, MODEL_UUID, NUM_INCLUDED_TOKENS,
                             UE8_OFFSET, Layout, MetalHeader, permute_qkv, tokenizer_section)
from ..model import NUM_TEXT_TOKENS, ModelConfig, Source
from ..progress import SILENT, Progress
from ..tokens.files import TokenizerJson
from ..tokens.vocabulary import O200K_PATTERN, load_ranks


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT,
            vocab: str | Path | None = None) -> Path:
    """Write ``out`` (a ``.bin`` file) or ``out/model.bin`` from an MXFP4 checkpoint."""
    check_config(src.config, src.path)
    for warning in runtime_warnings(src.config):
        progress.note(f"warning: {warning}")
    tokens = text_tokens(src, vocab)
    header = MetalHeader.from_config(src.config)
    prefix = MAGIC + bytes(4) + MODEL_UUID + header.pack() + LAYOUT_UUID + tokenizer_section(tokens, O200K_PATTERN)
    layout = Layout(header, NUM_INCLUDED_TOKENS, len(prefix))
    out = Path(out)
    is_dir = out.suffix != ".bin"  # OUT/model.bin, as the Hub repo's metal/model.bin
    with atomic_output(out, force=force, is_dir=is_dir) as tmp, progress.task("metal", layout.file_size) as advance:
        with hashing.HashingWriter(tmp / "model.bin" if is_dir else tmp) as fh:  # hashed as it goes
            writer = PaddedWriter(fh, advance)
            writer.write(prefix)
            write_shared(src, layout, writer)
            write_experts(src, layout, writer)
            assert writer.position == layout.file_size, (writer.position, layout.file_size)
    return out


# --------------------------------------------------------------------------------------
# Checks


def check_config(config: ModelConfig, file: Path | None = None) -> None:
    """Refuse a model the Metal format or runtime would misread (all problems at once)."""
    c = config
    problems = []
    if c.head_dim != HEAD_DIM:
        problems.append(f"head_dim is {c.head_dim}; the Metal kernels and the q/k pre-scaling "
                        f"(0.5 * 0.25 = 1/sqrt(64)) assume {HEAD_DIM}")
    if c.vocab_size < NUM_INCLUDED_TOKENS:
        problems.append(f"vocab_size is {c.vocab_size}; model.bin always holds {NUM_INCLUDED_TOKENS} rows "
                        f"(199998 o200k text tokens + 16 Harmony specials), so a smaller vocabulary cannot be stored")
    if c.experts_per_token != ACTIVE_EXPERTS:
        problems.append(f"experts_per_token is {c.experts_per_token}; the Metal runtime only routes to the top "
                        f"{ACTIVE_EXPERTS} experts (upstream writes {ACTIVE_EXPERTS} whatever the config says)")
    if problems:
        raise InputError("cannot be written as a Metal model.bin: " + "; ".join(problems), file=file)


def runtime_warnings(config: ModelConfig) -> list[str]:
    """Shapes the file can hold but the Metal kernels cannot run (spec §4.5)."""
    c = config
    warnings = []
    if (c.num_attention_heads, c.num_key_value_heads) != (64, 8):
        warnings.append(f"{c.num_attention_heads} query / {c.num_key_value_heads} kv heads: the Metal qkv and "
                        "sdpa kernels are written for 64 / 8")
    if c.num_experts not in (32, 128):
        warnings.append(f"{c.num_experts} experts: the Metal runtime has top-4 kernels for 32 and 128 only")
    if c.hidden_size % 192 or c.intermediate_size % 96:
        warnings.append(f"hidden_size {c.hidden_size} / intermediate_size {c.intermediate_size}: the Metal "
                        "launchers need multiples of 192 / 96")
    return warnings


def check_scales(scales: np.ndarray, name: str, file) -> None:
    """Every scale must survive ``+14`` in a byte without becoming 255 (inf)."""
    high = int(scales.max())
    if high > MAX_SCALE:
        raise InputError(f"has a scale byte of {high}; Metal stores scale + {UE8_OFFSET} in one byte, so the "
                         f"largest it can hold is {MAX_SCALE} (2^{MAX_SCALE - 127})", file=file, tensor=name)


# --------------------------------------------------------------------------------------
# Tokenizer


def text_tokens(src: Source, vocab: str | Path | None) -> list[bytes]:
    """The 199998 o200k text tokens: from ``--vocab`` if given, else ``tokenizer.json`` beside ``original/``."""
    if vocab is not None:
        return load_ranks(NUM_TEXT_TOKENS, vocab)
    path = Path(src.repo_root) / "tokenizer.json"
    if path.is_file():
        return TokenizerJson(path).text_token_bytes(NUM_TEXT_TOKENS)
    raise InputError(
        "the Metal model.bin embeds the tokenizer, but there is no tokenizer.json beside original/; pass "
        "--vocab o200k_base.tiktoken (the bpe-openai package ships it as bpe_openai/data/o200k_base.tiktoken.gz)",
        file=path)


# --------------------------------------------------------------------------------------
# Writing


class PaddedWriter:
    """Sequential writes with zero padding up to each tensor's layout offset."""

    def __init__(self, fh: BinaryIO, progress):
        self.fh, self.progress, self.position = fh, progress, 0

    def write(self, data) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        self.fh.write(view)
        self.position += view.nbytes
        self.progress(view.nbytes)

    def pad_to(self, offset: int) -> None:
        assert offset >= self.position, f"layout offset {offset} is behind the write position {self.position}"
        if offset > self.position:
            self.write(bytes(offset - self.position))


def _dense_chunks(src: Source, name: str, rows: int | None = None) -> Iterator[np.ndarray]:
    """The tensor's BF16 bits as stored in model.bin (qkv transformed, vocabularies truncated)."""
    config = src.config
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        yield permute_qkv(src.raw(name), config.num_attention_heads, config.num_key_value_heads)
    else:  # chunks unmap each piece once written: the 1.2 GB vocabularies never sit in RSS
        left = rows if rows is not None else src.raw(name).shape[0]
        for piece in src.chunks(name):
            if left <= 0:
                break
            yield piece[:left]
            left -= piece.shape[0]
    src.release(name)


def write_shared(src: Source, layout: Layout, writer: PaddedWriter) -> None:
    for name, slot in layout.dense.items():
        writer.pad_to(slot.offset)
        rows = slot.shape[0] if name in ("embedding.weight", "unembedding.weight") else None
        for chunk in _dense_chunks(src, name, rows):
            writer.write(chunk)


def write_experts(src: Source, layout: Layout, writer: PaddedWriter) -> None:
    """Per layer, regroup mlp1/mlp2 blocks, scales + 14 and biases expert by expert."""
    for n in range(layout.header.num_blocks):
        pairs = {which: src.mxfp4(n, which) for which in ("mlp1", "mlp2")}
        parts = {
            "mlp1_blocks": pairs["mlp1"].blocks, "mlp1_scales": pairs["mlp1"].scales,
            "mlp1_bias": src.raw(f"block.{n}.mlp.mlp1_bias"),
            "mlp2_blocks": pairs["mlp2"].blocks, "mlp2_scales": pairs["mlp2"].scales,
            "mlp2_bias": src.raw(f"block.{n}.mlp.mlp2_bias"),
        }
        for e in range(layout.header.num_experts):
            for part, array in parts.items():
                writer.pad_to(layout.expert(n, e, part).offset)
                if part.endswith("_scales"):  # expert by expert: a merged adapter's experts are made one at a time
                    check_scales(array[e], f"block.{n}.mlp.{part[:4]}_weight.scales", src.path)
                writer.write(array[e] + np.uint8(UE8_OFFSET) if part.endswith("_scales") else array[e])
            # per expert: a 120b layer's experts (1.7 GB) would otherwise all become resident
            for name in ("mlp.mlp1_weight", "mlp.mlp1_bias", "mlp.mlp2_weight", "mlp.mlp2_bias"):
                src.release(f"block.{n}.{name}")
