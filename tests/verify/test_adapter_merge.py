"""The bundled LoRA adapter merged into every target, run in each runtime and proven by ``verify --adapter``.

The base is the bundled trained model (examples/gpt-oss-tiny) and the adapter the bundled one
(examples/gpt-oss-tiny-sherlock-lora, trained with PEFT on Sherlock Holmes: attention of every
layer, both expert weights of layers 1 and 3). The reference of a merge is the base with the
adapter applied exactly in float32 (``AdaptedModel``), so a merged artifact's KL is what its
storage lost: BF16 once for ``hf-bf16``; for the MXFP4 targets also the touched experts'
re-encoding (measured: KL 2.7e-3, top-1 96.2%, the same for every MXFP4 target).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oss_convert import formats
from oss_convert.adapters import AdaptedModel
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.verify.runner import Runner

from helpers import digests, kl_and_top1, poke, run_sub
from oracles import llama_logits, peft_adapter, transformers_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASE = EXAMPLES / "gpt-oss-tiny"
ADAPTER = EXAMPLES / "gpt-oss-tiny-sherlock-lora"
TEXT = ["--text", str(ADAPTER / "heldout.txt"), "--ctx", "512", "--chunks", "16"]
# Gates for a merge whose touched experts were re-encoded to MXFP4 (measured 2.7e-3 / 96.2%);
# hf-bf16 keeps the merge in BF16 and passes the default lossless gates (measured KL 1.3e-4).
REENCODED_GATES = ["--max-kld", "1e-2", "--min-top1", "0.95"]
MXFP4_TARGETS = ["mlx", "gguf", "hf", "original"]
TOUCHED_LAYERS = (1, 3)


def output_name(target: str) -> str:
    return "merged.gguf" if target == "gguf" else f"merged-{target}"


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merged")
    before = digests(ADAPTER), digests(BASE)
    out = {}
    for target in MXFP4_TARGETS + ["hf-bf16"]:
        path = root / output_name(target)
        result = run_sub("convert", str(BASE), "--adapter", str(ADAPTER), "--to", target, "-o", str(path), "--quiet")
        assert result.returncode == 0, result.stderr
        out[target] = path
    assert (digests(ADAPTER), digests(BASE)) == before  # no input changed
    return out


def verify_json(artifact: Path, *args: str) -> tuple[int, dict]:
    result = run_sub("verify", str(artifact), *args, *TEXT, "--json", "-", "--quiet")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_bundled_adapter_beats_the_base_on_its_text(merged):
    """The merged model is the fine-tune: on held-out Sherlock Holmes its perplexity is far below the base's."""
    training = json.loads((ADAPTER / "training.json").read_text())
    assert training["heldout_ppl_adapted"] < 0.5 * training["heldout_ppl_base"]
    _, report = verify_json(merged["mlx"], "--reference", str(BASE), "--no-tensors")
    ratio = report["metrics"]["ppl_ratio"]  # merged / base, on the same tokens
    assert ratio < 0.5, ratio


@pytest.mark.parametrize("target", MXFP4_TARGETS + ["hf-bf16"])
def test_every_target_passes_verify_adapter(merged, target):
    gates = [] if target == "hf-bf16" else REENCODED_GATES
    code, report = verify_json(merged[target], "--reference", str(BASE), "--adapter", str(ADAPTER), *gates)
    assert code == 0, report["reasons"]
    assert report["reference"]["adapter"]["files"]["adapter_model.safetensors"]["sha256"]
    tensors = {t["name"]: t for t in report["tensors"]["items"]}
    assert not any(t["status"] == "differs" for t in tensors.values())
    if target != "hf-bf16":  # the touched experts re-encoded, the others the base's bytes
        assert tensors["block.1.mlp.mlp1_weight"]["status"] == "within_bound"
        assert tensors["block.0.mlp.mlp1_weight"]["status"] == "identical"
    # without the adapter the same artifact is far from its reference: the check can fail
    code, report = verify_json(merged[target], "--reference", str(BASE), "--no-tensors", *gates)
    assert code == 1 and report["metrics"]["kld_mean"] > 0.1


def test_untouched_experts_are_the_base_bytes(merged):
    with OriginalCheckpoint(BASE) as base, OriginalCheckpoint(merged["original"]) as out:
        for layer in range(base.config.num_hidden_layers):
            for which in ("mlp1", "mlp2"):
                a, b = base.mxfp4(layer, which), out.mxfp4(layer, which)
                same = np.array_equal(a.blocks, b.blocks) and np.array_equal(a.scales, b.scales)
                assert same == (layer not in TOUCHED_LAYERS), (layer, which)
    report = json.loads((merged["original"] / "quantization.json").read_text())["adapter_merge"]
    touched = report["tensors"]["block.1.mlp.mlp1_weight"]
    assert touched["reencoded_experts"] == list(range(8)) and touched["recipe"] == "search"
    assert 0 < touched["mxfp4_relative_mse"] < 0.05 and touched["delta_relative_norm"] > 0
    assert "block.0.mlp.mlp1_weight" not in report["tensors"]


def test_a_merge_that_skips_one_expert_fails(merged, tmp_path):
    """One expert's delta left out (its base bytes kept): the tensor check names it."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(merged["original"], broken)
    with OriginalCheckpoint(BASE) as base, OriginalCheckpoint(broken) as out:
        name = "block.3.mlp.mlp2_weight"
        pair = base.mxfp4(3, "mlp2")
        blocks_at = 5 * pair.blocks[5].nbytes
        scales_at = 5 * pair.scales[5].nbytes
        blocks, scales = pair.blocks[5].tobytes(), pair.scales[5].tobytes()
        assert out.raw(name + ".blocks")[5].tobytes() != blocks
    poke(broken, name + ".blocks", blocks_at, blocks)
    poke(broken, name + ".scales", scales_at, scales)
    code, report = verify_json(broken, "--reference", str(BASE), "--adapter", str(ADAPTER), *REENCODED_GATES)
    assert code == 1
    failed = {t["name"]: t for t in report["tensors"]["items"] if t["status"] == "differs"}
    assert list(failed) == [name] and "expert 5" in failed[name]["detail"]


def test_reference_cache_with_adapter(merged, tmp_path):
    cache = tmp_path / "ref.npz"
    result = run_sub("reference", str(BASE), "--adapter", str(ADAPTER), "-o", str(cache), *TEXT, "--quiet")
    assert result.returncode == 0, result.stderr
    code, from_cache = verify_json(merged["gguf"], "--reference", str(cache), *REENCODED_GATES)
    _, from_checkpoint = verify_json(merged["gguf"], "--reference", str(BASE), "--adapter", str(ADAPTER),
                                     "--no-tensors", *REENCODED_GATES)
    assert code == 0
    assert from_cache["metrics"]["kld_mean"] == pytest.approx(from_checkpoint["metrics"]["kld_mean"], rel=1e-9)
    assert from_cache["reference"]["adapter"]["format"] == "peft"
    again = run_sub("verify", str(merged["gguf"]), "--reference", str(cache), "--adapter", str(ADAPTER), *TEXT)
    assert again.returncode == 2 and "already holds it" in again.stderr


# --------------------------------------------------------------------------------------
# Each merged artifact in its own runtime


def _tokens(count: int = 200) -> np.ndarray:
    from tokenizers import Tokenizer

    text = (ADAPTER / "heldout.txt").read_text(encoding="utf-8")
    return np.array(Tokenizer.from_file(str(BASE / "tokenizer.json")).encode(text).ids[:count], dtype=np.int64)


@pytest.fixture(scope="module")
def adapted_logits() -> np.ndarray:
    with OriginalCheckpoint(BASE) as base:
        model = AdaptedModel(base, formats.read_adapter(ADAPTER, base.config))
        return Runner(model, device="cpu").logits(_tokens())


def _mlx_lm_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(folder))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(tokens[None]))[0].astype(mx.float32))


def _transformers_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers_model(folder, quantization_config=transformers.Mxfp4Config(dequantize=True))
    with torch.inference_mode():
        return model(torch.as_tensor(tokens)[None]).logits[0].float().numpy()


RUNTIMES = {"mlx": _mlx_lm_logits, "gguf": llama_logits, "hf": _transformers_logits}


@pytest.mark.oracle
@pytest.mark.parametrize("target", list(RUNTIMES))
def test_runtime_runs_the_merged_model(merged, adapted_logits, target, tmp_path):
    """mlx-lm, llama.cpp and transformers run the merged artifact close to base + adapter, and the
    same runtime on the plain base far from it (each runtime's own RoPE rounding is in both)."""
    run = RUNTIMES[target]
    tokens = _tokens()
    base_artifact = tmp_path / output_name(target)
    assert run_sub("convert", str(BASE), "--to", target, "-o", str(base_artifact), "--quiet").returncode == 0
    kl_merged, top1 = kl_and_top1(run(merged[target], tokens), adapted_logits)
    kl_base, _ = kl_and_top1(run(base_artifact, tokens), adapted_logits)
    assert kl_merged < 2e-2 and top1 > 0.9, (kl_merged, top1)
    assert kl_base > 20 * kl_merged, (kl_base, kl_merged)


# --------------------------------------------------------------------------------------
# Metal: a full-vocabulary base (the only kind it stores)


@pytest.mark.oracle
def test_metal_merge_holds_what_the_original_merge_holds(metal_repo, tmp_path):
    """The Metal file of a merge passes ``verify --adapter`` (touched experts re-encoded within
    bound, the rest the base's bytes) and holds exactly the bytes of the ``original/`` merge:
    verified against that merge it is lossless (KL 0, every tensor identical)."""
    hf = tmp_path / "hf"
    assert run_sub("convert", str(metal_repo), "--to", "hf-bf16", "-o", str(hf), "--quiet").returncode == 0
    adapter = peft_adapter(hf, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                           target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"])
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(3).integers(0, 5000, size=512).astype(np.int64))
    text = ["--tokens", str(tokens), "--ctx", "256", "--json", "-", "--quiet"]
    metal, original = tmp_path / "model.bin", tmp_path / "original"
    for target, out in (("metal", metal), ("original", original)):
        assert run_sub("convert", str(metal_repo), "--adapter", str(adapter), "--to", target, "-o", str(out),
                       "--quiet").returncode == 0
    report = json.loads(run_sub("verify", str(metal), "--reference", str(metal_repo), "--adapter", str(adapter),
                                *text, "--max-kld", "10", "--min-top1", "0").stdout)
    tensors = {t["name"]: t["status"] for t in report["tensors"]["items"]}
    assert tensors["block.1.mlp.mlp1_weight"] == "within_bound" and tensors["block.0.mlp.mlp1_weight"] == "identical"
    assert "differs" not in tensors.values()
    result = run_sub("verify", str(metal), "--reference", str(original), *text)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["metrics"]["kld_mean"] < 1e-12  # Metal pre-scales q: float32 noise
    assert {t["status"] for t in report["tensors"]["items"]} == {"identical"}
