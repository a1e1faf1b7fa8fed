"""Worker processes that decode, merge and re-encode MXFP4 experts, a chunk of rows each.

Support module: imports ``quantize`` and ``formats.mxfp4``.

Why processes: numpy releases the GIL inside each pass, but the encoder makes some thirty short
passes per chunk, and handing the GIL between threads costs more than the passes gain: on a
two-core VM two threads ran 1.2-1.5x one thread, two processes 2.0x (bench/RESULTS.md).

How: an anonymous shared mapping (the arena) is made before the workers are forked, so they see
its pages with no copy: the expert's delta (float32, written there by the BLAS product), its base
blocks and scales (copied in from the checkpoint's mapping, whose file a worker may not have),
and the encoded blocks and scales the workers write. A task names a range of rows and returns
the sums the merge reports; the rows of each task are fixed by the shape alone, so the bytes
and the sums never depend on how many workers there are. fork is Linux's: elsewhere (macOS,
where fork is unsafe beside the system's frameworks) ``available()`` says no and the merge runs
on threads (``quantize.encode_made``).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from . import quantize
from .formats import mxfp4

MIN_VALUES = 1 << 20  # an expert smaller than this is merged on threads: a task would cost more than it saves

_ARENA: "Arena | None" = None  # set in the parent before the workers fork; theirs is the same pages


def available() -> bool:
    """Worker processes can be used here: Linux (fork) and more than one core."""
    return sys.platform.startswith("linux") and _cores() > 1


_BLAS: list = []


def one_blas_thread():
    """A context in which BLAS runs on the calling thread only: a merge's products are small
    (rank r), and the idle threads of a multithreaded BLAS spin, taking the cores the encoding
    needs (7 s of a 30 s merge's CPU on two cores, measured)."""
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Views:
    """One expert's arrays in the arena, shaped for its ``[rows, cols]``."""

    delta: np.ndarray  # float32 [rows, cols]
    base_blocks: np.ndarray  # uint8 [rows, G, 16]
    base_scales: np.ndarray  # uint8 [rows, G]
    blocks: np.ndarray  # uint8 [rows, G, 16], written by the workers
    scales: np.ndarray  # uint8 [rows, G]


class Arena:
    """The shared mapping: ``slots`` experts of at most ``values`` (rows * cols) values each."""

    def __init__(self, values: int, slots: int):
        self.values, self.slots = values, slots
        self.slot_bytes = values * 4 + 2 * (values // 2 + values // mxfp4.BLOCK)
        self.map = mmap.mmap(-1, self.slot_bytes * slots)  # anonymous and MAP_SHARED: the forked workers' too

    def views(self, slot: int, rows: int, cols: int) -> Views:
        if rows * cols > self.values:
            raise ValueError(f"a [{rows}, {cols}] expert does not fit an arena of {self.values} values")
        groups, n = cols // mxfp4.BLOCK, rows * cols
        offsets = slot * self.slot_bytes + np.cumsum([0, self.values * 4, n // 2, n // mxfp4.BLOCK, n // 2])

        def view(i: int, dtype, shape) -> np.ndarray:
            return np.frombuffer(self.map, dtype, int(np.prod(shape)), int(offsets[i])).reshape(shape)

        return Views(view(0, np.float32, (rows, cols)), view(1, np.uint8, (rows, groups, 16)),
                     view(2, np.uint8, (rows, groups)), view(3, np.uint8, (rows, groups, 16)),
                     view(4, np.uint8, (rows, groups)))

    def close(self) -> None:
        self.map.close()


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and ends the workers
    # The parent's thread pools were copied without their threads: never use them here.
    quantize._POOL.clear()
    mxfp4._POOL.clear()


def _merge_rows(slot: int, rows: int, cols: int, start: int, stop: int, step: int, factor: float,
                search: bool) -> list[tuple[float, ...]]:
    """In a worker: rows ``start:stop`` of the expert in ``slot`` decoded, merged (the delta times
    ``factor``, its scaling where the parent left it), re-encoded and written back, ``step`` rows at
    a time (the chunks the threads use); per chunk (squared error, merged energy, delta energy,
    base energy)."""
    views, sums = _ARENA.views(slot, rows, cols), []
    for first in range(start, stop, step):
        part = slice(first, min(first + step, stop))
        change = views.delta[part] if factor == 1 else views.delta[part] * np.float32(factor)
        weight, energies = merged_piece(views.base_blocks[part], views.base_scales[part], change)
        tally = quantize.ErrorTally()
        views.blocks[part], views.scales[part] = quantize.encode(weight, "search" if search else "ocp", tally)
        sums.append((tally.sq_error, tally.energy, *energies))
    return sums


def merged_piece(blocks: np.ndarray, scales: np.ndarray, change: np.ndarray,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Rows of a base expert (MXFP4 ``blocks``/``scales``) decoded (into ``out``) with their delta
    added, and (delta energy, base energy) of the piece: the one step of a merge that threads and
    worker processes share. The delta energy is 0 exactly when every value of it is (a float32
    squared never underflows in float64; NaN never reaches a merge), so it also says whether the
    piece changed."""
    weight = mxfp4.decode(blocks, scales, out=out)
    energies = quantize.piece_energies(change, weight)
    weight += change
    return weight, energies


@dataclass
class Job:
    """One expert on its way through the workers: its slot and tasks, then its result."""

    slot: int
    shape: tuple[int, int]
    tasks: list
    result: tuple | None = None  # (blocks, scales, per-chunk sums in row order), once collected


class MergeWorkers:
    """One worker process per core and the arena they share, for a merge's experts of at most
    ``values`` values each. Two experts can be in flight: the parent computes the next one's
    delta (BLAS) while the workers encode this one. ``close`` ends them (also at exit, by the
    executor's own hook)."""

    SLOTS = 2

    def __init__(self, values: int, workers: int | None = None):
        global _ARENA
        self.arena = _ARENA = Arena(values, self.SLOTS)
        self._free = list(range(self.SLOTS))
        self._running: list[Job] = []  # oldest first
        context = multiprocessing.get_context("fork")
        self.workers = workers or _cores()
        self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker)
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="merge-ahead")
        self._lock = threading.RLock()  # the slots, shared by the main thread and the helper

    def ahead(self, start, *args):
        """``start(*args)`` (which calls ``self.start``) on the parent's helper thread: the next
        expert's BLAS product and copies, while the main thread hands this one to its target.
        Returns its future."""
        return self._helper.submit(start, *args)

    def start(self, blocks: np.ndarray, scales: np.ndarray, fill_delta, search: bool) -> Job:
        """Expert ``blocks``/``scales`` (its base) with the delta ``fill_delta(out)`` writes into the
        arena (returning the factor still to apply: ``Adapter.delta_unscaled``), sent to the workers:
        a few tasks a worker, each of whole chunks (a task costs the parent ~0.1 ms to send and
        collect: one per chunk was 16 ms an expert, more than a 16-core host's encoding of it)."""
        with self._lock:
            if not self._free:
                self._collect(self._running[0])  # its result is kept; its slot is free again
            slot = self._free.pop(0)
        rows, groups = scales.shape
        cols = groups * mxfp4.BLOCK
        views = self.arena.views(slot, rows, cols)
        with one_blas_thread():
            factor = fill_delta(views.delta)
        np.copyto(views.base_blocks, blocks)
        np.copyto(views.base_scales, scales)
        step = max(1, quantize.CHUNK_VALUES // cols)  # the threads' chunks: the same sums, in order
        chunks = -(-rows // step)
        per_task = max(1, -(-chunks // (2 * self.workers))) * step
        tasks = [self._executor.submit(_merge_rows, slot, rows, cols, first, min(first + per_task, rows), step,
                                       factor, search) for first in range(0, rows, per_task)]
        job = Job(slot, (rows, cols), tasks)
        with self._lock:
            self._running.append(job)
        return job

    def finish(self, job: Job) -> tuple[np.ndarray, np.ndarray, list]:
        """``(blocks, scales, per-chunk sums in row order)`` of a started job."""
        with self._lock:
            self._collect(job)
        return job.result

    def _collect(self, job: Job) -> None:
        """Under ``_lock``: the job's result copied out of its slot, which is free again."""
        if job.result is not None:
            return
        sums = [chunk for task in job.tasks for chunk in task.result()]
        views = self.arena.views(job.slot, *job.shape)
        job.result = views.blocks.copy(), views.scales.copy(), sums
        self._running.remove(job)
        self._free.append(job.slot)

    def close(self) -> None:
        self._helper.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        try:
            self.arena.close()
        except BufferError:  # a view of it is still referenced (an exception's frame): unmapped when freed
            pass
