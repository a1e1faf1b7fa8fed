"""MXFP4 codec against an independent, slow, element-by-element implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from oss_convert.formats import mxfp4

# Written from the OCP E2M1 definition, not from the module's table.
def slow_fp4_value(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exponent = (code >> 1) & 3
    mantissa = code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return math.copysign(magnitude, sign)


def slow_decode(blocks: np.ndarray, scales: np.ndarray) -> list[list[float]]:
    rows = []
    for row_blocks, row_scales in zip(blocks.reshape(-1, *blocks.shape[-2:]), scales.reshape(-1, scales.shape[-1])):
        row = []
        for block, scale in zip(row_blocks, row_scales):
            for byte in block:
                for code in (int(byte) & 15, int(byte) >> 4):
                    row.append(slow_fp4_value(code) * 2.0 ** (int(scale) - 127))
        rows.append(row)
    return rows


def slow_encode_block(values: list[float]) -> tuple[list[int], int]:
    """OCP MX v1.0 §6.3: X = 2^(floor(log2(amax)) - 2); codes by nearest, ties to even, saturating."""
    amax = max(abs(v) for v in values)
    if amax == 0:
        shared = -127
    else:
        shared = math.floor(math.log2(amax)) - 2
        shared = max(-127, min(127, shared))
    grid = [slow_fp4_value(c) for c in range(8)]
    codes = []
    for v in values:
        a = min(abs(v) / 2.0 ** shared, 6.0)
        best = min(range(8), key=lambda c: (abs(grid[c] - a), c & 1))  # nearest; tie -> even mantissa
        codes.append(best | (8 if math.copysign(1, v) < 0 else 0))
    return codes, shared + 127


blocks_and_scales = st.integers(1, 3).flatmap(
    lambda g: st.tuples(
        hnp.arrays(np.uint8, (2, g, 16)),
        hnp.arrays(np.uint8, (2, g), elements=st.integers(0, 254)),
    )
)


@settings(max_examples=200, deadline=None)
@given(blocks_and_scales)
def test_decode_matches_slow_reference_bit_for_bit(pair):
    blocks, scales = pair
    fast = mxfp4.decode(blocks, scales)
    slow = np.array(slow_decode(blocks, scales), dtype=np.float32).reshape(fast.shape)
    assert fast.tobytes() == slow.tobytes()  # signed zeros and subnormals included


def test_decode_every_scale_byte_and_code():
    scales = np.arange(255, dtype=np.uint8).reshape(255, 1)
    blocks = np.tile(np.array([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2, dtype=np.uint8), (255, 1, 1))
    fast = mxfp4.decode(blocks, scales)
    slow = np.array(slow_decode(blocks, scales), dtype=np.float32).reshape(fast.shape)
    assert fast.tobytes() == slow.tobytes()
    assert np.signbit(fast[:, 8]).all() and (fast[:, 8] == 0).all()  # code 8 is -0.0
    assert mxfp4.decode(blocks[:1], np.full((1, 1), 255, np.uint8))[0, 7] == np.inf  # like the reference's 2**128


def test_decode_bf16_is_the_float32_top_half():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (4, 3, 16), dtype=np.uint8)
    scales = rng.integers(0, 255, (4, 3), dtype=np.uint8)
    f32 = mxfp4.decode(blocks, scales)
    assert (mxfp4.decode(blocks, scales, dtype="bf16") == (f32.view(np.uint32) >> 16)).all()
    assert not (f32.view(np.uint32) & 0xFFFF).any()  # exact in BF16


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, (2, 64), elements=finite))
def test_encode_matches_slow_ocp_reference(values):
    blocks, scales = mxfp4.encode(values)
    for r in range(2):
        for g in range(2):
            codes, scale = slow_encode_block([float(v) for v in values[r, 32 * g:32 * g + 32]])
            assert scales[r, g] == scale
            packed = [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16)]
            assert blocks[r, g].tolist() == packed


finite_scales = st.integers(1, 3).flatmap(
    lambda g: st.tuples(
        hnp.arrays(np.uint8, (2, g, 16)),
        # 253 and 254 overflow to inf on decode (as in the reference), so they cannot round-trip.
        hnp.arrays(np.uint8, (2, g), elements=st.integers(0, 252)),
    )
)


@settings(max_examples=200, deadline=None)
@given(finite_scales, st.integers(0, 2**32 - 1))
def test_decode_then_encode_is_lossless_on_tight_blocks(pair, seed):
    blocks, scales = pair
    blocks = mxfp4.tighten(blocks.copy(), np.random.default_rng(seed))
    again_blocks, again_scales = mxfp4.encode(mxfp4.decode(blocks, scales))
    assert (again_scales == scales).all()
    assert (again_blocks == blocks).all()


def test_encode_signed_zero_and_saturation():
    values = np.zeros((1, 32), np.float32)
    values[0, 0] = -0.0
    values[0, 1] = 4.0
    values[0, 2] = 7.9  # above 6 * 2**0 after scaling -> saturates to 6
    blocks, scales = mxfp4.encode(values)
    decoded = mxfp4.decode(blocks, scales)
    assert np.signbit(decoded[0, 0]) and decoded[0, 0] == 0
    assert decoded[0, 1] == 4.0 and decoded[0, 2] == 6.0 and scales[0, 0] == 127


def test_encode_rejects_nan_inf_and_bad_width():
    with pytest.raises(ValueError):
        mxfp4.encode(np.full((1, 32), np.nan, np.float32))
    with pytest.raises(ValueError):
        mxfp4.encode(np.full((1, 32), np.inf, np.float32))
    with pytest.raises(ValueError):
        mxfp4.encode(np.zeros((1, 30), np.float32))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3).flatmap(lambda g: st.tuples(hnp.arrays(np.uint8, (3, g, 16)), hnp.arrays(np.uint8, (3, g)))))
def test_table_decode_is_bit_identical_to_the_ldexp_definition(pair):
    """The lookup-table decode against the previous implementation (ldexp per value), every
    scale byte including 255, and on a strided (non-contiguous) view as the converters pass."""
    blocks, scales = pair
    want = mxfp4.decode_slow(blocks, scales).reshape(3, -1)
    assert mxfp4.decode(blocks, scales).tobytes() == want.tobytes()
    assert mxfp4.decode(blocks[::2], scales[::2]).tobytes() == want[::2].tobytes()


def test_scale_255_keeps_zeros_and_gives_inf():
    blocks = np.array([[[0x00, 0x80, 0x71, 0xF0] + [0] * 12]], np.uint8)
    out = mxfp4.decode(blocks, np.full((1, 1), 255, np.uint8))
    assert (out[0, [0, 1, 2, 3]] == 0).all() and np.signbit(out[0, 3])  # 0, 0, 0, -0: never NaN
    assert out[0, 4] == 2.0 ** 127 and out[0, 5] == np.inf and out[0, 7] == -np.inf  # 0.5, 6, -6 times 2**128


def test_decode_of_a_large_tensor_across_chunks_and_threads_and_into_out():
    """Past one cache-sized chunk and the threading threshold: every chunk and thread boundary
    lands where the definition says, whether into a fresh array or into ``out``."""
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (6, 5463, 16), dtype=np.uint8)  # 32778 blocks, past 1 Mi values: neither chunks nor threads divide it evenly
    scales = rng.integers(0, 256, (6, 5463), dtype=np.uint8)
    want = mxfp4.decode_slow(blocks, scales).reshape(6, -1)
    assert mxfp4.decode(blocks, scales).tobytes() == want.tobytes()
    out = np.full((6, 5463 * 32), np.nan, np.float32)
    assert mxfp4.decode(blocks, scales, out=out) is not None and out.tobytes() == want.tobytes()
    with pytest.raises(ValueError):
        mxfp4.decode(blocks, scales, out=np.empty((6, 5463 * 32), np.float64))
    with pytest.raises(ValueError):
        mxfp4.decode(blocks, scales, out=np.empty((6, 5463 * 64), np.float32)[:, ::2])


def test_codes_from_the_bits_equal_the_float_rounding_for_every_exponent():
    """``codes_under`` reads the rounding off the float bits (``_CODES``); it must give the codes
    of ``fp4_codes(ldexp(x, -shared))`` for every shared exponent a scale byte holds, on grid
    points, rounding ties and their neighbours, zeros of both signs and subnormals."""
    rng = np.random.default_rng(0)
    grid = np.array([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8], np.float32)
    ties = rng.choice(grid, 4096).astype(np.float32) * rng.choice([-1, 1], 4096).astype(np.float32)
    values = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
                             rng.standard_normal(4096).astype(np.float32), -np.zeros(32, np.float32),
                             np.float32(1e-40) * rng.standard_normal(4064).astype(np.float32)])
    blocks = values[: values.size // 32 * 32].reshape(-1, 32)
    for shared in range(-127, 128):
        with np.errstate(over="ignore"):
            x = np.ldexp(blocks, shared).astype(np.float32)  # the values a block of that exponent holds
        x[~np.isfinite(x)] = 0  # what overflowed: encode refuses infinities before any rounding
        exponents = np.full(x.shape[0], shared, dtype=np.int32)
        want = mxfp4.fp4_codes(np.ldexp(x, -exponents[:, None]))
        assert np.array_equal(mxfp4.codes_under(x, exponents), want), shared
    tiny = np.float32(1e-40) * rng.standard_normal((4, 32)).astype(np.float32)  # subnormal blocks, shared -127
    assert np.array_equal(mxfp4.codes_under(tiny, np.full(4, -127, np.int32)),
                          mxfp4.fp4_codes(np.ldexp(tiny, 127)))


def test_codes_under_any_exponent_read_from_the_table_or_scaled_where_it_cannot():
    """``codes_under`` with exponents far from a block's own (given scales, as ``encode_with_scales``
    takes them: values that saturate, or that vanish) mixes blocks the key table serves with blocks
    it scales by the definition; every code must be the definition's."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((600, 32)) * np.float32(2.0) ** rng.integers(-140, 120, (600, 1))).astype(np.float32)
    ocp, keys, served = mxfp4.ocp_exponents(x), mxfp4.bit_keys(x), []
    for offset in (-9, -3, -1, 0, 1, 2, 7):
        shared = np.clip(ocp + offset + rng.integers(-2, 3, ocp.shape), -127, 127).astype(np.int32)
        want = mxfp4.fp4_codes(np.ldexp(x, -shared[:, None]))
        assert np.array_equal(mxfp4.codes_under(x, shared), want), offset
        served.append(keys.served(shared).mean())
    assert min(served) == 0 and 0.5 < max(served) < 1  # both paths taken, and mixed within a call
