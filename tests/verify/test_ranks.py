"""Data-parallel ``reference``, ``verify`` and ``compare`` under ``mlx.launch`` (the ring backend
on loopback, on the CPU): 1, 2 and 3 ranks give the same reports and ``ref.npz`` as one
process; a bad input on one rank, more ranks than chunks, and a rank killed mid-run end every
rank within a bounded time, with one message naming the rank.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from oss_convert.errors import UsageError
from oss_convert.verify.ranks import World

from helpers import run_sub

CLI = [sys.executable, "-m", "oss_convert.cli.main"]


def launcher() -> str:
    """``mlx.launch``, beside this Python (a venv not on PATH) or on PATH."""
    pytest.importorskip("mlx.core")
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.is_file() else shutil.which("mlx.launch")
    assert found is not None, "mlx.launch is not installed (it comes with the mlx package)"
    return found


def mlx_launch(ranks: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``mlx.launch -n RANKS -- oss-convert ARGS`` (the ring backend on 127.0.0.1)."""
    return subprocess.run([launcher(), "-n", str(ranks), "--", *CLI, *args], capture_output=True, text=True,
                          timeout=timeout)


def launch_by_hand(per_rank: list[list[str]], timeout: int = 120) -> list[tuple[int, str, str]]:
    """Each rank started as ``mlx.launch`` starts it (``MLX_RANK``, a ring hostfile), but with its
    own arguments, so that one rank can be given a bad input; every rank's exit code and output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as hostfile:
        json.dump([[f"127.0.0.1:{port + i}"] for i in range(len(per_rank))], hostfile)
    procs = [subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": hostfile.name})
             for rank, args in enumerate(per_rank)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()
        os.unlink(hostfile.name)


def without_timings(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report["timings"]["ranks"] >= 1
    report.pop("timings")
    return report


@pytest.fixture(scope="module")
def artifacts(tiny_repo, tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    """A lossless GGUF, a lossy MLX (4-bit affine attention) and the tiny repo's reference cache."""
    folder = tmp_path_factory.mktemp("ranks")
    lossy = folder / "q4"
    ref = folder / "ref.npz"
    assert run_sub("convert", str(tiny_repo), "--to", "mlx", "-o", str(lossy), "--recipe", "mxfp4-q4",
                   "--quiet").returncode == 0
    assert run_sub("reference", str(tiny_repo), "-o", str(ref), "--quiet").returncode == 0
    return {"lossless": tiny_gguf, "lossy": lossy, "ref": ref}


def test_shares_are_contiguous_in_chunk_order_and_cover_every_chunk():
    class Group:
        def __init__(self, rank, size):
            self.r, self.s = rank, size

        def rank(self):
            return self.r

        def size(self):
            return self.s

    for size in (1, 2, 3, 5):
        shares = [World(Group(r, size)).share(11) for r in range(size)]
        assert [i for s in shares for i in range(11)[s]] == list(range(11))
        assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1
    with pytest.raises(UsageError, match="4 ranks but only 3 chunks"):
        World(Group(0, 4)).share(3)


@pytest.mark.oracle
@pytest.mark.parametrize("which", ["lossless", "lossy"])
def test_verify_is_the_same_on_1_2_and_3_ranks(which, artifacts, tiny_repo, tmp_path):
    reports = []
    for ranks in (1, 2, 3):
        out = tmp_path / f"r{ranks}.json"
        args = ("verify", str(artifacts[which]), "--reference", str(tiny_repo), "--quiet", "--json", str(out))
        done = run_sub(*args) if ranks == 1 else mlx_launch(ranks, *args)
        # the lossy one fails verify (exit 1; mlx.launch itself exits 0 whatever its ranks return)
        assert done.returncode == (1 if which == "lossy" and ranks == 1 else 0) and out.is_file(), done.stderr
        if which == "lossy" and ranks > 1:  # rank 0 gives the verdict's exit code; the others exit 0
            assert "Node with rank 0 exited with code 1" in done.stderr and "rank 1 exited" not in done.stderr, \
                done.stderr
        assert json.loads(out.read_text())["timings"]["ranks"] == ranks
        reports.append(without_timings(out))
    assert reports[0] == reports[1] == reports[2]
    if which == "lossy":
        assert reports[0]["metrics"]["kld_mean"] > 1e-6  # the lossy artifact is lossy: the values compared are real
    else:
        assert reports[0]["metrics"]["kld_mean"] == 0


@pytest.mark.oracle
def test_reference_npz_is_the_same_on_1_and_3_ranks(tiny_repo, tmp_path):
    one, three = tmp_path / "one.npz", tmp_path / "three.npz"
    assert run_sub("reference", str(tiny_repo), "-o", str(one), "--quiet").returncode == 0
    done = mlx_launch(3, "reference", str(tiny_repo), "-o", str(three), "--quiet")
    assert done.returncode == 0 and "3 ranks" in done.stdout, done.stderr
    with np.load(one) as a, np.load(three) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            if name != "meta":
                assert np.array_equal(a[name], b[name]), name
        meta_a, meta_b = json.loads(a["meta"].tobytes()), json.loads(b["meta"].tobytes())
    assert (meta_a.pop("ranks"), meta_b.pop("ranks")) == (1, 3)
    meta_a.pop("seconds"), meta_b.pop("seconds")
    assert meta_a == meta_b


@pytest.mark.oracle
def test_compare_is_the_same_on_1_and_2_ranks(artifacts, tmp_path):
    tables = []
    for ranks in (1, 2):
        out = tmp_path / f"c{ranks}.json"
        args = ("compare", str(artifacts["lossless"]), str(artifacts["lossy"]), "--reference", str(artifacts["ref"]),
                "--quiet", "--json", str(out))
        done = run_sub(*args) if ranks == 1 else mlx_launch(ranks, *args)
        assert done.returncode == (1 if ranks == 1 else 0), done.stderr  # the lossy one fails
        tables.append(json.loads(out.read_text()))
    assert tables[0] == tables[1]


@pytest.mark.oracle
def test_a_bad_input_on_one_rank_is_exit_2_on_every_rank(artifacts, tmp_path):
    good = ["verify", str(artifacts["lossless"]), "--reference", str(artifacts["ref"]), "--quiet"]
    bad = ["verify", str(tmp_path / "missing.gguf"), "--reference", str(artifacts["ref"]), "--quiet"]
    start = time.monotonic()
    results = launch_by_hand([good, bad, good])
    assert time.monotonic() - start < 60
    assert [code for code, _, _ in results] == [2, 2, 2], results
    message = results[0][2].strip().splitlines()
    assert len(message) == 1 and "rank 1 of 3" in message[0] and "missing.gguf" in message[0], message
    assert all(not err.strip() for _, _, err in results[1:])  # rank 0 alone prints
    assert all(not out.strip() for _, out, _ in results)


@pytest.mark.oracle
def test_more_ranks_than_chunks_is_a_usage_error(artifacts, tiny_repo):
    args = ["verify", str(artifacts["lossless"]), "--reference", str(tiny_repo), "--quiet", "--chunks", "2"]
    results = launch_by_hand([args] * 3)
    assert [code for code, _, _ in results] == [2, 2, 2]
    assert "3 ranks but only 2 chunks" in results[0][2]


@pytest.mark.oracle
def test_a_rank_killed_mid_run_ends_the_job(tiny_repo, tmp_path):
    """mlx.launch ends the other ranks when one dies; the job is over in seconds, not hung."""
    job = subprocess.Popen([launcher(), "-n", "2", "--", *CLI, "reference", str(tiny_repo), "-o",
                            str(tmp_path / "r.npz"), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:  # rank 1's process, once it runs
        for pid in os.listdir("/proc"):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if pid.isdigit() and b"MLX_RANK=1\0" in environ and b"oss_convert.cli.main" in cmdline:
                victim = int(pid)
        time.sleep(0.2)
    assert victim is not None
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert time.monotonic() - killed < 15
    assert "rank 1" in err and "-9" in err, err
    assert not (tmp_path / "r.npz").exists()
