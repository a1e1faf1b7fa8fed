"""The tokenizer an artifact carries, id by id, against the reference repo's own files.

Every artifact's reader says what it embeds (``CanonicalModel.embedded``: a
``tokens.vocabulary.Embedded``): the bytes of every text token, the special tokens at their
ids, BOS / EOS / padding where the format declares them, its chat template and the ids a
runtime stops on. This module judges them:

- ``compare`` lists each vocabulary difference naming the id and both values; a planted
  defect (two tokens swapped, EOS at another id, a special missing) fails with the id it touched;
- ``stop_problems`` holds the stop ids to what Harmony needs (``<|return|>`` and ``<|call|>``),
  by the rule of the artifact's runtime (``Embedded.stops``);
- ``summary`` is what ``inspect`` shows.
Imports: base modules, ``tokens``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..tokens.files import TokenizerJson, tokenizer_config
from ..tokens.harmony import STOP_TEXTS
from ..tokens.templates import HARMONY_TEMPLATE
from ..tokens.vocabulary import ROLES, Embedded, Vocabulary

MAX_LISTED = 5


def of_reference(tokenizer_json: Path) -> Vocabulary:
    """The reference repo's vocabulary, from its ``tokenizer.json`` and ``tokenizer_config.json``."""
    return TokenizerJson(tokenizer_json).vocabulary(tokenizer_config(Path(tokenizer_json).parent))


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


def stop_problems(embedded: Embedded) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of the ids a runtime stops generating on (``Embedded.stops`` says
    which rule the artifact's runtime follows)."""
    vocab = embedded.vocabulary
    by_text = {text: i for i, text in vocab.specials.items()}
    missing = [t for t in STOP_TEXTS if t not in by_text]
    if missing:
        return [f"no {' or '.join(missing)} among the special tokens ({vocab.file})"], []
    if embedded.stops == "runtime":
        return [], []
    if embedded.stops == "eos":
        eos = vocab.ids.get("eos")
        if eos is None or vocab.specials.get(eos) != "<|return|>":
            shown = vocab.specials.get(eos, vocab.tokens.get(eos)) if eos is not None else None
            return [f"EOS is {shown!r} (id {eos}), not <|return|> (id {by_text['<|return|>']}): generation "
                    f"would not stop where Harmony does ({vocab.file})"], []
        return [], []
    config = Path(vocab.file).parent / "generation_config.json"
    if embedded.stop_ids is None:
        return [], ["no generation_config.json: transformers and mlx-lm stop only on the tokenizer's EOS, "
                    "not on <|call|>"]
    lacking = [f"{t} (id {by_text[t]})" for t in STOP_TEXTS if by_text[t] not in embedded.stop_ids]
    if lacking:
        return [f"generation_config.json eos_token_id {embedded.stop_ids} lacks {', '.join(lacking)}: "
                f"generation would run past it ({config})"], []
    return [], []


def stop_ids(embedded: Embedded) -> list[int]:
    """The ids a runtime stops on: the declared list or EOS, else the tokenizer's EOS."""
    if embedded.stop_ids is not None:
        return embedded.stop_ids
    eos = embedded.vocabulary.ids.get("eos")
    return [eos] if eos is not None else []


def summary(model) -> dict:
    """What ``inspect`` shows of an artifact's tokenizer: size, specials, BOS/EOS/pad, stop ids, template."""
    embedded = model.embedded()
    if embedded is None or embedded.vocabulary is None:
        return {"present": False}
    vocab = embedded.vocabulary
    names = vocab.specials
    out = {"present": True, "file": vocab.file, "text_tokens": len(vocab.tokens), "specials": len(vocab.specials),
           **{role: ({"id": i, "token": names.get(i)} if i is not None else None) for role, i in vocab.ids.items()},
           "stop_ids": stop_ids(embedded)}
    template = embedded.chat_template
    out["chat_template"] = None if template is None else {
        "source": template[0], "sha256": hashlib.sha256(template[1].encode("utf-8")).hexdigest(), "chars": len(template[1]),
        "harmony_template": template[1] == HARMONY_TEMPLATE}
    return out
