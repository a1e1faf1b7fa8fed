"""Sizes as people write and read them (base module): ``--shard-size 5G`` in, "5.65 MB" out.

Input sizes are binary (``5G`` is 5 GiB, as ``--shard-size`` and ``--split-max-size`` have always
meant); shown sizes are decimal with three significant figures, as the Hub and ``hf`` show
file sizes. ``inspect`` and ``compare`` both print through ``format_size``.
"""

from __future__ import annotations

import re

from .errors import InputError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"5G"`` -> 5 GiB; plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"cannot read size {text!r}; write e.g. 5G, 500M or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(n: int) -> str:
    """``5_650_000`` -> "5.65 MB" (decimal units, three significant figures; bytes below 1 kB)."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 999.5 or unit == "TB":
            return f"{value:.3g} {unit}"
    raise AssertionError("unreachable")
