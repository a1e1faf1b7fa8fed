"""openai-harmony, the ground truth of gpt-oss prompts: its encoding, offline, and the mapping
from a chat in the Hugging Face / OpenAI message format to a Harmony conversation.

A chat is what a runtime hands a chat template: ``messages`` (``role``, ``content``, an
assistant's ``thinking`` and ``tool_calls``), ``tools`` (OpenAI function format) and the
template's keyword arguments (``reasoning_effort``, ``model_identity``,
``add_generation_prompt``). ``conversation`` says what that chat means in Harmony:

- a system message always, with the model identity, knowledge cutoff, the date the template's
  ``strftime_now`` gives, and the reasoning effort (default medium);
- a first ``system`` or ``developer`` message is the developer's ``# Instructions``; ``tools``
  are the developer message's function tools;
- an assistant's ``thinking`` is an ``analysis`` message, its ``content`` a ``final`` one; each
  tool call is a ``commentary`` message to ``functions.NAME`` with content type
  ``<|constrain|>json`` (unless the call names another) whose content is the arguments string
  as given (a mapping is dumped as ``tojson`` does); with tool calls, ``content`` stands for
  ``thinking``;
- a ``tool`` message is from ``functions.NAME`` (its ``name``, else the last call's) to the
  assistant on ``commentary``.

``render`` is Harmony's own rendering: ``render_conversation_for_completion`` with the
generation prompt, ``render_conversation`` without, both with Harmony's default configuration
(``auto_drop_analysis``: when the last assistant message is ``final``, the analysis messages
before the first ``final`` are dropped).

Harmony reads its vocabulary from ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` (hash-
checked); when that is not set, ``encoding`` unpacks the copy ``bpe-openai`` ships into a cache
folder, so nothing is downloaded. Imports: base modules.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from pathlib import Path

from ..errors import InputError

O200K_FILE = "o200k_base.tiktoken"
STOP_TEXTS = ("<|return|>", "<|call|>")  # Harmony's stop_tokens_for_assistant_actions()
DEFAULT_CONSTRAIN = "<|constrain|>json"


def _vocab_folder() -> Path:
    """A folder with ``o200k_base.tiktoken``, unpacked from ``bpe-openai`` once."""
    try:
        import bpe_openai
    except ImportError:
        raise InputError("openai-harmony needs the o200k vocabulary offline: `pip install bpe-openai`, or set "
                         "TIKTOKEN_ENCODINGS_BASE to a folder holding o200k_base.tiktoken") from None
    packed = Path(bpe_openai.__file__).parent / "data" / (O200K_FILE + ".gz")
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "oss-convert" / "tiktoken"
    target = folder / O200K_FILE
    if not target.is_file() or target.stat().st_mtime < packed.stat().st_mtime:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:  # never a half-written vocabulary
            tmp.write(gzip.decompress(packed.read_bytes()))
        os.replace(tmp.name, target)
    return folder


@functools.lru_cache(maxsize=1)
def encoding():
    """Harmony's gpt-oss encoding."""
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    except ImportError:
        raise InputError("the chat template check needs openai-harmony: `pip install openai-harmony`") from None
    if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_vocab_folder())
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def stop_ids() -> list[int]:
    """The ids Harmony stops an assistant turn on (``<|return|>``, ``<|call|>``)."""
    return sorted(encoding().stop_tokens_for_assistant_actions())


def _has_calls(message: dict) -> bool:
    return bool(message.get("tool_calls"))


def _function(call: dict) -> dict:
    return call.get("function", call)


def arguments_text(arguments) -> str:
    """A tool call's content: the arguments string as given; a mapping as ``tojson`` dumps it."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _tool_description(tool: dict):
    from openai_harmony import ToolDescription

    fn = _function(tool)
    return ToolDescription.new(fn["name"], fn.get("description") or "", parameters=fn.get("parameters"))


def _system(chat: dict, date: str):
    from openai_harmony import ReasoningEffort, SystemContent

    effort = chat.get("reasoning_effort", "medium")
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    if chat.get("model_identity"):
        system = system.with_model_identity(chat["model_identity"])
    return system.with_conversation_start_date(date)


def conversation(chat: dict, date: str):
    """The Harmony ``Conversation`` a chat stands for (see the module's docstring)."""
    from openai_harmony import Author, Conversation, DeveloperContent, Message, Role

    messages = list(chat["messages"])
    out = [Message.from_role_and_content(Role.SYSTEM, _system(chat, date))]
    instructions = None
    if messages and messages[0]["role"] in ("system", "developer"):
        instructions = messages.pop(0)["content"]
    tools = chat.get("tools") or []
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools([_tool_description(t) for t in tools])
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    last_call = None
    for m in messages:
        role = m["role"]
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
        elif role == "assistant":
            thinking = m.get("thinking") or (m.get("content") if _has_calls(m) else None)
            if thinking:
                out.append(Message.from_role_and_content(Role.ASSISTANT, thinking).with_channel("analysis"))
            if not _has_calls(m):
                out.append(Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel("final"))
                continue
            for call in m["tool_calls"]:
                fn = _function(call)
                last_call = fn["name"]
                out.append(Message.from_role_and_content(Role.ASSISTANT, arguments_text(fn["arguments"]))
                           .with_channel("commentary").with_recipient(f"functions.{last_call}")
                           .with_content_type(fn.get("content_type", DEFAULT_CONSTRAIN)))
        elif role == "tool":
            name = m.get("name") or last_call
            content = m["content"] if isinstance(m["content"], str) else json.dumps(m["content"], ensure_ascii=False)
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), content)
                       .with_channel("commentary").with_recipient("assistant"))
        else:
            raise ValueError(f"a {role!r} message has no place after the first message")
    return Conversation.from_messages(out)


def render(chat: dict, date: str) -> list[int]:
    """Harmony's tokens for the chat (with the generation prompt when ``add_generation_prompt``)."""
    from openai_harmony import Role

    enc = encoding()
    conv = conversation(chat, date)
    if chat.get("add_generation_prompt", True):
        return enc.render_conversation_for_completion(conv, Role.ASSISTANT)
    return enc.render_conversation(conv)


def tokenize(text: str) -> list[int]:
    """Text as a runtime tokenizes a rendered template: special tokens recognised."""
    return encoding().encode(text, allowed_special="all")


def decode(tokens: list[int]) -> str:
    return encoding().decode(tokens)
