"""Exact tensor-by-tensor comparison of an artifact with its ``original/`` source.

Experts stored as MXFP4 must decode to the source's values: ``identical`` when the blocks and
scales are the same bytes, ``same_values`` when some blocks use another exact encoding of the
same 32 values (lossless: passes, with the count of re-encoded blocks), ``differs`` otherwise.
Other tensors must equal the source exactly when stored as BF16/F32, or lie within the
rounding bound of their storage type:

- ``F16``: ``|x|·2^-11 + 2^-25`` (round to nearest, subnormal spacing 2^-24);
- ``Q8_0``: ``amax/127`` per 32-value block of the last axis (half a step for rounding plus
  at most ``127·d·2^-11`` from storing the scale ``d = amax/127`` as F16).

Any other storage (affine n-bit, requantized experts) is reported as ``lossy`` with its max
error and left to the KL check. Vocabulary tensors are compared over the shared rows.
One tensor (or one layer's experts) is in memory at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..model import CanonicalModel, expected_tensors, expert_name, is_expert_weight, logical_names
from ..formats import mxfp4

VOCAB_TENSORS = ("embedding.weight", "unembedding.weight")
EXACT_STORAGE = ("BF16", "F32")


@dataclass
class TensorResult:
    name: str
    storage: str
    status: str  # identical | same_values | within_bound | lossy | differs
    max_abs_diff: float
    bound: float | None = None
    detail: str = ""
    reencoded: int = 0  # MXFP4 blocks stored with another exact encoding of the same values

    @property
    def failed(self) -> bool:
        return self.status == "differs"

    def to_dict(self) -> dict:
        return asdict(self)


def compare_models(ref: CanonicalModel, art: CanonicalModel,
                   progress: Callable[[int], None] | None = None) -> list[TensorResult]:
    """One result per logical tensor of ``ref`` (experts: one per layer and ``mlp1``/``mlp2``)."""
    results = []
    for name in logical_names(ref.config):
        if is_expert_weight(name):
            layer, which = expert_name(name)
            results.append(compare_experts(ref, art, layer, which))
        else:
            results.append(compare_dense(ref, art, name))
        if progress is not None:
            progress(1)
    return results


def compare_dense(ref: CanonicalModel, art: CanonicalModel, name: str) -> TensorResult:
    # A reader that cannot give the tensor raises (an InputError: exit 2); that is a broken
    # artifact or reader, not a tensor that "differs".
    storage = _storage(art, name)
    ref_storage = _storage(ref, name)
    b = art.f32(name)
    a = ref.f32(name)
    if name in VOCAB_TENSORS:
        rows = min(a.shape[0], b.shape[0])
        a, b = a[:rows], b[:rows]
    if a.shape != b.shape:
        return TensorResult(name, storage, "differs", float("inf"), detail=f"shape {list(b.shape)}, source {list(a.shape)}")
    worst, bound_max, over_count, lossy = 0.0, 0.0, 0, False
    worst_excess, worst_at = -np.inf, None
    for start, aa, bb in _row_pieces(a, b):
        diff = np.abs(aa - bb)
        diff[np.isnan(diff)] = np.inf
        if not diff.size or diff.max() == 0.0:
            continue
        worst = max(worst, float(diff.max()))
        bound = _bound(aa, storage, ref_storage)
        if bound is None:
            lossy = True
            continue
        bound_max = max(bound_max, float(bound.max()))
        excess = diff - bound
        over_count += int((excess > 0).sum())
        i = int(np.argmax(excess))
        if excess.flat[i] > 0 and excess.flat[i] > worst_excess:
            local = np.unravel_index(i, diff.shape)
            worst_excess, worst_at = excess.flat[i], (start + local[0], *local[1:])
    if worst == 0.0:
        return TensorResult(name, storage, "identical", 0.0, 0.0)
    if lossy:
        return TensorResult(name, storage, "lossy", worst, None, "not checked exactly (lossy storage)")
    if not over_count:
        return TensorResult(name, storage, "within_bound", worst, bound_max)
    at = tuple(map(int, worst_at))
    return TensorResult(
        name, storage, "differs", worst, bound_max,
        f"{over_count} of {a.size} values exceed the {storage} bound; worst at {list(at)}: "
        f"artifact {b[at]:.6g}, source {a[at]:.6g}")


def _row_pieces(a: np.ndarray, b: np.ndarray, max_bytes: int = 32 << 20):
    """``(start, a_piece, b_piece)`` in float64, a few rows at a time (vocab tensors are GBs)."""
    if a.ndim == 0:
        yield 0, a.astype(np.float64).reshape(1), b.astype(np.float64).reshape(1)
        return
    row = max(a[0].size * 8, 1) if a.ndim > 1 else 8
    step = a.shape[0] if a.ndim == 1 else max(max_bytes // row, 1)
    for start in range(0, a.shape[0], step):
        yield start, a[start:start + step].astype(np.float64), b[start:start + step].astype(np.float64)


def _bound(a: np.ndarray, storage: str, ref_storage: str = "BF16") -> np.ndarray | None:
    s = storage.upper()
    if s == "BF16" and ref_storage.upper() == "F32":
        # a float32 reference (a merged adapter) rounded to BF16 once: half an ulp, 8 significant bits
        return np.abs(a.astype(np.float64)) * 2.0 ** -8 + 2.0 ** -134
    if s in EXACT_STORAGE:
        return np.zeros_like(a, dtype=np.float64)
    if s == "F16":
        return np.abs(a.astype(np.float64)) * 2.0 ** -11 + 2.0 ** -25
    if s == "Q8_0" and a.shape[-1] % 32 == 0:
        blocks = np.abs(a.astype(np.float64)).reshape(*a.shape[:-1], -1, 32)
        step = blocks.max(axis=-1, keepdims=True) / 127.0
        return np.broadcast_to(step, blocks.shape).reshape(a.shape) * (1 + 1e-6)
    return None


def compare_experts(ref: CanonicalModel, art: CanonicalModel, layer: int, which: str) -> TensorResult:
    name = f"block.{layer}.mlp.{which}_weight"
    storage = _storage(art, name)
    want = ref.mxfp4(layer, which)
    got = art.mxfp4(layer, which)
    if want is not None and got is not None:
        return _compare_mxfp4(name, storage, want, got)
    if want is None and got is not None:
        return _compare_requantized(name, storage, ref, got, layer, which)
    if want is None and got is None and hasattr(ref, "expert_f32"):
        return _compare_dense_experts(name, storage, ref, art)
    # Dense on one side: compare values expert by expert (lossy unless exactly equal).
    a_all, b_all = ref.f32(name), art.f32(name)
    if a_all.shape != b_all.shape:
        return TensorResult(name, storage, "differs", float("inf"), detail=f"shape {list(b_all.shape)}, source {list(a_all.shape)}")
    worst = max(float(np.abs(a_all[e] - b_all[e]).max()) for e in range(a_all.shape[0]))
    if worst == 0.0:
        return TensorResult(name, storage, "identical", 0.0, 0.0, "values identical (not stored as MXFP4)")
    if storage.upper() == "MXFP4":
        return TensorResult(name, storage, "differs", worst, 0.0, "stored as MXFP4 but values differ from the source")
    return TensorResult(name, storage, "lossy", worst, None, "experts not stored as MXFP4; checked by KL only")


def _compare_requantized(name: str, storage: str, ref: CanonicalModel, got, layer: int, which: str) -> TensorResult:
    """MXFP4 experts encoded from a dense reference (a fine-tune, or a base with an adapter
    merged): each block must be the exact FP4 rounding of the reference under its stored scale,
    and that scale the OCP one or a neighbour (``--recipe search`` moves it at most one step).
    Experts a merged adapter leaves unchanged must be the base's bytes. Anything else is wrong."""
    E, rows, cols = next(s.shape for s in expected_tensors(ref.config, "bf16") if s.name == name)
    if tuple(got.scales.shape) != (E, rows, cols // mxfp4.BLOCK):
        return TensorResult(name, storage, "differs", float("inf"),
                            detail=f"scales {list(got.scales.shape)} do not fit the source {[E, rows, cols]}")
    one_expert = getattr(ref, "expert_f32", None)
    dense = None if one_expert else ref.f32(name)
    base = ref.base_mxfp4(layer, which) if hasattr(ref, "base_mxfp4") else None
    changed = ref.changed_experts(layer, which) if base is not None else range(E)
    problems, worst, copies = [], 0.0, 0
    for e in range(E):
        scales, blocks = np.asarray(got.scales[e]), np.asarray(got.blocks[e])
        if e not in changed:
            if not (np.array_equal(blocks, base.blocks[e]) and np.array_equal(scales, base.scales[e])):
                problems.append(f"expert {e}: the adapter leaves it unchanged, yet its bytes are not the base's")
            copies += 1
            continue
        values = one_expert(name, e) if one_expert else dense[e]
        offset = scales.astype(np.int32) - mxfp4.SCALE_BIAS - mxfp4.ocp_exponents(values.reshape(*values.shape[:-1], -1, 32))
        bad_scales = int((np.abs(offset) > 1).sum())
        bad_blocks = int(np.any(mxfp4.encode_with_scales(values, scales) != blocks, axis=-1).sum())
        worst = max(worst, float(np.abs(mxfp4.decode(blocks, scales) - values).max()))
        if bad_scales or bad_blocks:
            problems.append(f"expert {e}: {bad_blocks} blocks not the rounding of the source, "
                            f"{bad_scales} scales more than one step from OCP")
    if problems:
        return TensorResult(name, storage, "differs", worst, 0.0, "MXFP4 encoding wrong: " + "; ".join(problems[:4]))
    kept = f"; {copies} experts the adapter leaves unchanged are the base's bytes" if base is not None else ""
    return TensorResult(name, storage, "within_bound", worst, None,
                        "MXFP4 encoded from the dense source: every block is its FP4 rounding under an OCP(+-1) scale"
                        + kept)


def _compare_dense_experts(name: str, storage: str, ref: CanonicalModel, art: CanonicalModel) -> TensorResult:
    """Dense experts against a reference that makes its experts one at a time (a base with an
    adapter applied in float32): BF16 storage must be its rounding, expert by expert."""
    b_all = art.f32(name)
    worst, over = 0.0, []
    for e in range(ref.config.num_experts):
        a, b = ref.expert_f32(name, e).astype(np.float64), np.asarray(b_all[e], dtype=np.float64)
        if a.shape != b.shape:
            return TensorResult(name, storage, "differs", float("inf"), detail=f"expert shape {list(b.shape)}, "
                                f"source {list(a.shape)}")
        diff = np.abs(a - b)
        worst = max(worst, float(diff.max()))
        bound = _bound(a, storage, "F32")
        if bound is not None and (diff > bound).any():
            over.append(f"expert {e}: {int((diff > bound).sum())} values")
    if bound is None:
        return TensorResult(name, storage, "lossy", worst, None, "experts not stored as MXFP4; checked by KL only")
    if over:
        return TensorResult(name, storage, "differs", worst, 0.0, f"exceed the {storage} rounding of the merge: "
                            + "; ".join(over[:4]))
    return TensorResult(name, storage, "within_bound" if worst else "identical", worst, None,
                        f"the merge rounded to {storage} once")


def _compare_mxfp4(name: str, storage: str, want, got) -> TensorResult:
    """Three outcomes: bytes identical; the same values under another encoding (a block whose
    largest code is below 4 has two: scale s with codes c, or s-1 with codes 2c), which is
    lossless; or values that differ, naming expert, block and the largest difference."""
    if want.blocks.shape != got.blocks.shape or want.scales.shape != got.scales.shape:
        return TensorResult(name, storage, "differs", float("inf"),
                            detail=f"blocks {list(got.blocks.shape)}, source {list(want.blocks.shape)}")
    problems, worst, reencoded = [], 0.0, 0
    for e in range(want.blocks.shape[0]):
        wb, gb = np.asarray(want.blocks[e]), np.asarray(got.blocks[e])
        ws, gs = np.asarray(want.scales[e]), np.asarray(got.scales[e])
        changed = np.any(wb != gb, axis=-1) | (ws != gs)
        if not changed.any():
            continue
        # Decode only the blocks whose bytes changed; == treats +0 and -0 as the same value
        # (they multiply alike) and a NaN scale as never equal.
        a = mxfp4.decode(wb[changed][:, None], ws[changed][:, None])  # [blocks, 32]
        b = mxfp4.decode(gb[changed][:, None], gs[changed][:, None])
        same = np.all(a == b, axis=-1)
        reencoded += int(same.sum())
        if same.all():
            continue
        diff = np.where(a == b, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64)))
        diff[np.isnan(diff)] = np.inf
        worst = max(worst, float(diff.max()))
        first = tuple(int(i) for i in np.argwhere(changed)[int(np.argmax(~same))])
        problems.append(f"expert {e}: {int((~same).sum())}/{ws.size} blocks decode to other values (first at row "
                        f"{first[0]}, block {first[1]}; largest difference {float(diff.max()):.6g})"
                        + _diagnose(wb, gb, ws, gs))
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more experts" if len(problems) > 4 else "")
        return TensorResult(name, storage, "differs", worst, 0.0, "MXFP4 values differ: " + shown)
    if reencoded:
        return TensorResult(name, storage, "same_values", 0.0, 0.0,
                            f"MXFP4 values identical; {reencoded} blocks use another exact encoding (lossless)",
                            reencoded=reencoded)
    return TensorResult(name, storage, "identical", 0.0, 0.0, "MXFP4 bytes bit-identical")


def _diagnose(wb, gb, ws, gs) -> str:
    """Name the usual conversion mistakes when the bytes show one."""
    hints = []
    if not np.array_equal(wb, gb):
        if np.array_equal(((wb >> 4) | (wb << 4)).astype(np.uint8), gb):
            hints.append("nibble order swapped")
        elif not gb.any():
            hints.append("blocks all zero")
    if not np.array_equal(ws, gs):
        offset = gs.astype(np.int16) - ws.astype(np.int16)
        if np.all(offset == offset.flat[0]):
            hints.append(f"every scale off by {int(offset.flat[0]):+d}")
    return f" ({', '.join(hints)})" if hints else ""


def _storage(model: CanonicalModel, name: str) -> str:
    return str(model.storage(name))
