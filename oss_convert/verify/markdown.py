"""verify and compare results as Markdown: a CI job's summary (``--summary FILE``, appended, e.g.
``$GITHUB_STEP_SUMMARY``) and the proof section of a model card (``verify/card.py``).

Everything here reads the reports' JSON form (``Report.to_dict()``, ``compare()``'s result), so
a report written yesterday renders as today's would.
"""

from __future__ import annotations

from pathlib import Path

from ..sizes import format_size


def cell(value) -> str:
    """A table cell: pipes escaped and line breaks flattened, so a message cannot break the table."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """A GitHub-flavoured Markdown table; ``align``: one of l/r per column (default: all left)."""
    marks = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join(marks[a] for a in (align or "l" * len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def num(value, spec: str) -> str:
    """A figure as ``spec`` formats it; ``None`` (how strict JSON writes NaN and inf) as "n/a"."""
    return "n/a" if value is None else format(value, spec)


def verdict_word(verdict: str) -> str:
    return "**PASS**" if verdict == "pass" else "**FAIL**"


def metrics_table(report: dict) -> list[str]:
    m, th = report["metrics"], report["thresholds"]
    return table(["metric", "value", "gate"], [
        ["perplexity (artifact / reference)", f"{num(m['ppl'], '.4f')} / {num(m['ppl_ref'], '.4f')}", ""],
        ["perplexity ratio", f"{num(m['ppl_ratio'], '.6f')}", ""],
        ["KL mean (nats)", f"{num(m['kld_mean'], '.3e')}", f"<= {num(th['max_kld'], 'g')}"],
        ["KL p99", f"{num(m['kld_p99'], '.3e')}", ""],
        ["KL max", f"{num(m['kld_max'], '.3e')}", ""],
        ["top-1 agreement", f"{num(m['top1_agreement'], '.2%')}", f">= {num(th['min_top1'], '.2%')}"],
        ["max abs logit difference", f"{num(m['logit_max_abs_diff'], '.3e')}", ""],
        ["tokens scored", f"{m['tokens_scored']}", ""],
        *_noise_floor(report.get("kernels")),
    ], "lrr")


def _noise_floor(kernels: dict | None) -> list[list[str]]:
    """The noise floor row, where the two sides ran different kernels and it was measured."""
    if not kernels or kernels.get("noise_kld_mean") is None:
        return []
    return [[f"noise floor: KL mean of {cell(kernels['reference'])} against {cell(kernels['artifact'])}",
             f"{num(kernels['noise_kld_mean'], '.3e')}", ""]]


def checks_table(report: dict) -> list[str]:
    return table(["check", "status", "what was found"],
                 [[c["name"], c["status"].replace("_", " "), c["summary"]] for c in report["checks"]])


def verify_summary(report: dict) -> str:
    """One verify report: the verdict, its metrics against the gates, every check, the reasons."""
    artifact, reference = report["artifact"], report["reference"]
    lines = [f"### oss-convert verify: `{cell(Path(artifact['path']).name)}` {verdict_word(report['verdict'])}", "",
             f"{artifact['kind']} artifact `{cell(artifact['path'])}` against the reference "
             f"`{cell(reference['path'])}`" + (" with its LoRA adapter applied" if reference.get("adapter") else "")
             + f", {report['input']['tokens_scored']} tokens scored.", ""]
    lines += metrics_table(report) + [""] + checks_table(report)
    if report["reasons"]:
        lines += ["", "Failed because:"] + [f"- {cell(r)}" for r in report["reasons"]]
    return "\n".join(lines) + "\n"


def compare_table(result: dict) -> list[str]:
    rows = [[f"`{r['artifact']}`", r["kind"], format_size(r["size_bytes"]), num(r["bits_per_weight"], ".2f"),
             num(r["ppl_ratio"], ".5f"), num(r["kld_mean"], ".2e"), num(r["kld_p99"], ".2e"),
             num(r["top1_agreement"], ".2%"),
             r["verdict"]] for r in result["rows"]]
    return table(["artifact", "kind", "size", "bits/weight", "ppl ratio", "KL mean", "KL p99", "top-1", "verdict"],
                 rows, "llrrrrrrl")


def compare_summary(result: dict) -> str:
    th = result["thresholds"]
    lines = [f"### oss-convert compare: {len(result['rows'])} artifacts against `{cell(result['reference'])}`", ""]
    lines += compare_table(result)
    lines += ["", f"Pass: KL mean <= {th['max_kld']:g} and top-1 >= {th['min_top1']:.2%}."]
    return "\n".join(lines) + "\n"


def append_summary(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (a job summary collects every step's), after a blank line if
    the file already has content; never truncates what is there."""
    path = Path(path)
    lead = "\n" if path.exists() and path.stat().st_size else ""
    with open(path, "a", encoding="utf-8") as out:
        out.write(lead + text)
