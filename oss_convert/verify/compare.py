"""``oss-convert compare``: many artifacts against one reference, in one table.

What a person holding several downloaded quants wants to see: for each artifact its size on
disk, bits per weight (size x 8 / the reference's parameter count), perplexity ratio, KL mean
and p99, top-1 agreement and the verdict of the same gates as ``verify`` (mean KL and top-1),
sorted by size. The reference runs once (or comes from an ``.npz`` cache); each artifact is
scored on its tokens. An artifact is a path, or a Hub quant named as llama.cpp names it
(``user/repo:Q4_K_M``, ``user/repo:F16``), found in the local Hugging Face cache: nothing is
downloaded, and a quant that is not there is an error that says which ``hf download`` fetches
it. Imports: base and support modules, ``verify``.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from .. import formats
from ..errors import InputError
from ..model import expected_tensors
from ..progress import SILENT, Progress
from ..sizes import format_size
from .check import Inputs, is_cache, kld_by_position, make_reference, score
from .reference import METAL_VOCAB_ROWS, Reference
from .report import DEFAULT_MAX_KLD, DEFAULT_MIN_TOP1, Evidence, check_kl, check_top1

COLUMNS = ("artifact", "kind", "size_bytes", "bits_per_weight", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement",
           "verdict")
_HUB_NAME = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<quant>[\w.-]+)$")


def resolve(name: str) -> Path:
    """A path as given, or ``user/repo:QUANT`` as the cached GGUF file whose name carries QUANT
    (the first shard of a split)."""
    match = _HUB_NAME.match(name)
    if match is None or Path(name).exists():
        return Path(name)
    repo, quant = match["repo"], match["quant"]
    fetch = f"hf download {repo} --include '*{quant}*'"
    try:
        from huggingface_hub import constants, scan_cache_dir

        cached = {r.repo_id: r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == "model"}
    except Exception as exc:  # the cache folder missing or unreadable: nothing cached
        raise InputError(f"{name}: no Hugging Face cache to look in ({exc}); fetch it with {fetch}") from None
    if repo not in cached:
        raise InputError(f"{name}: {repo} is not in the local Hugging Face cache; fetch it with {fetch}")
    wanted = re.compile(rf"(^|[-_.]){re.escape(quant)}([-_.]|$)", re.IGNORECASE)
    files = sorted((f.file_path for rev in cached[repo].revisions for f in rev.files
                    if f.file_name.endswith(".gguf") and wanted.search(f.file_name[:-5])), key=str)
    firsts = [f for f in files if (formats.gguf.split_number(f.name) or (1, 1))[0] == 1]
    if not firsts:
        raise InputError(f"{name}: no {quant} GGUF of {repo} in the local Hugging Face cache; fetch it with {fetch}")
    return Path(firsts[0])


def size_on_disk(path: Path) -> int:
    """The bytes a runtime loads: the file (every shard of a split GGUF), or a folder's weights."""
    return sum(f.stat().st_size for f in formats.weight_files(path))


def parameter_count(config) -> int:
    return sum(int(np.prod(spec.shape)) for spec in expected_tensors(config, "bf16"))


def compare(reference: str | Path, names: list[str], inputs: Inputs, *, max_kld: float = DEFAULT_MAX_KLD,
            min_top1: float = DEFAULT_MIN_TOP1, progress: Progress = SILENT) -> dict:
    """Every artifact's row (``COLUMNS``, plus per-position KL for ``--plot``), sorted by size."""
    paths = [resolve(n) for n in names]
    for name, path in zip(names, paths):
        if not path.exists():
            raise InputError(f"{name}: no such artifact", file=path)
    models = []  # each artifact opened once: its vocabulary size shapes the reference, then it is scored
    try:
        for path in paths:
            models.append(formats.open_canonical(path))
        if is_cache(reference):
            ref = Reference.load(reference)
        else:
            cut = sorted({METAL_VOCAB_ROWS} | {m.config.vocab_size for m in models})
            ref = make_reference(reference, inputs, progress, cut_rows=tuple(cut))
        params = parameter_count(_config_of(ref))
        thresholds = {"max_kld": max_kld, "min_top1": min_top1}
        rows = [_row(name, path, model, ref, params, thresholds, progress, inputs.device)
                for name, path, model in zip(names, paths, models)]
    finally:
        for model in models:
            model.close()
    rows.sort(key=lambda r: (r["size_bytes"], r["artifact"]))
    return {"schema": "oss-convert-compare/1", "reference": str(reference), "parameters": params,
            "thresholds": thresholds,
            "input": {**ref.meta.get("input", {}), "ctx": ref.ctx, "chunks": int(ref.tokens.shape[0])},
            "first_scored_position": ref.ctx // 2 + 1, "rows": rows}


def _row(name: str, path: Path, model, ref: Reference, params: int, thresholds: dict, progress: Progress,
         device: str | None) -> dict:
    """One artifact scored on the reference's tokens; the verdict is verify's own KL and top-1 checks."""
    summary, metrics = score(model, ref, progress, device=device)
    evidence = Evidence(summary, thresholds, config_diff=[], tensors=None, tokenizer={}, chat_template={})
    passed = check_kl(evidence).status == "pass" and check_top1(evidence).status == "pass"
    size = size_on_disk(path)
    return {"artifact": name, "path": str(path), "kind": formats.detect(path), "size_bytes": size,
            "bits_per_weight": size * 8 / params, "ppl": summary["ppl"], "ppl_ref": summary["ppl_ref"],
            "ppl_ratio": summary["ppl_ratio"], "kld_mean": summary["kld_mean"], "kld_p99": summary["kld_p99"],
            "top1_agreement": summary["top1_agreement"], "verdict": "pass" if passed else "fail",
            "kld_by_position": kld_by_position(metrics.kld, ref.ctx).tolist()}


def _config_of(ref: Reference):
    from ..model import ModelConfig

    return ModelConfig.from_dict(ref.meta["config"])


def format_table(result: dict) -> str:
    lines = [f"reference  {result['reference']} ({result['parameters']:,} parameters); "
             f"{result['input'].get('chunks')} chunks x {result['input'].get('ctx')} tokens",
             "", f"  {'artifact':<36}{'kind':<9}{'size':>11}{'bpw':>7}{'ppl ratio':>11}{'KL mean':>11}{'KL p99':>11}"
                 f"{'top-1':>9}  verdict"]
    for r in result["rows"]:
        lines.append(f"  {r['artifact'][-35:]:<36}{r['kind']:<9}{format_size(r['size_bytes']):>11}{r['bits_per_weight']:>7.2f}"
                     f"{r['ppl_ratio']:>11.5f}{r['kld_mean']:>11.2e}{r['kld_p99']:>11.2e}{r['top1_agreement']:>9.2%}"
                     f"  {r['verdict']}")
    th = result["thresholds"]
    lines += ["", f"verdict: pass when KL mean <= {th['max_kld']:g} and top-1 >= {th['min_top1']:.0%}"]
    return "\n".join(lines)


def to_csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(result["rows"])
    return out.getvalue()


def plot_sizes(result: dict, path: Path) -> Path:
    """Size (bits per weight) against mean KL, one labelled point per artifact (PNG). Exact
    artifacts (KL 0) sit on a floor line a decade below the smallest non-zero KL."""
    plt = _pyplot()
    rows = result["rows"]
    nonzero = [r["kld_mean"] for r in rows if r["kld_mean"] > 0]
    floor = min(nonzero + [result["thresholds"]["max_kld"]]) / 10
    points: dict[tuple, list[dict]] = {}  # artifacts with the same size and KL share one labelled point
    for r in rows:
        key = (round(r["bits_per_weight"], 1), round(float(np.log10(max(r["kld_mean"], floor))), 1))
        points.setdefault(key, []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for i, group in enumerate(points.values()):
        r = group[0]
        kld = max(r["kld_mean"], floor)
        ax.scatter(r["bits_per_weight"], kld, color="tab:green" if r["verdict"] == "pass" else "tab:red", zorder=3)
        label = "\n".join(Path(g["artifact"]).name for g in group)
        ax.annotate(label, (r["bits_per_weight"], kld), textcoords="offset points", fontsize=7,
                    xytext=(6, 6) if i % 2 else (6, -8), va="bottom" if i % 2 else "top")  # alternate sides
    ax.axhline(result["thresholds"]["max_kld"], color="grey", linestyle="--", linewidth=1, label="--max-kld gate")
    ax.axhline(floor, color="lightgrey", linestyle=":", linewidth=1, label="KL 0 (exact)")
    ax.set_yscale("log")
    ax.margins(x=0.25, y=0.2)
    ax.set_xlabel("bits per weight (file size x 8 / parameters)")
    ax.set_ylabel("mean KL divergence vs reference (nats)")
    ax.set_title("Size against quality (green: pass, red: fail)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_positions(kld_by_position: np.ndarray, first_position: int, window: int, initial_context: int, path: Path,
                   title: str) -> Path:
    """Mean KL by token position in the chunk (PNG): a rising curve is what a RoPE / YaRN or
    sliding-window mistake looks like; the window and the initial context length are marked."""
    plt = _pyplot()
    positions = np.arange(first_position, first_position + len(kld_by_position))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    values = np.maximum(kld_by_position, 1e-12)
    ax.plot(positions, values, linewidth=0.8, alpha=0.35, label="each position")
    span = min(16, len(values))
    smooth = np.convolve(values, np.ones(span) / span, mode="valid")
    ax.plot(positions[span - 1:], smooth, linewidth=1.8, label=f"mean of {span} positions")
    ax.legend(loc="upper left", fontsize=8)
    for x, label in ((window, "sliding window"), (initial_context, "initial context length")):
        if positions[0] <= x <= positions[-1]:
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
            ax.annotate(label, (x, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top", ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("token position in the chunk (scored half)")
    ax.set_ylabel("mean KL divergence (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plots need matplotlib: pip install 'oss-convert[plot]'") from None
    return plt
