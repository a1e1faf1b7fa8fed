"""LoRA adapters in the canonical model's terms: which tensor each low-rank pair changes, and by how much.

Base layer: imports ``errors``, ``dtypes`` and ``model``. The adapter readers
(``formats/peft.py``, ``formats/mlx_adapter.py``) turn their files into ``LoraPair`` records on
canonical names (``block.3.attn.qkv.weight`` with the rows of q, k or v; ``block.3.mlp.mlp1_weight``
with one pair per expert), so the merge, the reference runner and ``inspect`` know one layout:

- a linear pair: ``a [r, in]``, ``b [out, r]``, delta ``scaling * b @ a`` (``[out, in]``, the
  canonical ``[out, in]`` orientation), added to ``rows`` of the target (``None``: all of them);
- an expert pair: ``a [E, r, in]``, ``b [E, out, r]``, one delta per expert the same way.

The factors stay the readers' memory-mapped views until a delta is asked for, and a delta is
computed in float32 for one tensor or one expert at a time: an adapter of every expert of 120b
is gigabytes, never all in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from .dtypes import bf16_to_f32, count_bf16_nonfinite
from .errors import InputError
from .model import ModelConfig, expected_tensors, iter_chunks

MAX_RANK = 4096  # larger than any published LoRA; a hostile rank would cost memory in every delta
FLOAT_DTYPES = ("F32", "BF16", "F16")


def as_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw adapter values (BF16 as uint16 bits) as float32."""
    if dtype == "BF16":
        return bf16_to_f32(np.ascontiguousarray(raw))
    return np.asarray(raw, dtype=np.float32)


NONZERO_VALUES = 1 << 22  # values of a factor tested at once: the masks stay a few MB whatever its rank


def nonzero_experts(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Per expert of a raw ``[E, rows, cols]`` factor, whether any of its values is nonzero (-0 is
    zero), in one pass over the factor, a slab of rows of every expert at a time: PEFT's rank-major
    B read expert by expert touches all of its pages for each (2 ms an expert on 20b shapes),
    while a slab of its rows is one contiguous piece of the file."""
    found = np.zeros(raw.shape[0], dtype=bool)
    step = max(1, NONZERO_VALUES // max(1, raw.shape[0] * raw.shape[2]))
    for first in range(0, raw.shape[1], step):
        slab = raw[:, first:first + step]
        values = np.bitwise_and(slab, np.uint16(0x7FFF)) if dtype == "BF16" else slab
        found |= np.any(values != 0, axis=(1, 2))
    return found


def count_nonfinite(raw: np.ndarray, dtype: str) -> int:
    """NaN/Inf values in a raw tensor, a chunk at a time (no full-size mask)."""
    if dtype == "BF16":
        return sum(count_bf16_nonfinite(piece) for piece in iter_chunks(raw))
    return sum(int(piece.size - np.count_nonzero(np.isfinite(piece))) for piece in iter_chunks(raw))


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update of one canonical tensor (see the module docstring for the shapes)."""

    target: str  # canonical name
    a: np.ndarray  # raw view: [r, in] or [E, r, in]
    b: np.ndarray  # raw view: [out, r] or [E, out, r]
    dtype: str  # of a and b: F32, BF16 or F16
    scaling: float
    key: str  # where it came from, for messages: "file: tensor key"
    module: str  # the adapter's own module name, layer left out ("self_attn.q_proj", "mlp.experts.down_proj")
    rows: slice | None = None  # rows of the target it changes (q/k/v in qkv, gate/up in mlp1)
    transposed: bool = False  # the delta is (b @ a).T (peft 0.19.0's expert orientation)
    scale_first: bool = False  # (scaling * b) @ a, mlx-lm's order (PEFT scales the product)
    # drops the factors' mapped pages once read: an adapter of every expert of 120b is GBs, and
    # touched pages of a mapping stay in RSS (the readers pass their file's release)
    release: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return self.a.shape[-2]

    @property
    def experts(self) -> int | None:
        return self.a.shape[0] if self.a.ndim == 3 else None

    @property
    def delta_shape(self) -> tuple[int, int]:
        """``(out, in)`` of one delta, in the target's orientation."""
        out, inner = self.b.shape[-2], self.a.shape[-1]
        return (inner, out) if self.transposed else (out, inner)

    def delta(self, expert: int | None = None) -> np.ndarray:
        """``scaling * b @ a`` in float32, in the order the adapter's own runtime computes it (so
        the float32 result is the same to the bit), for one expert of an expert pair."""
        a = as_f32(self.a if expert is None else self.a[expert], self.dtype)
        b = as_f32(self.b if expert is None else self.b[expert], self.dtype)
        scaling = np.float32(self.scaling)
        if self.scale_first:
            d = np.matmul(scaling * b, a)
        else:
            d = np.matmul(b, a)
            d *= scaling  # in place: the same rounding as (b @ a) * scaling, one product held
        return np.ascontiguousarray(d.T) if self.transposed else d


@dataclass(frozen=True)
class DeltaTerm:
    """One pair's factors for one expert, float32: its delta is ``scaling * b @ a`` (``(b @ a).T``
    where ``transposed``), added to ``rows`` of the target (``None``: all of them)."""

    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scaling: float
    scale_first: bool = False
    transposed: bool = False
    rows: slice | None = None

    @property
    def height(self) -> int:
        """Rows of its delta."""
        return self.a.shape[-1] if self.transposed else self.b.shape[0]

    def product_rows(self, first: int, stop: int) -> np.ndarray:
        """Rows ``first:stop`` of its delta, each value what ``LoraPair.delta`` gives there: the same
        products, in the same order (a BLAS product of fewer rows computes each value as the whole
        one does; one row would take the vector kernel, which sums differently, so two are taken)."""
        wider = stop - first == 1
        lo = first - 1 if wider and first > 0 else first
        hi = stop + 1 if wider and first == 0 else stop
        scaling = np.float32(self.scaling)
        if self.transposed:
            b, a = (scaling * self.b if self.scale_first else self.b), self.a[:, lo:hi]
            d = np.matmul(b, a).T
        else:
            b = self.b[lo:hi]
            d = np.matmul(scaling * b if self.scale_first else b, self.a)
        if not self.scale_first:
            d *= scaling
        return d[first - lo:first - lo + stop - first]


def delta_rows(terms: list[DeltaTerm], first: int, stop: int, out: np.ndarray) -> np.ndarray:
    """Rows ``first:stop`` of the summed delta of ``terms`` (one expert's) into ``out``
    (``[stop - first, cols]`` float32): the values ``Adapter.delta`` gives for those rows."""
    if len(terms) == 1 and terms[0].rows is None:
        out[...] = terms[0].product_rows(first, stop)
        return out
    out[...] = 0
    for term in terms:
        # the term's own rows i whose target row start + i * step lies in first:stop
        start, step = (term.rows.start or 0, term.rows.step or 1) if term.rows else (0, 1)
        lo = max(0, -(-(first - start) // step))
        hi = min(term.height, -(-(stop - start) // step))
        if hi > lo:
            at = start + lo * step - first
            out[at:at + (hi - lo - 1) * step + 1:step] += term.product_rows(lo, hi)
    return out


def owning_file(read: Callable[[], "Adapter"], close: Callable[[], None]) -> "Adapter":
    """The adapter ``read()`` makes from an open file, its values checked finite; it closes the
    file with the conversion (``Adapter.close``), and a refusal closes it at once."""
    try:
        adapter = read()
        adapter.check_finite()
    except BaseException:  # a refused adapter's file closes now, not at the next garbage collection
        close()
        raise
    adapter.closers.append(close)
    return adapter


@dataclass
class Adapter:
    """A LoRA adapter read from disk: its pairs on canonical names, and what describes it."""

    format: str  # "peft" or "mlx-lm"
    path: Path  # the adapter folder
    files: list[Path]  # every file it is made of (hashed into the manifest)
    pairs: list[LoraPair]
    info: dict = field(default_factory=dict)  # format-specific facts for inspect (version, targets, ...)
    # whole base weights the adapter carries (PEFT saves a targeted lm_head's): canonical name ->
    # (raw, dtype, key); they must equal the base's, or the adapter was made for another base
    saved_weights: dict = field(default_factory=dict)
    # what closes the files the pairs' views map (their pages stay valid while a view is held)
    closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Close the adapter's open files (a conversion's end; without it they waited for the
        garbage collector, a ResourceWarning under ``python -X dev``)."""
        for close in self.closers:
            close()
        self.closers = []

    @cached_property
    def by_target(self) -> dict[str, list[LoraPair]]:
        out: dict[str, list[LoraPair]] = {}
        for pair in self.pairs:
            out.setdefault(pair.target, []).append(pair)
        return out

    def touches(self, name: str) -> bool:
        return name in self.by_target

    def delta(self, name: str, shape: tuple[int, ...], expert: int | None = None,
              zero_is_none: bool = True) -> np.ndarray | None:
        """The summed float32 delta of ``name`` (one expert of an expert weight), ``None`` if untouched
        or (``zero_is_none``) exactly zero. A merge makes the same values a chunk of rows at a time
        (``terms``, ``delta_rows``)."""
        pairs = self.by_target.get(name)
        if not pairs:
            return None
        if len(pairs) == 1 and pairs[0].rows is None:  # the common case: no sum to hold beside it
            only = pairs[0].delta(expert)
            pairs[0].release()
            return only if not zero_is_none or only.any() else None
        total = np.zeros(shape[-2:] if expert is not None else shape, dtype=np.float32)
        for pair in pairs:
            part = pair.delta(expert)
            pair.release()
            if pair.rows is None:
                total += part
            else:
                total[pair.rows] += part
        return total if not zero_is_none or total.any() else None

    def terms(self, name: str, expert: int | None = None) -> list["DeltaTerm"]:
        """The factors of ``name`` (one expert's, of an expert weight) in float32, one ``DeltaTerm``
        per pair (in the order ``delta`` sums them): what a merge computes the delta from a chunk of
        rows at a time (``delta_rows``), where a whole expert's delta would be 66 MB written and
        read back."""
        return [DeltaTerm(as_f32(p.a if expert is None else p.a[expert], p.dtype),
                          as_f32(p.b if expert is None else p.b[expert], p.dtype), float(p.scaling),
                          p.scale_first, p.transposed, p.rows) for p in self.by_target.get(name, [])]

    def expert_factor_values(self, name: str) -> int:
        """How many float32 values ``terms(name, e)`` holds (the same for every expert)."""
        return sum(int(np.prod(p.a.shape[-2:])) + int(np.prod(p.b.shape[-2:])) for p in self.by_target.get(name, []))

    def release(self, name: str) -> None:
        """Drop the mapped pages of ``name``'s factors (after its last expert's ``terms``)."""
        for pair in self.by_target.get(name, []):
            pair.release()

    def touched_experts(self, name: str, num_experts: int) -> tuple[int, ...]:
        """Experts of expert weight ``name`` whose factors are not zero on either side (cheap: no
        product). The merge still copies an expert whose summed delta comes out exactly zero."""
        cache = self.__dict__.setdefault("_touched", {})
        if name not in cache:
            pairs = self.by_target.get(name, [])
            touched = np.zeros(num_experts, dtype=bool)
            for pair in pairs:
                touched |= nonzero_experts(pair.a, pair.dtype) & nonzero_experts(pair.b, pair.dtype)
            cache[name] = tuple(int(e) for e in np.flatnonzero(touched))
            for pair in pairs:
                pair.release()
        return cache[name]

    # -- validation ---------------------------------------------------------------------

    def check_finite(self) -> None:
        """Refuse NaN/Inf in any factor (it would poison every merged value it touches)."""
        for pair in self.pairs:
            for side, raw in (("A", pair.a), ("B", pair.b)):
                bad = count_nonfinite(raw, pair.dtype)
                pair.release()
                if bad:
                    raise InputError(f"{bad} NaN/Inf values in the lora_{side} factor", file=self.path, tensor=pair.key)

    def check_against(self, config: ModelConfig) -> None:
        """Every pair must fit a tensor of the base: layers, experts, rows and columns (the silent
        loss other tools have is an adapter key that matches nothing)."""
        shapes = {s.name: s.shape for s in expected_tensors(config, "bf16")}
        for pair in self.pairs:
            shape = shapes.get(pair.target)
            if shape is None:
                raise InputError(f"changes {pair.target}, which this base (of {config.num_hidden_layers} layers) "
                                 "does not have", file=self.path, tensor=pair.key)
            if (pair.experts is not None) != (len(shape) == 3):
                raise InputError(f"is {'an expert' if pair.experts else 'a linear'} pair but {pair.target} is not",
                                 file=self.path, tensor=pair.key)
            if pair.experts is not None and pair.experts != shape[0]:
                raise InputError(f"has {pair.experts} experts but the base has {shape[0]} in {pair.target}",
                                 file=self.path, tensor=pair.key)
            rows = shape[-2] if pair.rows is None else len(range(*pair.rows.indices(shape[-2])))
            if pair.delta_shape != (rows, shape[-1]):
                raise InputError(f"makes a [{pair.delta_shape[0]}, {pair.delta_shape[1]}] delta but {pair.target} "
                                 f"needs [{rows}, {shape[-1]}] there", file=self.path, tensor=pair.key)

    def check_saved_weights(self, base_values) -> None:
        """Every whole weight the adapter carries must be the base's (``base_values(name)`` gives
        the base's float32 rows in pieces): a runtime loading the adapter would put it back."""
        for name, (raw, dtype, key) in self.saved_weights.items():
            start = 0
            for piece in iter_chunks(raw):
                theirs = base_values(name, slice(start, start + piece.shape[0]))
                if theirs.shape != piece.shape or not np.array_equal(as_f32(piece, dtype), theirs):
                    raise InputError(f"carries its own {name} (rows {start}..{start + piece.shape[0]}) that is not "
                                     "the base's: the adapter was made for another base (a resized vocabulary?)",
                                     file=self.path, tensor=key)
                start += piece.shape[0]

    def summary(self) -> dict:
        """``inspect``'s description: per target module, rank and scaling; layers and experts touched."""
        modules: dict[str, dict] = {}
        layers = set()
        for pair in self.pairs:
            module = pair.module
            entry = modules.setdefault(module, {"ranks": set(), "scalings": set(), "layers": set(), "dtype": pair.dtype})
            entry["ranks"].add(pair.rank)
            entry["scalings"].add(round(pair.scaling, 6))
            if pair.target.startswith("block."):
                layer = int(pair.target.split(".")[1])
                entry["layers"].add(layer)
                layers.add(layer)
                if pair.experts is not None:  # which experts the pair changes (both factors nonzero)
                    entry.setdefault("experts", {})[str(layer)] = [
                        e for e in range(pair.experts)
                        if np.any(as_f32(pair.a[e], pair.dtype)) and np.any(as_f32(pair.b[e], pair.dtype))]
        return {
            "format": self.format,
            "files": [f.name for f in self.files],
            "pairs": len(self.pairs),
            "layers": sorted(layers),
            "modules": {m: {"rank": sorted(e["ranks"]), "scaling": sorted(e["scalings"]), "layers": sorted(e["layers"]),
                            "dtype": e["dtype"], **({"experts": e["experts"]} if "experts" in e else {})}
                        for m, e in sorted(modules.items())},
            "parameters": sum(p.a.size + p.b.size for p in self.pairs),
            **self.info,
        }


def check_rank(rank: int, *, file: Path, key: str) -> None:
    if not 0 < rank <= MAX_RANK:
        raise InputError(f"rank {rank} is outside 1..{MAX_RANK}", file=file, tensor=key)


# --------------------------------------------------------------------------------------
# Unmerged, as a runtime applies it


@dataclass
class RuntimePair:
    """One unmerged LoRA pair of a runtime: the runtime's tensor it changes and the adapter's pairs
    that make it, each with the rows of its B that belong to that tensor (``None``: all)."""

    name: str  # the runtime's tensor, e.g. blk.3.ffn_gate_exps.weight
    parts: list[tuple[LoraPair, slice | None]]
    fold: bool  # each pair's scaling multiplied into its B

    def a(self) -> np.ndarray:
        """``(r, in)`` or ``(E, r, in)``: the pairs' A stacked along the rank."""
        return np.concatenate([_side(pair, "a") for pair, _ in self.parts], axis=-2)

    def b(self) -> np.ndarray:
        """``(out, r)`` or ``(E, out, r)``: the pairs' B (their rows of this tensor) side by side."""
        pieces = []
        for pair, rows in self.parts:
            b = _side(pair, "b")
            b = b if rows is None else b[..., rows, :]
            pieces.append(b * np.float32(pair.scaling) if self.fold else b)
        return np.ascontiguousarray(np.concatenate(pieces, axis=-1))

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        first, rows = self.parts[0]
        a, b = _shape(first, "a"), _shape(first, "b")
        rank = sum(_shape(pair, "a")[-2] for pair, _ in self.parts)
        out = b[-2] if rows is None else len(range(b[-2])[rows])
        return (*a[:-2], rank, a[-1]), (*b[:-2], out, rank)


def part_rows(target: str, config: ModelConfig) -> list[slice]:
    """The rows of canonical ``target`` that each of a runtime's tensors of it holds (q, k, v; gate, up)."""
    if target.endswith("attn.qkv.weight"):
        return list(config.qkv_slices)
    if target.endswith("mlp.mlp1_weight"):
        return [slice(0, None, 2), slice(1, None, 2)]
    return [slice(None)]


def _side(pair: LoraPair, side: str) -> np.ndarray:
    """Factor ``a`` or ``b`` in float32, such that ``b @ a`` is the unscaled delta in the target's
    orientation (peft 0.19.0's inverted experts: delta = (b @ a).T = a.T @ b.T)."""
    if pair.transposed:
        raw = pair.b if side == "a" else pair.a
        value = np.swapaxes(as_f32(raw, pair.dtype), -1, -2)
    else:
        value = as_f32(pair.a if side == "a" else pair.b, pair.dtype)
    pair.release()
    return np.ascontiguousarray(value)


def _shape(pair: LoraPair, side: str) -> tuple[int, ...]:
    raw = (pair.b if side == "a" else pair.a) if pair.transposed else (pair.a if side == "a" else pair.b)
    shape = tuple(raw.shape)
    return (*shape[:-2], shape[-1], shape[-2]) if pair.transposed else shape


def runtime_pairs(adapter: "Adapter", config: ModelConfig,
                  names_of: Callable[[str], list[str]]) -> tuple[list[RuntimePair], bool]:
    """The adapter as a runtime's unmerged pairs (llama.cpp's, mlx-lm's), sorted by name, and
    whether every pair kept its own scaling (all of one rank and scaling, none stacked: the
    runtime's single alpha or scale says it); otherwise each scaling is folded into its B.

    ``names_of(target)``: the runtime's tensors of canonical ``target``, in ``part_rows`` order
    (q, k, v; gate, up). A pair on all of ``qkv`` or ``mlp1`` is split by B's rows, A shared;
    several pairs on one runtime tensor are one pair of their ranks stacked (``[B1 B2] [A1; A2]``)."""
    parts: dict[str, list[tuple[LoraPair, slice | None]]] = {}
    for pair in adapter.pairs:
        names, rows = names_of(pair.target), part_rows(pair.target, config)
        if pair.rows is None:
            for name, part in zip(names, rows):
                parts.setdefault(name, []).append((pair, part if len(names) > 1 else None))
            continue
        total = sum(config.qkv_rows) if pair.target.endswith("qkv.weight") else 2 * config.intermediate_size
        matches = [name for name, part in zip(names, rows) if range(total)[part] == range(total)[pair.rows]]
        if len(matches) != 1:
            raise InputError(f"changes rows {pair.rows} of {pair.target}, which no one runtime tensor holds",
                             file=adapter.path, tensor=pair.key)
        parts.setdefault(matches[0], []).append((pair, None))
    uniform = len({(p.rank, p.scaling) for p in adapter.pairs}) == 1 and all(len(v) == 1 for v in parts.values())
    return [RuntimePair(name, entries, fold=not uniform) for name, entries in sorted(parts.items())], uniform
