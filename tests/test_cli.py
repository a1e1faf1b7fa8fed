"""The command line as a user and a CI job see it: output, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oss_convert.cli.main", *args], capture_output=True, text=True)


def test_synth_then_inspect_json(tmp_path):
    out = tmp_path / "repo"
    result = run("synth", str(out), "--preset", "tiny", "--shards", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "original" / "model--00002-of-00002.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    result = run("inspect", str(out), "--json", "--scan")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "original" and info["valid"] is True
    assert info["tensor_count"] == 63 and info["config"]["hidden_size"] == 160
    assert info["bytes_by_dtype"] == {"BF16": 2336960, "U8": 783360}


def test_synth_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "repo"
    assert run("synth", str(out), "--quiet", "--no-tokenizer").returncode == 0
    result = run("synth", str(out), "--quiet", "--no-tokenizer")
    assert result.returncode == 2 and "--force" in result.stderr
    assert run("synth", str(out), "--quiet", "--no-tokenizer", "--force").returncode == 0
    assert not list(tmp_path.glob(".*partial"))


def test_bad_input_exits_2_with_the_file_named(tmp_path):
    result = run("inspect", str(tmp_path / "missing"))
    assert result.returncode == 2 and "missing" in result.stderr
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    result = run("inspect", str(junk))
    assert result.returncode == 2 and "junk.bin" in result.stderr and "Traceback" not in result.stderr


def test_usage_error_exits_2():
    assert run("convert").returncode == 2
    assert run("--help").returncode == 0
