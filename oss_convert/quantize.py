"""Encoding dense weights to MXFP4, with a choice of scale per 32-value block.

Two recipes:

- ``"ocp"``: the OCP Microscaling rule of ``formats/mxfp4.py:encode`` (the codec, its one FP4
  rounding and the OCP exponent live there; this module only chooses scales) (shared exponent
  ``floor(log2 amax) - 2``). It never clips more than to 6, but for blocks whose largest
  magnitude lies in ``[6, 8) * 2**e`` it saturates that value, and it never trades a little
  clipping for a finer grid.
- ``"search"``: for every block, try the OCP exponent and its neighbours one step up (coarser
  grid, no saturation) and one step down (finer grid, the largest values clipped to 6), and
  keep the one with the lowest squared error. The OCP exponent wins ties, so a block that the
  OCP rule reproduces exactly (every block of a decoded MXFP4 checkpoint) keeps its bytes,
  and the result is never worse than ``"ocp"`` on any block.

E8M0 scales are powers of two, so those three are the only exponents worth trying: two steps
down clips everything above 1.5x the OCP grid's top, two steps up leaves the top code unused.
Everything is whole-array numpy; callers pass one expert (or a chunk of rows) at a time.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .dtypes import bf16_to_f32
from .formats import mxfp4
from .formats.mxfp4 import SCALE_BIAS, SCALE_NAN

RECIPES = ("ocp", "search")
REPORT_FILE = "quantization.json"  # written beside an output whose experts were encoded here
# Candidate offsets from the OCP exponent, in order of preference on equal error.
_SEARCH_OFFSETS = (0, 1, -1)


def encode(values: np.ndarray, recipe: str = "ocp", tally: "ErrorTally | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``[*P, N]`` float values to MXFP4 ``(blocks, scales)`` with the given recipe;
    ``tally``: add the squared error and the values' energy to it (summed where the blocks are
    encoded, cache-hot: a second pass decoding the result took a third of a merge)."""
    if recipe in RECIPES:
        return _encode_chunked(values, _search_rows if recipe == "search" else _ocp_rows, tally)
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")


def search_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the scale among OCP, OCP+1 and OCP-1 with the least squared error.

    Errors are compared in the OCP-scaled domain: changing the exponent by ``k`` multiplies
    the values by ``2**-k`` exactly and the squared error by ``4**k`` exactly, so the
    comparison is the same as on the original values, and exact blocks (error 0) stay OCP.
    Each candidate's codes are kept (``mxfp4.codes_under``, from the float bits) rather than
    recomputed for the winner.
    """
    return _encode_chunked(values, _search_rows)


def _encode_chunked(values: np.ndarray, encode_rows, tally: "ErrorTally | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """``encode_rows`` (-> codes, shared exponents, squared error per block in the OCP-scaled
    domain, and those exponents) over chunks of rows, so the temporaries stay in cache, on every
    core for a large tensor (numpy releases the GIL)."""
    x = mxfp4.as_blocks(values)
    flat = x.reshape(-1, *x.shape[-2:])
    codes = np.empty(flat.shape, dtype=np.uint8)
    shared = np.empty(flat.shape[:-1], dtype=np.int32)
    starts = range(0, flat.shape[0], _SEARCH_ROWS)
    sums = np.zeros((len(starts), 2))  # per chunk: squared error, energy

    def rows(i: int) -> None:
        part = slice(starts[i], starts[i] + _SEARCH_ROWS)
        codes[part], shared[part], error, scaled = encode_rows(flat[part], tally is not None)
        if tally is not None:
            sums[i] = np.ldexp(error, 2 * scaled).sum(), np.square(flat[part], dtype=np.float64).sum()

    if flat.size >= _PARALLEL_VALUES:  # numpy releases the GIL: the row chunks run on every core
        list(_pool().map(rows, range(len(starts))))
    else:
        for i in range(len(starts)):
            rows(i)
    if tally is not None:
        tally.add_sums(float(sums[:, 0].sum()), float(sums[:, 1].sum()), flat.size)
    blocks = mxfp4.pack_codes(codes).reshape(*x.shape[:-1], mxfp4.BLOCK // 2)
    return blocks, (shared + SCALE_BIAS).astype(np.uint8).reshape(x.shape[:-1])


_SEARCH_ROWS = 64  # rows of [G, 32] blocks per pass: 64 x 2880 values, 720 KiB
_PARALLEL_VALUES = 1 << 20
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="mxfp4-search"))
    return _POOL[0]


def _ocp_rows(x: np.ndarray, with_error: bool):
    shared = mxfp4.ocp_exponents(x)
    codes = mxfp4.codes_under(x, shared)
    return codes, shared, _sq_error(x, codes, shared) if with_error else None, shared


def _search_rows(x: np.ndarray, with_error: bool = False):
    ocp = mxfp4.ocp_exponents(x)
    parts = mxfp4.float_parts(x)  # the bits every candidate's codes are read from
    best_codes = mxfp4.codes_under(x, ocp, parts)
    best_error = _sq_error(x, best_codes, ocp)
    best_shared = ocp
    for offset in _SEARCH_OFFSETS[1:]:
        shared = ocp + offset
        codes = mxfp4.codes_under(x, shared, parts)
        error = _sq_error(x, codes, shared) * 4.0 ** offset
        allowed = (shared >= -SCALE_BIAS) & (shared <= SCALE_NAN - 1 - SCALE_BIAS)
        better = allowed & (error < best_error)  # strict: the OCP scale keeps every tie
        if better.any():
            best_error = np.where(better, error, best_error)
            best_shared = np.where(better, shared, best_shared)
            best_codes = np.where(better[..., None], codes, best_codes)
    return best_codes, best_shared, best_error, ocp


def _sq_error(x: np.ndarray, codes: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """Squared rounding error per block in the domain scaled by ``2**-shared`` (where the codes'
    values live), summed in float64: ``sum((x * 2**-s - FP4[code])**2)``."""
    diff = np.ldexp(x, -shared[..., None]) if shared.min() < -126 else x * np.ldexp(np.float32(1), -shared)[..., None]
    diff -= mxfp4.FP4_VALUES[codes]
    return np.square(diff, dtype=np.float64).sum(axis=-1)


# --------------------------------------------------------------------------------------
# Error bookkeeping


TALLY_VALUES = 1 << 18  # values tallied at once (2 MiB in float64)


def sum_of_squares(values: np.ndarray) -> float:
    """Sum of squares in float64, a cache-sized piece at a time (no float64 copy of the whole),
    the pieces on every core for a large array."""
    flat = np.asarray(values).reshape(-1)

    def piece(start: int) -> float:
        return float(np.square(flat[start:start + TALLY_VALUES], dtype=np.float64).sum())

    starts = range(0, flat.size, TALLY_VALUES)
    return float(sum(_pool().map(piece, starts) if flat.size >= _PARALLEL_VALUES else map(piece, starts)))


@dataclass
class ErrorTally:
    """Squared error and signal energy summed over one or more tensors."""

    sq_error: float = 0.0
    energy: float = 0.0
    count: int = 0

    def add(self, original: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> None:
        # a few hundred rows at a time: float64 copies of a whole 120b expert would be 130 MB each
        rows = np.asarray(original).reshape(-1, scales.shape[-1] * mxfp4.BLOCK)
        blocks, scales = blocks.reshape(rows.shape[0], *blocks.shape[-2:]), scales.reshape(rows.shape[0], -1)
        step = max(1, TALLY_VALUES // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            x = rows[start:start + step].astype(np.float64).ravel()
            diff = x - mxfp4.decode(blocks[start:start + step], scales[start:start + step]).ravel()
            self.sq_error += float(diff @ diff)
            self.energy += float(x @ x)
        self.count += rows.size

    def add_sums(self, sq_error: float, energy: float, count: int) -> None:
        self.sq_error += sq_error
        self.energy += energy
        self.count += count

    def merge(self, other: "ErrorTally") -> None:
        self.sq_error += other.sq_error
        self.energy += other.energy
        self.count += other.count

    @property
    def mse(self) -> float:
        return self.sq_error / self.count if self.count else 0.0

    @property
    def relative_mse(self) -> float:
        """Squared error over signal energy (0 = lossless); 1 would mean all signal lost."""
        return self.sq_error / self.energy if self.energy else 0.0


# --------------------------------------------------------------------------------------
# Encoding a checkpoint's experts


class ExpertEncoder:
    """Encodes a source's dense expert weights to MXFP4, expert by expert, tallying the error.

    For the targets that write MXFP4 from a fine-tune (``--to original``, ``--to hf``): ``blocks``
    yields one expert's blocks at a time and keeps the layer's scales for ``scales``, which must
    come next (the order both layouts store them in)."""

    def __init__(self, src, recipe: str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
        self.src = src
        self.recipe = recipe
        self.errors: dict[str, ErrorTally] = {}
        self._scales: np.ndarray | None = None  # the layer's scales, written after its blocks

    def blocks(self, name: str) -> Iterator[np.ndarray]:
        dense = self.src.raw(name)  # [E, rows, cols] BF16 bits (a view)
        tally = self.errors.setdefault(name, ErrorTally())
        scales = []
        # A merged adapter gives its experts unrounded (``adapters.MergedSource``): encode from those.
        unrounded = getattr(self.src, "expert_f32", None)
        for e in range(dense.shape[0]):
            values = unrounded(name, e) if unrounded else bf16_to_f32(np.ascontiguousarray(dense[e]))
            blocks, expert_scales = encode(values, self.recipe, tally)
            scales.append(expert_scales)
            yield blocks
            self.src.release(name)
        self._scales = np.stack(scales)

    def scales(self, name: str) -> Iterator[np.ndarray]:
        scales, self._scales = self._scales, None
        assert scales is not None, f"{name}: blocks must be written first"
        yield scales

    def report(self) -> dict:
        overall = ErrorTally()
        for tally in self.errors.values():
            overall.merge(tally)
        return {
            "recipe": self.recipe,
            "relative_mse": overall.relative_mse,
            "mse": overall.mse,
            "tensors": {name: {"relative_mse": t.relative_mse, "mse": t.mse} for name, t in self.errors.items()},
        }

    def write_report(self, folder: Path) -> str:
        """``folder/quantization.json`` with the error reached; returns the line to show the user."""
        report = self.report()
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return (f"experts encoded to MXFP4 ({report['recipe']}): relative MSE {report['relative_mse']:.4e} "
                f"over {len(report['tensors'])} tensors (per tensor: {REPORT_FILE} in the output)")


def encoded_or_copied(src, name: str, encoder: ExpertEncoder | None) -> Callable[[], Iterator[np.ndarray]]:
    """The producer of ``original/`` tensor ``name`` for a target that stores MXFP4 experts:
    the encoder's blocks/scales when the source is dense, else the stored bytes."""
    from .shards import copy_chunks

    if encoder is not None and name.endswith(".blocks"):
        return lambda: encoder.blocks(name.removesuffix(".blocks"))
    if encoder is not None and name.endswith(".scales"):
        return lambda: encoder.scales(name.removesuffix(".scales"))
    return copy_chunks(src, name)
