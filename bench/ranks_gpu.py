"""Data-parallel verify on the GPU(s) of one host, as far as the host allows.

    python bench/ranks_gpu.py --work DIR [--layers 4] [--chunks 4] [--backends ring nccl]

20b-shaped layers (vocabulary cut to 1024: nothing to download), a lossless MLX artifact, verified
against the original/ checkpoint by one process and by `mlx.launch -n 2 --backend B` for each
backend asked; prints each run's wall time, its exit, whether its JSON report (timings aside)
is identical to the one process's, and its KL, beside the time `cat` takes to read the files.
With one GPU both ranks share it (ring); NCCL needs one GPU per rank.
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


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["ring", "nccl"])
    args = parser.parse_args()

    from oss_convert import converters, synth

    work = args.work
    config = synth.preset_with("20b", vocab_size=1024, num_hidden_layers=args.layers)
    repo = synth.generate(work / "repo", config, seed=1, tokenizer=True, force=True)
    artifact = converters.convert(repo, "mlx", work / "mlx", force=True).output
    files = sorted(p for p in [*repo.rglob("*"), *artifact.rglob("*")] if p.is_file())
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    read = time.perf_counter() - start
    print(f"20b shapes, {args.layers} layers, {args.chunks} x 512 tokens; cat of the "
          f"{sum(p.stat().st_size for p in files) / 1e9:.2f} GB read: {read:.1f} s (warm cache)")
    verify = ["verify", str(artifact), "--reference", str(repo), "--quiet", "--no-tensors", "--chunks",
              str(args.chunks), "--force", "--json"]
    wall, done = timed(CLI + verify + [str(work / "one.json")])
    one = json.loads((work / "one.json").read_text())
    one.pop("timings")
    print("| run | wall s | exit | report as one process's | KL mean |")
    print("|---|---:|---:|---|---:|")
    print(f"| one process | {wall:.1f} | {done.returncode} | - | {one['metrics']['kld_mean']:.3e} |", flush=True)
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    for backend in args.backends:
        out = work / f"{backend}.json"
        out.unlink(missing_ok=True)
        wall, done = timed([launcher, "-n", "2", "--backend", backend, "--", *CLI, *verify, str(out)])
        if not out.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            print(f"| mlx.launch -n 2 --backend {backend} | {wall:.1f} | {done.returncode} | no report: {tail} | |")
            continue
        report = json.loads(out.read_text())
        ranks = report.pop("timings")["ranks"]
        differ = [k for k in one if report.get(k) != one[k]]
        metrics = {k: (one["metrics"][k], report["metrics"][k]) for k in one["metrics"]
                   if one["metrics"][k] != report["metrics"][k]}
        print(f"| mlx.launch -n 2 --backend {backend} ({ranks} ranks) | {wall:.1f} | {done.returncode} | "
              f"{report == one}{' ' + str(differ) if differ else ''} | {report['metrics']['kld_mean']:.3e} |", flush=True)
        if metrics:
            print(f"  metrics that differ (one process, {ranks} ranks): {metrics}")
    print(f"environment: NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")


if __name__ == "__main__":
    main()
