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
