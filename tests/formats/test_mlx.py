"""``--to mlx`` and the MLX reader, held against mlx-lm itself and OpenAI's torch reference.

Oracles (none written here): ``mlx_lm.convert`` run on the Hugging Face layout of the same
weights, ``mlx_lm.load`` + mlx-lm's ``gpt_oss`` forward pass, and ``gpt_oss.torch.model``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from oss_convert import formats, converters, synth
from oss_convert.model import logical_names, TensorSpec
from oss_convert.converters import mlx as to_mlx
from oss_convert.errors import InputError, UsageError
from oss_convert.progress import Progress
from oss_convert.formats import hf, mlx as mlx_format
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.formats.safetensors import SafetensorsFile, SafetensorsWriter
from oss_convert.tokens.files import TOKENIZER_FILES

from helpers import kl_and_top1
from layouts import write_hub_layout
from oracles import torch_reference_logits

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

# mlx-lm (fp32) against the official reference with mlx-lm's floor/ceil YaRN range patched in:
# measured max |diff| 3.2e-5 with |logits| up to 14 on 300 tokens (float32 rounding only).
TRUNCATED_YARN_ATOL = 2e-4
# Against the unpatched reference, 9 of 32 rotary frequencies differ (spec §0.5): measured KL mean
# 0.0135 and top-1 agreement 0.963 on the random tiny model; a gate/up swap gives KL 5.0, top-1 0.04.
EXACT_YARN_KL_MEAN = 0.05
EXACT_YARN_TOP1 = 0.9


# --------------------------------------------------------------------------------------
# Helpers


class Notes(Progress):
    """Collects what the library says to the user (it never prints)."""

    def __init__(self):
        self.messages: list[str] = []

    def note(self, message: str) -> None:
        self.messages.append(message)


def convert(repo: Path, out: Path, **options) -> Path:
    with OriginalCheckpoint(repo) as src:
        return to_mlx.convert(src, out, **options)


def write_hf_layout(repo: Path, out: Path) -> Path:
    """The Hub's MXFP4 transformers layout of ``repo`` (spec §1.5: renames, qkv split by rows,
    blocks/scales copied), with the tokenizer files, as input for ``mlx_lm.convert``."""
    with OriginalCheckpoint(repo) as src:
        write_hub_layout(src, out)
    for name in TOKENIZER_FILES:
        if (repo / name).is_file():
            shutil.copyfile(repo / name, out / name)
    return out


def mlx_lm_convert(hf_dir: Path, out: Path, **kwargs) -> Path:
    from mlx_lm.convert import convert as mlx_convert

    mlx_convert(str(hf_dir), mlx_path=str(out), **kwargs)
    return out


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a folder's model*.safetensors: dtype, shape, raw bytes (read by our mmap reader)."""
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        f = SafetensorsFile(path)
        for name, entry in f.entries.items():
            assert name not in out
            out[name] = (entry.dtype, entry.shape, f.array(name).tobytes())
        f.close()
    return out


def mlx_lm_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of ``mlx_lm.load(folder)`` in float32 (``set_dtype`` casts only float parameters)."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(folder))
    model.set_dtype(mx.float32)
    logits = model(mx.array([[int(t) for t in tokens]]))[0]
    return np.array(logits.astype(mx.float32))


def reference_with_mlx_lm_yarn(repo: Path, tokens: np.ndarray) -> np.ndarray:
    """The official reference with one change: YaRN's ramp ends floored/ceiled as mlx-lm does
    (``rope_utils.yarn_find_correction_range``), so only conversion errors remain (spec §1.4)."""
    import torch
    from gpt_oss.torch import model as reference

    def truncated(self):
        freq = self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)
        d_half = self.head_dim / 2
        low = math.floor(d_half * math.log(self.initial_context_length / (self.ntk_beta * 2 * math.pi)) / math.log(self.base))
        high = math.ceil(d_half * math.log(self.initial_context_length / (self.ntk_alpha * 2 * math.pi)) / math.log(self.base))
        mask = 1 - ((torch.arange(d_half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        inv_freq = 1.0 / (self.scaling_factor * freq) * (1 - mask) + 1.0 / freq * mask
        return 0.1 * math.log(self.scaling_factor) + 1.0, inv_freq

    original = reference.RotaryEmbedding._compute_concentration_and_inv_freq
    reference.RotaryEmbedding._compute_concentration_and_inv_freq = truncated
    try:
        return torch_reference_logits(repo, tokens)
    finally:
        reference.RotaryEmbedding._compute_concentration_and_inv_freq = original


def swap_gate_up(folder: Path, out: Path) -> Path:
    """A deliberately broken conversion: gate_proj and up_proj (weights, scales, biases) swapped."""
    shutil.copytree(folder, out)
    swap = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
    for path in out.glob("model*.safetensors"):
        f = SafetensorsFile(folder / path.name)
        names = list(f.entries)
        renamed = []
        for name in names:
            for a, b in swap.items():
                if f".{a}." in name:
                    name = name.replace(f".{a}.", f".{b}.")
                    break
            renamed.append(name)
        with open(path, "wb") as fh:
            writer = SafetensorsWriter(fh, [TensorSpec(r, f.entries[n].dtype, f.entries[n].shape)
                                             for n, r in zip(names, renamed)], f.metadata)
            for name, new in zip(names, renamed):
                writer.write(new, f.array(name))
            writer.finish()
        f.close()
    return out


# --------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def ours(tiny_repo, tmp_path_factory) -> Path:
    """tiny_repo converted with small shards, so loading spans several files."""
    return convert(tiny_repo, tmp_path_factory.mktemp("mlx") / "ours", shard_size="1M")


@pytest.fixture(scope="module")
def theirs(tiny_repo, tmp_path_factory) -> Path:
    """``mlx_lm.convert`` (no quantization) of the HF layout of the same weights."""
    base = tmp_path_factory.mktemp("mlx_lm")
    return mlx_lm_convert(write_hf_layout(tiny_repo, base / "hf"), base / "converted")


# --------------------------------------------------------------------------------------
# (1) byte identity with mlx_lm.convert


def test_tensors_byte_identical_to_mlx_lm_convert(ours, theirs):
    got, want = tensors(ours), tensors(theirs)
    assert sorted(got) == sorted(want)
    different = [n for n in want if got[n] != want[n]]
    assert not different, different[:5]
    # experts as mlx-lm's mxfp4 QuantizedSwitchLinear, everything else BF16
    assert got["model.layers.0.mlp.experts.gate_proj.weight"][:2] == ("U32", (8, 96, 20))
    assert got["model.layers.0.mlp.experts.up_proj.scales"][:2] == ("U8", (8, 96, 5))
    assert got["model.layers.3.mlp.experts.down_proj.weight"][:2] == ("U32", (8, 160, 12))
    assert {d for n, (d, _, _) in got.items() if "experts" not in n or n.endswith(".bias")} == {"BF16"}


def test_config_and_index_match_mlx_lm_convert(ours, theirs):
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    config = json.loads((ours / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    ours_index = json.loads((ours / "model.safetensors.index.json").read_text())
    theirs_index = json.loads((theirs / "model.safetensors.index.json").read_text())
    assert ours_index["metadata"] == theirs_index["metadata"]  # total_size and mlx-lm's parameter count
    files = sorted(p.name for p in ours.glob("model*.safetensors"))
    assert len(files) > 1 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert sorted(set(ours_index["weight_map"].values())) == files
    assert sorted(ours_index["weight_map"]) == sorted(theirs_index["weight_map"])
    assert all(f.stat().st_size <= (1 << 20) + 16384 for f in ours.glob("model*.safetensors"))


# --------------------------------------------------------------------------------------
# (2) mlx_lm.load runs it like the official reference


@pytest.mark.oracle
def test_mlx_lm_load_matches_torch_reference(tiny_repo, ours, tokens_300, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("gpt_oss.torch.model")
    assert len(tokens_300) > 2 * synth.PRESETS["tiny"].sliding_window  # the window matters
    got = mlx_lm_logits(ours, tokens_300)
    truncated = reference_with_mlx_lm_yarn(tiny_repo, tokens_300)
    exact = torch_reference_logits(tiny_repo, tokens_300)

    assert np.abs(got - truncated).max() < TRUNCATED_YARN_ATOL
    assert (got.argmax(1) == truncated.argmax(1)).all()
    kl, top1 = kl_and_top1(got, exact)
    assert kl < EXACT_YARN_KL_MEAN and top1 >= EXACT_YARN_TOP1
    # the YaRN rounding is a real difference, not noise: the unpatched reference is further away
    assert np.abs(got - exact).max() > 100 * TRUNCATED_YARN_ATOL

    broken = mlx_lm_logits(swap_gate_up(ours, tmp_path / "broken"), tokens_300)
    assert np.abs(broken - truncated).max() > 1.0
    kl, top1 = kl_and_top1(broken, exact)
    assert kl > 10 * EXACT_YARN_KL_MEAN and top1 < EXACT_YARN_TOP1


# --------------------------------------------------------------------------------------
# (3) determinism, files, errors


def test_output_is_byte_identical_across_runs(tiny_repo, tmp_path):
    a, b = convert(tiny_repo, tmp_path / "a"), convert(tiny_repo, tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "model.safetensors" in names and "model.safetensors.index.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tokenizer_files_copied_and_missing_ones_reported(tiny_repo, tiny_single_repo, ours, tmp_path):
    for name in TOKENIZER_FILES:
        assert (ours / name).is_file() == (tiny_repo / name).is_file()
        if (tiny_repo / name).is_file():
            assert (ours / name).read_bytes() == (tiny_repo / name).read_bytes()
    notes = Notes()
    with OriginalCheckpoint(tiny_single_repo) as src:
        out = to_mlx.convert(src, tmp_path / "bare", progress=notes)
    assert any(n.startswith("warning: no tokenizer.json") for n in notes.messages)
    assert not (out / "tokenizer.json").exists()
    # the weights are still complete: mlx-lm's model loader (no tokenizer needed) opens them
    from mlx_lm.utils import load_model

    model, _ = load_model(out)
    assert type(model).__module__ == "mlx_lm.models.gpt_oss"


def test_refuses_existing_output_and_unknown_options(tiny_repo, ours):
    from oss_convert.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        convert(tiny_repo, ours)
    with pytest.raises(UsageError, match="--recipe q3 does not apply to --to mlx"):
        converters.convert(tiny_repo, "mlx", ours.parent / "x", recipe="q3")
    with pytest.raises(UsageError, match="--outtype does not apply to --to mlx"):
        converters.convert(tiny_repo, "mlx", ours.parent / "y", outtype="q8_0")


# --------------------------------------------------------------------------------------
# Reader


def test_reader_round_trip_is_bit_exact(tiny_repo, ours, theirs):
    assert formats.detect(ours) == "mlx"
    with OriginalCheckpoint(tiny_repo) as src:
        for folder in (ours, theirs):  # ours, and a folder written by mlx itself
            model = formats.open_canonical(folder)
            assert isinstance(model, mlx_format.MlxModel)
            assert model.config == src.config
            for name in logical_names(src.config):
                a, b = src.f32(name), model.f32(name)
                assert a.shape == b.shape and a.tobytes() == b.tobytes(), name
            for layer in range(src.config.num_hidden_layers):
                for which in ("mlp1", "mlp2"):
                    want, got = src.mxfp4(layer, which), model.mxfp4(layer, which)
                    assert got.blocks.dtype == np.uint8 and got.blocks.shape == want.blocks.shape
                    assert np.array_equal(got.blocks, want.blocks) and np.array_equal(got.scales, want.scales)
            assert model.storage("block.2.mlp.mlp1_weight") == "MXFP4"
            assert model.storage("block.2.attn.qkv.weight") == "BF16"
            model.close()


def test_describe(ours):
    info = formats.describe(ours)
    assert info["kind"] == "mlx" and info["valid"] and info["problems"] == []
    assert info["storage"] == {"embedding": "BF16", "attention": "BF16", "router": "BF16", "experts": "MXFP4",
                               "unembedding": "BF16"}
    assert info["quantization"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert info["tensor_count"] == 91 and len(info["files"]) > 1
    assert mlx_format.describe(ours, scan=True)["problems"] == []


def test_reader_names_the_broken_tensor(ours, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ours, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 64
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="experts"):
        mlx_format.MlxModel(broken)


def test_dense_experts_are_refused(tmp_path):
    repo = synth.generate(tmp_path / "dense", "tiny", seed=3, experts="bf16")
    with pytest.raises(InputError, match="dense BF16"):
        convert(repo, tmp_path / "out")


def test_hf_layout_source_gives_the_same_folder(tiny_repo, ours, tmp_path):
    """``convert`` also reads the Hub's transformers layout (``formats.hf``): same bytes out."""
    with hf.HfCheckpoint(write_hf_layout(tiny_repo, tmp_path / "hf")) as src:
        again = to_mlx.convert(src, tmp_path / "out", shard_size="1M")
    names = sorted(p.name for p in ours.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (ours / name).read_bytes() == (again / name).read_bytes(), name


def test_reader_opens_dequantized_mlx_lm_output(tiny_repo, theirs, tmp_path):
    """``mlx_lm.convert -d`` (experts BF16 ``[E, out, in]``, as mlx-lm < 0.27 stored them too)."""
    dense = mlx_lm_convert(theirs.parent / "hf", tmp_path / "dense", dequantize=True)
    assert mlx_format.looks_mlx(dense) and mlx_format.looks_mlx(theirs) and not mlx_format.looks_mlx(theirs.parent / "hf")
    model = mlx_format.open_canonical(dense)
    with OriginalCheckpoint(tiny_repo) as src:
        for layer, which in ((0, "mlp1"), (3, "mlp2")):
            name = f"block.{layer}.mlp.{which}_weight"
            assert model.mxfp4(layer, which) is None and model.storage(name) == "BF16"
            assert model.f32(name).tobytes() == src.f32(name).tobytes()  # MXFP4 values are exact in BF16
        assert model.f32("block.1.mlp.mlp1_bias").tobytes() == src.f32("block.1.mlp.mlp1_bias").tobytes()
    model.close()
