"""The reads of the whole source that a conversion needs besides its own: the scan for values
that convert into garbage (NaN/Inf, scale byte 255) and the sha256 of every source file for the
manifest, on one thread beside the conversion.

Run before the conversion, they held back its first written byte by a full read of the BF16
tensors and, hashed alone, the source cost a second pass (bench/RESULTS.md): beside it,
both read pages the conversion reads too, and numpy and hashlib release the GIL. A bad source
stops the job once the scan sees it: ``watch(progress)`` is the conversion's progress with a
check of the source check at every step; ``result(progress)`` waits for the rest, with its own
bar, before anything is published (its failure leaves nothing behind).
Imports: support and base modules.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait
from pathlib import Path

from .errors import InputError
from .model import Source
from .progress import Progress
from .provenance import file_digest

SHOWN_PROBLEMS = 5


def invalid_values_error(src: Source, problems: list[str]) -> InputError:
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    if len(problems) > SHOWN_PROBLEMS:
        shown += f"; and {len(problems) - SHOWN_PROBLEMS} more"
    return InputError(f"the source has {len(problems)} tensors with invalid values (pass --no-scan to convert "
                      f"anyway): {shown}", file=src.path)


class SourceCheck:
    """Hash ``files`` (``{name: {size, sha256}}``), then scan ``src`` if ``scan``, on a thread."""

    def __init__(self, src: Source, *, scan: bool, files: list[Path]):
        self._src, self._scan, self._files = src, scan, files
        self.total = (src.tensor_bytes if scan else 0) + sum(p.stat().st_size for p in files)
        self._done = 0
        self._bar = None  # the waiting bar's advance, once the conversion is done
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="source-check")
        self._future = self._pool.submit(self._run)

    def _advance(self, amount: int) -> None:
        if self._stop.is_set():  # the conversion failed or was interrupted: do not finish reading 65 GB
            raise CancelledError
        with self._lock:
            self._done += amount
            if self._bar is not None:
                self._bar(amount)

    def _run(self) -> dict[str, dict]:
        # The hash first: it reads each file from end to end at the disk's sequential rate, so
        # that the scan's reads, tensor by tensor and skipping the expert blocks, come from the
        # page cache (alone, the scan reads cold at a fraction of that: bench/RESULTS.md).
        hashes = {p.name: file_digest(p, self._advance) for p in self._files}
        if self._scan:
            problems = self._src.scan(progress=self._advance)
            if problems:
                raise invalid_values_error(self._src, problems)
        return hashes

    def raise_failure(self) -> None:
        """Raise what stopped the check (a bad source), if it has stopped."""
        if self._future.done() and self._future.exception() is not None:
            raise self._future.exception()

    def watch(self, progress: Progress) -> Progress:
        return _Watched(progress, self)

    def result(self, progress: Progress) -> dict[str, dict]:
        """The source hashes once the check is complete (its error if it failed)."""
        if not self._future.done():
            with progress.task("check source", self.total) as advance:
                with self._lock:
                    advance(self._done)
                    self._bar = advance
                wait([self._future])
                with self._lock:
                    self._bar = None
        return self._future.result()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "SourceCheck":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Watched(Progress):
    """``progress`` that stops the conversion as soon as the source check fails."""

    def __init__(self, inner: Progress, check: SourceCheck):
        self._inner, self._check = inner, check

    def start(self, description: str, total: int, unit: str) -> None:
        self._check.raise_failure()
        self._inner.start(description, total, unit)

    def advance(self, amount: int) -> None:
        self._check.raise_failure()
        self._inner.advance(amount)

    def finish(self) -> None:
        self._inner.finish()

    def note(self, message: str) -> None:
        self._inner.note(message)
