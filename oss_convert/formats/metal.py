"""The gpt-oss Metal ``model.bin``: layout, header, tokenizer section, and a reader.

The format (spec §4; writer ``gpt_oss/metal/scripts/create-local-model.py``, reader
``gpt_oss/metal/source/model.c``) is one file:

- a 132-byte header: magic ``GPT-OSS v1.0`` + zero word, model UUID, 68-byte model header,
  layout UUID, tokenizer UUID;
- the tokenizer: a 16-byte header, one UUID per special token (ids 199998..200013), the o200k
  regex + NUL, then every text token as ``u16 length`` + bytes;
- zero padding to 16 KiB, the *shared* weights (embedding and unembedding truncated to 200014
  rows, per-layer attention and router weights, each 16-byte aligned), padded to 16 KiB;
- one 16 KiB-aligned MoE region per layer holding, expert by expert, mlp1 blocks, mlp1
  scales + 14, mlp1 bias, mlp2 blocks, mlp2 scales + 14, mlp2 bias.

q and k rows of ``attn.qkv`` are permuted from the half-split RoPE order to adjacent pairs and
pre-scaled by 0.5 and 0.25 (together 1/sqrt(64)). ``Layout`` computes every offset the way the
C loader does; the writer pads to those offsets, so both sides agree by construction.

Reading back (``MetalModel``): the header gives most of ``ModelConfig`` but not all of it:
``experts_per_token`` is the header's ``num_active_experts`` (the writer always writes 4);
``vocab_size`` is the 200014 rows the file keeps, not the checkpoint's 201088;
``initial_context_length`` is ``context_length * interpolation_scale``; ``rope_ntk_alpha`` and
``rope_ntk_beta`` are solved from the float32 ``yarn_offset``/``yarn_scale`` and rounded to 6
significant digits; float32 fields come back as the shortest decimal that round-trips.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from uuid import UUID

import numpy as np

from ..dtypes import bf16_to_f32, f32_to_bf16
from ..errors import InputError
from ..reading import open_regular
from ..tokens.vocabulary import ROLES, Embedded, Vocabulary
from . import mxfp4
from .base import Format, head
from ..model import RMS_NORM_EPS, VOCAB_TENSORS, ModelConfig, Mxfp4Pair, VocabRows, expert_name

MAGIC = b"GPT-OSS v1.0"
MODEL_UUID = UUID("df52dc86-1789-4ed0-a295-66f10508145b").bytes
LAYOUT_UUID = UUID("229177a8-5775-4268-bfd8-d588b351c56d").bytes  # APPLE_GPU_LAYOUT
TOKENIZER_UUID = UUID("7401aded-2a95-40cb-b782-9ccebaafe72b").bytes  # tiktoken
MODEL_HEADER = struct.Struct("<6If4I6f")
TOKENIZER_HEADER = struct.Struct("<4I")
PREFIX_SIZE = 16 + 16 + MODEL_HEADER.size + 16 + 16 + TOKENIZER_HEADER.size  # up to the special-token UUIDs

PAGE = 16384  # the format assumes Apple Silicon's 16 KiB pages
ALIGN = 16
UE8_OFFSET = 14  # the Metal kernels read a scale byte as float exponent bits, 2^(s-127) needs s+14
MAX_SCALE = 254 - UE8_OFFSET  # a stored 255 would decode to inf
NUM_INCLUDED_TOKENS = 200014  # create-local-model.py: num_included_tokens = 200013 + 1
HEAD_DIM = 64  # the converter's q/k scaling and the kernels assume it
ACTIVE_EXPERTS = 4  # the writer hard-codes it; the runtime has only top-4 kernels

_UUID = {name: UUID(text).bytes for name, text in {
    "<|untrusted|>": "07d7da55-b346-4cff-8b37-7cefacf8a3e8",
    "<|return|>": "f799ff69-1992-43c4-a3d8-d831f475dc75",
    "<|constrain|>": "c0bb14c7-6022-49da-ad08-792d67e8b470",
    "<|channel|>": "fd3dda11-c8ab-4033-876e-d93deb172c93",
    "<|start|>": "55a77c2f-8a01-4c54-8ac2-313bfc7e208d",
    "<|end|>": "fcac2f6d-4705-4f6b-b228-642accac7238",
    "<|message|>": "16e40431-f47f-4b22-b59b-8b278fc30a54",
    "<|call|>": "1220f796-e388-4de5-b487-fe2eb5fe03c0",
    "<|refusal|>": "e15ba702-28c4-4292-ab8f-ffa434709128",
    "<|end_untrusted|>": "f265bd9c-c717-469e-a447-920687d65d90",
}.items()}
# What the upstream writer puts in the 16 special slots (ids 199998..200013). Slot 200001 is
# <|endofuntrusted|>, which never matches the table's key <|end_untrusted|>: upstream writes a
# zero UUID there, and so do we, to stay byte-identical.
SPECIAL_SLOTS: list[tuple[str, bytes]] = [
    ("<|reversed199998|>", bytes(16)), ("<|endoftext|>", bytes(16)), ("<|untrusted|>", _UUID["<|untrusted|>"]),
    ("<|endofuntrusted|>", bytes(16)), ("<|return|>", _UUID["<|return|>"]), ("<|constrain|>", _UUID["<|constrain|>"]),
    ("<|reversed200004|>", bytes(16)), ("<|channel|>", _UUID["<|channel|>"]), ("<|start|>", _UUID["<|start|>"]),
    ("<|end|>", _UUID["<|end|>"]), ("<|message|>", _UUID["<|message|>"]), ("<|reversed200009|>", bytes(16)),
    ("<|reversed200010|>", bytes(16)), ("<|reversed200011|>", bytes(16)), ("<|call|>", _UUID["<|call|>"]),
    ("<|refusal|>", _UUID["<|refusal|>"]),
]
UUID_NAMES = {uuid: name for name, uuid in _UUID.items()}

EXPERT_PARTS = ("mlp1_blocks", "mlp1_scales", "mlp1_bias", "mlp2_blocks", "mlp2_scales", "mlp2_bias")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------------------
# Model header


@dataclass(frozen=True)
class MetalHeader:
    """``struct gptoss_gptoss_model_header`` (``storage.h``), in field order."""

    context_length: int
    num_blocks: int
    num_experts: int
    num_active_experts: int
    embedding_dim: int
    mlp_dim: int
    swiglu_limit: float
    head_dim: int
    num_heads: int
    num_kv_heads: int
    attention_window: int
    rope_theta: float
    interpolation_scale: float
    yarn_offset: float
    yarn_scale: float
    yarn_multiplier: float
    rmsnorm_epsilon: float

    @classmethod
    def from_config(cls, c: ModelConfig) -> "MetalHeader":
        """The values ``create-local-model.py`` computes, with its exact float expressions."""
        yarn_low = c.head_dim / 2 * math.log(c.initial_context_length / (c.rope_ntk_beta * 2 * math.pi)) / math.log(c.rope_theta)
        yarn_high = c.head_dim / 2 * math.log(c.initial_context_length / (c.rope_ntk_alpha * 2 * math.pi)) / math.log(c.rope_theta)
        return cls(
            context_length=int(c.initial_context_length * c.rope_scaling_factor), num_blocks=c.num_hidden_layers,
            num_experts=c.num_experts, num_active_experts=ACTIVE_EXPERTS, embedding_dim=c.hidden_size,
            mlp_dim=c.intermediate_size, swiglu_limit=c.swiglu_limit, head_dim=c.head_dim,
            num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, attention_window=c.sliding_window,
            rope_theta=c.rope_theta, interpolation_scale=1.0 / c.rope_scaling_factor,
            yarn_offset=-yarn_low / (yarn_high - yarn_low), yarn_scale=1.0 / (yarn_high - yarn_low),
            yarn_multiplier=0.1 * math.log(c.rope_scaling_factor) + 1.0, rmsnorm_epsilon=RMS_NORM_EPS,
        )

    def pack(self) -> bytes:
        return MODEL_HEADER.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, data: bytes) -> "MetalHeader":
        return cls(*MODEL_HEADER.unpack(data))

    def to_config(self, vocab_rows: int) -> ModelConfig:
        """The ``original/`` config as far as the header holds it (see the module docstring)."""
        factor = _f32_decimal(1.0 / _f32_decimal(self.interpolation_scale))
        theta = _f32_decimal(self.rope_theta)
        width = 1.0 / self.yarn_scale  # yarn_high - yarn_low
        low = -self.yarn_offset * width
        context0 = round(self.context_length / factor)

        def ntk(position: float) -> float:  # invert low/high = hd/2 * ln(ctx0 / (x * 2pi)) / ln(theta)
            return context0 / (2 * math.pi * math.exp(position * math.log(theta) / (self.head_dim / 2)))

        return ModelConfig(
            num_hidden_layers=self.num_blocks, num_experts=self.num_experts, experts_per_token=self.num_active_experts,
            vocab_size=vocab_rows, hidden_size=self.embedding_dim, intermediate_size=self.mlp_dim,
            swiglu_limit=_f32_decimal(self.swiglu_limit), head_dim=self.head_dim, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, sliding_window=self.attention_window,
            initial_context_length=context0, rope_theta=_integral(theta), rope_scaling_factor=factor,
            rope_ntk_alpha=_integral(_significant(ntk(low + width))), rope_ntk_beta=_integral(_significant(ntk(low))),
        )


def _f32_decimal(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (7.0, 0.03125, 150000.0)."""
    return float(str(np.float32(value)))


def _significant(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


def _integral(value: float) -> float | int:
    """Whole numbers as int, as the real ``config.json`` writes rope_theta and the ntk values."""
    return int(value) if float(value).is_integer() else value


# --------------------------------------------------------------------------------------
# Tokenizer section


def tokenizer_section(text_tokens: list[bytes], regex: str) -> bytes:
    """Tokenizer UUID, header, special-token UUIDs, regex + NUL and the text tokens."""
    regex_bytes = regex.encode("ascii") + b"\0"
    body = b"".join(struct.pack("<H", len(t)) + t for t in text_tokens)
    num_special = NUM_INCLUDED_TOKENS - len(text_tokens)
    header = TOKENIZER_HEADER.pack(num_special, len(text_tokens), len(regex_bytes), len(body))
    return TOKENIZER_UUID + header + b"".join(uuid for _, uuid in SPECIAL_SLOTS[:num_special]) + regex_bytes + body


def split_tokens(body: memoryview | bytes, count: int, *, file: Path | None = None) -> list[bytes]:
    """``count`` tokens of ``u16 length`` + bytes (the reader must use the u16; o200k has 128-byte tokens)."""
    tokens, at = [], 0
    for _ in range(count):
        if at + 2 > len(body):
            raise InputError(f"tokenizer section ends after {len(tokens)} of {count} tokens", file=file)
        (length,) = struct.unpack_from("<H", body, at)
        if length == 0 or at + 2 + length > len(body):
            raise InputError(f"token {len(tokens)} has an invalid length {length}", file=file)
        tokens.append(bytes(body[at + 2:at + 2 + length]))
        at += 2 + length
    if at != len(body):
        raise InputError(f"tokenizer section has {len(body) - at} bytes after its {count} tokens", file=file)
    return tokens


# --------------------------------------------------------------------------------------
# Layout (model.c:gptoss_model_create_from_file)


@dataclass(frozen=True)
class Slot:
    offset: int  # absolute file offset
    shape: tuple[int, ...]
    dtype: str  # "BF16" (stored as uint16 bits) or "U8"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (2 if self.dtype == "BF16" else 1)


class Layout:
    """Every tensor's file offset, computed as the C loader computes it from the header."""

    def __init__(self, header: MetalHeader, vocab_rows: int, tokenizer_end: int):
        h = header
        H, I, E = h.embedding_dim, h.mlp_dim, h.num_experts
        self.header, self.vocab_rows = h, vocab_rows
        qkv_dim = h.head_dim * (h.num_heads + 2 * h.num_kv_heads)
        self.shared_start = round_up(tokenizer_end, PAGE)
        self.dense: dict[str, Slot] = {}
        at = self.shared_start

        def place(name: str, shape: tuple[int, ...]) -> None:
            nonlocal at
            slot = Slot(at, shape, "BF16")
            self.dense[name] = slot
            at += round_up(slot.nbytes, ALIGN)

        place("embedding.weight", (vocab_rows, H))
        for n in range(h.num_blocks):
            p = f"block.{n}."
            place(p + "attn.norm.scale", (H,))
            place(p + "attn.qkv.weight", (qkv_dim, H))
            place(p + "attn.qkv.bias", (qkv_dim,))
            place(p + "attn.sinks", (h.num_heads,))
            place(p + "attn.out.weight", (H, h.num_heads * h.head_dim))
            place(p + "attn.out.bias", (H,))
            place(p + "mlp.norm.scale", (H,))
            place(p + "mlp.gate.weight", (E, H))
            place(p + "mlp.gate.bias", (E,))
        place("norm.scale", (H,))
        place("unembedding.weight", (vocab_rows, H))
        self.shared_size = round_up(at - self.shared_start, PAGE)

        shapes = {
            "mlp1_blocks": ((2 * I, H // 32, 16), "U8"), "mlp1_scales": ((2 * I, H // 32), "U8"),
            "mlp1_bias": ((2 * I,), "BF16"),
            "mlp2_blocks": ((H, I // 32, 16), "U8"), "mlp2_scales": ((H, I // 32), "U8"), "mlp2_bias": ((H,), "BF16"),
        }
        self.expert_parts: dict[str, Slot] = {}  # offsets relative to the expert's start
        at = 0
        for part in EXPERT_PARTS:
            shape, dtype = shapes[part]
            self.expert_parts[part] = Slot(at, shape, dtype)
            at += round_up(self.expert_parts[part].nbytes, ALIGN)
        self.per_expert = at
        self.moe_stride = round_up(E * self.per_expert, PAGE)
        last = self.expert(h.num_blocks - 1, E - 1, "mlp2_bias")
        # The writer pads before each item, never after the last one.
        self.file_size = last.offset + last.nbytes

    def moe_start(self, layer: int) -> int:
        return self.shared_start + self.shared_size + layer * self.moe_stride

    def expert(self, layer: int, expert: int, part: str) -> Slot:
        rel = self.expert_parts[part]
        return Slot(self.moe_start(layer) + expert * self.per_expert + rel.offset, rel.shape, rel.dtype)


# --------------------------------------------------------------------------------------
# The q/k transform of attn.qkv


def permute_qkv(bits: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """BF16 bits of ``attn.qkv.weight`` ``[qkv_dim, H]`` or ``.bias`` ``[qkv_dim]`` as Metal stores them.

    Within each q and k head, row ``2i`` takes old row ``i`` and row ``2i+1`` old row ``32+i``
    (half-split RoPE -> adjacent pairs); q is scaled by 0.5 and k by 0.25, rounded to BF16 as
    torch's in-place multiply does. v rows are unchanged.
    """
    rows = bits.reshape(bits.shape[0], -1)
    heads = num_heads + num_kv_heads
    qk = rows[:heads * HEAD_DIM].reshape(heads, 2, HEAD_DIM // 2, -1).transpose(0, 2, 1, 3).reshape(heads, HEAD_DIM, -1)
    values = bf16_to_f32(qk)
    values[:num_heads] *= np.float32(0.5)
    values[num_heads:] *= np.float32(0.25)
    out = np.concatenate([f32_to_bf16(values).reshape(heads * HEAD_DIM, -1), rows[heads * HEAD_DIM:]])
    return out.reshape(bits.shape)


def unpermute_qkv(bits: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int = HEAD_DIM) -> np.ndarray:
    """Inverse of ``permute_qkv``, as float32 in the reference row order."""
    values = bf16_to_f32(bits.reshape(bits.shape[0], -1))
    heads = num_heads + num_kv_heads
    qk = values[:heads * head_dim].reshape(heads, head_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(heads, head_dim, -1)
    qk = qk.copy()
    qk[:num_heads] *= np.float32(2.0)
    qk[num_heads:] *= np.float32(4.0)
    out = np.concatenate([qk.reshape(heads * head_dim, -1), values[heads * head_dim:]])
    return out.reshape(bits.shape)


# --------------------------------------------------------------------------------------
# Reader


def model_file(path: str | Path) -> Path:
    """``model.bin`` itself, or the one inside a folder (the Hub repo's ``metal/``)."""
    p = Path(path)
    return p / "model.bin" if p.is_dir() else p


class MetalModel(VocabRows):
    """A validated, memory-mapped ``model.bin`` presented as a ``CanonicalModel``."""

    def __init__(self, path: str | Path):
        self.path = model_file(path)
        self._fh = open_regular(self.path)
        try:
            self._open()
        except BaseException:
            self._fh.close()
            raise

    def _fail(self, message: str) -> InputError:
        return InputError(message, file=self.path)

    def _open(self) -> None:
        self.file_size = self.path.stat().st_size
        prefix = self._fh.read(PREFIX_SIZE)
        if len(prefix) < PREFIX_SIZE:
            raise self._fail(f"truncated: {len(prefix)} bytes, a Metal model.bin header needs {PREFIX_SIZE}")
        if prefix[:12] != MAGIC or prefix[12:16] != bytes(4):
            raise self._fail(f"not a gpt-oss Metal model.bin (magic {prefix[:16]!r}, expected {MAGIC!r} + zero word)")
        at = 16
        if prefix[at:at + 16] != MODEL_UUID:
            raise self._fail(f"model UUID {UUID(bytes=prefix[at:at + 16])} is not gpt-oss ({UUID(bytes=MODEL_UUID)})")
        at += 16
        self.header = MetalHeader.unpack(prefix[at:at + MODEL_HEADER.size])
        at += MODEL_HEADER.size
        for what, want in (("layout", LAYOUT_UUID), ("tokenizer", TOKENIZER_UUID)):
            got = prefix[at:at + 16]
            if got != want:
                raise self._fail(f"{what} UUID {UUID(bytes=got)} is not the one the Metal runtime accepts ({UUID(bytes=want)})")
            at += 16
        self.num_special, self.num_text, self.regex_size, self.tokens_size = TOKENIZER_HEADER.unpack(prefix[at:])
        self._check_header()
        tokenizer_end = PREFIX_SIZE + 16 * self.num_special + self.regex_size + self.tokens_size
        # Bound the header by the file before laying it out: a corrupt num_blocks of 3e8 would
        # otherwise build 3e8 layers' offsets (a hang) only to find the file too short.
        h = self.header
        expert_bytes = h.num_blocks * h.num_experts * (3 * h.mlp_dim * h.embedding_dim // 2)
        if self.file_size < tokenizer_end + expert_bytes:
            raise self._fail(f"truncated: {self.file_size:,} bytes, the header implies more than "
                             f"{tokenizer_end + expert_bytes:,}")
        self.layout = Layout(self.header, self.vocab_rows, tokenizer_end)
        if self.file_size < self.layout.file_size:
            raise self._fail(f"truncated: {self.file_size:,} bytes, the header implies {self.layout.file_size:,}")
        try:
            self.config = self.header.to_config(self.vocab_rows)
        except (ArithmeticError, ValueError) as exc:  # RoPE fields no converter writes: overflow, NaN
            raise self._fail(f"implausible header: RoPE fields give no config ({exc})") from exc
        self.config.check(self.path)  # what the model's math needs of every field (model.CONFIG_LIMITS)
        self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    def _check_header(self) -> None:
        h = self.header
        problems = []
        for name in ("num_blocks", "num_experts", "embedding_dim", "mlp_dim", "head_dim", "num_heads", "num_kv_heads"):
            if getattr(h, name) <= 0:
                problems.append(f"{name} is {getattr(h, name)}")
        if h.embedding_dim % 32 or h.mlp_dim % 32:
            problems.append("embedding_dim and mlp_dim must be multiples of 32 (MXFP4 blocks)")
        if h.head_dim % 2 or (h.num_kv_heads and h.num_heads % h.num_kv_heads):
            problems.append("head_dim must be even and num_heads a multiple of num_kv_heads")
        if not (h.interpolation_scale > 0 and h.yarn_scale != 0 and h.rope_theta > 1):
            problems.append(f"RoPE fields out of range (interpolation_scale {h.interpolation_scale}, "
                            f"yarn_scale {h.yarn_scale}, rope_theta {h.rope_theta})")
        if h.rmsnorm_epsilon != np.float32(RMS_NORM_EPS):  # the runtime normalizes with it; the reference with 1e-5
            problems.append(f"rmsnorm_epsilon is {h.rmsnorm_epsilon}, not the reference's {RMS_NORM_EPS}")
        if not math.isfinite(h.swiglu_limit):
            problems.append(f"swiglu_limit is {h.swiglu_limit}")
        if self.num_text == 0 or self.regex_size == 0:
            problems.append("empty tokenizer")
        if problems:
            raise self._fail("implausible header: " + "; ".join(problems))

    @property
    def vocab_rows(self) -> int:
        """Embedding/unembedding rows: the runtime's vocabulary_size = special + text tokens."""
        return self.num_special + self.num_text

    # -- tokenizer ----------------------------------------------------------------------

    def special_uuids(self) -> list[bytes]:
        start = PREFIX_SIZE
        return [bytes(self._mmap[start + 16 * i:start + 16 * (i + 1)]) for i in range(self.num_special)]

    def regex(self) -> str:
        start = PREFIX_SIZE + 16 * self.num_special
        raw = bytes(self._mmap[start:start + self.regex_size])
        return raw.rstrip(b"\0").decode("ascii", errors="replace")

    def text_tokens(self) -> list[bytes]:
        start = PREFIX_SIZE + 16 * self.num_special + self.regex_size
        return split_tokens(memoryview(self._mmap)[start:start + self.tokens_size], self.num_text, file=self.path)

    def embedded(self) -> Embedded:
        """Its 199998 text tokens and the special slots it names (by UUID, after upstream's own
        table); no BOS/EOS and no chat template: the runtime knows its stop tokens."""
        vocab = Vocabulary(str(self.path), named_slots_only=True, ids={role: None for role in ROLES})
        tokens = self.text_tokens()
        vocab.tokens = dict(enumerate(tokens))
        for offset, uuid in enumerate(self.special_uuids()):
            name = UUID_NAMES.get(uuid)
            if name is not None:  # unnamed slots hold a zero UUID upstream: nothing to compare
                vocab.specials[len(tokens) + offset] = name
        return Embedded(vocab, None, "runtime", None)

    # -- tensors ------------------------------------------------------------------------

    def _view(self, slot: Slot) -> np.ndarray:
        dtype = np.uint16 if slot.dtype == "BF16" else np.uint8
        return np.frombuffer(self._mmap, dtype=dtype, count=math.prod(slot.shape), offset=slot.offset).reshape(slot.shape)

    def stored(self, name: str) -> np.ndarray:
        """A dense tensor exactly as stored (BF16 bits; qkv permuted and scaled)."""
        try:
            return self._view(self.layout.dense[name])
        except KeyError:
            raise InputError("no such tensor in a Metal model.bin", file=self.path, tensor=name) from None

    def expert_part(self, layer: int, part: str) -> np.ndarray:
        """One layer's expert part for all experts, ``[E, ...]``: a zero-copy view whose first
        stride steps from one expert's group to the next."""
        first = self.layout.expert(layer, 0, part)
        itemsize = 2 if first.dtype == "BF16" else 1
        strides = [itemsize]
        for size in reversed(first.shape[1:]):
            strides.insert(0, strides[0] * size)
        return np.ndarray((self.header.num_experts, *first.shape), dtype=np.uint16 if itemsize == 2 else np.uint8,
                          buffer=self._mmap, offset=first.offset, strides=(self.layout.per_expert, *strides))

    def raw(self, name: str) -> np.ndarray:
        """Canonical BF16 bits of a dense tensor or bias, and OpenAI-layout U8 for ``.blocks``/``.scales``."""
        parts = name.split(".")
        if name.endswith(("mlp1_bias", "mlp2_bias")):
            return self.expert_part(int(parts[1]), parts[3])
        if name.endswith((".blocks", ".scales")):
            pair = self.mxfp4(*expert_name(name))
            return pair.blocks if name.endswith(".blocks") else pair.scales
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            return f32_to_bf16(self.f32(name))
        return self.stored(name)

    def f32(self, name: str) -> np.ndarray:
        if name.endswith(("mlp1_weight", "mlp2_weight")):
            pair = self.mxfp4(*expert_name(name))
            return mxfp4.decode(pair.blocks, pair.scales)
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            return unpermute_qkv(self.stored(name), self.header.num_heads, self.header.num_kv_heads, self.header.head_dim)
        return bf16_to_f32(self.raw(name))

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair:
        """OpenAI blocks (a strided view) and scales (stored - 14) of ``mlp1``/``mlp2``."""
        if which not in ("mlp1", "mlp2") or not 0 <= layer < self.header.num_blocks:
            raise InputError(f"no expert weight {which!r} in layer {layer}", file=self.path)
        stored = self.expert_part(layer, which + "_scales")
        return Mxfp4Pair(self.expert_part(layer, which + "_blocks"), (stored - np.uint8(UE8_OFFSET)).astype(np.uint8))

    def _bf16_bits(self, name: str) -> np.ndarray | None:
        return self.stored(name) if name in VOCAB_TENSORS else None

    def storage(self, name: str) -> str:
        return "MXFP4" if name.endswith(("mlp1_weight", "mlp2_weight")) else "BF16"

    def release(self, name: str) -> None:
        """Nothing to do per tensor: the reader keeps one mapping and touches only what is asked."""

    def scan(self) -> list[str]:
        """Read every scale byte: stored values must lie in [14, 254] (255 is inf; < 14 means a wrapped +14)."""
        problems = []
        for n in range(self.header.num_blocks):
            for which in ("mlp1", "mlp2"):
                stored = self.expert_part(n, which + "_scales")
                low, high = int(stored.min()), int(stored.max())
                if low < UE8_OFFSET or high > 254:
                    problems.append(f"block.{n}.mlp.{which}_weight.scales: stored bytes span [{low}, {high}], "
                                    f"outside [{UE8_OFFSET}, 254] (a wrapped scale + {UE8_OFFSET}, or inf)")
        return problems

    def close(self) -> None:
        # Views handed out keep the mapping alive through their base; only drop our handle.
        self._mmap = None
        self._fh.close()

    def __enter__(self) -> "MetalModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# The registry's record (``formats/__init__.py``)


def open_canonical(path: str | Path) -> MetalModel:
    return MetalModel(path)


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """Header, tokenizer summary, sizes and validation for ``inspect``."""
    from ..tokens.vocabulary import O200K_PATTERN

    with MetalModel(path) as model:
        layout = model.layout
        problems = model.scan() if scan else []
        if model.file_size != layout.file_size:
            problems.append(f"file has {model.file_size - layout.file_size:,} bytes after the last expert")
        specials = {}
        for slot, uuid in enumerate(model.special_uuids()):
            if uuid != bytes(16):
                specials[model.num_text + slot] = UUID_NAMES.get(uuid, f"unknown {UUID(bytes=uuid)}")
        if model.vocab_rows != NUM_INCLUDED_TOKENS:
            problems.append(f"{model.vocab_rows} vocabulary rows; the gpt-oss Metal runtime expects {NUM_INCLUDED_TOKENS}")
        regex = model.regex()
        return {
            "path": str(model.path),
            "header": asdict(model.header),
            "config": model.config.to_dict(),
            "tokenizer": {
                "num_text_tokens": model.num_text,
                "num_special_tokens": model.num_special,
                "regex_is_o200k": regex == O200K_PATTERN,
                "tokens_bytes": model.tokens_size,
                "special_tokens": specials,
            },
            "sizes": {
                "file_bytes": model.file_size,
                "expected_bytes": layout.file_size,
                "weights_offset": layout.shared_start,
                "shared_weights_bytes": layout.shared_size,
                "per_expert_bytes": layout.per_expert,
                "moe_layer_bytes": layout.moe_stride,
            },
            "tensor_count": len(layout.dense) + 6 * model.header.num_blocks,
            "problems": problems,
            "valid": not problems,
        }


def recognises(path: Path) -> bool:
    """A ``model.bin`` by its magic, or a folder holding a ``model.bin`` (the Hub repo's ``metal/``)."""
    p = Path(path)
    return (p / "model.bin").is_file() if p.is_dir() else head(p, len(MAGIC)) == MAGIC


FORMAT = Format(
    "metal", "the gpt-oss Metal model.bin", recognises, open=open_canonical, describe=describe,
    ours=lambda path: head(model_file(path), len(MAGIC)) == MAGIC,
    weights=lambda path: [model_file(path)],
)
