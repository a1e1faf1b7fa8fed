"""The Hugging Face tokenizer files beside a checkpoint: read once, written once.

``TokenizerJson`` is the one parser of ``tokenizer.json`` (a byte-level BPE vocabulary, its
``added_tokens``, merges and post-processor), with every structural problem an ``InputError``
naming the file; the GGUF writer, the Metal writer and the verifier all read it through here.
Also ``tokenizer_config.json`` (its bos/eos/pad names and chat template key),
``generation_config.json`` (the ids transformers and mlx-lm stop on), the chat template of a
folder, and writing and copying the files a folder artifact carries.
Imports: base modules, ``tokens.vocabulary``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import InputError
from ..reading import open_regular, read_json, read_text
from .vocabulary import (O200K_PATTERN, ROLES, SPECIAL_TOKENS, Embedded, Vocabulary, byte_level_bytes, byte_level_text,
                         layout, load_ranks, rank_merges)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _read_json(path: Path, what: str):
    try:
        return read_json(path)
    except InputError as exc:
        raise InputError(f"cannot read the {what}: {exc.bare_message}", file=path) from exc


class TokenizerJson:
    """A parsed, structurally checked ``tokenizer.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        doc = _read_json(self.path, "tokenizer")
        model = doc.get("model") if isinstance(doc, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict):
            raise InputError("cannot read the tokenizer vocabulary: no model.vocab mapping", file=self.path)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
            raise InputError("cannot read the tokenizer vocabulary: model.vocab ids must be non-negative integers",
                             file=self.path)
        added = doc.get("added_tokens", [])
        if not isinstance(added, list) or not all(
                isinstance(t, dict) and isinstance(t.get("id"), int) and not isinstance(t.get("id"), bool)
                and t["id"] >= 0 and isinstance(t.get("content"), str) for t in added):
            raise InputError("cannot read the tokenizer vocabulary: every added token needs an integer id and a "
                             "content string", file=self.path)
        self.doc = doc
        self.vocab: dict[str, int] = vocab
        self.added: dict[int, dict] = {t["id"]: t for t in added}
        self._refuse_shared_ids(added)

    def _refuse_shared_ids(self, added: list[dict]) -> None:
        """One id, one token: two texts on one id would leave one of them out of any vocabulary
        written from this (a GGUF keeps one string per id)."""
        if len(set(self.vocab.values())) != len(self.vocab):
            seen: dict[int, str] = {}
            for text, i in self.vocab.items():
                if seen.setdefault(i, text) != text:
                    raise InputError(f"model.vocab gives id {i} to two tokens ({seen[i]!r} and {text!r})",
                                     file=self.path)
        if len(self.added) != len(added):  # one pass: a stranger's file may hold a million added tokens
            seen_ids: set[int] = set()
            twice = next(t["id"] for t in added if t["id"] in seen_ids or seen_ids.add(t["id"]))
            raise InputError(f"added_tokens gives id {twice} to two tokens", file=self.path)
        by_id = {i: t for t, i in self.vocab.items()}
        for i, token in self.added.items():
            if i in by_id and by_id[i] != token["content"]:
                raise InputError(f"added token {token['content']!r} has id {i}, which model.vocab gives to "
                                 f"{by_id[i]!r}", file=self.path)

    @classmethod
    def beside(cls, folder: Path, needed_by: str | None = None) -> "TokenizerJson":
        """``folder/tokenizer.json``; ``needed_by`` says who needs it when it is missing."""
        path = Path(folder) / "tokenizer.json"
        if needed_by is not None and not path.is_file():
            if os.path.lexists(path):
                raise InputError(f"{needed_by} needs the tokenizer, and this is not a regular file (a FIFO, a device, "
                                 "a socket or a broken link is never read)", file=path)
            raise InputError(f"{needed_by} needs the tokenizer: tokenizer.json is missing beside original/ "
                             "(copy it from the Hugging Face repo)", file=path)
        return cls(path)

    def by_id(self) -> dict[int, str]:
        """Every id's token text, the added tokens' content over the vocabulary's."""
        reverse = {i: t for t, i in self.vocab.items()}
        reverse.update({i: t["content"] for i, t in self.added.items()})
        return reverse

    def special_ids(self) -> set[int]:
        return {i for i, t in self.added.items() if t.get("special")}

    def text_token_bytes(self, count: int) -> list[bytes]:
        """Text tokens ``0..count-1`` decoded back to bytes (the o200k ranks)."""
        by_id = {i: text for text, i in self.vocab.items() if i not in self.added}
        missing = [i for i in range(count) if i not in by_id]
        if missing:
            raise InputError(f"has no text token for ids {missing[:5]} ({len(missing)} missing); gpt-oss needs o200k "
                             f"text tokens 0..{count - 1}", file=self.path)
        extra = sorted(i for i in by_id if i >= count)
        if extra:
            raise InputError(f"has text tokens beyond id {count - 1} (e.g. {extra[:3]}): not the gpt-oss "
                             "o200k vocabulary", file=self.path)
        tokens = []
        for i in range(count):
            token = byte_level_bytes(by_id[i])
            if token is None:
                raise InputError(f"token {i} ({by_id[i]!r}) is not byte-level BPE text", file=self.path)
            tokens.append(token)
        return tokens

    def merges(self) -> list:
        found = (self.doc.get("model") or {}).get("merges")
        return found if isinstance(found, list) else []

    def byte_level_post_processor(self) -> bool:
        post = self.doc.get("post_processor") or {}
        processors = post.get("processors", [post]) if isinstance(post, dict) else []
        return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in processors)

    def vocabulary(self, config: dict | None = None) -> Vocabulary:
        """Every text token's bytes and the specials; BOS/EOS/pad by ``tokenizer_config.json``'s names."""
        out = Vocabulary(str(self.path))
        specials = self.special_ids()
        for text, i in self.vocab.items():
            if i not in specials:
                out.tokens[i] = byte_level_bytes(text) or text.encode("utf-8")
        out.specials = {i: self.added[i]["content"] for i in sorted(specials)}
        by_text = {text: i for i, text in out.specials.items()}
        for role in ROLES:
            name = (config or {}).get(f"{role}_token")
            name = name.get("content") if isinstance(name, dict) else name
            out.ids[role] = by_text.get(name) if isinstance(name, str) else None
        return out


def _present(path: Path) -> bool:
    """A side file is there: as a file, or as anything else in its place (a FIFO, a broken or
    looping link), which the reader then refuses by name rather than taking it as absent."""
    return path.exists() or path.is_symlink()


def _is_token(value) -> bool:
    """A special token as transformers writes one: its text, or an AddedToken mapping with a content string."""
    return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tokenizer_config(folder: Path) -> dict:
    """``folder/tokenizer_config.json`` as a mapping ({} when missing), its keys of the types
    transformers, mlx-lm and gguf-py read them as: the special tokens, the chat template (a
    string, or a list of named templates), ``added_tokens_decoder`` (id -> token)."""
    path = Path(folder) / "tokenizer_config.json"
    if not _present(path):
        return {}
    doc = _read_json(path, "tokenizer config")
    if not isinstance(doc, dict):
        raise InputError("the tokenizer config is not a JSON object", file=path)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if doc.get(key) is not None and not _is_token(doc[key]):
            raise InputError(f"tokenizer config key {key!r} must be a token (a string or an object with a content "
                             f"string), got {doc[key]!r:.60}", file=path)
    template = doc.get("chat_template")
    if template is not None and not isinstance(template, str) and not (isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)):
        raise InputError("tokenizer config key 'chat_template' must be a string or a list of "
                         "{name, template} strings", file=path)
    decoder = doc.get("added_tokens_decoder")
    if decoder is not None and not (isinstance(decoder, dict) and all(
            k.isdigit() and _is_token(v) for k, v in decoder.items())):
        raise InputError("tokenizer config key 'added_tokens_decoder' must map non-negative ids to tokens",
                         file=path)
    for key in ("add_bos_token", "add_eos_token"):
        if doc.get(key) is not None and not isinstance(doc[key], bool):
            raise InputError(f"tokenizer config key {key!r} must be true or false", file=path)
    return doc


def generation_config(folder: Path) -> dict | None:
    """``folder/generation_config.json`` (None when missing), its token ids or lists of ids."""
    path = Path(folder) / "generation_config.json"
    if not _present(path):
        return None
    doc = _read_json(path, "generation config")
    if not isinstance(doc, dict):
        raise InputError("cannot read the generation config: not a JSON object", file=path)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = doc.get(key)
        if value is not None and not (_is_id(value) or (isinstance(value, list) and all(map(_is_id, value)))):
            raise InputError(f"{key} must be an id or a list of ids, not {value!r:.60}", file=path)
    return doc


def special_tokens_map(folder: Path) -> dict:
    """``folder/special_tokens_map.json`` ({} when missing): role -> token, or a list of tokens."""
    path = Path(folder) / "special_tokens_map.json"
    if not _present(path):
        return {}
    doc = _read_json(path, "special tokens map")
    if not isinstance(doc, dict) or not all(
            _is_token(v) or (isinstance(v, list) and all(map(_is_token, v))) for v in doc.values()):
        raise InputError("the special tokens map must map each role to a token or a list of tokens", file=path)
    return doc


def check_side_files(root: Path) -> None:
    """Every side file a converter copies or hands to gguf-py, read and checked before a byte is
    written: the tokenizer config, the generation config, the special tokens map, the chat
    templates in ``additional_chat_templates/``, the README's front matter, the root config."""
    from .. import side_files

    root = Path(root)
    for name in TOKENIZER_FILES:  # a FIFO or a looping link in a tokenizer file's place: refused, not skipped
        if _present(root / name):
            open_regular(root / name).close()
    tokenizer_config(root)
    chat_template(root)
    generation_config(root)
    special_tokens_map(root)
    extra = root / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.iterdir()):
            try:
                read_text(path)
            except InputError as exc:
                raise InputError(f"cannot read the chat template: {exc.bare_message}", file=path) from exc
    side_files.check(root)


def generation_eos(folder: Path):
    """``eos_token_id`` (an id or a list) of ``folder/generation_config.json``; None when the
    file or the key is missing."""
    doc = generation_config(folder)
    return None if doc is None else doc.get("eos_token_id")


def chat_template(folder: Path) -> tuple[str, str] | None:
    """``(where it came from, text)`` of a folder's chat template: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` key; ``None`` when it has neither."""
    path = Path(folder) / CHAT_TEMPLATE_FILE
    if _present(path):
        try:
            return str(path), read_text(path)
        except InputError as exc:
            raise InputError(f"cannot read the chat template: {exc.bare_message}", file=path) from exc
    text = tokenizer_config(folder).get("chat_template")
    if isinstance(text, list):  # named templates: transformers renders the one called "default"
        text = next((t["template"] for t in text if t["name"] == "default"), None)
    if isinstance(text, str):
        return f"{Path(folder) / 'tokenizer_config.json'} chat_template", text
    return None


def folder_tokens(folder: Path) -> Embedded | None:
    """What a Hugging Face style folder (``original/`` repo, MLX, transformers) embeds, or
    ``None`` when it has no ``tokenizer.json``."""
    folder = Path(folder)
    if not _present(folder / "tokenizer.json"):
        return None
    vocabulary = TokenizerJson(folder / "tokenizer.json").vocabulary(tokenizer_config(folder))
    special_tokens_map(folder)  # read by transformers' tokenizer, so by mlx-lm: checked, not used
    return Embedded(vocabulary, chat_template(folder), "list", generation_stop_ids(folder))


class FolderTokens:
    """``embedded()`` for the readers of Hugging Face style folders: their ``repo_root``'s files."""

    def embedded(self) -> Embedded | None:
        return folder_tokens(self.repo_root)


def generation_stop_ids(folder: Path) -> list[int] | None:
    """The ids ``generation_config.json`` stops on, sorted; ``None`` without the file, [] without the key."""
    doc = generation_config(folder)
    if doc is None:
        return None
    eos = doc.get("eos_token_id")
    return [] if eos is None else sorted(eos if isinstance(eos, list) else [eos])


# --------------------------------------------------------------------------------------
# Writing


def tokenizer_json(vocab_size: int, vocab_file: str | Path | None = None) -> str:
    """A Hugging Face ``tokenizer.json`` for gpt-oss (full o200k, or the tiny shrunk layout)."""
    text_count, special_start = layout(vocab_size)
    tokens = load_ranks(text_count, vocab_file)
    encode = byte_level_text
    vocab = {encode(t): i for i, t in enumerate(tokens)}
    added = []
    for offset, content in enumerate(SPECIAL_TOKENS):
        vocab[content] = special_start + offset
        added.append({"id": special_start + offset, "content": content, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        # transformers' TikTokenConverter (how gpt-oss's tokenizer.json was made) sets
        # processors.ByteLevel(trim_offsets=False); llama.cpp's converter reads add_bos/eos from it.
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [[encode(a), encode(b)] for a, b in rank_merges(tokens)]},
    }
    return json.dumps(document, ensure_ascii=False)


def write_tokenizer_files(root: Path, vocab_size: int, chat_template: str,
                          vocab_file: str | Path | None = None) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
    _, special_start = layout(vocab_size)
    (root / "tokenizer.json").write_text(tokenizer_json(vocab_size, vocab_file), encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        **specials,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (root / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (root / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]



def copy_tokenizer_files(root: Path, dest: Path, chat_template: str | None = None) -> list[str]:
    """Copy the tokenizer and chat template files the source has (a missing one is reported
    later); ``chat_template`` replaces the source's template: it is written as
    ``chat_template.jinja`` and any ``chat_template`` key of ``tokenizer_config.json`` is dropped,
    so that no runtime can pick the old one."""
    copied = []
    for name in TOKENIZER_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, dest / name)
            copied.append(name)
    if chat_template is not None:
        (dest / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        config = dest / "tokenizer_config.json"
        if config.is_file():
            doc = tokenizer_config(dest)
            if doc.pop("chat_template", None) is not None:
                config.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        copied = sorted(set(copied) | {CHAT_TEMPLATE_FILE})
    return copied
