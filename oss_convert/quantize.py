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
import threading
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
        return _encode_chunked(values, recipe == "search", tally)
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")


def search_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the scale among OCP, OCP+1 and OCP-1 with the least squared error (the module
    docstring; ``_move_scales`` says how it is decided exactly, without trying every candidate)."""
    return _encode_chunked(values, True)


def _encode_chunked(values: np.ndarray, search: bool, tally: "ErrorTally | None" = None) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float32)
    if values.shape[-1] % mxfp4.BLOCK:
        raise ValueError(f"last dimension {values.shape[-1]} is not a multiple of {mxfp4.BLOCK}")
    matrix = values.reshape(-1, values.shape[-1])
    blocks, scales = encode_made(matrix.shape, lambda rows, out: matrix[rows], search, tally)
    groups = values.shape[:-1] + (values.shape[-1] // mxfp4.BLOCK,)
    return blocks.reshape(*groups, mxfp4.BLOCK // 2), scales.reshape(groups)


def encode_made(shape: tuple[int, int], make: Callable[[slice, np.ndarray], np.ndarray], search: bool,
                tally: "ErrorTally | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 ``(blocks [rows, G, 16], scales [rows, G])`` of a ``[rows, cols]`` float32 matrix that
    ``make(rows, out)`` produces a chunk of rows at a time (into ``out``, a scratch array of the
    chunk's shape it may use, or returned as a view), so a merge decodes, adds its delta and
    encodes each chunk while it is in cache. The chunks run on every core (numpy releases the
    GIL); their rows are fixed by the shape alone, so the bytes never depend on the core count."""
    rows, cols = shape
    if cols % mxfp4.BLOCK:
        raise ValueError(f"last dimension {cols} is not a multiple of {mxfp4.BLOCK}")
    groups = cols // mxfp4.BLOCK
    blocks = np.empty((rows, groups, mxfp4.BLOCK // 2), dtype=np.uint8)
    scales = np.empty((rows, groups), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // cols)
    starts = range(0, rows, step)
    sums = np.zeros((len(starts), 2))  # per chunk: squared error, energy
    scratch = threading.local()

    def chunk(i: int) -> None:
        part = slice(starts[i], min(starts[i] + step, rows))
        out = getattr(scratch, "out", None)
        if out is None or out.shape[0] < step or out.shape[1] != cols:
            out = scratch.out = np.empty((step, cols), dtype=np.float32)
        values = np.ascontiguousarray(make(part, out[:part.stop - part.start]), dtype=np.float32)
        x = values.reshape(-1, groups, mxfp4.BLOCK)
        codes, shared, error = _encode_rows(x, search, tally is not None)
        blocks[part] = mxfp4.pack_codes(codes)
        scales[part] = shared + SCALE_BIAS
        if tally is not None:
            sums[i] = error, np.square(values, dtype=np.float64).sum()

    map_in_order(chunk, range(len(starts)), rows * cols)  # the row chunks on every core
    if tally is not None:
        tally.add_sums(float(sums[:, 0].sum()), float(sums[:, 1].sum()), rows * cols)
    return blocks, scales


CHUNK_VALUES = 1 << 17  # values per chunk (512 KiB of float32): its keys, indices and codes stay in cache
_PARALLEL_VALUES = 1 << 20
_POOL: list[ThreadPoolExecutor] = []


def map_in_order(function: Callable, items, values: int) -> list:
    """``function`` of each item, in order; on the encoder's threads where the work covers at
    least ``_PARALLEL_VALUES`` values (numpy releases the GIL), else on this one."""
    return list(_pool().map(function, items) if _parallel(values) else map(function, items))


def _parallel(values: int) -> bool:
    """Work of ``values`` values goes to the pool: large enough, and not asked for by one of the
    pool's own threads (which would wait for threads that may all be waiting likewise)."""
    return values >= _PARALLEL_VALUES and not threading.current_thread().name.startswith(_POOL_THREADS)


_POOL_THREADS = "mxfp4-encode"


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)), thread_name_prefix=_POOL_THREADS))
    return _POOL[0]


def _encode_rows(x: np.ndarray, search: bool, with_error: bool):
    """Codes, shared exponents and (``with_error``) the blocks' summed squared error, for float32
    blocks ``x [R, G, 32]``: the OCP exponent, moved by the search where that lowers the error,
    the codes read off the bit table. Blocks of tiny or huge values, which the table does not
    serve, take ``_definition_rows``."""
    keys = mxfp4.bit_keys(x)
    if (keys.top >= 0xFF0).any():  # exponent field 255
        raise ValueError("cannot encode NaN or infinity to MXFP4")
    ocp = keys.ocp_exponents
    served = (ocp >= _TABLE_OCP[0]) & (ocp <= _TABLE_OCP[1])
    index = mxfp4.table_index(keys.keys, ocp)
    shared = ocp.copy()
    if search:
        _move_scales(x, keys.top, served, ocp, index, shared)
    codes = mxfp4.table_codes(index)
    others = np.nonzero(~served)
    if not others[0].size:
        return codes, shared, _table_error(x, index, shared) if with_error else None
    codes[others], shared[others], others_error = _definition_rows(x[others], search)
    if not with_error:
        return codes, shared, None
    error = _table_error(x[served], index[served], shared[served])  # the rare others' summed apart
    return codes, shared, error + float(np.ldexp(others_error, 2 * shared[others]).sum())


# The OCP exponents whose blocks the table serves under it and both neighbours (``BitKeys.served``:
# the largest value scales to 4..8, so only the exponent's own range limits it).
_TABLE_OCP = (mxfp4.TABLE_SHARED[0] + 1, mxfp4.TABLE_SHARED[1] - 1)


# The search's two candidates as lookups on the OCP table index: (offset, index step, G_k - G_0,
# G_k**2 - G_0**2), with G the magnitude a value rounds to in the OCP-scaled domain (``_move_scales``).
def _candidate_tables(offset: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(8192)
    field = (index >> 4) & 0xFF
    base = np.abs(mxfp4.table_values(index)).astype(np.float64)
    moved = np.clip(index - 16 * offset, 0, 8191)
    value = np.abs(mxfp4.table_values(moved)).astype(np.float64) * 2.0 ** offset
    value = np.where((field - offset >= 0) & (field - offset <= 255), value, 0.0)  # off the table: tiny
    return value - base, value ** 2 - base ** 2


_CANDIDATES = {offset: _candidate_tables(offset) for offset in (1, -1)}


def _move_scales(x: np.ndarray, top: np.ndarray, served: np.ndarray, ocp: np.ndarray, index: np.ndarray,
                 shared: np.ndarray) -> None:
    """The search, deciding each block exactly from two facts about the grids, in place on
    ``index`` and ``shared``.

    In the OCP-scaled domain (``y = x / 2**ocp``, largest ``|y|`` in ``[4, 8)``) the candidates
    round ``|y|`` to G0 (0, .5, 1, 1.5, 2, 3, 4, 6), G+ (0, 1, 2, 3, 4, 6, 8, 12: one step
    coarser) or G- (0, .25, .5, .75, 1, 1.5, 2, 3: one step finer). Candidate k beats OCP iff
    ``D = sum((|y| - Gk)**2 - (|y| - G0)**2) = sum(Gk**2 - G0**2) - 2 * sum((Gk - G0) |y|) < 0``,
    and ``Gk - G0``, ``Gk**2 - G0**2`` depend only on a value's key: two lookups and one product
    per value, summed in float64, where every term is exact (a 24-bit value times a 3-bit step,
    nonzero only for ``|y|`` in ``(0.125, 8)``), so D is exact and ties keep OCP, as before.

    - G+ rounds every ``|y| < 7`` no closer than G0 (below 6 its points are G0's; from 6 to 7 both
      give 6), so it can win only where the largest ``|y|`` reaches 7: mantissa >= 1.75.
    - G- gains at most 0.0625 on each of the other 31 values (only below 1 does it differ from G0,
      by at most 0.25) and loses ``2|y| - 7`` or more on the largest (from 4 up it clips at 3),
      so it can win only where the largest ``|y|`` is below 4.47: mantissa < 1.125.

    So each block has at most one candidate to weigh, and two blocks in three have none.
    """
    mantissa = (top >> 1) & 7  # top 3 mantissa bits of the block's largest magnitude
    for offset, candidate in ((1, served & (mantissa >= 6)), (-1, served & (mantissa == 0))):
        which = np.nonzero(candidate)
        if not which[0].size:
            continue
        steps, gains = _CANDIDATES[offset]
        keys = index[which]
        scaled_sum = (np.take(steps, keys) * np.abs(x[which])).sum(axis=-1)  # sum (Gk - G0) |x|, exact
        change = np.take(gains, keys).sum(axis=-1) - np.ldexp(scaled_sum, 1 - ocp[which])
        better = tuple(w[change < 0] for w in which)
        shared[better] += offset
        index[better] -= 16 * offset


def _table_error(x: np.ndarray, index: np.ndarray, shared: np.ndarray) -> float:
    """The squared rounding error of served blocks, summed in float64: ``sum((x - value * 2**s)**2)``
    with each difference exact (the value is the nearest point of a grid through 0, so within a
    factor of two of ``x``, or a saturated 6 whose difference fits too)."""
    scale = np.ldexp(np.float32(1), np.clip(shared, -126, 127))  # served blocks: shared in -124..125
    diff = mxfp4.table_values(index)
    diff *= scale[..., None]
    np.subtract(x, diff, out=diff)
    return float(np.square(diff, dtype=np.float64).sum())


def _definition_rows(x: np.ndarray, search: bool):
    """The recipe as written, for the rare blocks the table does not serve (tiny or huge scales):
    each candidate's codes by float rounding (``mxfp4.codes_under``), its error compared in the
    OCP-scaled domain (changing the exponent by ``k`` multiplies the squared error by ``4**k``
    exactly), the OCP exponent kept on ties. Returns the error in the chosen exponent's domain."""
    ocp = mxfp4.ocp_exponents(x)
    best_codes = mxfp4.codes_under(x, ocp)
    best_error = _sq_error(x, best_codes, ocp)
    best_shared = ocp
    for offset in _SEARCH_OFFSETS[1:] if search else ():
        shared = ocp + offset
        codes = mxfp4.codes_under(x, shared)
        error = _sq_error(x, codes, shared) * 4.0 ** offset
        allowed = (shared >= -SCALE_BIAS) & (shared <= SCALE_NAN - 1 - SCALE_BIAS)
        better = allowed & (error < best_error)  # strict: the OCP scale keeps every tie
        if better.any():
            best_error = np.where(better, error, best_error)
            best_shared = np.where(better, shared, best_shared)
            best_codes = np.where(better[..., None], codes, best_codes)
    return best_codes, best_shared, np.ldexp(best_error, 2 * (ocp - best_shared))


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
    return float(sum(map_in_order(piece, starts, flat.size)))


def piece_energies(change: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Sums of squares of a piece of a delta (float64: any float32 squared is exact there) and of
    the decoded MXFP4 weight it changes. Each block of the weight squared and summed in float32 is
    exact (a code's square has at most 4 significant bits and shares its block's power of 4), so
    any order gives the same sum, and only the blocks' sums meet in float64."""
    blocks = weight.reshape(-1, mxfp4.BLOCK)
    return float(np.square(change, dtype=np.float64).sum()), float(np.einsum("ij,ij->i", blocks, blocks).sum(dtype=np.float64))


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
