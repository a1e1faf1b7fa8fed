"""``--to gguf``: the plan of a GGUF file (or llama.cpp-style splits) that llama.cpp loads and runs.

The format (names, the MXFP4 repack, storage types, metadata, tokenizer, split names) is
``formats/gguf.py``'s; this module orders the tensors as llama.cpp's converter does and says
where each one's bytes come from:

- experts stay MXFP4 (ggml type 39), repacked one expert at a time; ``mlp1`` is split into
  gate (even rows) and up (odd rows), blocks, scales and bias alike;
- ``token_embd``, ``output`` and ``attn_{q,k,v,output}.weight`` take ``--outtype`` (default
  ``bf16``: what ``--outtype auto`` picks for a BF16 checkpoint, bit-exact); norms, biases,
  sinks and the router weight are F32, as the converter's type rules force;
- qkv is written as separate q/k/v (older llama.cpp builds do not know the fused tensor).

Memory stays near one expert matrix whatever the model size. No timestamps or paths of the
output go into the file: same input, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import atomic_outputs
from ..formats.gguf import (ARCH, DEFAULT_OUTTYPE, add_general, add_model_params, add_tokenizer, check_config, encoder,
                            gguf_names, openai_to_ggml, outtypes)
from ..formats.gguf_writer import LazyTensor, gguf_py, new_writer, split_paths
from ..model import Source, iter_chunks
from ..progress import SILENT, Progress
from ..sizes import parse_size


@dataclass(frozen=True)
class Planned:
    name: str  # GGUF tensor name
    tensor: LazyTensor
    ggml_type: object  # gguf.GGMLQuantizationType


# --------------------------------------------------------------------------------------
# Plan: every GGUF tensor, its type and how to produce it


def _dense(src: Source, name: str, shape: tuple[int, ...], ggml_type, rows: slice | None = None,
           cols: slice | None = None) -> Planned:
    """A BF16 source tensor (optionally a row or column slice) stored as ``ggml_type``."""
    g = gguf_py()
    Q = g.GGMLQuantizationType
    if ggml_type == Q.Q8_0 and shape[-1] % 32:
        ggml_type = Q.F16  # the converter's QuantError fallback
    encode, dtype, stored_shape = encoder(ggml_type)
    # Quantizing widens to float32 first; keep those transients small.
    max_bytes = (16 << 20) if ggml_type == Q.Q8_0 else (64 << 20)

    def chunks() -> Iterator[np.ndarray]:
        if rows is None and cols is None:
            # The reader unmaps each piece once we move on: RSS stays near one piece, not a
            # whole 1 GiB embedding.
            pieces = src.chunks(name, max_bytes)
        else:
            array = src.raw(name)
            if rows is not None:
                array = array[rows]
            if cols is not None:
                array = array[..., cols]
            pieces = iter_chunks(array, max_bytes)
        for piece in pieces:
            yield encode(np.ascontiguousarray(piece))
        src.release(name)

    computed = ggml_type != gguf_py().GGMLQuantizationType.BF16
    return Planned("", LazyTensor(stored_shape(shape), dtype, chunks, computed=computed), ggml_type)


def _experts(src: Source, layer: int, which: str, rows: slice) -> LazyTensor:
    """MXFP4 expert matrix ``[E, R, G*17]``, repacked one expert at a time."""
    E = src.config.num_experts
    _, all_rows, G, _ = src.mxfp4(layer, which).blocks.shape
    R = len(range(*rows.indices(all_rows)))

    def chunks() -> Iterator[np.ndarray]:
        current = src.mxfp4(layer, which)
        for e in range(E):
            yield openai_to_ggml(current.blocks[e, rows], current.scales[e, rows])
            src.release(f"block.{layer}.mlp.{which}_weight")  # keep RSS near one expert

    return LazyTensor((E, R, G * 17), np.uint8, chunks, computed=True)


def plan(src: Source, outtype: str = DEFAULT_OUTTYPE) -> list[Planned]:
    """Every tensor in llama.cpp's load order, with its GGUF name and type."""
    Q = gguf_py().GGMLQuantizationType
    main_type = outtypes()[outtype][0]
    c = src.config
    H, I, E = c.hidden_size, c.intermediate_size, c.num_experts
    out: list[Planned] = []

    def add(name: str, planned: Planned, part: int = 0) -> None:
        out.append(Planned(gguf_names(name)[part], planned.tensor, planned.ggml_type))

    def mx(tensor: LazyTensor) -> Planned:
        return Planned("", tensor, Q.MXFP4)

    add("embedding.weight", _dense(src, "embedding.weight", (c.vocab_size, H), main_type))
    even, odd = slice(0, None, 2), slice(1, None, 2)
    for n in range(c.num_hidden_layers):
        p = f"block.{n}."
        add(p + "attn.norm.scale", _dense(src, p + "attn.norm.scale", (H,), Q.F32))
        for i, (count, part) in enumerate(zip(c.qkv_rows, c.qkv_slices)):
            add(p + "attn.qkv.weight", _dense(src, p + "attn.qkv.weight", (count, H), main_type, rows=part), i)
            add(p + "attn.qkv.bias", _dense(src, p + "attn.qkv.bias", (count,), Q.F32, rows=part), i)
        heads = c.num_attention_heads * c.head_dim
        add(p + "attn.out.weight", _dense(src, p + "attn.out.weight", (H, heads), main_type))
        add(p + "attn.out.bias", _dense(src, p + "attn.out.bias", (H,), Q.F32))
        add(p + "attn.sinks", _dense(src, p + "attn.sinks", (c.num_attention_heads,), Q.F32))
        add(p + "mlp.norm.scale", _dense(src, p + "mlp.norm.scale", (H,), Q.F32))
        # The router stays F32 whatever --outtype (llama.cpp never quantizes FFN_GATE_INP).
        add(p + "mlp.gate.weight", _dense(src, p + "mlp.gate.weight", (E, H), Q.F32))
        add(p + "mlp.gate.bias", _dense(src, p + "mlp.gate.bias", (E,), Q.F32))
        for i, rows in enumerate((even, odd)):  # gate, then up
            add(p + "mlp.mlp1_weight", mx(_experts(src, n, "mlp1", rows)), i)
            add(p + "mlp.mlp1_bias", _dense(src, p + "mlp.mlp1_bias", (E, I), Q.F32, cols=rows), i)
        add(p + "mlp.mlp2_weight", mx(_experts(src, n, "mlp2", slice(None))))
        add(p + "mlp.mlp2_bias", _dense(src, p + "mlp.mlp2_bias", (E, H), Q.F32))
    add("norm.scale", _dense(src, "norm.scale", (H,), Q.F32))
    add("unembedding.weight", _dense(src, "unembedding.weight", (c.vocab_size, H), main_type))
    return out


# --------------------------------------------------------------------------------------
# Writing


def convert(src: Source, out: Path, *, force: bool = False, progress: Progress = SILENT,
            outtype: str = DEFAULT_OUTTYPE, split_max_size: str | int | None = None,
            chat_template: str | None = None) -> Path:
    """Write ``out`` (a ``.gguf`` file; with splits, ``out``'s stem + ``-0000i-of-0000n.gguf``).

    Returns the path llama.cpp should be given: the file, or the first split.
    """
    check_config(src.config, src.config_path)
    out = Path(out)
    root = Path(src.repo_root)
    planned = plan(src, outtype)
    writer = new_writer(ARCH, parse_size(split_max_size) if split_max_size is not None else 0)
    for item in planned:
        writer.add_tensor(item.name, item.tensor, raw_dtype=item.ggml_type)
    add_general(writer, root)
    add_model_params(writer, src.config, outtypes()[outtype][1])
    writer.add_quantization_version(gguf_py().GGML_QUANT_VERSION)
    add_tokenizer(writer, root, src.config.vocab_size, chat_template)

    finals = split_paths(out, len(writer.tensors))
    total = sum(item.tensor.nbytes for item in planned)
    # Every shard is built under a temporary name; the set is published when all are complete,
    # the first shard last (atomic_outputs), so a reader never sees old and new shards mixed.
    with atomic_outputs(finals, force=force) as tmps, progress.task("gguf", total) as advance:
        writer.targets = tmps
        for item in planned:
            item.tensor.on_bytes = advance
        writer.write_header_to_file(path=writer.targets[0])
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return finals[0]
