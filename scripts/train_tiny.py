#!/usr/bin/env python3
"""Train the bundled tiny gpt-oss (examples/gpt-oss-tiny) on the CPU, and write it as a release.

    apt-get install bible-kjv          # the King James Bible (public domain), from Debian
    python scripts/train_tiny.py --out examples/gpt-oss-tiny [--minutes 12] [--seed 0]

The model is OpenAI's own: ``gpt_oss.torch.model.Transformer`` holds the parameters, and the
training forward below is the same computation over a batch of sequences (it uses the
module's RMSNorm, rotary tables and swiglu; the MoE evaluates every expert and keeps the top-4,
instead of gathering their weights per token). Before training, it is checked against
``Transformer.forward`` on one sequence (float32, max |diff| printed; the run stops above 1e-4).

The shapes follow the real models where it matters: head_dim 64, hidden size (192) unlike the
expert size (128), 4 layers alternating sliding (window 32) and full attention, 8 experts with
top-4 routing, YaRN RoPE with theta 150000 and factor 32 over an initial context of 256, and
the tiny o200k layout (the first 4096 o200k ranks, then the 21 Harmony specials).

Text: the KJV as Debian's ``bible`` prints it, verse numbers dropped; the last 5% of the tokens
is held out (also written as ``heldout.txt``). Trained in float32 with AdamW, saved in BF16 in
the exact ``original/`` layout; the experts then go through oss-convert's own BF16 -> MXFP4
encoder (``convert --to original --recipe ocp``). Prints the held-out perplexity of the BF16
model and of the MXFP4 release, and writes them to ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt_oss.torch import model as oai

from oss_convert import converters, synth
from oss_convert.dtypes import f32_to_bf16
from oss_convert.model import ModelConfig, expected_tensors
from oss_convert.shards import Planned, write_shards
from oss_convert.formats.original import dtypes_json

# hidden 192 and every other input width multiples of 64, as in the real models (2880 = 45 x 64),
# so that the MLX recipes quantize every linear layer (mlx-lm leaves other widths in BF16).
CONFIG = ModelConfig(num_hidden_layers=4, num_experts=8, experts_per_token=4, vocab_size=4117, hidden_size=192,
                     intermediate_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                     sliding_window=32, initial_context_length=256)
SEQ, BATCH, HELD_OUT = 256, 8, 0.05


def kjv_text() -> str:
    try:
        raw = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"cannot run Debian's `bible` ({exc}): apt-get install bible-kjv, or pass --text FILE")
    lines = []
    for line in raw.splitlines():
        line = re.sub(r"^\s+\d+\s", "", line).strip()  # verse numbers
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# The forward, batched: the same computation as oai.Transformer.forward on each sequence


def attention(block: oai.AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    H, KV, hd = block.num_attention_heads, block.num_key_value_heads, block.head_dim
    qkv = block.qkv(block.norm(x))
    q = qkv[..., : H * hd].reshape(B, T, KV, H // KV, hd)
    k = qkv[..., H * hd:(H + KV) * hd].reshape(B, T, KV, hd)
    v = qkv[..., (H + KV) * hd:].reshape(B, T, KV, hd)
    cos, sin = block.rope._compute_cos_sin(T)
    q = oai._apply_rotary_emb(q.reshape(B, T, H, hd), cos, sin).reshape(B, T, KV, H // KV, hd)
    k = oai._apply_rotary_emb(k, cos, sin)
    mask = torch.triu(x.new_full((T, T), -float("inf")), diagonal=1)
    if block.sliding_window > 0:
        mask = mask + torch.tril(x.new_full((T, T), -float("inf")), diagonal=-block.sliding_window)
    scores = torch.einsum("bqhmd,bkhd->bhmqk", q, k) * block.sm_scale + mask
    sinks = block.sinks.reshape(1, KV, H // KV, 1, 1).expand(B, -1, -1, T, 1).to(scores.dtype)
    weights = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bhmqk,bkhd->bqhmd", weights, v).reshape(B, T, H * hd)
    return x + block.out(out)


def moe(block: oai.MLPBlock, x: torch.Tensor) -> torch.Tensor:
    t = block.norm(x)
    top = torch.topk(block.gate(t), k=block.experts_per_token, dim=-1, sorted=True)
    weights = torch.softmax(top.values, dim=-1)  # [B, T, k]
    h = torch.einsum("bth,eoh->bteo", t, block.mlp1_weight) + block.mlp1_bias  # every expert
    h = oai.swiglu(h, limit=block.swiglu_limit)
    y = torch.einsum("bteo,eho->bteh", h, block.mlp2_weight) + block.mlp2_bias
    chosen = torch.gather(y, 2, top.indices[..., None].expand(-1, -1, -1, y.shape[-1]))  # [B, T, k, H]
    return x + torch.einsum("btkh,btk->bth", chosen, weights)


def forward(model: oai.Transformer, tokens: torch.Tensor) -> torch.Tensor:
    x = model.embedding(tokens)
    for block in model.block:
        x = moe(block.mlp, attention(block.attn, x))
    return model.unembedding(model.norm(x))


# --------------------------------------------------------------------------------------


def new_model(seed: int) -> oai.Transformer:
    torch.manual_seed(seed)
    cfg = oai.ModelConfig(**json.loads(CONFIG.to_json()))
    model = oai.Transformer(cfg, device=torch.device("cpu")).float()
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
            elif name.endswith(("sinks", "bias")):
                p.zero_()
            elif name.endswith("out.weight") or name.endswith("mlp2_weight"):
                p.normal_(0, 0.02 / math.sqrt(2 * CONFIG.num_hidden_layers))
            else:
                p.normal_(0, 0.02)
    return model


def perplexity(model: oai.Transformer, ids: np.ndarray, seq: int = SEQ) -> float:
    """exp(mean NLL) over the held-out tokens, in windows of ``seq``, every token scored once."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq):
            window = torch.as_tensor(ids[start:start + seq + 1])
            if len(window) < 2:
                break
            logits = forward(model, window[None, :-1])[0]
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    return math.exp(total / count)


def train(model, ids: np.ndarray, minutes: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    steps_guess, warmup = 10_000, 100
    deadline, step, t0, losses = time.time() + 60 * minutes, 0, time.time(), []
    while time.time() < deadline:
        starts = rng.integers(0, len(ids) - SEQ - 1, size=BATCH)
        batch = torch.as_tensor(np.stack([ids[s:s + SEQ + 1] for s in starts]))
        logits = forward(model, batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        elapsed = (time.time() - t0) / (60 * minutes)  # the schedule follows the time budget
        lr = 3e-3 * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0)))
        for group in opt.param_groups:
            group["lr"] = max(lr, 3e-5)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}: loss {np.mean(losses[-50:]):.3f}, {step * BATCH * SEQ / (time.time() - t0):.0f} tokens/s",
                  flush=True)
    del steps_guess
    return {"steps": step, "tokens_seen": step * BATCH * SEQ, "final_loss": float(np.mean(losses[-50:]))}


def write_bf16_release(model: oai.Transformer, root: Path) -> None:
    """``root/original/`` in BF16 (dense experts) with the tokenizer files beside it."""
    params = {name: p.detach().float().numpy() for name, p in model.named_parameters()}
    planned = []
    for spec in expected_tensors(CONFIG, "bf16"):
        array = params[spec.name]
        bits = array.astype(np.float32) if spec.dtype == "F32" else f32_to_bf16(np.ascontiguousarray(array, np.float32))
        planned.append(Planned(spec, lambda bits=bits: iter([bits])))
    original = root / "original"
    original.mkdir(parents=True)
    (original / "config.json").write_text(CONFIG.to_json())
    (original / "dtypes.json").write_text(dtypes_json(CONFIG))
    write_shards(original, [planned], ["model.safetensors"], {"format": "pt"})
    synth.write_root_files(root, CONFIG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, default=None, help="train on this text instead of the KJV")
    args = parser.parse_args()
    torch.set_num_threads(2)
    text = args.text.read_text(encoding="utf-8") if args.text else kjv_text()

    work = Path(tempfile.mkdtemp(prefix="train-tiny-"))
    synth.write_root_files(work, CONFIG)
    from tokenizers import Tokenizer

    ids = np.array(Tokenizer.from_file(str(work / "tokenizer.json")).encode(text, add_special_tokens=False).ids,
                   dtype=np.int64)
    cut = int(len(ids) * (1 - HELD_OUT))
    cut_text = Tokenizer.from_file(str(work / "tokenizer.json")).decode(ids[cut:].tolist())
    train_ids, held_ids = ids[:cut], ids[cut:]
    print(f"{len(text):,} characters, {len(ids):,} tokens: {len(train_ids):,} to train on, {len(held_ids):,} held out")

    model = new_model(args.seed)
    sample = torch.as_tensor(train_ids[:300])
    with torch.no_grad():
        diff = (forward(model, sample[None])[0] - model(sample)).abs().max().item()
    print(f"batched forward vs gpt_oss.torch.model.Transformer.forward: max |diff| {diff:.2e}")
    if diff > 1e-4:
        sys.exit("the training forward is not OpenAI's model")
    print(f"held-out perplexity before training: {perplexity(model, held_ids):.1f}")
    stats = train(model, train_ids, args.minutes, args.seed)
    bf16_ppl = perplexity(model, held_ids)
    print(f"held-out perplexity after training (float32): {bf16_ppl:.2f}")

    staging = work / "bf16"
    write_bf16_release(model, staging)
    if args.out.exists():
        shutil.rmtree(args.out)
    converters.convert(staging, "original", args.out, recipe="ocp", manifest=False)
    (args.out / "heldout.txt").write_text(cut_text, encoding="utf-8")
    from oss_convert import formats

    released = formats.open_canonical(args.out)
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.as_tensor(released.f32(name)))
    finally:
        released.close()
    mxfp4_ppl = perplexity(model, held_ids)
    print(f"held-out perplexity of the release (BF16, MXFP4 experts): {mxfp4_ppl:.2f}")
    record = {"config": json.loads(CONFIG.to_json()), "seed": args.seed, "minutes": args.minutes, **stats,
              "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
              "heldout_ppl_float32": round(bf16_ppl, 3), "heldout_ppl_release": round(mxfp4_ppl, 3),
              "text": "King James Bible (Debian bible-kjv-text), verse numbers dropped; last 5% held out",
              "torch": torch.__version__}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
