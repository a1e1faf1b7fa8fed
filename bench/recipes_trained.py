"""The recipe table on the trained tiny model, our recipes beside the peers' on the same weights.

    python bench/recipes_trained.py [--work DIR] [--chunks 40] [--plot sizes.png]

Every artifact is made from examples/gpt-oss-tiny and scored by `oss-convert compare` against
one BF16 reference on the held-out text (512-token chunks, second half scored):

- ours: `--to mlx` (lossless, `--recipe mxfp4-q8`, `--recipe mxfp4-q4`), `--to gguf` (bf16, q8_0),
  and the fine-tune path (`--to hf-bf16`, then `--to original --recipe ocp|search`);
- llama.cpp: `llama_model_quantize` (through llama-cpp-python) of our BF16 GGUF (its experts
  MXFP4, as in every GGUF we write) to MXFP4_MOE, and with `allow_requantize` to Q8_0 and Q4_K_M
  (the experts requantized from MXFP4);
- mlx-lm: `mlx_lm.convert -q` (8 and 4 bits) of our `--to hf` folder.

Prints the compare table (markdown) with the tool that made each row; paste it into the
README's recipe section and bench/RESULTS-recipes.md.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import shutil
import sys
from pathlib import Path

from oss_convert import converters
from oss_convert.verify.check import Inputs, make_reference
from oss_convert.verify.compare import compare, plot_sizes

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "gpt-oss-tiny"


def llama_quantize(src: Path, out: Path, ftype_name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    # Our GGUF keeps the experts MXFP4; llama.cpp refuses to requantize them to another type
    # unless asked (and then leaves a zero-filled file behind on failure).
    params.allow_requantize = ftype_name != "MXFP4_MOE"
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize {ftype_name} failed ({code})")
    return out


def mlx_lm_quantize(hf: Path, out: Path, bits: int) -> Path:
    from mlx_lm.convert import convert

    convert(str(hf), mlx_path=str(out), quantize=True, q_bits=bits)
    return out


def build(work: Path) -> list[tuple[str, str, Path]]:
    """(tool, how it was made, artifact) for every row."""
    c = converters.convert
    rows = [("oss-convert", "--to mlx", c(MODEL, "mlx", work / "mlx").output),
            ("oss-convert", "--to mlx --recipe mxfp4-q8", c(MODEL, "mlx", work / "mlx-q8", recipe="mxfp4-q8").output),
            ("oss-convert", "--to mlx --recipe mxfp4-q4", c(MODEL, "mlx", work / "mlx-q4", recipe="mxfp4-q4").output)]
    bf16 = c(MODEL, "gguf", work / "bf16.gguf", outtype="bf16").output
    rows += [("oss-convert", "--to gguf --outtype bf16", bf16),
             ("oss-convert", "--to gguf --outtype q8_0", c(MODEL, "gguf", work / "q8_0.gguf", outtype="q8_0").output)]
    dense = c(MODEL, "hf-bf16", work / "dense").output
    for recipe in ("ocp", "search"):
        rows.append(("oss-convert", f"--to hf-bf16, then --to original --recipe {recipe}",
                     c(dense, "original", work / f"finetune-{recipe}", recipe=recipe).output))
    for ftype in ("MXFP4_MOE", "Q8_0", "Q4_K_M"):
        rows.append(("llama.cpp", f"llama_model_quantize {ftype} of the BF16 GGUF",
                     llama_quantize(bf16, work / f"llama-{ftype.lower()}.gguf", ftype)))
    hf = c(MODEL, "hf", work / "hf").output
    for bits in (8, 4):
        rows.append(("mlx-lm", f"mlx_lm.convert -q --q-bits {bits} of --to hf",
                     mlx_lm_quantize(hf, work / f"mlx-lm-q{bits}", bits)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench-recipes-trained"))
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rows = build(args.work)
    inputs = Inputs(text_file=MODEL / "heldout.txt", ctx=512, max_chunks=args.chunks)
    ref = args.work / "reference.npz"
    make_reference(MODEL, inputs).save(ref)
    result = compare(ref, [str(p) for _, _, p in rows], inputs)
    made = {str(p): (tool, how) for tool, how, p in rows}
    print(f"trained tiny gpt-oss ({result['parameters']:,} parameters), held-out text, {result['input']['chunks']} x 512 "
          f"tokens; {platform.machine()}, Python {sys.version.split()[0]}\n")
    print("| artifact | tool | made by | size | bits/weight | ppl ratio | mean KL | KL p99 | top-1 | verdict |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        tool, how = made[r["artifact"]]
        print(f"| {Path(r['artifact']).name} | {tool} | {how} | {r['size_bytes'] / 1e6:.2f} MB | {r['bits_per_weight']:.2f} "
              f"| {r['ppl_ratio']:.4f} | {r['kld_mean']:.2e} | {r['kld_p99']:.2e} | {r['top1_agreement']:.1%} "
              f"| {r['verdict']} |")
    print(f"\nreference perplexity {result['rows'][0]['ppl_ref']:.2f}")
    if args.plot is not None:
        plot_sizes(result, args.plot)


if __name__ == "__main__":
    main()
