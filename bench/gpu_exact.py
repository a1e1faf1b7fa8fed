"""Is the runner exact on this device? Lossless artifacts of 20b-shaped layers verified against
their own original/ checkpoint on MLX's default device (a GPU where mlx[cuda] or Metal is there).

    python bench/gpu_exact.py --work DIR [--layers 4] [--chunks 4] [--cpu]

The checkpoint has 20b's per-layer shapes (hidden 2880, 32 experts, 64 heads) with the vocabulary
cut to 1024 (the bundled o200k head: nothing to download). Prints, per artifact (MLX, GGUF, the
mxfp4-q8 recipe): mean KL, max KL and top-1 against the reference computed with its experts
through the artifact's kernels (what `reference` and `verify` do now) and, beside it, against
the reference with its experts dequantized (what they did before), whose distance from the first
is the two kernels' noise floor on identical weights. With `--cpu`, the mxfp4-q8 row is also
computed on the CPU, for the GPU/CPU ratio of a lossy artifact's KL.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    import mlx.core as mx

    from oss_convert import converters, synth
    from oss_convert.verify.check import Inputs, make_reference, verify

    work = args.work
    start = time.perf_counter()
    config = synth.preset_with("20b", vocab_size=1024, num_hidden_layers=args.layers)
    repo = synth.generate(work / "repo", config, seed=1, tokenizer=True, force=True)
    artifacts = {"mlx": converters.convert(repo, "mlx", work / "mlx", force=True).output,
                 "gguf": converters.convert(repo, "gguf", work / "m.gguf", force=True).output,
                 "mlx mxfp4-q8": converters.convert(repo, "mlx", work / "q8", force=True, recipe="mxfp4-q8").output}
    inputs = Inputs(ctx=512, max_chunks=args.chunks)
    print(f"device {mx.default_device()}; 20b shapes, {args.layers} layers, {args.chunks} x 512 tokens; "
          f"setup {time.perf_counter() - start:.0f} s")
    caches = {}
    for experts in ("quantized", "dequantized"):
        t0 = time.perf_counter()
        caches[experts] = make_reference(repo, inputs, experts=experts).save(work / f"ref-{experts}.npz", force=True)
        print(f"reference, experts {experts}: {time.perf_counter() - t0:.1f} s")
    print("| artifact | reference experts | device | KL mean | KL max | top-1 | seconds |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, artifact in artifacts.items():
        for experts, cache in caches.items():
            t0 = time.perf_counter()
            m = verify(artifact, cache, inputs, check_tensors=False)["metrics"]
            print(f"| {name} | {experts} | {mx.default_device()} | {m['kld_mean']:.3e} | {m['kld_max']:.3e} | "
                  f"{m['top1_agreement']:.4%} | {time.perf_counter() - t0:.1f} |", flush=True)
    if args.cpu:
        mx.set_default_device(mx.cpu)
        cpu_cache = make_reference(repo, inputs).save(work / "ref-cpu.npz", force=True)
        for name in ("mlx", "mlx mxfp4-q8"):
            t0 = time.perf_counter()
            m = verify(artifacts[name], cpu_cache, inputs, check_tensors=False)["metrics"]
            print(f"| {name} | quantized | cpu | {m['kld_mean']:.3e} | {m['kld_max']:.3e} | "
                  f"{m['top1_agreement']:.4%} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
