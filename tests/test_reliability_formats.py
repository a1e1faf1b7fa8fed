"""Reliability of every converter and reader, through the command line as CI runs it.

- A corpus of broken sources: each defect exits 2 with the file (and tensor) named, no traceback,
  and nothing left where the output would have gone, for every target.
- Broken GGUF / model.bin artifacts through ``inspect`` and ``verify``; header fuzzing of both
  readers (only ``InputError`` may escape, never a hang).
- Atomic output per converter: Ctrl-C, SIGKILL and a full disk (``RLIMIT_FSIZE``) leave the old
  output or nothing; an existing output needs ``--force`` and is replaced only on success.
- The source is never opened for writing (an audit hook sees every open and mmap).
- Determinism across runs and thread counts; a provenance manifest for every target.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oss_convert import synth
from oss_convert.cli.main import main
from oss_convert.errors import InputError
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.formats.safetensors import SafetensorsWriter

pytest.importorskip("gguf")

CLI = [sys.executable, "-m", "oss_convert.cli.main"]
# Targets on the tiny model, and the output name each gets (a folder, or a single file).
TARGETS = {"mlx": "model", "gguf": "model.gguf", "hf": "model", "hf-bf16": "model", "original": "model",
           "metal": "model.bin"}


# -- helpers -------------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``oss-convert ARGS`` in this process (the real ``main``: exit codes and error mapping).

    Anything but ``SystemExit`` escaping ``main`` is a crash with a traceback, and fails the test.
    """
    monkeypatch.setattr(sys, "argv", ["oss-convert", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def run_sub(*args: str, env: dict | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # writes past ``fsize`` bytes fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env,
                          preexec_fn=limit if fsize else None)


def listing(folder: Path) -> list[str]:
    """Every path under ``folder``, hidden ones included (``.partial``, ``.old``)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shards(repo: Path) -> list[Path]:
    return sorted((repo / "original").glob("*.safetensors"))


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header: dict, data: bytes) -> None:
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)


def edit_header(path: Path, edit) -> None:
    header, data = read_header(path)
    edit(header)
    write_header(path, header, data)


def rewrite_shard(repo: Path, index: int, drop: str | None = None, add: dict | None = None) -> Path:
    """Write shard ``index`` again through the safetensors writer without ``drop`` / with ``add``
    (a consistent file: the defect is in what it holds, not in its container)."""
    path = shards(repo)[index]
    with OriginalCheckpoint(repo) as ckpt:
        arrays = {n: np.array(ckpt.raw(n)) for n, e in ckpt.entries.items() if e.file == path and n != drop}
        specs = [ckpt.entries[n] for n in arrays]
    from oss_convert.model import TensorSpec

    arrays.update(add or {})
    specs = [TensorSpec(s.name, s.dtype, s.shape) for s in specs]
    specs += [TensorSpec(n, "BF16", a.shape) for n, a in (add or {}).items()]
    with open(path, "wb") as fh:
        writer = SafetensorsWriter(fh, specs)
        for s in specs:
            writer.write(s.name, arrays[s.name])
        writer.finish()
    return path


def poke(repo: Path, tensor: str, at: int, data: bytes) -> Path:
    """Overwrite bytes of ``tensor`` at byte ``at`` of its data; returns its file."""
    with OriginalCheckpoint(repo) as ckpt:
        entry = ckpt.entries[tensor]
    with open(entry.file, "r+b") as fh:
        fh.seek(entry.start + at)
        fh.write(data)
    return entry.file


# -- the bad-source corpus -----------------------------------------------------------------------
# Each defect edits a copy of the tiny 2-shard repo and returns (file, tensor) the error must name.


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
    for target, name in TARGETS.items():
        out = tmp_path / f"out-{target}"
        code, stdout, err = run_cli(monkeypatch, capsys, "convert", str(bad_repo), "--to", target,
                                    "-o", str(out / name), "--quiet")
        assert code == 2, (target, err)
        if target == "metal" and defect in VALUES:
            # The scan runs beside the conversion; Metal's own refusal of a 1024-token vocabulary
            # comes first (the file named is the source's, the tensor is not read).
            assert "200014" in err and str(bad_repo) in err, err
        else:
            assert_names(err, file, tensor)
        assert listing(out) == [], target  # no final name, no .partial, no manifest
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


# -- broken artifacts through inspect and verify ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tiny_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert run_sub("convert", str(tiny_repo), "--to", "gguf", "-o", str(out), "--quiet").returncode == 0
    return out


@pytest.fixture(scope="module")
def metal_bin(metal_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("metal") / "model.bin"
    result = run_sub("convert", str(metal_repo), "--to", "metal", "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def cut(path: Path, dest: Path, keep: int | None = None, magic: bytes | None = None) -> Path:
    """A copy of ``path`` cut to ``keep`` bytes (negative: drop that many) and/or with another magic."""
    size = path.stat().st_size
    keep = size if keep is None else keep if keep >= 0 else size + keep
    with open(path, "rb") as src, open(dest, "wb") as out:
        out.write(src.read(keep))
        if magic:
            out.seek(0)
            out.write(magic)
    return dest


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


def test_integrity_check_catches_a_cut_artifact(tiny_gguf, tmp_path, monkeypatch, capsys):
    copy = tmp_path / tiny_gguf.name
    shutil.copy(tiny_gguf, copy)
    shutil.copy(tiny_gguf.with_name(tiny_gguf.name + ".manifest.json"), tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "verify", "--integrity", str(copy))
    assert code == 0, out + err
    cut(tiny_gguf, copy, -1)
    code, out, _ = run_cli(monkeypatch, capsys, "verify", "--integrity", str(copy))
    assert code == 1 and f"tiny.gguf: size {copy.stat().st_size}" in out


# -- header fuzzing ---------------------------------------------------------------------------------


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


# -- atomic output, per converter -------------------------------------------------------------------

# ~450 MB of MXFP4 experts: every converter takes seconds on it, long enough to interrupt.
BIG = synth.preset_with("tiny", hidden_size=1024, intermediate_size=1024, num_experts=32, num_hidden_layers=8,
                        vocab_size=4096)
# target -> (extra options, output name); the metal converter needs the full-vocabulary preset.
WRITERS = {
    "mlx": ([], "model"),
    "metal": ([], "model.bin"),
    "gguf": ([], "model.gguf"),
    "gguf-split": (["--split-max-size", "40M"], "model.gguf"),
    "hf": ([], "model"),
    "hf-bf16": ([], "model"),
    "original": ([], "model"),
}


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("big") / "repo", BIG, seed=5, tokenizer=True)


def source_for(writer: str, request) -> Path:
    return request.getfixturevalue("metal_repo" if writer == "metal" else "big_repo")


def convert_args(writer: str, source: Path, out: Path, *more: str) -> list[str]:
    options, _ = WRITERS[writer]
    if writer == "gguf-split" and sum(
            p.stat().st_size for p in (source / "original").glob("*.safetensors")) < 40 << 20:
        options = ["--split-max-size", "1M"]  # several shards of a small model too
    return ["convert", str(source), "--to", writer.removesuffix("-split"), "-o", str(out), "--quiet",
            *options, *more]


def writing_started(folder: Path) -> bool:
    """A temporary output with bytes in it exists (the converter is past its checks and the scan)."""
    for p in folder.glob(".*.partial"):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        if any(f.stat().st_size > 0 for f in files):
            return True
    return False


def start_and_wait_for_writing(args: list[str], folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not writing_started(folder):
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be interrupted: {proc.returncode} {proc.stderr.read()}")
        assert time.time() < deadline, "no output appeared within 60 s"
        time.sleep(0.005)
    return proc


def plant_old_output(out: Path) -> dict[str, str]:
    """A previous artifact of ours under the final name, folder or file like the real one (the
    magic of its format, or our manifest: --force replaces nothing else)."""
    if out.suffix in (".gguf", ".bin"):
        out.write_bytes((b"GGUF" if out.suffix == ".gguf" else b"GPT-OSS v1.0") + b" previous artifact")
    else:
        out.mkdir()
        (out / "config.json").write_text('{"previous": "artifact"}')
        (out / "oss-convert-manifest.json").write_text('{"previous": "manifest"}')
    return tree_hashes(out.parent)


@pytest.mark.parametrize("writer", WRITERS)
def test_ctrl_c_keeps_the_old_output_and_leaves_nothing_else(writer, request, tmp_path):
    source = source_for(writer, request)
    out = tmp_path / WRITERS[writer][1]
    old = plant_old_output(out) if writer != "gguf-split" else {}  # split names depend on the count
    before = listing(tmp_path)
    proc = start_and_wait_for_writing(convert_args(writer, source, out, "--force"), tmp_path)
    started = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stderr.read()
    # It stops at once: the background source hashing is cancelled, not finished.
    assert time.time() - started < 5
    assert "interrupted" in proc.stderr.read()
    assert tree_hashes(tmp_path) == old
    assert listing(tmp_path) == before  # no .partial, no .old, no manifest


@pytest.mark.parametrize("writer", ["mlx", "gguf-split", "original"])
def test_kill_never_leaves_a_partial_artifact_under_the_final_name(writer, request, tmp_path):
    source = source_for(writer, request)
    out = tmp_path / WRITERS[writer][1]
    old = plant_old_output(out) if writer != "gguf-split" else {}
    proc = start_and_wait_for_writing(convert_args(writer, source, out, "--force"), tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert {k: v for k, v in tree_hashes(tmp_path).items() if not k.startswith(".")} == old
    visible = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in visible) == sorted({k.split("/")[0] for k in old})
    assert all(p.name.endswith(".partial") for p in tmp_path.iterdir() if p.name.startswith("."))


def split_names(writer: str, source: Path, tmp_path: Path) -> list[str]:
    """The file names a successful conversion makes (learned from one, in another folder)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    result = run_sub(*convert_args(writer, source, probe / WRITERS[writer][1], "--no-manifest"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in probe.iterdir())
    shutil.rmtree(probe)
    return names


@pytest.mark.parametrize("writer", WRITERS)
def test_existing_output_needs_force_and_survives_a_full_disk(writer, request, tiny_repo, tmp_path):
    big = source_for(writer, request)
    small = request.getfixturevalue("metal_repo") if writer == "metal" else tiny_repo
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / WRITERS[writer][1]
    if writer == "gguf-split":  # old shards under the names the new conversion will use
        names = split_names(writer, small, tmp_path)
        assert len(names) > 1
        for name in names:
            (dest / name).write_bytes(b"previous shard")
        old = tree_hashes(dest)
    else:
        old = plant_old_output(out)
    before = listing(dest)

    refused = run_sub(*convert_args(writer, small, out))
    assert refused.returncode == 2 and "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert tree_hashes(dest) == old

    # A full disk: writes past 20 MB fail with EFBIG.
    full = run_sub(*convert_args(writer, big, out, "--force"), fsize=20 << 20)
    assert full.returncode == 2, full.stderr
    assert "cannot write" in full.stderr and "File too large" in full.stderr and "Traceback" not in full.stderr
    assert tree_hashes(dest) == old and listing(dest) == before

    done = run_sub(*convert_args(writer, small, out, "--force"))
    assert done.returncode == 0, done.stderr
    new = tree_hashes(dest)
    assert set(new) != set(old) or all(new[k] != old[k] for k in old)
    assert not [name for name in listing(dest) if name.startswith(".") or "/." in name]
    assert run_sub("verify", "--integrity", done.stdout.strip()).returncode == 0


# -- determinism -------------------------------------------------------------------------------------

# (source fixture, convert options, output name). MLX reads no thread-count variable; its CPU work
# is varied through the CPU affinity instead.
RECIPES = {
    "mlx": ("tiny_repo", ["--to", "mlx"], "model"),
    "mlx-mxfp4-q4": ("tiny_repo", ["--to", "mlx", "--recipe", "mxfp4-q4"], "model"),
    "metal": ("metal_repo", ["--to", "metal"], "model.bin"),
    "gguf-q8_0": ("tiny_repo", ["--to", "gguf", "--outtype", "q8_0"], "model.gguf"),
    "gguf-split": ("tiny_repo", ["--to", "gguf", "--split-max-size", "1M"], "model.gguf"),
    "hf": ("tiny_repo", ["--to", "hf", "--shard-size", "1M"], "model"),
    "hf-search": ("dense_repo", ["--to", "hf", "--recipe", "search"], "model"),
    "hf-bf16": ("tiny_repo", ["--to", "hf-bf16", "--shard-size", "1M"], "model"),
    "original-search": ("dense_repo", ["--to", "original", "--recipe", "search"], "model"),
    "original-from-hf": ("tiny_hf", ["--to", "original"], "model"),
}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@pytest.fixture(scope="module")
def dense_repo(tmp_path_factory) -> Path:
    """Dense BF16 experts, as a fine-tune: ``--recipe search`` does real numeric work on them."""
    return synth.generate(tmp_path_factory.mktemp("dense") / "repo", "tiny", seed=4, experts="bf16", tokenizer=True)


@pytest.fixture(scope="module")
def tiny_hf(tiny_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert run_sub("convert", str(tiny_repo), "--to", "hf-bf16", "-o", str(out), "--quiet").returncode == 0
    return out


def converted_with_threads(source: Path, options: list[str], out: Path, threads: int) -> dict[str, str]:
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    cpus = sorted(os.sched_getaffinity(0))[:threads]

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    result = subprocess.run([*CLI, "convert", str(source), *options, "-o", str(out), "--quiet"], env=env,
                            preexec_fn=pin, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tree_hashes(out.parent)


@pytest.mark.parametrize("recipe", RECIPES)
def test_same_input_gives_identical_bytes_across_runs_and_thread_counts(recipe, request, tmp_path):
    fixture, options, name = RECIPES[recipe]
    source = request.getfixturevalue(fixture)
    one = converted_with_threads(source, options, tmp_path / "one" / name, threads=1)
    many = converted_with_threads(source, options, tmp_path / "many" / name, threads=8)
    assert one == many  # every output file and the manifest, byte for byte
    assert len(one) >= 2  # the artifact and its manifest at least


# -- provenance -----------------------------------------------------------------------------------

PROVENANCE = {  # name -> (source fixture, options, output name, files the artifact is made of)
    "mlx": ("tiny_repo", ["--to", "mlx"], "model", None),
    "gguf": ("tiny_repo", ["--to", "gguf", "--outtype", "q8_0"], "model.gguf", ["model.gguf"]),
    "gguf-split": ("tiny_repo", ["--to", "gguf", "--split-max-size", "1M"], "model.gguf",
                   [f"model-0000{i}-of-00004.gguf" for i in range(1, 5)]),
    "hf": ("tiny_repo", ["--to", "hf", "--shard-size", "1M"], "model", None),
    "hf-bf16": ("tiny_repo", ["--to", "hf-bf16", "--shard-size", "1M"], "model", None),
    "original": ("dense_repo", ["--to", "original", "--recipe", "search"], "model", None),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_provenance(source: Path, result: Path, manifest: Path, options: dict, files: dict[str, Path],
                     monkeypatch, capsys) -> None:
    from oss_convert import __version__

    data = json.loads(manifest.read_text())
    assert data["schema"] == "oss-convert-manifest/1"
    assert data["tool"] == {"name": "oss-convert", "version": __version__}
    assert data["options"] == options
    originals = [*(source / "original").glob("*.safetensors"), source / "original" / "config.json"]
    if not (source / "original").is_dir():  # an HF-layout source
        originals = [*source.glob("*.safetensors"), source / "config.json"]
    assert {k: v["sha256"] for k, v in data["source"]["files"].items()} == {p.name: sha256(p) for p in originals}
    assert {k: v["sha256"] for k, v in data["outputs"].items()} == {k: sha256(p) for k, p in files.items()}

    code, out, err = run_cli(monkeypatch, capsys, "verify", "--integrity", str(result))
    assert code == 0 and "integrity pass" in out, out + err
    for name, path in files.items():  # one flipped bit anywhere is caught, and the file named
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        code, out, _ = run_cli(monkeypatch, capsys, "verify", "--integrity", str(result))
        assert code == 1 and f"{name}: sha256 differs" in out, (name, out)
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", PROVENANCE)
def test_every_target_gets_a_manifest_that_verify_integrity_checks(target, request, tmp_path, monkeypatch, capsys):
    fixture, options, name, file_names = PROVENANCE[target]
    source = request.getfixturevalue(fixture)
    out = tmp_path / name
    code, stdout, err = run_cli(monkeypatch, capsys, "convert", str(source), *options, "-o", str(out), "--quiet")
    assert code == 0, err
    result = Path(stdout.strip())
    if file_names is None:  # a folder: the manifest inside it, covering every other file
        manifest = out / "oss-convert-manifest.json"
        files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file() and p != manifest}
    else:  # single files: OUT.manifest.json beside the first one, covering every shard
        manifest = result.with_name(result.name + ".manifest.json")
        files = {n: tmp_path / n for n in file_names}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*file_names, manifest.name])
    assert manifest.is_file()
    given = dict(zip(options[2::2], options[3::2]))
    recorded = {k.removeprefix("--").replace("-", "_"): v for k, v in given.items()}
    check_provenance(source, result, manifest, recorded, files, monkeypatch, capsys)
    if target == "gguf-split":
        (tmp_path / file_names[2]).unlink()
        code, out, _ = run_cli(monkeypatch, capsys, "verify", "--integrity", str(result))
        assert code == 1 and f"{file_names[2]}: missing" in out


def test_metal_manifest(metal_repo, metal_bin, tmp_path, monkeypatch, capsys):
    shutil.copy(metal_bin, tmp_path / "model.bin")
    shutil.copy(metal_bin.with_name("model.bin.manifest.json"), tmp_path)
    check_provenance(metal_repo, tmp_path / "model.bin", tmp_path / "model.bin.manifest.json", {},
                     {"model.bin": tmp_path / "model.bin"}, monkeypatch, capsys)


# -- the input is only ever read ---------------------------------------------------------------------

# Runs the CLI under an audit hook that sees every open(), mmap and file-system change, and records
# those touching the source with write access. Root ignores file permissions, so a chmod-ed
# source would prove nothing on CI runners that run as root; the hook does.
AUDITED_CLI = r"""
import json, mmap, os, sys
source, log_path = os.path.realpath(sys.argv[1]), sys.argv[2]
del sys.argv[1:3]
writes, reads = [], []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.chown",
           "os.utime", "os.link", "os.symlink", "os.mkdir", "shutil.rmtree", "shutil.move", "shutil.copyfile"}

def inside(path):
    try:
        path = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fsdecode(path)
    except (TypeError, OSError):
        return None
    path = os.path.realpath(path)
    return path if path == source or path.startswith(source + os.sep) else None

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        where = inside(path)
        if where:
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            (writes if writing else reads).append(f"open({mode or flags}) {where}")
    elif event == "mmap.__new__":
        fileno, length, access, offset = args
        where = inside(fileno) if fileno != -1 else None
        if where and access not in (mmap.ACCESS_READ, mmap.ACCESS_COPY):
            writes.append(f"mmap(access={access}) {where}")
    elif event in CHANGES:
        touched = args[1:2] if event == "shutil.copyfile" else args[:2]  # copying from the source is reading
        for arg in touched:
            where = inside(arg) if isinstance(arg, (str, bytes, os.PathLike)) else None
            if where:
                writes.append(f"{event} {where}")

sys.addaudithook(hook)
from oss_convert.cli.main import main
try:
    main()
finally:
    with open(log_path, "w") as fh:
        json.dump({"writes": writes, "reads": reads}, fh)
"""


@pytest.mark.parametrize("source_fixture, target, name", [
    ("tiny_repo", "mlx", "model"), ("tiny_repo", "gguf", "model.gguf"), ("tiny_repo", "hf", "model"),
    ("dense_repo", "hf", "model"), ("tiny_repo", "hf-bf16", "model"),
    ("tiny_repo", "original", "model"), ("metal_repo", "metal", "model.bin"), ("tiny_hf", "original", "model"),
])
def test_the_source_is_never_opened_for_writing(source_fixture, target, name, request, tmp_path):
    source = request.getfixturevalue(source_fixture)
    before = tree_hashes(source)
    log = tmp_path / "audit.json"
    result = subprocess.run([sys.executable, "-c", AUDITED_CLI, str(source), str(log), "convert", str(source),
                             "--to", target, "-o", str(tmp_path / "out" / name), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    audit = json.loads(log.read_text())
    assert audit["writes"] == []
    assert any(".safetensors" in r for r in audit["reads"]) and any("config.json" in r for r in audit["reads"])
    assert tree_hashes(source) == before
