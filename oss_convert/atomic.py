"""Atomic outputs: build under hidden temporary names beside the destinations, publish on success.

A crash, Ctrl-C or full disk leaves the destination as it was (or absent), never half-written.
Temporary names start with ``.`` and end with ``.partial`` so they are easy to spot and clean.

An output may be a set of files published together (a split GGUF). The set is published so
that a reader never sees a mix of old and new files: an old first file is moved aside (the old
set stops being readable: every reader starts from the first file and checks its siblings),
the other files are published, and the first file goes last. Whoever runs the job may also ask,
through ``publishing(hook)``, to add files (a manifest) that must exist before the artifact
becomes visible: the hook sees every temporary path under its final name and returns extra
``(temporary, final)`` pairs, published first.

Without ``force`` an output that appeared meanwhile (another conversion to the same path) is
never replaced: files are published with a link that fails if the name exists, folders with a
rename that fails onto a non-empty folder; the later job stops with ``OutputExistsError`` and
leaves the other job's output as it is.
"""

from __future__ import annotations

import contextvars
import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputExistsError

Hook = Callable[[dict[Path, Path]], list[tuple[Path, Path]]]
_before_publish: contextvars.ContextVar[Hook | None] = contextvars.ContextVar("before_publish", default=None)


@contextmanager
def publishing(hook: Hook) -> Iterator[None]:
    """Call ``hook({final: temporary})`` just before the outputs made inside this block are published."""
    token = _before_publish.set(hook)
    try:
        yield
    finally:
        _before_publish.reset(token)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _hidden(dest: Path, suffix: str) -> Path:
    return dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.{suffix}"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


@contextmanager
def atomic_output(dest: str | Path, *, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill; move it to ``dest`` when the block succeeds.

    ``is_dir`` creates the temporary path as an empty folder. An existing ``dest`` is refused
    unless ``force``; with ``force`` it is replaced only after the new output is complete.
    """
    with atomic_outputs([dest], force=force, is_dir=is_dir) as (tmp,):
        yield tmp


@contextmanager
def atomic_outputs(dests: list[str | Path], *, force: bool = False, is_dir: bool = False) -> Iterator[list[Path]]:
    """Temporary paths for a set of outputs published together, the first one last."""
    dests = [Path(d) for d in dests]
    for dest in dests:
        if _exists(dest) and not force:
            raise OutputExistsError(f"{dest} exists; pass --force to replace it")
    for dest in dests:
        dest.parent.mkdir(parents=True, exist_ok=True)
    tmps = [_hidden(dest, "partial") for dest in dests]
    created: list[Path] = []
    try:
        for tmp in tmps:
            if is_dir:
                tmp.mkdir()
            created.append(tmp)
        yield tmps
        for tmp in tmps:
            _fsync_tree(tmp)
        hook = _before_publish.get()
        extras = hook(dict(zip(dests, tmps))) if hook is not None else []
        created += [tmp for tmp, _ in extras]
        _publish(extras, list(zip(tmps[1:], dests[1:])), (tmps[0], dests[0]), force)
    except BaseException:
        for tmp in created:
            _remove(tmp)
        raise


def _publish(extras: list[tuple[Path, Path]], rest: list[tuple[Path, Path]], first: tuple[Path, Path],
             force: bool) -> None:
    """Publish ``extras`` (the manifest), the other parts, then ``first``; an old ``first`` is moved
    aside before anything else so that no reader sees old and new parts together."""
    tmp_first, dest_first = first
    aside = None
    if _exists(dest_first):
        if not force:
            raise OutputExistsError(f"{dest_first} appeared while this output was being written; it was left as it is")
        aside = _hidden(dest_first, "old")
        os.replace(dest_first, aside)
    placed = 0  # parts of the new artifact already visible
    try:
        for tmp, dest in extras:
            _place(tmp, dest, force)
        for tmp, dest in rest:
            _place(tmp, dest, force)
            placed += 1
        _place(tmp_first, dest_first, force)
    except BaseException:
        if aside is not None and placed == 0 and not _exists(dest_first):
            os.replace(aside, dest_first)  # nothing new is visible yet: the old artifact stays as it was
            aside = None
        raise  # else the set stays unreadable (no first part), never a mix of old and new
    finally:
        if aside is not None:
            _remove(aside)


def _place(tmp: Path, dest: Path, force: bool) -> None:
    if force and _exists(dest):
        old = _hidden(dest, "old")
        os.replace(dest, old)
        os.replace(tmp, dest)
        _remove(old)
        return
    if tmp.is_dir():
        try:
            os.rename(tmp, dest)  # fails onto a non-empty folder or a file
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise OutputExistsError(f"{dest} appeared while this output was being written; it was left as it is") from exc
            raise
        return
    try:
        os.link(tmp, dest)  # fails if the name exists: never clobbers another job's output
    except FileExistsError as exc:
        raise OutputExistsError(f"{dest} appeared while this output was being written; it was left as it is") from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if _exists(dest):  # a file system without hard links: check, then rename
            raise OutputExistsError(f"{dest} appeared while this output was being written; it was left as it is") from exc
        os.replace(tmp, dest)
        return
    tmp.unlink()


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for sub in path.rglob("*"):
            if sub.is_file():
                _fsync(sub)
    elif path.exists():
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
