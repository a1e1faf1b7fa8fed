"""A gpt-oss forward pass that runs any artifact through the canonical interface, in float32.

The math is OpenAI's torch reference (``gpt_oss/torch/model.py``), step for step:
RMSNorm (eps 1e-5) -> fused qkv -> YaRN RoPE with the *unrounded* correction range (mlx-lm's
``YarnRoPE`` floors/ceils it and drifts; we compute the tables ourselves) in half-split form ->
GQA attention with one learned sink logit per query head, sliding window of
``config.sliding_window`` keys (self included) on even layers -> out projection -> RMSNorm ->
router top-k then softmax over the k logits -> clamped SwiGLU on the interleaved mlp1 rows
(even = glu, odd = linear, ``+1``) -> mlp2 + bias inside the weighted sum -> RMSNorm ->
unembedding. Everything is computed in float32.

Memory stays bounded by running *layer by layer* over every chunk at once: only one layer's
weights are resident, plus the hidden states of the chunks (``[C, T, H]`` float32). Attention
runs over blocks of queries against only the keys they can see (never a ``[heads, T, T]``
matrix for a long chunk), so ``--ctx`` 16384 stays within a few hundred MB.

The device decides how the heavy parts run:

- on the CPU (numpy, its BLAS): in the MoE each expert that any token picked is decoded once
  per layer (exact float32, ``formats/mxfp4.decode``) and multiplied with all the tokens routed
  to it in one BLAS call, then released; every matmul is BLAS. MLX's CPU ``gather_qmm`` is
  ~20x slower than that.
- on an MLX GPU (Apple, or CUDA through ``mlx[cuda]``; ``device="gpu"``, MLX's default device):
  the same arithmetic with MLX operations only. Weights cross as the files hold them (MXFP4
  bytes, BF16 bits) and reach float32 exactly on the device (MXFP4 through the CPU decoder's own
  table, ``mxfp4.scaled_pairs``), ten experts at a time; every product is a float32 matmul. So
  the same weights give the same logits bit for bit whatever their storage (original/, MLX,
  GGUF, Metal): a lossless artifact scores KL 0 exactly, as on the CPU. ``gather_qmm`` (what a
  runtime runs) rounds otherwise than the dequantized reference, and in a mixture of experts a
  last-bit difference flips a near-tied routing choice: a lossless 20b-shaped artifact showed
  mean KL 2.3e-5 that way. While the GPU runs a layer the host copies the next one, and a thread
  reads the layers into the page cache ahead of both (``_Prefetch``); each row of logits is
  reduced on the device to what scoring needs (``metrics.Rows``: the picked ids' logits, the
  tail's sums, the target, the argmax), so the logits never cross to the host.
  ``oss_convert/__init__.py`` sets ``MLX_ENABLE_TF32=0`` before MLX starts: MLX's CUDA backend
  otherwise multiplies float32 in TF32 (mean KL 2.5e-3).

The model's own config drives the run (window, heads, RoPE), so an artifact whose config is
wrong produces different logits.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..model import RMS_NORM_EPS, SWIGLU_ALPHA, CanonicalModel, ModelConfig, Mxfp4Pair, expected_tensors, logical_names
from ..formats import mxfp4
from .metrics import Rows, Wanted, rows_of, start_rows

Routing = Callable[[int, np.ndarray, int], np.ndarray]  # (layer, router logits [N, E], k) -> expert ids [N, k]



def rope_tables(config: ModelConfig, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` ``[T, head_dim/2]`` float32, concentration folded in, like the reference.

    The reference's float32 steps, with each elementary function correctly rounded: the
    frequencies ``theta ** (2i / head_dim)`` and the cosines and sines are computed in float64
    and rounded once. numpy's float32 ``power``/``cos`` take SIMD kernels that differ between
    processors by an ulp (6 of gpt-oss's 32 frequencies on one AVX-512 machine); an ulp of a
    frequency is 3e-4 rad of angle at position 4608, so the tables must not depend on them."""
    hd = config.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    freq = (np.float64(np.float32(config.rope_theta)) ** exponents.astype(np.float64)).astype(np.float32)
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
    angles = np.outer(np.arange(num_tokens, dtype=np.float32), inv_freq).astype(np.float64)
    c = np.float32(concentration)
    return np.cos(angles).astype(np.float32) * c, np.sin(angles).astype(np.float32) * c


LOGIT_BLOCK_ROWS = 512  # positions whose logits exist at once (412 MiB of float32 for gpt-oss)
VOCAB_BLOCK = 16384  # unembedding rows converted at a time on the CPU (180 MiB of float32 for gpt-oss)
ATTENTION_BLOCK_ELEMENTS = 1 << 24  # scores held at once: 64 MiB of float32 per query block
GPU_ATTENTION_BLOCK_ELEMENTS = 1 << 26  # on a GPU, all chunks at once: 256 MiB of scores per query block
GPU_EXPERT_BYTES = 1 << 30  # decoded float32 expert weights on the device at once
PREFETCH_BYTES = 4 << 30  # how far (in layers of this size, 2 at least) the read-ahead runs before the runner


def attend(q, k, v, sinks, window: int, xp, block_elements: int = ATTENTION_BLOCK_ELEMENTS):
    """Causal GQA attention with one sink logit per head, over blocks of queries.

    ``q`` ``[..., nkv, group, T, hd]`` (already scaled by 1/sqrt(hd)), ``k``/``v`` ``[..., nkv, T, hd]``
    (the leading axes, chunks on a GPU, are batched), ``sinks`` ``[nkv, group]``; ``xp`` is numpy or
    ``mlx.core``. Each block of queries sees only the keys its rows can attend to (causal, and the
    last ``window`` keys when ``window > 0``), so the reference's softmax over ``[scores, sink]`` is
    computed exactly, masked keys included as the zeros they contribute. Returns ``[..., T, nkv, group, hd]``.
    """
    nkv, group, T, hd = q.shape[-4:]
    batch = math.prod(q.shape[:-4])
    # A windowed block of w queries sees at most 2w-1 keys; a full block sees up to T.
    step = min(T, window) if window > 0 else int(max(1, min(T, block_elements // max(batch * nkv * group * T, 1))))
    sink = sinks.reshape(nkv, group, 1, 1)
    out = []
    for q0 in range(0, T, step):
        q1 = min(T, q0 + step)
        k0 = 0 if window <= 0 else max(0, q0 - window + 1)
        scores = q[..., q0:q1, :] @ k[..., None, k0:q1, :].swapaxes(-1, -2)  # [..., nkv, group, Bq, Bk]
        qpos, kpos = np.arange(q0, q1)[:, None], np.arange(k0, q1)[None, :]
        allowed = kpos <= qpos
        if window > 0:
            allowed &= kpos > qpos - window
        scores = scores + xp.array(np.where(allowed, 0.0, -np.inf).astype(np.float32))
        top = xp.maximum(scores.max(axis=-1, keepdims=True), sink)
        weights = xp.exp(scores - top)
        total = weights.sum(axis=-1, keepdims=True) + xp.exp(sink - top)
        out.append((weights / total) @ v[..., None, k0:q1, :])  # [..., nkv, group, Bq, hd]
    joined = xp.concatenate(out, axis=-2) if len(out) > 1 else out[0]
    return xp.moveaxis(joined, -2, -4)


def rms_norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The reference's RMSNorm in float32: ``x * rsqrt(mean(x^2) + eps) * scale``."""
    return x * (np.float32(1) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(RMS_NORM_EPS))) * scale


def swiglu(h, limit: float, xp):
    """Clamped SwiGLU on interleaved rows: even = glu (clamped above), odd = linear (clamped), ``+1``."""
    glu = xp.minimum(h[..., 0::2], limit)
    linear = xp.clip(h[..., 1::2], -limit, limit)
    return glu * (1 / (1 + xp.exp(-SWIGLU_ALPHA * glu))) * (linear + 1)


class Runner:
    """Runs a ``CanonicalModel`` on chunks of token ids, layer by layer.

    ``experts="quantized"`` uses the artifact's MXFP4 experts as stored (decoded exactly, on the
    device for an MLX GPU, one expert at a time for BLAS on the CPU); artifacts whose experts
    are not MXFP4 fall back to their dense values. ``experts="dequantized"`` decodes them on the
    host one expert at a time: the same values, so the same logits, only slower. ``device`` is ``"cpu"`` or
    ``"gpu"``; by default MLX's default device decides.

    ``routing`` replaces the router's own top-k choice: called as ``routing(layer, logits, k)``
    with the layer's router logits ``[N, E]`` (numpy float32), it returns the ``[N, k]`` expert ids
    each token takes (the gates stay the softmax over those ids' logits). Comparisons with another
    implementation use it to run both on one routing: where two router logits nearly tie, a
    last-bit difference between two float32 implementations picks different experts, and every
    later position that attends to that token differs with it.
    """

    def __init__(self, model: CanonicalModel, experts: str = "quantized", device: str | None = None,
                 routing: Routing | None = None):
        if experts not in ("quantized", "dequantized"):
            raise ValueError(f"experts must be 'quantized' or 'dequantized', not {experts!r}")
        self.model = model
        self.config: ModelConfig = model.config
        self.experts = experts
        self.routing = routing
        self.device = device or ("cpu" if mx.default_device() == mx.cpu else "gpu")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")

    @property
    def vocab_rows(self) -> int:
        return self.config.vocab_size

    @property
    def kernels(self) -> str:
        """The arithmetic this runner does, for the report: ``numpy float32 on cpu`` or ``mlx float32
        on gpu (cuda)`` (or ``metal``, or ``cpu`` where MLX's default device is the CPU)."""
        return kernels_of(self.device)

    # -- whole pass ---------------------------------------------------------------------

    def hidden_states(self, chunks: np.ndarray, progress: Callable[[float], None] | None = None) -> np.ndarray:
        """Final normed hidden states ``[C, T, H]`` for token ids ``[C, T]`` (positions 0..T-1 each).

        ``progress`` is told the tokens done after each layer (``C*T/L`` per layer), so a bar
        counts tokens through the whole model and shows tokens/s and the time left."""
        chunks = self._check_ids(chunks)
        if self.device == "gpu":
            return np.array(self._hidden_mlx(chunks, progress))
        x = self._embed(chunks)
        cos, sin = rope_tables(self.config, chunks.shape[1])
        per_layer = chunks.size / self.config.num_hidden_layers
        ahead = _Prefetch(self.model, self.config)
        try:
            for layer in range(self.config.num_hidden_layers):
                x = self._moe_cpu(layer, self._attention_cpu(layer, x, cos, sin))
                self._release(layer_names(self.config, layer))
                ahead.done(layer)
                if progress is not None:
                    progress(per_layer)
        finally:
            ahead.close()
        return rms_norm(x, self._f32("norm.scale"))

    def _check_ids(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        if chunks.ndim == 1:
            chunks = chunks[None]
        if chunks.size and (chunks.min() < 0 or chunks.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return chunks

    def iter_logits(self, chunks: np.ndarray, rows: slice | None = None,
                    progress: Callable[[float], None] | None = None) -> Iterator[np.ndarray]:
        """Float32 logits ``[len(rows), V]`` of each chunk in turn (positions ``rows``, default all)."""
        current, parts = 0, []
        for c, block in self.iter_logit_blocks(chunks, rows, progress):
            if c != current:
                yield np.concatenate(parts) if len(parts) > 1 else parts[0]
                current, parts = c, []
            parts.append(block)
        if parts:
            yield np.concatenate(parts) if len(parts) > 1 else parts[0]

    def iter_logit_blocks(self, chunks: np.ndarray, rows: slice | None = None,
                          progress: Callable[[float], None] | None = None,
                          block_rows: int = LOGIT_BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(chunk, logits [<= block_rows, V])`` in order: chunk by chunk, a few positions at a time,
        so a long chunk's logits (4095 x 201088 float32 = 3.3 GB at ctx 8192) never exist at once."""
        if self.device == "gpu":
            pending = None
            for c, logits in self._device_logits(chunks, rows, progress, block_rows):
                mx.async_eval(logits)  # computed while the caller takes the last block
                if pending is not None:
                    yield pending[0], np.array(pending[1])
                pending = (c, logits)
            if pending is not None:
                yield pending[0], np.array(pending[1])
            return
        hidden = self.hidden_states(chunks, progress)
        # The [V, H] unembedding is 2.3 GB as float32: it is converted in blocks of vocabulary rows as they are used.
        V = self.config.vocab_size
        for c in range(hidden.shape[0]):
            h_all = hidden[c] if rows is None else hidden[c, rows]
            for r0 in range(0, h_all.shape[0], block_rows):
                h = h_all[r0:r0 + block_rows]
                logits = np.empty((h.shape[0], V), dtype=np.float32)
                for v0 in range(0, V, VOCAB_BLOCK):
                    block = self.model.f32_rows("unembedding.weight", slice(v0, min(V, v0 + VOCAB_BLOCK)))
                    np.matmul(h, block.T, out=logits[:, v0:v0 + block.shape[0]])
                self.model.release("unembedding.weight")
                yield c, logits

    def iter_rows(self, chunks: np.ndarray, rows: slice | None, progress: Callable[[float], None] | None,
                  want: Wanted, block_rows: int = LOGIT_BLOCK_ROWS) -> Iterator[Callable[[], list[Rows]]]:
        """What scoring needs of each scored row (``want``), a block of rows at a time, in order: each
        item, once started, is called for its ``Rows`` pieces. On a GPU the device reduces every
        row (``_rows_mlx``) and only those cross to the host; on the CPU the host's threads reduce
        each block of logits (``metrics.start_rows``) while the next block is computed."""
        if self.device == "gpu":
            yield from self._row_blocks_mlx(chunks, rows, progress, block_rows, want)
            return
        at = 0
        for _, logits in self.iter_logit_blocks(chunks, rows, progress, block_rows):
            first, at = at, at + logits.shape[0]
            yield start_rows(lambda r, x=logits, a=first: rows_of(x[r], want, a + r.start), logits.shape[0])

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits ``[T, V]`` of one sequence, like ``Transformer(...)(tokens)``."""
        return next(self.iter_logits(np.asarray(tokens)[None]))

    # -- weights --------------------------------------------------------------------------

    def _release(self, names) -> None:
        """Unmap a finished layer's weights (mapped pages count as RSS)."""
        for name in names:
            self.model.release(name)

    def _f32(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.model.f32(name), dtype=np.float32)

    def _w(self, name: str) -> mx.array:
        return mx.array(self._f32(name))

    def _embed(self, chunks: np.ndarray) -> np.ndarray:
        # only the rows of the tokens used, read in file order: in token order a cold page cache
        # serves 8192 random rows as as many scattered faults
        ids, where = np.unique(chunks, return_inverse=True)
        table = self.model.f32_rows("embedding.weight", ids)
        self._release(["embedding.weight"])
        return table[where.reshape(chunks.shape)]

    def _qkv_split(self, qkv, C: int, T: int):
        c = self.config
        nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_part, k_part, v_part = c.qkv_slices
        q = qkv[..., q_part].reshape(C, T, nq, hd)
        k = qkv[..., k_part].reshape(C, T, nkv, hd)
        v = qkv[..., v_part].reshape(C, T, nkv, hd)
        return q, k, v

    def _choose_experts(self, layer: int, router, xp):
        """``[N, k]`` expert ids per token: the top-k router logits, or what ``routing`` says."""
        k = self.config.experts_per_token
        if self.routing is None:
            return xp.argpartition(-router, kth=k - 1, axis=-1)[:, :k]
        logits = np.asarray(router, dtype=np.float32)
        chosen = np.asarray(self.routing(layer, logits, k))
        if (chosen.shape != (logits.shape[0], k) or chosen.dtype.kind not in "iu" or chosen.min() < 0
                or chosen.max() >= self.config.num_experts or (np.diff(np.sort(chosen, -1), axis=-1) == 0).any()):
            raise ValueError(f"routing must give {k} distinct expert ids in [0, {self.config.num_experts}) per token")
        return mx.array(chosen.astype(np.uint32)) if xp is mx else chosen.astype(np.int64)

    # -- CPU: numpy and its BLAS ------------------------------------------------------------

    def _attention_cpu(self, layer: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c = self.config
        p = f"block.{layer}.attn."
        C, T, H = x.shape
        nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        group = nq // nkv
        t = rms_norm(x, self._f32(p + "norm.scale"))
        qkv = _by_chunk(t, self._f32(p + "qkv.weight")) + self._f32(p + "qkv.bias")
        q, k, v = self._qkv_split(qkv, C, T)
        q, k = _rope(q, cos, sin, np), _rope(k, cos, sin, np)
        sinks = self._f32(p + "sinks").reshape(nkv, group)
        scale = np.float32(1.0 / math.sqrt(hd))
        out = np.empty((C, T, nq * hd), dtype=np.float32)
        for i in range(C):  # query head h = kv * group + m uses kv head kv
            qi = np.ascontiguousarray((q[i] * scale).reshape(T, nkv, group, hd).transpose(1, 2, 0, 3))
            ki, vi = np.ascontiguousarray(k[i].transpose(1, 0, 2)), np.ascontiguousarray(v[i].transpose(1, 0, 2))
            out[i] = attend(qi, ki, vi, sinks, c.window(layer), np).reshape(T, nq * hd)
        y = _by_chunk(out, self._f32(p + "out.weight")) + self._f32(p + "out.bias")
        return x + y

    def _moe_cpu(self, layer: int, x: np.ndarray) -> np.ndarray:
        c = self.config
        p = f"block.{layer}.mlp."
        C, T, H = x.shape
        t3 = rms_norm(x, self._f32(p + "norm.scale"))
        router = (_by_chunk(t3, self._f32(p + "gate.weight")) + self._f32(p + "gate.bias")).reshape(C * T, -1)
        t = t3.reshape(C * T, H)
        k = c.experts_per_token
        indices = self._choose_experts(layer, router, np)
        chosen = np.take_along_axis(router, indices, axis=-1)
        chosen = np.exp(chosen - chosen.max(axis=-1, keepdims=True))
        gates = chosen / chosen.sum(axis=-1, keepdims=True)  # softmax over the k chosen logits
        b1, b2 = self._f32(p + "mlp1_bias"), self._f32(p + "mlp2_bias")
        weight1, weight2 = _ExpertWeights(self.model, layer, "mlp1"), _ExpertWeights(self.model, layer, "mlp2")
        out = np.zeros_like(t)
        flat = indices.reshape(-1)
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], np.arange(c.num_experts + 1))
        for e in range(c.num_experts):
            slots = order[starts[e]:starts[e + 1]]
            if not slots.size:
                continue  # an expert no token chose is never decoded
            rows = slots // k  # each token picks an expert at most once: rows are unique, ascending
            w1, w2 = weight1(e), weight2(e)
            # one chunk's rows at a time: a chunk's result never depends on which chunks share the
            # call (BLAS rounds by the shape it is given), so a rank's share computes what one process does
            bounds = np.searchsorted(rows, np.arange(C + 1) * T)
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                if lo == hi:
                    continue
                r = rows[lo:hi]
                h = t[r] @ w1.T + b1[e]
                y = swiglu(h, c.swiglu_limit, np) @ w2.T + b2[e]
                out[r] += y * gates.reshape(-1)[slots[lo:hi]][:, None]
        return x + out.reshape(C, T, H)

    # -- MLX GPU ------------------------------------------------------------------------------
    # Layer by layer, as on the CPU, with the same arithmetic: every weight reaches float32 exactly
    # on the device (BF16 bits widened, MXFP4 bytes decoded through the CPU decoder's own table)
    # and every product is a float32 matmul, so a reference and an artifact holding the same values
    # give the same logits bit for bit whatever their storage. What crosses to the GPU is what the
    # files hold (bytes, not decoded floats); while the GPU runs a layer the host copies the next
    # one's, and a thread asks the OS to read the layer after that.

    def _hidden_mlx(self, chunks: np.ndarray, progress: Callable[[float], None] | None,
                    ahead: "_Prefetch | None" = None, beside_last: Callable[[], None] | None = None) -> mx.array:
        """Final normed hidden states ``[C, T, H]`` on the device (``ahead``: the caller's read-ahead,
        which it closes; else one of its own; ``beside_last``: what the host does while the GPU
        runs the last layer)."""
        x = mx.array(self._embed(chunks))
        cos, sin = (mx.array(t) for t in rope_tables(self.config, chunks.shape[1]))
        per_layer = chunks.size / self.config.num_hidden_layers
        layers = self.config.num_hidden_layers
        own = ahead is None
        ahead = ahead or _Prefetch(self.model, self.config)
        try:
            weights = self._layer_mlx(0)
            for layer in range(layers):
                x = self._moe_mlx(layer, self._attention_mlx(layer, x, cos, sin, weights), weights)
                mx.async_eval(x)
                weights = self._layer_mlx(layer + 1) if layer + 1 < layers else None  # beside the GPU's work
                if layer + 1 == layers and beside_last is not None:
                    beside_last()
                self._release(layer_names(self.config, layer))
                ahead.done(layer + 1 if layer + 1 < layers else layer)
                if progress is not None:
                    progress(per_layer)
        finally:
            if own:
                ahead.close()
        return mx.fast.rms_norm(x, self._device_f32("norm.scale"), RMS_NORM_EPS)

    def _device_logits(self, chunks, rows, progress, block_rows) -> Iterator[tuple[int, mx.array]]:
        """``(chunk, logits)`` of each block as the device's arrays, not yet computed."""
        ahead = _Prefetch(self.model, self.config)
        moved = []

        def move_unembedding() -> None:  # [V, H] float32, held once; copied while the GPU runs the last layer
            moved.append(self._device_f32("unembedding.weight", piece_rows=VOCAB_BLOCK * 4))

        try:
            hidden = self._hidden_mlx(self._check_ids(chunks), progress, ahead, move_unembedding)
        finally:
            ahead.close()  # its last read, the unembedding, is done
        unembedding = moved[0] if moved else self._device_f32("unembedding.weight", piece_rows=VOCAB_BLOCK * 4)
        for c in range(hidden.shape[0]):
            h_all = hidden[c] if rows is None else hidden[c, rows.start:rows.stop:rows.step]
            for r0 in range(0, h_all.shape[0], block_rows):
                yield c, h_all[r0:r0 + block_rows] @ unembedding.T

    def _row_blocks_mlx(self, chunks, rows, progress, block_rows, want: Wanted) -> Iterator[Callable[[], list[Rows]]]:
        at, pending = 0, None
        for _, logits in self._device_logits(chunks, rows, progress, block_rows):
            reduced = _rows_mlx(logits, want, at)
            mx.async_eval(*reduced.values())  # reduced while the host combines the last block's pieces
            if pending is not None:
                yield _rows_on_host(*pending, want)
            pending, at = (reduced, at), at + logits.shape[0]
        if pending is not None:
            yield _rows_on_host(*pending, want)

    def _device_f32(self, name: str, piece_rows: int | None = None) -> mx.array:
        """A dense tensor as float32 on the device: BF16 bits moved and widened there (exact), else
        the reader's float32. ``piece_rows``: move a large tensor that many rows at a time, its
        mapped pages released after each piece, so the host holds one piece, not the tensor."""
        stored = getattr(self.model, "bf16_bits", None)
        bits = stored(name) if stored is not None else None
        if bits is None:
            return mx.array(self._f32(name))
        step = piece_rows or bits.shape[0]
        pieces = []
        for r0 in range(0, bits.shape[0], step):
            pieces.append(mx.array(np.ascontiguousarray(bits[r0:r0 + step])).view(mx.bfloat16).astype(mx.float32))
            if piece_rows:
                self.model.release(name)
                _move_now(pieces[-1])
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)

    def _layer_mlx(self, layer: int) -> dict:
        """One layer's weights on the device (dense ones float32, experts as ``_DeviceExperts``); the
        mapped pages are released once copied."""
        dense = [n for n in layer_names(self.config, layer) if not n.endswith(("mlp1_weight", "mlp2_weight"))]
        weights = {n.split(".", 2)[2]: self._device_f32(n) for n in dense}
        for which in ("mlp1", "mlp2"):
            weights[which] = _DeviceExperts(self.model, layer, which, self.experts == "quantized")
        self._release(layer_names(self.config, layer))
        return weights

    def _attention_mlx(self, layer: int, x: mx.array, cos: mx.array, sin: mx.array, w: dict) -> mx.array:
        c = self.config
        C, T, _ = x.shape
        nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        group = nq // nkv
        t = mx.fast.rms_norm(x, w["attn.norm.scale"], RMS_NORM_EPS)
        qkv = t @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]
        q, k, v = self._qkv_split(qkv, C, T)
        q, k = _rope(q, cos, sin, mx), _rope(k, cos, sin, mx)
        sinks = w["attn.sinks"].reshape(nkv, group)
        q = (q * (1.0 / math.sqrt(hd))).reshape(C, T, nkv, group, hd).transpose(0, 2, 3, 1, 4)  # [C, nkv, group, T, hd]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [C, nkv, T, hd]
        attn = attend(q, k, v, sinks, c.window(layer), mx, block_elements=GPU_ATTENTION_BLOCK_ELEMENTS)
        attn = attn.reshape(C, T, nq * hd)
        return x + attn @ w["attn.out.weight"].T + w["attn.out.bias"]

    def _moe_mlx(self, layer: int, x: mx.array, w: dict) -> mx.array:
        c = self.config
        C, T, H = x.shape
        k = c.experts_per_token
        t = mx.fast.rms_norm(x, w["mlp.norm.scale"], RMS_NORM_EPS).reshape(C * T, H)
        router = t @ w["mlp.gate.weight"].T + w["mlp.gate.bias"]
        indices = self._choose_experts(layer, router, mx)
        gates = mx.softmax(mx.take_along_axis(router, indices, axis=-1), axis=-1, precise=True)
        # (token, slot) pairs sorted by expert: each expert multiplies its rows in one matmul
        flat = indices.reshape(-1)
        order = mx.argsort(flat)
        sorted_experts = flat[order]
        mx.eval(sorted_experts)  # the host cuts the rows by expert: one wait per layer
        starts = np.searchsorted(np.array(sorted_experts), np.arange(c.num_experts + 1))
        rows = t[order // k]
        b1, b2 = w["mlp.mlp1_bias"], w["mlp.mlp2_bias"]
        outs = []
        for g0, g1 in w["mlp1"].groups:
            if starts[g1] == starts[g0]:
                continue  # no token chose these experts: never decoded
            w1, w2 = w["mlp1"].f32(g0, g1), w["mlp2"].f32(g0, g1)
            first = len(outs)
            for e in range(g0, g1):
                lo, hi = int(starts[e]), int(starts[e + 1])
                if lo == hi:
                    continue
                h = rows[lo:hi] @ w1[e - g0].T + b1[e]
                outs.append(swiglu(h, c.swiglu_limit, mx) @ w2[e - g0].T + b2[e])
            mx.async_eval(outs[first:])  # this group's float32 weights are freed before the next is decoded
        y = mx.concatenate(outs)[mx.argsort(order)].reshape(C * T, k, H)
        return x + (y * gates[..., None]).sum(axis=1).reshape(C, T, H)


def layer_names(config: ModelConfig, layer: int) -> list[str]:
    """The canonical names of one layer's tensors."""
    return [n for n in logical_names(config) if n.startswith(f"block.{layer}.")]


def kernels_of(device: str) -> str:
    """``Runner.kernels`` for a runner on ``device`` ("cpu": numpy; "gpu": MLX's default device)."""
    if device == "cpu":
        return "numpy float32 on cpu"
    if mx.default_device() == mx.cpu:
        return "mlx float32 on cpu"
    cuda = getattr(mx, "cuda", None)
    return "mlx float32 on gpu (" + ("cuda" if cuda is not None and cuda.is_available() else "metal") + ")"


def device_of(kernels: str) -> str:
    """The ``Runner`` device that runs ``kernels`` (a ``kernels_of`` text) on this machine."""
    return "cpu" if kernels.startswith("numpy") else "gpu"


TAIL_PIECE = 64  # logit columns one float32 sum covers on the device; the sums are combined in float64


def _segments(want: Wanted) -> list[tuple[int, int]]:
    """The column ranges a row's logsumexps are built from: cut at every cut below the scored columns."""
    bounds = sorted({0, want.vocab, *(c for c in want.cuts if c < want.vocab)})
    return list(zip(bounds, bounds[1:]))


def _rows_mlx(logits: mx.array, want: Wanted, at: int) -> dict[str, mx.array]:
    """A block of logits ``[S, V]`` reduced on the device to what ``metrics.Rows`` needs.

    The logsumexp is split where float32 cannot be trusted with it: the logits at the picked ids
    (the reference's top k, most of the mass) cross as they are and are summed on the host in
    float64; the device sums only the rest, the tail, as ``exp(x - segment max)`` with the picked
    columns zeroed, ``TAIL_PIECE`` columns at a time. A float32 sum over the whole row is off by
    ~1e-6, which is more than the whole tail mass of a confident model: the tail bucket of the KL
    would read noise."""
    x = logits[:, :want.vocab]
    S, V = x.shape
    out = {}
    if isinstance(want.pick, np.ndarray):
        ids = mx.array(np.ascontiguousarray(want.pick[at:at + S], dtype=np.int32))
    else:
        ids = _top_ids(x, want.pick)
        ids = mx.broadcast_to(mx.arange(V, dtype=mx.int32), (S, V)) if ids is None else ids.astype(mx.int32)
        out["ids"] = ids
    inside = mx.where(ids < V, ids, V)  # ids beyond the shared rows zero a padding column
    maxes, tails = [], []
    for a, b in _segments(want):
        m = x[:, a:b].max(axis=1, keepdims=True)
        e = mx.concatenate([mx.exp(x[:, a:b] - m), mx.zeros((S, 1), dtype=mx.float32)], axis=1)
        local = mx.where((inside >= a) & (inside < b), inside - a, b - a)
        e = mx.put_along_axis(e, local, mx.zeros(local.shape, dtype=mx.float32), axis=1)[:, :b - a]
        pad = -(b - a) % TAIL_PIECE
        if pad:
            e = mx.concatenate([e, mx.zeros((S, pad), dtype=mx.float32)], axis=1)
        maxes.append(m)
        tails.append(e.reshape(S, -1, TAIL_PIECE).sum(axis=-1))
    top = x.max(axis=1, keepdims=True)
    targets = mx.array(np.ascontiguousarray(want.targets[at:at + S], dtype=np.int32))
    out.update(maxes=mx.concatenate(maxes, axis=1), tails=mx.concatenate(tails, axis=1),
               picked=mx.take_along_axis(x, mx.where(ids < V, ids, 0), axis=1),
               target=mx.take_along_axis(x, targets[:, None], axis=1)[:, 0],
               argmax=mx.min(mx.where(x == top, mx.arange(V, dtype=mx.int32), V), axis=1))  # ties: lowest id, as numpy's
    return out


def _rows_on_host(reduced: dict[str, mx.array], at: int, want: Wanted) -> Callable[[], list[Rows]]:
    """``Rows`` of a block ``_rows_mlx`` reduced (rows ``at..``): each logsumexp from the picked
    logits and the tail's pieces, in float64."""
    host = {name: np.array(a) for name, a in reduced.items()}
    picked = host["picked"]
    S = picked.shape[0]
    ids = host["ids"] if "ids" in host else want.pick[at:at + S]
    segments = _segments(want)
    per_segment = [-(-(b - a) // TAIL_PIECE) for a, b in segments]
    piece_segment = np.repeat(np.arange(len(segments)), per_segment)
    with np.errstate(divide="ignore"):  # an all-picked piece sums to 0: log 0 = -inf adds nothing
        tail_logs = host["maxes"][:, piece_segment].astype(np.float64) + np.log(host["tails"].astype(np.float64))

    def lse_below(end: int) -> np.ndarray:
        top = np.sort(np.where(ids < end, picked.astype(np.float64), -np.inf), axis=1)  # one order: equal inputs, equal sums
        return _logsumexp_terms(np.concatenate([top, tail_logs[:, piece_segment < sum(1 for _, b in segments if b <= end)]], axis=1))

    rows = Rows(lse=lse_below(want.vocab), cut_lse={b: lse_below(b) for _, b in segments[:-1]},
                ids=ids, picked=picked, target=host["target"], argmax=host["argmax"])
    return lambda: [rows]


def _logsumexp_terms(terms: np.ndarray) -> np.ndarray:
    """``log(sum(exp(terms)))`` of each row of float64 terms (``-inf`` terms add nothing)."""
    top = terms.max(axis=1)
    return top + np.log(np.exp(terms - top[:, None]).sum(axis=1))


def _top_ids(logits: mx.array, k: int) -> mx.array | None:
    """Ids of each row's ``k`` largest logits, unordered; ``None`` for 0 or all."""
    V = logits.shape[-1]
    if not 0 < k < V:
        return None
    return mx.argpartition(logits, V - k, axis=-1)[..., V - k:]


def _rope(x, cos, sin, xp):
    """Half-split rotation of ``x`` ``[C, T, heads, hd]`` by tables ``[T, hd/2]`` (numpy or MLX)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _by_chunk(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x [C, T, in] @ weight.T`` one chunk per BLAS call: each chunk's rows are rounded alike
    whatever other chunks the batch holds (with some kernels a GEMM's rounding depends on its row
    count), so data-parallel ranks reproduce one process bit for bit."""
    wt = weight.T
    out = np.empty(x.shape[:-1] + (weight.shape[0],), dtype=np.float32)
    for i in range(x.shape[0]):
        np.matmul(x[i], wt, out=out[i])
    return out


class _ExpertWeights:
    """One expert's float32 weight at a time: decoded from MXFP4 (into one buffer, reused by the
    next call), or sliced from a dense tensor."""

    def __init__(self, model: CanonicalModel, layer: int, which: str):
        self.pair = model.mxfp4(layer, which)
        self.name = f"block.{layer}.mlp.{which}_weight"
        # Dense or otherwise quantized experts are read one expert at a time (every reader, and a
        # base with an adapter applied, has ``expert_f32``): a whole layer in float32 is gigabytes.
        self.one_expert = getattr(model, "expert_f32", None) if self.pair is None else None
        self.dense = None if self.pair is not None or self.one_expert else model.f32(self.name)
        self.release = lambda: model.release(self.name)
        self.buffer = None

    def __call__(self, expert: int) -> np.ndarray:
        if self.pair is not None:
            scales = self.pair.scales[expert]
            if self.buffer is None:
                self.buffer = np.empty(scales.shape[:-1] + (scales.shape[-1] * mxfp4.BLOCK,), np.float32)
            return mxfp4.decode(self.pair.blocks[expert], scales, out=self.buffer)
        if self.one_expert is not None:
            values = self.one_expert(self.name, expert)
            self.release()  # its mapped pages: a 120b layer of BF16 experts is 6.4 GB of them
            return values
        return np.ascontiguousarray(self.dense[expert], dtype=np.float32)


def expert_groups(config: ModelConfig) -> list[tuple[int, int]]:
    """``(first, end)`` expert ranges whose decoded float32 ``mlp1`` and ``mlp2`` weights together fit
    ``GPU_EXPERT_BYTES`` (10 experts of gpt-oss's 20b or 120b at a time)."""
    per_expert = 4 * 3 * config.intermediate_size * config.hidden_size
    size = max(1, GPU_EXPERT_BYTES // per_expert)
    return [(g0, min(config.num_experts, g0 + size)) for g0 in range(0, config.num_experts, size)]


class _DeviceExperts:
    """One layer's ``mlp1`` or ``mlp2`` for every expert, handed out as float32 on the device a group
    of experts at a time (``expert_groups``: bounded whatever the model's size).

    MXFP4 experts move as their bytes, a group at a time (each group's mapped pages released once
    copied, so the host holds one group, not the layer), and are decoded on the device through
    ``mxfp4.scaled_pairs``, the CPU decoder's own table: the values are the same bit for bit. Dense
    BF16 experts move as their bits and are widened there; anything else (a base with an adapter
    applied, ``experts="dequantized"``) is decoded on the host one expert at a time."""

    def __init__(self, model: CanonicalModel, layer: int, which: str, quantized: bool):
        self.name = f"block.{layer}.mlp.{which}_weight"
        self.groups = expert_groups(model.config)
        split = getattr(model, "mxfp4_halves", None)
        halves = split(layer, which) if quantized and split is not None else None
        pair = model.mxfp4(layer, which) if quantized and halves is None else None
        stored = getattr(model, "bf16_bits", None)
        bits = stored(self.name) if pair is None and halves is None and stored is not None else None
        self.pieces, self.bits, self.host = {}, None, None
        if pair is not None or halves is not None:
            loaded = _loaded_by_mlx(model, pair) if pair is not None else _halves_loaded_by_mlx(model, halves)
            for g0, g1 in self.groups:
                self.pieces[g0] = (_loaded_group(loaded, halves, g0, g1) if loaded is not None
                                   else _bytes_on_device(pair, halves, g0, g1))
                model.release(self.name)
                _move_now(*self.pieces[g0])
            experts, rows, groups = (pair or halves[0]).scales.shape
            self.shape = (experts, rows * (1 if halves is None else 2), groups * mxfp4.BLOCK)
        elif bits is not None:
            self.bits, self.shape = bits, bits.shape
            self.release = lambda: model.release(self.name)
        else:
            spec = next(s for s in expected_tensors(model.config, "bf16") if s.name == self.name)
            self.host, self.shape = _ExpertWeights(model, layer, which), spec.shape

    def f32(self, first: int, end: int) -> mx.array:
        """Experts ``first..end-1`` (one of ``groups``) as float32 ``[n, O, I]`` on the device."""
        if self.pieces:
            blocks, scales = self.pieces[first]
            index = (scales.astype(mx.uint16)[..., None] << 8) | blocks.astype(mx.uint16)
            return mx.take(_device_pairs(), index, axis=0).reshape(end - first, *self.shape[1:])
        if self.bits is not None:
            widened = mx.array(np.ascontiguousarray(self.bits[first:end])).view(mx.bfloat16).astype(mx.float32)
            self.release()  # this group's mapped pages: the host holds one group of a dense layer, not the layer
            return widened
        out = np.empty((end - first, *self.shape[1:]), dtype=np.float32)
        for e in range(first, end):
            out[e - first] = self.host(e)  # the decoder reuses one buffer: copy each expert out of it
        return mx.array(out)


def _loaded_by_mlx(model: CanonicalModel, pair: Mxfp4Pair,
                   files: dict | None = None) -> tuple[mx.array, mx.array] | None:
    """The pair as ``mx.load`` reads it from its safetensors file, where the reader's arrays are
    that file's bytes verbatim (``stored_source``: never bytes computed from them, so an adapter's
    merged experts are not replaced by their base), else ``None``. On CUDA MLX reads a file on a
    thread pool into device memory, 1.4-2.2x faster than copying mapped pages into its managed
    memory (``bench/copy_rate.py``); on Metal it reads into the memory the GPU shares."""
    find = getattr(model, "stored_source", None)
    sources = (find(pair.blocks), find(pair.scales)) if find is not None else (None,)
    if None in sources:
        return None
    files, loaded = {} if files is None else files, []  # a caller's, for pairs that share files
    try:
        with mx.stream(_copy_stream()):
            for (path, name), host in zip(sources, (pair.blocks, pair.scales)):
                if path not in files:  # MLX parses the whole header on each load: once a file
                    files[path] = mx.load(str(path))
                array = files[path][name]
                if array.nbytes != host.nbytes:  # MLX read its header otherwise
                    return None
                # The same bytes under the file's dtype (an MLX artifact's uint32 words): the
                # reader's view of them is uint8 in OpenAI's shape, and so is this one.
                loaded.append(array.view(mx.uint8).reshape(host.shape))
    except (RuntimeError, ValueError):
        return None  # a header our reader accepted that MLX's refuses (its limits differ): copy instead
    return loaded[0], loaded[1]


def _halves_loaded_by_mlx(model: CanonicalModel, halves) -> list[tuple[mx.array, mx.array]] | None:
    """mlx-lm's gate and up halves, each as ``_loaded_by_mlx`` reads it, or ``None`` unless both are."""
    if halves is None:
        return None
    files: dict = {}
    loaded = [_loaded_by_mlx(model, half, files) for half in halves]
    return None if None in loaded else loaded


def _loaded_group(loaded, halves, first: int, end: int) -> tuple[mx.array, mx.array]:
    """Experts ``first..end-1`` of what MLX loaded: a pair's slices, or two halves' interleaved."""
    if halves is None:
        return loaded[0][first:end], loaded[1][first:end]
    (gate_blocks, gate_scales), (up_blocks, up_scales) = loaded
    return (_interleaved_rows(gate_blocks[first:end], up_blocks[first:end]),
            _interleaved_rows(gate_scales[first:end], up_scales[first:end]))


def _interleaved_rows(gate: mx.array, up: mx.array) -> mx.array:
    """OpenAI's ``mlp1`` rows from mlx-lm's halves: even rows gate, odd rows up."""
    return mx.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


def _bytes_on_device(pair: Mxfp4Pair | None, halves, first: int, end: int) -> tuple[mx.array, mx.array]:
    """Experts ``first..end-1``'s MXFP4 blocks and scales on the device, in OpenAI's row order: a
    pair copied as it is, or gate and up halves (mlx-lm's) copied apart and interleaved there
    (even rows gate, odd rows up), which spares the host a strided pass over the layer."""
    def copy(array: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(array[first:end]))

    if pair is not None:
        return copy(pair.blocks), copy(pair.scales)
    gate, up = halves
    return (_interleaved_rows(copy(gate.blocks), copy(up.blocks)),
            _interleaved_rows(copy(gate.scales), copy(up.scales)))


_COPY_STREAM: list = []


def _move_now(*arrays: mx.array) -> None:
    """Have the device read freshly copied arrays now, on a stream of their own (so nothing waits
    for the layer being computed): where MLX keeps arrays in memory the host and the GPU share
    (CUDA's managed memory), a host copy stays in the host's RSS until the GPU touches it."""
    with mx.stream(_copy_stream()):
        mx.async_eval([a.reshape(-1)[::4096].max() for a in arrays])


def _copy_stream():
    if not _COPY_STREAM:
        _COPY_STREAM.append(mx.new_stream(mx.default_device()))
    return _COPY_STREAM[0]


_DEVICE_PAIRS: list[mx.array] = []


def _device_pairs() -> mx.array:
    """``mxfp4.scaled_pairs`` on the device (512 KiB: it stays in the GPU's cache)."""
    if not _DEVICE_PAIRS:
        _DEVICE_PAIRS.append(mx.array(mxfp4.scaled_pairs()))
    return _DEVICE_PAIRS[0]


class _Prefetch:
    """Reads a model's layers into the page cache in order on a thread (the reader's ``prefetch``,
    where it has one), up to ``PREFETCH_BYTES`` ahead of the layer the runner has finished with,
    so the disk keeps reading while the runner computes and a machine with less memory than the
    model does not evict a layer before its turn."""

    def __init__(self, model: CanonicalModel, config: ModelConfig):
        self.ask = getattr(model, "prefetch", None)
        self.config = config
        per_layer = sum(s.nbytes for s in expected_tensors(config) if s.name.startswith("block.0."))
        self.depth = max(2, PREFETCH_BYTES // max(per_layer, 1))
        self.finished = -1
        self.stopped = False
        self.turn = threading.Condition()
        self.thread = threading.Thread(target=self._read, name="prefetch", daemon=True)
        if self.ask is not None:
            self.thread.start()

    def done(self, layer: int) -> None:
        """The runner needs no more of ``layer``'s pages: read further ahead."""
        with self.turn:
            self.finished = layer
            self.turn.notify()

    def _read(self) -> None:
        layers = self.config.num_hidden_layers
        for layer in range(layers + 1):
            with self.turn:
                self.turn.wait_for(lambda: self.stopped or layer <= self.finished + self.depth)
                if self.stopped:
                    return
            names = layer_names(self.config, layer) if layer < layers else ["unembedding.weight"]
            for name in names:
                if self.stopped:
                    return
                try:
                    self.ask(name)
                except (OSError, ValueError):
                    return  # a hint only (a closed file, say): the runner reads what it needs anyway

    def close(self) -> None:
        with self.turn:
            self.stopped = True
            self.turn.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=5)  # at most one piece's read away
