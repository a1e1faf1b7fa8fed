"""A stranger's chat template, rendered where its cost is bounded: in a separate process with a
time limit, an address-space limit (Linux) and a cap on each render's output.

Jinja2's sandbox stops attribute escapes, not cost: nested loops, ``lipsum(n=10**8)``,
``10 ** 10 ** 10``, ``'x' * 10**10``, strings doubled by ``~`` and recursive macros hang a
render or exhaust memory, and there are too many ways to build a big string to intercept
them one by one. So the whole check's renders run in one child (``python -m
oss_convert.tokens.bounded``): what it does not finish within ``SECONDS`` is killed, an
allocation past ``MEMORY`` fails inside it (a ``MemoryError`` is that chat's error), a render
longer than ``OUTPUT_CHARS`` stops there, and a recursion error is the chat's error. The parent
gets, per chat, the text or the error that stopped it, as a runtime's render would end.
Imports: ``harmony``, ``templates``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from . import harmony
from .templates import CHECK_DATE, CORPUS, Verdict, compile_template, judge, render_text

SECONDS = 5  # the whole check: the real template renders the 18 chats in ~50 ms
MEMORY = 1 << 30  # address space of the child (Linux): Python and jinja2 take ~0.2 GiB
OUTPUT_CHARS = 1 << 20  # one chat's render: a real one is ~2,000 characters
TEMPLATE_CHARS = 1 << 20  # the template itself: the real one is 16,738


class RenderLimit(Exception):
    """A render stopped by a bound (its message says which)."""


def render_all(templates: list[tuple[str, str]], chats: list[dict]) -> list:
    """Each ``(text, source)`` template's render of each chat: a list of texts or ``RenderLimit``s
    (the error that stopped that chat, as a runtime's render would end); in its place an
    ``InputError`` naming ``source`` if it does not parse, or a ``RenderLimit`` if the child ran
    out of time or died."""
    from ..errors import InputError

    request = json.dumps({"templates": [text for text, _ in templates], "chats": chats})
    try:
        done = subprocess.run([sys.executable, "-m", __name__], input=request, capture_output=True, text=True,
                              timeout=SECONDS)
    except subprocess.TimeoutExpired:
        return [RenderLimit(f"the chat template's renders ran past {SECONDS} s") for _ in templates]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [RenderLimit(f"the renderer stopped (exit {done.returncode}): {last[:200]}") for _ in templates]
    out = []
    for (_, source), item in zip(templates, json.loads(done.stdout)):
        if isinstance(item, dict):
            out.append(InputError(item["parse_error"], file=source))
        else:
            out.append([RenderLimit(x["error"]) if isinstance(x, dict) else x for x in item])
    return out


def tokens_of(rendered: str | BaseException) -> list[int] | str:
    """A render as Harmony's tokens, or the error that stopped it as ``judge`` takes it."""
    if isinstance(rendered, BaseException):
        return f"{type(rendered).__name__}: {rendered}" if not isinstance(rendered, RenderLimit) else str(rendered)
    return harmony.tokenize(rendered)


def check(text: str, source: str, corpus: list[dict] = CORPUS) -> list[Verdict]:
    """Every corpus chat's verdict for the template ``text`` (from ``source``, named in errors),
    rendered within the bounds."""
    (rendered,) = render_all([(text, source)], corpus)
    if isinstance(rendered, BaseException):
        if not isinstance(rendered, RenderLimit):
            raise rendered
        rendered = [rendered] * len(corpus)
    return [judge(chat["name"], tokens_of(r), harmony.render(chat, CHECK_DATE)) for chat, r in zip(corpus, rendered)]


# --------------------------------------------------------------------------------------
# The child


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    except (ImportError, ValueError, OSError):  # not Linux: the time limit still holds
        pass


def _render(template, chat: dict) -> str | dict:
    from jinja2.exceptions import TemplateError

    from .templates import RENDER_ERRORS

    try:
        text = render_text(template, chat, limit=OUTPUT_CHARS)
    except MemoryError:
        return {"error": f"MemoryError: the render needs more than the {MEMORY >> 20} MiB allowed"}
    except RecursionError:
        return {"error": "RecursionError: the template recurses too deep"}
    except (TemplateError, *RENDER_ERRORS) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if text is None:
        return {"error": f"the render exceeds {OUTPUT_CHARS:,} characters"}
    return text


def _main() -> None:
    from ..errors import InputError

    _limit_memory()
    request = json.loads(sys.stdin.read())
    out = []
    for text in request["templates"]:
        if len(text) > TEMPLATE_CHARS:
            out.append({"parse_error": f"the chat template is {len(text):,} characters; a real one is under "
                                       f"{TEMPLATE_CHARS:,}"})
            continue
        try:
            template = compile_template(text, "the chat template")
        except InputError as exc:
            out.append({"parse_error": exc.bare_message})
            continue
        except (MemoryError, RecursionError) as exc:
            out.append({"parse_error": f"the chat template does not compile: {type(exc).__name__}"})
            continue
        out.append([_render(template, chat) for chat in request["chats"]])
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    _main()
