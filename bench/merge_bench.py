"""Time a LoRA merge (``convert --adapter``) of a real-sized synthetic checkpoint against `cp -r`
of the same bytes and against the same conversion without the adapter.

    python bench/merge_bench.py --preset 20b --work /path/with/space [--touched-layers 16] [--layers N]

The adapter is a PEFT one as mlx-lm's default and most PEFT recipes make it: rank 16 on the
attention (q/k/v/o) and on both expert weights (every expert) of the last ``--touched-layers``
layers, written with random factors (a trained adapter's B is not zero), so every touched
expert is decoded, merged and re-encoded to MXFP4 (``--recipe search``) and the others copied.
Each job runs under ``/usr/bin/time -v`` (wall time, the largest process's peak RSS) while the
proportional set size of its whole process tree (worker processes included) is sampled, and
ends with ``sync``. Prints a markdown table with each time as a ratio to ``cp -r`` measured in
the same run, the experts re-encoded per second and both memory peaks; ``--threads-too`` adds
the merge with its re-encoding on threads only; ``--also CHECKOUT`` (repeatable) adds the same
merge run by another checkout of this package (e.g. ``git worktree add /tmp/old <commit>``), so
two versions are compared on one machine in one run. Paste it into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import time
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import ensure_space, size_of, timed  # noqa: E402

RANK = 16
# The same merge with its re-encoding on threads instead of worker processes (encode_workers).
THREADS_ONLY = ("import sys; from oss_convert import converters; "
                "converters.convert(sys.argv[1], sys.argv[2], sys.argv[3], adapter=sys.argv[4], force=True, "
                "merge_workers=False)")


def tree_pss_mib(root: int) -> float:
    """Proportional set size of ``root`` and all its descendants (shared pages counted once in
    all), from /proc: what the whole job holds, worker processes included."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            total += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
        except (OSError, AttributeError):
            continue  # ended meanwhile
    return total / 1024


def timed_tree(cmd: list[str], checkout: Path | None = None) -> tuple[float, float, float]:
    """(wall seconds including the final sync, peak RSS MiB of its largest process, peak PSS MiB
    of the whole process tree, sampled every 0.2 s); ``checkout``: run it with that checkout's
    package (first on the path, and the working directory, which ``python -m`` puts first)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])} \
        if checkout else None
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=checkout)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_pss_mib(proc.pid))
        time.sleep(0.2)
    _, err = proc.communicate()
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    return wall, rss_kb / 1024, peak


def write_adapter(config: dict, layers: list[int], out: Path, seed: int = 0) -> int:
    """A PEFT adapter (the layout ``formats/peft.py`` documents) for ``layers``; returns the
    number of expert matrices it touches."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    H, I, E, d = config["hidden_size"], config["intermediate_size"], config["num_experts"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    prefix = "base_model.model.model.layers"
    tensors = {}

    def pair(key: str, rows_a: int, cols_a: int, rows_b: int, cols_b: int) -> None:
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rows_a, cols_a)) / np.sqrt(cols_a)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((rows_b, cols_b)) * 1e-3).astype(np.float32)

    for n in layers:
        for module, (inner, outer) in {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H)}.items():
            pair(f"{prefix}.{n}.self_attn.{module}", RANK, inner, outer, RANK)
        pair(f"{prefix}.{n}.mlp.experts.base_layer", RANK * E, H, 2 * I, RANK * E)  # gate_up_proj
        pair(f"{prefix}.{n}.mlp.experts", RANK * E, I, H, RANK * E)  # down_proj
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "peft_version": "0.21.2", "r": RANK, "lora_alpha": 2 * RANK, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": [f"{n}.mlp.experts.{p}" for n in layers for p in ("gate_up_proj", "down_proj")]}))
    return 2 * E * len(layers)


def package_digest(checkout: Path | None = None) -> str:
    """A short sha256 of the ``oss_convert`` sources a job runs: names the code measured where
    the git metadata beside it may be stale (a copied tree)."""
    import hashlib

    root = (checkout or Path(__file__).resolve().parents[1]) / "oss_convert"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def checkout_revision(checkout: Path) -> str:
    """The commit of a checkout, or its folder's name where it is no git work tree of its own (a
    copied folder inside another repository would otherwise take that repository's commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != checkout.resolve():
        return checkout.name
    return git("log", "-1", "--format=%h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--touched-layers", type=int, default=16)
    parser.add_argument("--target", default="mlx")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threads-too", action="store_true",
                        help="also time the merge on threads only (no worker processes), for comparison")
    parser.add_argument("--also", type=Path, action="append", default=[], metavar="CHECKOUT",
                        help="also time the merge run by another checkout of this package (its root folder)")
    args = parser.parse_args()
    exe = shutil.which("oss-convert")
    cli = [exe] if exe else [sys.executable, "-m", "oss_convert.cli.main"]  # a checkout on PYTHONPATH
    repo = args.work / f"gpt-oss-{args.preset}{f'-L{args.layers}' if args.layers else ''}"
    if not (repo / "original" / "config.json").exists():
        layers = ["--layers", str(args.layers)] if args.layers else []
        wall, rss = timed([*cli, "synth", str(repo), "--preset", args.preset, *layers, "--quiet"])
        print(f"synth: {wall:.1f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    config = json.loads((repo / "original" / "config.json").read_text())
    total = config["num_hidden_layers"]
    touched = list(range(total - min(args.touched_layers, total), total))
    adapter = args.work / f"adapter-{repo.name}-{len(touched)}"
    shutil.rmtree(adapter, ignore_errors=True)
    experts = write_adapter(config, touched, adapter)
    source_bytes = size_of(repo / "original")
    copy = args.work / "cp-copy"
    for _ in range(2):  # the first cp warms the page cache for every job
        shutil.rmtree(copy, ignore_errors=True)
        ensure_space(args.work, source_bytes)
        cp_wall, cp_rss = timed(["cp", "-r", str(repo / "original"), str(copy)])
    shutil.rmtree(copy, ignore_errors=True)
    rows = [("cp -r original/", cp_wall, cp_rss, None, cp_rss)]
    suffix = ".gguf" if args.target == "gguf" else ""
    out = args.work / f"out-{args.target}{suffix}"
    on_threads = [sys.executable, "-c", THREADS_ONLY, str(repo), args.target, str(out), str(adapter)]
    merge = ["convert", str(repo), "--to", args.target, "-o", str(out), "--force", "--quiet", "--adapter", str(adapter)]
    jobs = [("convert", [*cli, "convert", str(repo), "--to", args.target, "-o", str(out), "--force", "--quiet"], None, None),
            ("convert --adapter", [*cli, *merge], experts, None)]
    if args.threads_too:
        jobs.append(("convert --adapter, threads only", on_threads, experts, None))
    for checkout in args.also:
        revision = checkout_revision(checkout)
        jobs.append((f"convert --adapter ({revision})", [sys.executable, "-m", "oss_convert.cli.main", *merge], experts,
                     checkout.resolve()))
    for name, command, count, checkout in jobs:
        ensure_space(args.work, source_bytes)
        wall, rss, pss = timed_tree(command, checkout)
        rows.append((f"{name} --to {args.target}", wall, rss, count, pss))
        print(f"{rows[-1][0]}: {wall:.1f} s, peak RSS {rss:.0f} MiB, all processes {pss:.0f} MiB", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
        out.with_name(out.name + ".manifest.json").unlink(missing_ok=True)
    plain = rows[1][1]
    from oss_convert import encode_workers

    workers = f"{encode_workers.worker_count()} worker processes" if encode_workers.available() else "threads"
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores ({workers}), "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}; "
          f"package sources {package_digest()}" + "".join(f", {c.name}'s {package_digest(c)}" for c in args.also))
    print(f"Checkpoint: {repo.name} ({total} layers, {config['num_experts']} experts), {source_bytes / 1e9:.2f} GB; "
          f"adapter: rank {RANK}, attention + every expert of {len(touched)} layers ({experts} expert matrices); "
          "page cache warm; times include a final sync\n")
    print("| job | wall s | x cp | peak RSS MiB (largest process) | peak PSS MiB (all processes) | experts re-encoded "
          "| experts/s (beyond the plain convert) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, wall, rss, count, pss in rows:
        rate = f"{count / max(wall - plain, 1e-9):.2f}" if count else "-"
        print(f"| {name} | {wall:.1f} | {wall / cp_wall:.2f} | {rss:.0f} | {pss:.0f} | {count or '-'} | {rate} |")


if __name__ == "__main__":
    main()
