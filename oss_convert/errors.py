"""Exceptions shared by every module.

Every error about bad input names the file and, where there is one, the tensor, and says
what was expected. The CLI maps ``InputError`` to exit code 2.
"""

from __future__ import annotations

from pathlib import Path


class OssConvertError(Exception):
    """Base class for errors the CLI reports without a traceback."""


class InputError(OssConvertError):
    """The input is missing, malformed, truncated or inconsistent."""

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = []
        if file is not None:
            where.append(f"file {self.file}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message)
        self.bare_message = message


class OutputExistsError(OssConvertError):
    """The destination exists and --force was not given."""


class UsageError(OssConvertError):
    """The call itself is wrong: an unknown target, an option the target does not take."""


def printable(text: str) -> str:
    """``text`` safe for a terminal or a log line: control characters (ANSI escapes, newlines,
    carriage returns, bidi and other format controls) from a file's names or metadata shown as
    escapes, so a file cannot drive the user's terminal or split a message over lines."""
    import unicodedata

    return "".join(ch if unicodedata.category(ch) not in ("Cc", "Cf") else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)
