"""Promise: ``--force`` replaces only an output of ours: a folder that is empty, carries our
manifest or holds a registered format, or a file of a registered format; never an input and
never a stranger's file or folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from oss_convert import formats

from helpers import refused, run, run_sub
from targets import params


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    """A fresh copy of the two-shard tiny repo (original/ plus tokenizer files at the root)."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


def test_force_never_replaces_the_repo_with_its_own_conversion(monkeypatch, capsys, repo):
    err = refused(monkeypatch, capsys, repo, "convert", repo, "--to", "mlx", "-o", repo, "--force",
                  match="contains the input")
    assert str(repo) in err and "original" in err


def test_force_never_overwrites_a_source_shard(monkeypatch, capsys, repo):
    shard = repo / "original" / "model--00001-of-00002.safetensors"
    err = refused(monkeypatch, capsys, repo, "convert", repo, "--to", "gguf", "-o", shard, "--force",
                  match="is the input")
    assert shard.name in err
    assert not list(shard.parent.glob("*.manifest.json"))


def test_force_refuses_a_strangers_folder_and_file(monkeypatch, capsys, repo, tmp_path):
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    err = refused(monkeypatch, capsys, stranger, "convert", repo, "--to", "mlx", "-o", stranger, "--force",
                  match="did not write")
    assert "--force only replaces our own outputs" in err
    (stranger / "config.json").write_text('{"camera": "x100"}')  # a config.json alone does not make it ours
    refused(monkeypatch, capsys, stranger, "convert", repo, "--to", "mlx", "-o", stranger, "--force",
            match="did not write")
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    refused(monkeypatch, capsys, tmp_path, "convert", repo, "--to", "gguf", "-o", notes, "--force",
            match="not an artifact oss-convert writes")
    assert notes.read_text() == "my notes"


def test_force_replaces_our_outputs_and_empty_folders(monkeypatch, capsys, repo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(monkeypatch, capsys, "convert", repo, "--to", "mlx", "-o", empty, "--force", "--quiet")[0] == 0
    assert (empty / "oss-convert-manifest.json").is_file()
    assert run(monkeypatch, capsys, "convert", repo, "--to", "mlx", "-o", empty, "--force", "--quiet")[0] == 0
    # an MLX folder without our manifest (another tool's) is a format we write: replaceable
    (empty / "oss-convert-manifest.json").unlink()
    assert run(monkeypatch, capsys, "convert", repo, "--to", "mlx", "-o", empty, "--force", "--quiet")[0] == 0
    gguf = tmp_path / "m.gguf"
    for _ in range(2):
        assert run(monkeypatch, capsys, "convert", repo, "--to", "gguf", "-o", gguf, "--force", "--quiet")[0] == 0


def test_synth_force_refuses_a_strangers_folder(monkeypatch, capsys, tmp_path):
    stranger = tmp_path / "work"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("years of work")
    code, err = run(monkeypatch, capsys, "synth", stranger, "--preset", "tiny", "--force", "--quiet")
    assert code == 2 and "did not write" in err
    assert (stranger / "thesis.tex").read_text() == "years of work"
    mine = tmp_path / "mine"
    assert run(monkeypatch, capsys, "synth", mine, "--preset", "tiny", "--quiet")[0] == 0
    assert run(monkeypatch, capsys, "synth", mine, "--preset", "tiny", "--force", "--quiet")[0] == 0


@pytest.mark.parametrize("case", params())
def test_force_replaces_an_earlier_output_of_every_registered_target(case, request, tmp_path):
    """Without its manifest, only the registry can tell an earlier output is ours: it must."""
    source = request.getfixturevalue(case.source)
    out = tmp_path / case.output
    assert run_sub(*case.args(source, out, "--no-manifest")).returncode == 0
    assert formats.is_ours(out), case.name
    again = run_sub(*case.args(source, out, "--force"))
    assert again.returncode == 0, again.stderr
