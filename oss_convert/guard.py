"""The inputs are never damaged, whatever the flags (support layer).

Every command that writes calls ``refuse_unsafe_output`` before it writes anything:

- the output (and each path published with it: a manifest, a split's shards) is compared with
  every path the job reads (source shards, the folder holding them, the repo root, tokenizer
  and template files, a ``--vocab`` file, a reference, a text or token file), with symlinks
  followed (a Hugging Face cache snapshot's files are links into ``blobs/``), ``..`` and
  trailing slashes normalised, and existing paths also compared by inode (a case-insensitive
  file system spells one folder several ways). It is refused when it *is* an input, *contains*
  one (replacing a folder removes what is inside), or is a ``*.safetensors`` name directly in a
  folder whose shards the reader globs (the next read would pick it up);
- ``--force`` replaces an existing output only when it is one of ours: a folder that is empty,
  carries our manifest or holds a format this tool writes, or a file of such a format (the
  registry, ``formats.is_ours``, says which). Anything else is a stranger's and stays.

Both refusals are ``InputError`` (exit 2) naming the paths.
Imports: base modules, ``formats``, ``provenance``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from . import formats
from .errors import InputError, OutputExistsError
from .provenance import FOLDER_MANIFEST, artifact_files, manifest_path


def real(path: str | Path) -> Path:
    """``path`` with every symlink followed and ``..`` resolved (it need not exist)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _same(a: Path, b: Path) -> bool:
    """One place on disk: the same resolved path, or (where both exist) the same inode."""
    if real(a) == real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _above(path: Path) -> list[Path]:
    """Every folder above ``path`` as it is spelled (its links are followed by ``_same``)."""
    return list(Path(path).parents)


def input_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Each input as given (absolute) and with its links followed: both must stay untouched."""
    out: list[Path] = []
    for p in paths:
        if p is None:
            continue
        for q in (Path(os.path.abspath(p)), real(p)):
            if q not in out:
                out.append(q)
    return out


def refuse_overlap(outputs: Iterable[str | Path], inputs: Iterable[str | Path],
                   shard_folders: Iterable[str | Path] = ()) -> None:
    """Refuse an output that is, contains, or would be read as one of ``inputs``."""
    inputs = input_paths(inputs)
    folders = [real(f) for f in shard_folders]
    for given in outputs:
        out = real(given)
        for inp in inputs:
            if _same(out, inp):
                raise InputError(f"the output {given} is the input {inp}; nothing was written (--force never "
                                 "replaces an input)", file=given)
            if any(_same(out, above) for above in _above(inp)):
                raise InputError(f"the output {given} contains the input {inp}: replacing it would remove the input; "
                                 "nothing was written (--force never replaces an input)", file=given)
        if out.name.endswith(".safetensors") and any(_same(out.parent, f) for f in folders):
            raise InputError(f"the output {given} would be read as a shard of the input in {out.parent}; "
                             "choose another name or folder", file=given)


def refuse_stranger(output: str | Path, force: bool) -> None:
    """With ``--force``, replace only an output that is ours (see the module docstring)."""
    path = Path(output)
    if not force or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()) or (path / FOLDER_MANIFEST).is_file() or formats.is_ours(path):
            return
        raise InputError(f"{path} is a folder that oss-convert did not write (no manifest of ours, not a format we "
                         "write, not empty); --force only replaces our own outputs: remove it yourself or choose "
                         "another output", file=path)
    if path.is_file() and formats.is_ours(path):
        return
    raise InputError(f"{path} is not an artifact oss-convert writes (not GGUF, a Metal model.bin or a reference "
                     ".npz); --force only replaces our own outputs: remove it yourself or choose another output",
                     file=path)


def artifact_inputs(path: str | Path | None) -> list[Path]:
    """Every path an artifact given by ``path`` consists of: the path, and for a folder its files
    (an ``original/`` repo: its ``original/`` folder too); for a split GGUF every shard. ``None``
    (an optional input not given): none."""
    if path is None:
        return []
    p = Path(path)
    if p.is_dir():
        return [p, *sorted(q for q in p.rglob("*") if q.is_file() or q.is_dir())]
    if p.is_file():
        return [p, *artifact_files(p).values(), manifest_path(p)]  # its provenance is part of it
    return [p]


def refuse_unsafe_output(outputs: Iterable[str | Path], inputs: Iterable[str | Path], *, force: bool,
                         shard_folders: Iterable[str | Path] = ()) -> None:
    """Both rules, for every path a command is about to publish (the first is the artifact)."""
    outputs = [Path(o) for o in outputs]
    refuse_overlap(outputs, inputs, shard_folders)
    if outputs:
        refuse_stranger(outputs[0], force)


def refuse_inside(outputs: Iterable[str | Path], folders: Iterable[str | Path]) -> None:
    """Refuse an output inside one of the input ``folders`` (at any depth): a file there becomes
    part of that artifact (its reader may pick it up, its manifest no longer matches, a Hugging
    Face cache snapshot holds what nobody downloaded)."""
    folders = [Path(f) for f in folders]
    for out in outputs:
        inside = next((f for f in folders if any(_same(above, f) for above in _above(Path(os.path.abspath(out))))), None)
        if inside is not None:
            raise InputError(f"the output {out} is inside the input folder {inside}: a file there becomes part of that "
                             "artifact (its reader may pick it up, its manifest no longer matches); write it elsewhere",
                             file=out)


def refuse_report_outputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path], *, force: bool,
                          appended: Iterable[str | Path | None] = ()) -> None:
    """``verify``'s and ``compare``'s reports (JSON, CSV, plot) held to the artifacts' rules: never
    an input, never inside an input's folder (a file there becomes part of that artifact: its
    reader may pick it up, its manifest no longer matches), and an existing file replaced only
    with ``--force``. ``appended`` files (a job summary) are placed by the same rules but may exist."""
    written = [Path(o) for o in outputs if o is not None and str(o) != "-"]
    extended = [Path(o) for o in appended if o is not None and str(o) != "-"]
    folders = [p for p in input_paths(inputs) if p.is_dir()]
    refuse_overlap(written + extended, inputs, shard_folders=folders)
    refuse_inside(written + extended, folders)
    for out in written:
        if (out.exists() or out.is_symlink()) and not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it")
