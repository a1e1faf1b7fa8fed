"""The MXFP4 scale search against plain OCP rounding, and its exactness on decoded MXFP4."""

from __future__ import annotations

import numpy as np
import pytest

from oss_convert import quantize
from oss_convert.dtypes import bf16_to_f32, f32_to_bf16
from oss_convert.formats import mxfp4


def _bf16(values: np.ndarray) -> np.ndarray:
    """Values rounded to BF16 (what a BF16 checkpoint holds), as float32."""
    return bf16_to_f32(f32_to_bf16(values.astype(np.float32)))


def _block_errors(x: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Squared error per 32-block, computed independently of quantize.py."""
    diff = x.astype(np.float64) - mxfp4.decode(blocks, scales).astype(np.float64)
    return (diff.reshape(scales.shape + (32,)) ** 2).sum(axis=-1)


DATA = {
    # what a freshly initialised or lightly fine-tuned expert looks like
    "gaussian": lambda rng: rng.standard_normal((96, 2880)) * 0.02,
    # real LLM weights are heavy-tailed: Student-t with 3 degrees of freedom
    "student_t3": lambda rng: rng.standard_t(3, (96, 2880)) * 0.01,
    # a few large outliers per row on top of a gaussian bulk
    "outliers": lambda rng: rng.standard_normal((96, 2880)) * 0.02
    * np.where(rng.random((96, 2880)) < 0.002, 30.0, 1.0),
}


@pytest.mark.parametrize("kind", sorted(DATA))
def test_search_beats_ocp_on_mse_and_never_loses_a_block(kind):
    x = _bf16(DATA[kind](np.random.default_rng(3)))
    ocp = quantize.encode(x, "ocp")
    search = quantize.encode(x, "search")
    ocp_err, search_err = _block_errors(x, *ocp), _block_errors(x, *search)
    assert (search_err <= ocp_err).all()
    # strictly better overall with margin: at least 3 % lower MSE on every data set
    assert search_err.sum() < 0.97 * ocp_err.sum(), (search_err.sum(), ocp_err.sum())
    # the search really changes scales (both directions are used)
    delta = search[1].astype(int) - ocp[1].astype(int)
    assert set(np.unique(delta)) <= {-1, 0, 1}
    assert (delta == 1).any()


def test_ocp_recipe_is_the_project_codec():
    x = _bf16(DATA["gaussian"](np.random.default_rng(4)))
    blocks, scales = quantize.encode(x, "ocp")
    ref_blocks, ref_scales = mxfp4.encode(x)
    np.testing.assert_array_equal(blocks, ref_blocks)
    np.testing.assert_array_equal(scales, ref_scales)


def test_search_picks_the_lower_scale_when_clipping_one_value_pays():
    # one value at 4 (OCP scale 2**0) and 31 values at 0.75, which the OCP grid (0.5, 1, ...)
    # cannot hold but the grid one step finer (2**-1: 0.25, 0.5, 0.75, ...) can.
    x = np.full((1, 32), 0.75, dtype=np.float32)
    x[0, 0] = 4.0
    _, ocp_scales = quantize.encode(x, "ocp")
    blocks, scales = quantize.encode(x, "search")
    assert int(ocp_scales[0, 0]) == 127 and int(scales[0, 0]) == 126
    out = mxfp4.decode(blocks, scales)
    assert out[0, 0] == 3.0 and (out[0, 1:] == 0.75).all()  # 4 clips to 6 * 2**-1


def test_search_avoids_saturation_with_the_higher_scale():
    # amax 7.5: OCP exponent 0 saturates it to 6 (error 1.5); exponent 1 gives 8 (error 0.5).
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 7.5
    blocks, scales = quantize.encode(x, "search")
    assert int(scales[0, 0]) == 128
    assert mxfp4.decode(blocks, scales)[0, 0] == 8.0


@pytest.mark.parametrize("recipe", quantize.RECIPES)
def test_decoded_mxfp4_reencodes_to_the_same_bytes(recipe):
    rng = np.random.default_rng(5)
    blocks = mxfp4.tighten(np.frombuffer(rng.bytes(64 * 90 * 16), np.uint8).reshape(64, 90, 16).copy(), rng)
    scales = rng.integers(115, 125, size=(64, 90)).astype(np.uint8)
    values = bf16_to_f32(mxfp4.decode(blocks, scales, dtype="bf16"))  # through BF16, as hf-bf16 stores it
    out_blocks, out_scales = quantize.encode(values, recipe)
    np.testing.assert_array_equal(out_scales, scales)
    np.testing.assert_array_equal(out_blocks, blocks)


def test_error_tally_reports_relative_mse():
    x = np.ones((1, 32), dtype=np.float32) * 1.25  # OCP: scale 2**-2, 1.25/0.25 = 5 -> code 4 or 6
    tally = quantize.ErrorTally()
    tally.add(x, *quantize.encode(x, "ocp"))
    decoded = mxfp4.decode(*quantize.encode(x, "ocp"))
    expected = float(((x - decoded) ** 2).sum() / (x ** 2).sum())
    assert tally.relative_mse == pytest.approx(expected) and expected > 0
    with pytest.raises(ValueError):
        quantize.encode(x, "nope")


def _nearest_code_by_definition(y: np.ndarray) -> np.ndarray:
    """OCP's rounding spelled out: the FP4 value nearest |y| (saturating at 6), a tie going to
    the even code, with y's sign bit."""
    magnitudes = mxfp4.FP4_VALUES[:8].astype(np.float64)  # codes 0..7
    distance = np.abs(np.minimum(np.abs(y.astype(np.float64)), 6)[:, None] - magnitudes[None])
    nearest = distance == distance.min(axis=1, keepdims=True)
    even = nearest & (np.arange(8) % 2 == 0)
    code = np.where(even.any(axis=1), even.argmax(axis=1), nearest.argmax(axis=1)).astype(np.uint8)
    return code | (np.signbit(y).astype(np.uint8) << 3)


def test_fp4_rounding_is_the_nearest_value_ties_to_even_code():
    rng = np.random.default_rng(6)
    grid = np.arange(-8, 8, 1 / 256, dtype=np.float32)  # every midpoint and FP4 value exactly
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 6.0, 6.5, 7.0, 1e6, -1e6], dtype=np.float32)
    y = np.concatenate([grid, special, (rng.standard_normal(200_000) * 3).astype(np.float32)])
    np.testing.assert_array_equal(mxfp4.fp4_codes(y), _nearest_code_by_definition(y))


def test_search_keeps_the_codec_bytes_wherever_it_keeps_the_ocp_scale():
    x = _bf16(DATA["student_t3"](np.random.default_rng(8)))
    ocp_blocks, ocp_scales = mxfp4.encode(x)
    blocks, scales = quantize.encode(x, "search")
    kept = scales == ocp_scales
    assert 0.5 < kept.mean() < 1.0
    np.testing.assert_array_equal(blocks[kept], ocp_blocks[kept])
    np.testing.assert_array_equal(mxfp4.encode_with_scales(x, scales), blocks)


def test_search_is_its_definition_on_every_block():
    """The chunked, table-driven search against the recipe written out: per block, the error of
    each candidate exponent in float64, the OCP one kept on ties, codes from the float rounding."""
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((130, 320)) * np.float32(2.0) ** rng.integers(-20, 20, (130, 1))).astype(np.float32)
    values[::9, ::5] = 0
    x = mxfp4.as_blocks(values)
    ocp = mxfp4.ocp_exponents(x)

    def error(shared):
        y = np.ldexp(x, -shared[..., None])
        return np.square(y - mxfp4.fp4_round(y), dtype=np.float64).sum(-1) * 4.0 ** (shared - ocp)

    errors = np.stack([error(ocp), error(ocp + 1), error(ocp - 1)])
    choice = np.where(errors[1] < errors[0], 1, 0)
    choice = np.where(errors[2] < np.minimum(errors[0], errors[1]), -1, choice)
    shared = ocp + choice
    blocks, scales = quantize.search_encode(values)
    assert np.array_equal(scales, (shared + 127).astype(np.uint8))
    assert np.array_equal(blocks, mxfp4.pack_codes(mxfp4.fp4_codes(np.ldexp(x, -shared[..., None]))))
    assert (choice != 0).any()  # the search moved some scales: the comparison means something


@pytest.mark.parametrize("recipe", quantize.RECIPES)
def test_the_error_tallied_while_encoding_is_the_decoded_error(recipe):
    """``encode(..., tally)`` sums each block's error where it chose the block's scale; it must be
    what decoding the result says (``ErrorTally.add``), subnormal-scaled blocks included."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 300, 256)) * rng.choice([1e-40, 1e-3, 1.0, 40.0], (2, 300, 1))).astype(np.float32)
    fast, slow = quantize.ErrorTally(), quantize.ErrorTally()
    blocks, scales = quantize.encode(x, recipe, fast)
    slow.add(x, blocks, scales)
    assert fast.count == slow.count == x.size
    assert fast.sq_error == pytest.approx(slow.sq_error, rel=1e-12) and fast.sq_error > 0
    assert fast.energy == pytest.approx(slow.energy, rel=1e-12)


def _search_by_definition(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The recipe written out on every block: each candidate's float64 error, OCP kept on ties."""
    x = mxfp4.as_blocks(values)
    ocp = mxfp4.ocp_exponents(x)

    def error(shared):
        y = np.ldexp(x.astype(np.float64), -shared[..., None])
        return np.square(y - mxfp4.fp4_round(y), dtype=np.float64).sum(-1) * 4.0 ** (shared - ocp)

    errors = np.stack([error(ocp), error(ocp + 1), error(ocp - 1)])
    choice = np.where(errors[1] < errors[0], 1, 0)
    choice = np.where(errors[2] < np.minimum(errors[0], errors[1]), -1, choice)
    shared = ocp + choice
    return mxfp4.pack_codes(mxfp4.fp4_codes(np.ldexp(x, -shared[..., None]))), (shared + 127).astype(np.uint8)


def _edge_blocks(rng: np.random.Generator) -> np.ndarray:
    """Blocks at the search's decision edges: largest value near 7 and 8 (where the coarser scale
    can win), near 4 and 4.47 (the finer), the rest on and between the grids' points and ties,
    over a range of scales; BF16-rounded rows add exact ties."""
    n = 4096
    grid = np.array([0, .125, .25, .375, .5, .625, .75, .875, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7], np.float32)
    rest = rng.choice(grid, (n, 31)) * rng.choice([-1, 1], (n, 31))
    rest = np.where(rng.random((n, 31)) < 0.5, rest, rng.uniform(-4, 4, (n, 31))).astype(np.float32)
    small = rng.random(n) < 0.5  # the rest below 1, where only the finer grid is finer
    ties = np.array([.25, .75, .25, .75, .125, .5, .625], np.float32)  # mostly the OCP grid's ties below 1
    rest[small] = rng.choice(ties, (int(small.sum()), 31)) + rng.uniform(-.01, .01, (int(small.sum()), 31)) * \
        (rng.random((int(small.sum()), 31)) < 0.3)
    top = rng.choice(np.array([4, 4.1, 4.4, 4.46875, 4.5, 5, 6, 6.5, 7, 7.25, 7.5, 7.9375, 7.999], np.float32), n)
    top = np.nextafter(top, rng.choice([np.float32(0), np.float32(8)], n)) if rng.random() < 0.5 else top
    blocks = np.concatenate([top[:, None] * rng.choice([-1, 1], (n, 1)), rest], axis=1).astype(np.float32)
    blocks = blocks[:, rng.permutation(32)] * np.float32(2.0) ** rng.integers(-30, 10, (n, 1))
    bf16 = _bf16(blocks[: n // 4])
    return np.concatenate([blocks, bf16]).astype(np.float32).reshape(-1, 320)


@pytest.mark.parametrize("seed", range(4))
def test_the_exact_search_is_the_definition_at_its_decision_edges(seed):
    """``_move_scales`` weighs a candidate only where it can win and decides by an exact sum; on
    blocks built at the edges of both rules (and their ties) it must choose what trying every
    candidate on every block chooses."""
    values = _edge_blocks(np.random.default_rng(seed))
    blocks, scales = quantize.encode(values, "search")
    want_blocks, want_scales = _search_by_definition(values)
    assert np.array_equal(scales, want_scales)
    assert np.array_equal(blocks, want_blocks)
    moved = scales.astype(int) - mxfp4.encode(values)[1].astype(int)
    assert (moved == 1).mean() > 0.01 and (moved == -1).mean() > 0.01  # both candidates won somewhere


def test_the_search_is_the_definition_on_merged_weights():
    """What a merge encodes: decoded MXFP4 (every block on the grid, tight) plus a small delta,
    where the largest value of a block at 4 slips just below it or just above."""
    rng = np.random.default_rng(7)
    blocks = mxfp4.tighten(np.frombuffer(rng.bytes(256 * 90 * 16), np.uint8).reshape(256, 90, 16).copy(), rng)
    weight = mxfp4.decode(blocks, rng.integers(118, 124, (256, 90)).astype(np.uint8))
    for size in (1e-7, 1e-5, 1e-3):
        merged = (weight + rng.standard_normal(weight.shape).astype(np.float32) * np.float32(size)).astype(np.float32)
        got, want = quantize.encode(merged, "search"), _search_by_definition(merged)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0]), size


def test_the_encoders_pool_is_never_asked_for_work_by_its_own_threads():
    """Work that the pool's threads hand out again (a large sum inside a chunk) runs where it is:
    with every pool thread waiting on the pool, nothing would ever finish."""
    import threading

    from oss_convert import quantize

    values = np.arange(quantize._PARALLEL_VALUES * 2, dtype=np.float32) / 1e6
    expected = float(np.square(values, dtype=np.float64).sum())
    results: list = []

    def many_sums() -> None:
        results.extend(quantize.map_in_order(lambda _: quantize.sum_of_squares(values), range(64), 1 << 40))

    worker = threading.Thread(target=many_sums, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the encoder's pool waited on itself"
    assert len(results) == 64 and all(r == pytest.approx(expected, rel=1e-12) for r in results)
