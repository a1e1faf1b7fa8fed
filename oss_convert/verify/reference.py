"""The reference distribution: computed once from a checkpoint, cached in an ``.npz``.

Scoring follows llama-perplexity: the tokens are cut into non-overlapping chunks of ``ctx``
tokens, each run from position 0, and only the second half of each chunk is scored: logits at
positions ``ctx//2 .. ctx-2`` predict tokens ``ctx//2+1 .. ctx-1`` (``ctx-1-ctx//2`` tokens per
chunk). ``ctx`` must exceed the sliding window so windowed layers are actually exercised.

Per scored token the cache keeps the reference's top-k ids and log-probs (sorted, float64),
its logsumexp, and the log-prob of the actual next token; plus the logsumexp over the first
200014 rows so an artifact with the Metal vocabulary can be compared over the shared rows.

The cache file's layout is ``formats/reference.py``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..atomic import atomic_output
from ..errors import InputError
from ..formats import reference as cache
from ..guard import refuse_stranger
from . import ranks
from .metrics import Rows, Wanted, collect, then

METAL_VOCAB_ROWS = 200014  # what the Metal model.bin keeps
# What ``runner.kernels_of`` writes into a cache's meta; a verify compares it and prints it.
KERNELS = re.compile(r"(numpy|mlx) float32 on (cpu|gpu \((cuda|metal)\))")
DEFAULT_TOP_K = 1024
DEFAULT_CTX = 512  # tokens per chunk: longer than the 128-token window, as llama-perplexity's default


def chunk_tokens(tokens: np.ndarray, ctx: int, max_chunks: int | None = None) -> np.ndarray:
    """``[C, ctx]`` non-overlapping chunks (the tail that does not fill a chunk is dropped)."""
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if ctx < 4:
        raise InputError(f"--ctx {ctx} is too small")
    count = len(tokens) // ctx
    if max_chunks is not None:
        count = min(count, max_chunks)
    if count < 1:
        raise InputError(f"{len(tokens)} tokens do not fill one chunk of --ctx {ctx}; give more text or a smaller --ctx")
    return tokens[: count * ctx].reshape(count, ctx)


def scored_rows(ctx: int) -> slice:
    """Logit positions scored in each chunk (the second half, minus the last position)."""
    return slice(ctx // 2, ctx - 1)


def targets(chunks: np.ndarray) -> np.ndarray:
    """The token each scored position predicts, flattened over chunks."""
    ctx = chunks.shape[1]
    return chunks[:, ctx // 2 + 1:].reshape(-1).astype(np.int64)


@dataclass
class Reference:
    tokens: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    logsumexp: np.ndarray
    target_logprob: np.ndarray
    cut_logsumexp: dict[int, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def targets(self) -> np.ndarray:
        return targets(self.tokens)

    def over_rows(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(top_logprobs, logsumexp, target_logprob)`` renormalised over the first ``rows`` ids."""
        if rows >= self.vocab_size:
            return self.top_logprobs, self.logsumexp, self.target_logprob
        if rows not in self.cut_logsumexp:
            raise InputError(
                f"the artifact has {rows} vocabulary rows but the reference ({self.vocab_size} rows) has no "
                f"normalisation for that cut (it has {sorted(self.cut_logsumexp)}); recompute it with "
                f"`oss-convert reference --cut-rows {rows}`")
        cut = self.cut_logsumexp[rows]
        shift = (self.logsumexp - cut)[:, None]
        return self.top_logprobs + shift, cut, self.target_logprob + shift[:, 0]

    # -- cache file -----------------------------------------------------------------------

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        path = Path(path)
        refuse_stranger(path, force)  # --force replaces an earlier reference, not any file
        cuts = sorted(self.cut_logsumexp)
        arrays = {"tokens": self.tokens.astype(np.int32), "top_ids": self.top_ids.astype(np.int32),
                  "top_logprobs": self.top_logprobs, "logsumexp": self.logsumexp, "target_logprob": self.target_logprob,
                  "cut_rows": np.array(cuts, dtype=np.int64),
                  "cut_logsumexp": np.array([self.cut_logsumexp[c] for c in cuts],
                                            dtype=np.float64).reshape(len(cuts), len(self.logsumexp))}
        with atomic_output(path, force=force) as tmp:
            with open(tmp, "wb") as fh:
                cache.write(fh, arrays, self.meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        arrays, meta = cache.read(path)
        try:
            ref = cls(
                tokens=arrays["tokens"], top_ids=arrays["top_ids"], top_logprobs=arrays["top_logprobs"],
                logsumexp=arrays["logsumexp"], target_logprob=arrays["target_logprob"],
                cut_logsumexp={int(c): arrays["cut_logsumexp"][i] for i, c in enumerate(arrays["cut_rows"])},
                meta=meta,
            )
        except (IndexError, ValueError, TypeError) as exc:
            raise InputError(f"cannot read reference cache: {exc}", file=path) from exc
        kernels = meta.get("kernels")
        if kernels is not None and not (isinstance(kernels, str) and KERNELS.fullmatch(kernels)):
            raise InputError("reference cache kernels must name the arithmetic that made it, as oss-convert writes it "
                             '("numpy float32 on cpu", "mlx float32 on gpu (cuda)", ...)', file=path)
        template = meta.get("chat_template")
        if template is not None and not (isinstance(template, dict) and isinstance(template.get("source"), str)
                                         and isinstance(template.get("text"), str)):
            raise InputError("reference cache chat_template must hold a source and a text", file=path)
        n = ref.targets.shape[0]
        if ref.top_ids.shape[0] != n or ref.logsumexp.shape != (n,) or ref.top_ids.shape != ref.top_logprobs.shape:
            raise InputError("reference cache arrays disagree in length", file=path)
        ref._check_values(path)
        return ref

    def _check_values(self, path) -> None:
        """What a verify would otherwise judge as the artifact's failure: ids outside the
        reference's vocabulary, log-probs that are not log-probs."""
        from ..model import ModelConfig

        if not isinstance(self.meta.get("config"), dict):
            raise InputError("reference cache has no model config", file=path)
        vocab = ModelConfig.from_dict(self.meta["config"], file=path).vocab_size
        for name, ids in (("tokens", self.tokens), ("top_ids", self.top_ids)):
            if ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= vocab)):
                raise InputError(f"reference cache {name} are not ids of its {vocab}-token vocabulary", file=path)
        for name in ("top_logprobs", "logsumexp", "target_logprob"):
            if not np.isfinite(getattr(self, name)).all():
                raise InputError(f"reference cache {name} holds NaN or infinite values", file=path)
        if self.top_logprobs.size and self.top_logprobs.max() > 1e-6:
            raise InputError("reference cache top_logprobs holds values above 0: not log-probabilities", file=path)
        if self.top_ids.size and (np.diff(np.sort(self.top_ids, axis=1), axis=1) == 0).any():
            # a repeated id would count its mass twice (a GPU verify sums the rest of each row apart)
            raise InputError("reference cache top_ids repeat an id within a position's top-k", file=path)


def compute_reference(runner, chunks: np.ndarray, *, top_k: int = DEFAULT_TOP_K,
                      cut_rows: tuple[int, ...] = (METAL_VOCAB_ROWS,), meta: dict | None = None,
                      progress: Callable[[float], None] | None = None) -> Reference:
    """Run ``runner`` on ``chunks`` and keep the top-k log-probs of every scored position."""
    V = runner.vocab_rows
    k = min(top_k, V)
    rows = scored_rows(chunks.shape[1])
    world = ranks.world()
    with world.checked():  # this rank's share of the chunks (all of them without mlx.launch)
        values = _top_k_values(runner, chunks[world.share(chunks.shape[0])], rows, k, cut_rows, progress)
    values = world.gather_rows(values)  # every rank's, in chunk order
    config = runner.config.to_dict()
    return Reference(
        tokens=chunks.astype(np.int32), top_ids=values["ids"], top_logprobs=values["lp"],
        logsumexp=values["lse"], target_logprob=values["tgt"],
        cut_logsumexp={int(name[3:]): v for name, v in values.items() if name.startswith("cut")},
        meta={"ctx": int(chunks.shape[1]), "chunks": int(chunks.shape[0]), "vocab_size": V, "top_k": k,
              "config": config, "experts": runner.experts, "oss_convert_version": __version__, "ranks": world.size,
              **(meta or {})},
    )


def _top_k_values(runner, chunks: np.ndarray, rows: slice, k: int, cut_rows: tuple[int, ...],
                  progress: Callable[[float], None] | None) -> dict[str, np.ndarray]:
    """The reference's per-position arrays for ``chunks``: top-k ids and log-probs, logsumexp,
    the target's log-prob, and the logsumexp over each cut's first rows (``cut<N>``)."""
    V = runner.vocab_rows
    want = Wanted(targets=targets(chunks).reshape(-1), pick=k, vocab=V, cuts=tuple(c for c in cut_rows if c < V))
    values = collect(then(runner.iter_rows(chunks, rows, progress, want), _rank))
    return {name: np.concatenate([v[name] for v in values]) for name in values[0]}


def _rank(rows: Rows) -> dict[str, np.ndarray]:
    """The reference's arrays for a few positions (see ``_top_k_values``) from their ``Rows``: the
    top-k by logit are the top-k by log-prob (logit - lse), sorted here."""
    top, lse = rows.ids, rows.lse
    top_lp = rows.picked.astype(np.float64) - lse[:, None]
    order = np.lexsort((top, -top_lp), axis=1)  # descending log-prob, ties to the lowest id
    return {"ids": np.take_along_axis(top, order, axis=1).astype(np.int32), "lp": np.take_along_axis(top_lp, order, axis=1),
            "lse": lse, "tgt": rows.target.astype(np.float64) - lse,
            **{f"cut{cut}": v for cut, v in rows.cut_lse.items()}}
