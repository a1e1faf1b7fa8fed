"""The tokenizer an artifact carries, id by id, against the reference repo's own files.

Every artifact kind is read into one ``Vocabulary``: the bytes of every text token, the
special tokens at their ids, and the BOS / EOS / padding ids where the format declares them.

- Hugging Face folders (``original/`` repos, MLX, transformers): ``tokenizer.json`` (byte-level
  BPE: GPT-2's printable stand-ins decoded back to bytes; ``added_tokens`` marked special), with
  ``tokenizer_config.json``'s bos/eos/pad token names;
- GGUF: ``tokenizer.ggml.tokens`` / ``token_type`` (CONTROL = special; UNUSED padding rows
  skipped) and ``tokenizer.ggml.{bos,eos,padding}_token_id``;
- Metal ``model.bin``: its 199998 text tokens; its special slots carry UUIDs, not text, and it
  declares no BOS/EOS, so only the text tokens and the named slots are compared.

``compare`` lists each difference naming the id and both values; a planted defect (two tokens
swapped, EOS at another id, a special missing) fails with the id it touched.
Imports: base modules, ``formats``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..chat import HARMONY_TEMPLATE
from ..errors import InputError
from ..formats.hf import generation_eos
from ..harmony import STOP_TEXTS
from ..tokenizer import _byte_to_unicode

ROLES = ("bos", "eos", "pad")
MAX_LISTED = 5


@dataclass
class Vocabulary:
    file: str
    tokens: dict[int, bytes] = field(default_factory=dict)  # text tokens: id -> bytes
    specials: dict[int, str] = field(default_factory=dict)  # special tokens: id -> text
    ids: dict[str, int | None] = field(default_factory=dict)  # bos/eos/pad where the format declares them
    # Metal names only some special slots, after upstream's own table (its 200000 is <|untrusted|>,
    # where tokenizer.json has <|reserved_200000|>): only the names both share are compared.
    named_slots_only: bool = False


def _from_unicode(text: str, table: dict[str, int]) -> bytes | None:
    try:
        return bytes(table[ch] for ch in text)
    except KeyError:
        return None  # not byte-level text: compared as its UTF-8 below


def from_tokenizer_json(folder: Path) -> Vocabulary:
    path = folder / "tokenizer.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        vocab, added = doc["model"]["vocab"], doc.get("added_tokens", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the tokenizer: {exc}", file=path) from exc
    table = {ch: b for b, ch in _byte_to_unicode().items()}
    out = Vocabulary(str(path))
    special_ids = {int(t["id"]) for t in added if t.get("special")}
    for text, i in vocab.items():
        if i not in special_ids:
            out.tokens[int(i)] = _from_unicode(text, table) or text.encode("utf-8")
    for t in added:
        if t.get("special"):
            out.specials[int(t["id"])] = t["content"]
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"cannot read the tokenizer config: {exc}", file=config_path) from exc
    by_text = {text: i for i, text in out.specials.items()}
    for role in ROLES:
        name = config.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        out.ids[role] = by_text.get(name) if name is not None else None
    return out


def from_gguf(model) -> Vocabulary:
    tokens = model.value("tokenizer.ggml.tokens")
    types = model.value("tokenizer.ggml.token_type")
    if tokens is None or types is None or len(tokens) != len(types):
        raise InputError("no usable tokenizer.ggml.tokens / token_type", file=model.path)
    table = {ch: b for b, ch in _byte_to_unicode().items()}
    out = Vocabulary(str(model.path))
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind == 3:  # CONTROL
            out.specials[i] = text
        elif kind != 5:  # UNUSED: the converter's [PADn] rows
            out.tokens[i] = _from_unicode(text, table) or text.encode("utf-8")
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        value = model.value(f"tokenizer.ggml.{key}")
        out.ids[role] = int(value) if value is not None else None
    return out


def from_metal(model) -> Vocabulary:
    from ..formats.metal import UUID_NAMES

    out = Vocabulary(str(model.path))
    tokens = model.text_tokens()
    out.tokens = dict(enumerate(tokens))
    for offset, uuid in enumerate(model.special_uuids()):
        name = UUID_NAMES.get(uuid)
        if name is not None:  # unnamed slots hold a zero UUID upstream: nothing to compare
            out.specials[len(tokens) + offset] = name
    out.ids = {role: None for role in ROLES}
    out.named_slots_only = True
    return out


def of_artifact(model, tokenizer_json: Path | None) -> Vocabulary | None:
    """The artifact's own vocabulary (embedded in a GGUF or a model.bin, else its tokenizer.json),
    or ``None`` when it carries none."""
    from ..formats.gguf import GgufModel
    from ..formats.metal import MetalModel

    if isinstance(model, GgufModel):
        return from_gguf(model)
    if isinstance(model, MetalModel):
        return from_metal(model)
    return from_tokenizer_json(tokenizer_json.parent) if tokenizer_json is not None else None


def compare(ref: Vocabulary, art: Vocabulary, rows: int) -> list[str]:
    """Differences over ids below ``rows`` (the vocabulary rows both models have)."""
    problems: list[str] = []
    missing = [i for i in sorted(ref.tokens) if i < rows and i not in art.tokens and i not in art.specials]
    differ = [i for i in sorted(ref.tokens) if i < rows and i in art.tokens and art.tokens[i] != ref.tokens[i]]
    for i in differ[:MAX_LISTED]:
        problems.append(f"token {i}: artifact {art.tokens[i]!r}, reference {ref.tokens[i]!r} ({art.file})")
    if len(differ) > MAX_LISTED:
        problems.append(f"and {len(differ) - MAX_LISTED} more tokens differ")
    for i in missing[:MAX_LISTED]:
        problems.append(f"token {i} ({ref.tokens[i]!r}) is missing from the artifact ({art.file})")
    if art.named_slots_only:
        where = {text: i for i, text in ref.specials.items()}
        for i, name in sorted(art.specials.items()):
            if name in where and where[name] != i:
                problems.append(f"special {name}: artifact id {i}, reference id {where[name]} ({art.file})")
    else:
        for i, text in sorted(ref.specials.items()):
            if i >= rows:
                continue
            got = art.specials.get(i)
            if got != text:
                shown = repr(got) if got is not None else (f"text token {art.tokens[i]!r}" if i in art.tokens else "nothing")
                problems.append(f"special {i}: artifact {shown}, reference {text!r} ({art.file})")
    for role in ROLES:
        want, got = ref.ids.get(role), art.ids.get(role)
        if want is not None and got is not None and want != got:
            problems.append(f"{role.upper()} id: artifact {got}, reference {want} ({art.file})")
    return problems


def chat_template(model, tokenizer_json: Path | None) -> tuple[str, str] | None:
    """``(where it came from, text)`` of the artifact's chat template, or ``None``."""
    from ..formats.gguf import GgufModel

    if isinstance(model, GgufModel):
        text = model.value("tokenizer.chat_template")
        return ("GGUF tokenizer.chat_template", text) if text else None
    if tokenizer_json is None:
        return None
    folder = tokenizer_json.parent
    if (folder / "chat_template.jinja").is_file():
        return str(folder / "chat_template.jinja"), (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        text = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(text, str):
            return f"{config} chat_template", text
    return None


def summary(model, tokenizer_json: Path | None) -> dict:
    """What ``inspect`` shows of an artifact's tokenizer: size, specials, BOS/EOS/pad, stop ids, template."""
    import hashlib

    vocab = of_artifact(model, tokenizer_json)
    if vocab is None:
        return {"present": False}
    names = vocab.specials
    out = {"present": True, "file": vocab.file, "text_tokens": len(vocab.tokens), "specials": len(vocab.specials),
           **{role: ({"id": i, "token": names.get(i)} if i is not None else None) for role, i in vocab.ids.items()},
           "stop_ids": stop_ids(model, vocab, tokenizer_json)}
    template = chat_template(model, tokenizer_json)
    out["chat_template"] = None if template is None else {
        "source": template[0], "sha256": hashlib.sha256(template[1].encode("utf-8")).hexdigest(), "chars": len(template[1]),
        "harmony_template": template[1] == HARMONY_TEMPLATE}
    return out


def stop_problems(model, vocab: Vocabulary, tokenizer_json: Path | None) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of the ids a runtime stops generating on.

    - GGUF: llama.cpp stops on EOS and marks end-of-generation by token text at load; EOS must
      be ``<|return|>`` (never ``<|end|>``, which ends every message) and ``<|call|>`` must be
      a control token;
    - Hugging Face folders: ``generation_config.json``'s ``eos_token_id`` (transformers and
      mlx-lm stop on that list) must hold ``<|return|>`` and ``<|call|>``;
    - Metal: the runtime knows its stop tokens; nothing is declared.
    """
    from ..formats.gguf import GgufModel

    by_text = {text: i for i, text in vocab.specials.items()}
    missing = [t for t in STOP_TEXTS if t not in by_text]
    if missing:
        return [f"no {' or '.join(missing)} among the special tokens ({vocab.file})"], []
    if vocab.named_slots_only:
        return [], []
    if isinstance(model, GgufModel):
        eos = vocab.ids.get("eos")
        if eos is None or vocab.specials.get(eos) != "<|return|>":
            shown = vocab.specials.get(eos, vocab.tokens.get(eos)) if eos is not None else None
            return [f"EOS is {shown!r} (id {eos}), not <|return|> (id {by_text['<|return|>']}): generation "
                    f"would not stop where Harmony does ({vocab.file})"], []
        return [], []
    config = tokenizer_json.parent / "generation_config.json" if tokenizer_json is not None else None
    if config is None or not config.is_file():
        return [], ["no generation_config.json: transformers and mlx-lm stop only on the tokenizer's EOS, "
                    "not on <|call|>"]
    eos = generation_eos(config.parent)
    declared = set(eos if isinstance(eos, list) else [eos])
    lacking = [f"{t} (id {by_text[t]})" for t in STOP_TEXTS if by_text[t] not in declared]
    if lacking:
        return [f"generation_config.json eos_token_id {sorted(declared, key=str)} lacks {', '.join(lacking)}: "
                f"generation would run past it ({config})"], []
    return [], []


def stop_ids(model, vocab: Vocabulary, tokenizer_json: Path | None) -> list[int]:
    """The ids a runtime stops on: generation_config's eos list (HF folders), or the GGUF's eos/eot."""
    from ..formats.gguf import GgufModel

    if isinstance(model, GgufModel):
        ids = [model.value(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return sorted({int(i) for i in ids if i is not None})
    if tokenizer_json is not None and (tokenizer_json.parent / "generation_config.json").is_file():
        eos = generation_eos(tokenizer_json.parent)
        return sorted(eos if isinstance(eos, list) else [eos]) if eos is not None else []
    return [vocab.ids["eos"]] if vocab.ids.get("eos") is not None else []
