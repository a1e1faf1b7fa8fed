"""Reliability: interrupted and failing writes leave nothing behind; inputs are never modified;
header parsers reject garbage with InputError and nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oss_convert import hashing
from oss_convert.atomic import atomic_output
from oss_convert.errors import InputError, OutputExistsError
from oss_convert.formats.safetensors import SafetensorsFile

# A model big enough (~300 MB) that writing it takes a few seconds, so we can interrupt it.
BIG = ("from oss_convert import synth; import sys;"
       "cfg = synth.preset_with('tiny', num_hidden_layers=8, num_experts=32, hidden_size=1024,"
       " intermediate_size=1024, vocab_size=4096);"
       "synth.generate(sys.argv[1], cfg, force=True)")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def start_big_write(dest: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BIG, str(dest)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.endswith(".partial") for p in dest.parent.iterdir()):  # writing has begun
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.02)
    time.sleep(0.3)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing(tmp_path, sig):
    dest = tmp_path / "model"
    proc = start_big_write(dest)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGINT:  # Python turns SIGINT into KeyboardInterrupt: the temp folder is removed
        assert leftovers(tmp_path) == []
    assert not dest.exists()


def test_cli_cleans_up_on_sigterm(tmp_path):
    dest = tmp_path / "repo"
    proc = subprocess.Popen([sys.executable, "-m", "oss_convert.cli.main", "synth", str(dest), "--quiet",
                             "--no-tokenizer", "--preset", "metal"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.2)
    proc.terminate()
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read()
    assert leftovers(tmp_path) == []


def test_kill_never_leaves_a_partial_artifact_under_the_final_name(tmp_path):
    dest = tmp_path / "model"
    proc = start_big_write(dest)
    proc.kill()
    proc.wait(timeout=60)
    assert not dest.exists()
    assert all(name.endswith(".partial") and name.startswith(".") for name in leftovers(tmp_path))


def test_kill_during_replace_keeps_the_old_output(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.txt").write_text("previous artifact")
    proc = subprocess.Popen([sys.executable, "-c", BIG, str(dest)])
    time.sleep(1.0)
    proc.kill()
    proc.wait(timeout=60)
    assert (dest / "old.txt").read_text() == "previous artifact"


def test_full_disk_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes writes past 50 MB fail with EFBIG, like a full disk."""
    dest = tmp_path / "model"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50 << 20, 50 << 20))

    out = subprocess.run([sys.executable, "-m", "oss_convert.cli.main", "synth", str(dest), "--quiet",
                          "--no-tokenizer", "--preset", "metal"], preexec_fn=limit, capture_output=True, text=True)
    assert out.returncode != 0
    assert "File too large" in out.stderr or "Errno 27" in out.stderr
    assert leftovers(tmp_path) == []


def test_atomic_output_refuses_existing_and_replaces_with_force(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        with atomic_output(dest):
            pass
    with atomic_output(dest, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new" and leftovers(tmp_path) == ["file.bin"]
    with pytest.raises(RuntimeError):
        with atomic_output(dest, force=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"new" and leftovers(tmp_path) == ["file.bin"]


def test_reading_never_writes_the_input(tiny_repo, tmp_path):
    """The checkpoint is read through read-only handles: it works on read-only files, unchanged."""
    import shutil

    from oss_convert.formats.original import OriginalCheckpoint

    repo = tmp_path / "ro"
    shutil.copytree(tiny_repo, repo)
    files = sorted((repo / "original").iterdir())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for p in files:
        p.chmod(0o444)
    (repo / "original").chmod(0o555)
    try:
        with OriginalCheckpoint(repo) as ckpt:
            assert ckpt.scan() == []
    finally:
        (repo / "original").chmod(0o755)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


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


@pytest.mark.parametrize("size", [0, 1, 4 * 4096, 5 * 4096 + 3])
def test_file_hashing_in_steps_equals_hashlib(size, tmp_path, monkeypatch):
    """Steps of two pages, so the files end on, before and past a step's edge."""
    import mmap

    monkeypatch.setattr(hashing, "READ_BYTES", 2 * mmap.PAGESIZE)
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    steps = []
    assert hashing.file_sha256(tmp_path / "f", steps.append) == hashlib.sha256(data).hexdigest()
    assert sum(steps) == size and all(n <= 2 * mmap.PAGESIZE for n in steps)


def test_output_hashed_while_written_equals_hashlib(tmp_path, monkeypatch):
    """Large writes are hashed on a second thread, small ones in line, in order either way; the
    write-behind (start write-back, drop from the cache) runs often here and changes no byte."""
    monkeypatch.setattr(hashing, "WRITE_BEHIND_BYTES", 1 << 20)
    monkeypatch.setattr(hashing, "DROP_BEHIND_BYTES", 2 << 20)
    pieces = [os.urandom(n) for n in (10, 3 << 20, 5, 1 << 20, (1 << 20) - 1, 7 << 20, 0, 2)]
    path = tmp_path / "out"
    writer = hashing.HashingWriter(path)
    for piece in pieces:
        writer.write(piece)
    writer.close()
    whole = b"".join(pieces)
    assert path.read_bytes() == whole
    size, _, digest = hashing.written(path)
    assert (size, digest) == (len(whole), hashlib.sha256(whole).hexdigest())
    assert hashing.written(path) is None  # handed over once


def test_manifest_records_provenance_and_integrity_check_catches_changes(tiny_repo, tmp_path):
    out = tmp_path / "bf16"
    cli = [sys.executable, "-m", "oss_convert.cli.main"]
    result = subprocess.run([*cli, "convert", str(tiny_repo), "--to", "hf-bf16", "-o", str(out), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "oss-convert-manifest.json").read_text())
    assert manifest["target"] == "hf-bf16" and manifest["tool"]["name"] == "oss-convert"
    source = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tiny_repo / "original").glob("*.safetensors")}
    assert {k: v["sha256"] for k, v in manifest["source"]["files"].items() if k in source} == source
    assert "config.json" in manifest["outputs"]
    check = [*cli, "verify", "--integrity", str(out)]
    assert subprocess.run(check, capture_output=True).returncode == 0
    victim = next(out.glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 1 and victim.name in result.stdout and "sha256" in result.stdout
    (out / "config.json").unlink()
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 1 and "config.json: missing" in result.stdout
