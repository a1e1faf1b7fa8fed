"""The tokenizer check: every artifact's vocabulary, specials and BOS/EOS/pad against the
reference repo's tokenizer.json; planted defects fail naming the id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from oss_convert import formats, converters
from oss_convert.tokens.vocabulary import Vocabulary
from oss_convert.verify import vocabulary
from oss_convert.verify.check import Inputs, verify

FAST = Inputs(ctx=256, max_chunks=1)


def _vocab_of(path: Path) -> Vocabulary:
    model = formats.open_canonical(path)
    try:
        return model.embedded().vocabulary
    finally:
        model.close()


@pytest.mark.parametrize("target, name", [("gguf", "m.gguf"), ("mlx", "mlx"), ("hf", "hf")])
def test_every_target_carries_the_reference_vocabulary(tiny_repo, tmp_path, target, name):
    out = converters.convert(tiny_repo, target, tmp_path / name).output
    ref = vocabulary.of_reference(tiny_repo / "tokenizer.json")
    art = _vocab_of(out)
    assert len(art.tokens) == len(ref.tokens) == 1003 and len(art.specials) == 21
    assert vocabulary.compare(ref, art, 1024) == []
    if target == "gguf":  # GGUF declares BOS/EOS/pad itself
        assert art.ids == ref.ids and ref.ids["eos"] == 1007


def test_metal_carries_the_reference_vocabulary(metal_repo, tmp_path):
    out = converters.convert(metal_repo, "metal", tmp_path / "metal").output
    ref = vocabulary.of_reference(metal_repo / "tokenizer.json")
    art = _vocab_of(out)
    assert len(art.tokens) == 199998 and {"<|return|>", "<|call|>", "<|start|>"} <= set(art.specials.values())
    assert vocabulary.compare(ref, art, 200014) == []


def _edited_repo(tiny_repo: Path, tmp_path: Path, edit) -> Path:
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "edited"))
    edit(repo)
    return repo


def _swap_tokens(repo: Path) -> None:
    path = repo / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (500, 501))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def _eos_elsewhere(repo: Path) -> None:
    path = repo / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["eos_token"] = "<|end|>"
    path.write_text(json.dumps(config))


def _drop_special(repo: Path) -> None:
    path = repo / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] != "<|call|>"]
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("edit, expect", [
    (_swap_tokens, ["token 500:", "token 501:"]),
    (_eos_elsewhere, ["EOS id: artifact 1012, reference 1007"]),
    (_drop_special, ["special 1017: artifact text token b'<|call|>', reference '<|call|>'"]),
])
def test_a_planted_defect_in_a_gguf_fails_naming_the_id(tiny_repo, tmp_path, edit, expect):
    bad = converters.convert(_edited_repo(tiny_repo, tmp_path, edit), "gguf", tmp_path / "bad.gguf").output
    problems = vocabulary.compare(vocabulary.of_reference(tiny_repo / "tokenizer.json"), _vocab_of(bad), 1024)
    for text in expect:
        assert any(p.startswith(text) and "bad.gguf" in p for p in problems), problems


def test_verify_reports_the_tokenizer_check(tiny_repo, tmp_path):
    good = converters.convert(tiny_repo, "gguf", tmp_path / "good.gguf").output
    report = verify(good, tiny_repo, FAST, check_tensors=False)
    tok = next(c for c in report["checks"] if c["name"] == "tokenizer")
    assert tok["status"] == "pass" and report["tokenizer"]["same_vocabulary"] is True
    bad = converters.convert(_edited_repo(tiny_repo, tmp_path, _swap_tokens), "gguf", tmp_path / "bad.gguf").output
    report = verify(bad, tiny_repo, FAST, check_tensors=False)
    assert report["verdict"] == "fail"
    assert any(r.startswith("tokenizer: token 500:") for r in report["reasons"]), report["reasons"]


def test_inspect_shows_the_tokenizer_stop_ids_and_template(tiny_repo, tmp_path):
    import hashlib

    from click.testing import CliRunner

    from oss_convert.cli.main import cli

    out = converters.convert(tiny_repo, "hf", tmp_path / "hf").output
    result = CliRunner().invoke(cli, ["inspect", str(out), "--json"], catch_exceptions=False)
    tok = json.loads(result.stdout)["tokenizer"]
    assert tok["text_tokens"] == 1003 and tok["specials"] == 21
    assert tok["eos"] == {"id": 1007, "token": "<|return|>"} and tok["bos"]["token"] == "<|startoftext|>"
    assert tok["stop_ids"] == [1004, 1007, 1017]  # generation_config: return, endoftext, call
    template = (tiny_repo / "chat_template.jinja").read_bytes()
    assert tok["chat_template"]["sha256"] == hashlib.sha256(template).hexdigest()
    assert tok["chat_template"]["harmony_template"] is True  # synthetic repos carry oss-convert's template
    gguf = converters.convert(tiny_repo, "gguf", tmp_path / "m.gguf").output
    tok = json.loads(CliRunner().invoke(cli, ["inspect", str(gguf), "--json"]).stdout)["tokenizer"]
    assert tok["chat_template"]["source"] == "GGUF tokenizer.chat_template"
    assert tok["chat_template"]["sha256"] == hashlib.sha256(template).hexdigest()
