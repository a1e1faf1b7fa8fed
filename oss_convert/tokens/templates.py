"""Chat templates: rendered as the runtimes render them, and held against openai-harmony.

``environment`` is the Jinja2 environment of transformers' ``apply_chat_template`` (which
mlx-lm uses) and of llama-cpp-python's ``Jinja2ChatFormatter``: a sandbox with trim_blocks and
lstrip_blocks, ``tojson`` as ``json.dumps(ensure_ascii=False)``, ``raise_exception``, and
``strftime_now`` pinned to one date so that renders can be compared.

``CORPUS`` is the set of chats the check renders: reasoning effort low / medium / high,
developer instructions, function tools with JSON schemas, analysis + final, tool calls whose
arguments hold quotes, backslashes and non-ASCII, tool results, multi-turn history, the
generation prompt on and off. ``judge`` holds a template's render of each against Harmony's
(``tokens.bounded.check`` renders a stranger's template within bounds, then judges)
(``harmony.render``), compares the tokens, and reports each chat's verdict with the first
difference in context on both sides.

``HARMONY_TEMPLATE`` is this project's template (``data/harmony_chat_template.jinja``), which
renders every chat exactly as Harmony does; ``resolve`` turns ``convert --chat-template
harmony|FILE|keep`` into the text to embed. Imports: base modules, ``harmony``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import date as _date
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..reading import read_text
from . import harmony

CHECK_DATE = "2025-08-05"  # what strftime_now gives in the check; Harmony is given the same date
CONTEXT_TOKENS = 12  # tokens of context shown on each side of a first difference
HARMONY_TEMPLATE = resources.files("oss_convert").joinpath("data/harmony_chat_template.jinja").read_text(encoding="utf-8")
TEMPLATE_CHOICES = ("keep", "harmony")  # or a file's path


def environment(today: str = CHECK_DATE):
    """The sandbox transformers and llama-cpp-python render chat templates in."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    pinned = datetime.strptime(today, "%Y-%m-%d")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=pinned.strftime)
    return env


def compile_template(text: str, source: str):
    """The compiled template, or an ``InputError`` naming the file and the line."""
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return environment().from_string(text)
    except TemplateSyntaxError as exc:
        raise InputError(f"the chat template does not parse: {exc.message} (line {exc.lineno})", file=source) from exc


def render_text(template, chat: dict, limit: int | None = None) -> str | None:
    """A chat rendered as ``apply_chat_template(messages, tools=..., add_generation_prompt=..., **kwargs)``;
    with ``limit``, None once the output passes that many characters (rendering stops there)."""
    kwargs = {k: v for k, v in chat.items() if k not in ("name", "messages", "tools", "add_generation_prompt")}
    context = dict(messages=chat["messages"], tools=chat.get("tools"),
                   add_generation_prompt=chat.get("add_generation_prompt", True), **kwargs)
    if limit is None:
        return template.render(**context)
    parts, size = [], 0
    for part in template.generate(**context):
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    return "".join(parts)


# --------------------------------------------------------------------------------------
# The corpus

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Gets the current weather in the provided location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["location"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search_notes", "description": "Searches the user's notes.\nReturns at most `limit` notes.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "Words to look for"},
        "limit": {"type": "integer", "default": 10},
        "tags": {"type": "array", "items": {"type": "string"}, "description": "Only notes with these tags"},
        "exact": {"type": "boolean", "default": False},
        "since": {"type": ["string", "null"], "description": "ISO date"},
        "filter": {"type": "object", "description": "Extra filters", "properties": {
            "folder": {"type": "string"}, "min_words": {"type": "number"}}, "required": ["folder"]}},
        "required": ["query"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Gets the time."}}

READ = {"type": "function", "function": {
    "name": "read_file", "description": "Reads a file.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "note": {"type": "string"}},
                   "required": ["path"]}}}

ARGS = '{"path": "C:\\\\Users\\\\zoë\\\\notes \\"draft\\".txt", "note": "naïve café – 東京"}'
ARGS_DICT = {"path": "C:\\Users\\zoë\\notes \"draft\".txt", "note": "naïve café – 東京"}
RESULT = '{"ok": true, "lines": ["first \\"quoted\\" line", "back\\\\slash", "ünïcödé ✓"]}'


def _call(name: str, arguments, content_type: str | None = "<|constrain|>json") -> dict:
    """A tool call; the content type is named so that the real template's ``json`` default does not
    hide what follows it (one chat leaves it out)."""
    fn = {"name": name, "arguments": arguments}
    if content_type is not None:
        fn["content_type"] = content_type
    return {"type": "function", "function": fn}


CORPUS: list[dict] = [
    {"name": "user only", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"name": "reasoning low", "reasoning_effort": "low", "messages": [{"role": "user", "content": "Say hi."}]},
    {"name": "reasoning high", "reasoning_effort": "high",
     "messages": [{"role": "user", "content": "Prove that there are infinitely many primes."}]},
    {"name": "developer instructions", "messages": [
        {"role": "developer", "content": "Answer in French.\nBe brief."},
        {"role": "user", "content": "How are you?"}]},
    {"name": "system message as instructions", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"}]},
    {"name": "function tools", "tools": [WEATHER, SEARCH, CLOCK],
     "messages": [{"role": "user", "content": "Is it raining in Tokyo?"}]},
    {"name": "tool described over two lines", "tools": [SEARCH],
     "messages": [{"role": "user", "content": "Find my notes on Rust."}]},
    {"name": "instructions and tools", "tools": [WEATHER], "reasoning_effort": "low", "messages": [
        {"role": "developer", "content": "Use the tools when you need data."},
        {"role": "user", "content": "Weather in Paris?"}]},
    {"name": "analysis and final", "messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "thinking": "Simple arithmetic: 4.", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And times 3?"}]},
    {"name": "tool call, string arguments", "tools": [READ], "messages": [
        {"role": "user", "content": "Open my draft about the café."},
        {"role": "assistant", "thinking": "Need to read the file.", "tool_calls": [_call("read_file", ARGS)]}]},
    {"name": "tool call, default content type", "tools": [READ], "messages": [
        {"role": "user", "content": "Open my draft about the café."},
        {"role": "assistant", "thinking": "Need to read the file.",
         "tool_calls": [_call("read_file", ARGS_DICT, content_type=None)]}]},
    {"name": "tool result", "tools": [READ], "messages": [
        {"role": "user", "content": "Open my draft about the café."},
        {"role": "assistant", "thinking": "Need to read the file.", "tool_calls": [_call("read_file", ARGS_DICT)]},
        {"role": "tool", "content": RESULT}]},
    {"name": "tool call then answer", "tools": [WEATHER, SEARCH], "messages": [
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "thinking": "Call the weather tool.",
         "tool_calls": [_call("get_weather", {"location": "Tokyo"})]},
        {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
        {"role": "assistant", "thinking": "It is 21 and clear.", "content": "21 °C and clear."},
        {"role": "user", "content": "Thanks! And Osaka?"}]},
    {"name": "multi-turn history", "messages": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "thinking": "Pick one.", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "thinking": "Pick a different one.", "content": "Green."},
        {"role": "user", "content": "One more, in German."}]},
    {"name": "generation prompt off, user last", "add_generation_prompt": False,
     "messages": [{"role": "user", "content": "Hello there."}]},
    {"name": "generation prompt off, assistant last", "add_generation_prompt": False, "messages": [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "thinking": "Greet back.", "content": "Hi! How can I help?"}]},
    {"name": "non-ASCII and newlines", "reasoning_effort": "medium", "messages": [
        {"role": "user", "content": "Übersetze: «naïve»\n\n— and 日本語 too.\tTabs\\backslashes\"quotes\""}]},
    {"name": "custom model identity", "model_identity": "You are a careful research assistant.",
     "messages": [{"role": "user", "content": "Hi"}]},
]


# --------------------------------------------------------------------------------------
# The check


@dataclass
class Verdict:
    name: str
    status: str  # same | differs | error
    tokens: int = 0  # Harmony's token count
    first_difference: int | None = None  # token index
    template_context: str | None = None  # the template's render around the difference
    harmony_context: str | None = None  # Harmony's render around it
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _context(tokens: list[int], at: int) -> str:
    before = harmony.decode(tokens[max(0, at - CONTEXT_TOKENS):at])
    after = harmony.decode(tokens[at:at + CONTEXT_TOKENS])
    return f"{before}⟦{after}"  # ⟦ marks where the renders part


RENDER_ERRORS = (ArithmeticError, AttributeError, KeyError, LookupError, TypeError, ValueError)  # + TemplateError


def render_tokens(template, chat: dict) -> list[int] | str:
    """The template's render of a chat as tokens, or the error that stopped it (as a runtime would)."""
    from jinja2.exceptions import TemplateError

    try:
        return harmony.tokenize(render_text(template, chat))
    except (TemplateError, *RENDER_ERRORS) as exc:
        return f"{type(exc).__name__}: {exc}"


def compare_chat(template, chat: dict, today: str = CHECK_DATE) -> Verdict:
    """One chat rendered by ``template`` and by Harmony, token by token."""
    return judge(chat["name"], render_tokens(template, chat), harmony.render(chat, today))


def judge(name: str, got: list[int] | str, want: list[int]) -> Verdict:
    """A template's render (tokens, or the error that stopped it) against Harmony's tokens."""
    if isinstance(got, str):
        return Verdict(name, "error", len(want), error=got)
    if got == want:
        return Verdict(name, "same", len(want))
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return Verdict(name, "differs", len(want), at, _context(got, at), _context(want, at))


def resolve(choice: str | None) -> str | None:
    """``--chat-template``: None for ``keep`` (the source's own), else the template text to embed."""
    if choice in (None, "keep"):
        return None
    if choice == "harmony":
        return HARMONY_TEMPLATE
    path = Path(choice)
    try:
        text = read_text(path)
    except InputError as exc:
        raise InputError(f"cannot read the chat template: {exc.bare_message}", file=path) from exc
    compile_template(text, str(path))
    return text


def today() -> str:
    return _date.today().strftime("%Y-%m-%d")
