"""Promise: bounded memory. Inputs are memory-mapped and written tensor by tensor, so the peak
memory of a conversion does not grow with the model: for every registered target, a model five
times deeper (the same widths) peaks within a few MiB of the shallow one. ``synth`` and the
scan (``inspect --scan``) hold to it too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oss_convert import converters, synth

from targets import Case, params

# Wide enough that a layer is ~13 MB of MXFP4 experts: 12 more layers are ~160 MB more to read.
# Measured: Metal 222 MiB at 2 and 14 layers (its peak is the parse of the full tokenizer.json),
# the other targets 60-72 MiB.
WIDE = dict(hidden_size=512, intermediate_size=512, num_experts=32)
SHALLOW, DEEP = 2, 14
GROWTH_MIB = 48  # allowed growth of the peak; holding the extra layers would take > 150 MiB

# The peak is the process's own VmHWM: ru_maxrss is carried across fork and exec on Linux, so a
# child of a big pytest process would report the parent's size (seen: 392 MiB for a 222 MiB job).
HWM = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)"
PEAK = ("import sys; from oss_convert.cli.main import main; sys.argv = ['oss-convert', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n" + HWM)


def peak_mib(*args: str) -> float:
    result = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.strip().splitlines()[-1]) / 1024


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """(preset, layers) -> a synthetic repo, made on demand."""
    made: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("memory")

    def make(preset: str, layers: int) -> Path:
        if (preset, layers) not in made:
            config = synth.preset_with(preset, num_hidden_layers=layers, **WIDE)
            made[preset, layers] = synth.generate(root / f"{preset}-{layers}", config, seed=3, tokenizer=True)
        return made[preset, layers]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("case", [p for p in params() if p.values[0].source != "dense_repo"])
def test_a_conversion_needs_no_more_memory_for_a_deeper_model(case: Case, models, tmp_path):
    preset = "metal" if converters.TARGETS[case.target].full_vocabulary else "tiny"
    peaks = [peak_mib(*case.args(models(preset, layers), tmp_path / str(layers) / case.output))
             for layers in (SHALLOW, DEEP)]
    assert peaks[1] < peaks[0] + GROWTH_MIB, f"{case.name}: peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"


@pytest.mark.slow
def test_generate_streams_in_bounded_memory(tmp_path):
    """A 50-layer, 200 MB-per-layer model needs no more memory than a 2-layer one."""
    script = (
        "import resource, sys; from oss_convert import synth;"
        "cfg = synth.preset_with('tiny', num_hidden_layers=int(sys.argv[2]), num_experts=32, hidden_size=1024,"
        " intermediate_size=1024, vocab_size=4096);"
        "synth.generate(sys.argv[1], cfg);"
        + HWM.replace(", file=sys.stderr", "")
    )
    peaks = []
    for layers in (2, 20):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"m{layers}"), str(layers)],
                             check=True, capture_output=True, text=True)
        peaks.append(int(out.stdout.strip()) / 1024)  # MiB
    size = sum(p.stat().st_size for p in (tmp_path / "m20").rglob("*.safetensors")) / 2**20
    assert size > 900
    assert peaks[1] < peaks[0] + 64, f"peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"

    # Reading every byte back (inspect --scan) through the memory map stays flat as well:
    # touched file pages count towards RSS unless the reader unmaps them as it goes.
    scan = (
        "import resource, sys; from oss_convert.formats.original import OriginalCheckpoint;"
        "ckpt = OriginalCheckpoint(sys.argv[1]); assert ckpt.scan() == [];" + HWM.replace(", file=sys.stderr", "")
    )
    out = subprocess.run([sys.executable, "-c", scan, str(tmp_path / "m20")], check=True, capture_output=True, text=True)
    assert int(out.stdout.strip()) / 1024 < peaks[0] + 160, "scan held the file's pages"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mlx", "gguf", "hf"])
def test_an_adapter_merge_needs_no_more_memory_for_a_deeper_model(target, models, tmp_path):
    """``convert --adapter`` with an adapter on the attention and every expert of every layer (so
    the deep model re-encodes 7x the experts): the peak stays that of the shallow merge."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from merge_bench import write_adapter  # the benchmark's PEFT adapter, at these widths

    peaks = []
    for layers in (SHALLOW, DEEP):
        repo = models("tiny", layers)
        config = json.loads((repo / "original" / "config.json").read_text())
        adapter = tmp_path / f"adapter-{layers}"
        write_adapter(config, list(range(layers)), adapter)
        out = tmp_path / str(layers) / ("out.gguf" if target == "gguf" else "out")
        peaks.append(peak_mib("convert", str(repo), "--to", target, "-o", str(out), "--adapter", str(adapter), "--quiet"))
    assert peaks[1] < peaks[0] + GROWTH_MIB, f"{target}: peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"


@pytest.mark.oracle
def test_every_reader_gives_the_runner_one_expert_as_its_layer_holds_it(tiny_repo, dense_repo, tiny_hf, tmp_path):
    """The runner asks for one expert at a time (``expert_f32``), never a whole layer in float32 (a
    120b layer is 8.5 GB): for every format and every expert storage (MXFP4, BF16 in either
    orientation, llama.cpp's Q8_0, MLX affine 4-bit), that expert of the whole layer, bit for bit."""
    import ctypes

    import llama_cpp

    from oss_convert import formats

    def llama_q8_0(src: Path, out: Path) -> Path:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
        return out

    c = converters.convert
    artifacts = {"original MXFP4": tiny_repo, "original BF16": dense_repo, "hf BF16": tiny_hf,
                 "hf MXFP4": c(tiny_repo, "hf", tmp_path / "hf").output,
                 "gguf MXFP4": c(tiny_repo, "gguf", tmp_path / "m.gguf").output,
                 "gguf Q8_0": llama_q8_0(c(tiny_repo, "gguf", tmp_path / "bf16.gguf").output, tmp_path / "q8.gguf"),
                 "mlx MXFP4": c(tiny_repo, "mlx", tmp_path / "mlx").output,
                 "mlx affine 4-bit experts": _affine_experts(c(tiny_repo, "mlx", tmp_path / "mlx-a").output)}
    storages = set()
    for kind, path in artifacts.items():
        model = formats.open_canonical(path)
        for which in ("mlp1", "mlp2"):
            name = f"block.1.mlp.{which}_weight"
            storages.add(model.storage(name))
            whole = model.f32(name)
            for e in (0, model.config.num_experts - 1):
                one = model.expert_f32(name, e)
                assert one.dtype == np.float32 and np.array_equal(one, whole[e]), (kind, name, e)
    assert {"MXFP4", "BF16"} <= storages and any("Q8_0" in s for s in storages) and any("affine" in s for s in storages)


def _affine_experts(folder: Path) -> Path:
    """An MLX folder whose experts mlx-lm would hold as affine 4-bit (``mx.quantize``, a module entry
    each in config.json), as a stranger's quant may: made from ours, in place."""
    import mlx.core as mx

    from oss_convert import formats

    model, weights = formats.open_canonical(folder), mx.load(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    for n in range(model.config.num_hidden_layers):
        for which, modules in (("mlp1", ("gate_proj", "up_proj")), ("mlp2", ("down_proj",))):
            whole = model.f32(f"block.{n}.mlp.{which}_weight")
            for module, dense in zip(modules, [whole[:, 0::2], whole[:, 1::2]] if which == "mlp1" else [whole]):
                key = f"model.layers.{n}.mlp.experts.{module}"
                w, scales, biases = mx.quantize(mx.array(dense).astype(mx.bfloat16), group_size=32, bits=4, mode="affine")
                weights.update({key + ".weight": w, key + ".scales": scales, key + ".biases": biases})
                for entry in ("quantization", "quantization_config"):
                    config[entry][key] = {"group_size": 32, "bits": 4, "mode": "affine"}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: "model.safetensors" for name in sorted(weights)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_a_dense_fine_tunes_reference_needs_no_more_memory_for_more_experts(tmp_path):
    """A BF16 fine-tune in the transformers layout (experts stored transposed) is run one expert at
    a time, each expert's mapped pages released: eight times the experts a layer peaks within a
    few MiB (the layer in float32 and its pages would be ~170 MiB more). The MLX path holds a group
    of experts instead (``expert_groups``, at most 1 GiB), read the same way: the next test."""
    device = "cpu"
    peaks = []
    for experts in (8, 64):
        config = synth.preset_with("tiny", num_hidden_layers=2, hidden_size=512, intermediate_size=384,
                                   num_experts=experts)
        repo = synth.generate(tmp_path / f"m{experts}", config, seed=3, experts="bf16", tokenizer=True)
        hf = converters.convert(repo, "hf-bf16", tmp_path / f"hf{experts}").output
        ids = tmp_path / "ids.npy"
        np.save(ids, np.random.default_rng(1).integers(0, config.vocab_size, size=512))
        peaks.append(peak_mib("reference", str(hf), "-o", str(tmp_path / f"r{experts}.npz"), "--device", device,
                              "--tokens", str(ids), "--ctx", "256", "-q"))
    assert peaks[1] < peaks[0] + GROWTH_MIB, f"peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"


def test_the_mlx_path_reads_a_dense_reader_one_expert_at_a_time(tiny_hf, monkeypatch):
    """On the MLX path a transformers-layout BF16 checkpoint's experts (which cannot move as bits:
    they are stored transposed) are read a group of experts at a time, expert by expert, never as
    the layer: the whole layer asked of the reader fails this test."""
    from oss_convert import formats
    from oss_convert.formats.hf import HfCheckpoint
    from oss_convert.verify.runner import _DeviceExperts

    model = formats.open_canonical(tiny_hf)
    assert isinstance(model, HfCheckpoint) and model.storage("block.1.mlp.mlp1_weight") == "BF16"
    want = {w: model.f32(f"block.1.mlp.{w}_weight") for w in ("mlp1", "mlp2")}

    def no_whole_layers(name):
        assert "mlp.mlp" not in name, f"the whole of {name} was read"
        return HfCheckpoint.f32(model, name)

    monkeypatch.setattr(model, "f32", no_whole_layers)
    for which in ("mlp1", "mlp2"):
        experts = _DeviceExperts(model, 1, which, quantized=True)
        got = np.concatenate([np.array(experts.f32(g0, g1)) for g0, g1 in experts.groups])
        assert np.array_equal(got, want[which])


def test_merge_workers_run_ahead_only_as_far_as_the_spill_allows(models, monkeypatch, tmp_path):
    """On worker processes the experts of the adapted layers are encoded from the target's first
    tensor on, ahead of it, into temporary files: as far as ``SPILL_AHEAD_BYTES`` holds (here two
    layers beyond the next), never the whole model's; the layers behind the target are dropped."""
    from oss_convert import adapters, encode_workers, formats
    from oss_convert.formats.hf import open_source

    if not encode_workers.available():
        pytest.skip("worker processes need Linux and two cores")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from merge_bench import write_adapter

    repo = models("tiny", DEEP)
    config = json.loads((repo / "original" / "config.json").read_text())
    write_adapter(config, [1, 2, 4, 5, 6, 9, 13], tmp_path / "adapter")
    layer_bytes = sum(config["num_experts"] * r * c * 17 // 32 for r, c in
                      ((2 * config["intermediate_size"], config["hidden_size"]),
                       (config["hidden_size"], config["intermediate_size"])))
    monkeypatch.setattr(adapters, "SPILL_AHEAD_BYTES", 2 * layer_bytes)
    with open_source(repo) as base:
        src = adapters.MergedSource(base, formats.read_adapter(tmp_path / "adapter", base.config), workers=True)
        try:
            def live() -> list[int]:
                return sorted({int(name.split(".")[1]) for name in src._merges})

            src.raw("embedding.weight")  # the target's first tensor: the workers start
            assert live() == [1, 2, 4]
            src.raw("block.3.attn.qkv.weight")  # a dense tensor moves nothing (Metal reads them all first)
            assert live() == [1, 2, 4]
            np.asarray(src.mxfp4(5, "mlp1").blocks[0])
            assert live() == [5, 6, 9]
            np.asarray(src.mxfp4(0, "mlp2").blocks[0])  # back to the first layer: made again
            assert live() == [1, 2, 4]
        finally:
            src.close()
