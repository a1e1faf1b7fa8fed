"""``oss-convert``: entry point and the commands that only route to library code.

Exit codes: 0 success, 1 a verification failed, 2 bad input or usage (the message names the
file and tensor), 130 interrupted. Messages go to stderr; ``--json`` output to stdout.
"""

from __future__ import annotations

import errno
import json
import signal
import sys
from pathlib import Path

import click
from tqdm import tqdm

from .. import __version__, artifacts, synth
from ..errors import OssConvertError

EXIT_FAIL = 1
EXIT_ERROR = 2


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A byte-counting tqdm bar on stderr; returns (bar, update) where update(nbytes) advances it."""
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
               file=sys.stderr, dynamic_ncols=True)
    return bar, bar.update


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oss-convert")
def cli() -> None:
    """Convert, quantize and verify OpenAI gpt-oss checkpoints."""


@cli.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(sorted(synth.PRESETS)), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=int, default=None,
              help="Override the preset's layer count (e.g. a 120b-shaped model with 4 layers for benchmarks).")
@click.option("--shards", type=int, default=1, show_default=True, help="Number of safetensors files.")
@click.option("--experts", type=click.Choice(["mxfp4", "bf16"]), default="mxfp4", show_default=True,
              help="bf16 writes dense experts, like a fine-tune before quantization.")
@click.option("--tokenizer/--no-tokenizer", default=True, show_default=True,
              help="Also write tokenizer files in OUT beside original/.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def synth_cmd(out: Path, preset: str, seed: int, layers: int | None, shards: int, experts: str, tokenizer: bool,
              force: bool, quiet: bool) -> None:
    """Write a synthetic checkpoint in the exact original/ layout to OUT/original/."""
    from ..formats.original import expected_tensors

    config = synth.preset_with(preset, **({"num_hidden_layers": layers} if layers else {}))
    total = sum(s.nbytes for s in expected_tensors(config, experts))
    bar, update = progress_bar(total, f"synth {preset}", not quiet)
    with bar:
        synth.generate(out, config, seed=seed, shards=shards, experts=experts, force=force, progress=update,
                       tokenizer=tokenizer)
    click.echo(str(out))


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts and CI.")
@click.option("--scan", is_flag=True, help="Also read every byte (NaN/Inf, invalid scales).")
def inspect_cmd(path: str, as_json: bool, scan: bool) -> None:
    """Describe and validate an artifact: original/, MLX folder, Metal model.bin or GGUF."""
    kind = artifacts.detect(path)
    module = artifacts._module(kind)
    info = {"kind": kind, **(module.describe(path, scan=scan) if scan else module.describe(path))}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{kind}: {info.get('path', path)}")
    for key, value in info.items():
        if key in ("kind", "path"):
            continue
        if isinstance(value, dict):
            click.echo(f"  {key}:")
            for k, v in value.items():
                click.echo(f"    {k}: {_human(v) if 'bytes' in key else v}")
        elif isinstance(value, list):
            click.echo(f"  {key}: {', '.join(map(str, value)) if value else '-'}")
        else:
            click.echo(f"  {key}: {_human(value) if key.endswith('bytes') else value}")
    if not info.get("valid", True):
        sys.exit(EXIT_FAIL)


def _human(n) -> str:
    if not isinstance(n, int):
        return str(n)
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.2f} {unit} ({n:,} B)"


@cli.command("convert")
@click.argument("source")
@click.option("--to", "target", required=True,
              type=click.Choice(["mlx", "metal", "gguf", "hf-bf16", "original"]),
              help="Output format.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Output folder or file.")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--outtype", type=click.Choice(["bf16", "f16", "q8_0"]), default=None,
              help="GGUF: type of the non-expert weights (experts stay MXFP4).")
@click.option("--recipe", default=None,
              help="mlx: mxfp4-q8 | mxfp4-q4 (affine non-expert weights); original: ocp | search "
                   "(MXFP4 expert scales when the source has BF16 experts). See README.")
@click.option("--split-max-size", default=None, help="GGUF: split into shards of at most this size (e.g. 5G).")
@click.option("--shard-size", default=None,
              help="mlx, hf-bf16, original: max size of one safetensors shard (e.g. 5G).")
@click.option("--vocab", type=click.Path(path_type=Path), default=None,
              help="Metal: o200k_base.tiktoken vocabulary when there is no tokenizer.json.")
@click.option("--manifest/--no-manifest", default=True, show_default=True,
              help="Write a provenance manifest (tool, options, sha256 of source and output files).")
@click.option("--scan/--no-scan", default=True, show_default=True,
              help="First read every source byte and refuse NaN/Inf weights and scale bytes of 255.")
def convert_cmd(source: str, target: str, output: Path, force: bool, quiet: bool, manifest: bool, scan: bool,
                **options) -> None:
    """Convert SOURCE to another format.

    SOURCE is an original/ checkpoint (its folder, the repo folder holding it, or a cached repo
    id) or a Hugging Face transformers-layout folder (MXFP4 or dense BF16 experts, e.g. a fine-tune).
    """
    from ..errors import InputError, OutputExistsError
    from ..formats.hf import open_source

    options = {k: v for k, v in options.items() if v is not None}
    if output.exists() and not force:  # before the scan: a refusal should not cost a full read
        raise OutputExistsError(f"{output} exists; pass --force to replace it")
    with open_source(source) as src:
        if src.experts == "bf16" and target not in ("original", "hf-bf16"):
            raise InputError(
                f"the experts are dense BF16; encode them to MXFP4 first: oss-convert convert {source} "
                f"--to original -o OUT [--recipe ocp|search], then convert OUT --to {target}", file=src.path)
        if scan:
            _refuse_non_finite(src, quiet)
        try:
            result, manifest_file = _convert_with_manifest(src, target, output, force, quiet, manifest, options)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            # A full disk is not a bug: say where, without a traceback (the partial output is gone).
            raise OssConvertError(f"cannot write {output}: {exc.strerror}; nothing was left behind") from exc
    if manifest_file is not None and not quiet:
        click.echo(f"manifest: {manifest_file}", err=True)
    click.echo(str(result))


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


def _refuse_non_finite(src, quiet: bool) -> None:
    """A NaN weight or a NaN scale converts into an artifact that loads fine and computes garbage."""
    from ..errors import InputError

    bar, update = progress_bar(src.tensor_bytes, "scan", not quiet)
    with bar:
        problems = src.scan(progress=update)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"the source has {len(problems)} tensors with invalid values (pass --no-scan to convert "
                         f"anyway): {shown}", file=src.path)


def _convert_with_manifest(src, target: str, output: Path, force: bool, quiet: bool, manifest: bool,
                           options: dict) -> tuple[Path, Path | None]:
    import threading
    from concurrent.futures import CancelledError, ThreadPoolExecutor

    from ..converters import converter
    from ..provenance import file_digest, write_manifest

    source_files = [f.path for f in src.files] + [src.config_path]
    stop = threading.Event()

    def check_stop(_: int) -> None:
        if stop.is_set():  # the conversion failed or was interrupted: do not finish hashing 65 GB
            raise CancelledError

    def hash_source() -> dict:
        return {p.name: file_digest(p, check_stop) for p in source_files}

    with ThreadPoolExecutor(1) as pool:
        # Hash the source while converting: both read the same pages, and hashlib drops the GIL.
        source_hashes = pool.submit(hash_source) if manifest else None
        try:
            result = Path(converter(target)(src, output, force=force, progress=not quiet, **options))
        except BaseException:
            stop.set()
            raise
        if source_hashes is None:
            return result, None
        path = write_manifest(result, target=target, options=options, source_path=src.path,
                              source_hashes=source_hashes.result())
    return result, path


def _register_optional_commands() -> None:
    """Commands owned by other packages (verify/), registered if present."""
    try:
        from ..verify.cli import register
    except ImportError:
        return
    register(cli)


_register_optional_commands()


def _interrupt(signum, frame) -> None:
    # A CI runner's SIGTERM should clean up like Ctrl-C: unwinding removes partial outputs.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(EXIT_ERROR if exc.exit_code == 1 else exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OssConvertError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
