"""Promise: provenance. Every ``convert`` writes a manifest (tool, options, sha256 of source and
output files) that ``verify --integrity`` re-checks, for every registered target; hashing while
writing equals hashing the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oss_convert import formats, hashing

from helpers import cut, run_cli, sha256
from targets import params


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


@pytest.mark.parametrize("case", params(variants=True))
def test_every_target_gets_a_manifest_that_verify_integrity_checks(case, request, tmp_path, monkeypatch, capsys):
    source = request.getfixturevalue(case.source)
    out = tmp_path / case.output
    code, stdout, err = run_cli(monkeypatch, capsys, *case.args(source, out))
    assert code == 0, err
    result = Path(stdout.strip())
    if out.is_dir():  # a folder: the manifest inside it, covering every other file
        manifest = out / "oss-convert-manifest.json"
        files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file() and p != manifest}
    else:  # single files: OUT.manifest.json beside the first one, covering every shard
        manifest = result.with_name(result.name + ".manifest.json")
        files = {p.name: p for p in tmp_path.iterdir() if p != manifest}
        assert sorted(files) == sorted(p.name for p in formats.gguf.split_members(result))
    assert manifest.is_file()
    given = dict(zip(case.options[0::2], case.options[1::2]))
    recorded = {k.removeprefix("--").replace("-", "_"): v for k, v in given.items()}
    check_provenance(source, result, manifest, recorded, files, monkeypatch, capsys)
    if len(files) > 2 and not out.is_dir():  # a split: a missing shard is named
        missing = sorted(files)[1]
        files[missing].unlink()
        code, stdout, _ = run_cli(monkeypatch, capsys, "verify", "--integrity", str(result))
        assert code == 1 and f"{missing}: missing" in stdout


def test_integrity_check_catches_a_cut_artifact(tiny_gguf, tmp_path, monkeypatch, capsys):
    copy = tmp_path / tiny_gguf.name
    shutil.copy(tiny_gguf, copy)
    shutil.copy(tiny_gguf.with_name(tiny_gguf.name + ".manifest.json"), tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "verify", "--integrity", str(copy))
    assert code == 0, out + err
    cut(tiny_gguf, copy, -1)
    code, out, _ = run_cli(monkeypatch, capsys, "verify", "--integrity", str(copy))
    assert code == 1 and f"tiny.gguf: size {copy.stat().st_size}" in out


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "outputs": list(m["outputs"])}, "must map each file"),
    (lambda m: {**m, "outputs": {k: {**v, "size": str(v["size"])} for k, v in m["outputs"].items()}},
     "must map each file"),
    (lambda m: [m], "must be a JSON object"),
])
def test_a_manifest_is_read_as_a_strangers_file(edit, message, tiny_gguf, tmp_path, monkeypatch, capsys):
    """A manifest arrives with a download: its structure is checked, and a bad one is exit 2 naming
    it (not a traceback, not a failed integrity check)."""
    copy = tmp_path / tiny_gguf.name
    shutil.copy(tiny_gguf, copy)
    manifest = tmp_path / (tiny_gguf.name + ".manifest.json")
    manifest.write_text(json.dumps(edit(json.loads(tiny_gguf.with_name(manifest.name).read_text()))))
    for args in (("verify", "--integrity", str(copy)), ("card", str(copy))):
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and message in err and manifest.name in err, (args, err)
