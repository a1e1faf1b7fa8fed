"""Promise: the input is never damaged, whatever the flags. An output that is, contains or would be
read as an input is refused (every spelling of a path, symlinks, hard links, a cache snapshot's
blobs); every registered target only ever opens its source for reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oss_convert.formats.original import OriginalCheckpoint

from helpers import digests, refused, run, tree_hashes
from targets import Case, params


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    """A fresh copy of the two-shard tiny repo (original/ plus tokenizer files at the root)."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


@pytest.mark.parametrize("spelling", ["{repo}/original", "{repo}/original/", "{repo}/original/../original",
                                      "{repo}/./original", "{repo}/../repo"])
def test_every_spelling_of_an_input_folder_is_refused(monkeypatch, capsys, repo, spelling):
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "mlx", "-o", spelling.format(repo=repo), "--force",
            match="the input")


def test_output_through_a_symlink_is_resolved(monkeypatch, capsys, repo, tmp_path):
    (tmp_path / "link").symlink_to(repo)
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "mlx", "-o", tmp_path / "link", "--force",
            match="the input")
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "mlx", "-o", tmp_path / "link" / "original",
            "--force", match="the input")
    assert (tmp_path / "link").is_symlink()


def test_a_hard_link_to_an_input_is_the_input(monkeypatch, capsys, repo, tmp_path):
    """Another name for the same file (as a case-insensitive file system gives) is compared by inode."""
    os.link(repo / "tokenizer.json", tmp_path / "other-name.json")
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "gguf", "-o", tmp_path / "other-name.json", "--force",
            match="is the input")


def test_an_output_folder_above_the_input_is_refused(monkeypatch, capsys, repo, tmp_path):
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "mlx", "-o", tmp_path, "--force",
            match="contains the input")


@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja", "original/config.json",
                                  "original/dtypes.json"])
def test_tokenizer_template_and_config_files_are_inputs(monkeypatch, capsys, repo, name):
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "gguf", "-o", repo / name, "--force",
            match="is the input")


def test_a_safetensors_name_beside_the_shards_would_change_the_input(monkeypatch, capsys, repo):
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "gguf", "-o", repo / "original" / "extra.safetensors",
            match="would be read as a shard")


def test_a_vocab_file_is_an_input(monkeypatch, capsys, repo, tmp_path):
    vocab = tmp_path / "o200k.tiktoken"
    vocab.write_bytes(b"GGUF pretend")  # even a file of a kind --force may replace
    before = vocab.read_bytes()
    refused(monkeypatch, capsys, repo, "convert", repo, "--to", "metal", "-o", vocab, "--vocab", vocab, "--force",
            match="is the input")
    assert vocab.read_bytes() == before


def test_writing_inside_the_repo_beside_original_is_allowed(monkeypatch, capsys, repo):
    """Like the Hub repos' own metal/ and gguf folders: a new output inside the repo root is fine."""
    before = digests(repo)
    code, err = run(monkeypatch, capsys, "convert", repo, "--to", "gguf", "-o", repo / "gguf" / "model.gguf", "--quiet")
    assert code == 0, err
    after = digests(repo)
    assert {k: v for k, v in after.items() if not k.startswith("gguf/")} == before


def test_reference_output_is_guarded(monkeypatch, capsys, repo, tmp_path):
    tokens = tmp_path / "ids.npz"
    np.savez(tokens, ids=np.arange(600) % 1000)  # a zip: a kind --force could replace
    before = tokens.read_bytes()
    code, err = run(monkeypatch, capsys, "reference", repo, "-o", tokens, "--tokens", tokens, "--force", "--quiet")
    assert code == 2 and "is the input" in err
    assert tokens.read_bytes() == before
    text = tmp_path / "plain.npz"
    text.write_text("not a reference")
    code, err = run(monkeypatch, capsys, "reference", repo, "-o", text, "--force", "--quiet")
    assert code == 2 and "not an artifact oss-convert writes" in err
    assert text.read_text() == "not a reference"


def test_verify_json_never_overwrites_an_input(monkeypatch, capsys, repo, tmp_path):
    out = tmp_path / "m.gguf"
    assert run(monkeypatch, capsys, "convert", repo, "--to", "gguf", "-o", out, "--quiet")[0] == 0
    before, artifact = digests(repo), out.read_bytes()
    for target in (repo / "original" / "config.json", out, out.with_name(out.name + ".manifest.json")):
        code, err = run(monkeypatch, capsys, "verify", out, "--reference", repo, "--json", target, "--quiet",
                        "--ctx", "256", "--chunks", "1")
        assert code == 2 and "is the input" in err, err
    code, err = run(monkeypatch, capsys, "verify", "--integrity", out, "--json", out)
    assert code == 2 and "is the input" in err
    assert digests(repo) == before and out.read_bytes() == artifact


def test_reports_stay_out_of_input_folders_and_replace_only_with_force(monkeypatch, capsys, repo, tmp_path):
    """verify's and compare's reports are held to the artifacts' rules: never inside an input's
    folder (a report.safetensors there is read as a shard next time; any file breaks the folder's
    manifest), and an existing file is replaced only with --force."""
    mlx = tmp_path / "mlx"
    assert run(monkeypatch, capsys, "convert", repo, "--to", "mlx", "-o", mlx, "--quiet")[0] == 0
    before, artifact = digests(repo), digests(mlx)
    fast = ("--ctx", "256", "--chunks", "1", "--quiet")
    cases = [("verify", mlx, "--reference", repo, "--json", mlx / "report.json"),
             ("verify", mlx, "--reference", repo, "--summary", mlx / "summary.md"),
             ("verify", mlx, "--reference", repo, "--plot", repo / "original" / "kl.png"),
             ("compare", "--reference", repo, mlx, "--csv", repo / "original" / "report.safetensors"),
             ("compare", "--reference", repo, mlx, "--json", repo / "report.json")]
    for args in cases:
        code, err = run(monkeypatch, capsys, *args, *fast)
        assert code == 2 and ("inside the input folder" in err or "read as a shard of the input" in err), (args, err)
    assert digests(repo) == before and digests(mlx) == artifact
    assert run(monkeypatch, capsys, "verify", "--integrity", mlx)[0] == 0
    report = tmp_path / "report.json"
    report.write_text("an earlier report")
    for command in (("verify", mlx, "--reference", repo, "--json", report),
                    ("compare", "--reference", repo, mlx, "--json", report)):
        code, err = run(monkeypatch, capsys, *command, *fast)
        assert code == 2 and "--force" in err and report.read_text() == "an earlier report", err
    assert run(monkeypatch, capsys, "verify", mlx, "--reference", repo, "--json", report, "--force", *fast)[0] == 0
    assert json.loads(report.read_text())["verdict"] == "pass"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.fixture
def hub_cache(tiny_repo, tmp_path) -> tuple[Path, Path]:
    """``models--openai--tiny/{blobs,snapshots/<rev>}`` with every snapshot file a link to its blob."""
    root = tmp_path / "hub" / "models--openai--tiny"
    blobs, snapshot = root / "blobs", root / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    for src in sorted(tiny_repo.rglob("*")):
        if src.is_file():
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            shutil.copyfile(src, blobs / digest)
            link = snapshot / src.relative_to(tiny_repo)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    return root, snapshot


def test_a_cache_snapshot_converts_and_its_blobs_are_inputs(monkeypatch, capsys, hub_cache, tmp_path):
    root, snapshot = hub_cache
    refused(monkeypatch, capsys, root, "convert", snapshot, "--to", "mlx", "-o", root / "blobs", "--force",
            match="the input")
    blob = os.path.realpath(snapshot / "original" / "model--00001-of-00002.safetensors")
    refused(monkeypatch, capsys, root, "convert", snapshot, "--to", "gguf", "-o", blob, "--force",
            match="is the input")
    refused(monkeypatch, capsys, root, "convert", snapshot, "--to", "gguf", "-o", snapshot / "tokenizer.json",
            "--force", match="is the input")
    before = digests(root)
    code, err = run(monkeypatch, capsys, "convert", snapshot, "--to", "gguf", "-o", tmp_path / "ok.gguf", "--quiet")
    assert code == 0, err
    assert digests(root) == before


def test_reading_never_writes_the_input(tiny_repo, tmp_path):
    """The checkpoint is read through read-only handles: it works on read-only files, unchanged."""
    import shutil


    repo = tmp_path / "ro"
    shutil.copytree(tiny_repo, repo)
    files = sorted((repo / "original").iterdir())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for p in files:
        p.chmod(0o444)
    (repo / "original").chmod(0o555)
    try:
        with OriginalCheckpoint(repo) as ckpt:
            assert ckpt.scan() == []
    finally:
        (repo / "original").chmod(0o755)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# Runs the CLI under an audit hook that sees every open(), mmap and file-system change, and records
# those touching the source with write access. Root ignores file permissions, so a chmod-ed
# source would prove nothing on CI runners that run as root; the hook does.
AUDITED_CLI = r"""
import json, mmap, os, sys
source, log_path = os.path.realpath(sys.argv[1]), sys.argv[2]
del sys.argv[1:3]
writes, reads = [], []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.chown",
           "os.utime", "os.link", "os.symlink", "os.mkdir", "shutil.rmtree", "shutil.move", "shutil.copyfile"}

def inside(path):
    try:
        path = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fsdecode(path)
    except (TypeError, OSError):
        return None
    path = os.path.realpath(path)
    return path if path == source or path.startswith(source + os.sep) else None

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        where = inside(path)
        if where:
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            (writes if writing else reads).append(f"open({mode or flags}) {where}")
    elif event == "mmap.__new__":
        fileno, length, access, offset = args
        where = inside(fileno) if fileno != -1 else None
        if where and access not in (mmap.ACCESS_READ, mmap.ACCESS_COPY):
            writes.append(f"mmap(access={access}) {where}")
    elif event in CHANGES:
        touched = args[1:2] if event == "shutil.copyfile" else args[:2]  # copying from the source is reading
        for arg in touched:
            where = inside(arg) if isinstance(arg, (str, bytes, os.PathLike)) else None
            if where:
                writes.append(f"{event} {where}")

sys.addaudithook(hook)
from oss_convert.cli.main import main
try:
    main()
finally:
    with open(log_path, "w") as fh:
        json.dump({"writes": writes, "reads": reads}, fh)
"""


# Every target and variant (the recipes encode from a dense source), and a transformers-layout source.
AUDITED = params(variants=True) + [pytest.param(Case("original-from-hf", "original", (), "tiny_hf", "model"),
                                                id="original-from-hf")]


@pytest.mark.parametrize("case", AUDITED)
def test_the_source_is_never_opened_for_writing(case, request, tmp_path):
    source = request.getfixturevalue(case.source)
    before = tree_hashes(source)
    log = tmp_path / "audit.json"
    result = subprocess.run([sys.executable, "-c", AUDITED_CLI, str(source), str(log),
                             *case.args(source, tmp_path / "out" / case.output)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    audit = json.loads(log.read_text())
    assert audit["writes"] == []
    assert any(".safetensors" in r for r in audit["reads"]) and any("config.json" in r for r in audit["reads"])
    assert tree_hashes(source) == before
