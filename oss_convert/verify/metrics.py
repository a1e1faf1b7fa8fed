"""Per-token comparison of an artifact's logits with a reference distribution, and summaries.

The reference is kept as its top-k log-probs (``reference.Reference``), so every statistic is
computed from what the cache holds:

- ``nll``: ``logsumexp(logits) - logits[target]`` for the artifact; the stored target log-prob
  for the reference (exact, whatever k is).
- ``kld``: ``KL(ref || artifact)`` over the reference's top-k ids plus one *tail bucket* holding
  the remaining mass of each side. That is the KL of the coarse-grained distributions, a lower
  bound of the full KL, and exact when k covers the vocabulary (the default for small vocabs).
  llama-perplexity instead sums over ids within 16 nats of the max; both ignore only
  negligible mass.
- ``same_top``: artifact argmax == reference argmax (ties to the lowest id, like llama.cpp).
- ``abs_logit_diff``: |artifact logit - reference logit| over the reference's top-k ids.

When the artifact has fewer vocabulary rows than the reference (Metal keeps 200014 of 201088),
both distributions are renormalised over the shared rows and ids beyond them are dropped.
All reductions run in float64. On a GPU the device reduces each row first (``Rows``): the logits
at the picked ids cross as they are, and only the tail's mass outside them is summed there in
float32 (a few parts in 1e7 of the tail's share, ``runner._rows_mlx``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

TINY = 1e-300


@dataclass
class TokenMetrics:
    """One value per scored token."""

    nll: np.ndarray
    nll_ref: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray
    delta_p: np.ndarray
    max_abs_logit_diff: np.ndarray
    mean_abs_logit_diff: np.ndarray

    @classmethod
    def concat(cls, parts: list["TokenMetrics"]) -> "TokenMetrics":
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__})


def log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(logprobs, logsumexp)`` in float64 along the last axis."""
    lse = logsumexp(logits)
    return np.asarray(logits, dtype=np.float64) - lse[..., None], lse


def logsumexp(logits: np.ndarray, rows_per_block: int = 64) -> np.ndarray:
    """``log(sum(exp(logits)))`` in float64 along the last axis, a few rows at a time: a
    ``[S, 201088]`` block in float64 would be 0.8 GB per 512 rows, and only gathered entries
    ``logit - lse`` are ever needed."""
    x = np.asarray(logits)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty(flat.shape[0], dtype=np.float64)
    for r in range(0, flat.shape[0], rows_per_block):
        block = flat[r:r + rows_per_block].astype(np.float64)
        m = block.max(axis=-1, keepdims=True)
        out[r:r + rows_per_block] = m[:, 0] + np.log(np.exp(block - m).sum(axis=-1))
    return out.reshape(x.shape[:-1])


def logsumexp_cuts(logits: np.ndarray, cuts) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """``logsumexp`` of each row ``[S, V]``, and of each row's first ``cut`` entries for each cut,
    the same values as ``logsumexp`` gives both, from one float64 pass where a row's max lies
    before the cut (a row whose max is beyond it takes its own pass)."""
    block = np.asarray(logits).astype(np.float64)
    top = block.max(axis=-1)
    e = np.exp(block - top[:, None])
    lse = top + np.log(e.sum(axis=-1))
    out = {}
    for cut in cuts:
        head = top + np.log(e[:, :cut].sum(axis=-1))
        beyond = block[:, :cut].max(axis=-1) != top
        if beyond.any():
            head[beyond] = logsumexp(np.asarray(logits)[beyond, :cut])
        out[cut] = head
    return lse, out


ROWS_PER_TASK = 16  # logit rows one thread scores at a time: 3 float64 copies of 16 x 201088 are 77 MB
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_POOL: list[ThreadPoolExecutor] = []


def map_rows(score, rows: int, step: int = ROWS_PER_TASK) -> list:
    """``[score(piece) for piece in slices of step rows]``, in order, run by a pool of threads:
    numpy leaves the GIL in its loops, so scoring the logits (float64 passes over 201088 entries a
    row) takes the host's cores instead of one."""
    return start_rows(score, rows, step)()


def start_rows(score, rows: int, step: int = ROWS_PER_TASK) -> Callable[[], list]:
    """``map_rows`` started on the pool now; call what it returns for the list. A caller scoring
    one block of logits while it fetches the next (from the GPU: 1.8 s of a 20b run) starts the
    one, fetches, then collects."""
    pieces = [slice(r, min(rows, r + step)) for r in range(0, rows, step)]
    if len(pieces) < 2 or _WORKERS < 2:
        done = [score(piece) for piece in pieces]
        return lambda: done
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(_WORKERS, thread_name_prefix="score"))
    futures = [_POOL[0].submit(score, piece) for piece in pieces]
    return lambda: [f.result() for f in futures]


def collect(started: Iterable[Callable[[], list]]) -> list:
    """The results of every started piece of work (``start_rows``), in order, each collected only
    after the next has been fetched: the host scores one block of logits while the runner makes
    (or the GPU hands back) the next."""
    results, waiting = [], None
    for item in started:
        if waiting is not None:
            results += waiting()
        waiting = item
    if waiting is not None:
        results += waiting()
    return results


def then(started: Iterable[Callable[[], list]], each: Callable) -> Iterator[Callable[[], list]]:
    """``started`` with ``each`` applied to every result as it is collected: in ``collect`` that
    runs while the runner makes the next block, not after the last."""
    for item in started:
        yield lambda item=item: [each(result) for result in item()]


@dataclass(frozen=True)
class Wanted:
    """What scoring needs of each logit row, asked of the runner before the rows exist."""

    targets: np.ndarray  # [N]: the id each scored row predicts, flat over the chunks in order
    pick: int | np.ndarray  # k: each row's k largest logits; or ids [N, n] whose logits to gather
    vocab: int  # the columns scored (the rows an artifact shares with its reference)
    cuts: tuple[int, ...] = ()  # also the logsumexp over each cut's first columns


@dataclass
class Rows:
    """What scoring keeps of a block of ``S`` logit rows: a GPU reduces each row to these on the
    device, so the 0.8 MB of a row's logits never crosses to the host (3.3 GB for 16 x 512 tokens
    of gpt-oss, 1.8 s of an H200 run)."""

    lse: np.ndarray  # [S] float64, over the first ``Wanted.vocab`` columns
    cut_lse: dict[int, np.ndarray]  # cut -> [S] float64
    ids: np.ndarray  # [S, n]: ``Wanted.pick``'s ids, or each row's top k (unordered)
    picked: np.ndarray  # [S, n] float32 logits at ``ids`` (those >= vocab read column 0: the caller masks them)
    target: np.ndarray  # [S] float32 logit of the id that follows
    argmax: np.ndarray  # [S] the lowest id of the row's largest logit


def rows_of(logits: np.ndarray, want: Wanted, at: int, top: np.ndarray | None = None) -> Rows:
    """``Rows`` of ``logits [S, >= vocab]``, rows ``at..at+S-1`` of ``want``, in float64 on the host
    (``top``: each row's top-k ids where the runner chose them)."""
    x = logits[:, :want.vocab]
    S, V = x.shape
    lse, cut_lse = logsumexp_cuts(x, tuple(c for c in want.cuts if c < V))
    if isinstance(want.pick, np.ndarray):
        ids = want.pick[at:at + S]
    elif top is not None:
        ids = top
    else:
        k = want.pick
        ids = np.argpartition(x, V - k, axis=1)[:, V - k:] if k < V else np.tile(np.arange(V), (S, 1))
    rows = np.arange(S)
    return Rows(lse=lse, cut_lse=cut_lse, ids=ids, picked=np.take_along_axis(x, np.where(ids < V, ids, 0), axis=1),
                target=x[rows, want.targets[at:at + S]], argmax=np.argmax(x, axis=1))


def compare_block(logits: np.ndarray, targets: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray,
                  ref_lse: np.ndarray, ref_target_logprob: np.ndarray) -> TokenMetrics:
    """Metrics for ``S`` positions: artifact ``logits [S, V_art]`` vs the reference's top-k.

    ``top_logprobs``/``ref_target_logprob`` must already be normalised over the shared rows
    ``V = logits.shape[1]`` and ``ref_lse`` be the logsumexp over those rows; top ids ``>= V``
    are ignored (pass them anyway, they are masked here).
    """
    want = Wanted(targets=np.asarray(targets), pick=np.asarray(top_ids), vocab=logits.shape[1])
    return compare_rows(rows_of(logits, want, 0), logits.shape[1], top_logprobs, ref_lse, ref_target_logprob)


def compare_rows(art: Rows, V: int, top_logprobs: np.ndarray, ref_lse: np.ndarray,
                 ref_target_logprob: np.ndarray) -> TokenMetrics:
    """``compare_block`` from the artifact's ``Rows`` (``art.ids``: the reference's top ids, over the
    ``V`` rows both share)."""
    top_ids, lse = art.ids, art.lse
    keep = top_ids < V
    lp_ref = np.where(keep, top_logprobs, 0.0)  # masked entries get p = 0 below
    lp_art = np.where(keep, art.picked.astype(np.float64) - lse[:, None], 0.0)
    p_ref = np.where(keep, np.exp(lp_ref), 0.0)
    kld = (p_ref * (lp_ref - lp_art)).sum(axis=1)
    tail_ref = 1.0 - p_ref.sum(axis=1)
    tail_art = 1.0 - np.where(keep, np.exp(lp_art), 0.0).sum(axis=1)
    has_tail = tail_ref > 1e-12
    kld += np.where(has_tail, tail_ref * (np.log(np.maximum(tail_ref, TINY)) - np.log(np.maximum(tail_art, TINY))), 0.0)

    rows = np.arange(len(lse))
    nll = lse - art.target.astype(np.float64)
    nll_ref = -np.asarray(ref_target_logprob, dtype=np.float64)
    ref_argmax = top_ids[rows, np.argmax(keep, axis=1)]  # top ids are sorted, first kept is the max
    same_top = art.argmax == ref_argmax

    ref_logits = lp_ref + ref_lse[:, None]
    diff = np.where(keep, np.abs(art.picked.astype(np.float64) - ref_logits), np.nan)
    return TokenMetrics(
        nll=nll, nll_ref=nll_ref, kld=kld, same_top=same_top,
        delta_p=np.exp(-nll) - np.exp(-nll_ref),
        max_abs_logit_diff=np.nanmax(diff, axis=1),
        mean_abs_logit_diff=np.nanmean(diff, axis=1),
    )


def distance(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two runs' logits ``[S, V]`` of the same positions are apart: KL(a || b) per position
    (full vocabulary, float64), mean and max, and the largest |logit difference|."""
    def piece(r: slice) -> tuple[np.ndarray, float]:
        lp_a, _ = log_softmax(a[r])
        lp_b, _ = log_softmax(b[r])
        kld = (np.exp(lp_a) * (lp_a - lp_b)).sum(axis=1)
        return kld, float(np.abs(a[r].astype(np.float64) - b[r]).max())

    parts = map_rows(piece, a.shape[0])
    kld = np.maximum(np.concatenate([k for k, _ in parts]), 0.0)
    return {"kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
            "logit_max_abs_diff": max(d for _, d in parts)}


def summarize(m: TokenMetrics) -> dict:
    """The numbers of the report (see ``report.py`` for units)."""
    n = len(m.kld)
    if n == 0:
        raise ValueError("no scored tokens")
    ppl, ppl_ref = float(np.exp(m.nll.mean())), float(np.exp(m.nll_ref.mean()))
    kld = np.maximum(m.kld, 0.0)  # float noise can make an exact match read -1e-17
    return {
        "tokens_scored": n,
        "ppl": ppl,
        "ppl_ref": ppl_ref,
        "ppl_ratio": ppl / ppl_ref,
        "ln_ppl_ratio": float(m.nll.mean() - m.nll_ref.mean()),
        "kld_mean": float(kld.mean()),
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float(m.same_top.mean()),
        "delta_p_rms": float(np.sqrt(np.mean(m.delta_p ** 2))),
        "logit_max_abs_diff": float(m.max_abs_logit_diff.max()),
        "logit_mean_abs_diff": float(m.mean_abs_logit_diff.mean()),
    }
