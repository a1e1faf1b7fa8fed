"""The runner's MLX path (a GPU's; MLX runs it on whatever its default device is, the CPU in CI):
the same arithmetic for every storage of the same weights, the kernels named in the report with
the noise floor measured where the two sides ran different ones, a planted defect failing, and
host memory that does not grow with the model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from oss_convert import formats, synth
from oss_convert.cli.main import cli
from oss_convert.formats import mxfp4
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.verify.reference import Reference
from oss_convert.verify.runner import Runner, expert_groups

from helpers import run_sub
from oracles import assert_wide_router_margins

from test_verify_formats import _convert, _edit_bytes_like, _expert_blocks

FAST = ["--ctx", "256", "--chunks", "2", "--quiet"]
TOKENS = np.random.default_rng(4).integers(0, 1000, size=(2, 200))  # ids every vocabulary here has


def _hidden(path, experts="quantized") -> np.ndarray:
    model = formats.open_canonical(path)
    try:
        return Runner(model, experts, device="gpu").hidden_states(TOKENS)
    finally:
        model.close()


def test_every_lossless_storage_gives_the_references_hidden_states_bit_for_bit(tiny_repo, tiny_gguf, tmp_path):
    """MXFP4 bytes decoded on the device through the CPU decoder's table, BF16 widened there, the
    same float32 products: the original/ checkpoint, its MLX and GGUF conversions, and the host-
    decoded ("dequantized") path all give identical hidden states, so a lossless artifact scores
    KL 0 exactly on a GPU as on the CPU."""
    want = _hidden(tiny_repo)
    assert np.isfinite(want).all() and np.abs(want).max() > 0.1
    assert np.array_equal(_hidden(tiny_repo, "dequantized"), want)
    assert np.array_equal(_hidden(_convert(tiny_repo, "mlx", tmp_path / "mlx")), want)
    assert np.array_equal(_hidden(tiny_gguf), want)
    assert_wide_router_margins(tiny_repo, TOKENS)  # other kernels must not break a near-tie otherwise
    with OriginalCheckpoint(tiny_repo) as ckpt:  # and near the numpy path's (other kernels)
        cpu = Runner(ckpt, device="cpu").hidden_states(TOKENS)
    assert 0 < np.abs(cpu - want).max() / np.abs(cpu).max() < 1e-5


def test_dense_experts_widened_on_the_device_match_the_hosts(dense_repo):
    """A BF16 fine-tune's experts move as bits, a group at a time, and are widened there: the
    same values as the host's float32."""
    from oss_convert.verify.runner import _DeviceExperts

    with OriginalCheckpoint(dense_repo) as ckpt:
        for which in ("mlp1", "mlp2"):
            experts = _DeviceExperts(ckpt, 1, which, quantized=True)
            assert experts.bits is not None  # moved as bits, not as the host's float32
            want = ckpt.f32(f"block.1.mlp.{which}_weight")
            got = np.concatenate([np.array(experts.f32(g0, g1)) for g0, g1 in experts.groups])
            assert np.abs(want).max() > 0 and np.array_equal(got, want)


def test_an_original_checkpoints_experts_are_read_by_mlx_itself_and_only_verbatim_bytes_are(tiny_repo):
    """MXFP4 pairs stored as the file holds them reach the device through ``mx.load`` of that file
    (MLX's own reader: faster than copying mapped pages on CUDA); an array that is not a whole
    tensor's bytes as mapped (a copy, a part) has no source, so computed bytes are never swapped
    for the stored ones."""
    from oss_convert.verify.runner import _DeviceExperts, _loaded_by_mlx

    with OriginalCheckpoint(tiny_repo) as ckpt:
        pair = ckpt.mxfp4(1, "mlp1")
        path, name = ckpt.stored_source(pair.blocks)
        assert name == "block.1.mlp.mlp1_weight.blocks" and path.suffix == ".safetensors"
        assert ckpt.stored_source(pair.scales)[1] == "block.1.mlp.mlp1_weight.scales"
        for part in (pair.blocks.copy(), pair.blocks[1:], pair.blocks[:-1], np.ascontiguousarray(pair.blocks[:, ::2])):
            assert ckpt.stored_source(part) is None
        blocks, scales = _loaded_by_mlx(ckpt, pair)
        assert np.array_equal(np.array(blocks), pair.blocks) and np.array_equal(np.array(scales), pair.scales)
        assert _loaded_by_mlx(ckpt, type(pair)(pair.blocks.copy(), pair.scales)) is None
        for which in ("mlp1", "mlp2"):
            experts = _DeviceExperts(ckpt, 1, which, quantized=True)
            got = np.concatenate([np.array(experts.f32(g0, g1)) for g0, g1 in experts.groups])
            assert np.array_equal(got, ckpt.f32(f"block.1.mlp.{which}_weight"))


def test_an_mlx_artifacts_experts_are_read_by_mlx_itself_as_openai_bytes(tiny_repo, tmp_path, monkeypatch):
    """An MLX artifact's experts are uint32 words, ``mlp1`` stored as gate and up apart: MLX loads
    the files' words, views them as OpenAI's bytes and interleaves the halves on the device; the
    decoded experts are the reader's bit for bit, and nothing is copied from the host."""
    import oss_convert.verify.runner as runner

    model = formats.open_canonical(_convert(tiny_repo, "mlx", tmp_path / "mlx"))
    try:
        gate, up = model.mxfp4_halves(1, "mlp1")
        pair = model.mxfp4(1, "mlp2")
        for half in (gate, up, pair):
            name = model.stored_source(half.blocks)[1]
            assert name.endswith(".weight") and model.stored_source(half.scales)[1].endswith(".scales")
            blocks, scales = runner._loaded_by_mlx(model, half)
            assert blocks.dtype == scales.dtype == runner.mx.uint8
            assert np.array_equal(np.array(blocks), half.blocks) and np.array_equal(np.array(scales), half.scales)
        assert model.stored_source(model.mxfp4(1, "mlp1").blocks) is None  # interleaved on the host: computed

        def no_copy(*args):
            raise AssertionError("copied from the host")

        monkeypatch.setattr(runner, "_bytes_on_device", no_copy)
        for which in ("mlp1", "mlp2"):
            experts = runner._DeviceExperts(model, 1, which, quantized=True)
            got = np.concatenate([np.array(experts.f32(g0, g1)) for g0, g1 in experts.groups])
            want = model.f32(f"block.1.mlp.{which}_weight")
            assert np.abs(want).max() > 0 and np.array_equal(got, want)
    finally:
        model.close()


def test_experts_mlx_cannot_load_are_copied_instead(tiny_repo, monkeypatch):
    """MLX's safetensors parser has limits of its own (a header under 100,000,000 bytes, ours
    100 MiB): a file our reader accepted and MLX refuses is copied as before, not a crash."""
    import mlx.core as mx

    from oss_convert.verify.runner import _DeviceExperts, _loaded_by_mlx

    def refuse(path, *args, **kwargs):
        raise RuntimeError(f"[load_safetensors] Invalid json header length {path}")

    with OriginalCheckpoint(tiny_repo) as ckpt:
        monkeypatch.setattr(mx, "load", refuse)
        assert _loaded_by_mlx(ckpt, ckpt.mxfp4(1, "mlp1")) is None
        experts = _DeviceExperts(ckpt, 1, "mlp1", quantized=True)
        got = np.concatenate([np.array(experts.f32(g0, g1)) for g0, g1 in experts.groups])
        assert np.array_equal(got, ckpt.f32("block.1.mlp.mlp1_weight"))


def test_metal_gives_the_references_hidden_states_bit_for_bit(metal_repo, metal_bin):
    assert np.array_equal(_hidden(metal_bin), _hidden(metal_repo))


def test_the_device_decoder_table_is_the_cpu_decoders_for_every_byte_and_scale():
    table = mxfp4.scaled_pairs()
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for scale in range(256):
        want = mxfp4.decode(blocks, np.full(16, scale, np.uint8)).reshape(256, 2)
        assert np.array_equal(table[scale << 8 | np.arange(256)].view(np.uint32), want.view(np.uint32)), scale


def test_expert_groups_bound_the_decoded_weights_whatever_the_model():
    for preset in ("20b", "120b"):
        config = synth.PRESETS[preset]
        groups = expert_groups(config)
        assert groups[0][0] == 0 and groups[-1][1] == config.num_experts
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        per_expert = 4 * 3 * config.intermediate_size * config.hidden_size
        assert max(g1 - g0 for g0, g1 in groups) * per_expert <= 1 << 30
    assert len(expert_groups(synth.PRESETS["120b"])) == 13  # 10 experts of 99.5 MB at a time


def _verify(artifact, reference, *extra):
    result = CliRunner().invoke(cli, ["verify", str(artifact), "--reference", str(reference), "--json", "-", *FAST,
                                      *extra], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def test_the_report_names_the_kernels_and_measures_the_noise_floor_where_they_differ(tiny_repo, tmp_path):
    art = _convert(tiny_repo, "mlx", tmp_path / "mlx")
    cache = tmp_path / "ref-mlx.npz"
    made = CliRunner().invoke(cli, ["reference", str(tiny_repo), "-o", str(cache), "--device", "gpu", *FAST])
    assert made.exit_code == 0, made.output
    assert_wide_router_margins(tiny_repo, Reference.load(cache).tokens)  # numpy and MLX route these alike

    code, same = _verify(art, cache, "--device", "gpu")  # the cache's own kernels: nothing to measure
    assert code == 0 and same["kernels"]["same"] is True and same["kernels"]["noise_kld_mean"] is None
    assert same["kernels"]["reference"] == same["kernels"]["artifact"]
    assert same["kernels"]["artifact"].startswith("mlx float32 on ")
    assert same["metrics"]["kld_max"] == 0.0

    code, other = _verify(art, cache, "--device", "cpu")  # numpy against an MLX-made cache
    k = other["kernels"]
    assert code == 0 and k["same"] is False
    assert (k["reference"], k["artifact"]) == (same["kernels"]["artifact"], "numpy float32 on cpu")
    # the two kernels on identical weights: last-bit differences, and the verify's own KL is of that size
    assert 0 < k["noise_kld_mean"] < 1e-9 and 0 < k["noise_logit_max_abs_diff"] < 1e-3
    assert 0 < other["metrics"]["kld_mean"] < 10 * k["noise_kld_mean"]
    summary = tmp_path / "summary.md"
    table = CliRunner().invoke(cli, ["verify", str(art), "--reference", str(cache), "--device", "cpu",
                                     "--summary", str(summary), *FAST]).output
    assert "noise floor: KL mean" in table and "numpy float32 on cpu" in table
    assert "| noise floor: KL mean of mlx float32 on" in summary.read_text()  # a CI job summary says it too


def test_a_planted_defect_fails_on_the_mlx_path(tiny_repo, tmp_path):
    art = _convert(tiny_repo, "mlx", tmp_path / "mlx")
    shard = next(art.glob("*.safetensors"))
    _edit_bytes_like(shard, _expert_blocks(tiny_repo, 1, 3), lambda b: (b >> 4) | (b << 4))
    code, report = _verify(art, tiny_repo, "--device", "gpu", "--no-tensors")
    assert code == 1 and report["kernels"]["same"] is True
    assert report["metrics"]["kld_mean"] > 5e-4  # the logits alone catch it, no tensor check


# The peak is the process's own VmHWM (ru_maxrss is carried across fork and exec on Linux).
PEAK = ("import sys; from oss_convert.cli.main import main; sys.argv = ['oss-convert', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_mlx_path_needs_no_more_host_memory_for_a_deeper_model(tmp_path):
    """One layer's bytes at a time on the device, the next copied while it computes: a model
    six times deeper peaks within a few MiB (holding the extra layers would take ~100 MiB)."""
    peaks = []
    for layers in (2, 12):
        config = synth.preset_with("tiny", num_hidden_layers=layers, hidden_size=512, intermediate_size=512,
                                   num_experts=32)
        repo = synth.generate(tmp_path / f"m{layers}", config, seed=3)
        ids = tmp_path / "ids.npy"
        np.save(ids, np.random.default_rng(1).integers(0, config.vocab_size, size=1024))
        run = subprocess.run([sys.executable, "-c", PEAK, "reference", str(repo), "-o", str(tmp_path / f"r{layers}.npz"),
                              "--device", "gpu", "--tokens", str(ids), "--ctx", "256", "-q"], capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr
        peaks.append(int(run.stderr.strip().splitlines()[-1]) / 1024)
    assert peaks[1] < peaks[0] + 40, f"peak RSS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MiB"


def test_a_lossy_recipes_kl_on_the_mlx_path_is_its_kl_on_the_cpu(tmp_path):
    """The 8-bit MLX recipe on the trained bundled model, reference and artifact both on the MLX
    path, then both on numpy: the same KL within 2% (the issue's bound for a GPU; here MLX runs on
    its default device). The affine layers are dequantized on the CPU stream either way."""
    from oss_convert import converters
    from oss_convert.verify.check import Inputs, make_reference, verify

    from test_trained import HELDOUT, TRAINED

    q8 = converters.convert(TRAINED, "mlx", tmp_path / "q8", recipe="mxfp4-q8").output
    chunks = make_reference(TRAINED, Inputs(text_file=HELDOUT, ctx=512, max_chunks=4)).tokens
    for model in (TRAINED, q8):  # no near-tie the two paths could break apart on another processor
        assert_wide_router_margins(model, chunks)
    kl = {device: verify(q8, TRAINED, Inputs(text_file=HELDOUT, ctx=512, max_chunks=4, device=device),
                         check_tensors=False)["metrics"]["kld_mean"] for device in ("gpu", "cpu")}
    assert 5e-5 < kl["cpu"] < 5e-4  # a real 8-bit loss, not noise
    assert kl["gpu"] == pytest.approx(kl["cpu"], rel=0.02), kl


def test_every_kernels_text_is_one_a_cache_may_hold(monkeypatch):
    from oss_convert.verify import runner
    from oss_convert.verify.reference import KERNELS

    texts = {runner.kernels_of("cpu"), runner.kernels_of("gpu")}
    monkeypatch.setattr(runner.mx, "default_device", lambda: "a gpu")  # and where MLX has a GPU
    texts.add(runner.kernels_of("gpu"))
    assert len(texts) == 3 and all(KERNELS.fullmatch(t) for t in texts), texts


@pytest.mark.parametrize("kernels", [5, ["numpy float32 on cpu"], "numpy float32 on cpu\x1b[2J", "x" * 10_000],
                         ids=["a number", "a list", "an escape", "10,000 bytes"])
def test_a_cache_whose_kernels_are_not_ours_is_refused(tiny_repo, tmp_path, kernels):
    cache = tmp_path / "ref.npz"
    assert CliRunner().invoke(cli, ["reference", str(tiny_repo), "-o", str(cache), *FAST]).exit_code == 0
    ref = Reference.load(cache)
    ref.meta["kernels"] = kernels
    ref.save(cache, force=True)
    result = run_sub("verify", str(tiny_repo), "--reference", str(cache), *FAST)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: file {cache}: reference cache kernels") and "\x1b" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and len(result.stderr) < 300


def _device_rows(logits, want):
    from oss_convert.verify.runner import _rows_mlx, _rows_on_host
    import mlx.core as mx
    return _rows_on_host(_rows_mlx(mx.array(logits), want, 0), 0, want)()[0]


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # near uniform (the tail is the mass) to confident (it is 1e-30)
def test_rows_reduced_on_the_device_score_as_the_hosts_float64(scale):
    """What crosses from the GPU (metrics.Rows) scores as the full logits do on the host: the ids,
    target and argmax exactly, each logsumexp to float64's noise where the picked ids hold the
    mass, and the KL of an artifact against a reference the same per token."""
    from oss_convert.verify.metrics import Wanted, compare_rows, rows_of

    rng = np.random.default_rng(7)
    S, V, k = 24, 201088, 1024
    ref = (rng.standard_normal((S, V)) * scale).astype(np.float32)
    ref[0, [5, 90_000]] = ref[0].max() + 1  # a tie for the argmax: the lowest id wins, as numpy's
    ref[1, 200_500] = ref[1].max() + 40  # the max beyond the cut: the cut's logsumexp is its own
    want = Wanted(targets=rng.integers(0, V, S), pick=k, vocab=V, cuts=(200014,))
    host, device = rows_of(ref, want, 0), _device_rows(ref, want)
    assert (np.sort(host.ids, 1) == np.sort(device.ids, 1)).all()
    assert (host.target == device.target).all() and (host.argmax == device.argmax).all() and device.argmax[0] == 5
    tail = 1 - np.exp(np.sort(host.picked, 1).astype(np.float64) - host.lse[:, None]).sum(1)
    # float32's error (a few parts in 1e7) only on the tail's share of the mass
    assert (np.abs(host.lse - device.lse) <= 3e-7 * tail + 1e-12).all()
    assert np.abs(host.cut_lse[200014] - device.cut_lse[200014]).max() <= 3e-7
    assert device.cut_lse[200014][1] < device.lse[1] - 25  # the head's own max, 25 nats and more below

    order = np.argsort(-host.picked, axis=1, kind="stable")  # a reference as reference.py keeps it
    top_ids = np.take_along_axis(host.ids, order, 1)
    top_lp = np.take_along_axis(host.picked, order, 1).astype(np.float64) - host.lse[:, None]
    art = ref + (rng.standard_normal((S, V)) * 1e-3).astype(np.float32)
    top_ids[:, -3:] = [200100, 200900, 201000]  # ids beyond an artifact's 200014 rows are masked
    cut = Wanted(targets=want.targets % 200014, pick=top_ids, vocab=200014)
    shift = (host.lse - host.cut_lse[200014])[:, None]
    on_host = compare_rows(rows_of(art, cut, 0), 200014, top_lp + shift, host.cut_lse[200014], top_lp[:, 0])
    on_device = compare_rows(_device_rows(art, cut), 200014, top_lp + shift, host.cut_lse[200014], top_lp[:, 0])
    assert np.allclose(on_device.kld, on_host.kld, rtol=1e-4, atol=1e-12) and on_host.kld.mean() > 1e-9
    assert (on_device.same_top == on_host.same_top).all()
    assert np.allclose(on_device.nll, on_host.nll, rtol=0, atol=1e-7)


def test_lossless_artifacts_of_a_full_vocabulary_score_kl_0_over_both_sides_of_the_metal_cut(metal_repo, metal_bin,
                                                                                             tmp_path):
    """The reference keeps the logsumexp below 200014 rows as well: the device sums each row in
    pieces that end there. An artifact with every row (MLX) must be summed in the same pieces, one
    with the Metal rows over those rows, or the same logits give logsumexps an ulp apart (a 20b
    MLX artifact on an H200 read KL 3.8e-17 that way)."""
    cache = tmp_path / "ref.npz"
    made = CliRunner().invoke(cli, ["reference", str(metal_repo), "-o", str(cache), "--device", "gpu", *FAST])
    assert made.exit_code == 0, made.output
    assert 200014 in Reference.load(cache).cut_logsumexp
    for artifact in (_convert(metal_repo, "mlx", tmp_path / "mlx"), metal_bin):
        code, report = _verify(artifact, cache, "--device", "gpu", "--no-tensors")
        assert code == 0 and report["kernels"]["same"] is True
        assert report["metrics"]["kld_max"] == 0.0 and report["metrics"]["top1_agreement"] == 1.0
