"""``--to mlx``: the plan of a folder ``mlx_lm.load`` opens, experts kept as lossless MXFP4.

The format (names, the uint32 view of the expert blocks, the gate/up split, config.json) is
``formats/mlx.py``'s; this module only orders the tensors and says where each one's bytes
come from. Every non-expert tensor is BF16, bytes copied (``attn.qkv`` split by rows); the
experts are never dequantized.

Recipes ``mxfp4-q8`` / ``mxfp4-q4`` additionally quantize the non-expert linear layers and the
embeddings affine 8/4-bit with group size 64 through ``mx.quantize``, exactly what
``mlx_lm.convert -q --q-bits 8|4`` does to gpt-oss (mlx-community's "MXFP4-Q8"/"MXFP4-Q4"): the
router always 8-bit (``Model.quant_predicate``), layers whose input width is not a multiple of
64 left BF16 (``quantize_model``'s own rule), per-layer entries in ``config.json``.

Output: ``config.json`` (sorted keys, ``quantization`` = ``quantization_config``),
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` (1-based, split at
``--shard-size``, default 5 GiB like mlx-lm), ``model.safetensors.index.json`` (mlx-lm writes it
even for one file) and the tokenizer / chat template files from the source's repo root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import InputError
from ..formats.mlx import (AFFINE_GROUP_SIZE, AFFINE_RECIPES, LAYOUT, ROUTER_QUANTIZATION, as_mlx_words,
                           folder_files, missing_tokenizer_warning, mlx_names)
from ..model import Source, TensorSpec, expected_tensors, gate_up_rows, iter_chunks
from ..progress import SILENT, Progress
from ..tokens.files import copy_tokenizer_files, generation_eos
from ..shards import Planned, copy_chunks, write_folder


# --------------------------------------------------------------------------------------
# Plan: every output tensor with a function producing its bytes chunk by chunk


def plan(src: Source, recipe: str | None = None) -> tuple[list[Planned], dict]:
    """Output tensors in model order, and the per-layer quantization entries for config.json."""
    bits = AFFINE_RECIPES[recipe] if recipe else None
    c = src.config
    shapes = {s.name: s.shape for s in expected_tensors(c)}
    out: list[Planned] = []
    overrides: dict[str, dict] = {}

    def names(name: str) -> list[str]:
        return mlx_names(name, c.num_hidden_layers)

    def linear(module: str, name: str, rows: slice | None = None, params: dict | None = None) -> None:
        """A BF16 weight ``[out, in]``, or its affine-quantized triple when the recipe says so."""
        shape = _rows_shape(shapes, name, rows)
        params = params if params is not None else (
            {"group_size": AFFINE_GROUP_SIZE, "bits": bits, "mode": "affine"} if bits else None)
        if params is None or shape[-1] % AFFINE_GROUP_SIZE:
            out.append(Planned(TensorSpec(module + ".weight", "BF16", shape), copy_chunks(src, name, rows)))
            return
        overrides[module] = params
        out.extend(_affine(src, name, rows, module, shape, params["group_size"], params["bits"]))

    def plain(name: str, rows: slice | None = None, mlx_name: str | None = None) -> None:
        mlx_name = mlx_name or names(name)[0]
        out.append(Planned(TensorSpec(mlx_name, "BF16", _rows_shape(shapes, name, rows)), copy_chunks(src, name, rows)))

    linear(names("embedding.weight")[0], "embedding.weight")
    for n in range(c.num_hidden_layers):
        p = f"block.{n}."
        plain(p + "attn.norm.scale")
        for module, bias, rows in zip(names(p + "attn.qkv.weight"), names(p + "attn.qkv.bias"), c.qkv_slices):
            linear(module, p + "attn.qkv.weight", rows)
            plain(p + "attn.qkv.bias", rows, bias)
        linear(names(p + "attn.out.weight")[0], p + "attn.out.weight")
        plain(p + "attn.out.bias")
        plain(p + "attn.sinks")
        plain(p + "mlp.norm.scale")
        linear(names(p + "mlp.gate.weight")[0], p + "mlp.gate.weight",
               params=dict(ROUTER_QUANTIZATION) if bits else None)
        plain(p + "mlp.gate.bias")
        out.extend(_experts(src, n))
    plain("norm.scale")
    linear(names("unembedding.weight")[0], "unembedding.weight")
    return out, overrides


def _rows_shape(shapes: dict, name: str, rows: slice | None) -> tuple[int, ...]:
    shape = tuple(shapes[name])
    if rows is None:
        return shape
    return (rows.stop - rows.start,) + shape[1:]


def _experts(src: Source, n: int) -> list[Planned]:
    """gate/up/down weight (u32 view), scales (u8) and bias (BF16) of layer ``n``, one expert per chunk."""
    c = src.config
    E, H, I = c.num_experts, c.hidden_size, c.intermediate_size
    p = f"block.{n}.mlp."
    gate, up = mlx_names(p + "mlp1_weight", c.num_hidden_layers)
    (down,) = mlx_names(p + "mlp2_weight", c.num_hidden_layers)
    out = []
    for module, which, parity, (rows, cols) in ((gate, "mlp1", 0, (I, H)), (up, "mlp1", 1, (I, H)),
                                                (down, "mlp2", None, (H, I))):
        out += [
            Planned(TensorSpec(module + ".weight", "U32", (E, rows, cols // 8)), _expert_part(src, n, which, "blocks", parity)),
            Planned(TensorSpec(module + ".scales", "U8", (E, rows, cols // 32)), _expert_part(src, n, which, "scales", parity)),
            Planned(TensorSpec(module + ".bias", "BF16", (E, rows)), _bias(src, p + which + "_bias", parity)),
        ]
    return out


def _expert_part(src: Source, n: int, which: str, part: str, parity: int | None) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        pair = src.mxfp4(n, which)
        if pair is None:
            raise InputError("experts are dense BF16; --to mlx needs MXFP4 experts (convert --to original first)",
                             tensor=f"block.{n}.mlp.{which}_weight")
        data = pair.blocks if part == "blocks" else pair.scales
        for e in range(data.shape[0]):
            yield gate_up_rows(as_mlx_words(data[e]) if part == "blocks" else data[e], parity)
            src.release(f"block.{n}.mlp.{which}_weight")  # about one expert resident at a time

    return chunks


def _bias(src: Source, name: str, parity: int | None) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        yield gate_up_rows(src.raw(name), parity, axis=1)
        src.release(name)

    return chunks


def _affine(src, name: str, rows: slice | None, module: str, shape: tuple[int, int],
            group_size: int, bits: int) -> list[Planned]:
    """``module.{weight,scales,biases}`` from ``mx.quantize`` of the BF16 weight, as mlx-lm stores them."""
    out_dim, in_dim = shape
    groups = in_dim // group_size
    specs = [TensorSpec(module + ".weight", "U32", (out_dim, in_dim * bits // 32)),
             TensorSpec(module + ".scales", "BF16", (out_dim, groups)),
             TensorSpec(module + ".biases", "BF16", (out_dim, groups))]
    return [Planned(spec, _quantized_part(src, name, rows, i, group_size, bits)) for i, spec in enumerate(specs)]


def _quantized_part(src, name: str, rows: slice | None, part: int, group_size: int,
                    bits: int) -> Callable[[], Iterator[np.ndarray]]:
    """Part ``part`` (0 weight, 1 scales, 2 biases) of the quantized tensor, by row chunks.

    Groups run along each row, so quantizing row chunks gives the same bytes as the whole
    matrix; each part re-quantizes its chunks so only one chunk is ever held (cheap next to
    the experts).
    """
    def chunks() -> Iterator[np.ndarray]:
        import mlx.core as mx

        data = src.raw(name)
        for piece in iter_chunks(data if rows is None else data[rows], 16 << 20):
            weight = mx.array(np.ascontiguousarray(piece)).view(mx.bfloat16)
            # on the CPU stream whatever the machine: the same input gives the same bytes on a GPU host
            # (mlx-cuda 0.32.4's quantize and dequantize part from the CPU's in the last bits)
            result = mx.quantize(weight, group_size=group_size, bits=bits, mode="affine", stream=mx.cpu)[part]
            yield np.array(result if part == 0 else result.view(mx.uint16))
            src.release(name)

    return chunks


# --------------------------------------------------------------------------------------
# Convert


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT,
            shard_size: str | int | None = None, recipe: str | None = None,
            chat_template: str | None = None) -> Path:
    """Write the MLX folder for ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    planned, overrides = plan(src, recipe)
    root = Path(src.repo_root)
    warning = missing_tokenizer_warning(root)
    if warning:
        progress.note(f"warning: {warning}")
    # mlx_lm.utils.load_config takes generation_config.json's list when it has one
    files = folder_files(src.config, overrides, generation_eos(root) or None)
    return write_folder(out, LAYOUT, planned, files, task="mlx", force=force, progress=progress,
                        shard_size=shard_size, root_files=lambda tmp: copy_tokenizer_files(root, tmp, chat_template))
