"""Metal ``model.bin``: byte-identical to OpenAI's ``create-local-model.py``, read back exactly,
bad inputs refused. The oracle test needs torch, tiktoken, openai-harmony and the gpt-oss wheel."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from oss_convert import formats, synth
from oss_convert.model import logical_names
from oss_convert.cli.main import cli
from oss_convert.converters import metal as metal_converter
from oss_convert.errors import InputError, OutputExistsError
from oss_convert.formats import metal
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.tokens.files import TokenizerJson
from oss_convert.tokens.vocabulary import load_ranks

# Spec §4.1 test vectors, produced by the real script for the 20b config.
HEADER_20B = bytes.fromhex(
    "4750542d4f53532076312e3000000000 df52dc8617894ed0a29566f10508145b 00000200 18000000 20000000 04000000"
    " 400b0000 400b0000 0000e040 40000000 40000000 08000000 80000000 007c1248 0000003d b6a45ebf 4617dc3d"
    " 865cac3f acc52737 229177a857754268bfd8d588b351c56d".replace(" ", ""))
TOKENIZER_SECTION_SHA = "fa67aa10e825696ec618175bd977c6d9ddee701bfc1e3690afe449d56713e76d"  # bytes [116, 1802240)
VOCAB_TENSORS = ("embedding.weight", "unembedding.weight")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def o200k_file(folder: Path) -> Path:
    """bpe-openai's o200k_base.tiktoken, unpacked (3,613,922 B, tiktoken's own sha256)."""
    bpe_openai = pytest.importorskip("bpe_openai")
    data = gzip.decompress((Path(bpe_openai.__file__).parent / "data" / "o200k_base.tiktoken.gz").read_bytes())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "o200k_base.tiktoken").write_bytes(data)
    return folder / "o200k_base.tiktoken"


@pytest.fixture(scope="module")
def converted(metal_repo, tmp_path_factory) -> Path:
    """``oss-convert convert --to metal`` through the CLI, into a folder (-> OUT/model.bin)."""
    out = tmp_path_factory.mktemp("metal-out") / "metal"
    result = CliRunner().invoke(cli, ["convert", str(metal_repo), "--to", "metal", "-o", str(out), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip().splitlines()[-1]) == out
    return out / "model.bin"


# -- against the official converter -------------------------------------------------------------


@pytest.mark.oracle
def test_byte_identical_to_create_local_model(metal_repo, converted, tmp_path):
    """The unmodified upstream script, run offline on the same checkpoint, writes the same bytes."""
    for module in ("torch", "tiktoken", "openai_harmony", "gpt_oss"):
        pytest.importorskip(module)
    import gpt_oss

    script = Path(gpt_oss.__file__).parent / "metal" / "scripts" / "create-local-model.py"
    cache = tmp_path / "tiktoken"
    vocab = o200k_file(cache)
    # tiktoken looks for sha1(url) in its cache; openai-harmony reads TIKTOKEN_ENCODINGS_BASE (spec §5.1)
    shutil.copyfile(vocab, cache / "fb374d419588a4632f3f557e76b4b70aebbca790")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "TIKTOKEN_ENCODINGS_BASE": str(cache),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # no download can succeed
    upstream = tmp_path / "upstream.bin"
    done = subprocess.run([sys.executable, str(script), "-s", str(metal_repo / "original"), "-d", str(upstream)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert upstream.stat().st_size == converted.stat().st_size == 164_476_928
    assert sha256(upstream) == sha256(converted)


def test_vocab_file_gives_the_same_bytes_and_bin_output_path(metal_repo, converted, tmp_path):
    """``--vocab`` (a .tiktoken file) instead of tokenizer.json; ``-o X.bin`` writes that file."""
    vocab = o200k_file(tmp_path / "vocab")
    out = tmp_path / "deep" / "gpt-oss.bin"
    with OriginalCheckpoint(metal_repo) as src:
        assert metal_converter.convert(src, out, vocab=vocab) == out
    assert out.is_file()
    assert sha256(out) == sha256(converted)


def test_spec_test_vectors(converted):
    """Header of the real 20b config and the model-independent tokenizer section (spec §4.1)."""
    header = metal.MetalHeader.from_config(synth.PRESETS["20b"])
    assert metal.MAGIC + bytes(4) + metal.MODEL_UUID + header.pack() + metal.LAYOUT_UUID == HEADER_20B
    data = converted.read_bytes()[:1_802_240]
    assert hashlib.sha256(data[116:]).hexdigest() == TOKENIZER_SECTION_SHA
    # the loader's layout for the shipped models (spec §4.3/4.4)
    for preset, size, per_block in (("20b", 13_750_886_400, 53_296_192), ("120b", 65_238_253_568, 53_849_344)):
        layout = metal.Layout(metal.MetalHeader.from_config(synth.PRESETS[preset]), 200014, 1_798_345)
        assert layout.shared_start == 1_802_240
        assert layout.per_expert == 13_236_480
        assert layout.file_size == size
        block = [s for n, s in layout.dense.items() if n.startswith("block.0.")]
        assert block[-1].offset + block[-1].nbytes - block[0].offset == per_block


def test_text_tokens_from_tokenizer_json_are_o200k(metal_repo, converted):
    tokens = TokenizerJson(metal_repo / "tokenizer.json").text_token_bytes(199998)
    ranks = load_ranks()  # bpe-openai's o200k_base, ranks 0..199997
    assert len(tokens) == 199998 and tokens == ranks
    assert max(map(len, tokens)) == 128  # the C decoder's signed-char length bug would bite here
    with metal.MetalModel(converted) as model:
        assert model.text_tokens() == ranks


# -- reading back -------------------------------------------------------------------------------


def test_reader_round_trips_every_tensor(metal_repo, converted):
    with OriginalCheckpoint(metal_repo) as src, formats.open_canonical(converted.parent) as art:
        assert art.config == dataclasses.replace(src.config, vocab_size=200014)
        for name in logical_names(src.config):
            if name.endswith(("mlp1_weight", "mlp2_weight")):
                layer, which = int(name.split(".")[1]), name.split(".")[3][:4]
                want, got = src.mxfp4(layer, which), art.mxfp4(layer, which)
                assert np.array_equal(got.blocks, want.blocks), name
                assert np.array_equal(got.scales, want.scales), name
                assert art.storage(name) == "MXFP4"
                continue
            want = src.f32(name)
            if name in VOCAB_TENSORS:
                want = want[:200014]
            assert np.array_equal(art.f32(name), want), name
            assert np.array_equal(art.raw(name), src.raw(name)[:200014] if name in VOCAB_TENSORS else src.raw(name)), name


def test_stored_qkv_is_permuted_and_scaled(metal_repo, converted):
    """Row 2i of a stored q head is old row i * 0.5, row 2i+1 old row 32+i * 0.5; k uses 0.25; v as is."""
    with OriginalCheckpoint(metal_repo) as src, metal.MetalModel(converted) as art:
        old = src.f32("block.1.attn.qkv.weight")
        new = metal.bf16_to_f32(art.stored("block.1.attn.qkv.weight"))
        q_head, k_head = 5 * 64, (64 + 3) * 64
        assert np.array_equal(new[q_head + 2 * 7], old[q_head + 7] * 0.5)
        assert np.array_equal(new[q_head + 2 * 7 + 1], old[q_head + 32 + 7] * 0.5)
        assert np.array_equal(new[k_head + 2 * 31 + 1], old[k_head + 63] * 0.25)
        assert np.array_equal(new[72 * 64:], old[72 * 64:])
        # expert scales are stored + 14
        stored = art.expert_part(0, "mlp1_scales")
        assert np.array_equal(stored, src.mxfp4(0, "mlp1").scales + 14)


def test_describe_and_inspect(converted, tmp_path):
    info = formats.describe(converted)
    assert info["kind"] == "metal" and info["valid"], info["problems"]
    assert info["sizes"]["file_bytes"] == info["sizes"]["expected_bytes"] == converted.stat().st_size
    assert info["header"]["num_active_experts"] == 4 and info["header"]["attention_window"] == 128
    tok = info["tokenizer"]
    assert (tok["num_text_tokens"], tok["num_special_tokens"], tok["regex_is_o200k"]) == (199998, 16, True)
    # upstream's <|end_untrusted|> key never matches, so 200001 carries no UUID
    assert tok["special_tokens"] == {200000: "<|untrusted|>", 200002: "<|return|>", 200003: "<|constrain|>",
                                     200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>",
                                     200008: "<|message|>", 200012: "<|call|>", 200013: "<|refusal|>"}
    result = CliRunner().invoke(cli, ["inspect", str(converted), "--json", "--scan"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["valid"] is True

    # a wrapped scale (upstream's min() check lets 250 + 14 become 8) is found by --scan
    broken = tmp_path / "wrapped.bin"
    shutil.copyfile(converted, broken)
    with metal.MetalModel(broken) as model:
        at = model.layout.expert(1, 3, "mlp2_scales").offset + 5
    with open(broken, "r+b") as fh:
        fh.seek(at)
        fh.write(bytes([(250 + 14) % 256]))
        fh.seek(0, 2)
        fh.write(bytes(16))  # and trailing bytes
    problems = metal.describe(broken, scan=True)["problems"]
    assert any("block.1.mlp.mlp2_weight.scales" in p and "[8, " in p for p in problems), problems
    assert any("16 bytes after the last expert" in p for p in problems), problems


@pytest.mark.parametrize("offset, data, message", [
    (0, b"GPT-OSS v2.0", "not a gpt-oss Metal model.bin"),
    (16, bytes(16), "model UUID 00000000-0000-0000-0000-000000000000 is not gpt-oss"),
    (100, bytes(16), "layout UUID"),
    (116, bytes(16), "tokenizer UUID"),
])
def test_reader_refuses_wrong_magic_and_uuids(converted, tmp_path, offset, data, message):
    bad = tmp_path / "bad.bin"
    head = bytearray(converted.read_bytes()[:4096])
    head[offset:offset + len(data)] = data
    bad.write_bytes(bytes(head))
    with pytest.raises(InputError, match=message) as info:
        metal.MetalModel(bad)
    assert info.value.file == str(bad)


def test_reader_refuses_implausible_header(converted, tmp_path):
    bad = tmp_path / "bad.bin"
    head = bytearray(converted.read_bytes()[:4096])
    head[36:40] = (0).to_bytes(4, "little")  # num_blocks
    head[80:84] = bytes(4)  # interpolation_scale
    bad.write_bytes(bytes(head))
    with pytest.raises(InputError, match="implausible header: num_blocks is 0; RoPE fields out of range"):
        metal.MetalModel(bad)


@pytest.mark.parametrize("keep", [50, 100_000_000])
def test_reader_refuses_truncated_file(converted, tmp_path, keep):
    bad = tmp_path / "short.bin"
    with open(converted, "rb") as fh:
        bad.write_bytes(fh.read(keep))
    with pytest.raises(InputError, match="truncated") as info:
        formats.describe(bad)
    assert info.value.file == str(bad)


# -- refusals -----------------------------------------------------------------------------------


def test_tiny_vocab_is_refused(tiny_repo, tmp_path):
    with OriginalCheckpoint(tiny_repo) as src, pytest.raises(InputError, match="vocab_size is 1024.*200014"):
        metal_converter.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_runtime_hard_codes_are_checked():
    base = synth.PRESETS["metal"]
    metal_converter.check_config(base)
    assert metal_converter.runtime_warnings(base) == []
    with pytest.raises(InputError, match="head_dim is 128.*experts_per_token is 2"):
        metal_converter.check_config(dataclasses.replace(base, head_dim=128, experts_per_token=2))
    warnings = metal_converter.runtime_warnings(dataclasses.replace(base, num_experts=16, num_attention_heads=32))
    assert len(warnings) == 2 and "32 query / 8 kv heads" in warnings[0] and "16 experts" in warnings[1]


class _Edited:
    """A checkpoint seen through a change: another tokenizer folder or one edited scale tensor."""

    def __init__(self, inner, repo_root=None, scale=None):
        self._inner, self._root, self._scale = inner, repo_root, scale

    @property
    def repo_root(self):
        return self._root or self._inner.repo_root

    def mxfp4(self, layer, which):
        pair = self._inner.mxfp4(layer, which)
        if self._scale is not None and (layer, which) == self._scale[:2]:
            scales = pair.scales.copy()
            scales[2, 3, 1] = self._scale[2]
            return dataclasses.replace(pair, scales=scales)
        return pair

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_scale_above_240_is_refused(metal_repo, tmp_path):
    with OriginalCheckpoint(metal_repo) as src:
        metal_converter.check_scales(np.array([0, 240], np.uint8), "x", None)  # 240 + 14 = 254: still finite
        with pytest.raises(InputError, match="block.1.mlp.mlp2_weight.scales.*scale byte of 241"):
            metal_converter.convert(_Edited(src, scale=(1, "mlp2", 241)), tmp_path / "m.bin")
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_missing_tokenizer_is_refused_with_advice(metal_repo, tmp_path):
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    with OriginalCheckpoint(metal_repo) as src:
        with pytest.raises(InputError, match="no tokenizer.json beside original/.*--vocab"):
            metal_converter.convert(_Edited(src, repo_root=empty), tmp_path / "m.bin")
        broken = tmp_path / "broken"
        broken.mkdir()
        doc = json.loads((metal_repo / "tokenizer.json").read_text(encoding="utf-8"))
        del doc["model"]["vocab"][next(iter(doc["model"]["vocab"]))]
        (broken / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
        with pytest.raises(InputError, match="has no text token for ids"):
            metal_converter.convert(_Edited(src, repo_root=broken), tmp_path / "m.bin")


def test_existing_output_needs_force(metal_repo, converted):
    with OriginalCheckpoint(metal_repo) as src:
        with pytest.raises(OutputExistsError):
            metal_converter.convert(src, converted)


@pytest.mark.oracle
def test_qkv_transform_matches_upstream_torch_code_on_edge_values():
    """The upstream transform (torch bf16 in-place multiply) on subnormals, tiny and huge values and inf."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    nq, nkv, H = 4, 2, 8
    bits = rng.integers(0, 1 << 16, size=(64 * (nq + 2 * nkv), H), dtype=np.uint16)
    exponent = (bits >> 7) & 0xFF
    bits[exponent == 0xFF] &= 0x807F  # no NaN or inf here (torch canonicalises NaN bits differently on each code path)
    bits[:4, :4] = [[0x0001, 0x8001, 0x0003, 0x0081], [0x7F80, 0xFF80, 0x0080, 0x7F7F],
                    [0x0002, 0x8003, 0x0100, 0x00FF], [0x0000, 0x8000, 0x3F80, 0x0180]]
    qkv = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
    # create-local-model.py, verbatim apart from names
    qk = qkv[:64 * (nq + nkv), ...].contiguous()
    v = qkv[64 * (nq + nkv):, ...].contiguous()
    qk = qk.view(nq + nkv, 2, 64 // 2, -1).transpose(1, 2).reshape(nq + nkv, 64, -1)
    q, k = qk[:nq, ...], qk[nq:, ...]
    q *= 0.5
    k *= 0.25
    v = v.view(nkv, 64, -1)
    qkv.copy_(torch.cat((q, k, v), dim=0).reshape(*qkv.shape))
    want = qkv.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(metal.permute_qkv(bits, nq, nkv), want)
