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
All reductions run in float64.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

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


def score_blocks(blocks: Iterable, score_block) -> list:
    """Every ``score_block(item)`` (a ``start_rows`` of it) in order over ``blocks``, each block
    scored while the next is fetched; the pieces' results joined in one list."""
    results, waiting = [], None
    for item in blocks:
        started = score_block(item)
        if waiting is not None:
            results += waiting()
        waiting = started
    if waiting is not None:
        results += waiting()
    return results


def compare_block(logits: np.ndarray, targets: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray,
                  ref_lse: np.ndarray, ref_target_logprob: np.ndarray) -> TokenMetrics:
    """Metrics for ``S`` positions: artifact ``logits [S, V_art]`` vs the reference's top-k.

    ``top_logprobs``/``ref_target_logprob`` must already be normalised over the shared rows
    ``V = logits.shape[1]`` and ``ref_lse`` be the logsumexp over those rows; top ids ``>= V``
    are ignored (pass them anyway, they are masked here).
    """
    V = logits.shape[1]
    lse = logsumexp(logits)
    keep = top_ids < V
    ids = np.where(keep, top_ids, 0)
    lp_ref = np.where(keep, top_logprobs, 0.0)  # masked entries get p = 0 below
    lp_art = np.where(keep, np.take_along_axis(logits, ids, axis=1).astype(np.float64) - lse[:, None], 0.0)
    p_ref = np.where(keep, np.exp(lp_ref), 0.0)
    kld = (p_ref * (lp_ref - lp_art)).sum(axis=1)
    tail_ref = 1.0 - p_ref.sum(axis=1)
    tail_art = 1.0 - np.where(keep, np.exp(lp_art), 0.0).sum(axis=1)
    has_tail = tail_ref > 1e-12
    kld += np.where(has_tail, tail_ref * (np.log(np.maximum(tail_ref, TINY)) - np.log(np.maximum(tail_art, TINY))), 0.0)

    rows = np.arange(len(targets))
    nll = lse - np.asarray(logits[rows, targets], dtype=np.float64)
    nll_ref = -np.asarray(ref_target_logprob, dtype=np.float64)
    ref_argmax = top_ids[rows, np.argmax(keep, axis=1)]  # top ids are sorted, first kept is the max
    same_top = np.argmax(logits, axis=1) == ref_argmax

    ref_logits = lp_ref + ref_lse[:, None]
    art_logits = np.take_along_axis(np.asarray(logits), ids, axis=1).astype(np.float64)  # only the gathered ones
    diff = np.where(keep, np.abs(art_logits - ref_logits), np.nan)
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
