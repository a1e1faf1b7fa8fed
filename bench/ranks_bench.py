"""What data-parallel verify gains on one host: `verify` (checkpoint reference, so both the
reference and the artifact run) of the bundled model and of 20b-shaped layers on 1, 2 and 4
ranks under `mlx.launch` (ring backend, loopback).

    python bench/ranks_bench.py --work /path/with/space [--layers 2] [--chunks 8] [--ranks 1 2 4]

Prints, per model and rank count: the wall time of the whole job, the speed-up over one rank
measured in the same run, and the time rank 0 spent in MLX's collectives (the gathers and the
waiting for slower ranks: `timings.exchange_s` of its report). Each rank runs single-threaded
BLAS (OPENBLAS_NUM_THREADS=1) so that N ranks on N cores compare with one rank on one core; the
one-rank row with every core's BLAS threads is printed beside them as the baseline a user has.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "oss_convert.cli.main"]


def run(ranks: int, args: list[str], threads: int | None) -> tuple[float, dict]:
    env = dict(os.environ)
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    out = Path(args[args.index("--json") + 1])
    out.unlink(missing_ok=True)
    command = CLI + args if ranks == 1 else [shutil.which("mlx.launch"), "-n", str(ranks), "--", *CLI, *args]
    start = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report = json.loads(out.read_text())
    return wall, report


def bench(name: str, artifact: Path, reference: Path, work: Path, rank_counts: list[int], chunks: int) -> list[str]:
    args = ["verify", str(artifact), "--reference", str(reference), "--quiet", "--no-tensors", "--chunks", str(chunks),
            "--json", str(work / "report.json"), "--force"]
    rows = []
    wall, report = run(1, args, None)
    rows.append(f"| {name} | 1, all cores' BLAS | {wall:.1f} | | {report['timings']['exchange_s']:.2f} |")
    base = None
    for ranks in rank_counts:
        wall, report = run(ranks, args, 1)
        base = base or wall
        rows.append(f"| {name} | {ranks} | {wall:.1f} | {base / wall:.2f}x | {report['timings']['exchange_s']:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print(f"host: {os.cpu_count()} cores; {args.chunks} chunks x 512 tokens; times in seconds")
    print("| model | ranks | wall | speed-up | rank 0 in collectives |")
    print("|---|---:|---:|---:|---:|")
    for name, preset, layers in (("tiny (bundled shapes)", "tiny", None), (f"20b shapes, {args.layers} layers", "20b",
                                                                          args.layers)):
        repo = work / f"{preset}-repo"
        if not repo.exists():
            synth_args = ["synth", str(repo), "--preset", preset, "--quiet"] + (["--layers", str(layers)] if layers else [])
            subprocess.run(CLI + synth_args, check=True)
        artifact = work / f"{preset}.gguf"
        if not artifact.exists():
            subprocess.run(CLI + ["convert", str(repo), "--to", "gguf", "-o", str(artifact), "--quiet"], check=True)
        for row in bench(name, artifact, repo, work, args.ranks, args.chunks):
            print(row, flush=True)


if __name__ == "__main__":
    main()
