"""The o200k tokenizer gpt-oss uses: vocabulary loading and the Hugging Face tokenizer files.

gpt-oss text tokens are o200k_base ranks 0..199997 (byte strings); the Harmony specials follow
at 199998..200018 and the embedding has padding rows up to 201088. The full vocabulary comes
from a ``.tiktoken`` file or, offline, from the ``bpe-openai`` package; the first 4096 ranks
are bundled here so tiny synthetic models need neither.

Tiny synthetic models (vocab_size < 200019) keep the same structure, shrunk: the first
``vocab_size - 21`` ranks as text tokens and the 21 specials on the last ids.
"""

from __future__ import annotations

import base64
import gzip
import json
from importlib import resources
from pathlib import Path

from .errors import InputError

NUM_TEXT_TOKENS = 199998
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# The added tokens of gpt-oss's tokenizer.json, ids 199998..200018 in order.
SPECIAL_TOKENS = [
    "<|startoftext|>", "<|endoftext|>", "<|reserved_200000|>", "<|reserved_200001|>", "<|return|>",
    "<|constrain|>", "<|reserved_200004|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>",
    "<|reserved_200009|>", "<|reserved_200010|>", "<|reserved_200011|>", "<|call|>",
    "<|reserved_200013|>", "<|reserved_200014|>", "<|reserved_200015|>", "<|reserved_200016|>",
    "<|reserved_200017|>", "<|endofprompt|>",
]
BUNDLED_HEAD = 4096  # ranks shipped in oss_convert/data/o200k_head.tiktoken


def parse_tiktoken(data: bytes, *, source: str) -> list[bytes]:
    """``base64(token) rank`` lines -> tokens in rank order (ranks must be 0..n-1)."""
    tokens: list[bytes] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            tokens.append(base64.b64decode(token, validate=True))
        except ValueError as exc:
            raise InputError(f"line {number} is not 'base64 rank'", file=source) from exc
        if int(rank) != len(tokens) - 1:
            raise InputError(f"line {number}: rank {int(rank)} out of order", file=source)
    return tokens


def load_ranks(count: int = NUM_TEXT_TOKENS, vocab_file: str | Path | None = None) -> list[bytes]:
    """The first ``count`` o200k_base tokens, from ``vocab_file``, the bundled head, or bpe-openai."""
    if vocab_file is not None:
        path = Path(vocab_file)
        raw = path.read_bytes()
        tokens = parse_tiktoken(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, source=str(path))
    elif count <= BUNDLED_HEAD:
        data = resources.files("oss_convert").joinpath("data/o200k_head.tiktoken").read_bytes()
        tokens = parse_tiktoken(data, source="oss_convert/data/o200k_head.tiktoken")
    else:
        try:
            import bpe_openai
        except ImportError:
            raise InputError(
                "the full o200k vocabulary is needed: pass a o200k_base.tiktoken file, put tokenizer.json "
                "beside original/, or `pip install bpe-openai` (ships it offline)"
            ) from None
        path = Path(bpe_openai.__file__).parent / "data" / "o200k_base.tiktoken.gz"
        tokens = parse_tiktoken(gzip.decompress(path.read_bytes()), source=str(path))
    if len(tokens) < count:
        raise InputError(f"vocabulary has {len(tokens)} tokens, {count} needed", file=vocab_file)
    return tokens[:count]


def layout(vocab_size: int) -> tuple[int, int]:
    """(number of text tokens, id of the first special) for a model's vocab_size."""
    if vocab_size >= NUM_TEXT_TOKENS + len(SPECIAL_TOKENS):
        return NUM_TEXT_TOKENS, NUM_TEXT_TOKENS
    text = vocab_size - len(SPECIAL_TOKENS)
    if text < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than 256 byte tokens")
    return text, text


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes, used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Every split of each token into two lower-ranked tokens, as transformers' TikTokenConverter does."""
    rank = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token in tokens:
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in rank and token[i:] in rank]
        local.sort(key=lambda pair: (rank[pair[0]], rank[pair[1]]))
        merges.extend(local)
    return merges


def tokenizer_json(vocab_size: int, vocab_file: str | Path | None = None) -> str:
    """A Hugging Face ``tokenizer.json`` for gpt-oss (full o200k, or the tiny shrunk layout)."""
    text_count, special_start = layout(vocab_size)
    tokens = load_ranks(text_count, vocab_file)
    b2u = _byte_to_unicode()
    encode = lambda t: "".join(b2u[b] for b in t)  # noqa: E731
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
                  "vocab": vocab, "merges": [[encode(a), encode(b)] for a, b in _merges(tokens)]},
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
    (root / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
