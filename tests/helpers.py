"""What the promise and format tests share: running the command line (in this process or in a
subprocess), listing and hashing trees, and editing safetensors files in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from oss_convert.cli.main import main
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.formats.safetensors import SafetensorsWriter

CLI = [sys.executable, "-m", "oss_convert.cli.main"]


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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``oss-convert ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["oss-convert", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links followed), and the link targets themselves."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root)) + " ->"] = os.readlink(p)
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(monkeypatch, capsys, repo: Path, *args: str, match: str) -> str:
    before = digests(repo)
    code, err = run(monkeypatch, capsys, *args)
    assert code == 2, err
    assert match in err, err
    assert digests(repo) == before  # not one byte of the source changed
    return err


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


def kl_and_top1(logits: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || logits) per token and the fraction of equal argmaxes."""
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean()), float((logits.argmax(1) == ref.argmax(1)).mean())
