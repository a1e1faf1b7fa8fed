"""sha256 of files: hashed while they are written, so that a manifest need not read a 13 GB
output back, and read in 8 MiB steps otherwise (``file_sha256``: memory stays flat).

``HashingWriter`` is a binary file opened for writing whose every byte also goes through
sha256, on a second thread while the bytes are being written (the write costs as much CPU as
the hash on a small VM, and both release the GIL, so the hash adds no time). Every 64 MiB it
starts the disk write of what it has written and drops what is 1 GiB behind from the page cache
(``_write_behind``). On close it records ``(size, mtime, digest)``. ``written(path)`` hands that
record over once (``provenance.file_digest`` uses it only while the file is unchanged since).
The rest of the file interface is the file's own. Imports: nothing of the package.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

_WRITTEN: dict[str, tuple[int, int, str]] = {}
_LOCK = threading.Lock()
READ_BYTES = 8 << 20  # per read of ``file_sha256``
ALONGSIDE_BYTES = 1 << 20  # smaller writes are hashed in line: a thread hand-off costs more
WRITE_BEHIND_BYTES = 64 << 20  # start writing each such run of bytes to disk as soon as it is complete
DROP_BEHIND_BYTES = 1 << 30  # and drop it from the page cache once this much more is written


class HashingWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="hash-output")
        self._size = self._started = self._dropped = 0
        self._behind = ThreadPoolExecutor(1, thread_name_prefix="write-behind")

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < ALONGSIDE_BYTES:
            self._digest.update(view)
            written = self._file.write(view)
        else:
            hashed = self._hasher.submit(self._digest.update, view)
            try:
                written = self._file.write(view)
            finally:
                hashed.result()  # in order: the next write is hashed after this one
        self._size += written
        if self._size - self._started >= WRITE_BEHIND_BYTES and hasattr(os, "posix_fadvise"):
            self._file.flush()  # the kernel has every byte up to self._size
            drop_to = max(self._dropped, self._size - DROP_BEHIND_BYTES)
            self._behind.submit(_write_behind, self._file.fileno(), self._started, self._size, self._dropped, drop_to)
            self._started, self._dropped = self._size, drop_to
        return written

    def close(self) -> None:
        if not self._file.closed:
            self._hasher.shutdown()
            self._behind.shutdown()  # before the file descriptor closes
            self._file.close()
            stat = self.path.stat()
            with _LOCK:
                _WRITTEN[str(self.path)] = (stat.st_size, stat.st_mtime_ns, self._digest.hexdigest())

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _write_behind(fd: int, start: int, end: int, dropped: int, drop_to: int) -> None:
    """Hand bytes ``start:end`` to the disk now and drop ``dropped:drop_to`` from the cache.

    Left to the kernel, write-back of a 13 GB output starts late and then throttles the
    writer, and the cache fills with output pages nobody reads (the hash is taken).
    ``POSIX_FADV_DONTNEED`` starts write-back of dirty pages and drops the clean ones; it can
    wait for the disk's queue, so it runs on its own thread, never in the writer's way."""
    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    if drop_to > dropped:
        os.posix_fadvise(fd, dropped, drop_to - dropped, os.POSIX_FADV_DONTNEED)


def file_sha256(path: str | Path, progress: Callable[[int], None] | None = None) -> str:
    """The file's sha256, read front to back into one buffer; ``progress(n)`` after each read
    (it may raise to stop). Reads, not a mapping: from a cold cache a mapping's page faults wait
    for the disk a window at a time and read slower (bench/RESULTS.md, session 4)."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
        while count := fh.readinto(buffer):
            digest.update(view[:count])
            if progress is not None:
                progress(count)
    return digest.hexdigest()


def written(path: str | Path) -> tuple[int, int, str] | None:
    """``(size, mtime_ns, sha256)`` recorded when ``path`` was written, once; else None."""
    with _LOCK:
        return _WRITTEN.pop(str(path), None)
