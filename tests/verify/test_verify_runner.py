"""The MLX runner against OpenAI's torch reference, and the KL metric against torch's kl_div."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.verify.metrics import compare_block, log_softmax
from oss_convert.verify.runner import Runner, rope_tables

from oracles import FollowRouting, torch_reference_logits, torch_reference_run

# Measured on the tiny model, 300 tokens: max |diff| 3.5e-5 (quantized) / 4.4e-5 (dequantized)
# on logits of magnitude ~14, i.e. ~3e-6 relative. The bound leaves 3x headroom.
REL_BOUND = 1e-5


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.oracle
@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("experts", ["quantized", "dequantized"])
def test_runner_matches_torch_reference_fp32(tiny_repo, tokens_300, experts, device):
    """Both paths: numpy + BLAS (the CPU's) and MLX with gather_qmm (a GPU's; here MLX runs it
    on whatever its default device is, so the code path is the one a GPU takes)."""
    want = torch_reference_logits(tiny_repo, tokens_300)
    with OriginalCheckpoint(tiny_repo) as ckpt:
        got = Runner(ckpt, experts, device=device).logits(tokens_300)
    assert got.shape == want.shape == (300, 1024)
    assert _rel_err(got, want) < REL_BOUND
    # beyond the 128-token window too
    assert _rel_err(got[200:], want[200:]) < REL_BOUND
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.oracle
def test_runner_honours_the_configs_sliding_window(tiny_repo, tokens_300, tmp_path):
    """A window of 64 in config.json changes torch's logits; the runner follows the same config."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    config_path = repo / "original" / "config.json"
    config = json.loads(config_path.read_text())
    config["sliding_window"] = 64
    config_path.write_text(json.dumps(config))
    want = torch_reference_logits(repo, tokens_300)
    with OriginalCheckpoint(repo) as ckpt:
        got = Runner(ckpt).logits(tokens_300)
    with OriginalCheckpoint(tiny_repo) as ckpt:
        window_128 = Runner(ckpt).logits(tokens_300)
    assert _rel_err(got, want) < REL_BOUND
    # identical until position 64, where the windows start to differ
    assert _rel_err(got[:64], window_128[:64]) < REL_BOUND
    assert np.abs(got[100:] - window_128[100:]).max() > 0.1


@pytest.mark.oracle
def test_rope_tables_match_torch_yarn():
    torch = pytest.importorskip("torch")
    from gpt_oss.torch.model import RotaryEmbedding

    from oss_convert.synth import PRESETS

    c = PRESETS["20b"]
    rope = RotaryEmbedding(c.head_dim, c.rope_theta, torch.float32, initial_context_length=c.initial_context_length,
                           scaling_factor=c.rope_scaling_factor, ntk_alpha=c.rope_ntk_alpha, ntk_beta=c.rope_ntk_beta)
    want_cos, want_sin = (t.numpy() for t in rope._compute_cos_sin(4096))
    cos, sin = rope_tables(c, 4096)
    # fp32 angles p*inv_freq reach 4096 rad; one ulp there is 5e-4
    assert np.abs(cos - want_cos).max() < 2e-3 and np.abs(sin - want_sin).max() < 2e-3
    # mlx-lm's floor/ceil YaRN range is off by ~0.06 here; we agree to float32 rounding
    assert np.abs(cos[:256] - want_cos[:256]).max() < 5e-5
    assert np.abs(sin[:256] - want_sin[:256]).max() < 5e-5


@pytest.mark.oracle
def test_kl_matches_torch_kl_div_when_topk_covers_vocab():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    ref_logits = rng.normal(size=(50, 300)) * 3
    art_logits = (ref_logits + rng.normal(size=ref_logits.shape) * 0.3).astype(np.float32)
    lp_ref, lse_ref = log_softmax(ref_logits)
    targets = rng.integers(0, 300, size=50)
    order = np.argsort(-lp_ref, axis=1, kind="stable")
    m = compare_block(art_logits, targets, order, np.take_along_axis(lp_ref, order, 1), lse_ref,
                      lp_ref[np.arange(50), targets])
    want = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(art_logits, dtype=torch.float64), -1),
                                      torch.tensor(lp_ref), log_target=True, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(m.kld, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.nll, -torch.log_softmax(torch.tensor(art_logits, dtype=torch.float64), -1)
                               .numpy()[np.arange(50), targets], rtol=1e-12)
    assert (m.same_top == (art_logits.argmax(1) == ref_logits.argmax(1))).all()
    np.testing.assert_allclose(m.max_abs_logit_diff, np.abs(art_logits - ref_logits).max(1), rtol=1e-6)


def test_kl_with_truncated_topk_is_a_lower_bound():
    rng = np.random.default_rng(4)
    ref_logits = rng.normal(size=(20, 400)) * 2
    art_logits = ref_logits + rng.normal(size=ref_logits.shape)
    lp_ref, lse_ref = log_softmax(ref_logits)
    lp_art, _ = log_softmax(art_logits)
    exact = (np.exp(lp_ref) * (lp_ref - lp_art)).sum(1)
    order = np.argsort(-lp_ref, axis=1)[:, :50]
    m = compare_block(art_logits, np.zeros(20, dtype=np.int64), order, np.take_along_axis(lp_ref, order, 1), lse_ref,
                      lp_ref[:, 0])
    assert (m.kld <= exact + 1e-12).all() and (m.kld > 0.3 * exact).all()


@pytest.mark.oracle
def test_runner_matches_torch_past_the_initial_context_length(tiny_repo):
    """4608 tokens: past initial_context_length (4096), where YaRN and window bugs show, and 36
    sliding windows deep. Attention runs in query blocks here (the torch reference does not).

    18,432 routing decisions on random weights hold near-ties: one that falls the other way in
    torch's float32 changes that token's MLP, and full attention carries it to every later
    position (seen on one processor from position 2886 on). So our runner takes torch's routing,
    and the routing itself is checked apart: our router logits equal torch's to float32 rounding,
    and wherever our own top-4 would differ, torch's margin was a near-tie."""
    tokens = np.random.default_rng(11).integers(0, 1000, size=4608).astype(np.int64)
    want, their_router = torch_reference_run(tiny_repo, tokens)
    follow = FollowRouting(their_router)
    with OriginalCheckpoint(tiny_repo) as ckpt:
        run = Runner(ckpt, "quantized", device="cpu", routing=follow)
        got = run.logits(tokens)
        k = ckpt.config.experts_per_token
        # The mildest defect this test is for: YaRN's ramp starting 0.05 dimensions early (what
        # flooring the correction range does): measured 3.0e-2, 300x the bound.
        run.config, run.routing = dataclasses.replace(ckpt.config, rope_ntk_beta=33.1), FollowRouting(their_router)
        shifted = run.logits(tokens)
    # The two sides' float32 RoPE angles differ by an ulp of a frequency where torch's float32
    # `pow` is not correctly rounded (2 of 32 on one machine): 3e-4 rad at position 4608.
    # Measured 1.4e-5 (6.9e-6 before position 2048); the bound leaves 7x for other processors.
    long_bound = 1e-4
    assert _rel_err(got, want) < long_bound
    assert _rel_err(got[4096:], want[4096:]) < long_bound
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.999
    assert _rel_err(shifted, want) > 100 * long_bound
    router_bound = 1e-4  # measured 1.4e-5: the routers see the same hidden states to float32 rounding
    assert follow.largest_router_difference() < router_bound
    assert all(margin < 2 * router_bound for _, _, margin in follow.flips(k)), follow.flips(k)


def test_long_context_attention_never_holds_a_full_score_matrix(tiny_repo):
    """--ctx 16384: a [heads, T, T] float32 matrix would be 8.6 GB; the blocks stay near 64 MiB."""
    import tracemalloc

    from oss_convert.verify import runner as runner_module

    tokens = np.random.default_rng(12).integers(0, 1000, size=16384)
    with OriginalCheckpoint(tiny_repo) as ckpt:
        run = Runner(ckpt, device="cpu")
        x = run._embed(tokens[None])
        cos, sin = runner_module.rope_tables(ckpt.config, tokens.size)
        tracemalloc.start()
        for layer in (0, 1):  # a windowed layer and a full one
            run._attention_cpu(layer, x, cos, sin)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    heads = ckpt.config.num_attention_heads
    full_matrix = heads * tokens.size ** 2 * 4  # 8.6 GB
    assert peak < full_matrix / 10, peak  # measured 490 MB: a few score blocks plus q, k, v for 16384 tokens


def test_mlx_computes_in_full_float32_on_every_device():
    """MLX's CUDA backend uses TF32 for float32 matmuls unless MLX_ENABLE_TF32=0 is set before it
    starts; importing oss_convert sets it (a lossless artifact showed KL 2.5e-3 in TF32)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    code = "import oss_convert, os, mlx.core; print(os.environ['MLX_ENABLE_TF32'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "0"


def test_logits_come_in_bounded_blocks_that_add_up_to_the_whole(tiny_repo, tokens_300):
    """Long chunks' logits are produced a few positions at a time (3.3 GB at ctx 8192 otherwise)."""
    chunks = np.stack([tokens_300[:150], tokens_300[150:]])
    with OriginalCheckpoint(tiny_repo) as ckpt:
        run = Runner(ckpt, device="cpu")
        blocks = list(run.iter_logit_blocks(chunks, slice(74, None), block_rows=7))
        whole = list(run.iter_logits(chunks, slice(74, None)))
    assert max(b.shape[0] for _, b in blocks) == 7 and [c for c, _ in blocks] == sorted(c for c, _ in blocks)
    for c in (0, 1):  # BLAS may round differently for another number of rows: float32 noise only
        np.testing.assert_allclose(np.concatenate([b for i, b in blocks if i == c]), whole[c], rtol=1e-5, atol=1e-5)
