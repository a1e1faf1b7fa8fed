"""PEFT LoRA adapters: read, merged and applied as PEFT itself does.

Oracles: PEFT (``merge_and_unload`` of adapters PEFT wrote, ``ParamWrapper`` for the 3-D
experts) on transformers' ``GptOssForCausalLM``. The base is ``tiny_repo`` (hidden 160 != expert
96, so a transposed or swapped expert delta cannot fit by accident).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oss_convert import formats, synth
from oss_convert.adapters import AdaptedModel
from oss_convert.formats import peft as peft_format
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.formats.safetensors import SafetensorsFile
from oss_convert.model import ModelConfig
from oss_convert.verify.runner import Runner

from helpers import digests, run_sub
from oracles import FollowRouting, peft_adapter, peft_model, transformers_model, transformers_run

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# What users ship: the OpenAI cookbook's config (all-linear attention, both expert parameters of
# a few layers), experts of every layer, one expert parameter alone, rsLoRA, rank/alpha patterns.
CONFIGS = {
    "cookbook": dict(r=8, lora_alpha=16, target_modules="all-linear",
                     target_parameters=[f"{n}.mlp.experts.{p}" for n in (1, 3) for p in ("gate_up_proj", "down_proj")]),
    "experts_every_layer": dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS),
    "down_proj_only": dict(r=4, lora_alpha=4, target_modules=["o_proj"], target_parameters=["mlp.experts.down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "lm_head"],
                   target_parameters=["2.mlp.experts.gate_up_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERTS,
                     rank_pattern={"q_proj": 8, "mlp.experts.down_proj": 2}, alpha_pattern={"o_proj": 32}),
}
LOGIT_ATOL = 1e-4  # two float32 implementations of the same network, on the same routing


@pytest.fixture(scope="module")
def adapters(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("peft")
    return {name: peft_adapter(tiny_hf, root / name, seed=i, **config) for i, (name, config) in enumerate(CONFIGS.items())}


def bf16_bits(tensor) -> np.ndarray:
    import torch

    return tensor.detach().to(torch.bfloat16).view(torch.int16).numpy().astype(np.int32)


def our_tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        f = SafetensorsFile(path)
        out.update({name: np.array(f.array(name)).view(np.int16).astype(np.int32) for name in f.entries})
    return out


# --------------------------------------------------------------------------------------
# The merge against PEFT's merge_and_unload


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_equals_peft_merge_and_unload(tiny_repo, tiny_hf, adapters, name, tmp_path):
    """Our ``--to hf-bf16 --adapter`` against PEFT's float32 merge rounded to BF16: every
    tensor within one BF16 ulp (the float32 products may differ in their last bit), and the
    tensors the adapter does not touch bit-identical."""
    out = tmp_path / "merged"
    result = run_sub("convert", str(tiny_repo), "--adapter", str(adapters[name]), "--to", "hf-bf16", "-o", str(out),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    merged = peft_model(tiny_hf, adapters[name]).merge_and_unload()
    theirs = {k: bf16_bits(v) for k, v in merged.state_dict().items()}
    ours = our_tensors(out)
    base = our_tensors(tiny_hf)
    assert set(ours) == set(theirs)
    changed = 0
    for key, want in theirs.items():
        assert np.abs(ours[key] - want).max() <= 1, f"{key}: more than one BF16 ulp from PEFT's merge"
        changed += not np.array_equal(want, base[key])
    assert changed >= 2, "the adapter changed nothing: the test would pass on a merge that does nothing"
    # what the merge did is recorded beside the output and in the manifest
    report = json.loads((out / "quantization.json").read_text())["adapter_merge"]
    assert len(report["tensors"]) == changed or len(report["tensors"]) >= changed // 3
    manifest = json.loads((out / "oss-convert-manifest.json").read_text())
    assert manifest["adapter_merge"]["adapter"]["files"].keys() == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.oracle
def test_reference_with_adapter_is_peft_applied_model(tiny_repo, tiny_hf, adapters, tokens_300):
    """``verify --adapter``'s reference (base + deltas in float32, never merged into storage)
    computes what PEFT's adapter-applied model computes, on the same routing."""
    tokens = tokens_300[:160]
    theirs, router = transformers_run(peft_model(tiny_hf, adapters["cookbook"]), tokens)
    follow = FollowRouting(router)
    with OriginalCheckpoint(tiny_repo) as base:
        model = AdaptedModel(base, formats.read_adapter(adapters["cookbook"], base.config))
        ours = Runner(model, device="cpu", routing=follow).logits(tokens)
    assert follow.largest_router_difference() < 1e-5
    np.testing.assert_allclose(ours, theirs, atol=LOGIT_ATOL, rtol=0)
    without, _ = transformers_run(transformers_model(tiny_hf), tokens)
    assert np.abs(without - theirs).max() > 100 * LOGIT_ATOL, "the adapter must change the logits for this to test it"


@pytest.mark.oracle
def test_merged_mxfp4_runs_in_transformers_as_in_our_runner(tiny_repo, tiny_hf, adapters, tokens_300, tmp_path):
    """transformers reads our merged ``--to hf`` (MXFP4, touched experts re-encoded) as our runner
    does; so its distance from PEFT's adapter-applied model is exactly the re-encoding's, which
    ``verify --adapter`` measures (and its tensor check bounds block by block)."""
    out = tmp_path / "hf"
    assert run_sub("convert", str(tiny_repo), "--adapter", str(adapters["cookbook"]), "--to", "hf", "-o", str(out),
                   "--quiet").returncode == 0
    import transformers

    tokens = tokens_300[:160]
    theirs, router = transformers_run(
        transformers_model(out, quantization_config=transformers.Mxfp4Config(dequantize=True)), tokens)
    with formats.open_canonical(out) as model:
        ours = Runner(model, device="cpu", routing=FollowRouting(router)).logits(tokens)
    np.testing.assert_allclose(ours, theirs, atol=LOGIT_ATOL, rtol=0)
    report = run_sub("verify", str(out), "--reference", str(tiny_repo), "--adapter", str(adapters["cookbook"]),
                     "--tokens", str(_tokens_file(tokens_300, tmp_path)), "--ctx", "150", "--json", "-", "--quiet")
    tensors = {t["name"]: t for t in json.loads(report.stdout)["tensors"]["items"]}
    assert tensors["block.1.mlp.mlp1_weight"]["status"] == "within_bound"
    assert tensors["block.0.mlp.mlp1_weight"]["status"] == "identical"  # layer 0's experts untouched: copies
    assert not any(t["status"] == "differs" for t in tensors.values())


def _tokens_file(tokens: np.ndarray, folder: Path) -> Path:
    path = folder / "tokens.npy"
    np.save(path, tokens)
    return path


# --------------------------------------------------------------------------------------
# Reading


@pytest.mark.oracle
def test_read_places_every_pair(tiny_repo, adapters):
    with OriginalCheckpoint(tiny_repo) as base:
        adapter = formats.read_adapter(adapters["cookbook"], base.config)
    targets = {p.target for p in adapter.pairs}
    assert {"block.1.mlp.mlp1_weight", "block.1.mlp.mlp2_weight", "block.3.mlp.mlp2_weight"} <= targets
    assert "block.0.mlp.mlp1_weight" not in targets
    assert sum(p.target == "block.0.attn.qkv.weight" for p in adapter.pairs) == 3  # q, k and v rows
    patterns = formats.read_adapter(adapters["patterns"], base.config)
    by_module = {(p.target, p.module): p for p in patterns.pairs}
    assert by_module[("block.0.attn.qkv.weight", "self_attn.q_proj")].rank == 8
    assert by_module[("block.0.attn.qkv.weight", "self_attn.q_proj")].scaling == 8 / 8
    assert by_module[("block.0.attn.out.weight", "self_attn.o_proj")].scaling == 32 / 4
    assert by_module[("block.0.mlp.mlp2_weight", "mlp.experts.down_proj")].rank == 2


@pytest.mark.oracle
def test_inspect_describes_an_adapter(adapters):
    result = run_sub("inspect", str(adapters["cookbook"]), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "peft" and info["layers"] == [0, 1, 2, 3]
    assert info["modules"]["mlp.experts.gate_up_proj"] == {"rank": [8], "scaling": [2.0], "layers": [1, 3],
                                                           "dtype": "F32", "experts": {"1": list(range(8)),
                                                                                       "3": list(range(8))}}
    assert info["peft_version"]


# --------------------------------------------------------------------------------------
# The orientation PEFT 0.19.0 wrote, and a square down_proj


@pytest.fixture(scope="module")
def square_repo(tmp_path_factory) -> Path:
    """hidden size == expert size, as in the real models: down_proj's A and B are both square-ish."""
    config = ModelConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=1024, hidden_size=128,
                         intermediate_size=128, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    return synth.generate(tmp_path_factory.mktemp("square") / "repo", config, seed=5, tokenizer=True)


def _rewrite_config(adapter: Path, out: Path, **changes) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / peft_format.CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (out / peft_format.CONFIG_FILE).write_text(json.dumps(config))
    return out


@pytest.mark.oracle
def test_square_down_proj_needs_the_version_or_a_gate_up_pair(square_repo, tmp_path):
    hf = tmp_path / "hf"
    assert run_sub("convert", str(square_repo), "--to", "hf-bf16", "-o", str(hf), "--quiet").returncode == 0
    down = peft_adapter(hf, tmp_path / "down", target_modules=[], target_parameters=["mlp.experts.down_proj"])
    both = peft_adapter(hf, tmp_path / "both", target_modules=[], target_parameters=EXPERTS)
    config = ModelConfig.from_dict(json.loads((square_repo / "original" / "config.json").read_text()))
    # with the version, or a gate_up_proj pair in the layer, it is placed; without both, refused
    assert formats.read_adapter(down, config).pairs[0].transposed is False
    assert all(not p.transposed for p in formats.read_adapter(_rewrite_config(both, tmp_path / "b2", peft_version=None),
                                                             config).pairs)
    unversioned = _rewrite_config(down, tmp_path / "d2", peft_version=None)
    before = digests(unversioned)
    out = tmp_path / "out"
    result = run_sub("convert", str(square_repo), "--adapter", str(unversioned), "--to", "original", "-o", str(out))
    assert result.returncode == 2 and "square" in result.stderr and "down_proj" in result.stderr
    assert not out.exists() and digests(unversioned) == before
    # peft 0.19.0's inverted orientation: the delta is the transpose
    old = _rewrite_config(down, tmp_path / "d3", peft_version="0.19.0")
    inverted = formats.read_adapter(old, config).pairs[0]
    standard = formats.read_adapter(down, config).pairs[0]
    assert inverted.transposed and np.array_equal(inverted.delta(1), standard.delta(1).T)


@pytest.mark.oracle
def test_inverted_gate_up_is_placed_by_its_shape(tiny_repo, tiny_hf, tmp_path):
    """A 0.19.0-style gate_up pair (A over 2I, B over H) with no version: the shapes say which."""
    from safetensors.numpy import load_file, save_file

    adapter = peft_adapter(tiny_hf, tmp_path / "a", target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    old = _rewrite_config(adapter, tmp_path / "old", peft_version=None)
    tensors = load_file(old / peft_format.WEIGHTS_FILE)
    rng = np.random.default_rng(0)
    r, E, H, I2 = 8, 8, 160, 192
    for key in list(tensors):
        shape = (r * E, I2) if "lora_A" in key else (H, r * E)
        tensors[key] = rng.standard_normal(shape).astype(np.float32) * 0.01
    save_file(tensors, old / peft_format.WEIGHTS_FILE)
    with OriginalCheckpoint(tiny_repo) as base:
        pair = formats.read_adapter(old, base.config).pairs[0]
    assert pair.transposed and pair.delta(0).shape == (I2, H)
    # 0.19.0's own formula: einsum("o r e, e r i -> e o i") gives param [E, H, 2I]; canonical is its transpose
    a = tensors["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].reshape(E, r, I2)
    b = tensors["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].reshape(H, r, E)
    param = np.einsum("ore,eri->eoi", b, a) * pair.scaling
    np.testing.assert_allclose(pair.delta(3), param[3].T, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# Refusals: exit 2, naming file and key, nothing written, no input changed


def _edit_weights(adapter: Path, out: Path, edit) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(out / peft_format.WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, out / peft_format.WEIGHTS_FILE)
    return out


def _rename(old: str, new: str):
    def edit(tensors):
        for suffix in ("lora_A.weight", "lora_B.weight"):
            tensors[f"{new}.{suffix}"] = tensors.pop(f"{old}.{suffix}")
    return edit


def _poison(tensors):
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    tensors[key][3, 5] = np.nan


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
REFUSALS = {
    "dora": (lambda a, out: _rewrite_config(a, out, use_dora=True), "use_dora"),
    "lora_bias": (lambda a, out: _rewrite_config(a, out, lora_bias=True), "lora_bias"),
    "bias": (lambda a, out: _rewrite_config(a, out, bias="all"), "bias"),
    "modules_to_save": (lambda a, out: _rewrite_config(a, out, modules_to_save=["lm_head"]), "modules_to_save"),
    "not_lora": (lambda a, out: _rewrite_config(a, out, peft_type="IA3"), "IA3"),
    "layer_the_base_lacks": (lambda a, out: _edit_weights(a, out, _rename(Q0, Q0.replace("layers.0", "layers.9"))),
                             "block.9.attn.qkv.weight"),
    "other_architecture": (lambda a, out: _edit_weights(a, out, _rename(Q0, Q0.replace("self_attn.q_proj",
                                                                                       "mlp.gate_proj"))),
                           "mlp.gate_proj"),
    "nan": (lambda a, out: _edit_weights(a, out, _poison), "NaN"),
    "rank_contradicts_config": (lambda a, out: _rewrite_config(a, out, r=16), "rank"),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_write_nothing(tiny_repo, adapters, case, tmp_path):
    make, says = REFUSALS[case]
    bad = make(adapters["cookbook"], tmp_path / "bad")
    before, base_before = digests(bad), digests(tiny_repo)
    out = tmp_path / "out"
    result = run_sub("convert", str(tiny_repo), "--adapter", str(bad), "--to", "mlx", "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "adapter" in result.stderr, result.stderr
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert digests(bad) == before and digests(tiny_repo) == base_before


@pytest.mark.oracle
def test_adapter_for_another_size_is_refused(metal_repo, adapters, tmp_path):
    """An adapter of the tiny model against a base of other sizes: its shapes do not fit."""
    out = tmp_path / "out.gguf"
    result = run_sub("convert", str(metal_repo), "--adapter", str(adapters["cookbook"]), "--to", "gguf", "-o", str(out))
    assert result.returncode == 2 and "needs" in result.stderr and "adapter_model.safetensors" in result.stderr
    assert not out.exists()
