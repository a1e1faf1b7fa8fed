"""Reading a stranger's files (base layer): only regular files, sizes bounded before they cost
memory, JSON parsed with the path in every message.

A FIFO named like a shard, a ``model.bin`` or a ``config.json`` would block an ``open`` forever;
a 1 GB ``config.json`` or a 12-million-token ``tokenizer.json`` would be read whole before
anything checked it. Every format reads its files through here.
Imports: ``errors``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

# The largest side file a real gpt-oss repo holds is tokenizer.json (27 MB); a config is a few kB.
MAX_JSON_BYTES = 64 << 20
MAX_TEXT_BYTES = 16 << 20  # a chat template (the real one: 16.7 kB)


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; a FIFO, device or socket is refused
    before an ``open`` could block on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"cannot open: {exc.strerror}", file=path) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError("not a regular file (a FIFO, a device or a socket is never read)", file=path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes, refused above ``limit`` before it is read."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise InputError(f"is {size:,} bytes; no such file of a gpt-oss artifact exceeds {limit:,}", file=path)
        return fh.read(limit + 1)


def read_text(path: str | Path, limit: int = MAX_TEXT_BYTES) -> str:
    """A regular file as UTF-8 text, bounded; invalid UTF-8 is an ``InputError`` naming the file."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})", file=path) from exc


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES):
    """A JSON document from a regular file, bounded in size; nesting that exhausts the parser's
    recursion and ``NaN``/``Infinity`` (not JSON) are ``InputError``s naming the file."""
    text = read_text(path, limit)
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError as exc:  # nesting thousands deep: no gpt-oss file nests more than a few levels
        raise InputError("nests too deep to be a gpt-oss file", file=path) from exc
    except ValueError as exc:
        raise InputError(f"is not valid JSON: {exc}", file=path) from exc


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")
