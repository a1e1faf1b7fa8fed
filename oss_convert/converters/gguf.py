"""``--to gguf``: one GGUF file (or llama.cpp-style splits) that llama.cpp loads and runs.

What llama.cpp's own ``convert_hf_to_gguf.py`` (``conversion/gpt_oss.py``) writes for gpt-oss,
reproduced from the ``original/`` checkpoint (spec ``gguf-gpt-oss.md`` §1):

- experts stay MXFP4 (ggml type 39): scale bytes are copied, the 4-bit codes only move from
  OpenAI's order (element 2i low nibble, 2i+1 high) to ggml's (element j low, j+16 high).
  ``mlp1`` is split into gate (even rows) and up (odd rows), blocks, scales and bias alike;
- ``token_embd``, ``output`` and ``attn_{q,k,v,output}.weight`` take ``--outtype`` (default
  ``bf16``: what ``--outtype auto`` picks for a BF16 checkpoint, bit-exact); norms, biases,
  sinks and the router weight are F32, as the converter's type rules force;
- qkv is written as separate q/k/v (older llama.cpp builds do not know the fused tensor).

Tensors are handed to gguf-py's ``GGUFWriter`` as lazy objects that produce their bytes chunk
by chunk while the file is written, so memory stays near one expert matrix whatever the model
size. No timestamps or paths of the output go into the file: same input, same bytes.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_output
from ..dtypes import bf16_to_f32
from ..errors import InputError
from ..formats.hf import RMS_NORM_EPS, hf_config, qkv_split
from ..formats.original import iter_chunks
from .hf_bf16 import parse_size, release

ARCH = "gpt-oss"
DEFAULT_OUTTYPE = "bf16"
TOKENIZER_PRE = "gpt-4o"  # o200k_harmony's split regex is GPT-4o's (spec §1.4)
SWIGLU_LIMIT = 7.0  # hard-coded in llama.cpp's LLM_FFN_SWIGLU_OAI_MOE


def _gguf():
    import gguf  # imported lazily: the CLI should start without it

    return gguf


def outtypes() -> dict:
    """``--outtype`` -> (ggml type of the non-expert matrices, ``general.file_type``)."""
    g = _gguf()
    Q, F = g.GGMLQuantizationType, g.LlamaFileType
    # The converter relabels F16/BF16 files with MXFP4 experts as MOSTLY_MXFP4_MOE; Q8_0 stays Q8_0.
    return {"bf16": (Q.BF16, F.MOSTLY_MXFP4_MOE), "f16": (Q.F16, F.MOSTLY_MXFP4_MOE), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}


# --------------------------------------------------------------------------------------
# MXFP4 repack


def openai_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI blocks ``[..., G, 16]`` + scales ``[..., G]`` -> ggml ``block_mxfp4`` bytes ``[..., G*17]``.

    Byte j of a ggml block holds element j in the low nibble and element j+16 in the high one;
    OpenAI's byte i holds elements 2i (low) and 2i+1 (high). The codes themselves are the same.
    """
    blocks = np.asarray(blocks, dtype=np.uint8)
    codes = np.empty(blocks.shape[:-1] + (32,), np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate([np.asarray(scales, np.uint8)[..., None], qs], axis=-1)
    return out.reshape(*blocks.shape[:-2], -1)


def ggml_to_openai(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``openai_to_ggml``: ggml bytes ``[..., G*17]`` -> (blocks ``[..., G, 16]``, scales ``[..., G]``)."""
    data = np.asarray(data, dtype=np.uint8)
    grouped = data.reshape(*data.shape[:-1], -1, 17)
    scales = grouped[..., 0]
    qs = grouped[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element order 0..31
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(scales)


# --------------------------------------------------------------------------------------
# Lazy tensors for GGUFWriter


class LazyTensor:
    """What ``GGUFWriter.add_tensor`` needs of an array (shape, dtype, nbytes, ``tofile``),
    producing the bytes only when the writer reaches this tensor, a chunk at a time."""

    def __init__(self, shape: tuple[int, ...], dtype, chunks: Callable[[], Iterator[np.ndarray]]):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._chunks = chunks
        self.on_bytes: Callable[[int], None] = lambda n: None

    def tofile(self, fh) -> None:
        written = 0
        for chunk in self._chunks():
            chunk = np.ascontiguousarray(chunk)
            fh.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
            self.on_bytes(chunk.nbytes)
        if written != self.nbytes:
            raise AssertionError(f"produced {written} bytes, planned {self.nbytes}")


@dataclass(frozen=True)
class Planned:
    name: str  # GGUF tensor name
    tensor: LazyTensor
    ggml_type: object  # gguf.GGMLQuantizationType


# --------------------------------------------------------------------------------------
# Plan: every GGUF tensor, its type and how to produce it


def _encoder(ggml_type) -> tuple[Callable[[np.ndarray], np.ndarray], np.dtype, Callable]:
    """(BF16-bits -> stored array, stored numpy dtype, element shape -> stored shape)."""
    g = _gguf()
    Q = g.GGMLQuantizationType
    if ggml_type == Q.F32:
        return bf16_to_f32, np.dtype(np.float32), lambda s: s
    if ggml_type == Q.BF16:
        # BF16 -> F32 -> BF16 (what the converter does) is the identity: copy the bits.
        return lambda bits: bits, np.dtype(np.uint16), lambda s: s
    if ggml_type == Q.F16:
        return lambda bits: bf16_to_f32(bits).astype(np.float16), np.dtype(np.float16), lambda s: s
    if ggml_type == Q.Q8_0:
        return (lambda bits: g.quants.quantize(bf16_to_f32(bits), Q.Q8_0), np.dtype(np.uint8),
                lambda s: tuple(g.quant_shape_to_byte_shape(s, Q.Q8_0)))
    raise ValueError(ggml_type)


def _dense(src, name: str, shape: tuple[int, ...], ggml_type, rows: slice | None = None,
           cols: slice | None = None) -> Planned:
    """A BF16 source tensor (optionally a row or column slice) stored as ``ggml_type``."""
    g = _gguf()
    Q = g.GGMLQuantizationType
    if ggml_type == Q.Q8_0 and shape[-1] % 32:
        ggml_type = Q.F16  # the converter's QuantError fallback
    encode, dtype, stored_shape = _encoder(ggml_type)
    # Quantizing widens to float32 first; keep those transients small.
    max_bytes = (16 << 20) if ggml_type == Q.Q8_0 else (64 << 20)

    def chunks() -> Iterator[np.ndarray]:
        if rows is None and cols is None and hasattr(src, "chunks"):
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
        release(src, name)

    return Planned("", LazyTensor(stored_shape(shape), dtype, chunks), ggml_type)


def _experts(src, layer: int, which: str, rows: slice) -> LazyTensor:
    """MXFP4 expert matrix ``[E, R, G*17]``, repacked one expert at a time."""
    E = src.config.num_experts
    pair = src.mxfp4(layer, which)
    _, R, G, _ = pair.blocks[:, rows].shape

    def chunks() -> Iterator[np.ndarray]:
        current = src.mxfp4(layer, which)
        for e in range(E):
            yield openai_to_ggml(current.blocks[e, rows], current.scales[e, rows])
            release(src, f"block.{layer}.mlp.{which}_weight")  # keep RSS near one expert

    return LazyTensor((E, R, G * 17), np.uint8, chunks)


def plan(src, outtype: str = DEFAULT_OUTTYPE) -> list[Planned]:
    """Every tensor in llama.cpp's load order, with its GGUF name and type."""
    g = _gguf()
    Q = g.GGMLQuantizationType
    T, N = g.MODEL_TENSOR, g.TENSOR_NAMES
    main_type = outtypes()[outtype][0]
    c = src.config
    H, I = c.hidden_size, c.intermediate_size
    out: list[Planned] = []

    def add(tensor: T, suffix: str, planned: Planned, bid: int | None = None) -> None:
        name = N[tensor].format(bid=bid) + suffix
        out.append(Planned(name, planned.tensor, planned.ggml_type))

    def mx(tensor: LazyTensor) -> Planned:
        return Planned("", tensor, Q.MXFP4)

    add(T.TOKEN_EMBD, ".weight", _dense(src, "embedding.weight", (c.vocab_size, H), main_type))
    q, k, v = qkv_split(c)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    for n in range(c.num_hidden_layers):
        p = f"block.{n}."
        add(T.ATTN_NORM, ".weight", _dense(src, p + "attn.norm.scale", (H,), Q.F32), n)
        start = 0
        for tensor, count in ((T.ATTN_Q, q), (T.ATTN_K, k), (T.ATTN_V, v)):
            part = slice(start, start + count)
            add(tensor, ".weight", _dense(src, p + "attn.qkv.weight", (count, H), main_type, rows=part), n)
            add(tensor, ".bias", _dense(src, p + "attn.qkv.bias", (count,), Q.F32, rows=part), n)
            start += count
        heads = c.num_attention_heads * c.head_dim
        add(T.ATTN_OUT, ".weight", _dense(src, p + "attn.out.weight", (H, heads), main_type), n)
        add(T.ATTN_OUT, ".bias", _dense(src, p + "attn.out.bias", (H,), Q.F32), n)
        add(T.ATTN_SINKS, ".weight", _dense(src, p + "attn.sinks", (c.num_attention_heads,), Q.F32), n)
        add(T.ATTN_POST_NORM, ".weight", _dense(src, p + "mlp.norm.scale", (H,), Q.F32), n)
        # The router stays F32 whatever --outtype (llama.cpp never quantizes FFN_GATE_INP).
        add(T.FFN_GATE_INP, ".weight", _dense(src, p + "mlp.gate.weight", (c.num_experts, H), Q.F32), n)
        add(T.FFN_GATE_INP, ".bias", _dense(src, p + "mlp.gate.bias", (c.num_experts,), Q.F32), n)
        E = c.num_experts
        add(T.FFN_GATE_EXP, ".weight", mx(_experts(src, n, "mlp1", even)), n)
        add(T.FFN_GATE_EXP, ".bias", _dense(src, p + "mlp.mlp1_bias", (E, I), Q.F32, cols=even), n)
        add(T.FFN_UP_EXP, ".weight", mx(_experts(src, n, "mlp1", odd)), n)
        add(T.FFN_UP_EXP, ".bias", _dense(src, p + "mlp.mlp1_bias", (E, I), Q.F32, cols=odd), n)
        add(T.FFN_DOWN_EXP, ".weight", mx(_experts(src, n, "mlp2", slice(None))), n)
        add(T.FFN_DOWN_EXP, ".bias", _dense(src, p + "mlp.mlp2_bias", (E, H), Q.F32), n)
    add(T.OUTPUT_NORM, ".weight", _dense(src, "norm.scale", (H,), Q.F32))
    add(T.OUTPUT, ".weight", _dense(src, "unembedding.weight", (c.vocab_size, H), main_type))
    return out


# --------------------------------------------------------------------------------------
# Metadata


def add_model_params(writer, config, file_type) -> None:
    """The ``gpt-oss.*`` hyperparameters as ``TextModel``/``GptOssModel.set_gguf_parameters`` write them."""
    hf = hf_config(config)
    rope = hf["rope_scaling"]
    g = _gguf()
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_rope_scaling_type(g.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
    writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.experts_per_token)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_sliding_window(config.sliding_window)
    writer.add_expert_feed_forward_length(config.intermediate_size)


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special, for the forms o200k can have
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def vocab(root: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as ``get_vocab_base`` builds them from ``tokenizer.json``."""
    g = _gguf()
    path = root / "tokenizer.json"
    if not path.is_file():
        raise InputError("GGUF needs the tokenizer: tokenizer.json is missing beside original/ "
                         "(copy it from the Hugging Face repo)", file=path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model_vocab: dict[str, int] = doc["model"]["vocab"]
        added = {t["id"]: t for t in doc.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the tokenizer vocabulary: {exc}", file=path) from exc
    reverse = {i: t for t, i in model_vocab.items()}
    reverse.update({i: t["content"] for i, t in added.items()})
    if reverse and max(reverse) >= vocab_size:
        raise InputError(f"token id {max(reverse)} does not fit the model's vocab_size {vocab_size}", file=path)
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(g.TokenType.UNUSED))
        elif i in added:
            tokens.append(token)
            special = added[i].get("special") or _looks_special(token)
            types.append(int(g.TokenType.CONTROL if special else g.TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(g.TokenType.NORMAL))
    return tokens, types


def add_tokenizer(writer, root: Path, vocab_size: int) -> None:
    """``_set_vocab_gpt2``: model/pre/tokens/types, then merges, special ids and chat template
    through gguf-py's ``SpecialVocab`` (the converter's own code path)."""
    g = _gguf()
    tokens, types = vocab(root, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = g.SpecialVocab(root, load_merges=True)
    if not special.merges:
        raise InputError("tokenizer.json has no BPE merges; llama.cpp's gpt2 tokenizer needs them",
                         file=root / "tokenizer.json")
    if special.chat_template is None and (root / "chat_template.jinja").is_file():
        # SpecialVocab reads the .jinja only beside a tokenizer_config.json; take it anyway.
        special.chat_template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    special.add_to_gguf(writer, quiet=True)


def add_general(writer, root: Path) -> None:
    """``general.type``/``name``/``basename``/``size_label``/... from gguf-py's ``Metadata``, as the converter does."""
    g = _gguf()
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    meta = g.Metadata.load(None, root, None, total)
    if meta.name is None:
        meta.name = root.name
    if meta.size_label is None and total > 0:
        meta.size_label = g.size_label(total, shared, expert, expert_count)
    writer.add_type(g.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)


# --------------------------------------------------------------------------------------
# Writing


def _check_source(src) -> None:
    if getattr(src, "experts", "mxfp4") != "mxfp4":
        raise InputError("the experts are dense BF16; GGUF keeps them MXFP4 without requantizing. "
                         "Encode them first with --to original", file=getattr(src, "path", None))
    if float(src.config.swiglu_limit) != SWIGLU_LIMIT:
        raise InputError(f"swiglu_limit is {src.config.swiglu_limit}; llama.cpp hard-codes {SWIGLU_LIMIT}, "
                         "so the GGUF would compute a different model", file=getattr(src, "config_path", None))


def _writer(split_max_size: int):
    """A GGUFWriter whose shards go to the paths we set in ``targets`` (temporary names, renamed
    by ``atomic_output`` once every shard is complete) instead of names derived from one path."""
    g = _gguf()

    class Writer(g.GGUFWriter):
        targets: list[Path] = []

        def format_shard_names(self, path: Path) -> list[Path]:
            return list(self.targets)

    return Writer(None, ARCH, split_max_size=split_max_size)


def shard_paths(out: Path, count: int) -> list[Path]:
    """llama.cpp's split naming (``model-00001-of-00003.gguf``); one file keeps ``out``."""
    if count == 1:
        return [out]
    from gguf.gguf_writer import SHARD_NAME_FORMAT

    return [out.with_name(SHARD_NAME_FORMAT.format(out.stem, i + 1, count)) for i in range(count)]


def convert(src, out: Path, *, force: bool = False, progress: bool = True, outtype: str = DEFAULT_OUTTYPE,
            split_max_size: str | int | None = None, **options) -> Path:
    """Write ``out`` (a ``.gguf`` file; with splits, ``out``'s stem + ``-0000i-of-0000n.gguf``).

    Returns the path llama.cpp should be given: the file, or the first split.
    """
    if options:
        raise InputError(f"options {sorted(options)} do not apply to --to gguf (it takes --outtype, --split-max-size)")
    if outtype not in outtypes():
        raise InputError(f"unknown --outtype {outtype!r}; choose one of {sorted(outtypes())}")
    _check_source(src)
    out = Path(out)
    root = Path(src.repo_root)
    planned = plan(src, outtype)
    writer = _writer(parse_size(split_max_size) if split_max_size is not None else 0)
    for item in planned:
        writer.add_tensor(item.name, item.tensor, raw_dtype=item.ggml_type)
    add_general(writer, root)
    add_model_params(writer, src.config, outtypes()[outtype][1])
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)
    add_tokenizer(writer, root, src.config.vocab_size)

    finals = shard_paths(out, len(writer.tensors))
    total = sum(item.tensor.nbytes for item in planned)
    with ExitStack() as stack:
        # Every shard is built under a temporary name and renamed only when all are complete.
        writer.targets = [stack.enter_context(atomic_output(path, force=force)) for path in finals]
        bar = stack.enter_context(tqdm(total=total, desc="gguf", unit="B", unit_scale=True, unit_divisor=1024,
                                       disable=not progress, file=sys.stderr, dynamic_ncols=True))
        for item in planned:
            item.tensor.on_bytes = bar.update
        writer.write_header_to_file(path=writer.targets[0])
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return finals[0]
