"""What a publishing pipeline reads: the model card (``oss-convert card``), the job summary
(``verify/compare --summary``) and the progress in a log (stderr not a terminal).

Oracle: ``huggingface_hub.ModelCard.load`` parses the card back as the Hub does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import run_sub

BUNDLED = Path(__file__).resolve().parents[2] / "examples" / "gpt-oss-tiny"
TEXT = ("--text", str(BUNDLED / "heldout.txt"), "--ctx", "256", "--chunks", "4")


@pytest.fixture(scope="module")
def proven(tmp_path_factory) -> dict[str, Path]:
    """The bundled model as MLX (passes) and as 4-bit MLX (fails the default gates), each verified."""
    root = tmp_path_factory.mktemp("card")
    made = {}
    for name, recipe in (("mlx", ()), ("mlx-q4", ("--recipe", "mxfp4-q4"))):
        out = root / name
        assert run_sub("convert", str(BUNDLED), "--to", "mlx", "-o", str(out), *recipe, "--quiet").returncode == 0
        report = root / f"{name}.json"
        result = run_sub("verify", str(out), "--reference", str(BUNDLED), *TEXT, "--json", str(report), "--quiet")
        assert result.returncode == (0 if name == "mlx" else 1), result.stderr
        made[name], made[name + ".json"] = out, report
    return made


def card_of(*args: str) -> tuple[object, str]:
    from huggingface_hub import ModelCard

    result = run_sub("card", *args)
    assert result.returncode == 0, result.stderr
    return ModelCard(result.stdout), result.stdout


def test_card_metadata_round_trips_through_the_hub_parser(proven, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "README.md"
    assert run_sub("card", str(proven["mlx"]), "--report", str(proven["mlx.json"]), "--base", "openai/gpt-oss-20b",
                   "-o", str(out)).returncode == 0
    data = ModelCard.load(out).data.to_dict()
    assert data == {"base_model": "openai/gpt-oss-20b", "base_model_relation": "quantized", "library_name": "mlx",
                    "license": "apache-2.0", "pipeline_tag": "text-generation",
                    "tags": ["gpt-oss", "oss-convert", "mlx"]}
    # a second run with the same inputs writes the same card (a pipeline can diff it)
    again = tmp_path / "again.md"
    run_sub("card", str(proven["mlx"]), "--report", str(proven["mlx.json"]), "--base", "openai/gpt-oss-20b",
            "-o", str(again))
    assert again.read_bytes() == out.read_bytes()


def test_card_figures_are_the_reports(proven):
    report = json.loads(proven["mlx.json"].read_text())
    card, text = card_of(str(proven["mlx"]), "--report", str(proven["mlx.json"]))
    m, th = report["metrics"], report["thresholds"]
    assert f"| KL mean (nats) | {m['kld_mean']:.3e} | <= {th['max_kld']:g} |" in text
    assert f"| KL p99 | {m['kld_p99']:.3e} |  |" in text
    assert f"| top-1 agreement | {m['top1_agreement']:.2%} | >= {th['min_top1']:.2%} |" in text
    assert f"| perplexity ratio | {m['ppl_ratio']:.6f} |  |" in text
    for check in report["checks"]:
        assert f"| {check['name']} | {check['status'].replace('_', ' ')} |" in text
    chats = report["chat_template"]["conversations"]
    assert all(f"| {c['name']} | {c['status']} | {c['tokens']} |" in text for c in chats)
    manifest = json.loads((proven["mlx"] / "oss-convert-manifest.json").read_text())
    for name, digest in {**manifest["source"]["files"], **manifest["outputs"]}.items():
        assert f"`{digest['sha256']}`" in text, name
    assert "**Verification: PASS**" in text
    assert "mlx_lm.generate --model" in text and "oss-convert convert" in text and "oss-convert verify" in text


def test_a_failed_verify_gives_a_card_that_says_so(proven):
    report = json.loads(proven["mlx-q4.json"].read_text())
    _, text = card_of(str(proven["mlx-q4"]), "--report", str(proven["mlx-q4.json"]))
    assert "**Verification: FAIL**" in text and "It failed because:" in text
    assert all(reason in text for reason in report["reasons"])
    assert "option recipe | mxfp4-q4" in text


def test_without_a_report_the_card_claims_nothing(proven):
    card, text = card_of(str(proven["mlx"]))
    assert "**Not verified.**" in text
    assert "KL" not in text and "top-1" not in text and "PASS" not in text
    assert "base_model" not in card.data.to_dict()  # nothing to name it from


def test_card_refuses_what_is_not_a_report(proven, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    result = run_sub("card", str(proven["mlx"]), "--report", str(bad))
    assert result.returncode == 2 and str(bad) in result.stderr and "not a verify report" in result.stderr
    other = run_sub("card", str(proven["mlx"]), "--report", str(proven["mlx.json"]), "-o", str(tmp_path / "x.md"))
    assert other.returncode == 0
    kind = tmp_path / "kind.json"
    kind.write_text(json.dumps({**json.loads(proven["mlx.json"].read_text()), "artifact": {"kind": "gguf"}}))
    mismatch = run_sub("card", str(proven["mlx"]), "--report", str(kind))
    assert mismatch.returncode == 2 and "gguf" in mismatch.stderr


def test_a_card_in_the_artifact_folder_keeps_its_integrity(proven, tmp_path):
    import shutil

    folder = tmp_path / "mlx"
    shutil.copytree(proven["mlx"], folder)
    assert run_sub("card", str(folder), "--report", str(proven["mlx.json"]), "-o", str(folder / "README.md")).returncode == 0
    assert run_sub("verify", "--integrity", str(folder)).returncode == 0
    assert run_sub("card", str(folder), "-o", str(folder / "README.md")).returncode == 2  # exists: --force


def _tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_summary_is_appended_markdown_tables(proven, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("## earlier step\n")
    for name in ("mlx", "mlx-q4"):
        run_sub("verify", str(proven[name]), "--reference", str(BUNDLED), *TEXT, "--summary", str(summary), "--quiet")
    result = run_sub("compare", "--reference", str(BUNDLED), *TEXT, str(proven["mlx"]), str(proven["mlx-q4"]),
                     "--summary", str(summary), "--quiet")
    assert result.returncode == 1  # the 4-bit one fails the gates
    text = summary.read_text()
    assert text.startswith("## earlier step\n")
    assert text.count("### oss-convert verify:") == 2 and "**PASS**" in text and "**FAIL**" in text
    assert "### oss-convert compare: 2 artifacts" in text
    tables = _tables(text)
    assert len(tables) == 5  # two per verify (metrics, checks), one for compare
    for table in tables:  # every row has the header's number of cells; the second row is the rule
        cells = [len(re.findall(r"(?<!\\)\|", row)) for row in table]
        assert len(set(cells)) == 1 and re.fullmatch(r"\|(-{3}:?\|)+", table[1])


def test_progress_in_a_log_is_plain_lines(tmp_path):
    """stderr a pipe (a CI log): no carriage returns, a few lines a task."""
    result = run_sub("convert", str(BUNDLED), "--to", "gguf", "-o", str(tmp_path / "x.gguf"))
    assert result.returncode == 0
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("gguf: started") for line in lines) and any("gguf: done" in line for line in lines)
    assert len(lines) < 30


def test_line_progress_is_bounded_for_a_long_job():
    from oss_convert.cli.common import LineProgress

    now = [0.0]
    lines: list[str] = []
    progress = LineProgress(clock=lambda: now[0])
    progress._line = lines.append
    with progress.task("convert", 10**6, "B") as advance:
        for _ in range(10**4):  # ten hours in steps of 3.6 s
            now[0] += 3.6
            advance(100)
    assert lines[0] == "convert: started (1 MB)" and lines[-1].startswith("convert: done, 1 MB in 36000 s")
    assert len(lines) <= 102
    middle = lines[1:-1]
    assert all(re.fullmatch(r"convert: \d+% \(.* of 1 MB\), .*/s, \d+ s left", line) for line in middle)
    assert "convert: 50% (500 kB of 1 MB), 27 B/s, 18000 s left" in middle


def test_a_merged_adapter_is_a_finetune_with_its_adapter_hashed(tmp_path):
    """The card of ``convert --adapter``: base_model_relation finetune, the adapter's files and
    sha256 in the provenance, the merge's command with the adapter by name."""
    from oss_convert.hashing import file_sha256

    lora = BUNDLED.parent / "gpt-oss-tiny-sherlock-lora"
    out = tmp_path / "merged"
    assert run_sub("convert", str(BUNDLED), "--adapter", str(lora), "--to", "mlx", "-o", str(out), "--quiet").returncode == 0
    card, text = card_of(str(out), "--base", "openai/gpt-oss-20b")
    assert card.data.base_model_relation == "finetune" and "lora-merge" in card.data.tags
    assert f"`{file_sha256(lora / 'adapter_model.safetensors')}`" in text
    assert f"--adapter {lora.name}" in text and str(lora.parent) not in text


def test_a_report_is_read_as_a_strangers_file(proven, tmp_path):
    """A report's figures are held to the report's types: a string where a figure belongs is exit
    2 naming the file; a null figure (strict JSON's inf or NaN) is shown as n/a."""
    report = json.loads(proven["mlx.json"].read_text())
    cases = {
        "string figure": {**report, "metrics": {**report["metrics"], "kld_mean": "low"}},
        "checks not a list": {**report, "checks": "all good"},
        "a check without a status": {**report, "checks": [{"name": "kl"}]},
        "artifact not an object": {**report, "artifact": ["mlx"]},
    }
    for case, document in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(document))
        result = run_sub("card", str(proven["mlx"]), "--report", str(bad))
        assert result.returncode == 2 and "bad.json" in result.stderr and "Traceback" not in result.stderr, \
            (case, result.stderr)
    infinite = tmp_path / "inf.json"
    infinite.write_text(json.dumps({**report, "metrics": {**report["metrics"], "logit_max_abs_diff": None}}))
    _, text = card_of(str(proven["mlx"]), "--report", str(infinite))
    assert "| max abs logit difference | n/a |  |" in text
    table = tmp_path / "compare.json"
    table.write_text(json.dumps({"reference": "x", "thresholds": {"max_kld": 1, "min_top1": 0},
                                 "rows": [{"artifact": "a", "kind": "mlx", "verdict": "pass", "size_bytes": "big"}]}))
    result = run_sub("card", str(proven["mlx"]), "--compare", str(table))
    assert result.returncode == 2 and "compare.json" in result.stderr
