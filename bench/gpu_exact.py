"""Is the runner exact on this device? Lossless artifacts of 20b-shaped layers verified against
their own original/ checkpoint on MLX's default device (a GPU where mlx[cuda] or Metal is there).

    python bench/gpu_exact.py --work DIR [--layers 4] [--chunks 4] [--cpu]

The checkpoint has 20b's per-layer shapes (hidden 2880, 32 experts, 64 heads) with the vocabulary
cut to 1024 (the bundled o200k head: nothing to download). Prints, per artifact (MLX, GGUF, the
mxfp4-q8 recipe): mean KL, max KL and top-1 against the reference with its experts passed as
MXFP4 bytes (what `reference` does) and, beside it, decoded on the host (`experts="dequantized"`).
Session 6 measured here the two kernels then used (`gather_qmm` and dequantize-then-matmul,
1.6e-11 apart on identical weights); since session 7 both decode exactly and multiply in
float32, so the two columns must agree to the bit. With `--cpu`, the mxfp4-q8 row is also
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
    parser.add_argument("--trained", type=Path, default=None,
                        help="Only this trained checkpoint (e.g. examples/gpt-oss-tiny): the mxfp4-q8 recipe's KL on "
                             "this device and on the CPU, on its heldout.txt")
    args = parser.parse_args()
    if args.trained is not None:
        return trained(args.trained, args.work)

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


def trained(repo: Path, work: Path) -> None:
    """The 8-bit recipe on a trained model: mean KL on this device against the CPU's."""
    import mlx.core as mx

    from oss_convert import converters
    from oss_convert.verify.check import Inputs, make_reference, verify

    inputs = Inputs(text_file=repo / "heldout.txt", ctx=512, max_chunks=16)
    artifacts = {"mlx": converters.convert(repo, "mlx", work / "t-mlx", force=True).output,
                 "mlx mxfp4-q8": converters.convert(repo, "mlx", work / "t-q8", force=True, recipe="mxfp4-q8").output}
    print("| artifact | device | KL mean | KL max | top-1 |")
    print("|---|---|---:|---:|---:|")
    means = {}
    first = mx.default_device()
    for device in (first, mx.cpu):
        mx.set_default_device(device)
        cache = make_reference(repo, inputs).save(work / f"t-ref-{device}.npz".replace("(", "").replace(")", "")
                                                  .replace(" ", "").replace(",", ""), force=True)
        for name, artifact in artifacts.items():
            m = verify(artifact, cache, inputs, check_tensors=False)["metrics"]
            means[(name, str(device))] = m["kld_mean"]
            print(f"| {name} | {device} | {m['kld_mean']:.4e} | {m['kld_max']:.3e} | {m['top1_agreement']:.4%} |",
                  flush=True)
    gpu, cpu = means[("mlx mxfp4-q8", str(list(means)[0][1]))], means[("mlx mxfp4-q8", str(mx.cpu))]
    print(f"mxfp4-q8 mean KL, this device / CPU: {gpu / cpu:.4f}")
    # where they part: each model's logits on this device against the CPU's, on the same tokens
    import numpy as np

    from oss_convert import formats
    from oss_convert.verify.runner import Runner

    with formats.open_canonical(repo) as probe_model:
        tokens = np.random.default_rng(7).integers(0, probe_model.config.vocab_size, size=512)
    for name, path in (("reference", repo), *artifacts.items()):
        with formats.open_canonical(path) as model:
            mx.set_default_device(first)  # MLX's ops run on the default device
            here = Runner(model, device="gpu").logits(tokens)
            mx.set_default_device(mx.cpu)
            there = Runner(model, device="cpu").logits(tokens)
        print(f"{name}: logits here vs CPU, max |diff| / max |logit| = "
              f"{float(np.abs(here - there).max() / np.abs(there).max()):.2e}", flush=True)
    # MLX's own dequantize of one affine 8-bit module on this device and on the CPU
    with formats.open_canonical(artifacts["mlx mxfp4-q8"]) as model:
        module, q = next((m, q) for m, q in model.quant.items() if q is not None and q.mode == "affine")
        parts = [mx.array(np.ascontiguousarray(model._array(f"{module}.{p}"))) for p in ("weight", "scales", "biases")]
        parts[1:] = [a.view(mx.bfloat16) if model.entries[f"{module}.{p}"].dtype == "BF16" else a
                     for a, p in zip(parts[1:], ("scales", "biases"))]
        kw = dict(group_size=q.group_size, bits=q.bits, mode="affine", dtype=mx.float32)
        on = {str(d): np.array(mx.dequantize(*parts, **kw, stream=d)) for d in (first, mx.cpu)}
        a, b = on.values()
        print(f"mx.dequantize of {module} ({q.bits}-bit, group {q.group_size}): {first} vs CPU max |diff| "
              f"{float(np.abs(a - b).max()):.3e} (max |w| {float(np.abs(b).max()):.3e})")


if __name__ == "__main__":
    main()
