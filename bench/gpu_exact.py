"""Is the runner exact on this device? Lossless artifacts of a 20b-shaped checkpoint verified
against it on MLX's default device (a GPU where mlx[cuda] or Metal is there), the 8-bit recipe's
KL beside the CPU's, and a planted defect on both.

    python bench/gpu_exact.py --work DIR [--layers 4] [--chunks 4] [--cpu-chunks 2]

The checkpoint has 20b's shapes (hidden 2880, 32 experts, 64 heads, the full 201088-token
vocabulary, so the Metal converter takes it: the o200k text tokens come from bpe-openai) with
``--layers`` layers. Prints, per artifact (MLX, GGUF, Metal, the mxfp4-q8 recipe, the MLX
artifact with one expert's bytes swapped): the verdict, mean and max KL, top-1, against the
reference made on this device, and the same for the recipe and the defect against a reference
made on the CPU (numpy, on ``--cpu-chunks`` of the chunks), with the GPU/CPU ratio of the
recipe's mean KL on those chunks.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--preset", default="20b", help="synth preset of the shapes (metal: a small full-vocabulary model)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--cpu-chunks", type=int, default=2)
    parser.add_argument("--trained", type=Path, default=None,
                        help="Only this trained checkpoint (e.g. examples/gpt-oss-tiny): the mxfp4-q8 recipe's KL on "
                             "this device and on the CPU, on its heldout.txt")
    args = parser.parse_args()
    if args.trained is not None:
        return trained(args.trained, args.work)

    import mlx.core as mx

    from oss_convert import converters, synth
    from oss_convert.formats.original import OriginalCheckpoint
    from oss_convert.verify.check import Inputs, make_reference, verify

    work = args.work
    start = time.perf_counter()
    config = synth.preset_with(args.preset, num_hidden_layers=args.layers)
    repo = synth.generate(work / "repo", config, seed=1, tokenizer=True, force=True)
    artifacts = {"mlx": converters.convert(repo, "mlx", work / "mlx", force=True).output,
                 "gguf": converters.convert(repo, "gguf", work / "m.gguf", force=True).output,
                 "metal": converters.convert(repo, "metal", work / "model.bin", force=True).output,
                 "mlx mxfp4-q8": converters.convert(repo, "mlx", work / "q8", force=True, recipe="mxfp4-q8").output}
    broken = work / "broken"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(artifacts["mlx"], broken)
    with OriginalCheckpoint(repo) as ckpt:
        original = np.ascontiguousarray(ckpt.mxfp4(1, "mlp2").blocks[3]).tobytes()
    planted = _swap_nibbles(broken, original)
    artifacts["mlx, layer 1 expert 3 mlp2 nibbles swapped"] = broken
    print(f"device {mx.default_device()}; {args.preset} shapes, {args.layers} layers, {args.chunks} x 512 tokens; "
          f"setup {time.perf_counter() - start:.0f} s; defect planted in {planted}")
    inputs = Inputs(ctx=512, max_chunks=args.chunks, device="gpu")
    t0 = time.perf_counter()
    cache = make_reference(repo, inputs).save(work / "ref.npz", force=True)
    print(f"reference on {mx.default_device()}: {time.perf_counter() - t0:.1f} s")
    print("| artifact | device | kernels (reference / artifact) | verdict | KL mean | KL max | top-1 | s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    means = {}

    def row(name, artifact, ref, on, device):
        t0 = time.perf_counter()
        report = verify(artifact, ref, Inputs(ctx=512, max_chunks=on, device=device), check_tensors=False)
        m, k = report["metrics"], report["kernels"]
        means[(name, device)] = m["kld_mean"]
        print(f"| {name} | {device} | {k['reference']} / {k['artifact']} | {report['verdict']} | {m['kld_mean']:.4e} | "
              f"{m['kld_max']:.3e} | {m['top1_agreement']:.4%} | {time.perf_counter() - t0:.1f} |", flush=True)

    for name, artifact in artifacts.items():
        row(name, artifact, cache, args.chunks, "gpu")
    if not args.cpu_chunks:
        return
    # the same chunks on the CPU: a reference of its own, the recipe and the defect against it
    cpu = Inputs(ctx=512, max_chunks=args.cpu_chunks, device="cpu")
    cpu_cache = make_reference(repo, cpu).save(work / "ref-cpu.npz", force=True)
    gpu_cache = make_reference(repo, Inputs(ctx=512, max_chunks=args.cpu_chunks, device="gpu")).save(
        work / "ref-gpu-few.npz", force=True)
    for name in ("mlx mxfp4-q8", "mlx, layer 1 expert 3 mlp2 nibbles swapped"):
        row(f"{name} ({args.cpu_chunks} chunks)", artifacts[name], gpu_cache, args.cpu_chunks, "gpu")
        row(f"{name} ({args.cpu_chunks} chunks)", artifacts[name], cpu_cache, args.cpu_chunks, "cpu")
    q8 = f"mlx mxfp4-q8 ({args.cpu_chunks} chunks)"
    print(f"mxfp4-q8 mean KL, GPU / CPU on the same {args.cpu_chunks} chunks: {means[(q8, 'gpu')] / means[(q8, 'cpu')]:.5f}")


def _swap_nibbles(folder: Path, original: bytes) -> str:
    """Find an expert's MXFP4 blocks verbatim in one of ``folder``'s files and swap each byte's
    two nibbles there (the values of that expert's weights, permuted in pairs)."""
    import mmap

    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
            at = mm.find(original)
            if at >= 0:
                b = np.frombuffer(original, np.uint8)
                mm[at:at + len(original)] = ((b >> 4) | (b << 4)).astype(np.uint8).tobytes()
                return file.name
    raise SystemExit("the expert's bytes are not in the MLX artifact verbatim")


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
