"""The targets, declared once, and the one ``convert`` job that every caller uses.

``TARGETS`` is the registry: each target's name (``--to``), what it writes, the options it
takes, its recipes and whether it accepts dense BF16 experts. The command line builds its
``--to``, ``--outtype`` and ``--recipe`` choices from it; ``convert`` refuses an option that
does not apply to the target (``UsageError``, exit 2) in one place.

``convert(source, target, output, **options)`` is the whole job, for the CLI, the benches and
library callers alike: open the source, refuse dense experts where the target needs MXFP4,
run the target's plan (``converters/<target>.py``, imported on demand; each exposes
``convert(src, out, *, force, progress, **its options)``) with the source check beside it (the
scan for NaN/Inf and scale 255, the source hashes: ``source_check``), report a full disk as an
error that says nothing was left behind, and write the provenance manifest.
The output is checked before anything is written (``guard``): it must not be, contain or be
read as any input, and ``--force`` replaces only an output of ours.
Imports: support and base modules, ``formats``; never a target module by name.
"""

from __future__ import annotations

import errno
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import formats, quantize
from ..adapters import REPORT_KEY, MergedSource
from ..tokens import templates as chat
from ..atomic import publishing
from ..errors import InputError, OssConvertError, OutputExistsError, UsageError
from ..formats.gguf import OUTTYPES
from ..formats.mlx import AFFINE_RECIPES
from ..guard import refuse_inside, refuse_unsafe_output
from ..model import Source
from ..progress import SILENT, Progress
from ..provenance import manifest_hook, manifest_path
from ..source_check import SourceCheck
from ..tokens.files import TOKENIZER_FILES, check_side_files


@dataclass(frozen=True)
class Option:
    """A conversion option: its CLI flag and help."""

    flag: str
    help: str


OPTIONS = {
    "outtype": Option("--outtype", "GGUF: type of the non-expert weights (experts stay MXFP4)."),
    "recipe": Option("--recipe", "How to quantize: see the recipes of each target in the README."),
    "split_max_size": Option("--split-max-size", "GGUF: split into shards of at most this size (e.g. 5G)."),
    "shard_size": Option("--shard-size", "Max size of one safetensors shard (e.g. 5G)."),
    "vocab": Option("--vocab", "Metal: o200k_base.tiktoken vocabulary when there is no tokenizer.json."),
    "chat_template": Option("--chat-template", "The chat template to embed: keep (the source's own, the default), "
                                               "harmony (oss-convert's, renders as openai-harmony does) or a .jinja file."),
}


@dataclass(frozen=True)
class Target:
    """One ``--to`` value: what it writes and what it accepts."""

    name: str
    writes: str
    options: tuple[str, ...]
    recipes: dict[str, str] = field(default_factory=dict)  # recipe -> what it does
    outtypes: tuple[str, ...] = ()
    dense_experts: bool = False  # accepts a source whose experts are dense BF16
    file_suffix: str | None = None  # a single-file format: ``-o NAME<suffix>`` writes that file
    full_vocabulary: bool = False  # stores the full o200k vocabulary, so the source must have it
    writes_dense_experts: bool = False  # stores experts as BF16: a merged adapter is never rounded to MXFP4

    @property
    def module(self) -> str:
        return self.name.replace("-", "_")


TARGETS = {t.name: t for t in (
    Target("mlx", "a folder mlx_lm.load opens (MXFP4 experts)", ("shard_size", "recipe", "chat_template"),
           recipes={name: f"MXFP4 experts, other linear layers affine {bits}-bit (mlx_lm.convert -q --q-bits {bits})"
                    for name, bits in AFFINE_RECIPES.items()}),
    Target("metal", "the gpt-oss Metal model.bin", ("vocab",), file_suffix=".bin", full_vocabulary=True),
    Target("gguf", "a GGUF file llama.cpp runs (MXFP4 experts)", ("outtype", "split_max_size", "chat_template"),
           outtypes=OUTTYPES, file_suffix=".gguf"),
    Target("hf", "the Hub's MXFP4 transformers root (transformers, vLLM, llama.cpp's and mlx-lm's converters)",
           ("recipe", "shard_size", "chat_template"),
           recipes={name: f"MXFP4 scales by {name} rounding (from dense BF16 experts)" for name in quantize.RECIPES},
           dense_experts=True),
    Target("hf-bf16", "a transformers folder, every weight BF16", ("shard_size", "chat_template"), dense_experts=True,
           writes_dense_experts=True),
    Target("original", "OpenAI's original/ layout (experts encoded to MXFP4 from dense BF16)",
           ("recipe", "shard_size", "chat_template"), recipes={name: f"MXFP4 scales by {name} rounding (from dense BF16 experts)"
                                              for name in quantize.RECIPES}, dense_experts=True),
)}
ALL_RECIPES = tuple(dict.fromkeys(r for t in TARGETS.values() for r in t.recipes))
ALL_OUTTYPES = tuple(dict.fromkeys(o for t in TARGETS.values() for o in t.outtypes))


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown target {name!r}; choose one of {list(TARGETS)}") from None


def check_options(spec: Target, options: dict) -> dict:
    """The options given (``None`` means not given), refused where they do not apply to ``spec``."""
    given = {k: v for k, v in options.items() if v is not None}
    for name, value in given.items():
        if name not in OPTIONS:
            raise UsageError(f"unknown option {name!r}")
        if name not in spec.options:
            takes = ", ".join(OPTIONS[o].flag for o in spec.options) or "no options"
            raise UsageError(f"{OPTIONS[name].flag} does not apply to --to {spec.name} (it takes {takes})")
    if "recipe" in given and given["recipe"] not in spec.recipes:
        raise UsageError(f"--recipe {given['recipe']} does not apply to --to {spec.name}; "
                         f"choose one of {list(spec.recipes)}")
    if "outtype" in given and given["outtype"] not in spec.outtypes:
        raise UsageError(f"--outtype {given['outtype']} is not one of {list(spec.outtypes)}")
    if given.get("chat_template") == "keep":
        del given["chat_template"]  # the default: the source's own template
    return given


def converter(name: str) -> Callable:
    """The target module's own ``convert(src, out, *, force, progress, **options)``."""
    return importlib.import_module(f".{target(name).module}", __name__).convert


# --------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class Converted:
    output: Path  # what to hand the runtime: the folder, the file, or a split's first shard
    manifest: Path | None


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


def convert(source: str | Path, target_name: str, output: str | Path, *, force: bool = False, scan: bool = True,
            manifest: bool = True, progress: Progress = SILENT, adapter: str | Path | None = None,
            merge_workers: bool | None = None, **options) -> Converted:
    """Convert ``source`` (an ``original/`` checkpoint, its repo, a cached repo id, or a
    transformers-layout folder) to ``target_name`` at ``output``; with ``adapter`` (a PEFT or
    mlx-lm LoRA adapter) merged in on the way (``adapters.MergedSource``; ``merge_workers``:
    re-encode on worker processes or not, ``None`` where ``encode_workers.available()``)."""
    from ..formats.hf import open_source

    spec = target(target_name)
    options = check_options(spec, options)
    if adapter is not None and "recipe" in spec.options and "search" in spec.recipes:
        options.setdefault("recipe", "search")  # a merge re-encodes experts: the better recipe by default
    output = Path(output)
    if (output.exists() or output.is_symlink()) and not force:  # before the scan: a refusal should not cost a read
        raise OutputExistsError(f"{output} exists; pass --force to replace it")
    with open_source(source) as src:
        lora = formats.read_adapter(adapter, src.config, lambda name, rows: src.f32_rows(name, rows)) \
            if adapter is not None else None
        try:
            inputs = source_inputs(src, options) + (adapter_inputs(lora) if lora is not None else [])
            published = [output, manifest_path(output)] if manifest else [output]
            refuse_unsafe_output(published, inputs, force=force, shard_folders=[src.path])
            # inside the shard folder (or the adapter's): a file there becomes part of that input. The
            # repo root may hold outputs, as the Hub repos hold metal/ beside original/.
            refuse_inside(published, [src.path] + ([Path(lora.path)] if lora is not None else []))
            check_side_files(Path(src.repo_root))  # what the target copies or hands to gguf-py, before a byte is written
            if lora is not None:
                src = MergedSource(src, lora, recipe=options.get("recipe") if options.get("recipe") in quantize.RECIPES
                                   else "search", dense_experts=spec.writes_dense_experts, workers=merge_workers,
                                   output=output)
            return _convert_opened(src, spec, source, output, force, progress, scan, manifest, options, adapter)
        finally:
            if isinstance(src, MergedSource):
                src.stop()  # the merge's worker processes and adapter hash, on success, refusal or ^C alike
            if lora is not None:
                lora.close()


def _convert_opened(src: Source, spec: Target, source, output: Path, force: bool, progress: Progress, scan: bool,
                    manifest: bool, options: dict, adapter) -> Converted:
    """``convert`` once the source (with the adapter merged in) is open and the output's place checked."""
    if src.experts == "bf16" and not spec.dense_experts:
        raise InputError(
            f"the experts are dense BF16; encode them to MXFP4 first: oss-convert convert {source} "
            f"--to original -o OUT [--recipe ocp|search], then convert OUT --to {spec.name}", file=src.path)
    # The target is given the template's text, read and parsed before any byte is written;
    # the manifest records the choice.
    run_options = {**options, "chat_template": chat.resolve(options["chat_template"])} \
        if "chat_template" in options else options
    try:
        recorded = {**options, "adapter": str(adapter)} if adapter is not None else options
        return _convert_checked(src, spec, output, force, progress, scan, manifest, run_options, recorded)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        # A full disk is not a bug: say where, without a traceback (the partial output is gone).
        raise OssConvertError(f"cannot write {output}: {exc.strerror}; nothing was left behind") from exc


def adapter_inputs(adapter) -> list[Path]:
    """The adapter's folder and files: never written, never an output."""
    return [Path(adapter.path), *adapter.files]


def source_inputs(src: Source, options: dict) -> list[Path]:
    """Every path the job reads: the shards, every file beside them, the folder, the repo root
    and its tokenizer and template files, a ``--vocab`` file."""
    paths = [src.path, Path(src.repo_root), src.config_path, *(f.path for f in src.files)]
    paths += sorted(p for p in Path(src.path).iterdir() if p.is_file())
    paths += [Path(src.repo_root) / name for name in TOKENIZER_FILES]
    for name in ("vocab", "chat_template"):
        if options.get(name) not in (None, *chat.TEMPLATE_CHOICES):
            paths.append(Path(options[name]))
    return paths


def _convert_checked(src: Source, spec: Target, output: Path, force: bool, progress: Progress, scan: bool,
                     manifest: bool, options: dict, recorded: dict) -> Converted:
    """Run the target's plan with the source check (scan, source hashes) beside it; publish only
    once both are complete, with the manifest when asked."""
    run = converter(spec.name)
    hashed = [f.path for f in src.files] + [src.config_path] if manifest else []
    with SourceCheck(src, scan=scan, files=hashed) as check:
        def source_hashes() -> dict:
            return check.result(progress)  # raises the scan's error: nothing is published

        def checked_only(published: dict) -> list:
            source_hashes()
            return []

        # The manifest is written from the finished temporary files, before they are published.
        merged = src if isinstance(src, MergedSource) else None
        hook = manifest_hook(target=spec.name, options=recorded, source_path=src.path, source_hashes=source_hashes,
                             extra=(lambda: {REPORT_KEY: merged.report()}) if merged else None) \
            if manifest else checked_only
        if merged is not None:
            hook = _with_merge_report(hook, merged)
        with publishing(hook):
            result = Path(run(src, output, force=force, progress=check.watch(progress), **options))
        if merged is not None:
            progress.note(merged.summary_line())
    return Converted(result, manifest_path(result) if manifest else None)


def _with_merge_report(hook: Callable, merged: MergedSource) -> Callable:
    """Before ``hook`` (the manifest): a folder output gets the merge's report in its
    ``quantization.json`` (beside what the expert encoder wrote there)."""
    def with_report(published: dict) -> list:
        (_, first_tmp), *_ = published.items()
        if first_tmp.is_dir():
            path = first_tmp / quantize.REPORT_FILE
            report = json.loads(path.read_text()) if path.is_file() else {}
            report[REPORT_KEY] = merged.report()
            path.write_text(json.dumps(report, indent=2) + "\n")
        return hook(published)

    return with_report
