"""Atomic outputs: build under a hidden temporary name beside the destination, rename on success.

A crash, Ctrl-C or full disk leaves the destination as it was (or absent), never half-written.
The temporary name starts with ``.`` and ends with ``.partial`` so it is easy to spot and clean.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(dest: str | Path, *, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill; move it to ``dest`` when the block succeeds.

    ``is_dir`` creates the temporary path as an empty folder. An existing ``dest`` is refused
    unless ``force``; with ``force`` it is replaced only after the new output is complete.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.partial"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir:
            for sub in tmp.rglob("*"):
                if sub.is_file():
                    _fsync(sub)
        elif tmp.exists():
            _fsync(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
