"""Files hashed while they are written, so that a manifest need not read a 13 GB output back.

``HashingWriter`` is a binary file opened for writing whose every byte also goes through
sha256; on close it records ``(size, mtime, digest)``. ``written(path)`` hands that record over
once (``provenance.file_digest`` uses it only while the file is unchanged since). The rest of
the file interface is the file's own. Imports: nothing of the package.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

_WRITTEN: dict[str, tuple[int, int, str]] = {}
_LOCK = threading.Lock()


class HashingWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._digest = hashlib.sha256()

    def write(self, data) -> int:
        self._digest.update(data)
        return self._file.write(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            stat = self.path.stat()
            with _LOCK:
                _WRITTEN[str(self.path)] = (stat.st_size, stat.st_mtime_ns, self._digest.hexdigest())

    def __getattr__(self, name):
        return getattr(self._file, name)


def written(path: str | Path) -> tuple[int, int, str] | None:
    """``(size, mtime_ns, sha256)`` recorded when ``path`` was written, once; else None."""
    with _LOCK:
        return _WRITTEN.pop(str(path), None)
