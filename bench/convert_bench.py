"""Time each conversion of a real-sized synthetic checkpoint against `cp` of the same bytes.

    python bench/convert_bench.py --preset 20b --work /path/with/space [--targets mlx,metal,gguf]

Generates the checkpoint once (kept in WORK for later runs) and runs each command under
`/usr/bin/time -v` for wall time and peak RSS, followed by `sync`: the converters fsync their
output before the atomic rename, so `cp` is charged for flushing its copy too. With `--cold`
(root only) the page cache is dropped before every job, so each one reads the checkpoint from
disk; without it the first `cp` warms the cache for all. Prints a markdown table; paste it
into bench/RESULTS.md with the machine description.
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


COLD = False


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    wait_for_idle_disk()


def disk_busy_ms() -> int:
    """Milliseconds every block device has spent doing I/O (``/proc/diskstats`` field 13)."""
    lines = Path("/proc/diskstats").read_text().split("\n")
    return sum(int(f[12]) for f in (line.split() for line in lines) if len(f) > 12 and not f[2].startswith("loop"))


def wait_for_idle_disk(timeout: float = 120) -> None:
    """Start a job only once the disk is idle: on a file system mounted with ``discard`` the
    previous job's ``rm`` keeps it busy for seconds after it returns, which the next job pays."""
    quiet, deadline = 0, time.time() + timeout
    while quiet < 3 and time.time() < deadline:
        before = disk_busy_ms()
        time.sleep(1)
        quiet = quiet + 1 if disk_busy_ms() - before < 30 else 0


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds including the final sync, peak RSS MiB) of a command, from GNU time."""
    if COLD:
        drop_caches()
    else:
        subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return wall, rss_kb / 1024


def ensure_space(folder: Path, needed: int) -> None:
    """Stop before a job that would fill the disk (the output is about the size of the input)."""
    free = shutil.disk_usage(folder).free
    if free < needed + (2 << 30):
        sys.exit(f"only {free / 1e9:.1f} GB free in {folder}; this job needs about {needed / 1e9:.1f} GB")


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--targets", default="mlx,metal,gguf")
    parser.add_argument("--extra", action="append", default=[], help="target:options, e.g. gguf:--outtype=q8_0")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each job (root)")
    args = parser.parse_args()
    global COLD
    COLD = args.cold
    work = args.work
    repo = work / f"gpt-oss-{args.preset}{f'-L{args.layers}' if args.layers else ''}"
    exe = shutil.which("oss-convert") or sys.exit("oss-convert is not installed")
    if not (repo / "original" / "config.json").exists():
        print(f"generating {repo} ...", file=sys.stderr)  # with tokenizer files: Metal and GGUF embed them
        layers = ["--layers", str(args.layers)] if args.layers else []
        wall, rss = timed([exe, "synth", str(repo), "--preset", args.preset, *layers, "--quiet"])
        print(f"synth: {wall:.1f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    source_bytes = size_of(repo / "original")
    rows = []
    copy = work / "cp-copy"
    for attempt in range(1 if COLD else 2):  # warm runs: the first cp warms the page cache for everyone
        shutil.rmtree(copy, ignore_errors=True)
        ensure_space(work, source_bytes)
        wall, rss = timed(["cp", "-r", str(repo / "original"), str(copy)])
    shutil.rmtree(copy, ignore_errors=True)
    rows.append(("cp -r original/", wall, rss, source_bytes))
    cp_wall = wall
    jobs = [(t, []) for t in args.targets.split(",") if t]
    jobs += [(e.split(":", 1)[0], e.split(":", 1)[1].split()) for e in args.extra]
    for target, extra in jobs:
        out = work / f"out-{target}{'.gguf' if target == 'gguf' else ''}"
        ensure_space(work, source_bytes)
        wall, rss = timed([exe, "convert", str(repo), "--to", target, "-o", str(out), "--force", "--quiet", *extra])
        rows.append((f"convert --to {target} {' '.join(extra)}".strip(), wall, rss, size_of(out)))
        print(f"{rows[-1][0]}: {wall:.1f} s, peak RSS {rss:.0f} MiB (cp: {cp_wall:.1f} s)", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
        manifest = out.with_name(out.name + ".manifest.json")
        manifest.unlink(missing_ok=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}")
    print(f"Checkpoint: {repo.name}, {source_bytes / 1e9:.2f} GB in original/; "
          f"page cache {'dropped before each job' if COLD else 'warm'}; times include a final sync\n")
    print("| job | wall s | x cp | GB/s | peak RSS MiB | output GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, rss, nbytes in rows:
        print(f"| {name} | {wall:.1f} | {wall / cp_wall:.2f} | {source_bytes / wall / 1e9:.2f} | {rss:.0f} | {nbytes / 1e9:.2f} |")


if __name__ == "__main__":
    main()
