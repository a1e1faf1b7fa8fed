"""GGUF LoRA adapters, as llama.cpp's ``convert_lora_to_gguf.py`` writes them and
``llama_adapter_lora_init`` reads them: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and a ``<tensor>.lora_a`` / ``<tensor>.lora_b`` pair per base tensor
under llama.cpp's own names (``formats/gguf.gguf_names``).

llama.cpp computes ``scale * B @ (A @ x)`` with ``scale = alpha / rank`` (``rank``: B's ``ne[0]``)
and, for the experts, the same per expert through ``mul_mat_id``. So:

- a linear pair is ``lora_a`` ne ``[in, r]`` and ``lora_b`` ne ``[r, out]`` (numpy ``(r, in)`` and
  ``(out, r)``, our canonical factors); an expert pair is ``[in, r, E]`` / ``[r, out, E]`` (numpy
  ``(E, r, in)`` / ``(E, out, r)``);
- q, k and v are separate base tensors, and so are gate and up (the even and odd rows of
  ``mlp1``): a pair on all of ``qkv`` or of ``mlp1`` is split by B's rows, A shared;
- several pairs on one base tensor are one pair of their ranks stacked (``[B1 B2] [A1; A2]``);
- the adapter's scalings: one ``alpha`` when every pair has the same rank and scaling (``alpha =
  scaling * rank``, factors as they are); otherwise each scaling is folded into its B and
  ``alpha`` is 0, which llama.cpp reads as scale 1 (rslora and rank/alpha patterns included).

Factors are written as float32. Imports: base modules, ``formats.gguf``, ``formats.gguf_writer``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..lora import Adapter, part_rows, runtime_pairs
from ..model import CONFIG_LIMITS, ModelConfig
from .base import Format
from .gguf import ARCH, general_type, gguf_names


def write(adapter: Adapter, config: ModelConfig, path: Path) -> int:
    """Write ``adapter`` for a base of ``config`` as a GGUF LoRA at ``path``, one tensor in memory
    at a time; returns the tensor count."""
    from .gguf_writer import LazyTensor, gguf_py

    g = gguf_py()
    planned, uniform = runtime_pairs(adapter, config, gguf_names)
    first = adapter.pairs[0]
    alpha = float(first.scaling * first.rank) if uniform else 0.0
    writer = g.GGUFWriter(str(path), ARCH)
    writer.add_type(g.GGUFType.ADAPTER)
    writer.add_string(g.Keys.Adapter.TYPE, "lora")
    writer.add_float32(g.Keys.Adapter.LORA_ALPHA, alpha)
    for item in planned:
        for side, shape in zip(("a", "b"), item.shapes()):
            make = getattr(item, side)
            writer.add_tensor(f"{item.name}.lora_{side}", LazyTensor(shape, np.float32, lambda make=make: iter([make()])),
                              raw_dtype=g.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return 2 * len(planned)


# --------------------------------------------------------------------------------------
# Reading one back (llama.cpp's own adapters included): a ``lora.Adapter`` on canonical names


def recognises(path: Path) -> bool:
    return Path(path).is_file() and general_type(Path(path)) == "adapter"


def _canonical_parts(config: ModelConfig | None, layers: set[int]) -> dict[str, tuple[str, slice | None]]:
    """GGUF tensor -> (canonical target, the rows of it that tensor holds; ``None``: all), for
    the base's layers, or without a base (``inspect``) for the ``layers`` the file names."""
    from ..model import expected_tensors

    names: dict[str, tuple[str, slice | None]] = {}
    targets = [s.name for s in expected_tensors(config, "bf16")] if config is not None else \
        [f"block.{n}.{rest}" for n in sorted(layers) for rest in _LINEAR] + ["unembedding.weight"]
    for target in targets:
        parts = gguf_names(target)
        if not parts[0].endswith(".weight"):
            continue
        rows = part_rows(target, config) if config is not None and len(parts) > 1 else [None] * len(parts)
        for name, part in zip(parts, rows):
            names[name] = (target, part)
    return names


_LINEAR = ("attn.qkv.weight", "attn.out.weight", "mlp.gate.weight", "mlp.mlp1_weight", "mlp.mlp2_weight")
_LAYER = re.compile(r"^blk\.(\d{1,6})\.")
_FACTOR_TYPES = {0: "F32", 1: "F16", 30: "BF16"}  # ggml types a factor may have


def read(path: str | Path, base: ModelConfig | None = None) -> Adapter:
    """A GGUF LoRA (``general.type = adapter``) on canonical names: each ``<tensor>.lora_a/_b`` pair
    on the canonical tensor (and rows: q, k, v, gate, up) that the base GGUF tensor holds, with
    llama.cpp's scaling ``alpha / rank`` (1 where alpha is 0)."""
    from ..lora import LoraPair, check_rank
    from .gguf import _open_reader

    path = Path(path)
    reader = _open_reader(path)
    alpha, arch = _alpha(reader, path), _string(reader, "general.architecture")
    if arch != ARCH:
        raise InputError(f"is a LoRA for architecture {arch!r}, not {ARCH}", file=path)
    tensors = {t.name: t for t in reader.tensors}
    # without a base, only the layers the file names, and no more than any config may have
    layers = {int(m[1]) for m in map(_LAYER.match, tensors) if m}
    if layers and max(layers) >= CONFIG_LIMITS["num_hidden_layers"]:
        raise InputError(f"names layer {max(layers)}; no gpt-oss has {CONFIG_LIMITS['num_hidden_layers']} layers",
                         file=path)
    places = _canonical_parts(base, layers)
    pairs = []
    for name in sorted(n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a")):
        a_t, b_t = tensors[name + ".lora_a"], tensors.get(name + ".lora_b")
        if b_t is None:
            raise InputError("has no lora_b partner", file=path, tensor=name + ".lora_a")
        if name not in places:
            raise InputError("adapts no tensor of this base (another architecture or size?)", file=path,
                             tensor=name + ".lora_a")
        dtypes = {_FACTOR_TYPES.get(int(t.tensor_type)) for t in (a_t, b_t)}
        if None in dtypes or len(dtypes) != 1:
            raise InputError(f"factors of ggml types {int(a_t.tensor_type)}, {int(b_t.tensor_type)}; expected F32, F16 "
                             "or BF16 (both alike)", file=path, tensor=name)
        a, b = _array(a_t), _array(b_t)
        rank = a.shape[-2]
        check_rank(rank, file=path, key=name + ".lora_a")
        if b.shape[-1] != rank or a.ndim != b.ndim:
            raise InputError(f"lora_a {list(a.shape)} and lora_b {list(b.shape)} are not a pair", file=path, tensor=name)
        target, rows = places[name]
        pairs.append(LoraPair(target, a, b, dtypes.pop(), alpha / rank if alpha else 1.0, f"{path.name}: {name}",
                              name.split(".", 2)[-1].removesuffix(".weight"), rows))
    if not pairs:
        raise InputError("holds no LoRA pairs", file=path)
    adapter = Adapter("gguf-lora", path, [path], pairs, {"alpha": alpha, "architecture": arch})
    adapter.check_finite()
    return adapter


def _array(tensor) -> np.ndarray:
    """The tensor's data in numpy order (ggml ne reversed), BF16 as its raw uint16 bits (gguf-py
    hands BF16 out as bytes)."""
    data = np.asarray(tensor.data)
    if _FACTOR_TYPES[int(tensor.tensor_type)] == "BF16":
        data = np.ascontiguousarray(data).view(np.uint16)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return data.reshape(shape)


def _string(reader, key: str) -> str | None:
    from .gguf_writer import gguf_py

    field = reader.fields.get(key)
    if field is None or field.types != [gguf_py().GGUFValueType.STRING]:
        return None
    return bytes(field.parts[-1]).decode("utf-8", "replace")


def _alpha(reader, path: Path) -> float:
    """``adapter.lora.alpha``: a float32 >= 0 (0 or absent: llama.cpp's scale 1)."""
    from .gguf_writer import gguf_py

    field = reader.fields.get("adapter.lora.alpha")
    if field is None:
        return 0.0
    if field.types != [gguf_py().GGUFValueType.FLOAT32]:
        raise InputError("adapter.lora.alpha is not a float32", file=path)
    alpha = float(field.parts[-1][0])
    if not math.isfinite(alpha) or alpha < 0:
        raise InputError(f"adapter.lora.alpha is {alpha}; it must be finite and >= 0", file=path)
    return alpha


def describe(path: str | Path, *, scan: bool = False) -> dict:
    return read(path).summary()


FORMAT = Format("gguf-lora", "a GGUF LoRA adapter (llama.cpp's --lora)", recognises, describe=describe, adapter=read)
