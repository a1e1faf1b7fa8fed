"""Issue 13: the input is never damaged, whatever the flags.

Every refused command leaves every byte of the source as it was (sha256 of each file checked
before and after) and exits 2 with a message naming the paths. ``--force`` replaces an earlier
output of ours, never an input and never a stranger's file or folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from oss_convert import atomic, synth
from oss_convert.atomic import atomic_output
from oss_convert.cli.main import main
from oss_convert.errors import InputError, OutputExistsError
from oss_convert.formats.gguf import GgufModel
from oss_convert.formats.safetensors import SafetensorsFile


def run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``oss-convert ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["oss-convert", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links followed), and the link targets themselves."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root)) + " ->"] = os.readlink(p)
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def repo(tiny_repo, tmp_path) -> Path:
    """A fresh copy of the two-shard tiny repo (original/ plus tokenizer files at the root)."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


def refused(monkeypatch, capsys, repo: Path, *args: str, match: str) -> str:
    before = digests(repo)
    code, err = run(monkeypatch, capsys, *args)
    assert code == 2, err
    assert match in err, err
    assert digests(repo) == before  # not one byte of the source changed
    return err


# -- the output is, contains or would be read as an input ---------------------------------------


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


# -- a Hugging Face cache snapshot: files are links into blobs/ -----------------------------------


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


# -- --force replaces only our own outputs ------------------------------------------------------


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


# -- the safetensors rule we let through ---------------------------------------------------------


def _with_duplicate_key(path: Path) -> None:
    """Rewrite ``path``'s header so its first tensor is named twice (JSON parsers keep one)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode().rstrip()
    first = next(k for k in json.loads(header) if k != "__metadata__")
    entry = json.dumps(json.loads(header)[first], separators=(",", ":"))
    doubled = header[:-1] + f',"{first}":{entry}' + "}"
    doubled += " " * (-len(doubled) % 8)
    path.write_bytes(struct.pack("<Q", len(doubled)) + doubled.encode() + raw[8 + n:])


def test_duplicate_keys_are_an_error_naming_file_and_key(monkeypatch, capsys, repo):
    shard = repo / "original" / "model--00001-of-00002.safetensors"
    _with_duplicate_key(shard)
    with pytest.raises(InputError, match="twice") as info:
        SafetensorsFile(shard)
    assert str(shard) in str(info.value) and "embedding.weight" in str(info.value)
    code, err = run(monkeypatch, capsys, "inspect", repo)
    assert code == 2 and "twice" in err and shard.name in err and "embedding.weight" in err


# -- publishing: never a mix, the manifest first, never clobbering a concurrent job --------------


def test_a_kill_while_publishing_a_split_never_shows_a_mix(monkeypatch, capsys, tiny_repo, tmp_path):
    out = tmp_path / "m.gguf"
    split = ("--split-max-size", "1M", "--quiet", "--force")
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", out, *split)[0] == 0
    shards = sorted(tmp_path.glob("m-*.gguf"))
    assert len(shards) >= 3
    old = {p.name: p.read_bytes() for p in shards}
    other = synth.generate(tmp_path / "other", "tiny", seed=9, tokenizer=True)
    real_place = atomic._place
    for stop_after in range(len(shards) + 1):  # interrupt after the manifest, after each shard
        calls = []

        def place(tmp, dest, force, calls=calls, stop_after=stop_after):
            if len(calls) >= stop_after:
                raise KeyboardInterrupt
            calls.append(dest.name)
            real_place(tmp, dest, force)

        monkeypatch.setattr(atomic, "_place", place)
        code, _ = run(monkeypatch, capsys, "convert", other, "--to", "gguf", "-o", out, *split)
        monkeypatch.setattr(atomic, "_place", real_place)
        assert code == 130
        present = {p.name: p.read_bytes() for p in sorted(tmp_path.glob("m-*.gguf"))}
        first = shards[0].name
        if first in present:  # readable: then every shard is the old one
            assert present == old, f"a mix after {calls}"
            with GgufModel(shards[0]) as model:
                assert model.files == shards
        else:  # the set is not readable from any shard
            for p in present:
                with pytest.raises(InputError, match="missing"):
                    GgufModel(tmp_path / p)
        assert not list(tmp_path.glob(".*.partial")), "temporary files left behind"
        # the next complete conversion restores a readable set
        assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", out, *split)[0] == 0


def test_the_manifest_is_published_before_the_artifact(monkeypatch, capsys, tiny_repo, tmp_path):
    order = []
    real_place = atomic._place

    def place(tmp, dest, force):
        order.append(dest.name)
        real_place(tmp, dest, force)

    monkeypatch.setattr(atomic, "_place", place)
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", tmp_path / "m.gguf", "--quiet")[0] == 0
    assert order == ["m.gguf.manifest.json", "m.gguf"]
    order.clear()
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "gguf", "-o", tmp_path / "s.gguf", "--quiet",
               "--split-max-size", "1M")[0] == 0
    assert order[0].startswith("s-00001-of-") and order[0].endswith(".gguf.manifest.json")
    assert order[-1].startswith("s-00001-of-")  # the first shard, which readers start from, goes last
    order.clear()
    assert run(monkeypatch, capsys, "convert", tiny_repo, "--to", "mlx", "-o", tmp_path / "mlx", "--quiet")[0] == 0
    assert order == ["mlx"]  # the folder's manifest is inside it before it is renamed into place


@pytest.mark.parametrize("is_dir", [False, True])
def test_two_jobs_to_the_same_output_never_clobber_each_other(tmp_path, is_dir):
    """The second job started before the first finished; the first to finish keeps the output."""
    dest = tmp_path / "out"

    def fill(tmp: Path, text: str) -> None:
        (tmp / "data" if is_dir else tmp).write_text(text)

    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic_output(dest, is_dir=is_dir) as first:
            fill(first, "first")
            with atomic_output(dest, is_dir=is_dir) as second:
                fill(second, "second")
    assert (dest / "data" if is_dir else dest).read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
