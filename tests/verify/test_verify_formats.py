"""``verify`` on converted artifacts: lossless MLX/Metal/GGUF pass with KL ~ 0 and bit-identical
experts; planted defects fail naming what differs."""

from __future__ import annotations

import dataclasses
import importlib
import json
import mmap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from oss_convert.cli.main import cli
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.verify import check
from oss_convert.verify.check import Inputs, verify
from oss_convert.verify.reference import METAL_VOCAB_ROWS

FAST = ["--ctx", "256", "--chunks", "2", "--quiet"]
FAST_INPUTS = Inputs(ctx=256, max_chunks=2)


def _need(kind: str) -> None:
    """Both halves of a format must import: a broken import is a failure, never a skip."""
    for module in (f"oss_convert.formats.{kind}", f"oss_convert.converters.{kind}"):
        importlib.import_module(module)


def _convert(src: Path, kind: str, out: Path) -> Path:
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", kind, "-o", str(out), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def _verify(artifact: Path, reference: Path, *extra: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["verify", str(artifact), "--reference", str(reference), "--json", "-", *FAST, *extra],
                                catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _assert_lossless_pass(code: int, report: dict) -> None:
    assert code == 0, report["reasons"]
    assert report["verdict"] == "pass"
    assert report["metrics"]["kld_max"] < 1e-6
    assert report["metrics"]["kld_mean"] < 1e-8  # on whatever device MLX runs: full float32, never TF32
    assert report["metrics"]["top1_agreement"] == 1.0
    assert report["tensors"]["experts_bit_identical"] is True
    assert report["tensors"]["differs"] == 0


def _edit_bytes_like(file: Path, original: bytes, edit) -> None:
    """Find ``original`` (an expert's raw MXFP4 blocks) in ``file`` and overwrite it with ``edit(bytes)``."""
    with open(file, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        at = mm.find(original)
        assert at >= 0, "expert bytes not found verbatim in the artifact"
        mm[at:at + len(original)] = edit(np.frombuffer(original, np.uint8)).astype(np.uint8).tobytes()


def _expert_blocks(repo: Path, layer: int, expert: int) -> bytes:
    with OriginalCheckpoint(repo) as ckpt:
        return np.ascontiguousarray(ckpt.mxfp4(layer, "mlp2").blocks[expert]).tobytes()


# -- vocabulary truncation (no reader needed) ---------------------------------------------------


class _TruncatedVocab:
    """An original/ checkpoint seen through a reader that keeps only the Metal rows."""

    def __init__(self, path):
        import dataclasses

        self._inner = OriginalCheckpoint(path)
        self.config = dataclasses.replace(self._inner.config, vocab_size=METAL_VOCAB_ROWS)
        self.repo_root = self._inner.repo_root

    def f32(self, name):
        value = self._inner.f32(name)
        return value[:METAL_VOCAB_ROWS] if name in ("embedding.weight", "unembedding.weight") else value

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_truncated_vocab_is_compared_over_shared_rows(metal_repo, monkeypatch, tmp_path):
    fake = tmp_path / "fake-artifact"
    fake.mkdir()
    real = check.formats.format_of
    truncated = dataclasses.replace(check.formats.metal.FORMAT, open=lambda p: _TruncatedVocab(metal_repo))
    monkeypatch.setattr(check.formats, "format_of", lambda p: truncated if Path(p) == fake else real(p))
    report = verify(fake, metal_repo, FAST_INPUTS)
    assert report["verdict"] == "pass", report["reasons"]
    assert report["vocab"] == {"artifact_rows": 200014, "reference_rows": 201088, "compared_rows": 200014}
    assert any("vocab_size" in n for n in report["notes"])
    assert report["metrics"]["kld_max"] < 1e-6
    assert report["metrics"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    # the reference's full-vocabulary perplexity differs: the dropped rows carry mass in a random model
    full = verify(metal_repo, metal_repo, FAST_INPUTS, check_tensors=False)
    assert full["metrics"]["ppl_ref"] != pytest.approx(report["metrics"]["ppl_ref"], rel=1e-6)


# -- MLX ----------------------------------------------------------------------------------------


def test_mlx_lossless_passes_and_defects_fail(tiny_repo, tmp_path):
    _need("mlx")
    out = _convert(tiny_repo, "mlx", tmp_path / "mlx")
    _assert_lossless_pass(*_verify(out, tiny_repo))

    # a wrong sliding window in the MLX config must show in the logits
    config_path = out / "config.json"
    good_config = config_path.read_text()
    config = json.loads(good_config)
    config["sliding_window"] = 64
    config_path.write_text(json.dumps(config))
    code, report = _verify(out, tiny_repo)
    assert code == 1 and any(r.startswith("config sliding_window: artifact 64") for r in report["reasons"])
    assert report["metrics"]["kld_mean"] > 0.01
    config_path.write_text(good_config)

    # swapped nibbles in one expert's down_proj (copied byte for byte from mlp2 blocks)
    shard = next(out.glob("*.safetensors"))
    _edit_bytes_like(shard, _expert_blocks(tiny_repo, 1, 3), lambda b: (b >> 4) | (b << 4))
    code, report = _verify(out, tiny_repo)
    assert code == 1
    assert any("block.1.mlp.mlp2_weight" in r and "expert 3" in r and "nibble order swapped" in r for r in report["reasons"])


# -- Metal --------------------------------------------------------------------------------------


def test_metal_lossless_passes_and_defects_fail(metal_repo, tmp_path):
    _need("metal")
    out = _convert(metal_repo, "metal", tmp_path / "metal")
    code, report = _verify(out, metal_repo)
    _assert_lossless_pass(code, report)
    assert report["vocab"]["compared_rows"] == 200014

    model_bin = out / "model.bin" if out.is_dir() else out
    _edit_bytes_like(model_bin, _expert_blocks(metal_repo, 0, 5), np.zeros_like)
    code, report = _verify(out, metal_repo)
    assert code == 1
    assert any("block.0.mlp.mlp2_weight" in r and "expert 5" in r for r in report["reasons"])

    # attention_window is the 4th u32 after swiglu_limit in the model header (file offset 72)
    with open(model_bin, "r+b") as fh:
        fh.seek(72)
        assert int.from_bytes(fh.read(4), "little") == 128
        fh.seek(72)
        fh.write((64).to_bytes(4, "little"))
    code, report = _verify(out, metal_repo, "--no-tensors")
    assert code == 1 and any(r.startswith("config sliding_window: artifact 64") for r in report["reasons"])
    assert report["metrics"]["kld_mean"] > 0.01


# -- GGUF ---------------------------------------------------------------------------------------


def test_gguf_lossless_passes_and_defects_fail(tiny_repo, tmp_path):
    _need("gguf")
    gguf = pytest.importorskip("gguf")
    out = _convert(tiny_repo, "gguf", tmp_path / "model.gguf")
    _assert_lossless_pass(*_verify(out, tiny_repo))

    # zero expert 5 of blk.0.ffn_down_exps (experts are the outermost ggml dimension)
    reader = gguf.GGUFReader(out, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    slab = tensor.data.reshape(tensor.data.shape[0], -1) if tensor.data.ndim > 1 else tensor.data.reshape(8, -1)
    slab[5] = 0
    field = reader.get_field("gpt-oss.attention.sliding_window")
    field.parts[field.data[0]][0] = 64
    del reader
    code, report = _verify(out, tiny_repo)
    assert code == 1
    text = " ".join(report["reasons"])
    assert "block.0.mlp.mlp2_weight" in text and "expert 5" in text
    assert "config sliding_window: artifact 64" in text
