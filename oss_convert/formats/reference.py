"""The reference cache ``oss-convert reference`` writes: a numpy ``.npz`` (a zip of ``.npy``
arrays) plus one JSON string of metadata, ``meta``.

Keys (all arrays; see ``verify/reference.py`` for what they mean): ``tokens`` int32 [C, ctx],
``top_ids`` int32 [N, k], ``top_logprobs`` float64 [N, k], ``logsumexp`` float64 [N],
``target_logprob`` float64 [N], ``cut_rows`` int64 [m], ``cut_logsumexp`` float64 [m, N],
``meta`` (``format``: ``oss-convert-reference/1``). Written stored, not compressed (log-probs in
float64 hardly compress, and zlib took 4.4 s of a 20b reference's 22 on a GPU); read without pickles.
It is not a model: the registry lists it so that ``--force`` knows a cache of ours.
Imports: base modules, ``formats.base``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import InputError
from ..reading import open_regular
from .base import Format, head

SCHEMA = "oss-convert-reference/1"
MAGIC = b"PK\x03\x04"  # a zip's first local file header
ARRAYS = ("tokens", "top_ids", "top_logprobs", "logsumexp", "target_logprob", "cut_rows", "cut_logsumexp")


def write(fh: BinaryIO, arrays: dict[str, np.ndarray], meta: dict) -> None:
    np.savez(fh, **arrays, meta=np.array(json.dumps({"format": SCHEMA, **meta}, sort_keys=True)))


# A reference of the 20b at --ctx 16384 over a long text is tens of MB; a compressed member
# claiming more than this would inflate to memory for nothing.
MAX_REFERENCE_BYTES = 4 << 30


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every array and the metadata; an ``InputError`` naming the file for anything else (not a
    zip, members inflating beyond ``MAX_REFERENCE_BYTES``, missing arrays, another format)."""
    with open_regular(path) as fh:
        try:
            with zipfile.ZipFile(fh) as archive:
                inflated = sum(member.file_size for member in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise InputError(f"cannot read reference cache: not a complete .npz ({exc})", file=path) from exc
        if inflated > MAX_REFERENCE_BYTES:
            raise InputError(f"cannot read reference cache: its arrays inflate to {inflated:,} bytes, more than any "
                             f"reference ({MAX_REFERENCE_BYTES:,})", file=path)
        fh.seek(0)
        try:
            with np.load(fh, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if not isinstance(meta, dict) or meta.get("format") != SCHEMA:
                    found = meta.get("format") if isinstance(meta, dict) else None
                    raise InputError(f"not an oss-convert reference (format {found!r}, want {SCHEMA!r})", file=path)
                return {name: data[name] for name in ARRAYS}, meta
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"cannot read reference cache: {exc}", file=path) from exc


FORMAT = Format("reference", "a reference cache (.npz) of oss-convert reference",
                lambda path: Path(path).suffix == ".npz" and head(path, len(MAGIC)) == MAGIC)
