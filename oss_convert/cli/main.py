"""``oss-convert``: the entry point and the commands that only route to library code.

Exit codes: 0 success, 1 a verification failed, 2 bad input or usage (the message names the
file and tensor), 130 interrupted. Messages go to stderr; ``--json`` output to stdout.
Imports: ``cli.common``, ``cli.verify`` and the library; nothing imports this module.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from .. import __version__, converters, formats, synth
from ..errors import OssConvertError, printable
from ..sizes import format_size
from ..verify.report import to_json
from .common import EXIT_ERROR, EXIT_FAIL, progress_for, say
from .verify import card_cmd, compare_cmd, reference_cmd, verify_cmd


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
@click.option("--force", is_flag=True, help="Replace the output if it exists, only if it is one of ours (a format oss-convert writes, a folder with our manifest, or an empty folder). Never replaces or removes an input.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def synth_cmd(out: Path, preset: str, seed: int, layers: int | None, shards: int, experts: str, tokenizer: bool,
              force: bool, quiet: bool) -> None:
    """Write a synthetic checkpoint in the exact original/ layout to OUT/original/."""
    config = synth.preset_with(preset, **({"num_hidden_layers": layers} if layers else {}))
    synth.generate(out, config, seed=seed, shards=shards, experts=experts, force=force, progress=progress_for(quiet),
                   tokenizer=tokenizer)
    click.echo(str(out))


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts and CI.")
@click.option("--scan", is_flag=True, help="Also read every byte (NaN/Inf, invalid scales).")
def inspect_cmd(path: str, as_json: bool, scan: bool) -> None:
    """Describe and validate an artifact (original/, MLX folder, Metal model.bin or GGUF) or a LoRA
    adapter (PEFT or mlx-lm: rank and scaling per module, the layers it touches)."""
    info = formats.describe(path, scan=scan)
    if formats.adapter_format(path) is None:  # an adapter carries no tokenizer
        info["tokenizer"] = _tokenizer_summary(path)
    kind = info["kind"]
    if as_json:
        click.echo(to_json(info), nl=False)
        return
    say(f"{kind}: {info.get('path', path)}")
    for key, value in info.items():
        if key in ("kind", "path"):
            continue
        if isinstance(value, dict):
            say(f"  {key}:")
            for k, v in value.items():
                say(f"    {k}: {_human(v) if 'bytes' in key else _brief(v)}")
        elif isinstance(value, list):
            say(f"  {key}: {', '.join(map(str, value)) if value else '-'}")
        else:
            say(f"  {key}: {_human(value) if key.endswith('bytes') else value}")
    if not info.get("valid", True):
        sys.exit(EXIT_FAIL)


def _tokenizer_summary(path: str) -> dict:
    from ..verify.vocabulary import summary

    model = formats.open_canonical(path)
    try:
        return summary(model)
    finally:
        model.close()


def _brief(value) -> str:
    """A nested description on one line: ``rank 8, layers 1,3, experts 1:0-7 3:0-7``."""
    if isinstance(value, dict):
        return ", ".join(f"{k} " + (" ".join(f"{kk}:{_brief(vv)}" for kk, vv in v.items()) if isinstance(v, dict)
                                    else _brief(v)) for k, v in value.items())
    if isinstance(value, list):
        if len(value) > 2 and all(isinstance(v, int) for v in value) and value == list(range(value[0], value[-1] + 1)):
            return f"{value[0]}-{value[-1]}"
        return ",".join(map(str, value))
    return str(value)


def _human(n) -> str:
    return f"{format_size(n)} ({n:,} B)" if isinstance(n, int) else str(n)


def _target_help() -> str:
    return "; ".join(f"{t.name}: {t.writes}" for t in converters.TARGETS.values())


@cli.command("convert")
@click.argument("source")
@click.option("--to", "target", required=True, type=click.Choice(list(converters.TARGETS)), help=_target_help())
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Output folder or file.")
@click.option("--force", is_flag=True, help="Replace the output if it exists, only if it is one of ours (a format oss-convert writes, a folder with our manifest, or an empty folder). Never replaces or removes an input.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--outtype", type=click.Choice(converters.ALL_OUTTYPES), default=None,
              help=converters.OPTIONS["outtype"].help)
@click.option("--recipe", type=click.Choice(converters.ALL_RECIPES), default=None,
              help="; ".join(f"{t.name}: {' | '.join(t.recipes)}" for t in converters.TARGETS.values() if t.recipes)
              + " (see README).")
@click.option("--split-max-size", default=None, help=converters.OPTIONS["split_max_size"].help)
@click.option("--shard-size", default=None, help=converters.OPTIONS["shard_size"].help)
@click.option("--vocab", type=click.Path(path_type=Path), default=None, help=converters.OPTIONS["vocab"].help)
@click.option("--chat-template", default=None, metavar="keep|harmony|FILE",
              help=converters.OPTIONS["chat_template"].help)
@click.option("--manifest/--no-manifest", default=True, show_default=True,
              help="Write a provenance manifest (tool, options, sha256 of source and output files).")
@click.option("--scan/--no-scan", default=True, show_default=True,
              help="First read every source byte and refuse NaN/Inf weights and scale bytes of 255.")
@click.option("--adapter", type=click.Path(path_type=Path, exists=True), default=None,
              help="Merge this LoRA adapter (PEFT or mlx-lm folder) on the way: exact float32 merge, experts it "
                   "touches re-encoded to MXFP4 (--recipe search by default, or ocp), the rest copied.")
@click.option("--base", default=None, metavar="BASE",
              help="With a LoRA adapter as SOURCE: the base model it was made for (names, shapes, config; "
                   "nothing of it is copied). The adapter is written unmerged, as llama.cpp (--to gguf) or "
                   "mlx-lm (--to mlx) applies it at run time.")
def convert_cmd(source: str, target: str, output: Path, force: bool, quiet: bool, manifest: bool, scan: bool,
                adapter: Path | None, base: str | None, **options) -> None:
    """Convert SOURCE to another format.

    SOURCE is an original/ checkpoint (its folder, the repo folder holding it, or a cached repo
    id) or a Hugging Face transformers-layout folder (MXFP4 or dense BF16 experts, e.g. a fine-tune);
    or a LoRA adapter (PEFT or mlx-lm) with --base, converted to a runtime adapter.
    """
    if formats.adapter_format(source) is not None:
        given = [name for name, value in options.items() if value is not None] + (["adapter"] if adapter else [])
        if base is None or given:
            raise click.UsageError("an adapter as SOURCE takes --base BASE and no other option"
                                   + (f" (got --{', --'.join(g.replace('_', '-') for g in given)})" if given else ""))
        from ..converters.adapter import convert_adapter

        click.echo(str(convert_adapter(source, target, output, base=base, force=force, manifest=manifest,
                                       progress=progress_for(quiet))))
        return
    if base is not None:
        raise click.UsageError("--base is for converting a LoRA adapter (SOURCE an adapter folder)")
    result = converters.convert(source, target, output, force=force, scan=scan, manifest=manifest,
                                progress=progress_for(quiet), adapter=adapter, **options)
    if result.manifest is not None and not quiet:
        click.echo(f"manifest: {result.manifest}", err=True)
    click.echo(str(result.output))


cli.add_command(verify_cmd)
cli.add_command(reference_cmd)
cli.add_command(compare_cmd)
cli.add_command(card_cmd)


def _interrupt(signum, frame) -> None:
    # A CI runner's SIGTERM should clean up like Ctrl-C: unwinding removes partial outputs.
    raise KeyboardInterrupt


def _across_ranks(exc: OssConvertError) -> tuple[OssConvertError, bool]:
    """Under ``mlx.launch``: the other ranks learn of this rank's failure at their next exchange
    (``verify.ranks``), and every rank ends with the failing rank's message and code, which rank
    0 alone prints. Otherwise the error as it is."""
    from ..verify.ranks import RankFailure, current

    world = current()
    if world is None or world.size == 1:
        return exc, True
    if not isinstance(exc, RankFailure):
        try:
            world.check_in(exc)
        except RankFailure as failure:
            exc = failure
    if world.leader:
        click.echo(f"error: {printable(str(exc))}", err=True)
    try:  # every rank waits for rank 0's message before any exits (mlx.launch stops the rest at the first)
        world.finish(0)
    except OssConvertError:
        pass
    return exc, False


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
        exc, leader = _across_ranks(exc)
        if leader:
            click.echo(f"error: {printable(str(exc))}", err=True)  # one line, whatever a file's name holds
        sys.exit(getattr(exc, "exit_code", EXIT_ERROR))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
