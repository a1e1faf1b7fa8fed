"""How fast the runner's host copies reach the device: ``mx.array`` of mapped pages, by the
number of threads copying pieces of them.

    python bench/copy_rate.py FILE [--gib 1]

Maps the first ``--gib`` GiB of FILE (a safetensors shard, say), reads it into the page cache,
then times copying it into MLX arrays and the device's first touch of them (what the GPU runner
does with every weight, ``runner._bytes_on_device`` / ``_move_now``), by 1, 2, 4, 8 and 16
threads each copying a piece (joined on the device), each as a ratio to reading the same bytes
from the page cache with one ``pread`` loop in the same run. On the H200 (session 8) one thread
copied 1.1-1.9 GB/s and more threads did not help (1.1-1.2 GB/s): the copy into MLX's CUDA
memory, not the page faults, is the bound, so the runner copies on one thread.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    import mlx.core as mx

    from oss_convert.verify.runner import _move_now

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
        mm.madvise(mmap.MADV_DONTNEED)  # the mapping's pages unmapped (still cached): each run faults them in
        t = time.perf_counter()
        x = _copy(rows, threads)
        _move_now(x)
        mx.eval(x.reshape(-1)[::4096].max())
        wall = time.perf_counter() - t
        print(f"| {threads} | {n / wall / 1e9:.2f} | {read / wall:.2f} |", flush=True)
        del x


def _copy(rows: np.ndarray, threads: int):
    import mlx.core as mx

    if threads == 1:
        return mx.array(rows)
    step = -(-rows.shape[0] // threads)
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda r0: mx.array(rows[r0:r0 + step]), range(0, rows.shape[0], step)))
    return mx.concatenate(parts)


if __name__ == "__main__":
    main()
