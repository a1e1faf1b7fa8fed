"""``--to mlx --recipe mxfp4-q8|mxfp4-q4``: affine 8/4-bit non-expert layers, experts still MXFP4.

Oracles: ``mlx_lm.convert -q --q-bits 8|4`` on the HF layout of the same weights (what the
mlx-community "MXFP4-Q8"/"MXFP4-Q4" folders are made with), ``mlx_lm.load`` and OpenAI's torch
reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oss_convert import formats, synth
from oss_convert.formats.original import OriginalCheckpoint

from oracles import torch_reference_logits
from helpers import kl_and_top1
from test_mlx import (convert, mlx_lm_convert, mlx_lm_logits, reference_with_mlx_lm_yarn, tensors,
                      write_hf_layout)

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

# Logit agreement with the official reference on the random tiny model (hidden 192), 300 tokens.
# Random weights amplify quantization noise; measured (KL mean, top-1): q8 (0.043, 0.89),
# q4 (1.15, 0.32); a gate/up swap gives (5.0, 0.04).
BOUNDS = {"mxfp4-q8": (0.15, 0.8), "mxfp4-q4": (2.5, 0.2)}


@pytest.fixture(scope="module")
def repo_192(tmp_path_factory) -> Path:
    """tiny with hidden 192: a multiple of mlx-lm's group size 64, so every non-expert linear
    layer is quantized (with tiny's 160 only ``o_proj`` is, by mlx-lm's own rule)."""
    config = synth.preset_with("tiny", hidden_size=192)
    return synth.generate(tmp_path_factory.mktemp("r192") / "repo", config, seed=5, tokenizer=True)


@pytest.fixture(scope="module")
def hf_192(repo_192, tmp_path_factory) -> Path:
    return write_hf_layout(repo_192, tmp_path_factory.mktemp("hf192") / "hf")


@pytest.fixture(scope="module")
def recipes(repo_192, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("recipes")
    return {r: convert(repo_192, base / r, recipe=r) for r in BOUNDS}


@pytest.mark.parametrize("recipe, bits", [("mxfp4-q8", 8), ("mxfp4-q4", 4)])
def test_recipe_is_byte_identical_to_mlx_lm_convert_q(recipe, bits, recipes, hf_192, tmp_path):
    ours = recipes[recipe]
    theirs = mlx_lm_convert(hf_192, tmp_path / "theirs", quantize=True, q_bits=bits)
    got, want = tensors(ours), tensors(theirs)
    assert sorted(got) == sorted(want)
    assert [n for n in want if got[n] != want[n]] == []
    ours_config, theirs_config = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert ours_config == theirs_config
    assert list(ours_config["quantization"]) == list(theirs_config["quantization"])  # same per-layer order
    q = ours_config["quantization"]
    assert q["model.embed_tokens"] == q["lm_head"] == q["model.layers.3.self_attn.v_proj"] == {
        "group_size": 64, "bits": bits, "mode": "affine"}
    assert q["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}  # gpt_oss quant_predicate
    assert not any("experts" in k for k in q)
    assert got["model.layers.0.mlp.experts.gate_proj.weight"][:2] == ("U32", (8, 96, 24))
    assert got["model.layers.0.self_attn.q_proj.weight"][:2] == ("U32", (512, 192 * bits // 32))
    assert got["model.layers.0.self_attn.q_proj.biases"][:2] == ("BF16", (512, 3))
    assert (json.loads((ours / "model.safetensors.index.json").read_text())["metadata"]
            == json.loads((theirs / "model.safetensors.index.json").read_text())["metadata"])


def test_layers_narrower_than_a_group_stay_bf16_as_in_mlx_lm(tiny_repo, tmp_path):
    """tiny's hidden 160 is not a multiple of 64: mlx-lm quantizes only o_proj (input 512)."""
    ours = convert(tiny_repo, tmp_path / "ours", recipe="mxfp4-q8")
    theirs = mlx_lm_convert(write_hf_layout(tiny_repo, tmp_path / "hf"), tmp_path / "theirs", quantize=True, q_bits=8)
    got, want = tensors(ours), tensors(theirs)
    assert sorted(got) == sorted(want) and [n for n in want if got[n] != want[n]] == []
    overrides = [k for k, v in json.loads((ours / "config.json").read_text())["quantization"].items()
                 if isinstance(v, dict)]
    assert overrides == [f"model.layers.{n}.self_attn.o_proj" for n in range(4)]


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", list(BOUNDS))
def test_mlx_lm_runs_recipe_close_to_torch_reference(recipe, recipes, repo_192, tokens_300):
    pytest.importorskip("torch")
    pytest.importorskip("gpt_oss.torch.model")
    got = mlx_lm_logits(recipes[recipe], tokens_300)
    kl_bound, top1_bound = BOUNDS[recipe]
    kl, top1 = kl_and_top1(got, torch_reference_logits(repo_192, tokens_300))
    assert kl < kl_bound and top1 >= top1_bound, (kl, top1)
    # quantization, not YaRN, dominates here: mlx-lm's YaRN rounding patched in changes little
    kl_truncated, _ = kl_and_top1(got, reference_with_mlx_lm_yarn(repo_192, tokens_300))
    assert kl_truncated > 0.5 * kl


def _affine_bound(source: np.ndarray, bits: int, group: int = 64) -> np.ndarray:
    """Error bound of affine quantization per value: one step of its group (mlx rounds the scale
    so that zero is exact, and clips) plus the BF16 rounding of the stored scale and bias, which
    q up to 255 multiplies (measured: at most 2.4 steps = 0.017 of the group's max |w| at 8 bits,
    0.99 steps at 4 bits)."""
    groups = source.reshape(*source.shape[:-1], -1, group)
    step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / (2 ** bits - 1)
    bound = step + np.abs(groups).max(-1, keepdims=True) * 2.0 ** -5
    return np.broadcast_to(bound, groups.shape).reshape(source.shape)


@pytest.mark.parametrize("recipe, bits", [("mxfp4-q8", 8), ("mxfp4-q4", 4)])
def test_reader_dequantizes_recipe(recipe, bits, recipes, repo_192):
    model = formats.open_canonical(recipes[recipe])
    with OriginalCheckpoint(repo_192) as src:
        for name in ("embedding.weight", "block.0.attn.qkv.weight", "block.3.attn.out.weight", "unembedding.weight",
                     "block.2.mlp.gate.weight"):
            want, got = src.f32(name), model.f32(name)
            assert got.shape == want.shape
            used = 8 if name.endswith("gate.weight") else bits
            assert model.storage(name) == f"affine-{used}bit"
            error = np.abs(got - want)
            assert (error <= _affine_bound(want, used)).all(), name
            assert error.max() > 0  # really quantized
        for name in ("block.1.attn.qkv.bias", "block.1.attn.sinks", "norm.scale", "block.1.mlp.mlp1_bias"):
            assert model.f32(name).tobytes() == src.f32(name).tobytes()
        pair, want = model.mxfp4(2, "mlp1"), src.mxfp4(2, "mlp1")
        assert np.array_equal(pair.blocks, want.blocks) and np.array_equal(pair.scales, want.scales)
        assert model.storage("block.2.mlp.mlp1_weight") == "MXFP4"
    model.close()
    info = formats.describe(recipes[recipe])
    assert info["storage"]["embedding"] == f"affine-{bits}bit" and info["storage"]["router"] == "affine-8bit"
    assert info["storage"]["experts"] == "MXFP4"
    assert info["quantized_overrides"] == 2 + 4 * 5
