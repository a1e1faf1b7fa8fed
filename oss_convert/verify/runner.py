"""A gpt-oss forward pass in MLX that runs any artifact through the canonical interface.

The math is OpenAI's torch reference (``gpt_oss/torch/model.py``), step for step:
RMSNorm (eps 1e-5) -> fused qkv -> YaRN RoPE with the *unrounded* correction range (mlx-lm's
``YarnRoPE`` floors/ceils it and drifts; we compute the tables ourselves) in half-split form ->
GQA attention with one learned sink logit per query head, sliding window of
``config.sliding_window`` keys (self included) on even layers -> out projection -> RMSNorm ->
router top-k then softmax over the k logits -> clamped SwiGLU on the interleaved mlp1 rows
(even = glu, odd = linear, ``+1``) -> mlp2 + bias inside the weighted sum -> RMSNorm ->
unembedding. Everything is computed in float32.

Memory stays bounded by running *layer by layer* over every chunk at once: only one layer's
weights are resident, plus the hidden states of the chunks (``[C, T, H]`` float32). Experts
either stay MXFP4 and go through ``mx.gather_qmm(mode="mxfp4")`` (``experts="quantized"``,
what a runtime does) or are dequantized one expert at a time (``experts="dequantized"``, the
BF16 reference path). The model's own config drives the run (window, heads, RoPE), so an
artifact whose config is wrong produces different logits.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..model import CanonicalModel, logical_names, ModelConfig
from ..formats import mxfp4

RMS_EPS = 1e-5  # hard-coded in the reference's RMSNorm
SWIGLU_ALPHA = 1.702  # hard-coded in the reference's swiglu


def rope_tables(config: ModelConfig, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` ``[T, head_dim/2]`` float32, concentration folded in, like the reference."""
    hd = config.head_dim
    freq = np.float32(config.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))
    if config.rope_scaling_factor > 1.0:
        concentration = 0.1 * math.log(config.rope_scaling_factor) + 1.0
        d_half = hd / 2
        ctx0, theta = config.initial_context_length, config.rope_theta
        low = d_half * math.log(ctx0 / (config.rope_ntk_beta * 2 * math.pi)) / math.log(theta)
        high = d_half * math.log(ctx0 / (config.rope_ntk_alpha * 2 * math.pi)) / math.log(theta)
        interpolation = (np.float32(1.0) / (np.float32(config.rope_scaling_factor) * freq)).astype(np.float32)
        extrapolation = (np.float32(1.0) / freq).astype(np.float32)
        ramp = ((np.arange(d_half, dtype=np.float32) - np.float32(low)) / np.float32(high - low)).astype(np.float32)
        mask = np.float32(1) - np.clip(ramp, 0, 1)
        inv_freq = (interpolation * (1 - mask) + extrapolation * mask).astype(np.float32)
    else:
        concentration = 1.0
        inv_freq = (np.float32(1.0) / freq).astype(np.float32)
    angles = np.outer(np.arange(num_tokens, dtype=np.float32), inv_freq).astype(np.float32)
    c = np.float32(concentration)
    return (np.cos(angles) * c).astype(np.float32), (np.sin(angles) * c).astype(np.float32)


def _rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Half-split rotation of ``x`` ``[C, T, heads, hd]`` by tables ``[T, hd/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(num_tokens: int, window: int) -> mx.array:
    """Additive ``[T, T]`` mask: causal, and keys ``q-window+1..q`` only when ``window > 0``."""
    q = np.arange(num_tokens)[:, None]
    k = np.arange(num_tokens)[None, :]
    allowed = k <= q
    if window > 0:
        allowed &= k > q - window
    return mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32))


def layer_window(config: ModelConfig, layer: int) -> int:
    """The reference windows even layers (layer 0 included); odd layers attend to everything."""
    return config.sliding_window if layer % 2 == 0 else 0


class Runner:
    """Runs a ``CanonicalModel`` on chunks of token ids, layer by layer.

    ``experts="quantized"`` keeps MXFP4 experts packed (``gather_qmm``); it falls back to the
    dequantized path for artifacts whose experts are not MXFP4. ``experts="dequantized"``
    decodes one expert at a time to float32.
    """

    def __init__(self, model: CanonicalModel, experts: str = "quantized"):
        if experts not in ("quantized", "dequantized"):
            raise ValueError(f"experts must be 'quantized' or 'dequantized', not {experts!r}")
        self.model = model
        self.config: ModelConfig = model.config
        self.experts = experts

    @property
    def vocab_rows(self) -> int:
        return self.config.vocab_size

    # -- whole pass ---------------------------------------------------------------------

    def hidden_states(self, chunks: np.ndarray, progress: Callable[[int], None] | None = None) -> mx.array:
        """Final normed hidden states ``[C, T, H]`` for token ids ``[C, T]`` (positions 0..T-1 each)."""
        chunks = np.asarray(chunks)
        if chunks.ndim == 1:
            chunks = chunks[None]
        if chunks.size and (chunks.min() < 0 or chunks.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        x = self._embed(chunks)
        cos, sin = (mx.array(t) for t in rope_tables(self.config, chunks.shape[1]))
        for layer in range(self.config.num_hidden_layers):
            x = self._attention(layer, x, cos, sin)
            x = self._moe(layer, x)
            mx.eval(x)
            self._release(n for n in logical_names(self.config) if n.startswith(f"block.{layer}."))
            if progress is not None:
                progress(1)
        return mx.fast.rms_norm(x, self._w("norm.scale"), RMS_EPS)

    def iter_logits(self, chunks: np.ndarray, rows: slice | None = None,
                    progress: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """Float32 logits ``[len(rows), V]`` of each chunk in turn (positions ``rows``, default all)."""
        hidden = self.hidden_states(chunks, progress)
        unembedding = np.ascontiguousarray(self.model.f32("unembedding.weight"), dtype=np.float32)  # one copy only
        for c in range(hidden.shape[0]):
            h = hidden[c] if rows is None else hidden[c, rows]
            yield np.asarray(_matmul_t(h, unembedding))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits ``[T, V]`` of one sequence, like ``Transformer(...)(tokens)``."""
        return next(self.iter_logits(np.asarray(tokens)[None]))

    # -- pieces ---------------------------------------------------------------------------

    def _release(self, names) -> None:
        """Unmap a finished layer's weights where the reader can (mapped pages count as RSS)."""
        release = getattr(self.model, "release", None)
        if release is not None:
            for name in names:
                release(name)

    def _w(self, name: str) -> mx.array:
        return mx.array(np.ascontiguousarray(self.model.f32(name), dtype=np.float32))

    def _embed(self, chunks: np.ndarray) -> mx.array:
        table = self.model.f32("embedding.weight")
        x = mx.array(np.ascontiguousarray(table[chunks], dtype=np.float32))
        del table
        self._release(["embedding.weight"])
        return x

    def _attention(self, layer: int, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        c = self.config
        p = f"block.{layer}.attn."
        C, T, _ = x.shape
        nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        group = nq // nkv
        t = mx.fast.rms_norm(x, self._w(p + "norm.scale"), RMS_EPS)
        qkv = _matmul_t(t, self._w(p + "qkv.weight")) + self._w(p + "qkv.bias")
        q = qkv[..., : nq * hd].reshape(C, T, nq, hd)
        k = qkv[..., nq * hd: (nq + nkv) * hd].reshape(C, T, nkv, hd)
        v = qkv[..., (nq + nkv) * hd: (nq + 2 * nkv) * hd].reshape(C, T, nkv, hd)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        # query head h = kv * group + m uses kv head kv
        q = q.reshape(C, T, nkv, group, hd).transpose(0, 2, 3, 1, 4)  # [C, nkv, group, T, hd]
        k = k.transpose(0, 2, 1, 3)[:, :, None]  # [C, nkv, 1, T, hd]
        v = v.transpose(0, 2, 1, 3)[:, :, None]
        scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hd))
        scores = scores + attention_mask(T, layer_window(c, layer))
        sinks = self._w(p + "sinks").reshape(1, nkv, group, 1, 1)
        sinks = mx.broadcast_to(sinks, (C, nkv, group, T, 1))
        weights = mx.softmax(mx.concatenate([scores, sinks], axis=-1), axis=-1, precise=True)[..., :-1]
        attn = (weights @ v).transpose(0, 3, 1, 2, 4).reshape(C, T, nq * hd)
        return x + _matmul_t(attn, self._w(p + "out.weight")) + self._w(p + "out.bias")

    def _moe(self, layer: int, x: mx.array) -> mx.array:
        c = self.config
        p = f"block.{layer}.mlp."
        C, T, H = x.shape
        t = mx.fast.rms_norm(x, self._w(p + "norm.scale"), RMS_EPS).reshape(C * T, H)
        router = _matmul_t(t, self._w(p + "gate.weight")) + self._w(p + "gate.bias")
        k = c.experts_per_token
        indices = mx.argpartition(-router, kth=k - 1, axis=-1)[:, :k]
        expert_weights = mx.softmax(mx.take_along_axis(router, indices, axis=-1), axis=-1, precise=True)
        mx.eval(t, indices, expert_weights)
        pair1 = self.model.mxfp4(layer, "mlp1") if self.experts == "quantized" else None
        pair2 = self.model.mxfp4(layer, "mlp2") if pair1 is not None else None
        if pair1 is not None and pair2 is not None:
            y = self._experts_quantized(layer, t, indices, pair1, pair2)
        else:
            y = self._experts_dequantized(layer, t, indices)
        out = (y * expert_weights[..., None]).sum(axis=1)
        return x + out.reshape(C, T, H)

    def _swiglu(self, h: mx.array) -> mx.array:
        limit = self.config.swiglu_limit
        glu = mx.minimum(h[..., 0::2], limit)
        linear = mx.clip(h[..., 1::2], -limit, limit)
        return glu * mx.sigmoid(SWIGLU_ALPHA * glu) * (linear + 1)

    def _experts_quantized(self, layer, t, indices, pair1, pair2) -> mx.array:
        """``[N, k, H]`` expert outputs with packed MXFP4 weights (OpenAI bytes viewed as uint32)."""
        p = f"block.{layer}.mlp."
        N, k = indices.shape
        w1, s1 = _packed(pair1)
        w2, s2 = _packed(pair2)
        b1, b2 = self._w(p + "mlp1_bias"), self._w(p + "mlp2_bias")
        # Sort (token, slot) pairs by expert so gather_qmm reads each expert's weights once.
        flat = indices.reshape(-1)
        order = mx.argsort(flat)
        inverse = mx.argsort(order)
        sorted_experts = flat[order]
        rows = t[order // k][:, None, None, :]  # [N*k, 1, 1, H]
        qmm = dict(transpose=True, group_size=32, bits=4, mode="mxfp4", sorted_indices=True)
        h = mx.gather_qmm(rows, w1, s1, None, rhs_indices=sorted_experts[:, None], **qmm)
        h = h[:, 0, 0, :] + b1[sorted_experts]
        a = self._swiglu(h)[:, None, None, :]
        y = mx.gather_qmm(a, w2, s2, None, rhs_indices=sorted_experts[:, None], **qmm)
        y = y[:, 0, 0, :] + b2[sorted_experts]
        return y[inverse].reshape(N, k, -1)

    def _experts_dequantized(self, layer: int, t: mx.array, indices: mx.array) -> mx.array:
        """``[N, k, H]`` expert outputs, each expert dequantized to float32 only while it runs."""
        p = f"block.{layer}.mlp."
        N, k = indices.shape
        flat = np.array(indices).reshape(-1)
        b1, b2 = self._w(p + "mlp1_bias"), self._w(p + "mlp2_bias")
        weight1, weight2 = _ExpertWeights(self.model, layer, "mlp1"), _ExpertWeights(self.model, layer, "mlp2")
        out = np.zeros((N * k, self.config.hidden_size), dtype=np.float32)
        for e in np.unique(flat):
            slots = np.nonzero(flat == e)[0]
            x_e = t[mx.array(slots // k)]
            h = _matmul_t(x_e, mx.array(weight1(e))) + b1[int(e)]
            y = _matmul_t(self._swiglu(h), mx.array(weight2(e))) + b2[int(e)]
            out[slots] = np.array(y)
        return mx.array(out).reshape(N, k, -1)


def _matmul_t(x: mx.array, w: mx.array | np.ndarray) -> mx.array:
    """``x @ w.T`` in float32. On the CPU, numpy's BLAS is ~10x faster than MLX's CPU matmul
    (measured here: 0.28 s vs 3.8 s for [127,192] x [192,201088]); on Apple GPUs MLX does it."""
    if mx.default_device() == mx.cpu:
        return mx.array(np.matmul(np.asarray(x, dtype=np.float32), np.asarray(w, dtype=np.float32).T))
    return x @ (w if isinstance(w, mx.array) else mx.array(w)).T


class _ExpertWeights:
    """One expert's float32 weight at a time: decoded from MXFP4, or sliced from a dense tensor."""

    def __init__(self, model: CanonicalModel, layer: int, which: str):
        self.pair = model.mxfp4(layer, which)
        self.dense = None if self.pair is not None else model.f32(f"block.{layer}.mlp.{which}_weight")

    def __call__(self, expert: int) -> np.ndarray:
        if self.pair is not None:
            return mxfp4.decode(self.pair.blocks[expert], self.pair.scales[expert])
        return np.ascontiguousarray(self.dense[expert], dtype=np.float32)


def _packed(pair) -> tuple[mx.array, mx.array]:
    """OpenAI ``blocks [E, O, G, 16]`` -> MLX mxfp4 weight ``[E, O, G*4]`` uint32 (a pure byte view)."""
    blocks = np.ascontiguousarray(pair.blocks)
    E, O, G, _ = blocks.shape
    words = blocks.view(np.uint32).reshape(E, O, G * 4)
    return mx.array(words), mx.array(np.ascontiguousarray(pair.scales))
