"""The runner on an MLX GPU (Apple, or CUDA through ``mlx[cuda]``): full float32 and its speed.

    python bench/gpu_verify.py --work DIR [--layers 2] [--chunks 4]

Prints, for the tiny model: the GPU path's logits against the CPU path's (numpy + BLAS), and the
mean KL of a lossless MLX artifact verified on the GPU, with MLX_ENABLE_TF32 as oss-convert sets
it (0) and forced to 1 (each in its own process: MLX reads it when it starts). Then tokens/s of
`reference` on 20b-shaped layers on the GPU and on the CPU (CPU-side decode included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROBE = r"""
import json, sys, numpy as np, mlx.core as mx
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.verify.runner import Runner
tokens = np.random.default_rng(7).integers(0, 1000, size=300)
with OriginalCheckpoint(sys.argv[1]) as ckpt:
    gpu = Runner(ckpt, device="gpu").logits(tokens)
    cpu = Runner(ckpt, device="cpu").logits(tokens)
print(json.dumps({"device": str(mx.default_device()), "rel": float(np.abs(gpu - cpu).max() / np.abs(cpu).max())}))
"""


def run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode not in (0, 1):
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--only-speed", action="store_true", help="skip the tiny-model checks")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "oss_convert.cli.main"]
    tiny, tiny_mlx = args.work / "tiny", args.work / "tiny-mlx"
    if args.only_speed:
        return speed(cli, args)
    run(*cli, "synth", str(tiny), "--preset", "tiny", "--seed", "1", "--force", "-q")
    run(*cli, "convert", str(tiny), "--to", "mlx", "-o", str(tiny_mlx), "--force", "-q")
    probe = json.loads(run(sys.executable, "-c", PROBE, str(tiny)).stdout)
    print(f"MLX default device: {probe['device']}")
    print(f"tiny, 300 tokens: GPU path vs CPU path, max |diff| / max |logit| = {probe['rel']:.2e}")
    for tf32 in ("0", "1"):
        env = {**os.environ, "MLX_ENABLE_TF32": tf32}
        out = run(*cli, "verify", str(tiny_mlx), "--reference", str(tiny), "--json", "-", "-q", env=env)
        m = json.loads(out.stdout)["metrics"]
        print(f"lossless MLX artifact verified on the GPU, MLX_ENABLE_TF32={tf32}: mean KL {m['kld_mean']:.2e}, "
              f"max KL {m['kld_max']:.2e}, top-1 {m['top1_agreement']:.2%}")
    speed(cli, args)


def speed(cli: list[str], args) -> None:
    big, ids = args.work / f"20b-{args.layers}l", args.work / "ids.npy"
    run(*cli, "synth", str(big), "--preset", "20b", "--layers", str(args.layers), "--force", "-q", "--no-tokenizer")
    # token ids: the full-vocabulary tokenizer needs bpe-openai, which may not be there
    np.save(ids, np.random.default_rng(5).integers(0, 199998, size=args.chunks * 512))
    print(f"\n| reference on 20b shapes, {args.layers} layers, {args.chunks} x 512 tokens | wall s | tokens/s |")
    print("|---|---:|---:|")
    for device in ("gpu", "cpu"):
        # the CLI on MLX's default device, or with MLX's default set to the CPU first
        prefix = "import mlx.core as mx; mx.set_default_device(mx.cpu); " if device == "cpu" else ""
        entry = [sys.executable, "-c", prefix + "import sys; from oss_convert.cli.main import main; sys.argv[0] = 'x'; main()"]
        start = time.perf_counter()
        run(*entry, "reference", str(big), "-o", str(args.work / f"ref-{device}.npz"), "--force", "-q",
            "--chunks", str(args.chunks), "--tokens", str(ids))
        wall = time.perf_counter() - start
        print(f"| {device} | {wall:.1f} | {args.chunks * 512 / wall:.1f} |")


if __name__ == "__main__":
    main()
