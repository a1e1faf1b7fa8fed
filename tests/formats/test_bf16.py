"""BF16 in and out: ``--to hf-bf16``, the HF-layout reader, and ``--to original`` from dense experts.

Oracles: OpenAI's torch reference (``tests/oracles.py``) and transformers' own
``GptOssForCausalLM`` (loading our BF16 folder, and dequantizing a Hub-layout MXFP4 folder
with its own code), neither written by this project.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oss_convert import converters, quantize, synth
from oss_convert.converters import hf_bf16, original as to_original
from oss_convert.model import logical_names, TensorSpec
from oss_convert.errors import InputError, UsageError
from oss_convert.formats import hf
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.formats.safetensors import SafetensorsFile, SafetensorsWriter

from layouts import write_hub_layout
from oracles import torch_reference_logits

LOGIT_ATOL = 1e-4  # fp32 CPU; measured max |diff| 1.3e-5 with |logits| up to 14


@pytest.fixture(scope="module")
def tiny_hf(tiny_repo, tmp_path_factory) -> Path:
    with OriginalCheckpoint(tiny_repo) as src:
        return hf_bf16.convert(src, tmp_path_factory.mktemp("hf") / "out", shard_size="1M")


@pytest.fixture(scope="module")
def dense_repo(tmp_path_factory) -> Path:
    """A BF16 fine-tune shape: dense experts in original/ layout."""
    return synth.generate(tmp_path_factory.mktemp("dense") / "repo", "tiny", seed=3, experts="bf16", tokenizer=True)


# --------------------------------------------------------------------------------------
# hf-bf16 output


@pytest.mark.oracle
def test_hf_bf16_runs_in_transformers_like_the_reference(tiny_repo, tiny_hf, tokens_300):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.GptOssForCausalLM.from_pretrained(
        tiny_hf, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.inference_mode():
        ours = model(torch.as_tensor(tokens_300)[None]).logits[0].numpy()
    ref = torch_reference_logits(tiny_repo, tokens_300)
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.oracle
def test_hf_bf16_experts_equal_transformers_own_dequantization(tiny_repo, tiny_hf, tmp_path):
    """transformers dequantizes the Hub MXFP4 layout itself; our BF16 experts must be those values."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with OriginalCheckpoint(tiny_repo) as src:
        hub = write_hub_layout(src, tmp_path / "hub")
    model = transformers.GptOssForCausalLM.from_pretrained(
        hub, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True))
    ours = hf.HfCheckpoint(tiny_hf)
    for layer in (0, 3):
        experts = model.model.layers[layer].mlp.experts
        for hf_param, ours_name in ((experts.gate_up_proj, "gate_up_proj"), (experts.down_proj, "down_proj")):
            theirs = hf_param.detach().view(torch.uint16).numpy()
            mine = ours._array(f"model.layers.{layer}.mlp.experts.{ours_name}")
            np.testing.assert_array_equal(mine, theirs)


def test_hf_bf16_folder_layout(tiny_repo, tiny_hf):
    files = sorted(p.name for p in tiny_hf.iterdir())
    assert "config.json" in files and "tokenizer.json" in files and "model.safetensors.index.json" in files
    index = json.loads((tiny_hf / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all(n in files for n in shards)
    names = {}
    for shard in shards:
        f = SafetensorsFile(tiny_hf / shard)
        assert all(index["weight_map"][n] == shard for n in f.entries)
        names.update({n: e for n, e in f.entries.items()})
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in names.values())
    assert {e.dtype for e in names.values()} == {"BF16"}
    c = synth.PRESETS["tiny"]
    E, H, I = c.num_experts, c.hidden_size, c.intermediate_size
    assert names["model.layers.2.mlp.experts.gate_up_proj"].shape == (E, H, 2 * I)
    assert names["model.layers.2.mlp.experts.down_proj"].shape == (E, I, H)
    assert names["model.layers.2.self_attn.k_proj.weight"].shape == (c.num_key_value_heads * c.head_dim, H)
    config = json.loads((tiny_hf / "config.json").read_text())
    assert config["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert config["rope_scaling"]["truncate"] is False and config["num_local_experts"] == E
    with OriginalCheckpoint(tiny_repo) as src:  # non-expert bytes copied unchanged
        q = SafetensorsFile(tiny_hf / index["weight_map"]["model.layers.1.self_attn.q_proj.weight"])
        np.testing.assert_array_equal(q.array("model.layers.1.self_attn.q_proj.weight"),
                                      src.raw("block.1.attn.qkv.weight")[:c.num_attention_heads * c.head_dim])


# --------------------------------------------------------------------------------------
# The HF-layout reader


def test_hf_reader_presents_the_original_tensors(tiny_repo, tiny_hf, tmp_path):
    with OriginalCheckpoint(tiny_repo) as src:
        hub = hf.HfCheckpoint(write_hub_layout(src, tmp_path / "hub"))
        dense = hf.open_source(tiny_hf)
        assert isinstance(dense, hf.HfCheckpoint) and dense.experts == "bf16" and hub.experts == "mxfp4"
        assert dense.config == src.config == hub.config
        for name in logical_names(src.config):
            expected = src.f32(name)
            np.testing.assert_array_equal(dense.f32(name), expected, err_msg=name)
            np.testing.assert_array_equal(hub.f32(name), expected, err_msg=name)
        pair = hub.mxfp4(1, "mlp2")
        np.testing.assert_array_equal(pair.blocks, src.mxfp4(1, "mlp2").blocks)
        assert dense.mxfp4(1, "mlp2") is None
        assert hub.storage("block.1.mlp.mlp2_weight") == "MXFP4" and dense.storage("block.1.mlp.mlp2_weight") == "BF16"
    info = hf.describe(tiny_hf, scan=True)
    assert info["valid"] and info["experts"] == "bf16" and "tokenizer.json" in info["tokenizer_files"]
    assert isinstance(hf.open_source(tiny_repo), OriginalCheckpoint)  # original/ stays original


def test_hub_mxfp4_layout_converts_like_original(tiny_repo, tiny_hf, tmp_path):
    """A Hub-layout MXFP4 folder as source: hf-bf16 gives the same bytes, original/ copies blocks."""
    with OriginalCheckpoint(tiny_repo) as src:
        hub_path = write_hub_layout(src, tmp_path / "hub")
    with hf.open_source(hub_path) as hub:
        bf16 = hf_bf16.convert(hub, tmp_path / "bf16", shard_size="1M")
        back = to_original.convert(hub, tmp_path / "orig")
    for name in [p.name for p in tiny_hf.glob("*.safetensors")] + ["model.safetensors.index.json", "config.json"]:
        assert (bf16 / name).read_bytes() == (tiny_hf / name).read_bytes(), name
    start = OriginalCheckpoint(tiny_repo)
    assert all(np.array_equal(OriginalCheckpoint(back).raw(s.name), start.raw(s.name)) for s in start.specs)


def test_float32_fine_tune_in_hf_layout_is_accepted(tiny_repo, tiny_hf, tmp_path):
    """Fine-tunes are often saved in float32: same values, so the same original/ comes back."""
    from oss_convert.dtypes import bf16_to_f32

    out = tmp_path / "f32"
    out.mkdir()
    entries = {}
    for shard in sorted(tiny_hf.glob("*.safetensors")):
        f = SafetensorsFile(shard)
        entries.update({n: bf16_to_f32(f.array(n)) for n in f.entries})
    with open(out / "model.safetensors", "wb") as fh:
        writer = SafetensorsWriter(fh, [TensorSpec(n, "F32", a.shape) for n, a in entries.items()], {"format": "pt"})
        for name, array in entries.items():
            writer.write(name, array)
        writer.finish()
    (out / "config.json").write_bytes((tiny_hf / "config.json").read_bytes())
    with hf.open_source(out) as src:
        assert src.storage("block.0.mlp.mlp1_weight") == "F32"
        back = to_original.convert(src, tmp_path / "orig", recipe="search")
    start = OriginalCheckpoint(tiny_repo)
    assert all(np.array_equal(OriginalCheckpoint(back).raw(s.name), start.raw(s.name)) for s in start.specs)


def test_hf_reader_refuses_what_the_reference_cannot_run(tiny_hf, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in tiny_hf.iterdir():
        (bad / p.name).symlink_to(p)
    config = json.loads((tiny_hf / "config.json").read_text())
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**config, "rope_scaling": {**config["rope_scaling"], "truncate": True}}))
    with pytest.raises(InputError, match="truncate"):
        hf.HfCheckpoint(bad)
    (bad / "config.json").write_text(json.dumps({**config, "num_local_experts": 4}))
    with pytest.raises(InputError, match=r"router\.weight.*implies BF16\[4, 160\]"):
        hf.HfCheckpoint(bad)


# --------------------------------------------------------------------------------------
# original/ from BF16, and the round trip


@pytest.mark.parametrize("recipe", quantize.RECIPES)
def test_mxfp4_to_bf16_to_mxfp4_is_bit_identical(tiny_repo, tiny_hf, tmp_path, recipe):
    with hf.open_source(tiny_hf) as src:
        out = to_original.convert(src, tmp_path / "back", recipe=recipe)
    start, back = OriginalCheckpoint(tiny_repo), OriginalCheckpoint(out)
    assert [s.name for s in back.specs] == [s.name for s in start.specs]
    for spec in start.specs:  # expert blocks/scales and every BF16 tensor
        np.testing.assert_array_equal(back.raw(spec.name), start.raw(spec.name), err_msg=spec.name)
    for name in ("config.json", "dtypes.json"):
        assert (back.path / name).read_bytes() == (start.path / name).read_bytes()
    report = json.loads((out / to_original.REPORT_FILE).read_text())
    assert report["recipe"] == recipe and report["relative_mse"] == 0.0


def test_mxfp4_source_is_copied_bytewise(tiny_repo, tmp_path):
    with OriginalCheckpoint(tiny_repo) as src:
        out = to_original.convert(src, tmp_path / "copy", shard_size="1M")
    copy = OriginalCheckpoint(out)
    assert len(copy.files) > 1 and not (out / to_original.REPORT_FILE).exists()
    for spec in copy.specs:
        np.testing.assert_array_equal(copy.raw(spec.name), OriginalCheckpoint(tiny_repo).raw(spec.name))


def test_bf16_source_error_is_measured_and_search_beats_ocp(dense_repo, tmp_path):
    reports = {}
    with OriginalCheckpoint(dense_repo) as src:
        for recipe in quantize.RECIPES:
            out = to_original.convert(src, tmp_path / recipe, recipe=recipe)
            reports[recipe] = json.loads((out / to_original.REPORT_FILE).read_text())
            quantized = OriginalCheckpoint(out)
            assert quantized.experts == "mxfp4"
            # the reported error is the true error of what was written
            name = "block.2.mlp.mlp1_weight"
            x, q = src.f32(name).astype(np.float64), quantized.f32(name).astype(np.float64)
            assert reports[recipe]["tensors"][name]["relative_mse"] == pytest.approx(((x - q) ** 2).sum() / (x ** 2).sum())
            np.testing.assert_array_equal(quantized.raw("block.2.attn.qkv.weight"), src.raw("block.2.attn.qkv.weight"))
    ocp, search = reports["ocp"], reports["search"]
    assert 1e-3 < ocp["relative_mse"] < 0.05  # gaussian weights through FP4: ~1.3 %
    assert search["relative_mse"] < 0.97 * ocp["relative_mse"]
    assert all(search["tensors"][n]["relative_mse"] < ocp["tensors"][n]["relative_mse"] for n in ocp["tensors"])


@pytest.mark.oracle
def test_quantized_fine_tune_runs_in_the_reference_close_to_bf16(dense_repo, tmp_path, tokens_300):
    """dense -> hf-bf16 -> original (search). The reference cannot load dense experts, so the BF16
    logits come from transformers on the hf-bf16 folder, the MXFP4 ones from the reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with OriginalCheckpoint(dense_repo) as src:
        hf_out = hf_bf16.convert(src, tmp_path / "hf")
    with hf.open_source(hf_out) as src:
        out = to_original.convert(src, tmp_path / "q", recipe="search")
    model = transformers.GptOssForCausalLM.from_pretrained(hf_out, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        dense_logits = model(torch.as_tensor(tokens_300)[None]).logits[0].numpy()
    quant_logits = torch_reference_logits(out, tokens_300)
    assert np.isfinite(quant_logits).all()
    # Random dense experts through FP4 lose ~1.2 % of their energy (~11 % rms per expert output);
    # on this random 4-layer model that moves the logits by ~20 % rms (measured 0.20, KL 0.155,
    # top-1 agreement 62 %). Swapping the nibble order of the same blocks gives 95 %.
    rel = np.linalg.norm(dense_logits - quant_logits) / np.linalg.norm(dense_logits)
    assert 0.05 < rel < 0.3, rel


def test_unknown_recipe_and_options_are_refused(dense_repo, tiny_repo, tmp_path):
    # the library job refuses, in one place, what a target does not take
    with pytest.raises(UsageError, match="--recipe gptq does not apply to --to original"):
        converters.convert(dense_repo, "original", tmp_path / "a", recipe="gptq")
    with pytest.raises(UsageError, match="--outtype does not apply to --to hf-bf16"):
        converters.convert(tiny_repo, "hf-bf16", tmp_path / "b", outtype="q8_0")
    with pytest.raises(UsageError, match="--recipe mxfp4-q8 does not apply to --to original"):
        converters.convert(dense_repo, "original", tmp_path / "c", recipe="mxfp4-q8")
    assert not any(tmp_path.iterdir())
