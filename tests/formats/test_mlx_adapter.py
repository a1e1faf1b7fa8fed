"""mlx-lm LoRA adapters: read, merged and applied as mlx-lm itself does.

Oracles: mlx-lm's own LoRA layers (``tuner.utils.linear_to_lora_layers``, their ``fuse``) and
``mlx_lm.load(base, adapter_path=...)``. The adapters are written by mlx-lm's code the way
``mlx_lm.lora`` saves them (its trainable parameters, ``adapter_config.json`` with ``scale``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oss_convert import formats
from oss_convert.adapters import AdaptedModel

from helpers import kl_and_top1, run_sub

BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "gpt-oss-tiny"
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def mlx_lm_adapter(base_mlx: Path, out: Path, *, num_layers: int, keys: list[str] | None = None, seed: int = 0,
                   b_scale: float = 0.02) -> Path:
    """An adapter as ``mlx_lm.lora`` writes one: mlx-lm's LoRA layers on the last ``num_layers``
    layers, every ``lora_b`` random (a trained one is not zero), saved with ``mx.save_safetensors``."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(base_mlx))
    model.freeze()
    config = {**LORA, **({"keys": keys} if keys else {})}
    mx.random.seed(seed)  # before the LoRA layers: their lora_a is drawn from MLX's time-seeded generator
    linear_to_lora_layers(model, num_layers, config)
    params = dict(tree_flatten(model.trainable_parameters()))
    params = {k: (mx.random.normal(v.shape) * b_scale).astype(v.dtype) if k.endswith("lora_b") else v
              for k, v in params.items()}
    model.update(tree_unflatten(list(params.items())))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), params)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": config}))
    return out


@pytest.fixture(scope="module")
def tiny_mlx(tiny_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlxbase") / "mlx"
    assert run_sub("convert", str(tiny_repo), "--to", "mlx", "-o", str(out), "--quiet").returncode == 0
    return out


@pytest.mark.oracle
def test_deltas_are_mlx_lm_fuse(tiny_mlx, tmp_path):
    """Every adapted weight (attention, router, gate/up/down experts) equals what mlx-lm's own
    ``fuse`` makes of the same adapter in float32, to float32 rounding."""
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load

    adapter = mlx_lm_adapter(tiny_mlx, tmp_path / "adapter", num_layers=2)
    model, _ = load(str(tiny_mlx), adapter_path=str(adapter))
    model.set_dtype(mx.float32)
    with formats.open_canonical(tiny_mlx) as base:
        ours = AdaptedModel(base, formats.read_adapter(adapter, base.config))
        q, k, v = base.config.qkv_rows
        checked = 0
        for n in (2, 3):
            layer = model.model.layers[n]
            qkv = ours.f32(f"block.{n}.attn.qkv.weight")
            for module, rows in ((layer.self_attn.q_proj, slice(0, q)), (layer.self_attn.k_proj, slice(q, q + k)),
                                 (layer.self_attn.v_proj, slice(q + k, q + k + v))):
                _close(module.fuse(dequantize=True).weight, qkv[rows])
            _close(layer.self_attn.o_proj.fuse(dequantize=True).weight, ours.f32(f"block.{n}.attn.out.weight"))
            _close(layer.mlp.router.fuse(dequantize=True).weight, ours.f32(f"block.{n}.mlp.gate.weight"))
            experts = layer.mlp.experts
            fused = {name: np.array(getattr(experts, name).fuse(dequantize=True).weight.astype(mx.float32))
                     for name in ("gate_proj", "up_proj", "down_proj")}
            for e in range(base.config.num_experts):
                mlp1 = ours.expert_f32(f"block.{n}.mlp.mlp1_weight", e)
                base1 = ours.base_expert_f32(n, "mlp1", e)
                _close_bf16(fused["gate_proj"][e], mlp1[0::2], base1[0::2])
                _close_bf16(fused["up_proj"][e], mlp1[1::2], base1[1::2])
                _close_bf16(fused["down_proj"][e], ours.expert_f32(f"block.{n}.mlp.mlp2_weight", e),
                            ours.base_expert_f32(n, "mlp2", e))
            checked += 1
        # the layers mlx-lm left alone are the base's
        assert np.array_equal(ours.f32("block.0.attn.qkv.weight"), base.f32("block.0.attn.qkv.weight"))
    assert checked == 2


def _close_bf16(theirs: np.ndarray, ours: np.ndarray, base: np.ndarray) -> None:
    """mlx-lm fuses quantized experts in BF16 (the dequantized weight's dtype): the delta rounded,
    then the sum. Ours must lie within those two roundings of it, and the delta must be far larger
    than that bound, or a misplaced delta (gate for up, a transposed expert) would pass."""
    delta = ours - base
    # the last term: float32's own error in the rank-r product, which the roundings' relative
    # bound misses where the r terms cancel (seen: a delta of 1e-8 from terms of 1e-2)
    bound = (np.abs(ours) + np.abs(delta)) * 2.0 ** -8 + np.abs(delta).max() * 2.0 ** -18 + 2.0 ** -133
    assert (np.abs(ours - theirs) <= bound).all()
    assert np.abs(delta).max() > 10 * bound.max()


def _close(theirs, ours: np.ndarray) -> None:
    import mlx.core as mx

    theirs = np.array(theirs.astype(mx.float32)) if not isinstance(theirs, np.ndarray) else theirs
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=1e-7)


@pytest.fixture(scope="module")
def bundled_mlx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundledmlx") / "mlx"
    assert run_sub("convert", str(BUNDLED), "--to", "mlx", "-o", str(out), "--quiet").returncode == 0
    return out


@pytest.mark.oracle
def test_mlx_lm_with_adapter_matches_our_merged_mlx(bundled_mlx, tmp_path):
    """mlx-lm running base + adapter against mlx-lm running our merged ``--to mlx`` of the bundled
    trained model: they differ only by the merge's storage (BF16 once, touched experts
    re-encoded to MXFP4), far less than the adapter itself changes."""
    from mlx_lm import load

    import mlx.core as mx

    adapter = mlx_lm_adapter(bundled_mlx, tmp_path / "adapter", num_layers=2)
    merged = tmp_path / "merged"
    result = run_sub("convert", str(BUNDLED), "--adapter", str(adapter), "--to", "mlx", "-o", str(merged), "--quiet")
    assert result.returncode == 0, result.stderr
    tokens = _heldout_tokens(256)

    def logits(folder, **kwargs):
        model, _ = load(str(folder), **kwargs)
        model.set_dtype(mx.float32)
        return np.array(model(mx.array(tokens[None]))[0].astype(mx.float32))

    applied = logits(bundled_mlx, adapter_path=str(adapter))
    kl_merge, top1 = kl_and_top1(logits(merged), applied)
    kl_adapter, _ = kl_and_top1(logits(bundled_mlx), applied)
    assert kl_merge < 1e-2 and top1 > 0.9, (kl_merge, top1)
    assert kl_adapter > 10 * kl_merge, (kl_adapter, kl_merge)


def _heldout_tokens(count: int) -> np.ndarray:
    from tokenizers import Tokenizer

    text = (BUNDLED / "heldout.txt").read_text(encoding="utf-8")
    return np.array(Tokenizer.from_file(str(BUNDLED / "tokenizer.json")).encode(text).ids[:count], dtype=np.int64)


@pytest.mark.oracle
def test_inspect_and_refusals(tiny_repo, tiny_mlx, tmp_path):
    adapter = mlx_lm_adapter(tiny_mlx, tmp_path / "adapter", num_layers=1, keys=["self_attn.q_proj", "mlp.experts.up_proj"])
    info = json.loads(run_sub("inspect", str(adapter), "--json").stdout)
    assert info["kind"] == "mlx-lm-adapter" and info["layers"] == [3]
    assert set(info["modules"]) == {"self_attn.q_proj", "mlp.experts.up_proj"} and info["scale"] == 10.0
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "dora"}))
    out = tmp_path / "out"
    result = run_sub("convert", str(tiny_repo), "--adapter", str(adapter), "--to", "gguf", "-o", str(out))
    assert result.returncode == 2 and "dora" in result.stderr and not out.exists()


@pytest.mark.oracle
def test_mlx_lm_adapter_merges_the_same_on_workers_and_threads(bundled_mlx, tmp_path):
    """mlx-lm's gate and up pairs (two terms on the even and odd rows of mlp1, scaled first): a
    merge on worker processes, each making its chunks' delta, writes the bytes, manifest and
    report a merge on threads writes."""
    from oss_convert import converters, encode_workers

    from helpers import tree_hashes

    if not encode_workers.available():
        pytest.skip("worker processes need Linux and two cores")
    adapter = mlx_lm_adapter(bundled_mlx, tmp_path / "adapter", num_layers=2)
    outputs = []
    for workers in (True, False):
        out = tmp_path / str(workers) / "model"
        converters.convert(BUNDLED, "original", out, adapter=adapter, merge_workers=workers, recipe="search")
        outputs.append(tree_hashes(out.parent))
    assert outputs[0] == outputs[1]
    report = json.loads((tmp_path / "True" / "model" / "quantization.json").read_text())
    assert any(t.get("reencoded_experts") for t in report["adapter_merge"]["tensors"].values())
