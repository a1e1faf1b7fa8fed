"""Provenance manifests: what made an artifact, from what, and the hashes to re-check it.

Every ``convert`` writes a manifest beside its output: ``OUT/oss-convert-manifest.json`` for a
folder artifact, ``OUT.manifest.json`` for a single-file artifact. Schema (version 1)::

    {
      "schema": "oss-convert-manifest/1",
      "tool": {"name": "oss-convert", "version": "0.1.0"},
      "target": "gguf",                    # convert --to
      "options": {"outtype": "q8_0"},      # options given on the command line
      "source": {"path": "...", "files": {"model.safetensors": {"size": N, "sha256": "..."}}},
      "outputs": {"model.gguf": {"size": N, "sha256": "..."}}   # relative to the manifest's folder
    }

The manifest exists before the artifact becomes visible: ``manifest_hook`` is handed to
``atomic.publishing`` and writes it from the temporary files, under their final names, just
before they are published (inside the folder, or beside the file under a temporary name that
is published first). ``check_manifest`` recomputes the output hashes (no model run) and lists
every difference.
File hashing reads 8 MiB at a time (``hashing.file_sha256``), so memory stays flat for 65 GB artifacts;
an output written through ``hashing.HashingWriter`` is not read back.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Callable

from . import __version__, formats, hashing
from .errors import InputError

SCHEMA = "oss-convert-manifest/1"
FOLDER_MANIFEST = "oss-convert-manifest.json"


def manifest_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    return artifact / FOLDER_MANIFEST if artifact.is_dir() else artifact.with_name(artifact.name + ".manifest.json")


def file_digest(path: Path, progress: Callable[[int], None] | None = None) -> dict:
    stat = Path(path).stat()
    known = hashing.written(path)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return {"size": stat.st_size, "sha256": known[2]}  # hashed while it was written
    return {"size": stat.st_size, "sha256": hashing.file_sha256(path, progress)}


NOT_HASHED = (FOLDER_MANIFEST, "README.md")  # the manifest itself, and the model card written after it


def folder_files(folder: Path) -> dict[str, Path]:
    """The files of a folder artifact, keyed by their path inside it (hidden files, the manifest
    and the model card left out)."""
    return {name: p for name, p in formats.base.folder_files(folder).items() if name not in NOT_HASHED}


def artifact_files(artifact: Path) -> dict[str, Path]:
    """The files that make up an artifact (the registry says which: a split GGUF is named by its
    first shard and every shard belongs to it), keyed relative to the manifest's folder."""
    return {name: p for name, p in formats.artifact_files(artifact).items() if name not in NOT_HASHED}


def manifest_document(*, target: str, options: dict, source_hashes: dict[str, dict], source_path: Path,
                      outputs: dict[str, Path], extra: dict | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "tool": {"name": "oss-convert", "version": __version__},
        "target": target,
        "options": {k: str(v) for k, v in sorted(options.items())},
        "source": {"path": str(source_path), "files": dict(sorted(source_hashes.items()))},
        "outputs": {name: file_digest(p) for name, p in outputs.items()},
        **(extra or {}),
    }


def manifest_hook(*, target: str, options: dict, source_path: Path, source_hashes: Callable[[], dict],
                  extra: Callable[[], dict] | None = None):
    """An ``atomic.publishing`` hook that writes the manifest of the outputs about to be published.

    ``source_hashes`` is called then (the source is hashed while the conversion runs); ``extra``
    gives more top-level sections (a merged adapter's identity and what it changed)."""
    def hook(published: dict[Path, Path]) -> list[tuple[Path, Path]]:
        (first, first_tmp), *_ = published.items()
        if first_tmp.is_dir():  # OUT/oss-convert-manifest.json, written inside the folder before it is renamed
            doc = manifest_document(target=target, options=options, source_hashes=source_hashes(),
                                    source_path=source_path, outputs=folder_files(first_tmp),
                                    extra=extra() if extra else None)
            (first_tmp / FOLDER_MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
            return []
        doc = manifest_document(target=target, options=options, source_hashes=source_hashes(), source_path=source_path,
                                outputs={final.name: tmp for final, tmp in published.items()},
                                extra=extra() if extra else None)
        final = first.with_name(first.name + ".manifest.json")
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        return [(tmp, final)]

    return hook


def read_manifest(artifact: Path) -> dict | None:
    """The manifest beside ``artifact`` (``None``: there is none), read as a stranger's file: a
    bounded JSON object of our schema whose ``outputs`` are ``{name: {"size": int, "sha256": str}}``."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    manifest = formats.base.read_json_object(path, "manifest")
    if manifest.get("schema") != SCHEMA:
        raise InputError(f"unknown manifest schema {manifest.get('schema')!r}", file=path)
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not all(
            isinstance(d, dict) and isinstance(d.get("size"), int) and isinstance(d.get("sha256"), str)
            for d in outputs.values()):
        raise InputError('manifest is not valid: "outputs" must map each file to its size and sha256', file=path)
    return manifest


def check_manifest(artifact: Path) -> list[str]:
    """Re-hash the artifact's files; return the differences from its manifest (empty: intact)."""
    manifest = read_manifest(artifact)
    if manifest is None:
        raise InputError("no provenance manifest beside this artifact (was it made by oss-convert?)",
                         file=manifest_path(artifact))
    recorded = manifest["outputs"]
    present = artifact_files(artifact)
    problems = [f"{name}: missing" for name in recorded if name not in present]
    problems += [f"{name}: not in the manifest" for name in present if name not in recorded]
    for name, want in recorded.items():
        if name not in present:
            continue
        if present[name].stat().st_size != want["size"]:
            problems.append(f"{name}: size {present[name].stat().st_size}, manifest says {want['size']}")
        elif file_digest(present[name])["sha256"] != want["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems
