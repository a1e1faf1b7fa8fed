"""gpt-oss GGUF: the one home of the format, written and read.

Writing (what llama.cpp's own ``convert_hf_to_gguf.py``, ``conversion/gpt_oss.py``, writes for
gpt-oss; spec ``gguf-gpt-oss.md`` §1): tensor names from gguf-py's registry (``gguf_names``),
the MXFP4 repack (``openai_to_ggml``: scale bytes copied, the 4-bit codes moved from OpenAI's
order, element 2i low nibble and 2i+1 high, to ggml's, element j low and j+16 high) and its
inverse, the storage of the other tensors (``encoder``), the ``gpt-oss.*`` hyperparameters,
the tokenizer and ``general.*`` keys, and llama.cpp's split naming. Tensors go to gguf-py's
``GGUFWriter`` as ``LazyTensor`` objects that produce their bytes chunk by chunk while the
file is written.

Reading: ``GgufModel(path)`` opens a file, or every shard of a llama.cpp split
(``name-00001-of-00003.gguf``), with gguf-py's memory-mapped ``GGUFReader`` and presents it
through the ``CanonicalModel`` interface: ``original/`` names and layout, q/k/v re-fused
into ``attn.qkv``, gate/up re-interleaved into ``mlp1``. Any tensor type gguf-py can dequantize
(F32, F16, BF16, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4, ...) comes back as float32; MXFP4 experts also
come back as the exact OpenAI blocks and scales (``mxfp4``). The config is rebuilt from the
``gpt-oss.*`` keys, so a wrong key shows as a config difference in ``verify``.
Imports: base modules, ``formats.hf`` (the HF config values llama.cpp's converter reads), gguf-py.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from .. import side_files
from ..dtypes import bf16_to_f32
from ..errors import InputError
from ..reading import open_regular, read_text
from ..model import CONFIG_LIMITS, RMS_NORM_EPS, ModelConfig, Mxfp4Pair, interleave
from ..tokens.files import CHAT_TEMPLATE_FILE, TokenizerJson
from ..tokens.vocabulary import Embedded, Vocabulary, byte_level_bytes
from .base import Format, head
from .gguf_writer import gguf_py, special_vocab
from .hf import hf_config

ARCH = "gpt-oss"
MAGIC = b"GGUF"
OUTTYPES = ("bf16", "f16", "q8_0")  # --outtype, the type of the non-expert matrices
DEFAULT_OUTTYPE = "bf16"
TOKENIZER_PRE = "gpt-4o"  # o200k_harmony's split regex is GPT-4o's (spec §1.4)
SWIGLU_LIMIT = 7.0  # hard-coded in llama.cpp's LLM_FFN_SWIGLU_OAI_MOE
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


# --------------------------------------------------------------------------------------
# Names and types


def gguf_names(name: str) -> list[str]:
    """The GGUF tensors llama.cpp's converter writes for canonical tensor ``name``, from gguf-py's
    ``TENSOR_NAMES`` (q, k, v split; gate and up split), in concatenation / interleave order."""
    g = gguf_py()
    T, N = g.MODEL_TENSOR, g.TENSOR_NAMES
    top = {"embedding.weight": (T.TOKEN_EMBD, "weight"), "norm.scale": (T.OUTPUT_NORM, "weight"),
           "unembedding.weight": (T.OUTPUT, "weight")}
    if name in top:
        tensor, kind = top[name]
        return [f"{N[tensor]}.{kind}"]
    _, n, rest = name.split(".", 2)
    layer = {
        "attn.norm.scale": [(T.ATTN_NORM, "weight")],
        "attn.qkv.weight": [(T.ATTN_Q, "weight"), (T.ATTN_K, "weight"), (T.ATTN_V, "weight")],
        "attn.qkv.bias": [(T.ATTN_Q, "bias"), (T.ATTN_K, "bias"), (T.ATTN_V, "bias")],
        "attn.sinks": [(T.ATTN_SINKS, "weight")],
        "attn.out.weight": [(T.ATTN_OUT, "weight")],
        "attn.out.bias": [(T.ATTN_OUT, "bias")],
        "mlp.norm.scale": [(T.ATTN_POST_NORM, "weight")],
        "mlp.gate.weight": [(T.FFN_GATE_INP, "weight")],
        "mlp.gate.bias": [(T.FFN_GATE_INP, "bias")],
        "mlp.mlp1_weight": [(T.FFN_GATE_EXP, "weight"), (T.FFN_UP_EXP, "weight")],
        "mlp.mlp1_bias": [(T.FFN_GATE_EXP, "bias"), (T.FFN_UP_EXP, "bias")],
        "mlp.mlp2_weight": [(T.FFN_DOWN_EXP, "weight")],
        "mlp.mlp2_bias": [(T.FFN_DOWN_EXP, "bias")],
    }[rest]
    return [f"{N[tensor].format(bid=int(n))}.{kind}" for tensor, kind in layer]


def fused_name(name: str) -> str | None:
    """The one GGUF tensor a file may hold in place of the split parts of canonical ``name``
    (``attn_qkv`` for q/k/v, ``ffn_gate_up_exps`` for gate/up), else ``None``."""
    g = gguf_py()
    T, N = g.MODEL_TENSOR, g.TENSOR_NAMES
    _, _, rest = name.partition(".")
    layer, _, part = rest.partition(".")
    fused = {"attn.qkv.weight": (T.ATTN_QKV, "weight"), "attn.qkv.bias": (T.ATTN_QKV, "bias"),
             "mlp.mlp1_weight": (T.FFN_GATE_UP_EXP, "weight"), "mlp.mlp1_bias": (T.FFN_GATE_UP_EXP, "bias")}
    if not name.startswith("block.") or part not in fused:
        return None
    tensor, kind = fused[part]
    return f"{N[tensor].format(bid=int(layer))}.{kind}"


def outtypes() -> dict:
    """``--outtype`` -> (ggml type of the non-expert matrices, ``general.file_type``).

    Every outtype keeps the experts MXFP4, so every file is labelled ``MOSTLY_MXFP4_MOE`` (38):
    what llama.cpp's converter writes for F16/BF16 and what ``llama-quantize MXFP4_MOE`` writes
    for the tensor-identical Q8_0 file (and ggml-org's published gpt-oss GGUFs say).
    """
    g = gguf_py()
    Q, F = g.GGMLQuantizationType, g.LlamaFileType
    return {"bf16": (Q.BF16, F.MOSTLY_MXFP4_MOE), "f16": (Q.F16, F.MOSTLY_MXFP4_MOE),
            "q8_0": (Q.Q8_0, F.MOSTLY_MXFP4_MOE)}


def check_config(config: ModelConfig, file: Path | None = None) -> None:
    """Refuse a model llama.cpp would compute differently from the reference."""
    if float(config.swiglu_limit) != SWIGLU_LIMIT:
        raise InputError(f"swiglu_limit is {config.swiglu_limit}; llama.cpp hard-codes {SWIGLU_LIMIT}, "
                         "so the GGUF would compute a different model", file=file)


# --------------------------------------------------------------------------------------
# Byte layouts, both directions


_BLOCK = np.dtype([("scale", "u1"), ("qs", "V16")])  # ggml's block_mxfp4: 17 bytes
REPACK_BLOCKS = 16384  # blocks per pass: every temporary stays in the CPU cache (3x faster than whole)
_LOW = np.uint64(0x0F0F0F0F0F0F0F0F)
_FOUR = np.uint64(4)


def openai_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI blocks ``[..., G, 16]`` + scales ``[..., G]`` -> ggml ``block_mxfp4`` bytes ``[..., G*17]``.

    Byte j of a ggml block holds element j in the low nibble and element j+16 in the high one;
    OpenAI's byte i holds elements 2i (low) and 2i+1 (high). The codes themselves are the same.
    So ggml byte 2m takes the low nibbles of OpenAI bytes m and 8+m, byte 2m+1 their high
    nibbles: eight bytes at a time as uint64 lanes, interleaved as uint16, a cache-sized run of
    rows at a time into scratch buffers; the 16 bytes go beside the scale as one 17-byte record
    (byte-strided stores, the old way, cost twice the arithmetic).
    """
    blocks = np.asarray(blocks, dtype=np.uint8)
    if not np.little_endian:
        return _openai_to_ggml_by_nibble(blocks, scales)
    lead, G = blocks.shape[:-2], blocks.shape[-2]
    rows = blocks.reshape(-1, G * 16)  # a view for the even/odd rows of mlp1 too
    out = np.empty((rows.shape[0], G), _BLOCK)
    out["scale"] = np.asarray(scales, dtype=np.uint8).reshape(-1, G)
    step = max(1, REPACK_BLOCKS // max(G, 1))
    scratch = _RepackScratch(step * G)
    for r in range(0, rows.shape[0], step):
        part = out[r:r + step].reshape(-1)
        part["qs"] = scratch.repack(rows[r:r + step]).view("V16").reshape(-1)
    return out.view(np.uint8).reshape(*lead, G * 17)


class _RepackScratch:
    """Buffers of one pass of ``openai_to_ggml``, reused from run to run."""

    def __init__(self, blocks: int):
        self.even, self.odd, self.tmp = (np.empty(blocks, np.uint64) for _ in range(3))
        self.qs, self.tmp16 = (np.empty((blocks, 8), np.uint16) for _ in range(2))

    def repack(self, rows: np.ndarray) -> np.ndarray:
        words = np.ascontiguousarray(rows).view(np.uint64).reshape(-1, 2)  # OpenAI bytes 0-7, 8-15
        n = words.shape[0]
        first, second = words[:, 0], words[:, 1]
        even, odd, tmp, qs, tmp16 = self.even[:n], self.odd[:n], self.tmp[:n], self.qs[:n], self.tmp16[:n]
        np.bitwise_and(first, _LOW, out=even)  # byte m: low nibbles of bytes m, 8+m
        np.bitwise_and(second, _LOW, out=tmp)
        np.left_shift(tmp, _FOUR, out=tmp)
        np.bitwise_or(even, tmp, out=even)
        np.right_shift(first, _FOUR, out=odd)  # byte m: their high nibbles
        np.bitwise_and(odd, _LOW, out=odd)
        np.bitwise_and(second, _LOW << _FOUR, out=tmp)
        np.bitwise_or(odd, tmp, out=odd)
        qs[:] = even.view(np.uint8).reshape(n, 8)  # ggml bytes 2m, 2m+1 as one uint16
        tmp16[:] = odd.view(np.uint8).reshape(n, 8)
        np.left_shift(tmp16, np.uint16(8), out=tmp16)
        np.bitwise_or(qs, tmp16, out=qs)
        return qs


def _openai_to_ggml_by_nibble(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The definition, nibble by nibble (for big-endian hosts, and the tests)."""
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


def encoder(ggml_type) -> tuple[Callable[[np.ndarray], np.ndarray], np.dtype, Callable]:
    """(BF16-bits -> stored array, stored numpy dtype, element shape -> stored shape)."""
    g = gguf_py()
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


# --------------------------------------------------------------------------------------
# Metadata and tokenizer (writing)


def add_model_params(writer, config, file_type) -> None:
    """The ``gpt-oss.*`` hyperparameters as ``TextModel``/``GptOssModel.set_gguf_parameters`` write them."""
    hf = hf_config(config)
    rope = hf["rope_scaling"]
    g = gguf_py()
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


def vocab(tokenizer: TokenizerJson, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as ``get_vocab_base`` builds them from ``tokenizer.json``."""
    TokenType = gguf_py().TokenType
    reverse = tokenizer.by_id()
    if reverse and max(reverse) >= vocab_size:
        raise InputError(f"token id {max(reverse)} does not fit the model's vocab_size {vocab_size}",
                         file=tokenizer.path)
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in tokenizer.added:
            tokens.append(token)
            special = tokenizer.added[i].get("special") or _looks_special(token)
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(TokenType.NORMAL))
    return tokens, types


def add_tokenizer(writer, root: Path, vocab_size: int, chat_template: str | None = None) -> None:
    """``_set_vocab_gpt2``: model/pre/tokens/types, then merges, special ids and chat template
    through gguf-py's ``SpecialVocab`` (the converter's own code path); ``chat_template``
    replaces the source's template."""
    tokenizer = TokenizerJson.beside(root, needed_by="GGUF")
    tokens, types = vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = special_vocab(root, tokenizer.doc)
    special.merges = merges(tokenizer)
    if not special.merges:
        raise InputError("tokenizer.json has no BPE merges; llama.cpp's gpt2 tokenizer needs them", file=tokenizer.path)
    if special.chat_template is None and (root / CHAT_TEMPLATE_FILE).is_file():
        # SpecialVocab reads the .jinja only beside a tokenizer_config.json; take it anyway.
        special.chat_template = read_text(root / CHAT_TEMPLATE_FILE)
    if chat_template is not None:
        special.chat_template = chat_template
    if tokenizer.byte_level_post_processor():
        # llama.cpp's own gguf-py (vocab.py, _try_load_from_tokenizer_json) writes add_bos/add_eos
        # false for a ByteLevel post-processor, as gpt-oss's tokenizer.json has; older gguf
        # releases on PyPI do not, so say it here whichever gguf is installed.
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def merges(tokenizer: TokenizerJson) -> list[str]:
    """``SpecialVocab``'s merges from a parsed ``tokenizer.json``: "a b" strings, a space inside a
    part written as U+0120 (its rule since transformers 4.45 writes pairs), in one fast pass."""
    found = tokenizer.merges()
    if not found:
        return []
    if isinstance(found[0], str):
        return found
    if isinstance(found[0], list) and len(found[0]) == 2 and isinstance(found[0][0], str):
        joined = list(map(" ".join, found))  # in C: 10x faster than a comprehension
        if set(map(len, found)) == {2} and "".join(joined).count(" ") == len(found):
            return joined  # pairs, and no part holds a space
        return [f"{a.replace(' ', chr(288))} {b.replace(' ', chr(288))}" for a, b in found]
    raise InputError("unknown tokenizer merges format", file=tokenizer.path)


def add_general(writer, root: Path) -> None:
    """``general.type``/``name``/``basename``/``size_label``/... from gguf-py's ``Metadata``, as the converter does."""
    g = gguf_py()
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    side_files.check(root)  # gguf-py reads README.md and config.json unchecked
    try:
        meta = g.Metadata.load(None, root, None, total)
        if meta.name is None:
            meta.name = root.name
        if meta.size_label is None and total > 0:
            meta.size_label = g.size_label(total, shared, expert, expert_count)
        writer.add_type(g.GGUFType.MODEL)
        meta.set_gguf_meta_model(writer)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # what the checks above did not foresee
        raise InputError(f"gguf-py cannot take the model card's metadata: {type(exc).__name__}: {exc}",
                         file=root / "README.md") from exc


# --------------------------------------------------------------------------------------
# Writing


# --------------------------------------------------------------------------------------
# Reading


def split_number(name: str) -> tuple[int, int] | None:
    """``(shard, count)`` of a llama.cpp split name (``model-00002-of-00003.gguf``), else ``None``."""
    match = _SPLIT.match(name)
    return (int(match["no"]), int(match["count"])) if match else None


def split_members(path: str | Path) -> list[Path]:
    """Every file name of the split that ``path`` belongs to (a plain file: itself)."""
    path = Path(path)
    match = _SPLIT.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    return [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def shard_paths(path: str | Path) -> list[Path]:
    """All files of a split GGUF given any one of them (a plain file is its own list)."""
    paths = split_members(path)
    if len(paths) > MAX_SPLITS:
        raise InputError(f"names a split of {len(paths)} files; no gpt-oss GGUF is split into more than "
                         f"{MAX_SPLITS}", file=path)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"split GGUF is missing {len(missing)} of its {len(paths)} shards: {shown}", file=path)
    return paths


def _open_reader(path: Path):
    g = gguf_py()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot open: {exc}", file=path) from exc
    magic = head(path, len(MAGIC))
    if magic != MAGIC:
        raise InputError(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})", file=path)
    check_header_bounds(path)
    try:
        reader = g.GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError/IndexError/... on a cut header
        raise InputError(f"cannot parse the GGUF header (truncated or corrupt?): {exc}", file=path) from exc
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size or t.data.nbytes != t.n_bytes:
            raise InputError(f"truncated: tensor data ends at byte {end} but the file has {size} bytes",
                             file=path, tensor=t.name)
    _check_placement(reader, path)
    return reader


def _check_placement(reader, path: Path) -> None:
    """What llama.cpp refuses of where tensor data lies: an offset not on the file's alignment,
    and two tensors sharing bytes (one write would change the other; a crafted file could make
    every tensor read the same bytes)."""
    alignment = int(getattr(reader, "alignment", 32) or 32)
    previous = None
    for t in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        start = int(t.data_offset)
        if (start - int(reader.data_offset)) % alignment:
            raise InputError(f"tensor data at byte {start} is not aligned to {alignment} bytes", file=path, tensor=t.name)
        if previous is not None and start < int(previous.data_offset) + int(previous.n_bytes):
            raise InputError(f"tensor data at byte {start} overlaps {previous.name}'s", file=path, tensor=t.name)
        previous = t


# Counts no real file comes near (a 120b GGUF: ~700 tensors, ~50 keys, 201k tokens, 446k merges).
# gguf-py parses element by element in Python (~25 us each): a corrupt count must be refused
# before it, or a 65 GB file becomes hours of "parsing".
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 16  # any array but these:
MAX_ARRAYS = {"tokenizer.ggml.tokens": 1 << 19, "tokenizer.ggml.token_type": 1 << 19, "tokenizer.ggml.scores": 1 << 19,
              "tokenizer.ggml.merges": 1 << 20}  # 120b: 201088 tokens, 446189 merges
# GGUF value types by what llama.cpp reads a key as (GGUFValueType)
_KINDS = {"u32": (4, "UINT32"), "i32": (5, "INT32"), "f32": (6, "FLOAT32"), "bool": (7, "BOOL"), "str": (8, "STRING")}
# What a GGUF calls each config key (for messages)
GGUF_NAMES = {"num_hidden_layers": f"{ARCH}.block_count", "num_experts": f"{ARCH}.expert_count",
              "experts_per_token": f"{ARCH}.expert_used_count", "vocab_size": "token_embd.weight's rows",
              "hidden_size": f"{ARCH}.embedding_length", "intermediate_size": f"{ARCH}.expert_feed_forward_length",
              "head_dim": f"{ARCH}.attention.key_length", "num_attention_heads": f"{ARCH}.attention.head_count",
              "num_key_value_heads": f"{ARCH}.attention.head_count_kv",
              "sliding_window": f"{ARCH}.attention.sliding_window",
              "initial_context_length": f"{ARCH}.rope.scaling.original_context_length",
              "rope_theta": f"{ARCH}.rope.freq_base", "rope_scaling_factor": f"{ARCH}.rope.scaling.factor",
              "rope_ntk_alpha": f"{ARCH}.rope.scaling.yarn_beta_slow",
              "rope_ntk_beta": f"{ARCH}.rope.scaling.yarn_beta_fast"}
MAX_SPLITS = 4096  # a 120b (65 GB) split at 100 MB is 650 files
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NE = 1 << 32  # one dimension (the 120b's largest: 201088)
MAX_ELEMENTS = 1 << 40  # one tensor (the 120b's largest: 1.2e10 values)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_header_bounds(path: Path) -> None:
    """Walk the GGUF header (keys, values, tensor infos) checking every count and length against
    the file and the caps above, so that gguf-py only ever parses a header of sane size."""
    import mmap
    import struct

    with open_regular(path) as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size = len(data)
        order = "<"

        def take(fmt: str, at: int) -> tuple[tuple, int]:
            n = struct.calcsize(order + fmt)
            if at + n > size:
                raise InputError(f"truncated: the GGUF header runs past the end of the file (byte {at})", file=path)
            return struct.unpack_from(order + fmt, data, at), at + n

        def string(at: int) -> int:
            (length,), at = take("Q", at)
            if at + length > size:
                raise InputError(f"string of {length} bytes at byte {at} runs past the end of the file", file=path)
            return at + length

        def value(kind: int, at: int, key: str, depth: int = 0) -> int:
            if kind in _SCALAR_SIZES:
                return take(f"{_SCALAR_SIZES[kind]}s", at)[1]
            if kind == _STRING:
                return string(at)
            if kind != _ARRAY or depth > 1:
                raise InputError(f"unknown GGUF value type {kind} at byte {at}", file=path)
            (item, count), at = take("IQ", at)
            limit = MAX_ARRAYS.get(key, MAX_ARRAY)
            if count > limit:
                raise InputError(f"metadata key {key!r} is an array of {count} elements; no gpt-oss GGUF holds "
                                 f"more than {limit}", file=path)
            counts[key] = count
            if item in _SCALAR_SIZES:
                end = at + count * _SCALAR_SIZES[item]
                if end > size:
                    raise InputError(f"array of {count} values at byte {at} runs past the end of the file", file=path)
                return end
            for _ in range(count):
                at = value(item, at, key, depth + 1)
            return at

        (version,), at = take("I", 4)
        if version & 0xFFFF == 0:  # written on a big-endian machine; gguf-py reads those too
            order = ">"
        (tensors, kvs), at = take("QQ", 8)
        if kvs > MAX_KV or tensors > MAX_TENSORS:
            raise InputError(f"header claims {kvs} keys and {tensors} tensors (corrupt?)", file=path)
        counts: dict[str, int] = {}
        rows = None  # token_embd's rows: what the tokenizer arrays must count
        for _ in range(kvs):
            start, at = at + 8, string(at)
            key = bytes(data[start:at]).decode("utf-8", "replace")
            (kind,), at = take("I", at)
            at = value(kind, at, key)
        for _ in range(tensors):
            start, at = at + 8, string(at)
            name = bytes(data[start:at])
            (dims,), at = take("I", at)
            if dims > MAX_DIMS:
                raise InputError(f"tensor info at byte {at} has {dims} dimensions (at most {MAX_DIMS})", file=path)
            ne, at = take(f"{dims}Q", at)
            if any(n == 0 or n > MAX_NE for n in ne) or math.prod(ne) > MAX_ELEMENTS:
                raise InputError(f"tensor info at byte {at} has shape {list(ne)} (corrupt?)", file=path)
            if name == b"token_embd.weight" and dims == 2:
                rows = ne[1]
            (_, offset), at = take("IQ", at)
            if offset >= size:  # gguf-py adds it to the data start in uint64: 2^64-1 wraps to before it
                raise InputError(f"tensor info at byte {at} puts its data at offset {offset}, past the file's "
                                 f"{size} bytes", file=path)
        # llama.cpp needs one token per embedding row; checked before gguf-py parses the strings
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            if rows is not None and key in counts and counts[key] != rows:
                raise InputError(f"metadata key {key!r} has {counts[key]} entries but token_embd.weight has "
                                 f"{rows} rows (llama.cpp needs one per row)", file=path)


class GgufModel:
    """A gpt-oss GGUF (single file or split), memory-mapped, as a ``CanonicalModel``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = shard_paths(self.path)
        self.readers = [_open_reader(p) for p in self.files]
        self.fields = {}
        for reader in self.readers:
            for key, field in reader.fields.items():
                self.fields.setdefault(key, field)
        self.tensors = {}
        for file, reader in zip(self.files, self.readers):
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise InputError("tensor appears in two shards", file=file, tensor=t.name)
                self.tensors[t.name] = t
        self.architecture = self.value("general.architecture")
        if self.architecture != ARCH:
            raise InputError(f"general.architecture is {self.architecture!r}, not {ARCH!r}", file=self.path)
        self.config = self._config()

    # -- metadata -----------------------------------------------------------------------

    def value(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, TypeError, IndexError) as exc:  # a corrupt string or array
            raise InputError(f"metadata key {key!r} cannot be read: {exc}", file=self.path) from exc

    def typed(self, key: str, kind: str, default=None):
        """Metadata ``key`` if it has the type llama.cpp reads it as (``kind``: "u32", "i32", "f32",
        "str", "bool"; it refuses any other), else an ``InputError`` naming the key."""
        field = self.fields.get(key)
        if field is None:
            return default
        want, name = _KINDS[kind]
        if len(field.types) != 1 or field.types[0] != want:
            got = "/".join(t.name for t in field.types)
            raise InputError(f"metadata key {key!r} is {got}; llama.cpp reads it as {name}", file=self.path)
        value = self.value(key)
        if kind == "f32" and not math.isfinite(value):
            raise InputError(f"metadata key {key!r} is {value}", file=self.path)
        return value

    def _key(self, suffix: str, kind: str = "u32", default=None):
        value = self.typed(f"{ARCH}.{suffix}", kind, default)
        if value is None:
            raise InputError(f"metadata key {ARCH}.{suffix} is missing (llama.cpp needs it)", file=self.path)
        return value

    def _config(self) -> ModelConfig:
        config = self._read_config()
        # Every layer has tensors: a corrupt block_count of 4e9 must not drive loops over layers.
        if config.num_hidden_layers > len(self.tensors):
            raise InputError(f"{ARCH}.block_count is {config.num_hidden_layers} but the file has only "
                             f"{len(self.tensors)} tensors", file=self.path)
        config.check(self.path, GGUF_NAMES)
        problems = []
        if self._key("attention.layer_norm_rms_epsilon", "f32") != np.float32(RMS_NORM_EPS):
            problems.append(f"{ARCH}.attention.layer_norm_rms_epsilon must be {RMS_NORM_EPS} (the reference's)")
        if not 0 < self._key("context_length") <= CONFIG_LIMITS["initial_context_length"] * 1024:
            problems.append(f"{ARCH}.context_length must be in 1..{CONFIG_LIMITS['initial_context_length'] * 1024}")
        if self._key("attention.value_length", default=config.head_dim) != config.head_dim:
            problems.append(f"{ARCH}.attention.value_length must equal {ARCH}.attention.key_length")
        if problems:
            raise InputError("invalid config: " + "; ".join(problems), file=self.path)
        return config

    def _read_config(self) -> ModelConfig:
        embd = self.tensors.get(gguf_names("embedding.weight")[0])
        if embd is None or len(embd.shape) != 2:
            raise InputError("no two-dimensional token_embd.weight tensor", file=self.path)
        return ModelConfig(
            num_hidden_layers=self._key("block_count"),
            num_experts=self._key("expert_count"),
            experts_per_token=self._key("expert_used_count"),
            vocab_size=int(embd.shape[1]),
            hidden_size=self._key("embedding_length"),
            intermediate_size=self._key("expert_feed_forward_length"),
            swiglu_limit=7.0,  # llama.cpp hard-codes it; there is no key
            head_dim=self._key("attention.key_length"),
            num_attention_heads=self._key("attention.head_count"),
            num_key_value_heads=self._key("attention.head_count_kv"),
            sliding_window=self._key("attention.sliding_window"),
            initial_context_length=self._key("rope.scaling.original_context_length",
                                             default=self._key("context_length")),
            rope_theta=_integral(self._key("rope.freq_base", "f32")),
            rope_scaling_factor=self._key("rope.scaling.factor", "f32", 1.0),
            rope_ntk_alpha=_integral(self._key("rope.scaling.yarn_beta_slow", "f32", 1.0)),
            rope_ntk_beta=_integral(self._key("rope.scaling.yarn_beta_fast", "f32", 32.0)),
        )

    # -- tensors ------------------------------------------------------------------------

    def tensor(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError("tensor missing from the GGUF", file=self.path, tensor=name) from None

    def dequantize(self, name: str) -> np.ndarray:
        """A GGUF tensor as float32 in numpy order (reversed ggml ``ne``)."""
        g = gguf_py()
        t = self.tensor(name)
        try:
            values = g.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise InputError(f"gguf-py cannot dequantize type {t.tensor_type.name}", file=self.path, tensor=name) from exc
        return np.asarray(values, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))

    def _gguf_names(self, name: str) -> list[str]:
        """The GGUF tensors holding canonical tensor ``name``: the names llama.cpp's converter
        writes, or the fused ``attn_qkv`` / ``ffn_gate_up_exps`` and a tied output where a file has those."""
        try:
            names = gguf_names(name)
        except (KeyError, ValueError):
            raise InputError("not a canonical gpt-oss tensor name", file=self.path, tensor=name) from None
        if name == "unembedding.weight" and names[0] not in self.tensors:
            return gguf_names("embedding.weight")  # tied embeddings
        whole = fused_name(name)
        return [whole] if whole is not None and whole in self.tensors else names

    def f32(self, name: str) -> np.ndarray:
        """Canonical tensor ``name`` as float32, in ``original/`` shape and layout."""
        parts = self._gguf_names(name)
        if name.endswith(("mlp1_weight", "mlp1_bias")):
            if len(parts) == 1:  # fused gate_up: gate rows first, then up
                fused = self.dequantize(parts[0])
                half = fused.shape[-2 if name.endswith("weight") else -1] // 2
                if name.endswith("weight"):
                    gate, up = fused[:, :half], fused[:, half:]
                else:
                    gate, up = fused[..., :half], fused[..., half:]
            else:
                gate, up = (self.dequantize(p) for p in parts)
            return interleave(gate, up, axis=1)
        if len(parts) == 3:  # q, k, v
            return np.concatenate([self.dequantize(p) for p in parts], axis=0)
        return self.dequantize(parts[0])

    def expert_f32(self, name: str, expert: int) -> np.ndarray:
        """``f32(name)[expert]``, dequantizing only that expert's rows of the GGUF tensor(s): a
        stranger's 120b quant with K-quant experts is 8.5 GB a layer in float32."""
        parts = self._gguf_names(name)
        if not name.endswith("mlp1_weight"):
            return self._expert_rows(parts[0], expert)
        if len(parts) == 1:  # fused gate_up: gate rows first, then up
            fused = self._expert_rows(parts[0], expert)
            gate, up = fused[: fused.shape[0] // 2], fused[fused.shape[0] // 2:]
        else:
            gate, up = (self._expert_rows(p, expert) for p in parts)
        return interleave(gate, up, axis=0)

    def _expert_rows(self, part: str, expert: int) -> np.ndarray:
        t = self.tensor(part)
        data = np.asarray(t.data)[expert]  # numpy order [E, out, row bytes or values]
        try:
            values = gguf_py().quants.dequantize(data, t.tensor_type)
        except NotImplementedError as exc:
            raise InputError(f"gguf-py cannot dequantize type {t.tensor_type.name}", file=self.path, tensor=part) from exc
        return np.ascontiguousarray(values, dtype=np.float32).reshape(data.shape[0], int(t.shape[0]))

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        """Exact OpenAI blocks/scales when the expert tensors are MXFP4, else ``None``."""
        parts = self._gguf_names(f"block.{layer}.mlp.{which}_weight")
        g = gguf_py()
        tensors = [self.tensor(p) for p in parts]
        if any(t.tensor_type != g.GGMLQuantizationType.MXFP4 for t in tensors):
            return None
        if which == "mlp2":
            blocks, scales = ggml_to_openai(tensors[0].data)
            return Mxfp4Pair(blocks, scales)
        if len(tensors) == 1:
            data = tensors[0].data
            half = data.shape[1] // 2
            gate, up = data[:, :half], data[:, half:]
        else:
            gate, up = tensors[0].data, tensors[1].data
        gb, gs = ggml_to_openai(gate)
        ub, us = ggml_to_openai(up)
        return Mxfp4Pair(interleave(gb, ub, axis=1), interleave(gs, us, axis=1))

    def storage(self, name: str) -> str:
        """The ggml type name(s) of the tensor(s) holding ``name`` ("BF16", "MXFP4", "Q4_K+Q6_K", ...)."""
        kinds = []
        for part in self._gguf_names(name):
            kind = self.tensor(part).tensor_type.name
            if kind not in kinds:
                kinds.append(kind)
        return "+".join(kinds)

    def embedded(self) -> Embedded:
        """``tokenizer.ggml.tokens`` / ``token_type`` (CONTROL = special; UNUSED padding rows
        skipped), ``tokenizer.ggml.{bos,eos,padding}_token_id``, ``tokenizer.chat_template``; llama.cpp
        stops on the EOS (and EOT/EOM where declared)."""
        TokenType = gguf_py().TokenType
        tokens, types = self._array("tokenizer.ggml.tokens", "str"), self._array("tokenizer.ggml.token_type", "i32")
        if tokens is None or types is None or len(tokens) != len(types):
            raise InputError("no usable tokenizer.ggml.tokens / token_type (llama.cpp needs both, one entry "
                             "per token)", file=self.path)
        known = {int(t) for t in TokenType}
        odd = next((i for i, kind in enumerate(types) if kind not in known), None)
        if odd is not None:
            raise InputError(f"metadata key 'tokenizer.ggml.token_type' gives token {odd} type {types[odd]}, "
                             f"which llama.cpp does not know", file=self.path)
        first: dict[str, int] = {}
        vocab = Vocabulary(str(self.path))
        for i, (text, kind) in enumerate(zip(tokens, types)):
            if first.setdefault(text, i) != i:  # llama.cpp maps text to one id: the other is unreachable
                raise InputError(f"metadata key 'tokenizer.ggml.tokens' holds {text!r} twice (ids {first[text]} and "
                                 f"{i})", file=self.path)
            if kind == TokenType.CONTROL:
                vocab.specials[i] = text
            elif kind != TokenType.UNUSED:  # UNUSED: the converter's [PADn] rows
                vocab.tokens[i] = byte_level_bytes(text) or text.encode("utf-8")
        ids = {}
        for key in ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id", "eom_token_id"):
            ids[key] = self.typed(f"tokenizer.ggml.{key}", "u32")
            if ids[key] is not None and ids[key] >= len(tokens):
                raise InputError(f"metadata key 'tokenizer.ggml.{key}' is {ids[key]}, beyond the {len(tokens)} "
                                 "tokens", file=self.path)
        for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
            vocab.ids[role] = ids[key]
        stops = [ids[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        template = self.typed("tokenizer.chat_template", "str")
        return Embedded(vocab, ("GGUF tokenizer.chat_template", template) if template else None, "eos",
                        sorted({i for i in stops if i is not None}))

    def _array(self, key: str, item: str) -> list | None:
        """Metadata array ``key`` if its items have the type llama.cpp reads (``item`` as in ``typed``)."""
        field = self.fields.get(key)
        if field is None:
            return None
        want, name = _KINDS[item]
        if list(field.types) != [_ARRAY, want]:
            got = "/".join(t.name for t in field.types)
            raise InputError(f"metadata key {key!r} is {got}; llama.cpp reads an ARRAY of {name}", file=self.path)
        return self.value(key)

    # -- summaries ----------------------------------------------------------------------

    def bytes_by_type(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for t in self.tensors.values():
            totals[t.tensor_type.name] = totals.get(t.tensor_type.name, 0) + int(t.n_bytes)
        return dict(sorted(totals.items()))

    def experts_mxfp4(self) -> bool:
        return all(self.mxfp4_type(n, which) for n in range(self.config.num_hidden_layers) for which in ("mlp1", "mlp2"))

    def mxfp4_type(self, layer: int, which: str) -> bool:
        g = gguf_py()
        try:
            names = self._gguf_names(f"block.{layer}.mlp.{which}_weight")
            return all(self.tensor(p).tensor_type == g.GGMLQuantizationType.MXFP4 for p in names)
        except InputError:
            return False

    def problems(self) -> list[str]:
        """Structural checks: every tensor llama.cpp's gpt-oss loader requires, with its shape."""
        out = []
        for canonical, parts in expected_parts(self.config).items():
            if not all(name in self.tensors for name, _ in parts) and self._gguf_names(canonical)[0] not in dict(parts):
                continue  # held by a fused tensor, or the output tied to the embedding
            for name, shape in parts:
                t = self.tensors.get(name)
                got = tuple(int(s) for s in t.shape) if t is not None else None
                if t is None:
                    out.append(f"tensor {name!r} is missing")
                elif got != shape:
                    out.append(f"tensor {name!r} has ne {list(got)}, expected {list(shape)}")
        for name in self.tensors:
            if name.endswith("attn_sinks.weight") and self.tensors[name].tensor_type.name != "F32":
                out.append(f"tensor {name!r} must be F32 (ggml asserts it)")
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            out.append("no tokenizer.ggml.tokens")
        elif len(tokens.data) != self.config.vocab_size:
            out.append(f"{len(tokens.data)} tokens but token_embd has {self.config.vocab_size} rows")
        return out

    def scan(self) -> list[str]:
        """Read every tensor: NaN/Inf values, and E8M0 scale 255 (NaN) in MXFP4 tensors."""
        g = gguf_py()
        problems = []
        for name, t in self.tensors.items():
            if t.tensor_type == g.GGMLQuantizationType.MXFP4:
                bad = int(np.count_nonzero(t.data.reshape(-1, 17)[:, 0] == 255))
                if bad:
                    problems.append(f"tensor {name!r}: {bad} MXFP4 scale bytes are 255 (NaN)")
                continue
            values = self.dequantize(name)
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                problems.append(f"tensor {name!r}: {bad} NaN/Inf values")
        return problems

    def f32_rows(self, name: str, rows) -> np.ndarray:
        """Rows of a vocabulary tensor: only those rows of the GGUF tensor are dequantized."""
        (part,) = self._gguf_names(name)
        t = self.tensor(part)
        data = np.asarray(t.data)[rows]
        try:
            values = gguf_py().quants.dequantize(data, t.tensor_type)
        except NotImplementedError as exc:
            raise InputError(f"gguf-py cannot dequantize type {t.tensor_type.name}", file=self.path, tensor=name) from exc
        return np.ascontiguousarray(values, dtype=np.float32).reshape(*data.shape[:-1], int(t.shape[0]))

    def release(self, name: str) -> None:
        """Nothing to do: gguf-py maps each file whole, and the pages are the kernel's to reclaim."""

    def close(self) -> None:
        for reader in self.readers:
            mm = getattr(reader.data, "_mmap", None)
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass  # a caller still holds a view; the map closes with it
        self.readers = []

    def __enter__(self) -> "GgufModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _integral(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def expected_parts(config: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Canonical tensor -> its GGUF tensors (``gguf_names``) with the ggml ``ne`` each must have for
    ``llama_model_openai_moe::load_arch_tensors``."""
    c = config
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    q, k, v = c.qkv_rows
    per_layer = {
        "attn.norm.scale": [(H,)], "attn.qkv.weight": [(H, q), (H, k), (H, v)], "attn.qkv.bias": [(q,), (k,), (v,)],
        "attn.sinks": [(c.num_attention_heads,)], "attn.out.weight": [(q, H)], "attn.out.bias": [(H,)],
        "mlp.norm.scale": [(H,)], "mlp.gate.weight": [(H, E)], "mlp.gate.bias": [(E,)],
        "mlp.mlp1_weight": [(H, I, E)] * 2, "mlp.mlp1_bias": [(I, E)] * 2,
        "mlp.mlp2_weight": [(I, H, E)], "mlp.mlp2_bias": [(H, E)],
    }
    shapes = {"embedding.weight": [(H, V)], "norm.scale": [(H,)], "unembedding.weight": [(H, V)]}
    for n in range(c.num_hidden_layers):
        shapes.update({f"block.{n}.{rest}": ne for rest, ne in per_layer.items()})
    return {name: list(zip(gguf_names(name), ne)) for name, ne in shapes.items()}


# --------------------------------------------------------------------------------------
# The registry's record (``formats/__init__.py``)


def open_canonical(path: str | Path) -> GgufModel:
    """The model, refused where llama.cpp's loader would refuse it (a tensor missing or of the
    wrong shape for the metadata, too few tokens)."""
    model = GgufModel(path)
    problems = model.problems()
    if problems:
        model.close()
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError("llama.cpp would not load it: " + "; ".join(problems[:3]) + more, file=model.path)
    return model


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """Summary for ``inspect``: metadata, tensor count, bytes by ggml type, expert storage, checks."""
    with GgufModel(path) as model:
        merges = model.fields.get("tokenizer.ggml.merges")
        tokens = model.fields.get("tokenizer.ggml.tokens")
        file_type = model.value("general.file_type")
        g = gguf_py()
        try:
            file_type_name = g.LlamaFileType(file_type).name if file_type is not None else None
        except ValueError:
            file_type_name = None
        problems = model.problems() + (model.scan() if scan else [])
        return {
            "path": str(model.path),
            "files": [p.name for p in model.files],
            "architecture": model.architecture,
            "config": model.config.to_dict(),
            "metadata": {
                "name": model.value("general.name"),
                "file_type": file_type,
                "file_type_name": file_type_name,
                "quantization_version": model.value("general.quantization_version"),
                "tokenizer_model": model.value("tokenizer.ggml.model"),
                "tokenizer_pre": model.value("tokenizer.ggml.pre"),
                "tokens": len(tokens.data) if tokens is not None else 0,
                "merges": len(merges.data) if merges is not None else 0,
                "bos_token_id": model.value("tokenizer.ggml.bos_token_id"),
                "eos_token_id": model.value("tokenizer.ggml.eos_token_id"),
                "chat_template": model.value("tokenizer.chat_template") is not None,
                "kv_count": sum(1 for k in model.fields if not k.startswith("GGUF.")),
            },
            "tensor_count": len(model.tensors),
            "tensor_bytes": sum(int(t.n_bytes) for t in model.tensors.values()),
            "bytes_by_type": model.bytes_by_type(),
            "experts_mxfp4": model.experts_mxfp4(),
            "problems": problems,
            "valid": not problems,
        }


def _files(path: Path) -> dict[str, Path]:
    """The file, or every shard of its split that is present."""
    return {p.name: p for p in split_members(path) if p.is_file()}


def general_type(path: Path) -> str | None:
    """``general.type`` of a GGUF file, read off its first few keys without parsing the rest
    (gguf-py would parse every array: a 13 GB model's tokens take a second)."""
    try:
        with open_regular(path) as fh:
            head_bytes = fh.read(1 << 16)
    except (OSError, InputError):
        return None
    if head_bytes[:4] != b"GGUF" or len(head_bytes) < 24:
        return None
    (kv_count,) = struct.unpack_from("<Q", head_bytes, 16)
    at = 24
    try:
        for _ in range(min(kv_count, 16)):
            (n,) = struct.unpack_from("<Q", head_bytes, at)
            key = head_bytes[at + 8:at + 8 + n].decode("utf-8", "replace")
            at += 8 + n
            (vtype,) = struct.unpack_from("<I", head_bytes, at)
            at += 4
            if vtype == 8:  # string
                (n,) = struct.unpack_from("<Q", head_bytes, at)
                value = head_bytes[at + 8:at + 8 + n].decode("utf-8", "replace")
                at += 8 + n
                if key == "general.type":
                    return value
            elif vtype in _SCALAR_SIZES:
                at += _SCALAR_SIZES[vtype]
            else:  # an array: general.type comes before any in the files llama.cpp and we write
                return None
    except struct.error:
        return None
    return None


def _is_adapter(path: Path) -> bool:
    """A GGUF LoRA (``formats/gguf_lora.py``), not a model."""
    return general_type(Path(path)) == "adapter"


FORMAT = Format(
    "gguf", "a GGUF file llama.cpp runs (a split named by its first shard)",
    lambda path: head(path, len(MAGIC)) == MAGIC and not _is_adapter(path), open=open_canonical, describe=describe,
    files=_files,
)
