"""The model every module talks about: config, tensor table, and the two reader interfaces.

Base layer: imports only ``errors`` and ``dtypes``. Owns

- ``ModelConfig``: the 16 keys of ``original/config.json``, the one description of a gpt-oss
  model that every format maps to and from;
- ``TensorSpec`` and ``expected_tensors``: every tensor of the ``original/`` layout (names,
  dtypes, shapes, in ``dtypes.json`` order), and ``logical_names`` (each MXFP4 pair as one weight);
- ``Mxfp4Pair``: OpenAI-layout blocks and scales of one expert weight;
- ``Source``: what every reader hands the converters (``OriginalCheckpoint``, ``HfCheckpoint``);
- ``CanonicalModel``: what every reader hands the verifier and ``inspect``.

A *canonical model* presents weights under the ``original/`` names and in the ``original/``
layout (fused qkv in the reference row order, mlp1 rows gate/linear interleaved, ``[out, in]``
linear weights), whatever the artifact stores. Readers undo their format's transformations
(the Metal q/k permutation and pre-scaling, GGUF's gate/up split and nibble order, MLX's
uint32 packing) so artifacts can be compared tensor by tensor and run by one forward pass.
Expert weights have two views: ``mxfp4(layer, which)`` returns the exact OpenAI blocks and
scales when the artifact stores MXFP4 (``None`` otherwise), and ``f32`` dequantizes them.
A reader whose vocabulary is truncated (Metal keeps 200014 rows) says so with ``config.vocab_size``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from .dtypes import DTYPES, bf16_to_f32
from .errors import InputError

# Facts of the gpt-oss architecture that no config file states: the torch reference
# (gpt_oss/torch/model.py) hard-codes them, and every format and the runner take them from here.
RMS_NORM_EPS = 1e-5  # RMSNorm's epsilon
SWIGLU_ALPHA = 1.702  # swiglu's sigmoid scale
NUM_TEXT_TOKENS = 199998  # o200k text tokens; the Harmony specials start at this id
EXPERT_WEIGHTS = ("mlp1", "mlp2")  # the two expert matrices of a layer: gate/up (interleaved) and down


def is_number(value) -> bool:
    """A JSON number: an int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_windowed(layer: int) -> bool:
    """The reference windows even layers (layer 0 included); odd layers attend to everything."""
    return layer % 2 == 0


# Bounds on each config key: far above gpt-oss-120b (36 layers, 128 experts, 201088 tokens,
# width 2880), far below what would exhaust memory before a shape check.
# (an int limit marks a count, a float one a real value)
CONFIG_LIMITS = {
    "num_hidden_layers": 1024, "num_experts": 4096, "experts_per_token": 4096, "vocab_size": 1 << 22,
    "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "swiglu_limit": 1e4, "head_dim": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "sliding_window": 1 << 24,
    "initial_context_length": 1 << 24, "rope_theta": 1e12, "rope_scaling_factor": 1024.0,
    "rope_ntk_alpha": 1e6, "rope_ntk_beta": 1e6,
}


@dataclass(frozen=True)
class ModelConfig:
    """The 16 keys of ``original/config.json`` (``gpt_oss/torch/model.py:ModelConfig``), in file order."""

    num_hidden_layers: int = 36
    num_experts: int = 128
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000  # the real files write these three as JSON ints
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1
    rope_ntk_beta: float = 32

    @property
    def qkv_dim(self) -> int:
        return self.head_dim * (self.num_attention_heads + 2 * self.num_key_value_heads)

    @property
    def qkv_rows(self) -> tuple[int, int, int]:
        """Rows of q, k and v inside the fused ``attn.qkv`` (reference order; formats that split it use these)."""
        d = self.head_dim
        return self.num_attention_heads * d, self.num_key_value_heads * d, self.num_key_value_heads * d

    @property
    def qkv_slices(self) -> tuple[slice, slice, slice]:
        """Where q, k and v lie inside the fused ``attn.qkv`` (its rows; its bias's values)."""
        q, k, v = self.qkv_rows
        return slice(0, q), slice(q, q + k), slice(q + k, q + k + v)

    def window(self, layer: int) -> int:
        """The sliding window of ``layer``: ``sliding_window`` on windowed layers, 0 (none) on the others."""
        return self.sliding_window if is_windowed(layer) else 0

    @classmethod
    def from_dict(cls, raw: dict, *, file: Path | None = None, names: dict[str, str] | None = None) -> "ModelConfig":
        """The config from its 16 keys, each of its type and within ``check``'s bounds; ``names``
        maps a key to what the file calls it (``num_local_experts`` in a transformers config), for
        the messages."""
        label = (names or {}).get
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InputError(f"unknown config keys {unknown}; the reference model accepts only {list(known)}", file=file)
        missing = [label(name, name) for name in known if name not in raw]
        if missing:
            raise InputError(f"config is missing keys {missing}", file=file)
        values = {}
        for name, f in known.items():
            value = raw[name]
            want = int if f.type in ("int", int) else float
            if not is_number(value) or (want is int and not isinstance(value, int)):  # 4.0 layers: a range() of a float
                raise InputError(f"config key {label(name, name)!r} must be {want.__name__}, got {value!r}", file=file)
            values[name] = int(value) if want is int else value
        config = cls(**values)
        config.check(file, names)
        return config

    def check(self, file: Path | None = None, names: dict[str, str] | None = None) -> None:
        """What the model's math needs of every key, and the relations between keys that every
        consumer relies on; sizes bounded far above any gpt-oss (a stranger's config must not
        make us allocate for 10^9 layers). ``names``: what the file calls each key."""
        def label(name: str) -> str:
            return (names or {}).get(name, name)

        problems = []
        for name, limit in CONFIG_LIMITS.items():
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 < value <= limit:
                problems.append(f"{label(name)} must be in 1..{limit}, got {value!r}" if isinstance(limit, int)
                                else f"{label(name)} must be finite, > 0 and <= {limit:g}, got {value!r}")
        if self.hidden_size % 32 or self.intermediate_size % 32:
            problems.append(f"{label('hidden_size')} and {label('intermediate_size')} must be multiples of 32 "
                            "(MXFP4 blocks)")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append(f"{label('num_attention_heads')} must be a multiple of {label('num_key_value_heads')}")
        if self.head_dim % 2:
            problems.append(f"{label('head_dim')} must be even (RoPE pairs)")
        if self.experts_per_token > self.num_experts:
            problems.append(f"{label('experts_per_token')} exceeds {label('num_experts')}")
        if self.num_key_value_heads > self.num_attention_heads:
            problems.append(f"{label('num_key_value_heads')} exceeds {label('num_attention_heads')}")
        if self.rope_theta <= 1:
            problems.append(f"{label('rope_theta')} must exceed 1 (RoPE divides by its log), got {self.rope_theta!r}")
        if self.rope_scaling_factor < 1:
            problems.append(f"{label('rope_scaling_factor')} must be >= 1 (YaRN stretches the context), "
                            f"got {self.rope_scaling_factor!r}")
        if not self.rope_ntk_alpha < self.rope_ntk_beta:
            problems.append(f"{label('rope_ntk_alpha')} must be below {label('rope_ntk_beta')} "
                            "(YaRN's ramp runs between them)")
        if problems:
            raise InputError("invalid config: " + "; ".join(problems), file=file)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """One line, ``json.dumps`` defaults, no newline: the form of the real 120b file (377 bytes)."""
        return json.dumps(self.to_dict())


# --------------------------------------------------------------------------------------
# Expected tensors


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Mxfp4Pair:
    """The two safetensors entries of one MXFP4 weight."""

    blocks: np.ndarray  # uint8 [E, rows, cols/32, 16]
    scales: np.ndarray  # uint8 [E, rows, cols/32]


def expected_tensors(config: ModelConfig, experts: str = "mxfp4") -> list[TensorSpec]:
    """Every tensor of an ``original/`` checkpoint, in ``dtypes.json`` order.

    ``experts="bf16"`` describes the dense variant (e.g. a fine-tune before quantization):
    ``mlp1_weight`` ``[E, 2I, H]`` and ``mlp2_weight`` ``[E, H, I]`` in BF16 instead of the
    ``.blocks``/``.scales`` pairs.
    """
    c = config
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    specs = [TensorSpec("embedding.weight", "BF16", (V, H))]
    for n in range(c.num_hidden_layers):
        p = f"block.{n}."
        specs += [
            TensorSpec(p + "attn.norm.scale", "BF16", (H,)),
            TensorSpec(p + "attn.qkv.weight", "BF16", (c.qkv_dim, H)),
            TensorSpec(p + "attn.qkv.bias", "BF16", (c.qkv_dim,)),
            TensorSpec(p + "attn.sinks", "BF16", (c.num_attention_heads,)),
            TensorSpec(p + "attn.out.weight", "BF16", (H, c.num_attention_heads * c.head_dim)),
            TensorSpec(p + "attn.out.bias", "BF16", (H,)),
            TensorSpec(p + "mlp.norm.scale", "BF16", (H,)),
            TensorSpec(p + "mlp.gate.weight", "BF16", (E, H)),
            TensorSpec(p + "mlp.gate.bias", "BF16", (E,)),
            *_expert_specs(p + "mlp.mlp1_weight", (E, 2 * I, H), experts),
            TensorSpec(p + "mlp.mlp1_bias", "BF16", (E, 2 * I)),
            *_expert_specs(p + "mlp.mlp2_weight", (E, H, I), experts),
            TensorSpec(p + "mlp.mlp2_bias", "BF16", (E, H)),
        ]
    specs += [TensorSpec("norm.scale", "BF16", (H,)), TensorSpec("unembedding.weight", "BF16", (V, H))]
    return specs


def _expert_specs(name: str, shape: tuple[int, int, int], experts: str) -> list[TensorSpec]:
    if experts == "bf16":
        return [TensorSpec(name, "BF16", shape)]
    if experts != "mxfp4":
        raise ValueError(f"experts must be 'mxfp4' or 'bf16', not {experts!r}")
    E, rows, cols = shape
    return [TensorSpec(name + ".blocks", "U8", (E, rows, cols // 32, 16)),
            TensorSpec(name + ".scales", "U8", (E, rows, cols // 32))]




def iter_chunks(array: np.ndarray, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """Split a (memory-mapped) array along its first axis into pieces of at most ``max_bytes``."""
    if array.ndim == 0 or array.nbytes <= max_bytes:
        yield array
        return
    row_bytes = max(array.nbytes // max(array.shape[0], 1), 1)
    step = max(max_bytes // row_bytes, 1)
    for start in range(0, array.shape[0], step):
        yield array[start:start + step]


def logical_names(config: ModelConfig) -> list[str]:
    """Canonical tensor names: the ``original/`` names with each MXFP4 pair as one weight."""
    return [spec.name for spec in expected_tensors(config, "bf16")]


_EXPERT_NAME = re.compile(r"^block\.(\d+)\.mlp\.(mlp1|mlp2)_weight(?:\.blocks|\.scales)?$")


def is_expert_weight(name: str) -> bool:
    """``block.N.mlp.mlp1_weight`` / ``mlp2_weight`` (the logical name of an MXFP4 pair, or a dense expert)."""
    return name.startswith("block.") and name.endswith(tuple(w + "_weight" for w in EXPERT_WEIGHTS))


def expert_name(name: str) -> tuple[int, str]:
    """``block.3.mlp.mlp1_weight`` (or its ``.blocks``/``.scales``) -> ``(3, "mlp1")``."""
    match = _EXPERT_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not an expert weight")
    return int(match[1]), match[2]


def gate_up_rows(data: np.ndarray, parity: int | None, axis: int = 0) -> np.ndarray:
    """The canonical ``mlp1`` interleaves gate (even rows, ``parity=0``) and linear/up (odd, ``1``)
    along ``axis``; formats that split them take one parity. ``None`` takes the tensor whole (mlp2)."""
    if parity is None:
        return data
    index = [slice(None)] * data.ndim
    index[axis] = slice(parity, None, 2)
    return np.ascontiguousarray(data[tuple(index)])


def interleave(even: np.ndarray, odd: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``gate_up_rows``: rows of ``even`` at 0, 2, 4, ... and of ``odd`` at 1, 3, 5, ..."""
    shape = list(even.shape)
    shape[axis] *= 2
    out = np.empty(shape, dtype=even.dtype)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, None, 2)
    out[tuple(index)] = even
    index[axis] = slice(1, None, 2)
    out[tuple(index)] = odd
    return out


# --------------------------------------------------------------------------------------
# The reader interfaces


VOCAB_TENSORS = ("embedding.weight", "unembedding.weight")


class VocabRows:
    """``f32_rows`` for readers: rows of a ``[V, H]`` vocabulary tensor as float32 without
    dequantizing the whole matrix (2.3 GB for gpt-oss). A reader that stores it as BF16 returns
    the raw bits from ``_bf16_bits``; any other storage falls back to slicing ``f32``."""

    def f32_rows(self, name: str, rows) -> np.ndarray:
        bits = self._bf16_bits(name)
        if bits is not None:
            return bf16_to_f32(np.ascontiguousarray(bits[rows]))
        return np.ascontiguousarray(self.f32(name)[rows], dtype=np.float32)

    def bf16_bits(self, name: str) -> np.ndarray | None:
        """Raw BF16 bits of a dense tensor the artifact stores as plain BF16 in canonical shape and
        layout (a mapped view), else ``None``: a GPU runner moves these and widens them there, which
        is exact. Expert weights are left out: a reader that stores them transposed (the
        transformers layout) would hand over a same-shaped wrong matrix when ``H == I``."""
        return None if is_expert_weight(name) or self.storage(name) != "BF16" else self._bf16_bits(name)

    def _bf16_bits(self, name: str) -> np.ndarray | None:
        return None


@runtime_checkable
class CanonicalModel(Protocol):
    """Any artifact opened for ``verify`` and ``inspect`` (see the module docstring)."""

    config: ModelConfig

    def f32(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, canonical name and shape."""

    def f32_rows(self, name: str, rows) -> np.ndarray:
        """``f32(name)[rows]`` (a slice or an index array) of a vocabulary tensor, reading only those rows."""

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        """OpenAI-layout blocks/scales of ``mlp1``/``mlp2`` if stored losslessly as MXFP4."""

    def storage(self, name: str) -> str:
        """How the artifact stores the tensor: "BF16", "F32", "MXFP4", "Q8_0", "affine-4bit", ..."""

    def release(self, name: str) -> None:
        """Unmap the pages of a tensor the caller is done with (a no-op where nothing is mapped)."""

    def embedded(self):
        """What the artifact carries for a runtime (``tokens.vocabulary.Embedded``: vocabulary,
        chat template, stop ids), or ``None`` when it carries no tokenizer."""

    def close(self) -> None: ...


@runtime_checkable
class Source(Protocol):
    """A checkpoint the converters read: ``original/`` or the transformers layout.

    ``raw`` gives ``original/``-named tensors as raw bits (BF16 as uint16, MXFP4 parts as uint8)
    in the ``original/`` layout; ``experts`` is ``"mxfp4"`` or ``"bf16"`` (a dense fine-tune).
    """

    path: Path
    config: ModelConfig
    config_path: Path
    experts: str

    @property
    def repo_root(self) -> Path:
        """The folder holding ``tokenizer.json`` and the chat template."""

    @property
    def files(self) -> list:
        """The safetensors files read (each with a ``path``)."""

    @property
    def tensor_bytes(self) -> int: ...

    def raw(self, name: str) -> np.ndarray: ...

    def chunks(self, name: str, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
        """``raw(name)`` in pieces along its first axis, each unmapped once the caller moves on."""

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None: ...

    def release(self, name: str) -> None: ...

    def scan(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Read every byte; problems (NaN/Inf, scale 255) naming file and tensor."""

    def close(self) -> None: ...
