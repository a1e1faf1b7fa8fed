"""The o200k vocabulary gpt-oss uses, and what an artifact embeds of it.

gpt-oss text tokens are o200k_base ranks 0..199997 (byte strings); the Harmony specials follow
at 199998..200018 and the embedding has padding rows up to 201088. The full vocabulary comes
from a ``.tiktoken`` file or, offline, from the ``bpe-openai`` package; the first 4096 ranks
are bundled here so tiny synthetic models need neither.

Tiny synthetic models (vocab_size < 200019) keep the same structure, shrunk: the first
``vocab_size - 21`` ranks as text tokens and the 21 specials on the last ids.

``Vocabulary`` is one artifact's tokenizer as the verifier compares it (every text token's
bytes, the specials at their ids, BOS/EOS/pad), and ``Embedded`` everything an artifact carries
for a runtime (that vocabulary, its chat template, the ids generation stops on): each format's
reader builds its own (``CanonicalModel.embedded``). Imports: base modules.
"""

from __future__ import annotations

import base64
import functools
import gzip
from importlib import resources
from pathlib import Path

from dataclasses import dataclass, field

from ..errors import InputError
from ..model import NUM_TEXT_TOKENS

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


def special_id(vocab_size: int, full_id: int) -> int:
    """Where a Harmony special of the full vocabulary (e.g. 200002) sits in a model's vocab."""
    _, start = layout(vocab_size)
    return start + full_id - NUM_TEXT_TOKENS


def special_ids(vocab_size: int, *names: str) -> list[int]:
    """The ids of Harmony specials by name (``"<|return|>"``) in a model of ``vocab_size``."""
    return [special_id(vocab_size, NUM_TEXT_TOKENS + SPECIAL_TOKENS.index(name)) for name in names]


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
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


@functools.lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {ch: b for b, ch in byte_to_unicode().items()}


def byte_level_bytes(text: str) -> bytes | None:
    """A byte-level BPE token's text back to its bytes; ``None`` if it is not byte-level text."""
    table = unicode_to_byte()
    try:
        return bytes(table[ch] for ch in text)
    except KeyError:
        return None


def byte_level_text(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def rank_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Every split of each token into two lower-ranked tokens, as transformers' TikTokenConverter does."""
    rank = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token in tokens:
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in rank and token[i:] in rank]
        local.sort(key=lambda pair: (rank[pair[0]], rank[pair[1]]))
        merges.extend(local)
    return merges


# --------------------------------------------------------------------------------------
# What an artifact embeds


ROLES = ("bos", "eos", "pad")


@dataclass
class Vocabulary:
    file: str
    tokens: dict[int, bytes] = field(default_factory=dict)  # text tokens: id -> bytes
    specials: dict[int, str] = field(default_factory=dict)  # special tokens: id -> text
    ids: dict[str, int | None] = field(default_factory=dict)  # bos/eos/pad where the format declares them
    # Metal names only some special slots, after upstream's own table (its 200000 is <|untrusted|>,
    # where tokenizer.json has <|reserved_200000|>): only the names both share are compared.
    named_slots_only: bool = False


@dataclass
class Embedded:
    """What an artifact carries for a runtime besides its weights.

    ``stops``: how a runtime of this format decides where generation ends:

    - ``"eos"`` (GGUF): llama.cpp stops on the declared EOS (and marks end-of-generation tokens by
      their text), so ``stop_ids`` holds the EOS (and EOT/EOM where declared) and the EOS must be
      ``<|return|>``;
    - ``"list"`` (Hugging Face folders): transformers and mlx-lm stop on
      ``generation_config.json``'s ``eos_token_id`` list (``stop_ids``; ``None`` when the file is
      missing), which must hold ``<|return|>`` and ``<|call|>``;
    - ``"runtime"`` (Metal): the runtime knows its stop tokens; nothing is declared.
    """

    vocabulary: Vocabulary | None
    chat_template: tuple[str, str] | None  # (where it came from, text)
    stops: str
    stop_ids: list[int] | None
