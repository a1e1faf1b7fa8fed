"""Time each conversion of a real-sized synthetic checkpoint against `cp` of the same bytes.

    python bench/convert_bench.py --preset 20b --work /path/with/space [--targets mlx,metal,gguf]

Generates the checkpoint once (kept in WORK for later runs), drops nothing from the page cache
(no root tricks: every command, `cp` included, runs in the same state, first `cp` warms it),
and runs each command under `/usr/bin/time -v` for wall time and peak RSS. Prints a markdown
table; paste it into bench/RESULTS.md with the machine description.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command, from GNU time."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return wall, rss_kb / 1024


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--targets", default="mlx,metal,gguf")
    parser.add_argument("--extra", action="append", default=[], help="target:options, e.g. gguf:--outtype=q8_0")
    args = parser.parse_args()
    work = args.work
    repo = work / f"gpt-oss-{args.preset}"
    exe = shutil.which("oss-convert") or sys.exit("oss-convert is not installed")
    if not (repo / "original" / "config.json").exists():
        print(f"generating {repo} ...", file=sys.stderr)
        wall, rss = timed([exe, "synth", str(repo), "--preset", args.preset, "--quiet"])
        print(f"synth: {wall:.1f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    source_bytes = size_of(repo / "original")
    rows = []
    copy = work / "cp-copy"
    for attempt in range(2):  # the first cp warms the page cache for everyone
        shutil.rmtree(copy, ignore_errors=True)
        wall, rss = timed(["cp", "-r", str(repo / "original"), str(copy)])
    shutil.rmtree(copy, ignore_errors=True)
    rows.append(("cp -r original/", wall, rss, source_bytes))
    cp_wall = wall
    jobs = [(t, []) for t in args.targets.split(",") if t]
    jobs += [(e.split(":", 1)[0], e.split(":", 1)[1].split()) for e in args.extra]
    for target, extra in jobs:
        out = work / f"out-{target}{'.gguf' if target == 'gguf' else ''}"
        wall, rss = timed([exe, "convert", str(repo), "--to", target, "-o", str(out), "--force", "--quiet", *extra])
        rows.append((f"convert --to {target} {' '.join(extra)}".strip(), wall, rss, size_of(out)))
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}")
    print(f"Checkpoint: {args.preset}, {source_bytes / 1e9:.2f} GB in original/\n")
    print("| job | wall s | x cp | GB/s | peak RSS MiB | output GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, rss, nbytes in rows:
        print(f"| {name} | {wall:.1f} | {wall / cp_wall:.2f} | {source_bytes / wall / 1e9:.2f} | {rss:.0f} | {nbytes / 1e9:.2f} |")


if __name__ == "__main__":
    main()
