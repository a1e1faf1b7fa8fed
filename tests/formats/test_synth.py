"""Synthetic checkpoints: determinism, layout, and bounded memory at real scale."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


from oss_convert import synth
from oss_convert.formats import mxfp4
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.model import expected_tensors


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = synth.generate(tmp_path / "a", "tiny", seed=3, shards=2)
    b = synth.generate(tmp_path / "b", "tiny", seed=3, shards=2)
    c = synth.generate(tmp_path / "c", "tiny", seed=4, shards=2)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_layout_matches_the_hub(tmp_path):
    repo = synth.generate(tmp_path / "r", "tiny", shards=3)
    names = sorted(p.name for p in (repo / "original").iterdir())
    assert names == ["config.json", "dtypes.json", "model--00001-of-00003.safetensors",
                     "model--00002-of-00003.safetensors", "model--00003-of-00003.safetensors",
                     "model.safetensors.index.json"]
    dtypes = json.loads((repo / "original" / "dtypes.json").read_text())
    assert dtypes["block.0.mlp.mlp1_weight.blocks"] == "FP4" and dtypes["block.0.mlp.mlp1_weight.scales"] == "UE8"
    index = json.loads((repo / "original" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {s.name for s in expected_tensors(synth.PRESETS["tiny"])}


def test_blocks_are_tight_and_scales_realistic(tiny_repo):
    with OriginalCheckpoint(tiny_repo) as ckpt:
        pair = ckpt.mxfp4(0, "mlp2")
        again = mxfp4.encode(mxfp4.decode(pair.blocks, pair.scales))
        assert (again[0] == pair.blocks).all() and (again[1] == pair.scales).all()
        assert 110 <= pair.scales.min() and pair.scales.max() <= 130
        assert abs(float(ckpt.f32("block.0.attn.norm.scale").mean()) - 1) < 0.05


def test_20b_shapes_fit_the_real_model():
    specs = expected_tensors(synth.PRESETS["20b"])
    assert len(specs) == 363
    assert sum(s.nbytes for s in specs) == 13_761_264_768
    specs = expected_tensors(synth.PRESETS["120b"])
    assert len(specs) == 543 and sum(s.nbytes for s in specs) == 65_248_815_744
