"""The chat template an artifact carries, rendered over the corpus and held against Harmony.

Each corpus chat (``chat.CORPUS``) is rendered by the artifact's template as the runtimes
render it, tokenized with the specials recognised, and compared token by token with
openai-harmony's rendering of the same conversation. The reference repo's own template is
rendered too, so the report can tell a difference the conversion introduced (a *regression*:
the artifact differs from Harmony where the reference's template does not, or renders
differently from the reference's where neither matches Harmony) from one the official
template already has (those are reported, conversation by conversation, and fail only with
``strict``). An artifact with no template is "not checked", never "pass".
Imports: base modules, ``tokens``.
"""

from __future__ import annotations

import hashlib

from ..tokens import bounded, harmony, templates as chat
from ..errors import InputError


def check(model, reference: tuple[str, str] | None, strict: bool = False) -> dict:
    """The artifact's template over the corpus, against Harmony and against ``reference`` (the
    reference's template: where from, text), both rendered within bounds."""
    embedded = model.embedded()
    found = embedded.chat_template if embedded is not None else None
    if found is None:
        return {"checked": False, "reason": "the artifact carries no chat template"}
    source, text = found
    result = {"checked": True, "source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
              "harmony_template": text == chat.HARMONY_TEMPLATE, "strict": strict}
    try:
        harmony.encoding()
    except InputError as exc:  # openai-harmony or its vocabulary missing
        return {"checked": False, "reason": str(exc)}
    same_text = reference is not None and reference[1] == text
    # Both templates are a stranger's: rendered in one bounded child (time, memory, output size)
    jobs = [(text, source)] + ([reference[::-1]] if reference is not None and not same_text else [])
    rendered = bounded.render_all(jobs, chat.CORPUS)
    ours_all = rendered[0]
    if isinstance(ours_all, InputError):
        return {**result, "parse_error": str(ours_all), "conversations": [], "regressions": []}
    if isinstance(ours_all, bounded.RenderLimit):
        ours_all = [ours_all] * len(chat.CORPUS)
    theirs_all = rendered[1] if len(rendered) > 1 else None
    if isinstance(theirs_all, BaseException):  # the reference's own template unusable: compare by text only
        theirs_all = None
    result["reference_source"] = reference[0] if reference is not None else None
    result["same_text_as_reference"] = same_text
    rows, regressions = [], []
    for i, item in enumerate(chat.CORPUS):
        want = harmony.render(item, chat.CHECK_DATE)
        ours = bounded.tokens_of(ours_all[i])
        verdict = chat.judge(item["name"], ours, want)
        row = verdict.to_dict()
        if reference is None or theirs_all is None:
            row["as_reference"] = None if reference is None else same_text
            if verdict.status == "error" and not same_text:  # no template of the reference that fails there too
                regressions.append(item["name"])
        else:
            theirs = bounded.tokens_of(theirs_all[i])
            row["as_reference"] = ours == theirs
            if verdict.status != "same" and (theirs == want or not row["as_reference"]):
                regressions.append(item["name"])
        rows.append(row)
    result.update(conversations=rows, regressions=regressions,
                  **{status: sum(r["status"] == status for r in rows) for status in ("same", "differs", "error")})
    return result
