"""How fast the runner's host copies reach the device, by the number of copying threads.

    python bench/copy_rate.py FILE [--gib 1]

Maps the first ``--gib`` GiB of FILE (a safetensors shard, say), reads it into the page cache,
then times ``runner._to_device`` of it (the copy of mapped pages into an MLX array, and the
device's first touch of it) with ``COPY_THREADS`` 1, 2, 4, 8 and 16, each as a ratio to reading
the same bytes from the page cache with one ``pread`` loop in the same run.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    import mlx.core as mx

    from oss_convert.verify import runner

    n = min(int(args.gib * (1 << 30)), os.path.getsize(args.file)) // (1 << 20) * (1 << 20)
    fd = os.open(args.file, os.O_RDONLY)
    buf = bytearray(8 << 20)
    t = time.perf_counter()
    for off in range(0, n, len(buf)):
        os.preadv(fd, [buf], off)
    read = time.perf_counter() - t
    mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    rows = np.frombuffer(mm, np.uint8, count=n).reshape(-1, 1 << 20)
    print(f"{n / 2**30:.2f} GiB; pread from the page cache {n / read / 1e9:.2f} GB/s")
    print("| threads | GB/s | x pread |")
    print("|---:|---:|---:|")
    for threads in (1, 2, 4, 8, 16, 1):
        runner.COPY_THREADS = threads
        mm.madvise(mmap.MADV_DONTNEED)  # the mapping's pages unmapped (still cached): each run faults them in
        t = time.perf_counter()
        x = runner._to_device(rows)
        runner._move_now(x)
        mx.eval(x.reshape(-1)[::4096].max())
        wall = time.perf_counter() - t
        print(f"| {threads} | {n / wall / 1e9:.2f} | {read / wall:.2f} |", flush=True)
        del x


if __name__ == "__main__":
    main()
