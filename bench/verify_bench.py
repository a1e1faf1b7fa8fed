"""How close `reference` and `verify` run to the machine's float32 BLAS bound, and decode speed.

    python bench/verify_bench.py --preset 20b --work /path/with/space [--layers 24] [--ctx 512] [--chunks N]

Measures, in one run on one machine:
- the float32 BLAS rate on expert-sized matrices (numpy matmul, [tokens per expert, H] x [H, 2I]);
- the model's FLOPs per token (2 x active parameters: attention projections, router, the top-k
  experts, unembedding; attention scores at the mean position of a chunk added) and so the
  bound: BLAS rate / FLOPs per token;
- tokens/s of `oss-convert reference` (BF16 reference) and of `oss-convert verify` on an MXFP4
  artifact (our `--to mlx`, against the cached reference), whole processes under
  `/usr/bin/time -v`, each as a fraction of the bound, with peak RSS;
- `formats/mxfp4.decode` in values/s on one 20b-sized expert matrix;
- `convert --to hf-bf16` (every expert decoded) against `cp -r` of the same checkpoint.
With `--layers` the checkpoint has the preset's per-layer shapes but fewer layers (for small
disks; say so when quoting). Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from oss_convert import synth
from oss_convert.formats import mxfp4


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a whole command, from GNU time."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode not in (0, 1):  # verify exits 1 on a failed gate; the timing still counts
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return wall, rss_kb / 1024


def blas_rate(config, tokens_per_expert: int) -> float:
    """Best GFLOP/s of ``[n, H] @ [H, 2I]`` in float32 (what one expert of the MoE costs) over
    ten runs after a warm-up: the machine's rate, so the bound is not flattered by noise."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens_per_expert, config.hidden_size), dtype=np.float32)
    w = rng.standard_normal((2 * config.intermediate_size, config.hidden_size), dtype=np.float32)
    x @ w.T
    times = []
    for _ in range(10):
        t = time.perf_counter()
        x @ w.T
        times.append(time.perf_counter() - t)
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] / min(times) / 1e9


def flops_per_token(config, ctx: int) -> float:
    c = config
    H, I, hd = c.hidden_size, c.intermediate_size, c.head_dim
    attention = H * c.qkv_dim + (c.num_attention_heads * hd) * H
    moe = H * c.num_experts + c.experts_per_token * (H * 2 * I + I * H)
    mean_keys = [min(ctx / 2, c.sliding_window) if layer % 2 == 0 else ctx / 2 for layer in range(c.num_hidden_layers)]
    scores = sum(2 * c.num_attention_heads * hd * k for k in mean_keys)  # QK^T and PV
    return 2 * (c.num_hidden_layers * (attention + moe) + H * c.vocab_size) + 2 * scores


def decode_rates(config) -> dict[str, float]:
    """Values/s of ``mxfp4.decode`` on one expert matrix, into a fresh array and into a reused one
    (as the runner decodes expert after expert), beside ``np.full`` of the same fresh float32
    array: what merely allocating and writing that much memory costs on this machine."""
    rng = np.random.default_rng(1)
    rows, groups = 2 * config.intermediate_size, config.hidden_size // 32
    blocks = rng.integers(0, 256, (rows, groups, 16), dtype=np.uint8)
    scales = rng.integers(110, 130, (rows, groups), dtype=np.uint8)
    out = np.empty((rows, groups * 32), np.float32)
    jobs = {"decode, fresh array": lambda: mxfp4.decode(blocks, scales),
            "decode, out= reused array": lambda: mxfp4.decode(blocks, scales, out=out),
            "np.full, fresh array (memory bound)": lambda: np.full((rows, groups * 32), 1.0, np.float32)}
    rates = {}
    for name, job in jobs.items():
        job()
        times = []
        for _ in range(9):
            t = time.perf_counter()
            job()
            times.append(time.perf_counter() - t)
        rates[name] = blocks.size * 2 / float(np.median(times))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b", choices=sorted(synth.PRESETS))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: the whole bundled text)")
    parser.add_argument("--tokens", type=Path, default=None, help="token ids instead of the bundled text (for long --ctx)")
    parser.add_argument("--skip-bf16", action="store_true", help="do not time --to hf-bf16 against cp")
    args = parser.parse_args()
    exe = shutil.which("oss-convert") or sys.exit("oss-convert is not installed")
    config = synth.preset_with(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {}))
    name = f"{args.preset}" + (f"-{args.layers}l" if args.layers else "")
    work = args.work
    repo, art, ref = work / name, work / f"{name}-mlx", work / f"{name}-ref-{args.ctx}.npz"
    if not (repo / "original" / "config.json").is_file():
        print(f"generating {repo} ...", file=sys.stderr)
        synth.generate(repo, config, seed=0, tokenizer=True)
    if not (art / "config.json").is_file():
        subprocess.run([exe, "convert", str(repo), "--to", "mlx", "-o", str(art), "--quiet", "--no-scan"], check=True)
    inputs = ["--ctx", str(args.ctx)] + (["--chunks", str(args.chunks)] if args.chunks else []) \
        + (["--tokens", str(args.tokens)] if args.tokens else [])
    rows = []

    wall, rss = timed([exe, "reference", str(repo), "-o", str(ref), "--force", "--quiet", *inputs])
    with np.load(ref) as cache:
        tokens = int(cache["tokens"].size)
    rows.append(("reference (BF16, experts decoded)", wall, tokens, rss))
    report = work / f"{name}-verify.json"
    wall, rss = timed([exe, "verify", str(art), "--reference", str(ref), "--json", str(report), "--force", "--quiet",
                       *inputs])
    verdict = json.loads(report.read_text())
    rows.append((f"verify MXFP4 artifact ({verdict['verdict']}, KL {verdict['metrics']['kld_mean']:.1e})", wall, tokens, rss))

    rate = blas_rate(config, max(1, tokens * config.experts_per_token // config.num_experts))
    flops = flops_per_token(config, args.ctx)
    bound = rate * 1e9 / flops
    print(f"\n{args.preset} shapes, {config.num_hidden_layers} layers, ctx {args.ctx}, {tokens} tokens; "
          f"BLAS {rate:.0f} GFLOP/s (float32, expert-sized); {flops / 1e9:.2f} GFLOP/token; "
          f"bound {bound:.1f} tokens/s\n")
    print("| job | wall s | tokens/s | of the BLAS bound | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for job, wall, n, rss in rows:
        print(f"| {job} | {wall:.1f} | {n / wall:.2f} | {n / wall / bound:.0%} | {rss:.0f} |")
    rates = decode_rates(config)
    print(f"\nmxfp4.decode on one [{2 * config.intermediate_size}, {config.hidden_size}] expert matrix:\n")
    print("| job | G values/s | of np.full |")
    print("|---|---:|---:|")
    full = rates["np.full, fresh array (memory bound)"]
    for name, r in rates.items():
        print(f"| {name} | {r / 1e9:.2f} | {r / full:.0%} |")
    if not args.skip_bf16:
        out, copy = work / f"{name}-bf16", work / f"{name}-copy"
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True)
        cp_wall, _ = timed(["cp", "-r", str(repo), str(copy)])
        bf16_wall, bf16_rss = timed([exe, "convert", str(repo), "--to", "hf-bf16", "-o", str(out), "--quiet",
                                     "--no-scan", "--no-manifest"])
        print(f"convert --to hf-bf16: {bf16_wall:.1f} s = {bf16_wall / cp_wall:.2f}x cp -r of the same checkpoint "
              f"({cp_wall:.1f} s; the output is 4x larger), peak RSS {bf16_rss:.0f} MiB")
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
