"""Worker processes that merge and re-encode MXFP4 experts, a chunk of rows each.

Support module: imports ``quantize``, ``lora`` and ``formats.mxfp4``.

Why processes: numpy releases the GIL inside each pass, but the encoder makes some thirty short
passes per chunk, and handing the GIL between threads costs more than the passes gain: on a
two-core VM two threads ran 1.2-1.5x one thread, two processes 2.0x (bench/RESULTS.md).

How: an anonymous shared mapping (the arena) is made before the workers are forked, so they see
its pages with no copy. It has a few slots, each holding one expert on its way: its base blocks
and scales and the adapter's factors for it (copied in from the checkpoint's and the adapter's
mappings, whose files a worker may not have), and the encoded blocks and scales the workers
write. A worker computes its rows' delta itself from the factors (a BLAS product of a chunk of
rows, as the whole one computes each value), adds it to the decoded rows and encodes them, so
the parent only copies bytes in and out. A task names a range of rows and returns the sums the
merge reports; the rows of each chunk are fixed by the shape alone, so the bytes and the sums
never depend on how many workers there are.

The parent's side is one feeder thread: it loads the experts asked for into free slots, sends
their tasks, and hands each finished expert to its ``deliver`` in the order asked, so the
workers always have the next experts queued while the parent's main thread writes the output.
fork is Linux's: elsewhere (macOS, where fork is unsafe beside the system's frameworks)
``available()`` says no and the merge runs on threads (``quantize.encode_made``).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import numpy as np
from threadpoolctl import ThreadpoolController

from . import quantize
from .formats import mxfp4
from .lora import DeltaTerm, delta_rows

MIN_VALUES = 1 << 20  # an expert smaller than this is merged on threads: a task would cost more than it saves

WORKER_NICENESS = 10
_ARENA: "Arena | None" = None  # set in the parent before the workers fork; theirs is the same pages
_WORKER: dict = {}  # in a worker: its BLAS limit and its scratch arrays


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

    base_blocks: np.ndarray  # uint8 [rows, G, 16]
    base_scales: np.ndarray  # uint8 [rows, G]
    blocks: np.ndarray  # uint8 [rows, G, 16], written by the workers
    scales: np.ndarray  # uint8 [rows, G]
    factors: np.ndarray  # float32 [factor_values]: the terms' a and b, one after another


class Arena:
    """The shared mapping: ``slots`` experts of at most ``values`` (rows * cols) values each, with
    at most ``factor_values`` float32 of adapter factors."""

    def __init__(self, values: int, factor_values: int, slots: int):
        self.values, self.factor_values, self.slots = values, factor_values, slots
        self.slot_bytes = factor_values * 4 + 2 * (values // 2 + values // mxfp4.BLOCK)
        self.map = mmap.mmap(-1, self.slot_bytes * slots)  # anonymous and MAP_SHARED: the forked workers' too

    def views(self, slot: int, rows: int, cols: int) -> Views:
        if rows * cols > self.values:
            raise ValueError(f"a [{rows}, {cols}] expert does not fit an arena of {self.values} values")
        groups, n = cols // mxfp4.BLOCK, rows * cols
        offsets = slot * self.slot_bytes + np.cumsum([0, self.factor_values * 4, n // 2, n // mxfp4.BLOCK, n // 2])

        def view(i: int, dtype, shape) -> np.ndarray:
            return np.frombuffer(self.map, dtype, int(np.prod(shape)), int(offsets[i])).reshape(shape)

        return Views(view(1, np.uint8, (rows, groups, 16)), view(2, np.uint8, (rows, groups)),
                     view(3, np.uint8, (rows, groups, 16)), view(4, np.uint8, (rows, groups)),
                     view(0, np.float32, (self.factor_values,)))

    def close(self) -> None:
        self.map.close()


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and ends the workers
    # The conversion's own threads (the target's writes, the feeder, the source check) are the
    # critical path while the workers run ahead of them: the workers take the cores they leave.
    os.nice(WORKER_NICENESS)
    # The parent's thread pools were copied without their threads: never use them here.
    quantize._POOL.clear()
    mxfp4._POOL.clear()
    # one BLAS thread a worker: there is a worker on every core
    _WORKER["blas"] = ThreadpoolController().limit(limits=1, user_api="blas")


def _placed_terms(terms: list[DeltaTerm], factors: np.ndarray) -> list[tuple]:
    """``terms`` copied into an arena slot's factor region; what a worker rebuilds them from."""
    placed, at = [], 0
    for term in terms:
        for side in (term.a, term.b):
            if at + side.size > factors.size:
                raise ValueError(f"an expert's factors ({at + side.size} values) do not fit the arena's {factors.size}")
            np.copyto(factors[at:at + side.size].reshape(side.shape), side)
            at += side.size
        placed.append((term.a.shape, term.b.shape, term.scaling, term.scale_first, term.transposed, term.rows))
    return placed


def _terms_from(placed: list[tuple], factors: np.ndarray) -> list[DeltaTerm]:
    terms, at = [], 0
    for a_shape, b_shape, *rest in placed:
        a = factors[at:at + int(np.prod(a_shape))].reshape(a_shape)
        at += a.size
        b = factors[at:at + int(np.prod(b_shape))].reshape(b_shape)
        at += b.size
        terms.append(DeltaTerm(a, b, *rest))
    return terms


def _merge_rows(slot: int, rows: int, cols: int, start: int, stop: int, step: int, placed: list[tuple],
                search: bool) -> list[tuple[float, ...]]:
    """In a worker: rows ``start:stop`` of the expert in ``slot`` decoded, merged, re-encoded and
    written back, ``step`` rows at a time (the chunks the threads use); per chunk (squared error,
    merged energy, delta energy, base energy)."""
    views, sums = _ARENA.views(slot, rows, cols), []
    terms = _terms_from(placed, views.factors)
    scratch = _WORKER.get("scratch")
    if scratch is None or scratch[0].shape != (step, cols):
        scratch = _WORKER["scratch"] = (np.empty((step, cols), np.float32), np.empty((step, cols), np.float32))
    for first in range(start, stop, step):
        part = slice(first, min(first + step, stop))
        n = part.stop - part.start
        change = delta_rows(terms, part.start, part.stop, scratch[0][:n])
        weight, energies = merged_piece(views.base_blocks[part], views.base_scales[part], change, scratch[1][:n])
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
class _Request:
    """An expert asked for: ``load(views)`` copies its base into the slot and returns its terms;
    ``deliver(views, sums)`` takes the result; both run on the feeder thread."""

    load: Callable[[Views], list[DeltaTerm]]
    shape: tuple[int, int]
    search: bool
    deliver: Callable[[Views, list], None]
    future: Future


@dataclass
class _Running:
    request: _Request
    slot: int
    tasks: list


class MergeWorkers:
    """One worker process per core, the arena they share (experts of at most ``values`` values and
    ``factor_values`` float32 of factors each) and the feeder thread that keeps them busy.
    ``close`` ends them (also at exit, by the executor's own hook)."""

    def __init__(self, values: int, factor_values: int, workers: int | None = None, slots: int | None = None):
        global _ARENA
        self.workers = workers or _cores()
        # enough experts in flight that the workers never wait for the feeder's copies
        self.slots = slots or max(2, min(6, self.workers // 2))
        self.arena = _ARENA = Arena(values, factor_values, self.slots)
        self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_start_worker)
        self._executor.submit(int).result()  # every worker forked now, from this thread, before the feeder's
        self._queue: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._feeder = threading.Thread(target=self._feed, name="merge-feeder", daemon=True)
        self._feeder.start()

    def submit(self, load: Callable[[Views], list[DeltaTerm]], shape: tuple[int, int], search: bool,
               deliver: Callable[[Views, list], None]) -> Future:
        """Merge an expert of ``shape`` ``[rows, cols]``: ``load`` and ``deliver`` as ``_Request``
        says. The future's result is the per-chunk sums (after ``deliver``), or the error."""
        request = _Request(load, shape, search, deliver, Future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the merge's workers are closed")
            self._queue.append(request)
            self._wake.notify()
        return request.future

    def _feed(self) -> None:
        running: deque[_Running] = deque()  # oldest first
        while True:
            with self._wake:
                while not self._queue and not running and not self._closed:
                    self._wake.wait()
                if not self._queue and not running:
                    return  # closed
                request = self._queue.popleft() if self._queue and len(running) < self.slots else None
            if request is None:
                self._finish(running.popleft())
            elif request.future.set_running_or_notify_cancel():
                busy = {job.slot for job in running}
                job = self._start(request, next(s for s in range(self.slots) if s not in busy))
                if job is not None:
                    running.append(job)

    def _start(self, request: _Request, slot: int) -> _Running | None:
        """Load the expert into ``slot`` and send its tasks: a few a worker, each of whole chunks (a
        task costs the parent ~0.1 ms to send and collect: one per chunk was 16 ms an expert)."""
        try:
            rows, cols = request.shape
            views = self.arena.views(slot, rows, cols)
            placed = _placed_terms(request.load(views), views.factors)
            step = max(1, quantize.CHUNK_VALUES // cols)  # the threads' chunks: the same sums, in order
            chunks = -(-rows // step)
            per_task = max(1, -(-chunks // (2 * self.workers))) * step
            tasks = [self._executor.submit(_merge_rows, slot, rows, cols, first, min(first + per_task, rows), step,
                                           placed, request.search) for first in range(0, rows, per_task)]
            return _Running(request, slot, tasks)
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits for this expert
            request.future.set_exception(error)
            return None

    def _finish(self, job: _Running) -> None:
        wait(job.tasks)  # every task done before the slot is reused, whatever failed
        try:
            sums = [chunk for task in job.tasks for chunk in task.result()]
            job.request.deliver(self.arena.views(job.slot, *job.request.shape), sums)
            job.request.future.set_result(sums)
        except BaseException as error:  # noqa: BLE001
            job.request.future.set_exception(error)

    def close(self) -> None:
        """Drop what was not started, finish what was, end the workers."""
        with self._wake:
            self._closed = True
            for request in self._queue:
                request.future.cancel()
            self._queue.clear()
            self._wake.notify()
        self._feeder.join()
        self._executor.shutdown(wait=True, cancel_futures=True)
        try:
            self.arena.close()
        except BufferError:  # a view of it is still referenced (an exception's frame): unmapped when freed
            pass
