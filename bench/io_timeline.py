"""Where a job's time goes, second by second: disk traffic, page cache, CPU, each thread.

    python bench/io_timeline.py [--cold] -- oss-convert convert SRC --to gguf -o OUT.gguf

Runs the command and prints one row per second: disk read and write MB/s and busy % (all
block devices, ``/proc/diskstats``), dirty / under write-back / cached MB (``/proc/meminfo``),
the system's CPU split in % of one core (user, system, iowait, steal, idle: ``/proc/stat``),
then each thread of the job with its CPU % (its id's last digits). Ends with the totals: CPU
seconds by kind, bytes read and written, wall time including a final ``sync``. With ``--cold``
(root) the page cache is dropped first and the job starts once the disk is idle (a ``discard``
mount keeps it busy after a large ``rm``). Linux only. This is how the GGUF conversion was taken
to 1.2x ``cp`` (bench/RESULTS.md, session 4): a thread at 100% is the bottleneck; threads all
below it with the disk under 100% busy means they wait on one another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def disk() -> tuple[int, int, int]:
    """Bytes read, bytes written, ms busy, summed over the disks (partitions and loops left out)."""
    read = written = busy = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        whole = len(f) > 12 and Path("/sys/block", f[2]).exists()  # a disk, not a partition
        if whole and not f[2].startswith(("loop", "ram", "zram")):
            read, written, busy = read + int(f[5]) * 512, written + int(f[9]) * 512, busy + int(f[12])
    return read, written, busy


def memory() -> tuple[int, int, int]:
    info = {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())}
    return info["Dirty"], info["Writeback"], info["Cached"]


def cpu() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def thread_seconds(pid: int) -> dict[str, float]:
    seconds = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            seconds[tid] = (int(fields[11]) + int(fields[12])) / TICK
    except (FileNotFoundError, ProcessLookupError):
        pass
    return seconds


def wait_for_idle_disk(timeout: float = 120) -> None:
    quiet, deadline = 0, time.time() + timeout
    while quiet < 3 and time.time() < deadline:
        before = disk()[2]
        time.sleep(1)
        quiet = quiet + 1 if disk()[2] - before < 30 else 0


def main() -> None:
    args = sys.argv[1:]
    cold = bool(args) and args[0] == "--cold"
    args = args[1:] if cold else args
    command = args[1:] if args and args[0] == "--" else args
    if not command:
        sys.exit(__doc__)
    if cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        wait_for_idle_disk()
    cores = os.cpu_count() or 1
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, first_disk, first_cpu = time.time(), disk(), cpu()
    last_disk, last_cpu, last_threads = first_disk, first_cpu, {}
    print("   s  read MB/s  write MB/s  busy %  dirty  wback  cached |  user   sys  wait steal  idle | threads (cpu %)")
    while job.poll() is None:
        time.sleep(1)
        now_disk, now_cpu, threads = disk(), cpu(), thread_seconds(job.pid)
        d = [b - a for a, b in zip(last_cpu, now_cpu)]
        share = 100 * cores / (sum(d) or 1)
        busy = " ".join(f"{tid[-3:]}:{100 * (s - last_threads.get(tid, 0)):.0f}" for tid, s in threads.items()
                        if s - last_threads.get(tid, 0) > 0.05)
        print(f"{time.time() - start:4.0f} {(now_disk[0] - last_disk[0]) / 1e6:10.0f} {(now_disk[1] - last_disk[1]) / 1e6:11.0f} "
              f"{(now_disk[2] - last_disk[2]) / 10:7.0f} {'%6d %6d %7d' % memory()} | {(d[0] + d[1]) * share:5.0f} "
              f"{(d[2] + d[5] + d[6]) * share:5.0f} {d[4] * share:5.0f} {d[7] * share:5.0f} {d[3] * share:5.0f} | {busy}",
              flush=True)
        last_disk, last_cpu, last_threads = now_disk, now_cpu, threads
    subprocess.run(["sync"], check=True)
    end_disk, end_cpu = disk(), cpu()
    d = [(b - a) / TICK for a, b in zip(first_cpu, end_cpu)]
    print(f"\nexit {job.returncode}; {time.time() - start:.1f} s with the final sync; read "
          f"{(end_disk[0] - first_disk[0]) / 1e9:.2f} GB, written {(end_disk[1] - first_disk[1]) / 1e9:.2f} GB; "
          f"CPU seconds: user {d[0] + d[1]:.1f}, system {d[2] + d[5] + d[6]:.1f}, iowait {d[4]:.1f}, steal {d[7]:.1f}")


if __name__ == "__main__":
    main()
