"""Data-parallel ``reference``, ``verify`` and ``compare`` over MLX's distributed runtime.

Launched by ``mlx.launch -n N -- oss-convert verify ...`` (any backend it takes: ``ring`` over
TCP, ``mpi``, ``nccl``, ``jaccl``), each rank runs a contiguous share of the chunks, in chunk
order, through the same runner; the per-position values (the reference's top-k entries, each
scored token's metrics) are gathered to every rank in rank order, so that what follows
(statistics, the report, ``ref.npz``) is computed from exactly the arrays one process would
have made. Only rank 0 prints and writes.

Collectives are few and large (MLX's ring ``all_sum`` has a reported deadlock, ml-explore/mlx
#4475; nothing here sums): per gather, one ``all_gather`` of the sizes and one of the bytes,
padded to the largest share. Before each gather every rank checks in with its state, so a rank
whose input is bad or that ran out of memory makes every rank raise the same ``RankFailure``
(naming the rank and its message, with its exit code) instead of leaving the others waiting in
a collective; a rank that dies outright is ended by ``mlx.launch``, which stops the others.
Without ``mlx.launch`` (no ``MLX_RANK`` in the environment) there is one rank and nothing here
communicates. Imports: base modules.
"""

from __future__ import annotations

import io
import json
import os
import signal
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from ..errors import OssConvertError, UsageError

STATUS_BYTES = 1024  # one check-in: exit code and message


class RankFailure(OssConvertError):
    """Another rank (or this one) failed: every rank raises this, with the failing rank's code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code


class World:
    """This process's place among the ranks (one rank when not launched by ``mlx.launch``)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.seconds = 0.0  # spent in collectives (waiting for the others included)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (the first ``count % size`` get one more)."""
        if count < self.size:
            raise UsageError(f"{self.size} ranks but only {count} chunks to share: use at most {count} ranks "
                             "(or more text, or a smaller --ctx)")
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # -- collectives ------------------------------------------------------------------

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        import time

        import mlx.core as mx

        start = time.perf_counter()
        try:
            with _terminable():
                return self._gather(mx, data)
        finally:
            self.seconds += time.perf_counter() - start

    def _gather(self, mx, data: bytes) -> list[bytes]:
        sizes = mx.distributed.all_gather(mx.array(np.array([len(data)], dtype=np.int32)), group=self.group,
                                          stream=mx.cpu)
        sizes = [int(s) for s in np.array(sizes)]
        padded = np.zeros(max(sizes), dtype=np.uint8)
        padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        every = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group, stream=mx.cpu))
        every = every.reshape(self.size, max(sizes))
        return [every[r, :sizes[r]].tobytes() for r in range(self.size)]

    def check_in(self, failure: BaseException | None = None) -> list[dict]:
        """Every rank says whether it failed; if any did, every rank raises ``RankFailure`` for
        the first that did (its message and exit code). Returns every rank's status."""
        if self.size == 1:
            if failure is not None:
                raise failure
            return [{"failed": False, "code": 0}]
        if failure is None:
            status = {"failed": False, "code": 0}
        else:
            code = getattr(failure, "exit_code", 2 if isinstance(failure, OssConvertError) else 1)
            status = {"failed": True, "code": code, "message": (str(failure) or type(failure).__name__)[:STATUS_BYTES]}
        return self._exchange(status, failure)

    def _exchange(self, status: dict, cause: BaseException | None = None) -> list[dict]:
        every = [json.loads(raw.decode("utf-8", "replace")) if raw else {"failed": True, "code": 1, "message": "no status"}
                 for raw in self._all_gather_bytes(json.dumps(status).encode("utf-8"))]
        for rank, got in enumerate(every):
            if got["failed"]:
                raise RankFailure(f"rank {rank} of {self.size}: {got['message']}", got["code"]) from cause
        return every

    def finish(self, code: int) -> int:
        """The last exchange: rank 0's exit code on every rank (its verdict), unless a rank failed
        since the last one (then ``RankFailure`` everywhere)."""
        if self.size == 1:
            return code
        return self._exchange({"failed": False, "code": code})[0]["code"]

    def gather_rows(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each array concatenated along its first axis over the ranks, in rank order (every rank
        gets the whole); one rank: the arrays as they are."""
        if self.size == 1:
            return arrays
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        parts = []
        for raw in self._all_gather_bytes(buffer.getvalue()):
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                parts.append({k: npz[k] for k in npz.files})
        return {k: np.concatenate([p[k] for p in parts]) for k in arrays}

    @contextmanager
    def checked(self) -> Iterator[None]:
        """Run a rank's own work; a failure in it is checked in (every rank learns of it) rather
        than left to hang the others at their next collective."""
        try:
            yield
        except (OssConvertError, MemoryError, OSError) as exc:
            self.check_in(exc)
            raise
        self.check_in()


@contextmanager
def _terminable() -> Iterator[None]:
    """SIGTERM's default action while this thread waits in MLX's C++ (a collective, or the
    connection to the peers), where Python's handlers never run: a peer that died leaves it
    waiting (the ring backend's connect waits 30 s), and mlx.launch's SIGTERM must end it then."""
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_WORLD: World | None = None


def current() -> World | None:
    """The ranks, if a command has asked for them (``world``); None otherwise."""
    return _WORLD


def world() -> World:
    """The ranks of this job: MLX's global group when ``mlx.launch`` started it, else one rank."""
    global _WORLD
    if _WORLD is None:
        if os.environ.get("MLX_RANK") is None:
            _WORLD = World()
        else:
            import mlx.core as mx

            with _terminable():
                group = mx.distributed.init(backend=os.environ.get("OSS_CONVERT_MLX_BACKEND", "any"))
            _WORLD = World(group if group.size() > 1 else None)
    return _WORLD
