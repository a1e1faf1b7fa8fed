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

The last rows time ``mx.load`` of the same file's tensors (about the same bytes), which on CUDA
preads them on a thread pool into host memory and copies them into device memory
(``mlx/backend/cuda/load.cpp``) instead of through managed pages. On the H200 (session 9, 1 GiB
of a 2 GiB shard of random bytes, warm cache): ``mx.array`` 1.26-2.05 GB/s, ``mx.load`` 2.63 and
2.77 GB/s (0.42-0.45x the page cache's pread, against 0.20-0.33x).
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

    # under 2 GiB: MLX's shapes are 32-bit, and the device's touch flattens the copy
    n = min(int(args.gib * (1 << 30)), os.path.getsize(args.file), (1 << 31) - (1 << 20)) // (1 << 20) * (1 << 20)
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
    _load_rows(args.file, n, read)


def _load_rows(file: str, n: int, read: float) -> None:
    """``mx.load`` of the same file's tensors (about the same bytes): on CUDA MLX preads them on a
    thread pool into host memory and copies them to device memory, not through managed pages."""
    import mlx.core as mx

    for run in (1, 2):
        t = time.perf_counter()
        tensors = mx.load(file)
        picked, size = [], 0
        for key in sorted(tensors):
            if size >= n:
                break
            picked.append(tensors[key])
            size += tensors[key].nbytes
        mx.eval(*picked)
        mx.eval(*[a.reshape(-1)[::4096].max() for a in picked])
        wall = time.perf_counter() - t
        print(f"| mx.load {run} ({size / 2**30:.2f} GiB) | {size / wall / 1e9:.2f} | {read / n * size / wall:.2f} |", flush=True)
        del tensors, picked


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
