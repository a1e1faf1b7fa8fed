"""The publishing workflow in examples/ci/ runs: every step's commands, as GitHub Actions would
run them, on the bundled model (install and upload left out), and what it leaves is what a
publisher uploads: one folder per target with a model card made from its proof, the job summary
with every verify and the compare table, artifacts that still pass ``verify --integrity``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "ci" / "publish.yml"
LEFT_OUT = {"install", "upload"}  # pip install (done here already) and the upload (needs a token)


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_the_workflow_is_what_actions_reads():
    job = workflow()["jobs"]["publish"]
    ids = [step.get("id") for step in job["steps"] if "run" in step]
    assert ids == ["install", "model", "convert", "verify", "compare", "cards", "upload"]
    upload = next(step for step in job["steps"] if step.get("id") == "upload")
    assert upload["if"] == "env.HF_TOKEN != ''" and "secrets.HF_TOKEN" in job["env"]["HF_TOKEN"]


@pytest.mark.slow
def test_the_workflow_steps_pass_on_the_bundled_model(tmp_path):
    from huggingface_hub import ModelCard

    spec = workflow()
    summary = tmp_path / "step-summary.md"
    bin_dir = Path(sys.executable).parent  # the oss-convert of this environment
    env = {**os.environ, **{k: str(v) for k, v in spec["env"].items()}, **spec["jobs"]["publish"]["env"]}
    env.update(HF_TOKEN="", HF_USER="", GITHUB_STEP_SUMMARY=str(summary), OUT=str(tmp_path / "artifacts"),
               MODEL=str(ROOT / spec["env"]["MODEL"]), TEXT=str(ROOT / spec["env"]["TEXT"]),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for step in spec["jobs"]["publish"]["steps"]:
        if "run" not in step or step.get("id") in LEFT_OUT:
            continue
        # GitHub runs a step as `bash -e {0}` (--noprofile --norc) in the checkout
        result = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", step["run"]], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"step {step['id']}:\n{result.stdout}\n{result.stderr}"
        assert "\r" not in result.stderr  # a log, not a terminal: plain progress lines

    out = tmp_path / "artifacts"
    text = summary.read_text()
    assert text.count("### oss-convert verify:") == 4 and text.count("**PASS**") == 4
    assert "### oss-convert compare: 4 artifacts" in text
    for target in spec["env"]["TARGETS"].split():
        card = ModelCard.load(out / target / "README.md")
        assert card.data.base_model == spec["env"]["BASE"]
        assert card.data.base_model_relation == "quantized"
        assert "**Verification: PASS**" in card.text and "## Compared with other artifacts" in card.text
