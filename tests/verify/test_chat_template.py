"""Chat templates against openai-harmony: our template renders every chat as Harmony does (the
corpus and generated chats), the real gpt-oss template's differences are measured chat by chat,
the runtimes (llama-cpp-python's formatter and llama.cpp's tokenizer, mlx-lm's
apply_chat_template) give Harmony's tokens from our artifacts, and verify reports it all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from chat_strategies import chats
from oracles import llama
from helpers import run_cli
from oss_convert import converters
from oss_convert.tokens import bounded, harmony, templates as chat
from oss_convert.verify.check import Inputs, verify

FAST = Inputs(ctx=256, max_chunks=1)

# Measured with openai-harmony 0.0.8 and llama.cpp's copy of the gpt-oss template: each chat's
# verdict and what the template writes where it first parts from Harmony (after the split mark).
REAL_TEMPLATE_VERDICTS = {
    "user only": None,
    "reasoning low": None,
    "reasoning high": None,
    "developer instructions": ".\n\n<|end|>",  # a blank line after the instructions
    "system message as instructions": ".\n\n<|end|>",
    "function tools": ",\n}) => any;",  # a stray "," after a default's comment
    "tool described over two lines": ".\nReturns at most",  # the second line left uncommented
    "instructions and tools": ",\n}) => any;",  # (with tools, the blank line after the instructions is right)
    "analysis and final": None,
    "tool call, string arguments": '"{\\"path\\"',  # the arguments string re-quoted by tojson
    "tool call, default content type": " json<|message|>",  # not " <|constrain|>json"
    "tool result": '"{\\"ok\\"',  # the tool's output re-quoted by tojson
    "tool call then answer": ",\n}) => any;",
    "multi-turn history": "final<|message|>Green.",  # the later turn's analysis dropped too
    "generation prompt off, user last": None,
    "generation prompt off, assistant last": "analysis<|message|>Greet back.",  # the last turn's CoT, then <|return|>
    "non-ASCII and newlines": None,
    "custom model identity": None,
}


_OURS = chat.compile_template(chat.HARMONY_TEMPLATE, "harmony")


def _after_split(context: str) -> str:
    return context[context.index("⟦") + 1:]


def test_our_template_renders_the_corpus_as_harmony_does():
    template = chat.compile_template(chat.HARMONY_TEMPLATE, "harmony")
    verdicts = [chat.compare_chat(template, c) for c in chat.CORPUS]
    assert [v.status for v in verdicts] == ["same"] * len(chat.CORPUS), [v.to_dict() for v in verdicts if v.status != "same"]
    assert len(chat.CORPUS) >= 16 and min(v.tokens for v in verdicts) > 50


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(chats())
def test_our_template_renders_generated_chats_as_harmony_does(generated):
    verdict = chat.compare_chat(_OURS, generated)
    assert verdict.status == "same", verdict.to_dict()


def test_the_check_finds_a_one_token_change():
    changed = chat.HARMONY_TEMPLATE.replace("Knowledge cutoff: 2024-06", "Knowledge cutoff: 2024-07")
    verdicts = bounded.check(changed, "changed.jinja")
    assert {v.status for v in verdicts} == {"differs"}
    first = verdicts[0]
    assert "2024-07" in first.template_context.replace("⟦", "") and "2024-06" in first.harmony_context.replace("⟦", "")


@pytest.mark.oracle
def test_the_real_template_is_measured_chat_by_chat(real_chat_template):
    assert len(real_chat_template.encode("utf-8")) == 16738
    verdicts = {v.name: v for v in bounded.check(real_chat_template, "openai-gpt-oss-120b.jinja")}
    assert set(verdicts) == set(REAL_TEMPLATE_VERDICTS)
    for name, where in REAL_TEMPLATE_VERDICTS.items():
        v = verdicts[name]
        if where is None:
            assert v.status == "same", v.to_dict()
        else:
            assert v.status == "differs" and _after_split(v.template_context).startswith(where), v.to_dict()


# --------------------------------------------------------------------------------------
# The runtimes, on our artifacts


@pytest.fixture(scope="module")
def harmony_gguf(metal_repo, tmp_path_factory) -> Path:
    """A full-vocabulary GGUF with our template embedded."""
    return converters.convert(metal_repo, "gguf", tmp_path_factory.mktemp("hg") / "h.gguf",
                              chat_template="harmony").output


@pytest.mark.oracle
def test_llama_cpp_python_formats_and_tokenizes_as_harmony(harmony_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama(harmony_gguf, n_ctx=64, verbose=False, vocab_only=True)
    try:
        embedded = llm.metadata["tokenizer.chat_template"]
        assert embedded == chat.HARMONY_TEMPLATE
        for item in chat.CORPUS:
            kwargs = {k: v for k, v in item.items() if k in ("reasoning_effort", "model_identity")}
            formatter = Jinja2ChatFormatter(embedded, eos_token="<|return|>", bos_token="<|startoftext|>",
                                            add_generation_prompt=item.get("add_generation_prompt", True))
            prompt = formatter(messages=item["messages"], tools=item.get("tools"), **kwargs).prompt
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            assert tokens == harmony.render(item, chat.today()), item["name"]
        # llama.cpp stops where Harmony does: <|return|> and <|call|> end generation, <|end|> does not
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in harmony.stop_ids())
        assert not llama_cpp.llama_vocab_is_eog(vocab, harmony.tokenize("<|end|>")[0])
    finally:
        llm.close()


@pytest.mark.oracle
def test_mlx_lm_applies_our_template_as_harmony_renders(metal_repo, tmp_path):
    from mlx_lm.utils import load_config, load_tokenizer

    out = converters.convert(metal_repo, "mlx", tmp_path / "mlx", chat_template="harmony").output
    tokenizer = load_tokenizer(out, eos_token_ids=load_config(out)["eos_token_id"])  # as mlx_lm.load does
    for item in chat.CORPUS:
        kwargs = {k: v for k, v in item.items() if k in ("reasoning_effort", "model_identity")}
        tokens = tokenizer.apply_chat_template(item["messages"], tools=item.get("tools"),
                                               add_generation_prompt=item.get("add_generation_prompt", True), **kwargs)
        assert list(tokens) == harmony.render(item, chat.today()), item["name"]
    assert set(harmony.stop_ids()) <= set(tokenizer.eos_token_ids)  # generation_config.json's list


# --------------------------------------------------------------------------------------
# convert --chat-template, and verify's template check


def _repo_with_template(tiny_repo: Path, tmp_path: Path, text: str) -> Path:
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    (repo / "chat_template.jinja").write_text(text, encoding="utf-8")
    return repo


def _template_check(report: dict) -> dict:
    return next(c for c in report["checks"] if c["name"] == "template")


@pytest.mark.oracle
def test_convert_embeds_the_chosen_template(tiny_repo, tmp_path, real_chat_template):
    repo = _repo_with_template(tiny_repo, tmp_path, real_chat_template)
    for target, name in (("mlx", "mlx"), ("hf", "hf"), ("hf-bf16", "bf16"), ("original", "orig")):
        kept = converters.convert(repo, target, tmp_path / f"{name}-keep").output
        assert (kept / "chat_template.jinja").read_text(encoding="utf-8") == real_chat_template
        ours = converters.convert(repo, target, tmp_path / f"{name}-h", chat_template="harmony").output
        assert (ours / "chat_template.jinja").read_text(encoding="utf-8") == chat.HARMONY_TEMPLATE
    gguf = converters.convert(repo, "gguf", tmp_path / "h.gguf", chat_template="harmony")
    manifest = json.loads(gguf.manifest.read_text())
    assert manifest["options"]["chat_template"] == "harmony"
    from oss_convert.formats.gguf import GgufModel

    with GgufModel(gguf.output) as model:
        assert model.value("tokenizer.chat_template") == chat.HARMONY_TEMPLATE


def test_convert_refuses_a_template_that_does_not_parse(tiny_repo, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tiny_repo), "--to", "gguf", "-o",
                           str(tmp_path / "x.gguf"), "--chat-template", str(bad), "-q")
    assert code == 2 and "bad.jinja" in err and "does not parse" in err and "(line 1)" in err
    assert not (tmp_path / "x.gguf").exists()
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tiny_repo), "--to", "metal", "-o", str(tmp_path / "m"),
                           "--chat-template", "harmony", "-q")
    assert code == 2 and "--chat-template does not apply to --to metal" in err


def test_verify_passes_our_template_and_reports_each_chat(tiny_repo, tmp_path):
    out = converters.convert(tiny_repo, "mlx", tmp_path / "mlx").output
    report = verify(out, tiny_repo, FAST, check_tensors=False)
    assert _template_check(report)["status"] == "pass"
    template = report["chat_template"]
    assert template["harmony_template"] and template["same"] == len(chat.CORPUS) and template["regressions"] == []
    assert [r["name"] for r in template["conversations"]] == [c["name"] for c in chat.CORPUS]


@pytest.mark.oracle
def test_verify_fails_a_template_the_conversion_changed(tiny_repo, tmp_path, real_chat_template):
    """The reference's template is ours; the artifact carries the real one: every chat the real
    one renders differently is a regression, named with its first difference."""
    src = tmp_path / "real.jinja"
    src.write_text(real_chat_template, encoding="utf-8")
    out = converters.convert(tiny_repo, "gguf", tmp_path / "real.gguf", chat_template=str(src)).output
    report = verify(out, tiny_repo, FAST, check_tensors=False)
    assert report["verdict"] == "fail" and _template_check(report)["status"] == "fail"
    differing = sorted(name for name, where in REAL_TEMPLATE_VERDICTS.items() if where is not None)
    assert sorted(report["chat_template"]["regressions"]) == differing
    assert any("'tool result' differs from openai-harmony at token" in r for r in report["reasons"])


@pytest.mark.oracle
def test_verify_reports_the_real_templates_differences_without_failing(tiny_repo, tmp_path, real_chat_template):
    """A repo whose own template is the real one: the artifact keeps it; the differences are
    reported as notes, and fail only with strict."""
    repo = _repo_with_template(tiny_repo, tmp_path, real_chat_template)
    out = converters.convert(repo, "mlx", tmp_path / "mlx").output
    report = verify(out, repo, FAST, check_tensors=False)
    assert _template_check(report)["status"] == "pass", report["reasons"]
    assert report["chat_template"]["same_text_as_reference"] and report["chat_template"]["regressions"] == []
    assert sum("(as the reference's template)" in n for n in report["notes"]) == 11
    strict = verify(out, repo, FAST, check_tensors=False, strict_chat_template=True)
    assert _template_check(strict)["status"] == "fail" and len(strict["reasons"]) == 11


def test_verify_says_not_checked_without_a_template(tiny_repo, tmp_path):
    out = converters.convert(tiny_repo, "mlx", tmp_path / "mlx").output
    (out / "chat_template.jinja").unlink()
    report = verify(out, tiny_repo, FAST, check_tensors=False)
    check = _template_check(report)
    assert check["status"] == "not_checked" and "no chat template" in check["summary"]


def test_verify_fails_a_template_that_does_not_parse(tiny_repo, tmp_path):
    out = converters.convert(tiny_repo, "mlx", tmp_path / "mlx").output
    (out / "chat_template.jinja").write_text("{% if messages %}")
    report = verify(out, tiny_repo, FAST, check_tensors=False)
    assert _template_check(report)["status"] == "fail"
    assert any("chat_template.jinja" in r and "does not parse" in r for r in report["reasons"]), report["reasons"]


def test_verify_fails_stop_ids_runtimes_would_run_past(tiny_repo, tmp_path):
    out = converters.convert(tiny_repo, "mlx", tmp_path / "mlx").output
    config = out / "generation_config.json"
    doc = json.loads(config.read_text())
    doc["eos_token_id"] = [1007, 1004]  # <|call|> (1017) dropped: tool calls would run on
    config.write_text(json.dumps(doc))
    report = verify(out, tiny_repo, FAST, check_tensors=False)
    assert any("lacks <|call|> (id 1017)" in r for r in report["reasons"]), report["reasons"]


def test_verify_fails_a_gguf_whose_eos_is_end(tiny_repo, tmp_path):
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    config = json.loads((repo / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|end|>"  # what llama.cpp must never stop on (it ends every message)
    (repo / "tokenizer_config.json").write_text(json.dumps(config))
    out = converters.convert(repo, "gguf", tmp_path / "end.gguf").output
    report = verify(out, tiny_repo, FAST, check_tensors=False)
    assert any("EOS is '<|end|>' (id 1012), not <|return|> (id 1007)" in r for r in report["reasons"]), report["reasons"]


def test_a_truncated_tokenizer_is_an_error_naming_the_file(tiny_repo, tmp_path, monkeypatch, capsys):
    out = converters.convert(tiny_repo, "mlx", tmp_path / "mlx").output
    data = (out / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(monkeypatch, capsys, "verify", str(out), "--reference", str(tiny_repo), "--ctx", "256",
                           "--chunks", "1", "-q", "--no-tensors")
    assert code == 2 and f"{out / 'tokenizer.json'}: cannot read the tokenizer" in err, err


def test_a_cache_keeps_the_reference_template_for_where_the_repo_is_not(tiny_repo, tmp_path):
    """verify against a cache made elsewhere (the repo gone) still holds the artifact's template
    against the reference's, as the cache recorded it: a template that renders none of the chats
    right fails; the reference's own passes."""
    from oss_convert.verify.check import make_reference

    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    cache = make_reference(repo, FAST).save(tmp_path / "ref.npz")
    shutil.rmtree(repo)
    good = converters.convert(tiny_repo, "mlx", tmp_path / "good").output
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    (bad / "chat_template.jinja").write_text("{{ messages[0].content }}", encoding="utf-8")
    passed = verify(good, cache, FAST, check_tensors=False)
    assert _template_check(passed)["status"] == "pass"
    assert "as recorded in the reference cache" in passed["chat_template"]["reference_source"]
    failed = verify(bad, cache, FAST, check_tensors=False)
    assert _template_check(failed)["status"] == "fail" and len(failed["chat_template"]["regressions"]) == len(chat.CORPUS)
