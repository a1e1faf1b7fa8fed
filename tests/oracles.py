"""The implementations we hold our output against, none of them written by this project.

- OpenAI's torch reference (``gpt_oss.torch.model.Transformer``), on CPU in float32.

Two float32 implementations of a mixture of experts agree only up to rounding, and where two
router logits nearly tie that rounding picks different experts (which way depends on the
processor's kernels). ``torch_reference_run`` therefore also returns the router logits torch
computed, so that our runner can take torch's routing (``FollowRouting``) and the comparison
measures everything else: attention, RoPE, window, sinks, experts.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest


@lru_cache(maxsize=4)
def _torch_model(original_dir: str, dtype: str):
    pytest.importorskip("torch")
    model_mod = pytest.importorskip("gpt_oss.torch.model")
    model = model_mod.Transformer.from_checkpoint(original_dir, device="cpu")
    return model.float() if dtype == "float32" else model


def _original(repo: Path) -> str:
    return str(Path(repo) / "original" if (Path(repo) / "original").is_dir() else Path(repo))


def torch_reference_run(repo: Path, tokens: np.ndarray, dtype: str = "float32") -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits ``[T, vocab]`` of the official torch reference for ``repo/original``, and each
    layer's router logits ``[T, E]`` (read off its ``gate`` modules by forward hooks)."""
    import torch

    model = _torch_model(_original(repo), dtype)
    router: list[np.ndarray] = []
    hooks = [block.mlp.gate.register_forward_hook(lambda _m, _i, out: router.append(out.float().numpy().copy()))
             for block in model.block]
    try:
        with torch.inference_mode():
            logits = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    return logits.float().numpy(), router


def torch_reference_logits(repo: Path, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Logits ``[T, vocab]`` of the official torch reference for ``repo/original``."""
    return torch_reference_run(repo, tokens, dtype)[0]


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest logits of each row, as a set (sorted ids)."""
    return np.sort(np.argpartition(-logits, k - 1, axis=-1)[:, :k], axis=-1)


def top_k_margin(logits: np.ndarray, k: int) -> np.ndarray:
    """Per row: the k-th largest logit minus the (k+1)-th, relative to the row's largest |logit|.
    A routing decision can flip between two float32 implementations only where this is tiny."""
    ordered = -np.sort(-logits.astype(np.float64), axis=-1)
    return (ordered[:, k - 1] - ordered[:, k]) / np.abs(ordered).max(-1)


class FollowRouting:
    """A ``Runner(routing=...)`` that takes the experts another implementation chose (from its
    router logits, layer by layer) and keeps our own router logits to compare with them."""

    def __init__(self, their_router: list[np.ndarray]):
        self.theirs = their_router
        self.ours: dict[int, np.ndarray] = {}

    def __call__(self, layer: int, logits: np.ndarray, k: int) -> np.ndarray:
        self.ours[layer] = logits.copy()
        return top_k(self.theirs[layer], k)

    def largest_router_difference(self) -> float:
        """Max |ours - theirs| over every router logit, relative to the largest |logit|."""
        return max(float(np.abs(ours - self.theirs[layer]).max() / np.abs(self.theirs[layer]).max())
                   for layer, ours in self.ours.items())

    def flips(self, k: int) -> list[tuple[int, int, float]]:
        """``(layer, position, margin)`` wherever our own top-k would have taken other experts."""
        out = []
        for layer, ours in self.ours.items():
            rows = np.nonzero((top_k(ours, k) != top_k(self.theirs[layer], k)).any(-1))[0]
            margins = top_k_margin(self.theirs[layer][rows], k)
            out += [(layer, int(r), float(m)) for r, m in zip(rows, margins)]
        return out


# Two float32 implementations' router logits differ by ~1.3e-6 of the largest |logit| on the tiny
# models at 300 tokens (measured: ours against torch). A fixture compared across implementations
# keeps every top-k margin above 15x that, so no routing decision can fall differently.
MIN_ROUTER_MARGIN = 2e-5


class WatchRouting:
    """A ``Runner(routing=...)`` that takes the router's own top-k and records its margins."""

    def __init__(self):
        self.margins: dict[int, np.ndarray] = {}

    def __call__(self, layer: int, logits: np.ndarray, k: int) -> np.ndarray:
        self.margins[layer] = top_k_margin(logits, k)
        return top_k(logits, k)


def assert_wide_router_margins(repo: Path, tokens: np.ndarray) -> None:
    """Fail the fixture (not a test far downstream) where ``tokens`` (one chunk, or ``[C, T]``)
    hold a routing near-tie in the model at ``repo`` (any artifact ``verify`` reads)."""
    from oss_convert import formats
    from oss_convert.verify.runner import Runner

    watch = WatchRouting()
    model = formats.open_canonical(repo)
    try:
        chunks = np.asarray(tokens)
        Runner(model, device="cpu", routing=watch).hidden_states(chunks[None] if chunks.ndim == 1 else chunks)
    finally:
        model.close()
    narrowest = min((float(m.min()), layer) for layer, m in watch.margins.items())
    assert narrowest[0] > MIN_ROUTER_MARGIN, (
        f"{repo}: a top-k margin of {narrowest[0]:.2e} in layer {narrowest[1]} is a near-tie that two float32 "
        "implementations may break differently; choose other tokens or weights for this fixture")


def llama(model_path, **kwargs):
    """``llama_cpp.Llama(model_path, **kwargs)`` with llama.cpp's extra CPU buffer types off
    (``--no-repack`` in llama.cpp's tools): on a processor with AMX (Intel Sapphire Rapids and
    later) llama.cpp repacks Q8_0 weights for its AMX kernels, which crash with a segmentation
    fault on these models' widths (ggml-org/llama.cpp#20824). The numbers are llama.cpp's own
    either way; only which kernel computes them differs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp.llama_cpp as library

    default = library.llama_model_default_params

    def without_extra_buffer_types():
        params = default()
        params.use_extra_bufts = False
        return params

    library.llama_model_default_params = without_extra_buffer_types
    try:
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    finally:
        library.llama_model_default_params = default


def llama_logits(path, tokens, **kwargs) -> "np.ndarray":
    """llama.cpp's logits of every position of ``tokens`` (float64), from a fresh model
    (``kwargs``: more of ``Llama``'s arguments, e.g. ``lora_path``)."""
    import numpy as np

    llm = llama(path, n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0, **kwargs)
    try:
        llm.eval([int(t) for t in tokens])
        return np.array(llm.scores[:llm.n_tokens], dtype=np.float64)
    finally:
        llm.close()


# --------------------------------------------------------------------------------------
# transformers and PEFT (LoRA adapters)


def transformers_run(model, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits ``[T, vocab]`` of a transformers (or PEFT-wrapped) GptOss model, and each layer's
    router logits ``[T, E]`` (the first output of its ``GptOssTopKRouter``), for ``FollowRouting``."""
    import torch

    routers = [m for m in model.modules() if type(m).__name__ == "GptOssTopKRouter"]
    router: list[np.ndarray] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: router.append(out[0].float().numpy().copy())) for r in routers]
    try:
        with torch.inference_mode():
            logits = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    return logits.float().numpy(), router


def transformers_model(folder: Path, **kwargs):
    """``GptOssForCausalLM`` of ``folder`` in float32, eager attention (the reference's)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                          **kwargs)


def peft_adapter(base_hf: Path, out: Path, *, seed: int = 0, b_scale: float = 0.05, **config) -> Path:
    """A LoRA adapter written by PEFT itself (``save_pretrained``) for the transformers folder
    ``base_hf``: ``LoraConfig(**config)`` with every factor random (a trained adapter has B != 0;
    B is scaled by ``b_scale`` so the deltas are the size of a fine-tune's, not of the weights).

    Each factor is drawn as PEFT's ``init_lora_weights=False`` draws it (uniform within
    1/sqrt(fan-in)), but from a generator seeded by ``seed`` and the factor's name: PEFT's own
    draws follow the order it wraps the modules in, which changed in peft 0.22 (target_modules
    sorted), and with it every adapter and every measured bound of the tests."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(transformers_model(base_hf), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                draw = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
                bound = param.shape[-1] ** -0.5
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=draw))
                if "lora_B" in name:
                    param.mul_(b_scale)
    model.save_pretrained(out)
    return out


def peft_model(base_hf: Path, adapter: Path):
    """transformers' model of ``base_hf`` with PEFT's adapter applied (not merged)."""
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(transformers_model(base_hf), adapter)
