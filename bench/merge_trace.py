"""Where a LoRA merge's time goes: the same merge under several settings of its workers, traced.

    python bench/merge_trace.py --work DIR [--preset 20b] [--layers 12 --touched-layers 8] \
        [--variant ahead=1] [--variant workers=14,priority=idle] ... [--timeline]

``bench/merge_bench.py`` says how long a merge takes; this says why. Each variant runs
``convert --adapter --to mlx`` in a fresh process with some of the merge's settings changed
(``ahead=GiB``: ``adapters.SPILL_AHEAD_BYTES``; ``workers=N``: how many worker processes;
``priority=idle|nice:N``: how they yield to the conversion) and records:

- the seconds the conversion's thread was blocked waiting for a re-encoded expert;
- the CPU seconds of the parent and of the workers (``getrusage``);
- when the target reached each layer and when the workers delivered its first and last expert
  (``--timeline``);
- the peak of the kernel's dirty and under-writeback page cache (``/proc/meminfo``) during the
  job: the spill files are written and dropped, the output written, and a full model crosses
  the kernel's writeback threshold where a cut one does not.

Times are ratios to ``cp -r`` of the same ``original/`` and to the plain convert, measured in
the same run. The adapter is ``merge_bench``'s (rank 16, attention and every expert of the last
``--touched-layers`` layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import ensure_space, size_of  # noqa: E402
from merge_bench import package_digest, write_adapter  # noqa: E402

# Run in the job's own process: the settings applied, the merge traced, the conversion run.
TRACED = r'''
import json, os, resource, sys, time
from oss_convert import adapters, converters, encode_workers

source, output, adapter, settings = sys.argv[1], sys.argv[2], sys.argv[3] or None, json.loads(sys.argv[4])
if "ahead" in settings:
    adapters.SPILL_AHEAD_BYTES = int(float(settings["ahead"]) * 2**30)
if "workers" in settings:
    encode_workers.worker_count = lambda n=int(settings["workers"]): n
if "priority" in settings:
    how = settings["priority"]
    def yield_cores(how=how):
        if how == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.nice(int(how.removeprefix("nice:")))
    encode_workers._run_when_idle = yield_cores  # forked workers see it
start, trace = time.time(), {"blocked": 0.0, "reached": {}, "delivered": {}}

def timed_wait(wait):
    def traced(self, e):
        began = time.time()
        wait(self, e)
        trace["blocked"] += time.time() - began
    return traced

def noted_delivery(deliver):
    def traced(self, e, views, sums):
        deliver(self, e, views, sums)
        span = trace["delivered"].setdefault(self.name.split(".")[1], [1e9, 0.0])
        now = time.time() - start
        span[0], span[1] = min(span[0], now), max(span[1], now)
    return traced

def noted_reach(follow):
    def traced(self, name):
        if ".mlp.mlp" in name:
            trace["reached"].setdefault(name.split(".")[1], time.time() - start)
        follow(self, name)
    return traced

adapters._ExpertMerge._wait_spilled = timed_wait(adapters._ExpertMerge._wait_spilled)
adapters._ExpertMerge._deliver = noted_delivery(adapters._ExpertMerge._deliver)
adapters.MergedSource._follow = noted_reach(adapters.MergedSource._follow)
converters.convert(source, "mlx", output, adapter=adapter, force=True)
me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
trace["parent_cpu"], trace["workers_cpu"] = me.ru_utime + me.ru_stime, workers.ru_utime + workers.ru_stime
print(json.dumps(trace))
'''


def dirty_mib() -> float:
    """The page cache waiting to be written or being written, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) for k in ("Dirty", "Writeback")) / 1024


def run_job(repo: Path, out: Path, adapter: Path | None, settings: dict) -> tuple[float, dict, float]:
    """(wall seconds including a final sync, the job's trace, peak dirty MiB)."""
    subprocess.run(["sync"], check=True)
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], dirty_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    job = subprocess.run([sys.executable, "-c", TRACED, str(repo), str(out), str(adapter or ""), json.dumps(settings)],
                         capture_output=True, text=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - began
    done.set()
    sampler.join()
    if job.returncode != 0:
        sys.exit(f"failed ({settings}):\n{job.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return wall, json.loads(job.stdout.strip().splitlines()[-1]), peak[0]


def parse_variant(text: str) -> dict:
    settings = dict(part.split("=", 1) for part in text.split(",") if part)
    unknown = set(settings) - {"ahead", "workers", "priority"}
    if unknown:
        sys.exit(f"unknown settings {sorted(unknown)} in {text!r}: ahead=GiB, workers=N, priority=idle|nice:N")
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--touched-layers", type=int, default=16)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[],
                        help="settings, e.g. 'ahead=4' or 'workers=14,priority=idle'; '' = as shipped (repeatable)")
    parser.add_argument("--timeline", action="store_true", help="print when each layer was reached and delivered")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in (args.variant or [""])]
    repo = args.work / f"gpt-oss-{args.preset}{f'-L{args.layers}' if args.layers else ''}"
    if not (repo / "original" / "config.json").exists():
        layers = ["--layers", str(args.layers)] if args.layers else []
        subprocess.run([sys.executable, "-m", "oss_convert.cli.main", "synth", str(repo), "--preset", args.preset,
                        *layers, "--quiet"], check=True)
    config = json.loads((repo / "original" / "config.json").read_text())
    total = config["num_hidden_layers"]
    adapter = args.work / f"adapter-{repo.name}-{min(args.touched_layers, total)}"
    shutil.rmtree(adapter, ignore_errors=True)
    matrices = write_adapter(config, list(range(total - min(args.touched_layers, total), total)), adapter)
    source_bytes = size_of(repo / "original")
    copy, out = args.work / "cp-copy", args.work / "out-trace"
    for _ in range(2):  # the first warms the page cache
        shutil.rmtree(copy, ignore_errors=True)
        ensure_space(args.work, source_bytes)
        subprocess.run(["sync"], check=True)
        began = time.perf_counter()
        subprocess.run(["cp", "-r", str(repo / "original"), str(copy)], check=True)
        subprocess.run(["sync"], check=True)
        cp_wall = time.perf_counter() - began
    shutil.rmtree(copy, ignore_errors=True)
    plain, plain_trace, plain_dirty = run_job(repo, out, None, {})
    print(f"{repo.name}: {total} layers, {matrices} expert matrices re-encoded; {os.cpu_count()} cores; "
          f"package sources {package_digest()}\n")
    print("| job | wall s | x cp | x plain | parent CPU s | workers CPU s | parent blocked s | peak dirty MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| cp -r | {cp_wall:.1f} | 1.00 | - | - | - | - | - |")
    print(f"| convert | {plain:.1f} | {plain / cp_wall:.2f} | 1.00 | {plain_trace['parent_cpu']:.1f} | - | - | "
          f"{plain_dirty:.0f} |", flush=True)
    timelines = []
    for settings in variants:
        ensure_space(args.work, source_bytes)
        wall, trace, dirty = run_job(repo, out, adapter, settings)
        label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "as shipped"
        print(f"| merge, {label} | {wall:.1f} | {wall / cp_wall:.2f} | {wall / plain:.2f} | {trace['parent_cpu']:.1f} | "
              f"{trace['workers_cpu']:.1f} | {trace['blocked']:.1f} | {dirty:.0f} |", flush=True)
        timelines.append((label, trace))
    for label, trace in timelines if args.timeline else []:
        print(f"\n{label}: layer, reached s, experts delivered s")
        for layer in sorted(trace["reached"], key=int):
            span = trace["delivered"].get(layer)
            print(f"  {layer}: {trace['reached'][layer]:.1f}" + (f", {span[0]:.1f}-{span[1]:.1f}" if span else ""))


if __name__ == "__main__":
    main()
