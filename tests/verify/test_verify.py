"""``oss-convert verify`` / ``reference`` on original/ artifacts: lossless passes, planted defects fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from oss_convert.cli.main import cli
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.verify.check import Inputs, verify
from oss_convert.verify.reference import Reference
from oss_convert.verify.report import SCHEMA

FAST = ["--ctx", "256", "--chunks", "2", "--quiet"]  # 2 x 127 = 254 scored tokens, past the 128 window
FAST_INPUTS = Inputs(ctx=256, max_chunks=2)


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# -- planting defects in a copy of an original/ checkpoint ---------------------------------


def _copy(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest)
    return dest


def _patch_expert(repo: Path, name: str, expert: int, edit) -> None:
    """Rewrite one expert's slab of ``name`` (.blocks/.scales) in place with ``edit(array) -> array``."""
    with OriginalCheckpoint(repo) as ckpt:
        entry = ckpt.entry(name)
        old = np.array(ckpt.raw(name)[expert])
    new = np.ascontiguousarray(edit(old), dtype=np.uint8)
    assert new.shape == old.shape and not np.array_equal(new, old)
    with open(entry.file, "r+b") as fh:
        fh.seek(entry.start + expert * old.nbytes)
        fh.write(new.tobytes())


def _set_config(repo: Path, **values) -> None:
    path = repo / "original" / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def ref_cache(tiny_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    result = _run("reference", str(tiny_repo), "-o", str(out), *FAST)
    assert result.exit_code == 0, result.output
    return out


# -- passing -----------------------------------------------------------------------------


def test_lossless_copy_passes_with_kl_near_zero(tiny_repo, tmp_path):
    report_path = tmp_path / "report.json"
    result = _run("verify", str(tiny_repo), "--reference", str(tiny_repo), "--json", str(report_path), *FAST)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "KL mean" in result.output
    report = json.loads(report_path.read_text())
    assert report["schema"] == SCHEMA and report["verdict"] == "pass" and report["reasons"] == []
    m = report["metrics"]
    assert m["tokens_scored"] == 254
    assert m["kld_max"] < 1e-9  # quantized gather_qmm path vs dequantized reference path, both float32
    assert m["top1_agreement"] == 1.0
    assert m["logit_max_abs_diff"] < 1e-4
    assert abs(m["ppl_ratio"] - 1) < 1e-6
    t = report["tensors"]
    assert t["differs"] == 0 and t["identical"] == t["compared"] == 4 * 13 + 3
    assert t["experts_bit_identical"] is True
    assert report["input"]["scored_per_chunk"] == 127 and report["input"]["chunks"] == 2


def test_json_report_has_the_fields_of_its_types(tiny_repo):
    """The report's schema is the ``Report`` type: every key in order, every typed block's keys."""
    from oss_convert.verify import report as report_module

    report = verify(tiny_repo, tiny_repo, FAST_INPUTS)
    assert list(report) == report_module.field_names(report_module.Report)
    for key, block in (("artifact", "ArtifactBlock"), ("reference", "ReferenceBlock"), ("vocab", "VocabBlock"),
                       ("metrics", "Metrics"), ("thresholds", "Thresholds"), ("positions", "Positions"),
                       ("tensors", "TensorBlock"), ("timings", "Timings"), ("versions", "Versions")):
        assert list(report[key]) == report_module.field_names(getattr(report_module, block)), key
    assert report["artifact"]["kind"] in report_module.KINDS
    from oss_convert import formats

    assert set(report_module.KINDS) == {f.name for f in formats.FORMATS}  # the registry's kinds, hf included
    json.loads(report_module.to_json(report))
    assert report_module.to_json({"x": float("inf"), "y": [float("nan")]}) == '{\n  "x": null,\n  "y": [\n    null\n  ]\n}\n'


def test_reference_cache_round_trip_and_verify_against_it(tiny_repo, ref_cache):
    ref = Reference.load(ref_cache)
    assert ref.tokens.shape == (2, 256) and ref.top_ids.shape == (254, 1024)
    # the stored log-probs are a normalised distribution over the tiny vocabulary
    np.testing.assert_allclose(np.exp(ref.top_logprobs).sum(1), 1.0, rtol=1e-9)
    assert (np.diff(ref.top_logprobs, axis=1) <= 0).all()
    result = _run("verify", str(tiny_repo), "--reference", str(ref_cache), "--json", "-", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tensors"] is None and report["reference"]["kind"] == "cache"
    assert report["metrics"]["kld_max"] < 1e-9


def test_cache_and_live_reference_give_the_same_numbers(tiny_repo, ref_cache):
    live = verify(tiny_repo, tiny_repo, FAST_INPUTS, check_tensors=False)
    cached = verify(tiny_repo, ref_cache, FAST_INPUTS)
    for key in ("ppl", "ppl_ref", "kld_mean", "top1_agreement"):
        assert cached["metrics"][key] == pytest.approx(live["metrics"][key], rel=1e-9, abs=1e-15)


# -- failing: planted defects ------------------------------------------------------------------


def _verify_fails(artifact: Path, reference, *extra: str) -> dict:
    result = _run("verify", str(artifact), "--reference", str(reference), "--json", "-", *FAST, *extra)
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["verdict"] == "fail"
    return report


def test_swapped_nibbles_fail_naming_tensor_and_expert(tiny_repo, tmp_path):
    bad = _copy(tiny_repo, tmp_path / "bad")
    _patch_expert(bad, "block.1.mlp.mlp1_weight.blocks", 2, lambda b: (b >> 4) | (b << 4))
    report = _verify_fails(bad, tiny_repo)
    text = " ".join(report["reasons"])
    assert "block.1.mlp.mlp1_weight" in text and "expert 2" in text and "nibble order swapped" in text
    assert report["tensors"]["experts_bit_identical"] is False and report["tensors"]["differs"] == 1


def test_zeroed_expert_fails(tiny_repo, tmp_path):
    bad = _copy(tiny_repo, tmp_path / "bad")
    _patch_expert(bad, "block.0.mlp.mlp2_weight.blocks", 5, np.zeros_like)
    report = _verify_fails(bad, tiny_repo)
    assert any("block.0.mlp.mlp2_weight" in r and "expert 5" in r and "blocks all zero" in r for r in report["reasons"])


def test_wrong_scales_fail_and_show_in_kl(tiny_repo, tmp_path):
    bad = _copy(tiny_repo, tmp_path / "bad")
    for e in range(8):  # every expert of one layer: scale +1 doubles its weights
        _patch_expert(bad, "block.2.mlp.mlp1_weight.scales", e, lambda s: s + 1)
    report = _verify_fails(bad, tiny_repo)
    assert any("block.2.mlp.mlp1_weight" in r and "every scale off by +1" in r for r in report["reasons"])
    assert report["metrics"]["kld_mean"] > 1e-4


def test_wrong_sliding_window_fails_on_config_and_on_kl(tiny_repo, ref_cache, tmp_path):
    bad = _copy(tiny_repo, tmp_path / "bad")
    _set_config(bad, sliding_window=64)
    report = _verify_fails(bad, ref_cache)  # against the cache: only config and logits can tell
    assert any(r.startswith("config sliding_window: artifact 64, reference 128") for r in report["reasons"])
    assert report["metrics"]["kld_mean"] > 0.01  # the runner honoured the artifact's window
    assert any("mean KL divergence" in r for r in report["reasons"])


def test_thresholds_are_applied(tiny_repo, tmp_path):
    bad = _copy(tiny_repo, tmp_path / "bad")
    _patch_expert(bad, "block.3.mlp.mlp2_weight.scales", 0, lambda s: s + 2)
    report = _verify_fails(bad, tiny_repo, "--no-tensors", "--max-kld", "0", "--min-top1", "1.0")
    assert report["tensors"] is None
    assert any("exceeds --max-kld 0" in r for r in report["reasons"])


def test_errors_exit_2(tiny_repo, tmp_path):
    cmd = [sys.executable, "-m", "oss_convert.cli.main"]
    missing = subprocess.run(cmd + ["verify", str(tmp_path / "nope"), "--reference", str(tiny_repo), "-q"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "error" in missing.stderr
    short = subprocess.run(cmd + ["verify", str(tiny_repo), "--reference", str(tiny_repo), "--ctx", "100", "-q"],
                           capture_output=True, text=True)
    assert short.returncode == 2 and "sliding window" in short.stderr


def test_token_ids_input(tiny_repo, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 1000, 600))))
    result = _run("verify", str(tiny_repo), "--reference", str(tiny_repo), "--tokens", str(ids), "--json", "-",
                  "--no-tensors", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["input"]["kind"] == "token_ids" and report["input"]["total_tokens"] == 600


# -- per-tensor bounds --------------------------------------------------------------------------


class _Edited:
    """An original/ checkpoint whose tensor ``name`` is replaced and reported with ``storage``."""

    def __init__(self, repo, name, edit, storage):
        self._inner, self._name, self._edit, self._storage = OriginalCheckpoint(repo), name, edit, storage
        self.config = self._inner.config

    def f32(self, name):
        value = self._inner.f32(name)
        return self._edit(value.copy()) if name == self._name else value

    def storage(self, name):
        return self._storage if name == self._name else self._inner.storage(name)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _q8_0(x: np.ndarray) -> np.ndarray:
    """ggml Q8_0 round trip: d = amax/127 stored as f16, q = round(x/d)."""
    blocks = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    d = (np.abs(blocks).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    q = np.round(np.divide(blocks, d, out=np.zeros_like(blocks), where=d > 0))
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("storage,edit,status", [
    ("F16", lambda x: x.astype(np.float16).astype(np.float32), {"identical", "within_bound"}),
    ("Q8_0", _q8_0, {"within_bound"}),
    ("Q8_0", lambda x: _q8_0(x) * 1.05, {"differs"}),
    ("BF16", lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, x + 1, x), {"differs"}),
    ("affine-4bit", lambda x: x * 1.1, {"lossy"}),
])
def test_dense_tensor_bounds_by_storage(tiny_repo, storage, edit, status):
    from oss_convert.verify.tensors import compare_dense

    name = "block.1.attn.qkv.weight"
    ref = OriginalCheckpoint(tiny_repo)
    result = compare_dense(ref, _Edited(tiny_repo, name, edit, storage), name)
    assert result.status in status, result
    if result.status == "differs" and storage == "BF16":
        assert "worst at [0, 7]" in result.detail and "1 of" in result.detail


def test_a_reader_that_fails_is_an_error_not_a_difference(tiny_repo):
    """A reader exception while comparing tensors means a broken artifact or reader: exit 2, not "differs"."""
    from oss_convert.errors import InputError
    from oss_convert.verify.tensors import compare_dense

    def broken(value):
        raise InputError("cannot read it", file="x.gguf", tensor="block.1.attn.qkv.weight")

    with pytest.raises(InputError, match="cannot read it"):
        compare_dense(OriginalCheckpoint(tiny_repo), _Edited(tiny_repo, "block.1.attn.qkv.weight", broken, "BF16"),
                      "block.1.attn.qkv.weight")


def test_the_reference_runs_mxfp4_experts_through_the_artifacts_kernels(tiny_repo, dense_repo):
    """An MXFP4 reference takes the artifact's expert kernels (on a GPU, gather_qmm: the same
    weights then give the same logits bit for bit); dense experts stay dequantized. On the CPU
    both decode exactly, so the values do not move."""
    from oss_convert.verify.check import make_reference

    shared = make_reference(tiny_repo, FAST_INPUTS)
    forced = make_reference(tiny_repo, FAST_INPUTS, experts="dequantized")
    assert (shared.meta["experts"], forced.meta["experts"]) == ("quantized", "dequantized")
    for name in ("top_ids", "top_logprobs", "logsumexp", "target_logprob"):
        assert np.array_equal(getattr(shared, name), getattr(forced, name)), name
    assert make_reference(dense_repo, FAST_INPUTS).meta["experts"] == "dequantized"
