"""The original/ reader: structure validation with errors that name file and tensor."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from oss_convert import synth
from oss_convert.dtypes import SCAN_ELEMENTS, count_bf16_nonfinite
from oss_convert.errors import InputError
from oss_convert.formats import mxfp4
from oss_convert.formats.original import OriginalCheckpoint, resolve
from oss_convert.model import ModelConfig, expected_tensors
from oss_convert.formats.safetensors import SafetensorsFile

from oracles import torch_reference_logits


@pytest.fixture
def repo_copy(tiny_repo, tmp_path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(tiny_repo, dest)
    return dest


def shard(repo: Path, index: int = 1) -> Path:
    return sorted((repo / "original").glob("*.safetensors"))[index - 1]


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header_dict)`` to a safetensors file, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_reads_every_tensor_of_a_sharded_checkpoint(tiny_repo):
    with OriginalCheckpoint(tiny_repo) as ckpt:
        assert ckpt.path == tiny_repo / "original"
        assert len(ckpt.files) == 2
        assert [s.name for s in ckpt.specs] == [s.name for s in expected_tensors(ckpt.config)]
        assert len(ckpt.entries) == 3 + 15 * ckpt.config.num_hidden_layers
        pair = ckpt.mxfp4(1, "mlp1")
        assert pair.blocks.shape == (8, 192, 5, 16) and pair.scales.shape == (8, 192, 5)
        assert ckpt.raw("embedding.weight").dtype == np.uint16
        assert ckpt.scan() == []


def test_sharding_does_not_change_tensors(tiny_repo, tiny_single_repo):
    with OriginalCheckpoint(tiny_repo) as a, OriginalCheckpoint(tiny_single_repo) as b:
        for spec in a.specs:
            assert a.raw(spec.name).tobytes() == b.raw(spec.name).tobytes(), spec.name


def test_resolve_accepts_original_folder_and_repo_root(tiny_repo):
    assert resolve(tiny_repo) == resolve(tiny_repo / "original") == tiny_repo / "original"


def test_truncated_shard_is_rejected_naming_file_and_tensor(repo_copy):
    path = shard(repo_copy, 2)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError) as err:
        OriginalCheckpoint(repo_copy)
    assert path.name in str(err.value) and "truncated" in str(err.value) and "tensor" in str(err.value)


def test_missing_tensor_is_rejected(repo_copy):
    path = shard(repo_copy, 1)
    victim = "block.0.attn.sinks"
    rewrite_header(path, lambda h: h.pop(victim))
    with pytest.raises(InputError) as err:
        OriginalCheckpoint(repo_copy)
    # the data is still in the file, so the first complaint is the undescribed bytes
    assert path.name in str(err.value)


def test_missing_tensor_with_consistent_file(repo_copy):
    """A shard written without one tensor: the error names it and says what was expected."""
    with OriginalCheckpoint(repo_copy) as ckpt:
        specs = [s for s in ckpt.specs if ckpt.entries[s.name].file == shard(repo_copy, 1)]
        arrays = {s.name: np.array(ckpt.raw(s.name)) for s in specs}
    from oss_convert.formats.safetensors import SafetensorsWriter

    keep = [s for s in specs if s.name != "block.0.attn.sinks"]
    with open(shard(repo_copy, 1), "wb") as fh:
        writer = SafetensorsWriter(fh, keep)
        for s in keep:
            writer.write(s.name, arrays[s.name])
    with pytest.raises(InputError) as err:
        OriginalCheckpoint(repo_copy)
    message = str(err.value)
    assert "'block.0.attn.sinks'" in message and "missing" in message and "BF16[8]" in message


def test_wrong_shape_is_rejected(repo_copy):
    path = shard(repo_copy, 1)

    def edit(header):
        entry = header["block.0.attn.qkv.weight"]
        rows, cols = entry["shape"]
        entry["shape"] = [cols, rows]  # same byte count, transposed

    rewrite_header(path, edit)
    with pytest.raises(InputError) as err:
        OriginalCheckpoint(repo_copy)
    message = str(err.value)
    assert path.name in message and "'block.0.attn.qkv.weight'" in message
    assert "BF16[160, 768]" in message and "BF16[768, 160]" in message


def test_duplicate_tensor_across_shards_is_rejected(repo_copy):
    first = shard(repo_copy, 1)
    shutil.copy(first, repo_copy / "original" / "model--00003-of-00003.safetensors")
    with pytest.raises(InputError) as err:
        OriginalCheckpoint(repo_copy)
    assert "also in" in str(err.value) and first.name in str(err.value)


def test_corrupt_header_json_and_bad_offsets(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(InputError, match="not valid JSON"):
        SafetensorsFile(bad)
    header = json.dumps({"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(InputError, match="span 16 bytes but BF16\\[4\\] needs 8"):
        SafetensorsFile(bad)
    bad.write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(InputError, match="header length"):
        SafetensorsFile(bad)


def test_config_problems_are_named(repo_copy):
    config_path = repo_copy / "original" / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 192
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="config.json implies BF16\\[1024, 192\\]"):
        OriginalCheckpoint(repo_copy)
    config["extra_key"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="unknown config keys \\['extra_key'\\]"):
        OriginalCheckpoint(repo_copy)


def test_scan_finds_nan_and_scale_255(repo_copy):
    path = shard(repo_copy, 1)
    with OriginalCheckpoint(repo_copy) as ckpt:
        nan_at = ckpt.entries["embedding.weight"].start
        scale_name = next(n for n, e in ckpt.entries.items() if n.endswith(".scales") and e.file == path)
        scale_at = ckpt.entries[scale_name].start
    data = bytearray(path.read_bytes())
    data[nan_at:nan_at + 2] = b"\xc0\x7f"  # BF16 NaN
    data[scale_at] = 255
    path.write_bytes(bytes(data))
    with OriginalCheckpoint(repo_copy) as ckpt:
        problems = ckpt.scan()
    assert any("'embedding.weight'" in p and "1 NaN/Inf" in p for p in problems)
    assert any(scale_name in p and "255" in p for p in problems)


def test_scan_counters_agree_with_numpy_on_every_bit_pattern():
    """The fast counters (a mask and a max per pass) against numpy's own isfinite / equality."""
    every = np.arange(1 << 16, dtype=np.uint16)
    as_f32 = (every.astype(np.uint32) << 16).view(np.float32)  # BF16 is float32's top half
    assert count_bf16_nonfinite(every) == np.count_nonzero(~np.isfinite(as_f32)) == 2 * 128
    rng = np.random.default_rng(3)
    finite = rng.integers(0, 1 << 16, 3 * SCAN_ELEMENTS + 17, dtype=np.uint16)
    finite[~np.isfinite((finite.astype(np.uint32) << 16).view(np.float32))] = 0
    assert count_bf16_nonfinite(finite) == 0
    for at in (0, SCAN_ELEMENTS - 1, SCAN_ELEMENTS, finite.size - 1):  # the first, a pass's edges, the last
        planted = finite.copy()
        planted[at] = 0xFF80  # -Inf
        assert count_bf16_nonfinite(planted.reshape(-1, 1)) == 1
    assert count_bf16_nonfinite(np.array([0x7F7F, 0xFF7F], np.uint16)) == 0  # the largest finite values
    scales = np.full(1000, 254, np.uint8)
    assert mxfp4.count_nan_scales(scales) == 0 and mxfp4.count_nan_scales(scales[:0]) == 0
    scales[[3, 999]] = 255
    assert mxfp4.count_nan_scales(scales) == 2


def test_real_config_serialises_like_the_hub_file():
    # The 120b original/config.json on the Hub is 377 bytes; the defaults are the 120b values.
    assert len(ModelConfig().to_json()) == 377
    assert len(synth.PRESETS["20b"].to_json()) == 376


@pytest.mark.oracle
def test_official_torch_reference_runs_the_synthetic_checkpoint(tiny_repo, tiny_single_repo, tokens_300):
    sharded = torch_reference_logits(tiny_repo, tokens_300[:40])
    single = torch_reference_logits(tiny_single_repo, tokens_300[:40])
    assert sharded.shape == (40, 1024)
    assert np.isfinite(sharded).all()
    assert np.array_equal(sharded, single)
    assert sharded.std() > 0.5  # a live model, not zeros
