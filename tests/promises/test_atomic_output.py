"""Promise: atomic output. Output is built under a hidden ``.NAME.*.partial`` name and renamed when
complete; Ctrl-C, SIGTERM, SIGKILL and a full disk leave the old output or nothing, for every
registered target; a split is published first shard last; the manifest is in place before the
artifact; two jobs to one output never clobber each other.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oss_convert import atomic, synth
from oss_convert.atomic import atomic_output
from oss_convert.errors import InputError, OutputExistsError
from oss_convert.formats.gguf import GgufModel

from helpers import listing, plant_old_output, run, run_sub, start_and_wait_for_writing, tree_hashes
from targets import Case, params

# A model big enough (~300 MB) that writing it takes a few seconds, so we can interrupt it.
BIG_SYNTH = ("from oss_convert import synth; import sys;"
       "cfg = synth.preset_with('tiny', num_hidden_layers=8, num_experts=32, hidden_size=1024,"
       " intermediate_size=1024, vocab_size=4096);"
       "synth.generate(sys.argv[1], cfg, force=True)")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def start_big_write(dest: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BIG_SYNTH, str(dest)], stderr=subprocess.PIPE, text=True)
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


def test_a_killed_synth_never_leaves_a_partial_checkpoint_under_the_final_name(tmp_path):
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
    proc = subprocess.Popen([sys.executable, "-c", BIG_SYNTH, str(dest)])
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


# ~450 MB of MXFP4 experts: every converter takes seconds on it, long enough to interrupt.
BIG = synth.preset_with("tiny", hidden_size=1024, intermediate_size=1024, num_experts=32, num_hidden_layers=8,
                        vocab_size=4096)


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("big") / "repo", BIG, seed=5, tokenizer=True)


def interruptible(case: Case) -> bool:
    """Every target once, and the split set where a target splits (published as a set)."""
    return not case.options or case.name.endswith("-split")


ATOMIC = [p for p in params(variants=True) if interruptible(p.values[0])]


def big_source(case: Case, request) -> Path:
    return request.getfixturevalue("big_repo" if case.source == "tiny_repo" else case.source)


def convert_args(case: Case, source: Path, out: Path, *more: str) -> list[str]:
    args = case.args(source, out, *more)
    if "--split-max-size" in args:  # a few shards of the big model, several of a small one
        size = sum(p.stat().st_size for p in (source / "original").glob("*.safetensors"))
        args[args.index("--split-max-size") + 1] = "40M" if size >= 40 << 20 else "1M"
    return args


def is_split(case: Case) -> bool:
    return "--split-max-size" in case.options


@pytest.mark.parametrize("case", ATOMIC)
def test_ctrl_c_keeps_the_old_output_and_leaves_nothing_else(case, request, tmp_path):
    source = big_source(case, request)
    out = tmp_path / case.output
    old = plant_old_output(out) if not is_split(case) else {}  # split names depend on the count
    before = listing(tmp_path)
    proc = start_and_wait_for_writing(convert_args(case, source, out, "--force"), tmp_path)
    started = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stderr.read()
    # It stops at once: the background source hashing is cancelled, not finished.
    assert time.time() - started < 5
    assert "interrupted" in proc.stderr.read()
    assert tree_hashes(tmp_path) == old
    assert listing(tmp_path) == before  # no .partial, no .old, no manifest


@pytest.mark.parametrize("case", ATOMIC)
def test_a_kill_never_leaves_a_partial_artifact_under_the_final_name(case, request, tmp_path):
    source = big_source(case, request)
    out = tmp_path / case.output
    old = plant_old_output(out) if not is_split(case) else {}
    proc = start_and_wait_for_writing(convert_args(case, source, out, "--force"), tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert {k: v for k, v in tree_hashes(tmp_path).items() if not k.startswith(".")} == old
    visible = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in visible) == sorted({k.split("/")[0] for k in old})
    assert all(p.name.endswith(".partial") for p in tmp_path.iterdir() if p.name.startswith("."))


def split_names(case: Case, source: Path, tmp_path: Path) -> list[str]:
    """The file names a successful conversion makes (learned from one, in another folder)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    result = run_sub(*convert_args(case, source, probe / case.output, "--no-manifest"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in probe.iterdir())
    shutil.rmtree(probe)
    return names


@pytest.mark.parametrize("case", ATOMIC)
def test_existing_output_needs_force_and_survives_a_full_disk(case, request, tmp_path):
    big = big_source(case, request)
    small = request.getfixturevalue(case.source)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / case.output
    if is_split(case):  # old shards under the names the new conversion will use
        names = split_names(case, small, tmp_path)
        assert len(names) > 1
        for name in names:
            (dest / name).write_bytes(b"previous shard")
        old = tree_hashes(dest)
    else:
        old = plant_old_output(out)
    before = listing(dest)

    refused = run_sub(*convert_args(case, small, out))
    assert refused.returncode == 2 and "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert tree_hashes(dest) == old

    # A full disk: writes past 20 MB fail with EFBIG.
    full = run_sub(*convert_args(case, big, out, "--force"), fsize=20 << 20)
    assert full.returncode == 2, full.stderr
    assert "cannot write" in full.stderr and "File too large" in full.stderr and "Traceback" not in full.stderr
    assert tree_hashes(dest) == old and listing(dest) == before

    done = run_sub(*convert_args(case, small, out, "--force"))
    assert done.returncode == 0, done.stderr
    new = tree_hashes(dest)
    assert set(new) != set(old) or all(new[k] != old[k] for k in old)
    assert not [name for name in listing(dest) if name.startswith(".") or "/." in name]
    assert run_sub("verify", "--integrity", done.stdout.strip()).returncode == 0


def test_a_kill_while_publishing_a_split_never_shows_a_mix(monkeypatch, capsys, tiny_repo, tmp_path):
    out = tmp_path / "m.gguf"
    split = ("--split-max-size", "1M", "--quiet", "--force")
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", out, *split)[0] == 0
    shards = sorted(tmp_path.glob("m-*.gguf"))
    assert len(shards) >= 3
    old = {p.name: p.read_bytes() for p in shards}
    other = synth.generate(tmp_path / "other", "tiny", seed=9, tokenizer=True)
    real_place = atomic._place
    for stop_after in range(len(shards) + 1):  # interrupt after the manifest, after each shard
        calls = []

        def place(tmp, dest, force, calls=calls, stop_after=stop_after):
            if len(calls) >= stop_after:
                raise KeyboardInterrupt
            calls.append(dest.name)
            real_place(tmp, dest, force)

        monkeypatch.setattr(atomic, "_place", place)
        code, _ = run(monkeypatch, capsys, "convert", other, "--to", "gguf", "-o", out, *split)
        monkeypatch.setattr(atomic, "_place", real_place)
        assert code == 130
        present = {p.name: p.read_bytes() for p in sorted(tmp_path.glob("m-*.gguf"))}
        first = shards[0].name
        if first in present:  # readable: then every shard is the old one
            assert present == old, f"a mix after {calls}"
            with GgufModel(shards[0]) as model:
                assert model.files == shards
        else:  # the set is not readable from any shard
            for p in present:
                with pytest.raises(InputError, match="missing"):
                    GgufModel(tmp_path / p)
        assert not list(tmp_path.glob(".*.partial")), "temporary files left behind"
        # the next complete conversion restores a readable set
        assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", out, *split)[0] == 0


def test_the_manifest_is_published_before_the_artifact(monkeypatch, capsys, tiny_repo, tmp_path):
    order = []
    real_place = atomic._place

    def place(tmp, dest, force):
        order.append(dest.name)
        real_place(tmp, dest, force)

    monkeypatch.setattr(atomic, "_place", place)
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", tmp_path / "m.gguf", "--quiet")[0] == 0
    assert order == ["m.gguf.manifest.json", "m.gguf"]
    order.clear()
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", tmp_path / "s.gguf", "--quiet",
               "--split-max-size", "1M")[0] == 0
    assert order[0].startswith("s-00001-of-") and order[0].endswith(".gguf.manifest.json")
    assert order[-1].startswith("s-00001-of-")  # the first shard, which readers start from, goes last
    order.clear()
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "mlx", "-o", tmp_path / "mlx", "--quiet")[0] == 0
    assert order == ["mlx"]  # the folder's manifest is inside it before it is renamed into place


@pytest.mark.parametrize("is_dir", [False, True])
def test_two_jobs_to_the_same_output_never_clobber_each_other(tmp_path, is_dir):
    """The second job started before the first finished; the first to finish keeps the output."""
    dest = tmp_path / "out"

    def fill(tmp: Path, text: str) -> None:
        (tmp / "data" if is_dir else tmp).write_text(text)

    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic_output(dest, is_dir=is_dir) as first:
            fill(first, "first")
            with atomic_output(dest, is_dir=is_dir) as second:
                fill(second, "second")
    assert (dest / "data" if is_dir else dest).read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _failing_merge(*args):
    raise ValueError("a worker failed")


def test_a_merge_whose_worker_fails_leaves_nothing_and_no_worker(monkeypatch, tmp_path):
    """The merge's worker processes (``encode_workers``) end with the job, also when one fails:
    no output, no partial file, no process left behind."""
    import multiprocessing

    from oss_convert import converters, encode_workers

    if not encode_workers.available():
        pytest.skip("worker processes need Linux and two cores")
    monkeypatch.setattr(encode_workers, "_merge_rows", _failing_merge)  # forked workers see it too
    with pytest.raises(ValueError, match="a worker failed"):
        converters.convert(EXAMPLES / "gpt-oss-tiny", "mlx", tmp_path / "model",
                           adapter=EXAMPLES / "gpt-oss-tiny-sherlock-lora", merge_workers=True)
    assert leftovers(tmp_path) == []
    assert multiprocessing.active_children() == []


def test_a_refused_merge_does_not_wait_for_the_adapters_hash(dense_repo, monkeypatch, tmp_path):
    """The adapter's files are hashed on a thread beside the merge; a refusal that comes before
    the hash is done stops it rather than wait for it (seconds for a GB adapter)."""
    import json
    import threading

    from oss_convert import adapters, converters

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from merge_bench import write_adapter

    def slow_hash(path, progress=None):  # a hash that ends only when stopped (or after 20 s)
        for _ in range(20_000):
            progress(1)
            time.sleep(0.001)
        return "0" * 64

    monkeypatch.setattr(adapters, "file_sha256", slow_hash)
    write_adapter(json.loads((dense_repo / "original" / "config.json").read_text()), [1], tmp_path / "adapter")
    with pytest.raises(InputError, match="dense BF16"):  # --to mlx needs MXFP4 experts
        converters.convert(dense_repo, "mlx", tmp_path / "model", adapter=tmp_path / "adapter")
    hashing = [t for t in threading.enumerate() if t.name.startswith("hash-adapter")]
    for thread in hashing:
        thread.join(timeout=2)
    assert not any(t.is_alive() for t in hashing), "the adapter's hash went on after the refusal"
    assert not (tmp_path / "model").exists()


def _no_shared_memory(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _failing_start(*args):
    raise RuntimeError("cannot start")


class _PoolThatCannotStart:
    """A process pool whose workers die as they start: what a spawned worker in a script without
    a ``__main__`` guard does (a spawned child runs the real module, which no patch reaches)."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, *args):
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        future = Future()
        future.set_exception(BrokenProcessPool("a child process terminated abruptly"))
        return future

    def shutdown(self, *args, **kwargs):
        pass


def _python_segments() -> set[Path]:
    """Python's named shared memory segments (``psm_*``) on this machine."""
    shm = Path("/dev/shm")
    return set(shm.glob("psm_*")) if shm.is_dir() else set()


@pytest.mark.parametrize("start, broken", [("fork", "_start_worker"), ("spawn", "pool"),
                                           ("spawn", "shared_memory")])
def test_a_merge_whose_workers_cannot_start_runs_on_threads(start, broken, monkeypatch, tmp_path):
    """Where the worker processes cannot start (a worker that fails as it starts; a spawned pool
    that breaks once its shared memory exists; shared memory refused), the merge says so and runs
    on threads: the same bytes, no process or shared memory segment left behind."""
    import multiprocessing

    from oss_convert import converters, encode_workers

    if not encode_workers.available():
        pytest.skip("worker processes need two cores")
    base, adapter = EXAMPLES / "gpt-oss-tiny", EXAMPLES / "gpt-oss-tiny-sherlock-lora"
    converters.convert(base, "mlx", tmp_path / "threads" / "model", adapter=adapter, merge_workers=False)
    monkeypatch.setattr(encode_workers, "START_METHOD", start)
    if broken == "shared_memory":
        monkeypatch.setattr(encode_workers.shared_memory, "SharedMemory", _no_shared_memory)
    elif broken == "pool":
        monkeypatch.setattr(encode_workers, "ProcessPoolExecutor", _PoolThatCannotStart)
    else:
        monkeypatch.setattr(encode_workers, "_start_worker", _failing_start)  # forked workers see it too
    segments = _python_segments()
    with pytest.warns(UserWarning, match="runs on threads"):
        converters.convert(base, "mlx", tmp_path / "workers" / "model", adapter=adapter, merge_workers=True)
    assert tree_hashes(tmp_path / "workers") == tree_hashes(tmp_path / "threads")
    assert _python_segments() == segments
    assert multiprocessing.active_children() == []
