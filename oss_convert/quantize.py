"""Encoding dense weights to MXFP4, with a choice of scale per 32-value block.

Two recipes:

- ``"ocp"``: the OCP Microscaling rule of ``formats/mxfp4.py:encode`` (shared exponent
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

from dataclasses import dataclass

import numpy as np

from .formats import mxfp4
from .formats.mxfp4 import BLOCK, SCALE_BIAS, SCALE_NAN

RECIPES = ("ocp", "search")
# Candidate offsets from the OCP exponent, in order of preference on equal error.
_SEARCH_OFFSETS = (0, 1, -1)


def encode(values: np.ndarray, recipe: str = "ocp") -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``[*P, N]`` float values to MXFP4 ``(blocks, scales)`` with the given recipe."""
    if recipe == "ocp":
        return mxfp4.encode(values)
    if recipe == "search":
        return search_encode(values)
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")


def encode_with_scales(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """FP4 blocks of ``[*P, N]`` values for given scale bytes ``[*P, N/32]``."""
    return _encode_blocked(_as_blocks(values), scales)


def _encode_blocked(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``x`` is ``[*P, G, 32]``: round to nearest FP4, ties to even code, saturate at 6."""
    shared = scales.astype(np.int32) - SCALE_BIAS
    codes = mxfp4._round_to_fp4(np.ldexp(x, -shared[..., None]))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def search_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the scale among OCP, OCP+1 and OCP-1 with the least squared error."""
    x = _as_blocks(values)
    _, ocp_scales = mxfp4.encode(values)
    best_scales = ocp_scales
    best_blocks = _encode_blocked(x, ocp_scales)
    best_error = _block_sq_error(x, best_blocks, ocp_scales)
    for offset in _SEARCH_OFFSETS[1:]:
        candidate = np.clip(ocp_scales.astype(np.int32) + offset, 0, SCALE_NAN - 1).astype(np.uint8)
        blocks = _encode_blocked(x, candidate)
        error = _block_sq_error(x, blocks, candidate)
        better = error < best_error  # strict: the OCP scale keeps every tie
        best_error = np.where(better, error, best_error)
        best_scales = np.where(better, candidate, best_scales)
        best_blocks = np.where(better[..., None], blocks, best_blocks)
    return best_blocks, best_scales


def _as_blocks(values: np.ndarray) -> np.ndarray:
    """``[*P, N]`` -> ``[*P, N/32, 32]`` float32 (a view when possible)."""
    x = np.asarray(values, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {BLOCK}")
    if np.isnan(x).any():
        raise ValueError("cannot encode NaN to MXFP4")
    return x.reshape(x.shape[:-1] + (x.shape[-1] // BLOCK, BLOCK))


def _block_sq_error(x: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Sum of squared errors per block, in float64 so close candidates compare correctly."""
    decoded = mxfp4.decode(blocks, scales).reshape(x.shape)
    diff = x.astype(np.float64) - decoded
    return np.einsum("...i,...i->...", diff, diff)


# --------------------------------------------------------------------------------------
# Error bookkeeping


@dataclass
class ErrorTally:
    """Squared error and signal energy summed over one or more tensors."""

    sq_error: float = 0.0
    energy: float = 0.0
    count: int = 0

    def add(self, original: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> None:
        x = np.asarray(original, dtype=np.float64)
        diff = x - mxfp4.decode(blocks, scales).reshape(x.shape)
        self.sq_error += float(np.dot(diff.ravel(), diff.ravel()))
        self.energy += float(np.dot(x.ravel(), x.ravel()))
        self.count += x.size

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
