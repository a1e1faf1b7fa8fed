"""gpt-oss GGUF files (ours, ggml-org's, unsloth's, ...) read back as canonical tensors.

``GgufModel(path)`` opens a file, or every shard of a llama.cpp split
(``name-00001-of-00003.gguf``), with gguf-py's memory-mapped ``GGUFReader`` and presents it
through the ``CanonicalModel`` interface: ``original/`` names and layout, q/k/v re-fused
into ``attn.qkv``, gate/up re-interleaved into ``mlp1``. Any tensor type gguf-py can dequantize
(F32, F16, BF16, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4, ...) comes back as float32; MXFP4 experts also
come back as the exact OpenAI blocks and scales (``mxfp4``), the inverse of the converter's
repack. The config is rebuilt from the ``gpt-oss.*`` keys, so a wrong key shows as a config
difference in ``verify``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from .original import ModelConfig, Mxfp4Pair

ARCH = "gpt-oss"
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _gguf():
    import gguf

    return gguf


def shard_paths(path: str | Path) -> list[Path]:
    """All files of a split GGUF given any one of them (a plain file is its own list)."""
    path = Path(path)
    match = _SPLIT.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    paths = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"split GGUF is missing shards {missing}", file=path)
    return paths


def _open_reader(path: Path):
    g = _gguf()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot open: {exc}", file=path) from exc
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise InputError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')", file=path)
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
    return reader


# Counts no real file comes near (a 120b GGUF: ~700 tensors, ~50 keys, 201k tokens, 446k merges).
# gguf-py parses element by element in Python (~25 us each): a corrupt count must be refused
# before it, or a 65 GB file becomes hours of "parsing".
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 22
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_header_bounds(path: Path) -> None:
    """Walk the GGUF header (keys, values, tensor infos) checking every count and length against
    the file and the caps above, so that gguf-py only ever parses a header of sane size."""
    import mmap
    import struct

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
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

        def value(kind: int, at: int, depth: int = 0) -> int:
            if kind in _SCALAR_SIZES:
                return take(f"{_SCALAR_SIZES[kind]}s", at)[1]
            if kind == _STRING:
                return string(at)
            if kind != _ARRAY or depth > 1:
                raise InputError(f"unknown GGUF value type {kind} at byte {at}", file=path)
            (item, count), at = take("IQ", at)
            if count > MAX_ARRAY:
                raise InputError(f"array of {count} elements at byte {at} (more than {MAX_ARRAY}: corrupt?)", file=path)
            if item in _SCALAR_SIZES:
                end = at + count * _SCALAR_SIZES[item]
                if end > size:
                    raise InputError(f"array of {count} values at byte {at} runs past the end of the file", file=path)
                return end
            for _ in range(count):
                at = value(item, at, depth + 1)
            return at

        (version,), at = take("I", 4)
        if version & 0xFFFF == 0:  # written on a big-endian machine; gguf-py reads those too
            order = ">"
        (tensors, kvs), at = take("QQ", 8)
        if kvs > MAX_KV or tensors > MAX_TENSORS:
            raise InputError(f"header claims {kvs} keys and {tensors} tensors (corrupt?)", file=path)
        for _ in range(kvs):
            at = string(at)
            (kind,), at = take("I", at)
            at = value(kind, at)
        for _ in range(tensors):
            at = string(at)
            (dims,), at = take("I", at)
            if dims > MAX_DIMS:
                raise InputError(f"tensor info at byte {at} has {dims} dimensions (at most {MAX_DIMS})", file=path)
            at = take(f"{dims}Q", at)[1]
            at = take("IQ", at)[1]


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

    def _key(self, suffix: str, default=None):
        value = self.value(f"{ARCH}.{suffix}", default)
        if value is None:
            raise InputError(f"metadata key {ARCH}.{suffix} is missing (llama.cpp needs it)", file=self.path)
        return value

    def _config(self) -> ModelConfig:
        try:
            config = self._read_config()
        except (TypeError, ValueError, OverflowError) as exc:  # a key of the wrong type (a list, a string)
            raise InputError(f"gpt-oss metadata is not valid: {exc}", file=self.path) from exc
        # Every layer has tensors: a corrupt block_count of 4e9 must not drive loops over layers.
        if config.num_hidden_layers > len(self.tensors):
            raise InputError(f"{ARCH}.block_count is {config.num_hidden_layers} but the file has only "
                             f"{len(self.tensors)} tensors", file=self.path)
        config.check(self.path)
        return config

    def _read_config(self) -> ModelConfig:
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise InputError("no token_embd.weight tensor", file=self.path)
        factor = float(self._key("rope.scaling.factor", 1.0))
        config = ModelConfig(
            num_hidden_layers=int(self._key("block_count")),
            num_experts=int(self._key("expert_count")),
            experts_per_token=int(self._key("expert_used_count")),
            vocab_size=int(embd.shape[1]),
            hidden_size=int(self._key("embedding_length")),
            intermediate_size=int(self._key("expert_feed_forward_length")),
            swiglu_limit=7.0,  # llama.cpp hard-codes it; there is no key
            head_dim=int(self._key("attention.key_length")),
            num_attention_heads=int(self._key("attention.head_count")),
            num_key_value_heads=int(self._key("attention.head_count_kv")),
            sliding_window=int(self._key("attention.sliding_window")),
            initial_context_length=int(self._key("rope.scaling.original_context_length",
                                                 self._key("context_length"))),
            rope_theta=_integral(float(self._key("rope.freq_base"))),
            rope_scaling_factor=factor,
            rope_ntk_alpha=_integral(float(self._key("rope.scaling.yarn_beta_slow", 1.0))),
            rope_ntk_beta=_integral(float(self._key("rope.scaling.yarn_beta_fast", 32.0))),
        )
        return config

    # -- tensors ------------------------------------------------------------------------

    def tensor(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError("tensor missing from the GGUF", file=self.path, tensor=name) from None

    def dequantize(self, name: str) -> np.ndarray:
        """A GGUF tensor as float32 in numpy order (reversed ggml ``ne``)."""
        g = _gguf()
        t = self.tensor(name)
        try:
            values = g.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise InputError(f"gguf-py cannot dequantize type {t.tensor_type.name}", file=self.path, tensor=name) from exc
        return np.asarray(values, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))

    def _gguf_names(self, name: str) -> list[str]:
        """The GGUF tensors holding canonical tensor ``name`` (several when split or fused)."""
        if name == "embedding.weight":
            return ["token_embd.weight"]
        if name == "unembedding.weight":
            return ["output.weight" if "output.weight" in self.tensors else "token_embd.weight"]
        if name == "norm.scale":
            return ["output_norm.weight"]
        _, n, rest = name.split(".", 2)
        p = f"blk.{n}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            if p + f"attn_qkv.{kind}" in self.tensors:
                return [p + f"attn_qkv.{kind}"]
            return [p + f"attn_{x}.{kind}" for x in "qkv"]
        if rest.startswith("mlp.mlp1_"):
            kind = "weight" if rest.endswith("weight") else "bias"
            if p + f"ffn_gate_up_exps.{kind}" in self.tensors:
                return [p + f"ffn_gate_up_exps.{kind}"]
            return [p + f"ffn_gate_exps.{kind}", p + f"ffn_up_exps.{kind}"]
        simple = {
            "attn.norm.scale": "attn_norm.weight",
            "attn.sinks": "attn_sinks.weight",
            "attn.out.weight": "attn_output.weight",
            "attn.out.bias": "attn_output.bias",
            "mlp.norm.scale": "post_attention_norm.weight",
            "mlp.gate.weight": "ffn_gate_inp.weight",
            "mlp.gate.bias": "ffn_gate_inp.bias",
            "mlp.mlp2_weight": "ffn_down_exps.weight",
            "mlp.mlp2_bias": "ffn_down_exps.bias",
        }
        if rest not in simple:
            raise InputError("not a canonical gpt-oss tensor name", file=self.path, tensor=name)
        return [p + simple[rest]]

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
            return _interleave(gate, up, axis=1)
        if len(parts) == 3:  # q, k, v
            return np.concatenate([self.dequantize(p) for p in parts], axis=0)
        return self.dequantize(parts[0])

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        """Exact OpenAI blocks/scales when the expert tensors are MXFP4, else ``None``."""
        from ..converters.gguf import ggml_to_openai

        parts = self._gguf_names(f"block.{layer}.mlp.{which}_weight")
        g = _gguf()
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
        return Mxfp4Pair(_interleave(gb, ub, axis=1), _interleave(gs, us, axis=1))

    def storage(self, name: str) -> str:
        """The ggml type name(s) of the tensor(s) holding ``name`` ("BF16", "MXFP4", "Q4_K+Q6_K", ...)."""
        kinds = []
        for part in self._gguf_names(name):
            kind = self.tensor(part).tensor_type.name
            if kind not in kinds:
                kinds.append(kind)
        return "+".join(kinds)

    # -- summaries ----------------------------------------------------------------------

    def bytes_by_type(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for t in self.tensors.values():
            totals[t.tensor_type.name] = totals.get(t.tensor_type.name, 0) + int(t.n_bytes)
        return dict(sorted(totals.items()))

    def experts_mxfp4(self) -> bool:
        return all(self.mxfp4_type(n, which) for n in range(self.config.num_hidden_layers) for which in ("mlp1", "mlp2"))

    def mxfp4_type(self, layer: int, which: str) -> bool:
        g = _gguf()
        try:
            names = self._gguf_names(f"block.{layer}.mlp.{which}_weight")
            return all(self.tensor(p).tensor_type == g.GGMLQuantizationType.MXFP4 for p in names)
        except InputError:
            return False

    def problems(self) -> list[str]:
        """Structural checks: every tensor llama.cpp's gpt-oss loader requires, with its shape."""
        out = []
        for name, shape in expected_shapes(self.config).items():
            t = self.tensors.get(name)
            if t is None:
                if name.startswith("output.") or "attn_q" in name or "attn_k" in name or "attn_v" in name:
                    alt = {"output.weight": "token_embd.weight"}.get(name) or re.sub(r"attn_[qkv]\.", "attn_qkv.", name)
                    if alt in self.tensors:
                        continue
                out.append(f"tensor {name!r} is missing")
                continue
            got = tuple(int(s) for s in t.shape)
            if got != shape:
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
        g = _gguf()
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


def _interleave(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Rows of ``a`` at even and of ``b`` at odd positions along ``axis``."""
    shape = list(a.shape)
    shape[axis] *= 2
    out = np.empty(shape, dtype=a.dtype)
    even = [slice(None)] * a.ndim
    odd = [slice(None)] * a.ndim
    even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
    out[tuple(even)] = a
    out[tuple(odd)] = b
    return out


def _integral(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> ggml ``ne`` that ``llama_model_openai_moe::load_arch_tensors`` requires."""
    c = config
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"token_embd.weight": (H, V), "output_norm.weight": (H,), "output.weight": (H, V)}
    for n in range(c.num_hidden_layers):
        p = f"blk.{n}."
        shapes.update({
            p + "attn_norm.weight": (H,), p + "post_attention_norm.weight": (H,),
            p + "attn_q.weight": (H, q), p + "attn_k.weight": (H, kv), p + "attn_v.weight": (H, kv),
            p + "attn_output.weight": (q, H), p + "attn_output.bias": (H,),
            p + "attn_sinks.weight": (c.num_attention_heads,),
            p + "ffn_gate_inp.weight": (H, E), p + "ffn_gate_inp.bias": (E,),
            p + "ffn_gate_exps.weight": (H, I, E), p + "ffn_gate_exps.bias": (I, E),
            p + "ffn_up_exps.weight": (H, I, E), p + "ffn_up_exps.bias": (I, E),
            p + "ffn_down_exps.weight": (I, H, E), p + "ffn_down_exps.bias": (H, E),
        })
    return shapes


# --------------------------------------------------------------------------------------
# The artifact interface (see ``oss_convert/artifacts.py``)


def open_canonical(path: str | Path) -> GgufModel:
    return GgufModel(path)


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """Summary for ``inspect``: metadata, tensor count, bytes by ggml type, expert storage, checks."""
    with GgufModel(path) as model:
        merges = model.fields.get("tokenizer.ggml.merges")
        tokens = model.fields.get("tokenizer.ggml.tokens")
        file_type = model.value("general.file_type")
        g = _gguf()
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
