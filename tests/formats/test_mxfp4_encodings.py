"""Issue 18: an MXFP4 tensor that decodes to the same values is lossless, not "differs".

A block whose largest code is below 4 ("loose") has two exact encodings of the same 32 values:
scale s with codes c, or scale s-1 with codes 2c. OCP rounding picks the second, so a decode ->
encode round trip re-encodes such blocks. ``verify`` must pass those (reporting the count) and
still fail a one-ULP change of a single value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from oss_convert import converters
from oss_convert.cli.main import cli
from oss_convert.formats import mxfp4
from oss_convert.formats.original import OriginalCheckpoint

FAST = ["--ctx", "256", "--chunks", "2", "--quiet"]
LOOSE_EXPERT, LOOSE_ROWS = 5, 8  # block.0.mlp.mlp2_weight, expert 5, rows 0..7: every block loose


def _loosen(repo: Path, out: Path) -> Path:
    """A copy of ``repo`` whose chosen blocks have every code below 4 (clear each nibble's bit 2)."""
    shutil.copytree(repo, out)
    with OriginalCheckpoint(out) as ckpt:
        entry = ckpt.entry("block.0.mlp.mlp2_weight.blocks")
    blocks = np.memmap(entry.file, dtype=np.uint8, mode="r+", offset=entry.start, shape=entry.shape)
    blocks[LOOSE_EXPERT, :LOOSE_ROWS] &= 0xBB
    blocks.flush()
    del blocks
    return out


def _verify(artifact: Path, reference: Path) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["verify", str(artifact), "--reference", str(reference), "--json", "-", *FAST],
                                catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def loose_repo(tiny_repo, tmp_path_factory) -> Path:
    return _loosen(tiny_repo, tmp_path_factory.mktemp("loose") / "repo")


@pytest.fixture(scope="module")
def round_trip(loose_repo, tmp_path_factory) -> Path:
    """original -> hf-bf16 -> original --recipe search: the loose blocks come back re-encoded."""
    work = tmp_path_factory.mktemp("round")
    bf16 = converters.convert(loose_repo, "hf-bf16", work / "bf16").output
    return converters.convert(bf16, "original", work / "back", recipe="search").output


def test_synthetic_checkpoints_have_tight_blocks_only(tiny_repo):
    with OriginalCheckpoint(tiny_repo) as ckpt:
        for layer in range(ckpt.config.num_hidden_layers):
            for which in ("mlp1", "mlp2"):
                codes = ckpt.mxfp4(layer, which).blocks
                top = np.maximum(codes & 0x07, (codes >> 4) & 0x07).max(axis=-1)
                assert (top >= 4).all()  # one exact encoding per block


def test_round_trip_re_encodes_the_loose_blocks(loose_repo, round_trip):
    with OriginalCheckpoint(loose_repo) as a, OriginalCheckpoint(round_trip) as b:
        want, got = a.mxfp4(0, "mlp2"), b.mxfp4(0, "mlp2")
        changed = np.any(want.blocks != got.blocks, axis=-1) | (want.scales != got.scales)
        assert changed.sum() == LOOSE_ROWS * want.scales.shape[-1]  # exactly the loosened blocks
        assert changed[LOOSE_EXPERT, :LOOSE_ROWS].all()
        # a largest code of 3, 2 or 1 (1.5, 1, 0.5) is re-encoded by OCP rounding as scale s-2 or s-3
        # with codes 4c or 8c: the same values
        assert ((got.scales[changed] < want.scales[changed]) & (got.scales[changed] >= want.scales[changed] - 3)).all()
        assert np.array_equal(mxfp4.decode(want.blocks, want.scales), mxfp4.decode(got.blocks, got.scales))


def test_re_encoded_blocks_pass_verify_and_are_reported(loose_repo, round_trip):
    code, report = _verify(round_trip, loose_repo)
    assert code == 0, report["reasons"]
    tensors = report["tensors"]
    assert tensors["experts_lossless"] is True and tensors["experts_bit_identical"] is False
    assert tensors["reencoded_blocks"] == LOOSE_ROWS * _groups(loose_repo)
    item = next(i for i in tensors["items"] if i["name"] == "block.0.mlp.mlp2_weight")
    assert item["status"] == "same_values" and item["reencoded"] == tensors["reencoded_blocks"]
    assert any("another exact encoding" in note for note in report["notes"])
    assert report["metrics"]["kld_max"] < 1e-9


def test_one_ulp_in_one_value_still_fails(loose_repo, round_trip, tmp_path):
    bad = Path(shutil.copytree(round_trip, tmp_path / "bad"))
    with OriginalCheckpoint(bad) as ckpt:
        entry = ckpt.entry("block.1.mlp.mlp1_weight.blocks")
        original = ckpt.raw("block.1.mlp.mlp1_weight.blocks")[2, 3, 1].copy()
    blocks = np.memmap(entry.file, dtype=np.uint8, mode="r+", offset=entry.start, shape=entry.shape)
    low = int(original[0]) & 0x07
    step = 1 if low < 7 else -1  # the next FP4 magnitude: one ULP
    blocks[2, 3, 1, 0] = (int(original[0]) & 0xF8) | (low + step)
    blocks.flush()
    del blocks
    code, report = _verify(bad, loose_repo)
    assert code == 1
    reason = next(r for r in report["reasons"] if "block.1.mlp.mlp1_weight" in r)
    assert "expert 2: 1/" in reason and "row 3, block 1" in reason and "decode to other values" in reason


@pytest.mark.parametrize("target", ["mlx", "gguf", "hf", "original", "hf-bf16"])
def test_loose_blocks_through_each_target_stay_lossless(loose_repo, tmp_path, target):
    out = converters.convert(loose_repo, target, tmp_path / ("out.gguf" if target == "gguf" else "out")).output
    code, report = _verify(out, loose_repo)
    assert code == 0, report["reasons"]
    if target == "hf-bf16":  # dense experts: values identical, not stored as MXFP4
        experts = [i for i in report["tensors"]["items"] if i["name"].endswith("_weight") and "mlp" in i["name"]]
        assert all(i["status"] == "identical" for i in experts)
    else:  # the loose blocks' bytes are carried over as they are
        assert report["tensors"]["experts_bit_identical"] is True


def test_loose_blocks_through_metal_stay_lossless(metal_repo, tmp_path):
    loose = _loosen(metal_repo, tmp_path / "loose")
    out = converters.convert(loose, "metal", tmp_path / "metal").output
    code, report = _verify(out, loose)
    assert code == 0, report["reasons"]
    assert report["tensors"]["experts_bit_identical"] is True


def _groups(repo: Path) -> int:
    with OriginalCheckpoint(repo) as ckpt:
        return ckpt.config.intermediate_size // 32  # mlp2 rows are [H, I]: I/32 blocks per row
