"""LoRA adapters served unmerged: ``convert ADAPTER --to gguf|mlx --base BASE``.

Oracles: llama.cpp's own LoRA runtime (``Llama(model_path=base.gguf, lora_path=ours.gguf)``,
which applies the pairs to the expert matmuls through ``mul_mat_id``) and mlx-lm's
(``mlx_lm.load(base, adapter_path=ours)``), each against the same runtime on our merge of the same
adapter; PEFT writes the adapters. The written adapters read back (our GGUF LoRA and mlx-lm
readers, the latter proven against mlx-lm's own fuse in test_mlx_adapter.py) to PEFT's deltas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oss_convert import formats
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.model import expected_tensors, is_expert_weight

from helpers import digests, kl_and_top1, run_sub
from oracles import llama_logits, peft_adapter

# PEFT adapters of the tiny model: attention only, the experts of some layers only, both with
# rank/alpha patterns (llama.cpp and mlx-lm have one alpha or scale per adapter: folded into B).
CONFIGS = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "experts": dict(r=4, lora_alpha=8, target_modules=[],
                    target_parameters=[f"{n}.mlp.experts.{p}" for n in (0, 2) for p in ("gate_up_proj", "down_proj")]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                     rank_pattern={"q_proj": 8}, alpha_pattern={"o_proj": 32}),
}


BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "gpt-oss-tiny"
# B's scale of the adapters of the trained model: an adapter on the experts alone moves the model
# least, so its B is larger, keeping the adapter's effect far above the re-encoding's cost
TRAINED_B_SCALE = {"attention": 1.0, "experts": 2.0, "patterns": 1.0}

# KL between the runtime applying our adapter and the same runtime on our merge: the storage's
# cost. Measured on the bundled model (llama.cpp; mlx-lm alike): attention 2.0e-4 (BF16 once),
# experts 3.4e-3 and patterns 6.4e-3 (touched experts re-encoded), top-1 0.93 and more, where the
# adapters move the base by a KL of 1.52, 0.16 and 2.5 (47x and more); a misplaced pair moves it
# by about that much.
BOUNDS = {"attention": 5e-3, "experts": 2e-2, "patterns": 2e-2}


@pytest.fixture(scope="module")
def adapters(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("runtime-adapters")
    return {name: peft_adapter(tiny_hf, root / name, seed=i, b_scale=0.2, **config)
            for i, (name, config) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The bundled trained model (its routing has margins; random weights have near-ties that a
    BF16 rounding flips) as GGUF and MLX, and PEFT adapters of it."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("trained-adapters")
    made = {"repo": BUNDLED}
    for target, out in (("hf-bf16", root / "hf"), ("gguf", root / "base.gguf"), ("mlx", root / "base-mlx")):
        assert run_sub("convert", str(BUNDLED), "--to", target, "-o", str(out), "--quiet").returncode == 0
        made[target] = out
    for i, (name, config) in enumerate(CONFIGS.items()):
        made[name] = peft_adapter(made["hf-bf16"], root / name, seed=i, b_scale=TRAINED_B_SCALE[name], **config)
    return made


def _tokens(count: int = 200) -> np.ndarray:
    from tokenizers import Tokenizer

    text = (BUNDLED / "heldout.txt").read_text(encoding="utf-8")
    return np.array(Tokenizer.from_file(str(BUNDLED / "tokenizer.json")).encode(text).ids[:count], dtype=np.int64)


def written(adapter: Path, target: str, base: Path, out: Path) -> Path:
    result = run_sub("convert", str(adapter), "--to", target, "--base", str(base), "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def _deltas(adapter, config) -> dict[str, list[np.ndarray]]:
    shapes = {s.name: s.shape for s in expected_tensors(config, "bf16")}
    out = {}
    for name in adapter.by_target:
        experts = range(config.num_experts) if is_expert_weight(name) else [None]
        out[name] = [adapter.delta(name, shapes[name], e) for e in experts]
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("target", ["gguf", "mlx"])
def test_written_adapter_reads_back_as_the_peft_deltas(tiny_repo, adapters, name, target, tmp_path):
    """Every delta, expert by expert: exact where the scaling stayed the runtime's own, within
    float32 rounding where it was folded into B (the patterns)."""
    out = written(adapters[name], target, tiny_repo, tmp_path / ("lora.gguf" if target == "gguf" else "lora"))
    with OriginalCheckpoint(tiny_repo) as base:
        theirs = _deltas(formats.read_adapter(adapters[name], base.config), base.config)
        ours = _deltas(formats.read_adapter(out, base.config), base.config)
    assert set(ours) == set(theirs)
    for tensor, expected in theirs.items():
        for e, (got, want) in enumerate(zip(ours[tensor], expected)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max(), err_msg=f"{tensor}[{e}]")


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_runs_our_gguf_lora_as_our_merge(trained, name, tmp_path):
    """llama.cpp, base + our GGUF LoRA against llama.cpp on our merged GGUF of the same adapter:
    they differ only by the merge's storage (BF16 once; touched experts re-encoded to MXFP4),
    far less than the adapter changes the base."""
    lora = written(trained[name], "gguf", BUNDLED, tmp_path / "lora.gguf")
    merged = tmp_path / "merged.gguf"
    assert run_sub("convert", str(BUNDLED), "--adapter", str(trained[name]), "--to", "gguf", "-o", str(merged),
                   "--quiet").returncode == 0
    tokens = _tokens()
    with_lora = llama_logits(trained["gguf"], tokens, lora_path=str(lora))
    kl_merge, top1 = kl_and_top1(with_lora, llama_logits(merged, tokens))
    kl_base, _ = kl_and_top1(with_lora, llama_logits(trained["gguf"], tokens))
    bound = BOUNDS[name]
    assert kl_merge < bound and top1 > 0.9, (kl_merge, top1)
    assert kl_base > 8 * kl_merge, (kl_base, kl_merge)


@pytest.mark.oracle
def test_llama_cpp_sees_one_zeroed_expert(tiny_repo, tiny_gguf, adapters, tokens_300, tmp_path):
    """An adapter with expert 3's pairs zeroed: its GGUF pairs are zero for that expert only, and
    llama.cpp's output moves away from the full adapter's."""
    from safetensors.numpy import load_file, save_file

    source = adapters["experts"]
    zeroed = tmp_path / "zeroed"
    zeroed.mkdir()
    (zeroed / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(str(source / "adapter_model.safetensors"))
    E = 8  # the tiny model's experts
    for key in tensors:
        if "lora_B" in key:  # rank-major: expert 3 owns columns 3, 3+E, ...
            tensors[key][:, 3::E] = 0
    save_file(tensors, str(zeroed / "adapter_model.safetensors"))
    full, part = (written(a, "gguf", tiny_repo, tmp_path / f"{n}.gguf") for n, a in (("full", source), ("zeroed", zeroed)))
    import gguf

    full_t = {t.name: np.array(t.data) for t in gguf.GGUFReader(full).tensors}
    part_t = {t.name: np.array(t.data) for t in gguf.GGUFReader(part).tensors}
    for key, value in part_t.items():
        if key.endswith("exps.weight.lora_b"):
            assert not value[3].any() and np.array_equal(value[:3], full_t[key][:3]), key
    tokens = tokens_300[:200]
    kl, _ = kl_and_top1(llama_logits(tiny_gguf, tokens, lora_path=str(part)),
                        llama_logits(tiny_gguf, tokens, lora_path=str(full)))
    assert kl > 1e-5


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mlx_lm_runs_our_adapter_as_our_merge(trained, name, tmp_path):
    """``mlx_lm.load(base, adapter_path=ours)`` against mlx-lm on our merged ``--to mlx``."""
    import mlx.core as mx
    from mlx_lm import load

    base, merged = trained["mlx"], tmp_path / "merged"
    assert run_sub("convert", str(BUNDLED), "--adapter", str(trained[name]), "--to", "mlx", "-o", str(merged),
                   "--quiet").returncode == 0
    lora = written(trained[name], "mlx", BUNDLED, tmp_path / "lora")
    tokens = _tokens()

    def logits(folder: Path, adapter: Path | None = None) -> np.ndarray:
        model, _ = load(str(folder), adapter_path=str(adapter) if adapter else None)
        model.set_dtype(mx.float32)
        return np.array(model(mx.array(tokens[None]))[0].astype(mx.float32)).astype(np.float64)

    with_lora = logits(base, lora)
    kl_merge, top1 = kl_and_top1(with_lora, logits(merged))
    kl_base, _ = kl_and_top1(with_lora, logits(base))
    assert kl_merge < BOUNDS[name] and top1 > 0.9, (kl_merge, top1)
    assert kl_base > 8 * kl_merge, (kl_base, kl_merge)


@pytest.mark.oracle
def test_inspect_and_manifest_of_written_adapters(tiny_repo, adapters, tmp_path):
    from oss_convert.hashing import file_sha256

    lora = written(adapters["patterns"], "gguf", tiny_repo, tmp_path / "lora.gguf")
    folder = written(adapters["patterns"], "mlx", tiny_repo, tmp_path / "lora-mlx")
    for path, kind in ((lora, "gguf-lora"), (folder, "mlx-lm-adapter")):
        info = json.loads(run_sub("inspect", str(path), "--json").stdout)
        assert info["kind"] == kind and info["pairs"] > 0
        assert set(info["modules"]) and info["layers"] == list(range(4))
    manifest = json.loads((tmp_path / "lora.gguf.manifest.json").read_text())
    source = adapters["patterns"] / "adapter_model.safetensors"
    assert manifest["source"]["files"]["adapter_model.safetensors"]["sha256"] == file_sha256(source)
    assert manifest["base"]["config"]["sha256"] == file_sha256(tiny_repo / "original" / "config.json")
    assert manifest["outputs"]["lora.gguf"]["sha256"] == file_sha256(lora)
    assert run_sub("verify", "--integrity", str(lora)).returncode == 0
    assert run_sub("verify", "--integrity", str(folder)).returncode == 0
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 8 and config["lora_parameters"]["scale"] == 1.0  # folded, padded


@pytest.mark.oracle
def test_refusals_write_nothing(tiny_repo, metal_repo, adapters, tmp_path):
    adapter = adapters["attention"]
    before = digests(adapter)
    cases = {
        "another base": (["--to", "gguf", "--base", str(metal_repo)], "layers"),
        "not a runtime adapter": (["--to", "metal", "--base", str(tiny_repo)], "gguf or mlx"),
        "no base": (["--to", "gguf"], "--base"),
        "options": (["--to", "gguf", "--base", str(tiny_repo), "--outtype", "q8_0"], "no other option"),
    }
    for case, (args, message) in cases.items():
        out = tmp_path / case.replace(" ", "-")
        result = run_sub("convert", str(adapter), *args, "-o", str(out), "--quiet")
        assert result.returncode == 2 and message in result.stderr, (case, result.stderr)
        assert not out.exists() and not list(tmp_path.glob(f"{out.name}*")), case
    assert digests(adapter) == before


@pytest.mark.oracle
def test_an_mlx_lm_adapter_becomes_a_gguf_lora(trained, tmp_path):
    """An adapter mlx-lm wrote (gate and up as separate pairs, its scale-first order) as a GGUF
    LoRA: the same deltas read back, and llama.cpp runs it as our merge of it."""
    from test_mlx_adapter import mlx_lm_adapter

    adapter = mlx_lm_adapter(trained["mlx"], tmp_path / "mlx-adapter", num_layers=2)
    lora = written(adapter, "gguf", BUNDLED, tmp_path / "lora.gguf")
    with OriginalCheckpoint(BUNDLED) as base:
        theirs = _deltas(formats.read_adapter(adapter, base.config), base.config)
        ours = _deltas(formats.read_adapter(lora, base.config), base.config)
    assert set(ours) == set(theirs) and any(is_expert_weight(name) for name in ours)
    for tensor, expected in theirs.items():
        for e, (got, want) in enumerate(zip(ours[tensor], expected)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=f"{tensor}[{e}]")
    merged = tmp_path / "merged.gguf"
    assert run_sub("convert", str(BUNDLED), "--adapter", str(adapter), "--to", "gguf", "-o", str(merged),
                   "--quiet").returncode == 0
    tokens = _tokens()
    with_lora = llama_logits(trained["gguf"], tokens, lora_path=str(lora))
    kl_merge, _ = kl_and_top1(with_lora, llama_logits(merged, tokens))
    kl_base, _ = kl_and_top1(with_lora, llama_logits(trained["gguf"], tokens))
    assert kl_base > 8 * kl_merge, (kl_base, kl_merge)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["attention", "patterns"])
def test_mlx_lm_fuses_our_adapter_to_the_exact_merge(trained, name, tmp_path):
    """mlx-lm's own merge (``fuse``) of each LoRA layer it built from our adapter equals the exact
    float32 merge of the PEFT adapter: to float32 rounding for the attention, within the BF16
    roundings mlx-lm's fuse makes of dequantized experts."""
    import mlx.core as mx
    from mlx_lm import load

    from oss_convert.adapters import AdaptedModel
    from test_mlx_adapter import _close, _close_bf16

    lora = written(trained[name], "mlx", BUNDLED, tmp_path / "lora")
    model, _ = load(str(trained["mlx"]), adapter_path=str(lora))
    model.set_dtype(mx.float32)
    with OriginalCheckpoint(BUNDLED) as base:
        exact = AdaptedModel(base, formats.read_adapter(trained[name], base.config))
        q, k, v = base.config.qkv_rows
        checked = 0
        for n, layer in enumerate(model.model.layers):
            qkv = exact.f32(f"block.{n}.attn.qkv.weight")
            attn = layer.self_attn
            for module, rows in ((attn.q_proj, slice(0, q)), (attn.k_proj, slice(q, q + k)),
                                 (attn.v_proj, slice(q + k, q + k + v))):
                if hasattr(module, "lora_a"):
                    _close(module.fuse(dequantize=True).weight, qkv[rows])
                    checked += 1
            if hasattr(attn.o_proj, "lora_a"):
                _close(attn.o_proj.fuse(dequantize=True).weight, exact.f32(f"block.{n}.attn.out.weight"))
                checked += 1
            experts = layer.mlp.experts
            if not hasattr(experts.gate_proj, "lora_a"):
                continue
            fused = {part: np.array(getattr(experts, part).fuse(dequantize=True).weight.astype(mx.float32))
                     for part in ("gate_proj", "up_proj", "down_proj")}
            for e in range(base.config.num_experts):
                mlp1, base1 = exact.expert_f32(f"block.{n}.mlp.mlp1_weight", e), exact.base_expert_f32(n, "mlp1", e)
                _close_bf16(fused["gate_proj"][e], mlp1[0::2], base1[0::2])
                _close_bf16(fused["up_proj"][e], mlp1[1::2], base1[1::2])
                _close_bf16(fused["down_proj"][e], exact.expert_f32(f"block.{n}.mlp.mlp2_weight", e),
                            exact.base_expert_f32(n, "mlp2", e))
            checked += 1
    # every layer's q, k, v and o; or its q, o and experts (the patterns)
    assert checked == len(model.model.layers) * (4 if name == "attention" else 3), checked


def _gguf_lora(path: Path, tensors: dict[str, np.ndarray], *, alpha=16.0, alpha_type: str = "float32",
               raw_dtype=None) -> Path:
    """A GGUF LoRA written with gguf-py itself, metadata as given."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if alpha_type == "float32":
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    else:
        writer.add_string(gguf.Keys.Adapter.LORA_ALPHA, str(alpha))
    for name, value in tensors.items():
        writer.add_tensor(name, value, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.oracle
def test_a_gguf_lora_is_read_as_a_strangers_file(tiny_repo, adapters, tmp_path):
    """What a GGUF LoRA says is checked: alpha a finite float32 >= 0, layer numbers no gpt-oss
    exceeds (the describe of a file naming layer 999999 must not enumerate them), BF16 factors
    read as their values (gguf-py hands them out as bytes)."""
    from oss_convert.dtypes import f32_to_bf16

    lora = written(adapters["attention"], "gguf", tiny_repo, tmp_path / "lora.gguf")
    import gguf

    pairs = {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in gguf.GGUFReader(lora).tensors}
    some = {name: value for name, value in pairs.items() if name.startswith("blk.0.attn_q.")}
    bad = {
        "string alpha": (_gguf_lora(tmp_path / "s.gguf", some, alpha_type="string"), "not a float32"),
        "NaN alpha": (_gguf_lora(tmp_path / "n.gguf", some, alpha=float("nan")), "finite and >= 0"),
        "negative alpha": (_gguf_lora(tmp_path / "m.gguf", some, alpha=-1.0), "finite and >= 0"),
        "layer 999999": (_gguf_lora(tmp_path / "l.gguf", {k.replace("blk.0.", "blk.999999."): v
                                                          for k, v in some.items()}), "names layer 999999"),
    }
    for case, (path, message) in bad.items():
        for args in (("inspect", str(path)), ("convert", str(tiny_repo), "--adapter", str(path), "--to", "gguf",
                                              "-o", str(tmp_path / "out.gguf"))):
            result = run_sub(*args, "--quiet") if args[0] == "convert" else run_sub(*args)
            assert result.returncode == 2 and message in result.stderr and path.name in result.stderr, (case, result.stderr)
    assert not (tmp_path / "out.gguf").exists()
    bf16 = _gguf_lora(tmp_path / "bf16.gguf", {k: f32_to_bf16(v) for k, v in some.items()},
                      raw_dtype=gguf.GGMLQuantizationType.BF16)
    with OriginalCheckpoint(tiny_repo) as base:
        ours = formats.read_adapter(bf16, base.config)
        shape = next(s.shape for s in expected_tensors(base.config, "bf16") if s.name == "block.0.attn.qkv.weight")
        rows = base.config.qkv_slices[0]
        a = f32_to_bf16(some["blk.0.attn_q.weight.lora_a"]).astype(np.uint32) << 16
        b = f32_to_bf16(some["blk.0.attn_q.weight.lora_b"]).astype(np.uint32) << 16
        want = (b.view(np.float32) @ a.view(np.float32)) * np.float32(16.0 / a.shape[0])
        np.testing.assert_array_equal(ours.delta("block.0.attn.qkv.weight", shape)[rows], want)
