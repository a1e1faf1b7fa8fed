"""The CI guard itself: with OSS_CONVERT_REQUIRE_ORACLES=1 a skipped test or module fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

SKIPPING = '''
import pytest
missing = pytest.importorskip("a_module_nobody_has")
'''

SKIPPING_TEST = '''
import pytest

def test_needs_an_oracle():
    pytest.importorskip("another_module_nobody_has")

def test_runs():
    assert True
'''


def _pytest(folder: Path, strict: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OSS_CONVERT_REQUIRE_ORACLES"}
    if strict:
        env["OSS_CONVERT_REQUIRE_ORACLES"] = "1"
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "strict_oracles",
                           "--rootdir", str(folder), str(folder)], capture_output=True, text=True, env=env, cwd=folder)


@pytest.mark.parametrize("source", [SKIPPING, SKIPPING_TEST], ids=["module", "test"])
def test_a_skip_fails_only_when_oracles_are_required(tmp_path, source):
    (tmp_path / "test_sample.py").write_text(source)
    (tmp_path / "test_passing.py").write_text("def test_ok():\n    assert True\n")
    local = _pytest(tmp_path, strict=False)
    assert local.returncode == 0, local.stdout
    assert "skipped" in local.stdout
    ci = _pytest(tmp_path, strict=True)
    assert ci.returncode != 0, ci.stdout  # 1 for a failed test, 2 for a module that could not be collected
    assert "requires every oracle test to run" in ci.stdout and "nobody_has" in ci.stdout
