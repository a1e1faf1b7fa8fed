"""What every format module declares: one ``Format`` record (the registry in ``formats/__init__``
lists them), and the few helpers the records share.

A record says how its format is recognised on disk (from files and magic bytes, never a name),
how an artifact of it is opened and described, which files make one artifact (a folder's files,
a split GGUF's shards), which of them a runtime loads, and whether a path holds one of ours
(what ``--force`` may replace). Imports: base modules only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..reading import read_json


def head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a regular file, or b"" (a folder, a FIFO, a missing file: a FIFO
    would block an ``open``)."""
    try:
        if not Path(path).is_file():
            return b""
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def folder_files(folder: Path) -> dict[str, Path]:
    """Every regular file of a folder artifact, keyed by its path inside it (hidden files left out:
    they are partial outputs and caches, never part of an artifact)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def folder_of(path: Path) -> Path:
    """The folder a path names: itself, or the folder of a file in it (an adapter's files)."""
    p = Path(path)
    return p.parent if p.is_file() else p


def json_folder_with(path: Path, config_file: str, data_file: str, key: str) -> bool:
    """Does the folder of ``path`` hold ``data_file`` and a JSON ``config_file`` with ``key``?
    (how an adapter format is recognised: its config's own key, never a name)."""
    folder = folder_of(path)
    if not (folder / config_file).is_file() or not (folder / data_file).is_file():
        return False
    try:
        return key in read_json(folder / config_file)
    except (InputError, TypeError):
        return False


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or an ``InputError`` naming the file."""
    try:
        value = read_json(path)
    except InputError as exc:
        raise InputError(f"cannot read the {what}: {exc.bare_message}", file=path) from exc
    if not isinstance(value, dict):
        raise InputError(f"the {what} must be a JSON object", file=path)
    return value


def single_file(path: Path) -> dict[str, Path]:
    return {Path(path).name: Path(path)}


@dataclass(frozen=True)
class Format:
    """One on-disk format: the registry's record of it."""

    name: str  # the kind ``inspect`` and ``verify`` report ("original", "mlx", "gguf", ...)
    summary: str  # one line for help texts
    recognises: Callable[[Path], bool]  # from files and magic bytes
    open: Callable[[Path], object] | None = None  # -> CanonicalModel (None: not a model, e.g. a reference cache)
    describe: Callable[..., dict] | None = None  # (path, scan=...) -> inspect's dict
    files: Callable[[Path], dict[str, Path]] | None = None  # the files of one artifact (default: folder or file)
    weights: Callable[[Path], list[Path]] | None = None  # the files a runtime loads (default: all its files)
    ours: Callable[[Path], bool] | None = None  # a path --force may replace (default: ``recognises``)
    adapter: Callable[..., object] | None = None  # (path, base config) -> ``lora.Adapter``: an adapter format

    def artifact_files(self, path: Path) -> dict[str, Path]:
        if self.files is not None:
            return self.files(Path(path))
        return folder_files(path) if Path(path).is_dir() else single_file(path)

    def weight_files(self, path: Path) -> list[Path]:
        if self.weights is not None:
            return self.weights(Path(path))
        return list(self.artifact_files(path).values())

    def is_ours(self, path: Path) -> bool:
        return (self.ours or self.recognises)(Path(path))
