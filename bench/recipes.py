"""Size and accuracy of every conversion recipe on the bundled example, one verify per recipe.

    python bench/recipes.py [--work DIR] [--seed 5] [--hidden 192] [--ctx 512] [--chunks N] [--no-metal]

Makes the quickstart's tiny model (with ``--hidden 192`` by default, so every non-expert linear
layer has an input width that is a multiple of 64 and the MLX recipes quantize all of them),
the same model with dense BF16 experts (a fine-tune before quantization, for ``--to original
--recipe ocp|search``) and the Metal preset model (Metal needs the full vocabulary). Each model
gets one reference cache (``oss-convert reference``); every artifact is verified against it
with ``oss-convert verify --json -`` and the recipe's bounds from tests/test_recipes_verify.py.
Prints a markdown table; paste it into bench/RESULTS-recipes.md with the machine and command.

Bits per weight count every non-expert tensor (embeddings, attention, router, norms, biases,
sinks) at its storage type's cost: BF16/F16 16, F32 32, Q8_0 and affine-8bit 8.5 (a 16-bit
scale per 32 values; a BF16 scale and bias per 64), affine-4bit 4.5. Random weights exaggerate
quantization error: see RESULTS-recipes.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oss_convert import formats, synth
from oss_convert.model import expected_tensors, logical_names

ROOT = Path(__file__).resolve().parent.parent
EXPERT_TENSORS = ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias")
BITS = {"BF16": 16, "F16": 16, "F32": 32, "Q8_0": 8.5, "affine-8bit": 8.5, "affine-4bit": 4.5, "MXFP4": 4.25}

# (name in the bounds table, model, --to, options)
RECIPES = [
    ("mlx", "mxfp4", "mlx", []),
    ("mlx-mxfp4-q8", "mxfp4", "mlx", ["--recipe", "mxfp4-q8"]),
    ("mlx-mxfp4-q4", "mxfp4", "mlx", ["--recipe", "mxfp4-q4"]),
    ("gguf-bf16", "mxfp4", "gguf", ["--outtype", "bf16"]),
    ("gguf-f16", "mxfp4", "gguf", ["--outtype", "f16"]),
    ("gguf-q8_0", "mxfp4", "gguf", ["--outtype", "q8_0"]),
    ("original-ocp", "dense", "original", ["--recipe", "ocp"]),
    ("original-search", "dense", "original", ["--recipe", "search"]),
    ("metal", "metal", "metal", []),
]


def oss_convert(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("oss-convert")
    cmd = [exe] if exe else [sys.executable, "-m", "oss_convert.cli.main"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True)


def run_ok(*args: str) -> str:
    out = oss_convert(*args)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): oss-convert {' '.join(args)}\n{out.stderr[-3000:]}")
    return out.stdout


def recipe_bounds() -> dict[str, tuple[float, float]]:
    """The per-recipe bounds the tests hold verify to (one source of truth)."""
    spec = importlib.util.spec_from_file_location("test_recipes_verify", ROOT / "tests" / "test_recipes_verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BOUNDS


def disk_bytes(path: Path) -> int:
    """Every file the converter wrote (tokenizer files and provenance manifest included)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def non_expert_bits(artifact: Path) -> float:
    """Mean storage bits per value over the non-expert tensors, from the reader's storage types."""
    model = formats.open_canonical(artifact)
    try:
        shapes = {s.name: s.shape for s in expected_tensors(model.config, "bf16")}
        bits = values = 0
        for name in logical_names(model.config):
            if name.endswith(EXPERT_TENSORS):
                continue
            count = 1
            for n in shapes[name]:
                count *= n
            bits += BITS[model.storage(name)] * count
            values += count
        return bits / values
    finally:
        model.close()


def make_models(work: Path, seed: int, hidden: int, metal: bool) -> dict[str, Path]:
    config = synth.preset_with("tiny", hidden_size=hidden)
    models = {"mxfp4": synth.generate(work / "gpt-oss-tiny", config, seed=seed, tokenizer=True),
              "dense": synth.generate(work / "gpt-oss-tiny-bf16", config, seed=seed, tokenizer=True, experts="bf16")}
    if metal:
        models["metal"] = synth.generate(work / "gpt-oss-metal", "metal", seed=seed, tokenizer=True)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="Folder for models and artifacts (default: a temp dir).")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=192, help="Hidden size of the tiny model (tiny preset: 160).")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=None, help="At most this many chunks of the bundled text.")
    parser.add_argument("--no-metal", action="store_true", help="Skip the Metal preset model (full vocabulary, slower).")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="oss-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    bounds = recipe_bounds()
    window = ["--ctx", str(args.ctx), "--quiet"] + (["--chunks", str(args.chunks)] if args.chunks else [])
    models = make_models(work, args.seed, args.hidden, not args.no_metal)
    caches = {}
    for kind, repo in models.items():
        caches[kind] = work / f"reference-{kind}.npz"
        print(run_ok("reference", str(repo), "-o", str(caches[kind]), "--force", *window).strip(), file=sys.stderr)

    rows, scored = [], {}
    for name, kind, target, options in RECIPES:
        if kind not in models:
            continue
        suffix = ".gguf" if target == "gguf" else ".bin" if target == "metal" else ""
        out = Path(run_ok("convert", str(models[kind]), "--to", target, "-o", str(work / (name + suffix)),
                          "--force", "--quiet", *options).strip().splitlines()[-1])
        max_kld, min_top1 = bounds[name]
        t0 = time.perf_counter()
        result = oss_convert("verify", str(out), "--reference", str(caches[kind]), "--json", "-",
                             "--max-kld", repr(max_kld), "--min-top1", repr(min_top1), *window)
        if result.returncode not in (0, 1):
            sys.exit(f"verify {out} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        report = json.loads(result.stdout)
        (work / f"{name}.verify.json").write_text(result.stdout)  # the full report, for a closer look
        m = report["metrics"]
        scored[kind] = report["input"]["tokens_scored"]
        rows.append((name, f"--to {target} {' '.join(options)}".strip(), disk_bytes(out), non_expert_bits(out),
                     m["kld_mean"], m["kld_p99"], m["top1_agreement"], m["ppl_ratio"],
                     f"{report['verdict']} (KL <= {max_kld:g}, top-1 >= {min_top1:g})"))
        print(f"{name}: {report['verdict']} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    print(f"| recipe | command | output size | non-expert bits/weight | mean KL | p99 KL | top-1 | PPL ratio | verdict |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, command, size, bpw, kld, p99, top1, ratio, verdict in rows:
        print(f"| {name} | `{command}` | {size / 2**20:.2f} MiB | {bpw:.2f} | {kld:.3g} | {p99:.3g} | {top1:.2%} "
              f"| {ratio:.4f} | {verdict} |")
    print(f"\nModels: tiny (hidden {args.hidden}, seed {args.seed}, MXFP4 experts; `original-*` rows start from the "
          f"same shapes with dense BF16 experts){'' if args.no_metal else ', metal preset for `metal`'}. Verify: bundled text, ctx {args.ctx}, "
          f"tokens scored: {scored}; one reference cache per model.")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
          f"Python {platform.python_version()}")


if __name__ == "__main__":
    main()
