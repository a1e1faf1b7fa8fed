"""Worker processes that merge and re-encode MXFP4 experts, a chunk of rows each.

Support module: imports ``quantize``, ``lora`` and ``formats.mxfp4``.

Why processes: numpy releases the GIL inside each pass, but the encoder makes some thirty short
passes per chunk, and handing the GIL between threads costs more than the passes gain: on a
two-core VM two threads ran 1.2-1.5x one thread, two processes 2.0x (bench/RESULTS.md).

How: a shared memory segment (the arena) is made before the workers start; each attaches to it
by name. It has a few slots, each holding one expert on its way: its base blocks and scales and
the adapter's factors for it (copied in from the checkpoint's and the adapter's mappings, whose
files a worker may not have), and the encoded blocks and scales the workers write. A worker
computes its rows' delta itself from the factors (a BLAS product of a chunk of rows, as the
whole one computes each value), adds it to the decoded rows and encodes them, so the parent only
copies bytes in and out. A task names a range of rows and returns the sums the merge reports;
the rows of each chunk are fixed by the shape alone, so the bytes and the sums never depend on
how many workers there are.

The parent's side is one feeder thread: it loads the experts asked for into free slots, sends
their tasks, and hands each finished expert to its ``deliver`` in the order asked, so the
workers always have the next experts queued while the parent's main thread writes the output.
The workers are forked on Linux and spawned elsewhere (``START_METHOD``: on macOS fork is unsafe
beside the system's frameworks, and threads, which hand the GIL back and forth, ran no faster
on 16 cores than on 2); a spawned worker imports the package afresh (half a second, once).
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Callable

import numpy as np
from threadpoolctl import ThreadpoolController

from . import quantize
from .formats import mxfp4
from .lora import DeltaTerm, delta_rows

MIN_VALUES = 1 << 20  # an expert smaller than this is merged on threads: a task would cost more than it saves

# The conversion's own threads (the target's writes and hashes, the feeder, the source check)
# are the critical path while the workers run ahead of them, and take about two cores: leave
# them those, and run the workers only on what the conversion leaves idle (SCHED_IDLE on Linux,
# nice 19 elsewhere). On the 16-core host that took a 12-layer 20b merge from
# 1.77x to 1.33x the plain convert (nice 10 and 16 workers before; bench/RESULTS.md).
CORES_LEFT_TO_THE_CONVERSION = 2
WORKER_NICENESS = 19
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# fork where it is safe and cheap; a fresh interpreter elsewhere (macOS)
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
_ARENA: "Arena | None" = None  # the arena: set in the parent before the workers fork, attached to in a spawned one
_WORKER: dict = {}  # in a worker: its BLAS limit and its scratch arrays


def available() -> bool:
    """Worker processes can be used here: more than one core."""
    return _cores() > 1


_BLAS: list = []


def one_blas_thread():
    """A context in which BLAS runs on the calling thread only: a merge's products are small
    (rank r), and the idle threads of a multithreaded BLAS spin, taking the cores the encoding
    needs (7 s of a 30 s merge's CPU on two cores, measured)."""
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def worker_count() -> int:
    """Worker processes for a merge: a core each, less the conversion's own (from 8 cores up:
    on fewer, a core the workers leave would mostly stand idle)."""
    cores = _cores()
    return max(1, cores - min(CORES_LEFT_TO_THE_CONVERSION, cores // 8))


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 61) if sys.platform == "win32" else cores  # a process pool's limit there


@dataclass(frozen=True)
class Views:
    """One expert's arrays in the arena, shaped for its ``[rows, cols]``."""

    base_blocks: np.ndarray  # uint8 [rows, G, 16]
    base_scales: np.ndarray  # uint8 [rows, G]
    blocks: np.ndarray  # uint8 [rows, G, 16], written by the workers
    scales: np.ndarray  # uint8 [rows, G]
    factors: np.ndarray  # float32 [factor_values]: the terms' a and b, one after another


class Arena:
    """The shared memory: ``slots`` experts of at most ``values`` (rows * cols) values each, with
    at most ``factor_values`` float32 of adapter factors. For forked workers an anonymous shared
    mapping, which they inherit (no ``/dev/shm`` size limit applies to it: Docker's is 64 MB);
    ``named``: a shared memory segment, which spawned workers attach to by ``name``."""

    def __init__(self, values: int, factor_values: int, slots: int, *, named: bool = False, name: str | None = None):
        self.values, self.factor_values, self.slots = values, factor_values, slots
        self.slot_bytes = factor_values * 4 + 2 * (values // 2 + values // mxfp4.BLOCK)
        self.owner = name is None
        self.memory = shared_memory.SharedMemory(name, create=self.owner, size=self.slot_bytes * slots) \
            if named or name is not None else None
        self.map = self.memory.buf if self.memory is not None else mmap.mmap(-1, self.slot_bytes * slots)

    def spec(self) -> tuple | None:
        """What a spawned worker attaches with: ``Arena(values, factor_values, slots, name=name)``;
        None for an inherited mapping."""
        return None if self.memory is None else (self.values, self.factor_values, self.slots, self.memory.name)

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
        """Unmap it (the segment unlinked by its owner), or leave it mapped until the last view of
        it (an exception's frame) is freed."""
        if self.memory is not None and self.owner:
            self.memory.unlink()
        try:
            (self.memory if self.memory is not None else self.map).close()
        except BufferError:
            pass


def _start_worker(arena: tuple | None) -> None:
    global _ARENA
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and ends the workers
    _run_when_idle()
    # The parent's thread pools were copied without their threads: never use them here.
    quantize._POOL.clear()
    mxfp4._POOL.clear()
    # one BLAS thread a worker: there is a worker on every core
    _WORKER["blas"] = ThreadpoolController().limit(limits=1, user_api="blas")
    if arena is not None:  # spawned: attach to the parent's segment (a forked worker has its mapping)
        values, factor_values, slots, name = arena
        _ARENA = Arena(values, factor_values, slots, name=name)
    _keep_freed_memory()


def _run_when_idle() -> None:
    """Let this worker run only where the conversion leaves a core idle: at nice 10 the
    conversion's threads still lost a third of their speed to the workers."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):  # not Linux, or refused: the lowest priority nice gives (19)
        pass
    if hasattr(os, "nice"):  # not on Windows
        os.nice(WORKER_NICENESS)


def _keep_freed_memory() -> None:
    """glibc's malloc gives blocks over 128 KiB their own mapping and unmaps them when freed, so
    every numpy temporary of a chunk (1 MiB) costs a fresh mapping's page faults: in a new
    process that doubled the encoder's time (a forked worker inherits the parent's raised
    threshold). Keep them on the heap and the heap's freed top mapped."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): its own behaviour stands
        pass


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
        self.workers = workers or worker_count()
        # enough experts in flight that the workers never wait for the feeder's copies
        self.slots = slots or max(2, min(6, self.workers // 2))
        self.arena = _ARENA = Arena(values, factor_values, self.slots, named=START_METHOD != "fork")
        self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(START_METHOD),
                                             initializer=_start_worker, initargs=(self.arena.spec(),))
        try:
            self._executor.submit(int).result()  # the workers started now, from this thread, before the feeder's
        except BaseException:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self.arena.close()
            raise
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
        self.arena.close()
