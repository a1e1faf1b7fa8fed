"""Promise: clear errors. A truncated file, a missing or extra tensor, a tensor named twice, a wrong
shape or dtype, a config that disagrees with the tensors, NaN/Inf values and invalid scales stop
every registered target with exit 2, a message naming the file and the tensor, no traceback and
nothing left behind; broken and fuzzed GGUF, model.bin and safetensors headers give only
``InputError``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oss_convert import converters, synth
from oss_convert.errors import InputError
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.formats.safetensors import SafetensorsFile

from helpers import (
    cut,
    digests,
    edit_header,
    listing,
    poke,
    read_header,
    rewrite_shard,
    run,
    run_cli,
    run_sub,
    shards,
    tree_hashes,
    write_header,
)
from targets import cases


def truncated(repo):
    path = shards(repo)[1]
    path.write_bytes(path.read_bytes()[:-1000])
    header, _ = read_header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    return path, last


def corrupt_header_json(repo):
    path = shards(repo)[0]
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"{{{{"
    path.write_bytes(bytes(raw))
    return path, None


def offsets_out_of_range(repo):
    path = shards(repo)[0]
    header, data = read_header(path)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]  # the last tensor, moved past the end of the file
    header[name]["data_offsets"] = [begin + len(data), end + len(data)]
    write_header(path, header, data)
    return path, f"{name!r}: data ends at byte"


def missing_tensor(repo):
    rewrite_shard(repo, 0, drop="block.0.attn.sinks")
    return repo / "original", "block.0.attn.sinks"


def extra_tensor(repo):
    path = rewrite_shard(repo, 0, add={"block.0.attn.extra": np.zeros(8, np.uint16)})
    return path, "block.0.attn.extra"


def duplicate_tensor(repo):
    first = shards(repo)[0]
    shutil.copy(first, repo / "original" / "model--00003-of-00003.safetensors")
    header, _ = read_header(first)
    return first, next(k for k in header if k != "__metadata__")  # the first one the reader meets again


def wrong_dtype(repo):
    path = shards(repo)[0]
    name = "block.0.attn.sinks" if "block.0.attn.sinks" in read_header(path)[0] else None
    assert name, "the tiny repo's first shard holds layer 0"
    edit_header(path, lambda h: h[name].update(dtype="F16"))  # same size, wrong type
    return path, name


def wrong_shape(repo):
    path = shards(repo)[0]
    name = "block.0.attn.qkv.weight"
    edit_header(path, lambda h: h[name].update(shape=h[name]["shape"][::-1]))  # same bytes, transposed
    return path, name


def nan_in_bf16(repo):
    return poke(repo, "block.1.attn.qkv.weight", 6, b"\xc0\x7f"), "block.1.attn.qkv.weight"


def inf_in_bf16(repo):
    return poke(repo, "norm.scale", 0, b"\x80\xff"), "norm.scale"  # -inf


def scale_255(repo):
    name = "block.2.mlp.mlp2_weight.scales"
    return poke(repo, name, 3, b"\xff"), name


def config_disagrees(repo):
    path = repo / "original" / "config.json"
    config = json.loads(path.read_text())
    config["num_attention_heads"] = 4  # the tensors were made for 8 heads
    path.write_text(json.dumps(config))
    return shards(repo)[0], "'block.0.attn.qkv.weight': is BF16[768, 160] but config.json implies BF16[512, 160]"


def config_not_json(repo):
    path = repo / "original" / "config.json"
    path.write_text(path.read_text()[:-5])
    return path, None


STRUCTURAL = [truncated, corrupt_header_json, offsets_out_of_range, missing_tensor, extra_tensor,
              duplicate_tensor, wrong_dtype, wrong_shape, config_disagrees, config_not_json]


VALUES = [nan_in_bf16, inf_in_bf16, scale_255]  # structurally fine; the data is not


@pytest.fixture
def bad_repo(tiny_repo, tmp_path):
    dest = tmp_path / "src"
    shutil.copytree(tiny_repo, dest)
    return dest


def assert_names(message: str, file: Path, tensor: str | None) -> None:
    assert str(file) in message or file.name in message, message
    if tensor is not None:
        assert tensor in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize("defect", STRUCTURAL + VALUES, ids=lambda f: f.__name__)
def test_bad_source_exits_2_naming_file_and_tensor_and_leaves_nothing(defect, bad_repo, tmp_path,
                                                                        monkeypatch, capsys):
    file, tensor = defect(bad_repo)
    before = tree_hashes(bad_repo)
    for case in cases():  # every registered target
        out = tmp_path / f"out-{case.name}"
        code, stdout, err = run_cli(monkeypatch, capsys, *case.args(bad_repo, out / case.output))
        assert code == 2, (case.name, err)
        if converters.TARGETS[case.target].full_vocabulary and defect in VALUES:
            # The scan runs beside the conversion; the refusal of the tiny 1024-token vocabulary by a
            # target that stores the full one comes first (the file named is the source's).
            assert "200014" in err and str(bad_repo) in err, err
        else:
            assert_names(err, file, tensor)
        assert listing(out) == [], case.name  # no final name, no .partial, no manifest
    assert tree_hashes(bad_repo) == before  # the input is untouched

    code, stdout, err = run_cli(monkeypatch, capsys, "inspect", str(bad_repo))
    if defect in VALUES:  # found only by reading the data
        assert code == 0, err
        code, stdout, err = run_cli(monkeypatch, capsys, "inspect", "--scan", str(bad_repo))
        assert code == 1
        assert_names(stdout, file, tensor)
    else:
        assert code == 2
        assert_names(err, file, tensor)


@pytest.mark.parametrize("defect", VALUES, ids=lambda f: f.__name__)
def test_no_scan_converts_values_as_they_are(defect, bad_repo, tmp_path, monkeypatch, capsys):
    """``--no-scan`` is the escape hatch: the value defects are not structural, the copy is exact."""
    file, tensor = defect(bad_repo)
    out = tmp_path / "copy"
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(bad_repo), "--to", "original", "-o", str(out),
                           "--quiet", "--no-scan")
    assert code == 0, err
    with OriginalCheckpoint(bad_repo) as a, OriginalCheckpoint(out) as b:
        assert a.raw(tensor).tobytes() == b.raw(tensor).tobytes()


@pytest.mark.parametrize("keep, magic, message", [
    (-1000, None, "truncated"),         # the last tensor's data is cut short
    (5000, None, "GGUF header"),       # cut inside the metadata
    (10, None, "GGUF header"),
    (None, b"GGML", "magic"),
    (None, b"\0\0\0\0", "magic"),
], ids=["data", "metadata", "10-bytes", "ggml-magic", "zero-magic"])
def test_broken_gguf_exits_2_in_inspect_and_verify(tiny_gguf, tiny_repo, tmp_path, keep, magic, message,
                                                  monkeypatch, capsys):
    bad = cut(tiny_gguf, tmp_path / "bad.gguf", keep, magic)
    for args in (["inspect", str(bad)], ["inspect", "--scan", str(bad)],
                 ["verify", str(bad), "--reference", str(tiny_repo), "--quiet"]):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert str(bad) in err and "Traceback" not in err, err
        if magic != b"\0\0\0\0":  # an unknown magic is not recognised as GGUF at all
            assert message in err, err
    assert listing(tmp_path) == ["bad.gguf"]


@pytest.mark.parametrize("keep, magic, folder, message", [
    (50, None, True, "truncated: 50 bytes"),
    (-4096, None, True, "truncated"),
    (1 << 20, None, False, "truncated"),
    (4096, b"GPT-OSS v9.9", True, "not a gpt-oss Metal model.bin"),
    (4096, b"GPT-OSS v9.9", False, "unrecognised file"),
], ids=["header", "last-expert", "file-1MiB", "magic-in-folder", "magic-file"])
def test_broken_model_bin_exits_2_in_inspect_and_verify(metal_bin, tmp_path, keep, magic, folder, message,
                                                       monkeypatch, capsys):
    """A folder holding model.bin is read as Metal whatever the magic; a bare file by its magic."""
    bad = cut(metal_bin, (tmp_path / "metal").mkdir() or tmp_path / "metal" / "model.bin", keep, magic)
    artifact = bad.parent if folder else bad
    # verify opens the artifact before computing any reference: the source here is never read.
    for args in (["inspect", str(artifact)], ["verify", str(artifact), "--reference", str(tmp_path / "unused"),
                                               "--quiet"]):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert str(bad) in err and message in err and "Traceback" not in err, err


class Hang(Exception):
    pass


class Sample(bytes):
    """Bytes of a valid file, with a short repr for hypothesis' failure reports."""

    end: int = 0  # where the header region ends

    def __repr__(self) -> str:
        return f"<{len(self)} bytes, header ends at {self.end}>"


def within_seconds(seconds: int, fn, *args):
    """Run ``fn`` and fail on a hang: SIGALRM raises ``Hang`` (not an InputError) in the main thread."""
    def alarm(signum, frame):
        raise Hang(f"still parsing after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Sample:
    """A valid one-layer GGUF (~1 MB) and the end of its header (where tensor data starts)."""
    import gguf

    folder = tmp_path_factory.mktemp("small-gguf")
    repo = synth.generate(folder / "repo", synth.preset_with("tiny", num_hidden_layers=1), seed=3, tokenizer=True)
    out = folder / "small.gguf"
    assert run_sub("convert", str(repo), "--to", "gguf", "-o", str(out), "--quiet", "--no-manifest").returncode == 0
    sample = Sample(out.read_bytes())
    sample.end = min(t.data_offset for t in gguf.GGUFReader(out).tensors)
    return sample


def open_and_describe_gguf(path: Path) -> None:
    from oss_convert.formats import gguf as gguf_format

    info = gguf_format.describe(path)
    assert isinstance(info, dict)
    with gguf_format.GgufModel(path) as model:
        model.problems()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gguf_header(small_gguf, tmp_path, data):
    header_end = small_gguf.end
    mutated = bytearray(small_gguf)
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        at = data.draw(st.integers(0, header_end - 1), label="offset")
        value = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        mutated[at:at + len(value)] = value
    if data.draw(st.booleans(), label="cut"):
        mutated = mutated[:data.draw(st.integers(0, header_end), label="keep")]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(mutated))
    try:
        within_seconds(5, open_and_describe_gguf, path)
    except InputError as exc:
        assert str(path) in str(exc)


@pytest.fixture(scope="module")
def metal_head(metal_bin) -> Sample:
    """model.bin up to the end of its tokenizer section; ``end`` is the full file size."""
    from oss_convert.formats.metal import MetalModel

    with MetalModel(metal_bin) as model:
        end = model.layout.shared_start
    with open(metal_bin, "rb") as fh:
        sample = Sample(fh.read(end))
    sample.end = metal_bin.stat().st_size
    return sample


def open_and_describe_metal(path: Path) -> None:
    from oss_convert.formats import metal

    info = metal.describe(path)
    assert isinstance(info, dict)
    with metal.MetalModel(path) as model:
        model.text_tokens()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_metal_header(metal_head, tmp_path, data):
    """Mutate the fixed header and the tokenizer section; the weights are a sparse hole of zeros
    (the reader must not care about their values to parse the header)."""
    head, size = metal_head, metal_head.end
    mutated = bytearray(head)
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
        near_start = data.draw(st.booleans(), label="in the fixed header")
        at = data.draw(st.integers(0, 200 if near_start else len(head) - 1), label="offset")
        value = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        mutated[at:at + len(value)] = value
    path = tmp_path / "model.bin"
    with open(path, "wb") as fh:
        fh.write(bytes(mutated))
        fh.truncate(data.draw(st.sampled_from([size, len(head), size // 2]), label="size"))
    try:
        within_seconds(5, open_and_describe_metal, path)
    except InputError as exc:
        assert str(path) in str(exc)


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.builds(
    safetensors_bytes,
    st.dictionaries(st.text(max_size=5), st.fixed_dictionaries({
        "dtype": st.sampled_from(["BF16", "U8", "F32", "X9"]),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "data_offsets": st.lists(st.integers(-2, 40), min_size=0, max_size=3),
    }), max_size=3),
    st.binary(max_size=40),
))
def test_fuzz_safetensors_header_parser(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        f = SafetensorsFile(path)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    for name in f.entries:  # whatever parses must be readable within the file
        f.array(name)
    f.close()


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    """A fresh copy of the two-shard tiny repo (original/ plus tokenizer files at the root)."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


def _with_duplicate_key(path: Path) -> None:
    """Rewrite ``path``'s header so its first tensor is named twice (JSON parsers keep one)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode().rstrip()
    first = next(k for k in json.loads(header) if k != "__metadata__")
    entry = json.dumps(json.loads(header)[first], separators=(",", ":"))
    doubled = header[:-1] + f',"{first}":{entry}' + "}"
    doubled += " " * (-len(doubled) % 8)
    path.write_bytes(struct.pack("<Q", len(doubled)) + doubled.encode() + raw[8 + n:])


def test_duplicate_keys_are_an_error_naming_file_and_key(monkeypatch, capsys, repo):
    shard = repo / "original" / "model--00001-of-00002.safetensors"
    _with_duplicate_key(shard)
    with pytest.raises(InputError, match="twice") as info:
        SafetensorsFile(shard)
    assert str(shard) in str(info.value) and "embedding.weight" in str(info.value)
    code, err = run(monkeypatch, capsys, "inspect", repo)
    assert code == 2 and "twice" in err and shard.name in err and "embedding.weight" in err


def test_what_a_file_says_is_printed_escaped(tiny_gguf, tmp_path):
    """A name from a file (GGUF metadata, a path) cannot drive the terminal or split a message:
    an ANSI escape in general.name comes out escaped; a newline and an escape in a file's name
    leave its error on one line."""
    import gguf

    from helpers import run_sub

    reader = gguf.GGUFReader(tiny_gguf)
    name = next(f for f in reader.fields.values() if f.name == "general.name")
    evil = tmp_path / "evil.gguf"
    shutil.copyfile(tiny_gguf, evil)
    # general.name rewritten in place: same length, an ANSI colour and a newline in it
    value = bytes(name.parts[name.data[0]])
    payload = (b"\x1b[31m" + value)[:len(value)]
    data = bytearray(evil.read_bytes())
    offset = data.find(value, reader.fields["general.name"].offset)
    data[offset:offset + len(value)] = payload
    evil.write_bytes(bytes(data))
    result = run_sub("inspect", str(evil))
    assert "\x1b" not in result.stdout and "\\x1b[31" in result.stdout, result.stdout
    odd = tmp_path / "line\nbreak\x1b[2J.gguf"
    shutil.copyfile(tiny_gguf, odd)
    odd.write_bytes(odd.read_bytes()[:100])  # truncated: an error naming the file
    result = run_sub("inspect", str(odd))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "line\\nbreak\\x1b[2J.gguf" in result.stderr, result.stderr


# Values no gpt-oss can have: each reached a ZeroDivisionError, a math domain error, NaN
# arithmetic or gigabytes of allocation downstream; each must stop at the config, naming it.
IMPOSSIBLE_CONFIGS = {
    "rope_theta": (1, "rope_theta must exceed 1"),
    "initial_context_length": (0, "initial_context_length must be in 1.."),
    "rope_ntk_beta": (0, "rope_ntk_beta must be finite"),
    "rope_ntk_alpha": (64, "rope_ntk_alpha must be below rope_ntk_beta"),
    "swiglu_limit": ("NaN", "NaN is not a JSON number"),
    "num_attention_heads": (0, "num_attention_heads must be in 1.."),
    "num_hidden_layers": (10**9, "num_hidden_layers must be in 1..1024"),
    "sliding_window": (-1, "sliding_window must be in 1.."),
    "rope_scaling_factor": (0.5, "rope_scaling_factor must be >= 1"),
}


@pytest.mark.parametrize("key", list(IMPOSSIBLE_CONFIGS))
def test_a_config_no_gpt_oss_can_have_is_refused(key, bad_repo, tmp_path):
    from helpers import run_sub

    value, message = IMPOSSIBLE_CONFIGS[key]
    config_path = bad_repo / "original" / "config.json"
    text = config_path.read_text()
    config = json.loads(text)
    config[key] = "__VALUE__"
    config_path.write_text(json.dumps(config).replace('"__VALUE__"', str(value)))  # NaN as Python's json writes it
    for args in (("inspect", str(bad_repo)), ("convert", str(bad_repo), "--to", "gguf", "-o", str(tmp_path / "x.gguf"))):
        result = run_sub(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "config.json" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("where", ["original/model--00002-of-00002.safetensors", "original/config.json",
                                   "tokenizer.json"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(where, bad_repo, tmp_path):
    """A FIFO named like a shard, the config or the tokenizer: an open would block forever; it
    is refused as not a regular file, naming it."""
    import subprocess
    import sys

    target = bad_repo / where
    target.unlink()
    os.mkfifo(target)
    commands = [("convert", str(bad_repo), "--to", "gguf", "-o", str(tmp_path / "x.gguf"))]
    if where != "tokenizer.json":  # inspect reads no tokenizer it does not need (it reports it absent)
        commands.append(("inspect", str(bad_repo)))
    for args in commands:
        result = subprocess.run([sys.executable, "-m", "oss_convert.cli.main", *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and "not a regular file" in result.stderr and target.name in result.stderr, \
            (args, result.stderr)
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def reference_npz(tiny_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    assert run_sub("reference", str(tiny_repo), "-o", str(out), "--ctx", "256", "--chunks", "1", "--quiet").returncode == 0
    return out


def _edited_reference(source: Path, dest: Path, **changes) -> Path:
    with np.load(source, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    for name, edit in changes.items():
        arrays[name] = edit(arrays[name].copy())
    np.savez_compressed(dest, **arrays)
    return dest


def test_a_bad_reference_cache_is_a_bad_input_not_a_failed_verify(monkeypatch, capsys, tiny_gguf, reference_npz,
                                                                  tmp_path):
    """A reference cache is a stranger's file too: ids outside its vocabulary, NaN log-probs, an id
    twice in one top-k (its mass counted twice), a cut or inflating archive stop with exit 2 naming it, where they would have failed the artifact
    (exit 1) or raised."""
    def bad_id(ids):
        ids[0, 0] = 10**6
        return ids

    def nan(values):
        values[3] = np.nan
        return values

    def repeated(ids):
        ids[2, 1] = ids[2, 0]
        return ids

    data = reference_npz.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    cases = {
        _edited_reference(reference_npz, tmp_path / "ids.npz", top_ids=bad_id): "not ids of its",
        _edited_reference(reference_npz, tmp_path / "nan.npz", logsumexp=nan): "NaN",
        _edited_reference(reference_npz, tmp_path / "repeated.npz", top_ids=repeated): "repeat an id",
        tmp_path / "cut.npz": "not a complete .npz",
    }
    for path, message in cases.items():
        code, err = run(monkeypatch, capsys, "verify", tiny_gguf, "--reference", path, "--quiet")
        assert code == 2 and message in err and path.name in err, (path.name, err)
    monkeypatch.setattr("oss_convert.formats.reference.MAX_REFERENCE_BYTES", 1000)
    code, err = run(monkeypatch, capsys, "verify", tiny_gguf, "--reference", reference_npz, "--quiet")
    assert code == 2 and "inflate to" in err, err


def _gguf_with_offset(source: Path, dest: Path, tensor: int, offset) -> Path:
    """A copy of ``source`` whose ``tensor``-th tensor info points at ``offset(old offsets)``."""
    import gguf

    shutil.copyfile(source, dest)
    reader = gguf.GGUFReader(dest, "r+")
    offsets = [int(t.field.parts[-1][0]) for t in reader.tensors]
    reader.tensors[tensor].field.parts[-1][0] = offset(offsets)
    reader.data.flush()
    del reader
    return dest


@pytest.mark.parametrize("case, offset, message", [
    ("wraps", lambda o: 2**64 - 1, "past the file's"),
    ("misaligned", lambda o: o[1] + 1, "not aligned"),
    ("shared", lambda o: o[0], "overlaps"),
])
def test_gguf_tensor_placement_that_llama_cpp_refuses(case, offset, message, tiny_gguf, tmp_path):
    """A tensor offset of 2^64-1 (gguf-py's uint64 sum wraps it to before the data), a misaligned
    one, two tensors on the same bytes: refused naming the file, as llama.cpp refuses them."""
    bad = _gguf_with_offset(tiny_gguf, tmp_path / f"{case}.gguf", 1, offset)
    for args in (("inspect", str(bad)), ("verify", str(bad), "--reference", str(bad))):
        result = run_sub(*args)
        assert result.returncode == 2 and message in result.stderr and bad.name in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


# -- the merge's temporary files --------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _free_space(free: int):
    """``shutil.disk_usage`` of a temporary folder with ``free`` bytes left."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    return lambda folder: usage(1 << 40, (1 << 40) - free, free)


def test_a_merge_without_room_for_its_temporary_files_is_refused_before_writing(monkeypatch, capsys, tmp_path):
    from oss_convert import adapters

    base, adapter = EXAMPLES / "gpt-oss-tiny", EXAMPLES / "gpt-oss-tiny-sherlock-lora"
    before = digests(base), digests(adapter)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(adapters.tempfile, "tempdir", None)  # TMPDIR read again
    monkeypatch.setattr(adapters.shutil, "disk_usage", _free_space(adapters.SPILL_MARGIN_BYTES))
    out = tmp_path / "merged"
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(base), "--adapter", str(adapter), "--to", "mlx",
                           "-o", str(out), "--quiet")
    assert code == 2 and "TMPDIR" in err and str(tmp_path) in err and "GB a layer" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert (digests(base), digests(adapter)) == before


def test_the_workers_run_ahead_only_as_far_as_the_temporary_folder_holds(monkeypatch):
    from oss_convert import adapters, formats

    base = OriginalCheckpoint(EXAMPLES / "gpt-oss-tiny")
    lora = formats.read_adapter(EXAMPLES / "gpt-oss-tiny-sherlock-lora", base.config)
    try:
        merged = adapters.MergedSource(base, lora, workers=False)
        layer = merged._spill_layer_bytes()
        merged.stop()
        # (the window in layers, the layers the folder holds) -> the layers the workers may run ahead
        for window, room, ahead in ((1000, 1, 0), (1000, 2, 1), (1000, 5, 4), (2, 5, 2), (2, 1, 0)):
            monkeypatch.setattr(adapters, "SPILL_AHEAD_BYTES", window * layer)
            monkeypatch.setattr(adapters.shutil, "disk_usage",
                                _free_space(adapters.SPILL_MARGIN_BYTES + room * layer + layer // 2))
            merged = adapters.MergedSource(base, lora, workers=False)
            assert merged._layers_ahead() == ahead, (window, room)
            merged.stop()
        # a machine with less memory: the window is a share of it (3.5 layers here), not 1000 layers
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        monkeypatch.setattr(adapters, "SPILL_AHEAD_BYTES", 1000 * layer)
        monkeypatch.setattr(adapters, "SPILL_MEMORY_SHARE", memory // (3 * layer + layer // 2))
        monkeypatch.setattr(adapters.shutil, "disk_usage", _free_space(adapters.SPILL_MARGIN_BYTES + 10 * layer))
        merged = adapters.MergedSource(base, lora, workers=False)
        assert merged._layers_ahead() == 3
        merged.stop()
    finally:
        lora.close()
        base.close()


def test_the_spill_leaves_room_for_an_output_written_on_the_same_disk(monkeypatch, tmp_path):
    """The output will take about the base's size: on the temporary folder's disk the workers run
    ahead only as far as the rest holds (one layer at least: not refused, the output may be
    smaller); elsewhere, or with no output named, the whole free space counts."""
    from oss_convert import adapters, formats

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(adapters.tempfile, "tempdir", None)  # TMPDIR read again
    base = OriginalCheckpoint(EXAMPLES / "gpt-oss-tiny")
    lora = formats.read_adapter(EXAMPLES / "gpt-oss-tiny-sherlock-lora", base.config)
    try:
        merged = adapters.MergedSource(base, lora, workers=False)
        layer, output_bytes = merged._spill_layer_bytes(), base.tensor_bytes
        merged.stop()
        assert output_bytes > 2 * layer
        monkeypatch.setattr(adapters, "SPILL_AHEAD_BYTES", 1000 * layer)
        same_disk = tmp_path / "not-yet" / "merged"
        other_disk = Path("/proc/merged")  # a file system of its own on Linux
        for output, room, ahead in ((same_disk, 3, 2), (same_disk, -1, 0), (None, 3, None), (other_disk, 3, None)):
            free = adapters.SPILL_MARGIN_BYTES + output_bytes + room * layer + layer // 2
            monkeypatch.setattr(adapters.shutil, "disk_usage", _free_space(free))
            merged = adapters.MergedSource(base, lora, workers=False, output=output)
            everything = (free - adapters.SPILL_MARGIN_BYTES) // layer - 1
            assert merged._layers_ahead() == (everything if ahead is None else ahead), (output, room)
            merged.stop()
    finally:
        lora.close()
        base.close()
    assert adapters._same_disk(tmp_path, same_disk) and not adapters._same_disk(tmp_path, other_disk)
    assert not same_disk.parent.exists()


def test_a_full_temporary_folder_mid_merge_names_it(monkeypatch, capsys, tmp_path):
    import errno

    from oss_convert import adapters

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adapters.os, "pwrite", full)  # only the spill writes with pwrite
    out = tmp_path / "merged"
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(EXAMPLES / "gpt-oss-tiny"), "--adapter",
                           str(EXAMPLES / "gpt-oss-tiny-sherlock-lora"), "--to", "mlx", "-o", str(out), "--quiet")
    assert code == 2 and "temporary file" in err and "TMPDIR" in err and "No space left" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
