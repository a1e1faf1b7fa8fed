"""``convert ADAPTER --to gguf|mlx --base BASE``: a LoRA adapter into the form a runtime applies at
run time, unmerged (``llama-server --lora``, ``mlx_lm.load(..., adapter_path=...)``).

The base gives the names, shapes and config the adapter is checked against and placed on; none
of it is copied. The adapter's factors are exact in the output (float32, or the adapter's own
values where no scaling had to be folded in). The manifest beside the output records the
adapter's files and the base's config with their sha256.
Imports: support and base modules, ``formats``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .. import formats
from ..atomic import atomic_outputs
from ..errors import InputError, OutputExistsError
from ..formats.hf import open_source
from ..guard import refuse_unsafe_output
from ..hashing import file_sha256
from ..progress import SILENT, Progress
from ..provenance import file_digest, manifest_document, manifest_path

TARGETS = ("gguf", "mlx")


def convert_adapter(adapter_path: str | Path, target: str, output: str | Path, *, base: str | Path,
                    force: bool = False, manifest: bool = True, progress: Progress = SILENT) -> Path:
    """Write the adapter at ``adapter_path`` as a ``target`` adapter for ``base`` at ``output``."""
    if target not in TARGETS:
        raise InputError(f"an adapter converts to {' or '.join(TARGETS)} (a runtime adapter), not {target}; "
                         "to merge it into a model: convert BASE --adapter ADAPTER --to " + target, file=adapter_path)
    output = Path(output)
    if (output.exists() or output.is_symlink()) and not force:
        raise OutputExistsError(f"{output} exists; pass --force to replace it")
    with open_source(base) as src:
        lora = formats.read_adapter(adapter_path, src.config, lambda name, rows: src.f32_rows(name, rows))
        with contextlib.closing(lora):
            _write_checked(lora, src, target, output, force, manifest, progress)
    return output


def _write_checked(lora, src, target: str, output: Path, force: bool, manifest: bool, progress) -> None:
    """``convert_adapter`` once the adapter is read: refusals first, then the atomic write."""
    inputs = [Path(lora.path), *lora.files, src.path, src.config_path, *(f.path for f in src.files)]
    folder = target == "mlx"  # mlx-lm's adapter is a folder, its manifest inside it
    outputs = [output] if folder or not manifest else [output, manifest_path(output)]
    refuse_unsafe_output([output, manifest_path(output)], inputs, force=force)
    with progress.task(f"adapter to {target}", len(lora.pairs), "pairs") as advance:
        with atomic_outputs(outputs, force=force, is_dir=folder) as temps:
            written = _write(target, lora, src.config, temps[0], output.name)
            advance(len(lora.pairs))
            if manifest:
                where = manifest_path(temps[0]) if folder else temps[1]
                where.write_text(json.dumps(_manifest(lora, src, target, written), indent=2) + "\n")


def _write(target: str, lora, config, out: Path, name: str) -> dict[str, Path]:
    """The adapter's files at ``out`` (a GGUF file, or mlx-lm's folder), by their names in the output."""
    if target == "gguf":
        from ..formats import gguf_lora

        gguf_lora.write(lora, config, out)
        return {name: out}
    from ..formats import mlx_adapter

    return mlx_adapter.write(lora, config, out)


def _manifest(lora, src, target: str, written: dict[str, Path]) -> dict:
    """The adapter is the source; the base it was checked against is recorded beside it."""
    base = {"path": str(src.path), "config": {"file": src.config_path.name, "sha256": file_sha256(src.config_path)},
            "files": {f.path.name: file_digest(f.path) for f in src.files}}
    return manifest_document(target=f"{target}-adapter", options={"format": lora.format},
                             source_hashes={f.name: file_digest(f) for f in lora.files}, source_path=Path(lora.path),
                             outputs=written, extra={"base": base})
