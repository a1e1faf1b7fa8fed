"""``oss-convert verify`` and ``oss-convert reference`` (added to the group by ``cli/main.py``).

Exit codes: 0 pass, 1 fail (a check failed; the reasons are printed), 2 error (bad input).
Imports: ``cli.common``, ``verify`` and the library below it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from ..atomic import atomic_output
from ..errors import InputError, OutputExistsError
from ..guard import artifact_inputs, refuse_overlap, refuse_report_outputs, refuse_unsafe_output
from ..verify.ranks import world
from ..verify.reference import DEFAULT_CTX, DEFAULT_TOP_K, METAL_VOCAB_ROWS
from ..verify.card import RELATIONS
from ..verify.report import DEFAULT_MAX_KLD, DEFAULT_MIN_TOP1, to_json
from .common import EXIT_FAIL, progress_for, say


def _input_options(f):
    f = click.option("--text", "text_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                     help="UTF-8 text to evaluate (default: the bundled public-domain text).")(f)
    f = click.option("--tokens", "tokens_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                     help="Token ids instead of text (.npy, or integers separated by spaces/commas).")(f)
    f = click.option("--ctx", type=int, default=DEFAULT_CTX, show_default=True,
                     help="Tokens per chunk; the second half of each chunk is scored. Must exceed the sliding window.")(f)
    f = click.option("--chunks", "max_chunks", type=int, default=None, help="Use at most this many chunks.")(f)
    f = click.option("--top-k", type=int, default=DEFAULT_TOP_K, show_default=True,
                     help="Reference log-probs kept per token (KL is exact when this covers the vocabulary).")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
                     help="Run the model with numpy and BLAS (cpu) or with MLX (gpu: MLX's default device, "
                          "Apple's GPU or CUDA); auto: gpu where MLX has one.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(f)
    return f


def _inputs(text_file, tokens_file, ctx, max_chunks, top_k, device="auto"):
    from ..verify.check import Inputs

    if text_file is not None and tokens_file is not None:
        raise click.UsageError("give --text or --tokens, not both")
    return Inputs(text_file=text_file, tokens_file=tokens_file, ctx=ctx, max_chunks=max_chunks, top_k=top_k,
                  device=None if device == "auto" else device)


@click.command("reference")
@click.argument("source")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Cache file to write (.npz).")
@click.option("--force", is_flag=True, help="Replace the output if it exists, only if it is one of ours (a format oss-convert writes, a folder with our manifest, or an empty folder). Never replaces or removes an input.")
@click.option("--cut-rows", type=int, multiple=True, default=(METAL_VOCAB_ROWS,), show_default=True,
              help=f"Also normalise over the first N vocabulary rows, for artifacts that keep only N "
                   f"(Metal: {METAL_VOCAB_ROWS}).")
@click.option("--adapter", type=click.Path(path_type=Path, exists=True), default=None,
              help="Apply this LoRA adapter (PEFT or mlx-lm) to SOURCE exactly, in float32.")
@_input_options
def reference_cmd(source, output, force, cut_rows, adapter, text_file, tokens_file, ctx, max_chunks, top_k, device,
                  quiet):
    """Compute the BF16 reference of SOURCE once and cache its top-k log-probs in an .npz."""
    from ..verify.check import make_reference

    if output.suffix != ".npz":
        raise InputError("the reference cache must end in .npz", file=output)
    inputs = _inputs(text_file, tokens_file, ctx, max_chunks, top_k, device)
    if output.exists() and not force:  # before the model runs
        raise OutputExistsError(f"{output} exists; pass --force to replace it")
    refuse_unsafe_output([output], [*artifact_inputs(source), *artifact_inputs(adapter), text_file, tokens_file],
                         force=force)
    ranks = world()
    ref = make_reference(source, inputs, progress_for(quiet or not ranks.leader), cut_rows=tuple(cut_rows),
                         adapter=adapter)
    if ranks.leader:  # every rank holds the whole reference; one writes it
        ref.save(output, force=force)
        click.echo(f"{output}: {ref.tokens.shape[0]} chunks x {ref.ctx} tokens, {len(ref.targets)} scored, "
                   f"top-{ref.meta['top_k']}" + (f", {ranks.size} ranks" if ranks.size > 1 else ""))
    ranks.finish(0)


@click.command("verify")
@click.argument("artifact")
@click.option("--reference", "reference", default=None,
              help="The source checkpoint (original/ folder or repo) or a cache from `oss-convert reference`.")
@click.option("--integrity", is_flag=True,
              help="Only re-hash the artifact against its provenance manifest (fast, no model run).")
@click.option("--max-kld", type=float, default=DEFAULT_MAX_KLD, show_default=True,
              help="Fail if the mean KL divergence exceeds this (nats).")
@click.option("--min-top1", type=float, default=DEFAULT_MIN_TOP1, show_default=True,
              help="Fail if top-1 agreement is below this (0..1).")
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None,
              help="Also write the report as JSON to this file ('-' for stdout).")
@click.option("--summary", "summary_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Append the results as Markdown to this file (a CI job summary, e.g. $GITHUB_STEP_SUMMARY).")
@click.option("--force", is_flag=True, help="Replace the report files (--json, --csv, --plot) if they exist.")
@click.option("--no-tensors", is_flag=True, help="Skip the tensor-by-tensor comparison.")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), default=None,
              help="Draw mean KL by token position (PNG; needs matplotlib): a rising curve shows RoPE/window mistakes.")
@click.option("--strict-chat-template", is_flag=True,
              help="Fail on any chat the template renders differently from openai-harmony (by default only on "
                   "differences the reference's own template does not have).")
@click.option("--adapter", type=click.Path(path_type=Path, exists=True), default=None,
              help="The reference is the --reference checkpoint with this LoRA adapter applied exactly (float32): "
                   "for an artifact merged with `convert --adapter`.")
@_input_options
def verify_cmd(artifact, reference, integrity, max_kld, min_top1, json_file, summary_file, force, no_tensors, plot_file,
               strict_chat_template, adapter, text_file, tokens_file, ctx, max_chunks, top_k, device, quiet):
    """Verify ARTIFACT (original/, MLX folder, Metal model.bin or GGUF, or a Hub quant named
    user/repo:Q4_K_M in the local Hugging Face cache) against a BF16 reference."""
    if integrity:
        _check_integrity(Path(artifact), json_file, force)
        return
    if reference is None:
        raise click.UsageError("--reference is required (or use --integrity)")
    from ..verify.check import verify
    from ..verify.compare import resolve

    artifact = str(resolve(artifact))  # a path, or a Hub quant (user/repo:Q4_K_M) from the local cache

    inputs = _inputs(text_file, tokens_file, ctx, max_chunks, top_k, device)
    refuse_report_outputs([json_file, plot_file], [*artifact_inputs(artifact), *artifact_inputs(reference),
                                                   *artifact_inputs(adapter), text_file, tokens_file],
                          force=force, appended=[summary_file])  # before the model runs
    ranks = world()
    report = verify(artifact, reference, inputs,
                    max_kld=max_kld, min_top1=min_top1,
                    check_tensors=not no_tensors, strict_chat_template=strict_chat_template,
                    progress=progress_for(quiet or not ranks.leader), adapter=adapter)
    code = ranks.finish(_verify_outputs(report, artifact, reference, json_file, summary_file, plot_file)
                        if ranks.leader else 0)
    if code and ranks.leader:  # the verdict is rank 0's exit code (a rank's non-zero exit makes mlx.launch stop the rest)
        sys.exit(code)


def _verify_outputs(report: dict, artifact, reference, json_file, summary_file, plot_file) -> int:
    """What verify prints and writes (rank 0 alone), and its exit code."""
    if plot_file is not None:
        from ..verify.compare import plot_positions

        config = report["artifact"]["config"]
        plot_positions(np.array(report["positions"]["kld_mean"]), report["positions"]["first"],
                       config["sliding_window"], config["initial_context_length"], plot_file,
                       f"KL by position: {Path(artifact).name} vs {Path(reference).name}")
    if json_file is not None:
        _write_or_echo(json_file, to_json(report))
    if summary_file is not None:
        from ..verify.markdown import append_summary, verify_summary

        append_summary(summary_file, verify_summary(report))
    if str(json_file) != "-":  # stdout carries the JSON alone
        from ..verify.report import format_table

        for line in format_table(report).split("\n"):
            say(line)
    return 0 if report["verdict"] == "pass" else EXIT_FAIL


def _check_integrity(artifact: Path, json_file, force: bool) -> None:
    """Compare the artifact's files with the sha256 and sizes in its provenance manifest."""
    from ..provenance import check_manifest, manifest_path

    refuse_report_outputs([json_file], artifact_inputs(artifact), force=force)
    problems = check_manifest(artifact)
    result = {"artifact": str(artifact), "manifest": str(manifest_path(artifact)),
              "verdict": "fail" if problems else "pass", "problems": problems}
    if json_file is not None and str(json_file) == "-":
        click.echo(json.dumps(result, indent=2))
    else:
        if json_file is not None:
            _write_or_echo(json_file, json.dumps(result, indent=2) + "\n")
        click.echo(f"integrity {result['verdict']}: {artifact}")
        for problem in problems:
            click.echo(f"  {problem}")
    if problems:
        sys.exit(EXIT_FAIL)


def _write_or_echo(target: Path, text: str) -> None:
    """A report to stdout (``-``) or to its file, published whole (its place checked before the run)."""
    if str(target) == "-":
        click.echo(text, nl=False)
        return
    with atomic_output(target, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


@click.command("compare")
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--reference", "reference", required=True,
              help="The source checkpoint (original/ folder or repo) or a cache from `oss-convert reference`.")
@click.option("--max-kld", type=float, default=DEFAULT_MAX_KLD, show_default=True,
              help="Verdict: fail above this mean KL (nats).")
@click.option("--min-top1", type=float, default=DEFAULT_MIN_TOP1, show_default=True,
              help="Verdict: fail below this top-1 agreement.")
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None, help="Write the table as JSON ('-': stdout).")
@click.option("--csv", "csv_file", type=click.Path(path_type=Path), default=None, help="Write the table as CSV ('-': stdout).")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), default=None,
              help="Draw size against mean KL for all artifacts (PNG; needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace the report files (--json, --csv, --plot) if they exist.")
@click.option("--summary", "summary_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Append the results as Markdown to this file (a CI job summary, e.g. $GITHUB_STEP_SUMMARY).")
@_input_options
def compare_cmd(artifacts, reference, max_kld, min_top1, json_file, csv_file, plot_file, force, summary_file,
                text_file, tokens_file, ctx, max_chunks, top_k, device, quiet):
    """Compare several ARTIFACTS (paths, or Hub quants as user/repo:Q4_K_M from the local cache)
    with one reference: size, bits per weight, perplexity ratio, KL, top-1, verdict, by size.

    Exit 0 when every artifact passes, 1 when one fails."""
    from ..verify.compare import compare

    inputs = _inputs(text_file, tokens_file, ctx, max_chunks, top_k, device)
    refuse_report_outputs([json_file, csv_file, plot_file],
                          [*(q for a in artifacts for q in artifact_inputs(a)), *artifact_inputs(reference),
                           text_file, tokens_file], force=force, appended=[summary_file])
    ranks = world()
    result = compare(reference, list(artifacts), inputs,
                     max_kld=max_kld, min_top1=min_top1, progress=progress_for(quiet or not ranks.leader))
    code = ranks.finish(_compare_outputs(result, json_file, csv_file, plot_file, summary_file) if ranks.leader else 0)
    if code and ranks.leader:  # the verdict is rank 0's exit code, as for verify
        sys.exit(code)


def _compare_outputs(result: dict, json_file, csv_file, plot_file, summary_file) -> int:
    """What compare prints and writes (rank 0 alone), and its exit code."""
    from ..verify.compare import format_table, plot_sizes, to_csv

    written = {json_file: to_json(result),
               csv_file: to_csv(result)}
    for target, text in written.items():
        if target is not None:
            _write_or_echo(target, text)
    if plot_file is not None:
        plot_sizes(result, plot_file)
    if summary_file is not None:
        from ..verify.markdown import append_summary, compare_summary

        append_summary(summary_file, compare_summary(result))
    if "-" not in (str(json_file), str(csv_file)):  # stdout carries the JSON or CSV alone
        for line in format_table(result).split("\n"):
            say(line)
    return EXIT_FAIL if any(r["verdict"] == "fail" for r in result["rows"]) else 0


@click.command("card")
@click.argument("artifact", type=click.Path(path_type=Path, exists=True))
@click.option("--report", "report_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The artifact's `verify --json` report; without one the card says it was not verified.")
@click.option("--compare", "compare_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A `compare --json` table to include (several artifacts of one repo).")
@click.option("--base", default=None, metavar="REPO_ID",
              help="The Hub repo this was made from (base_model), e.g. openai/gpt-oss-20b; default: the report's "
                   "reference when it is a repo id.")
@click.option("--repo", default=None, metavar="REPO_ID", help="The Hub repo the card is for (its title and run commands).")
@click.option("--relation", type=click.Choice(RELATIONS), default=None,
              help="base_model_relation (default: finetune for a merged adapter, else quantized).")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the card here (e.g. ARTIFACT/README.md); default: stdout.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
def card_cmd(artifact, report_file, compare_file, base, repo, relation, output, force):
    """Write a Hugging Face model card for ARTIFACT from its proof: the verify report, a compare
    table, the provenance manifest, how it was made and how to run it."""
    from ..verify.card import COMPARE_KEYS, VERIFY_KEYS, load_report, model_card

    report = load_report(report_file, keys=VERIFY_KEYS) if report_file else None
    compare = load_report(compare_file, schema=None, keys=COMPARE_KEYS) if compare_file else None
    card = model_card(artifact, report=report, compare=compare, base=base, repo=repo, relation=relation)
    if output is None:
        click.echo(str(card), nl=False)
        return
    refuse_overlap([output], [*artifact_inputs(str(artifact)), report_file, compare_file])
    with atomic_output(output, force=force) as tmp:  # a card half-written is never published
        tmp.write_text(str(card), encoding="utf-8")
    click.echo(f"{output}: model card ({'verified: ' + report['verdict'] if report else 'not verified'})", err=True)
