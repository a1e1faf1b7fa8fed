"""The runner on an MLX GPU against the time to read the files it reads, from a cold page cache.

    python bench/gpu_verify.py --work DIR [--preset 20b] [--layers 24] [--chunks 16] [--cpu-chunks 2]

Makes a synthetic checkpoint (``synth``, exact ``original/`` layout) and its lossless ``--to mlx``
artifact, then times whole processes, each after the page cache is dropped (root):

- ``cat`` of the checkpoint's safetensors (the bound: what ``reference`` must read), then
  ``reference`` on the GPU (``--chunks`` x 512 random token ids);
- ``cat`` of the artifact's safetensors, then ``verify`` of the artifact against that cache on
  the GPU (a lossless artifact must score KL 0);
- ``reference`` through the CPU path (numpy + BLAS on this host's cores), on ``--cpu-chunks``
  chunks (its tokens/s beside the GPU's).

Prints one table: wall time, its ratio to the ``cat`` it stands beside, tokens/s and peak RSS
(``wait4``'s, the whole process). ``--profile`` also prints where the GPU ``reference`` spends
its time (cProfile, cumulative).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "oss_convert.cli.main"]
ON_CPU = [sys.executable, "-c", "import mlx.core as mx; mx.set_default_device(mx.cpu); import sys; "
                               "from oss_convert.cli.main import main; sys.argv[0] = 'oss-convert'; main()"]
PROFILED = [sys.executable, "-c", "import cProfile, pstats, sys; from oss_convert.cli.main import main; "
                                  "sys.argv[0] = 'oss-convert'; p = cProfile.Profile(); p.enable()\n"
                                  "try:\n    main()\nexcept SystemExit:\n    pass\n"
                                  "p.disable(); pstats.Stats(p, stream=sys.stderr).sort_stats('cumulative').print_stats(30)"]


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        print(f"  (page cache not dropped: {exc})", flush=True)


def timed(cmd: list[str], quiet: bool = True) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stderr) of a command started from a cold page cache."""
    drop_caches()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    rss = _peak_rss(proc)
    if proc.returncode not in (0, 1):
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-4000:]}")
    return wall, rss, err if not quiet else out


def _peak_rss(proc) -> float:
    """The child's peak RSS in MiB (``communicate`` reaped it; its rusage is in ``proc``'s)."""
    usage = getattr(proc, "rusage", None)
    return usage.ru_maxrss / 1024 if usage is not None else float("nan")


class _Popen(subprocess.Popen):
    """``Popen`` that keeps the child's rusage (``wait4``) when it reaps it."""

    def _try_wait(self, wait_flags):
        pid, status, self.rusage = os.wait4(self.pid, wait_flags)
        return pid, status


subprocess.Popen = _Popen


def cat(folder: Path) -> list[str]:
    """``cat`` of a folder's safetensors to /dev/null: reading what the runner reads, nothing else."""
    files = " ".join(f"'{p}'" for p in sorted(folder.rglob("*.safetensors")))
    return ["sh", "-c", f"cat {files} > /dev/null"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--preset", default="20b")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--cpu-chunks", type=int, default=2, help="chunks for the CPU path's reference (0: skip)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    repo, art = args.work / f"{args.preset}-{args.layers}l", args.work / f"{args.preset}-{args.layers}l-mlx"
    ids, ref = args.work / "ids.npy", args.work / f"ref-{args.preset}-{args.layers}l.npz"
    start = time.perf_counter()
    if not (repo / "original" / "config.json").exists():
        subprocess.run([*CLI, "synth", str(repo), "--preset", args.preset, "--layers", str(args.layers), "--force",
                        "-q", "--no-tokenizer"], check=True)
    if not (art / "config.json").exists():
        subprocess.run([*CLI, "convert", str(repo), "--to", "mlx", "-o", str(art), "--force", "-q", "--no-manifest"],
                       check=True)
    print(f"made the checkpoint and its MLX artifact in {time.perf_counter() - start:.0f} s", flush=True)
    vocab = json.loads((repo / "original" / "config.json").read_text())["vocab_size"]
    np.save(ids, np.random.default_rng(5).integers(0, min(vocab, 199998), size=args.chunks * 512))
    tokens = args.chunks * 512
    rows = []

    def job(name: str, cmd: list[str], read: float | None = None, n_tokens: int | None = None,
            quiet: bool = True) -> tuple[float, str]:
        """Time ``cmd``; ``read`` is the ``cat`` time it is held against (none: it is a ``cat``)."""
        wall, rss, text = timed(cmd, quiet)
        rows.append((name, wall, read or wall, n_tokens, rss))
        print(f"  {name}: {wall:.1f} s, {rss:.0f} MiB", flush=True)
        return wall, text

    reference = [*CLI, "reference", str(repo), "-o", str(ref), "--force", "-q", "--chunks", str(args.chunks),
                 "--tokens", str(ids)]
    verify = [*CLI, "verify", str(art), "--reference", str(ref), "--json", "-", "-q"]
    read_ref, _ = job("cat original/ safetensors", cat(repo / "original"))
    # MLX's CUDA backend compiles its kernels on their first use and keeps them on disk: a first run pays that once
    job("reference, gpu, first run here", reference, read_ref, tokens)
    job("reference, gpu", reference, read_ref, tokens)
    read_art, _ = job("cat mlx artifact safetensors", cat(art))
    _, report = job("verify mlx vs the cache, gpu", verify, read_art, tokens)
    metrics = json.loads(report)["metrics"]
    if args.cpu_chunks:
        job(f"reference, cpu path ({args.cpu_chunks} chunks)",
            [*ON_CPU, "reference", str(repo), "-o", str(args.work / "ref-cpu.npz"), "--force", "-q", "--chunks",
             str(args.cpu_chunks), "--tokens", str(ids)], read_ref, args.cpu_chunks * 512)
    if args.profile:
        for name, cmd, read in (("reference", reference, read_ref), ("verify", verify, read_art)):
            _, profile = job(f"{name}, gpu, under cProfile", [*PROFILED, *cmd[len(CLI):]], read, tokens, quiet=False)
            print(profile[-5000:])
    print(f"\n{args.preset} shapes, {args.layers} layers, {args.chunks} x 512 tokens; lossless MLX artifact: "
          f"KL mean {metrics['kld_mean']:.3g}, max {metrics['kld_max']:.3g}, top-1 {metrics['top1_agreement']:.2%}\n")
    print("| job | wall s | x cat (same files, cold) | tokens/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, read, n, rss in rows:
        print(f"| {name} | {wall:.1f} | {wall / read:.2f} | {f'{n / wall:.0f}' if n else '-'} | {rss:.0f} |")


if __name__ == "__main__":
    main()
