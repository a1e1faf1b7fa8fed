"""``--to mlx``: a folder ``mlx_lm.load`` opens, experts kept as lossless MXFP4.

Layout (spec mlx-gpt-oss.md §1.2, §2, §7): mlx-lm's ``gpt_oss`` names; the MoE experts as
``QuantizedSwitchLinear(mode="mxfp4")`` parameters, i.e. OpenAI's ``.blocks`` bytes viewed as
uint32 (``[E, O, H/32, 16]`` u8 -> ``[E, O, H/8]`` u32, a pure byte view) with the uint8 scales
as they are, ``mlp1`` split into ``gate_proj`` (even rows) and ``up_proj`` (odd rows) as
mlx-lm's ``sanitize`` does; every other tensor BF16, bytes copied (``attn.qkv`` split by rows).
The experts are never dequantized.

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

import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_output
from ..errors import InputError
from ..formats.hf import hf_config, qkv_split
from ..formats.original import expected_tensors, iter_chunks
from ..formats.safetensors import SafetensorsWriter, TensorSpec
from ..tokenizer import TOKENIZER_FILES
from .hf_bf16 import DEFAULT_SHARD_SIZE, Planned, copy_tokenizer_files, parse_size, release, shard, shard_names

MXFP4_QUANTIZATION = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
AFFINE_GROUP_SIZE = 64
ROUTER_QUANTIZATION = {"group_size": 64, "bits": 8}  # gpt_oss Model.quant_predicate: no "mode" key
RECIPES = {"mxfp4-q8": 8, "mxfp4-q4": 4}
# Needed for mlx_lm.load to build a tokenizer at all; the others only add chat/generation defaults.
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# generation_config.json only overrides eos_token_id, which config.json already carries: no warning.
OPTIONAL_TOKENIZER_FILES = ("generation_config.json",)


# --------------------------------------------------------------------------------------
# Names


def layer_names(n: int) -> dict[str, str]:
    """``original/`` suffix -> mlx-lm module path for the plain (renamed) tensors of layer ``n``."""
    p = f"model.layers.{n}."
    return {
        "attn.norm.scale": p + "input_layernorm.weight",
        "attn.sinks": p + "self_attn.sinks",
        "attn.out.weight": p + "self_attn.o_proj.weight",
        "attn.out.bias": p + "self_attn.o_proj.bias",
        "mlp.norm.scale": p + "post_attention_layernorm.weight",
        "mlp.gate.weight": p + "mlp.router.weight",
        "mlp.gate.bias": p + "mlp.router.bias",
    }


# --------------------------------------------------------------------------------------
# Plan: every output tensor with a function producing its bytes chunk by chunk


def plan(src, recipe: str | None = None) -> tuple[list[Planned], dict]:
    """Output tensors in model order, and the per-layer quantization entries for config.json."""
    bits = RECIPES[recipe] if recipe else None
    c = src.config
    shapes = {s.name: s.shape for s in expected_tensors(c)}
    out: list[Planned] = []
    overrides: dict[str, dict] = {}

    def linear(module: str, name: str, rows: slice | None = None, params: dict | None = None) -> None:
        """A BF16 weight ``[out, in]``, or its affine-quantized triple when the recipe says so."""
        shape = _rows_shape(shapes, name, rows)
        params = params if params is not None else (
            {"group_size": AFFINE_GROUP_SIZE, "bits": bits, "mode": "affine"} if bits else None)
        if params is None or shape[-1] % AFFINE_GROUP_SIZE:
            out.append(Planned(TensorSpec(module + ".weight", "BF16", shape), _copy(src, name, rows)))
            return
        overrides[module] = params
        out.extend(_affine(src, name, rows, module, shape, params["group_size"], params["bits"]))

    def plain(mlx_name: str, name: str, rows: slice | None = None) -> None:
        out.append(Planned(TensorSpec(mlx_name, "BF16", _rows_shape(shapes, name, rows)), _copy(src, name, rows)))

    linear("model.embed_tokens", "embedding.weight")
    for n in range(c.num_hidden_layers):
        p, names = f"block.{n}.", layer_names(n)
        attn = f"model.layers.{n}.self_attn."
        plain(names["attn.norm.scale"], p + "attn.norm.scale")
        start = 0
        for proj, size in zip("qkv", qkv_split(c)):
            rows = slice(start, start + size)
            linear(f"{attn}{proj}_proj", p + "attn.qkv.weight", rows)
            plain(f"{attn}{proj}_proj.bias", p + "attn.qkv.bias", rows)
            start += size
        linear(attn + "o_proj", p + "attn.out.weight")
        plain(names["attn.out.bias"], p + "attn.out.bias")
        plain(names["attn.sinks"], p + "attn.sinks")
        plain(names["mlp.norm.scale"], p + "mlp.norm.scale")
        linear(f"model.layers.{n}.mlp.router", p + "mlp.gate.weight",
               params=dict(ROUTER_QUANTIZATION) if bits else None)
        plain(names["mlp.gate.bias"], p + "mlp.gate.bias")
        out.extend(_experts(src, n))
    plain("model.norm.weight", "norm.scale")
    linear("lm_head", "unembedding.weight")
    return out, overrides


def _rows_shape(shapes: dict, name: str, rows: slice | None) -> tuple[int, ...]:
    shape = tuple(shapes[name])
    if rows is None:
        return shape
    return (rows.stop - rows.start,) + shape[1:]


def _copy(src, name: str, rows: slice | None) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        data = src.raw(name)
        for piece in iter_chunks(data if rows is None else data[rows]):
            yield piece
            release(src, name)  # per chunk: a 1.2 GB embedding never becomes resident whole

    return chunks


def _experts(src, n: int) -> list[Planned]:
    """gate/up/down weight (u32 view), scales (u8) and bias (BF16) of layer ``n``, one expert per chunk."""
    c = src.config
    E, H, I = c.num_experts, c.hidden_size, c.intermediate_size
    p, q = f"block.{n}.mlp.", f"model.layers.{n}.mlp.experts."
    out = []
    for proj, which, parity, (rows, cols) in (("gate_proj", "mlp1", 0, (I, H)), ("up_proj", "mlp1", 1, (I, H)),
                                              ("down_proj", "mlp2", None, (H, I))):
        out += [
            Planned(TensorSpec(q + proj + ".weight", "U32", (E, rows, cols // 8)), _expert_part(src, n, which, "blocks", parity)),
            Planned(TensorSpec(q + proj + ".scales", "U8", (E, rows, cols // 32)), _expert_part(src, n, which, "scales", parity)),
            Planned(TensorSpec(q + proj + ".bias", "BF16", (E, rows)), _bias(src, p + which + "_bias", parity)),
        ]
    return out


def _expert_part(src, n: int, which: str, part: str, parity: int | None) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        pair = src.mxfp4(n, which)
        if pair is None:
            raise InputError("experts are dense BF16; --to mlx needs MXFP4 experts (convert --to original first)",
                             tensor=f"block.{n}.mlp.{which}_weight")
        data = pair.blocks if part == "blocks" else pair.scales
        for e in range(data.shape[0]):
            yield _select_rows(_as_mlx(data[e]) if part == "blocks" else data[e], parity)
            release(src, f"block.{n}.mlp.{which}_weight")  # about one expert resident at a time

    return chunks


def _as_mlx(blocks: np.ndarray) -> np.ndarray:
    """OpenAI ``[O, G, 16]`` uint8 -> MLX ``[O, G*4]`` uint32: the same bytes (little-endian host)."""
    words = np.ascontiguousarray(blocks).view("<u4")
    return words.reshape(*blocks.shape[:-2], blocks.shape[-2] * 4)


def _select_rows(data: np.ndarray, parity: int | None) -> np.ndarray:
    """mlp1 rows interleave gate (even) and linear/up (odd); mlp2 is taken whole."""
    return data if parity is None else np.ascontiguousarray(data[parity::2])


def _bias(src, name: str, parity: int | None) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        data = src.raw(name)
        yield data if parity is None else np.ascontiguousarray(data[:, parity::2])
        release(src, name)

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
            result = mx.quantize(weight, group_size=group_size, bits=bits, mode="affine")[part]
            yield np.array(result if part == 0 else result.view(mx.uint16))
            release(src, name)

    return chunks


# --------------------------------------------------------------------------------------
# Config and index


def mlx_config(config, overrides: dict[str, dict] | None = None) -> dict:
    """HF ``GptOssForCausalLM`` keys plus the quantization block both old and new mlx-lm accept.

    ``quantization`` carries ``mode`` (mlx-lm 0.28 assumes affine without it) and is repeated as
    ``quantization_config``, as ``mlx_lm.utils.save_config`` writes it.
    """
    doc = hf_config(config)
    quantization = dict(MXFP4_QUANTIZATION)
    quantization.update(overrides or {})
    doc["quantization"] = quantization
    doc["quantization_config"] = quantization
    return dict(sorted(doc.items()))


def total_parameters(planned: list[Planned]) -> int:
    """``mlx_lm.utils.get_total_parameters``: quantized weights count ``size * 32 / bits``; scales
    and affine biases are not parameters, and neither are the attention sinks (it counts only
    leaf modules' parameters, and ``sinks`` belongs to the non-leaf ``Attention``)."""
    specs = {p.spec.name: p.spec for p in planned}
    total = 0
    for name, spec in specs.items():
        size = int(np.prod(spec.shape))
        if name.endswith((".scales", ".biases", ".sinks")):
            continue
        if spec.dtype == "U32":
            module = name.rsplit(".", 1)[0]
            scales = specs[module + ".scales"]
            in_dim = scales.shape[-1] * (AFFINE_GROUP_SIZE if module + ".biases" in specs else 32)
            bits = spec.shape[-1] * 32 // in_dim
            size = size * 32 // bits
        total += size
    return total


# --------------------------------------------------------------------------------------
# Convert


def convert(src, out: Path, *, force: bool = False, progress: bool = True,
            shard_size: str | int = DEFAULT_SHARD_SIZE, recipe: str | None = None, **options) -> Path:
    """Write the MLX folder for ``src`` (``OriginalCheckpoint`` or ``formats.hf.HfCheckpoint``)."""
    if options:
        raise InputError(f"options {sorted(options)} do not apply to --to mlx (it takes --shard-size and --recipe)")
    if recipe is not None and recipe not in RECIPES:
        raise InputError(f"unknown MLX recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    if getattr(src, "experts", "mxfp4") != "mxfp4":
        raise InputError("experts are dense BF16; --to mlx keeps experts as MXFP4 and never quantizes them itself: "
                         "run convert --to original first", file=getattr(src, "path", None))
    planned, overrides = plan(src, recipe)
    groups = shard(planned, parse_size(shard_size))
    names = shard_names(len(groups))
    total = sum(p.spec.nbytes for p in planned)
    out = Path(out)
    warn_missing_tokenizer(Path(src.repo_root))
    with atomic_output(out, force=force, is_dir=True) as tmp, \
            tqdm(total=total, desc="mlx", unit="B", unit_scale=True, unit_divisor=1024,
                 disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for file_name, group in zip(names, groups):
            with open(tmp / file_name, "wb") as fh:
                writer = SafetensorsWriter(fh, [p.spec for p in group], {"format": "mlx"})
                for item in group:
                    for chunk in item.chunks():
                        writer.write(item.spec.name, chunk)
                        bar.update(chunk.nbytes)
                writer.finish()
        index = {"metadata": {"total_size": total, "total_parameters": total_parameters(planned)},
                 "weight_map": dict(sorted((p.spec.name, n) for n, g in zip(names, groups) for p in g))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
        (tmp / "config.json").write_text(json.dumps(mlx_config(src.config, overrides), indent=4) + "\n")
        copy_tokenizer_files(Path(src.repo_root), tmp)
    return out


def warn_missing_tokenizer(root: Path) -> None:
    """Say on stderr which tokenizer / chat template files the source lacks (they are copied if present)."""
    missing = [n for n in TOKENIZER_FILES if not (root / n).is_file() and n not in OPTIONAL_TOKENIZER_FILES]
    if any(n in missing for n in REQUIRED_TOKENIZER_FILES):
        print(f"warning: no {' or '.join(n for n in REQUIRED_TOKENIZER_FILES if n in missing)} in {root}: "
              "mlx_lm.load and the mlx_lm CLI tools will not open the output until you add the tokenizer files "
              "(mlx_lm.utils.load_model still loads the weights)", file=sys.stderr)
    elif missing:
        print(f"warning: {', '.join(missing)} not found in {root}; not copied", file=sys.stderr)
