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

``check_manifest`` recomputes the output hashes (no model run) and lists every difference.
File hashing streams in 8 MiB reads, so memory stays flat for 65 GB artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import InputError

SCHEMA = "oss-convert-manifest/1"
FOLDER_MANIFEST = "oss-convert-manifest.json"
READ_BYTES = 8 << 20
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # llama.cpp's split names


def manifest_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    return artifact / FOLDER_MANIFEST if artifact.is_dir() else artifact.with_name(artifact.name + ".manifest.json")


def file_digest(path: Path, progress: Callable[[int], None] | None = None) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_BYTES):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def artifact_files(artifact: Path) -> dict[str, Path]:
    """The files that make up an artifact, keyed relative to the manifest's folder."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return {p.relative_to(artifact).as_posix(): p for p in sorted(artifact.rglob("*"))
                if p.is_file() and p.name != FOLDER_MANIFEST and not p.name.startswith(".")}
    split = _SPLIT.match(artifact.name)
    if split:  # a split GGUF is named by its first shard; every shard is part of the artifact
        count = int(split["count"])
        shards = [artifact.with_name(f"{split['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
        return {p.name: p for p in shards if p.is_file()}
    return {artifact.name: artifact}


def write_manifest(artifact: Path, *, target: str, options: dict, source_hashes: dict[str, dict],
                   source_path: Path, progress: Callable[[int], None] | None = None) -> Path:
    """Hash the artifact's files and write its manifest (atomically). ``source_hashes`` maps
    source file names to ``file_digest`` results."""
    manifest = {
        "schema": SCHEMA,
        "tool": {"name": "oss-convert", "version": __version__},
        "target": target,
        "options": {k: str(v) for k, v in sorted(options.items())},
        "source": {"path": str(source_path),
                   "files": dict(sorted(source_hashes.items()))},
        "outputs": {name: file_digest(p, progress) for name, p in artifact_files(artifact).items()},
    }
    path = manifest_path(artifact)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def check_manifest(artifact: Path) -> list[str]:
    """Re-hash the artifact's files; return the differences from its manifest (empty: intact)."""
    path = manifest_path(artifact)
    if not path.is_file():
        raise InputError("no provenance manifest beside this artifact (was it made by oss-convert?)", file=path)
    try:
        manifest = json.loads(path.read_text())
        recorded = manifest["outputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"manifest is not valid: {exc}", file=path) from exc
    if manifest.get("schema") != SCHEMA:
        raise InputError(f"unknown manifest schema {manifest.get('schema')!r}", file=path)
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
