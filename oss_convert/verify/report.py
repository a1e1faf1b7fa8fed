"""The verification report: verdict rules, the JSON schema, and the readable table.

JSON schema (``oss-convert verify --json FILE``; schema ``oss-convert-verify/1``): one object,
``Report`` below: its fields are the JSON's keys in order, and each block's type says its own
(``ArtifactBlock``, ``ReferenceBlock``, ``VocabBlock``, ``Metrics``, ``Thresholds``, ``Positions``,
``TensorBlock``, ``Timings``, ``Versions``; the tokenizer and chat template blocks are described
in their types' docstrings). ``to_json`` writes it as strict JSON: a non-finite number (an
infinite difference, e.g. a shape mismatch) is written as null. Natural-log units (nats)
throughout.

Verdict: "fail" if any check fails: the config check (a key other than vocab_size differs), the
tensors check (a tensor's status is "differs": MXFP4 experts decoding to other values, a BF16 tensor
not identical, an F16/Q8_0 tensor beyond its rounding bound), the tokenizer check (the artifact's
tokenizer gives different ids, or stops elsewhere), the template check (a chat the conversion made render
differently from openai-harmony; any difference with --strict-chat-template; a template that does not
parse), kl (kld_mean > max_kld), top1 (top1_agreement < min_top1). A new
check is one function ``Evidence -> Check`` added to ``CHECKS``; the JSON, the table and the verdict
follow from the list.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

SCHEMA = "oss-convert-verify/1"
# The default gates, calibrated on the trained tiny gpt-oss (examples/gpt-oss-tiny, held-out
# text, tests/verify/test_trained.py): lossless conversions give ~1e-13 and 100%; the 8-bit
# recipes 1.2-1.7e-4 and 99.4-99.9%; the mildest planted defect (one layer's sinks zeroed)
# 7.6e-4 and 98.5%, one expert's nibbles swapped 5.6e-3 and 96.3%; the 4-bit MLX recipe 6.7e-3
# and 94.0%.
DEFAULT_MAX_KLD = 5e-4
DEFAULT_MIN_TOP1 = 0.99
KINDS = ("original", "mlx", "hf", "metal", "gguf")  # artifact kinds: the format registry's names


@dataclass
class ArtifactBlock:
    path: str
    kind: str  # one of KINDS
    config: dict  # the 16 ModelConfig keys as the artifact states them


@dataclass
class ReferenceBlock:
    path: str
    kind: str | None  # the source's kind (KINDS), or "cache" for an .npz
    source: str | None  # the checkpoint the reference was computed from
    config: dict
    experts: str | None  # the expert kernels: "quantized" (MXFP4, as an MXFP4 artifact's) or "dequantized"
    top_k: int | None  # reference log-probs kept per token
    adapter: dict | None = None  # the LoRA adapter applied to the source (format, files, sha256), if any


@dataclass
class VocabBlock:
    artifact_rows: int
    reference_rows: int
    compared_rows: int  # the shared rows; distributions are renormalised over them


@dataclass
class Metrics:
    """Artifact against reference on the same scored tokens."""

    tokens_scored: int
    ppl: float  # exp(mean NLL) of the artifact
    ppl_ref: float  # and of the reference
    ppl_ratio: float  # ppl / ppl_ref
    ln_ppl_ratio: float  # mean NLL difference (nats)
    kld_mean: float  # KL(reference || artifact) per token (reference top-k + a tail bucket;
    kld_median: float  # exact when top_k covers the vocabulary)
    kld_p99: float
    kld_max: float
    top1_agreement: float  # fraction of tokens whose argmax agrees (0..1)
    delta_p_rms: float  # RMS of p_artifact(next token) - p_reference(next token)
    logit_max_abs_diff: float  # |artifact logit - reference logit| over the reference's top-k ids
    logit_mean_abs_diff: float


@dataclass
class Thresholds:
    max_kld: float  # bound on kld_mean
    min_top1: float  # bound on top1_agreement


@dataclass
class Positions:
    first: int  # the chunk position of the first scored token, ctx//2+1
    kld_mean: list[float]  # mean KL at each scored position over the chunks (rising: RoPE / window)


@dataclass
class TensorBlock:
    """The tensor-by-tensor comparison (null when the reference is a cache). ``items``: every
    tensor not identical, plus the expert tensors: {"name", "storage", "status" (identical |
    same_values | within_bound | lossy | differs), "max_abs_diff", "bound", "detail", "reencoded"}."""

    compared: int
    identical: int
    same_values: int
    within_bound: int
    lossy: int
    differs: int
    experts_bit_identical: bool  # every MXFP4 expert tensor byte-identical
    experts_lossless: bool  # every MXFP4 expert tensor decodes to the source's values
    reencoded_blocks: int  # MXFP4 blocks stored with another exact encoding of the same values
    items: list[dict]


@dataclass
class Timings:
    reference_s: float
    artifact_s: float
    tensors_s: float
    total_s: float
    ranks: int = 1  # processes that computed it (mlx.launch -n N)
    exchange_s: float = 0.0  # of which in MLX's collectives (gathers, waiting for the other ranks)


@dataclass
class KernelsBlock:
    """Which arithmetic each side ran ("numpy float32 on cpu", "mlx float32 on gpu (cuda)", ...;
    the reference's as its cache records it, null for an older cache). ``same``: the same kernels,
    so a lossless artifact scores KL 0 exactly. Otherwise ``noise_*``: the artifact's first chunk
    run by both kernels here, KL(reference kernels || artifact kernels) and the largest |logit
    difference|: the noise floor of the measurement (null when not measured)."""

    reference: str | None
    artifact: str
    same: bool
    note: str
    noise_kld_mean: float | None = None
    noise_kld_max: float | None = None
    noise_logit_max_abs_diff: float | None = None


@dataclass
class Versions:
    oss_convert: str
    mlx: str


@dataclass
class Report:
    """One verify run.

    ``tokenizer``: {"checked" (bool), "same_vocabulary" (bool: every id's bytes, the specials and
    BOS/EOS/pad as the reference's tokenizer.json), "vocabulary_problems" (each naming the id and
    both values), "vocabulary" (the file read), "reference_tokenizer", "same_ids" (bool or null:
    the artifact's tokenizer.json gives the reference's ids for its text), "first_mismatch",
    "tokenizer", "reason", "stop_ids" (what a runtime stops on), "stop_problems", "stop_notes"}.

    ``chat_template``: {"checked" (bool; false with a "reason" when the artifact carries none),
    "source" (the file or GGUF key), "sha256", "harmony_template" (bool: oss-convert's template),
    "strict", "reference_source", "same_text_as_reference", "parse_error", "conversations":
    [{"name", "status" (same | differs | error, against openai-harmony's rendering), "tokens",
    "first_difference", "template_context", "harmony_context" (split at "⟦"), "error",
    "as_reference"}], "regressions", "same", "differs", "error"}.

    ``input``: {"kind" (text | token_ids), "file", "text_sha256", "tokenizer", "total_tokens",
    "ctx", "chunks", "scored_per_chunk" (ctx-1-ctx//2, like llama-perplexity), "tokens_scored"}.
    ``config_diff``: [{"key", "artifact", "reference"}]. ``checks``: [{"name", "status" (pass |
    fail | not_checked), "summary"}], one per entry of ``CHECKS``, whose reasons and notes are
    ``reasons`` and ``notes``.
    """

    schema: str
    verdict: str  # "pass" | "fail"
    reasons: list[str]  # one per failed check, each naming what differs
    notes: list[str]  # worth saying, not failing
    artifact: ArtifactBlock
    reference: ReferenceBlock
    input: dict
    vocab: VocabBlock
    metrics: Metrics
    thresholds: Thresholds
    positions: Positions
    tensors: TensorBlock | None
    config_diff: list[dict]
    tokenizer: dict
    chat_template: dict
    checks: list[dict]
    timings: Timings
    versions: Versions
    kernels: KernelsBlock | None = None  # null on the ranks that do not write the report

    def to_dict(self) -> dict:
        return asdict(self)


def strict(value):
    """JSON-safe: non-finite floats become None, numpy scalars Python numbers, tuples lists."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def to_json(document: dict) -> str:
    """Strict JSON (RFC 8259: no NaN or Infinity), indented, with a final newline."""
    return json.dumps(strict(document), indent=2, allow_nan=False, default=str) + "\n"  # paths as text


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass
class Evidence:
    """What the checks judge: the measured numbers and comparisons of one verify run."""

    summary: dict  # metrics.summarize
    thresholds: dict  # {"max_kld", "min_top1"}
    config_diff: list[dict]
    tensors: list | None  # [TensorResult] or None when the reference is a cache
    tokenizer: dict
    chat_template: dict  # verify.template.check


@dataclass
class Check:
    name: str
    status: str  # pass | fail | not_checked
    summary: str  # one line for the table
    reasons: list[str] = field(default_factory=list)  # why it failed, each naming what differs
    notes: list[str] = field(default_factory=list)  # worth saying, not failing

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("name", "status", "summary")}


def check_config(ev: Evidence) -> Check:
    reasons, notes = [], []
    for d in ev.config_diff:
        if d["key"] == "vocab_size":
            notes.append(f"vocab_size: artifact {d['artifact']}, reference {d['reference']}; "
                         f"compared over the first {min(d['artifact'], d['reference'])} rows")
        else:
            reasons.append(f"config {d['key']}: artifact {d['artifact']!r}, reference {d['reference']!r}")
    summary = "same as the reference" if not ev.config_diff else f"{len(ev.config_diff)} keys differ"
    return Check("config", "fail" if reasons else "pass", summary, reasons, notes)


def check_tensors(ev: Evidence) -> Check:
    if ev.tensors is None:
        return Check("tensors", "not_checked", "the reference is a cache (pass the checkpoint to compare tensors)")
    reasons, notes = [], []
    for t in ev.tensors:
        if t.failed:
            reasons.append(f"tensor {t.name} ({t.storage}): {t.detail or f'max |diff| {t.max_abs_diff:.3g}'}")
        elif t.status == "lossy":
            notes.append(f"tensor {t.name} stored as {t.storage} (lossy): max |diff| {t.max_abs_diff:.3g}")
        elif t.status == "same_values":
            notes.append(f"tensor {t.name}: {t.detail}")
    b = _tensor_block(ev.tensors)
    experts = ("bit-identical" if b.experts_bit_identical else
               f"lossless ({b.reencoded_blocks} blocks re-encoded)" if b.experts_lossless else "not lossless")
    summary = (f"{b.compared} compared: {b.identical} identical, {b.same_values} same values, "
               f"{b.within_bound} within bound, {b.lossy} lossy, {b.differs} differ; experts {experts}")
    return Check("tensors", "fail" if reasons else "pass", summary, reasons, notes)


def check_tokenizer(ev: Evidence) -> Check:
    tok = ev.tokenizer
    if not tok.get("checked"):
        return Check("tokenizer", "not_checked", tok.get("reason", "no tokenizer"))
    reasons = [f"tokenizer: {p}" for p in tok.get("vocabulary_problems", []) + tok.get("stop_problems", [])]
    if tok.get("same_ids") is False:
        reasons.append(f"the artifact's tokenizer gives different ids (first mismatch at token {tok.get('first_mismatch')})")
    parts = []
    if "same_vocabulary" in tok:
        parts.append("vocabulary, specials and BOS/EOS/pad as the reference's" if tok["same_vocabulary"]
                     else f"{len(tok['vocabulary_problems'])} vocabulary differences")
    if tok.get("same_ids") is not None:
        parts.append("same ids for the text" if tok["same_ids"] else "DIFFERENT ids for the text")
    if "stop_problems" in tok:
        parts.append(f"stops on {tok['stop_ids']}" if not tok["stop_problems"] else "WRONG stop ids")
    notes = [f"tokenizer: {n}" for n in tok.get("stop_notes", [])]
    return Check("tokenizer", "fail" if reasons else "pass", "; ".join(parts), reasons, notes)


def check_chat_template(ev: Evidence) -> Check:
    t = ev.chat_template
    if not t.get("checked"):
        return Check("template", "not_checked", t.get("reason", "no chat template"))
    if "parse_error" in t:
        return Check("template", "fail", "does not parse", [f"chat template: {t['parse_error']}"])
    rows = {r["name"]: r for r in t["conversations"]}
    failing = list(rows) if t["strict"] else t["regressions"]
    reasons = [f"chat template ({t['source']}): {_chat_difference(rows[name])}" for name in failing
               if rows[name]["status"] != "same"]
    notes = [] if t["strict"] else [f"chat template: {_chat_difference(r)} (as the reference's template)"
                                    for r in t["conversations"] if r["status"] != "same" and r["name"] not in failing]
    total = len(rows)
    summary = f"{t['same']}/{total} chats as openai-harmony renders them"
    if t["harmony_template"]:
        summary += " (oss-convert's harmony template)"
    elif t.get("same_text_as_reference"):
        summary += "; the reference's own template"
    elif total - t["same"]:
        summary += f"; {len(t['regressions'])} differ where the reference's template does not"
    return Check("template", "fail" if reasons else "pass", summary, reasons, notes)


def _chat_difference(row: dict) -> str:
    if row["status"] == "error":
        return f"{row['name']!r} does not render: {row['error']}"
    return (f"{row['name']!r} differs from openai-harmony at token {row['first_difference']}: "
            f"template {row['template_context']!r}, harmony {row['harmony_context']!r}")


def check_kl(ev: Evidence) -> Check:
    kld, bound = ev.summary["kld_mean"], ev.thresholds["max_kld"]
    if kld > bound:
        return Check("kl", "fail", f"mean {kld:.3e} > {bound:g}",
                     [f"mean KL divergence {kld:.4g} exceeds --max-kld {bound:g}"])
    return Check("kl", "pass", f"mean {kld:.3e} <= {bound:g}")


def check_top1(ev: Evidence) -> Check:
    top1, bound = ev.summary["top1_agreement"], ev.thresholds["min_top1"]
    if top1 < bound:
        return Check("top1", "fail", f"{top1:.2%} < {bound:.2%}",
                     [f"top-1 agreement {top1:.2%} is below --min-top1 {bound:.2%}"])
    return Check("top1", "pass", f"{top1:.2%} >= {bound:.2%}")


CHECKS = (check_config, check_tensors, check_tokenizer, check_chat_template, check_kl, check_top1)


def run_checks(ev: Evidence) -> list[Check]:
    return [check(ev) for check in CHECKS]


def build_report(*, artifact: str, artifact_kind: str, artifact_config: dict, reference, reference_path: str,
                 summary: dict, tensors, tokenizer: dict, chat_template: dict, thresholds: dict,
                 timings: dict, kld_by_position=None, kernels: dict | None = None) -> dict:
    import mlx.core as mx

    from .. import __version__

    ref_meta = reference.meta
    config_diff = _config_diff(artifact_config, ref_meta["config"])
    checks = run_checks(Evidence(summary, thresholds, config_diff, tensors, tokenizer, chat_template))
    ctx = reference.ctx
    art_rows, ref_rows = artifact_config["vocab_size"], reference.vocab_size
    report = Report(
        schema=SCHEMA,
        verdict="fail" if any(c.status == "fail" for c in checks) else "pass",
        reasons=[r for c in checks for r in c.reasons],
        notes=[n for c in checks for n in c.notes],
        artifact=ArtifactBlock(artifact, artifact_kind, artifact_config),
        reference=ReferenceBlock(reference_path, "cache" if reference_path.endswith(".npz") else ref_meta.get("source_kind"),
                                 ref_meta.get("source"), ref_meta["config"], ref_meta.get("experts"), ref_meta.get("top_k"),
                                 ref_meta.get("adapter")),
        input={**ref_meta.get("input", {}), "ctx": ctx, "chunks": int(reference.tokens.shape[0]),
               "scored_per_chunk": ctx - 1 - ctx // 2, "tokens_scored": summary["tokens_scored"]},
        vocab=VocabBlock(art_rows, ref_rows, min(art_rows, ref_rows)),
        metrics=Metrics(**summary),
        thresholds=Thresholds(**thresholds),
        positions=Positions(ctx // 2 + 1, [] if kld_by_position is None else [float(v) for v in kld_by_position]),
        tensors=_tensor_block(tensors) if tensors is not None else None,
        config_diff=config_diff,
        tokenizer=tokenizer,
        chat_template=chat_template,
        checks=[c.to_dict() for c in checks],
        timings=Timings(**timings),
        versions=Versions(__version__, mx.__version__),
        kernels=KernelsBlock(**kernels) if kernels is not None else None,
    )
    return report.to_dict()


def _kernel_lines(kernels: dict | None) -> list[str]:
    """Which arithmetic each side ran, and the noise floor where they differ."""
    if not kernels:
        return []
    if kernels["same"]:
        return [f"kernels    both {kernels['artifact']}: {kernels['note']}"]
    lines = [f"kernels    reference {kernels['reference'] or 'unknown'}, artifact {kernels['artifact']}"]
    if kernels.get("noise_kld_mean") is not None:
        lines.append(f"           noise floor: KL mean {kernels['noise_kld_mean']:.3e}, max {kernels['noise_kld_max']:.3e}, "
                     f"max |logit diff| {kernels['noise_logit_max_abs_diff']:.3e} ({kernels['note'].split(': ', 1)[1]})")
    else:
        lines.append(f"           {kernels['note']}")
    return lines


def _chat_lines(template: dict) -> list[str]:
    """One line per corpus chat: its verdict against openai-harmony, and where it first differs."""
    if not template.get("conversations"):
        return []
    lines = ["", f"  {'chat (template vs openai-harmony)':<40}{'verdict':<9}{'as ref':<8}first difference"]
    for row in template["conversations"]:
        as_ref = {True: "yes", False: "no", None: "-"}[row.get("as_reference")]
        where = ""
        if row["status"] == "differs":
            where = f"token {row['first_difference']}: {row['template_context'][-30:]!r}"
        elif row["status"] == "error":
            where = row["error"][:60]
        lines.append(f"  {row['name'][:39]:<40}{row['status']:<9}{as_ref:<8}{where}")
    return lines


def _config_diff(artifact: dict, reference: dict) -> list[dict]:
    diffs = []
    for key, want in reference.items():
        got = artifact.get(key)
        if got is None or float(got) != float(want):
            diffs.append({"key": key, "artifact": got, "reference": want})
    return diffs


def _tensor_block(tensors) -> TensorBlock:
    counts = {s: sum(t.status == s for t in tensors) for s in ("identical", "same_values", "within_bound", "lossy", "differs")}
    experts = [t for t in tensors if t.name.endswith(("mlp1_weight", "mlp2_weight"))]
    return TensorBlock(
        compared=len(tensors), **counts,
        experts_bit_identical=bool(experts) and all(t.status == "identical" and t.storage == "MXFP4" for t in experts),
        experts_lossless=bool(experts) and all(t.status in ("identical", "same_values") and t.storage == "MXFP4"
                                               for t in experts),
        reencoded_blocks=sum(t.reencoded for t in experts),
        items=[t.to_dict() for t in tensors if t.status != "identical" or t in experts],
    )


def format_table(report: dict) -> str:
    """The human-readable summary printed by ``oss-convert verify``."""
    m, inp, th = report["metrics"], report["input"], report["thresholds"]
    lines = [
        f"artifact   {report['artifact']['path']} ({report['artifact']['kind']})",
        f"reference  {report['reference']['path']} ({report['reference']['kind']}, experts {report['reference']['experts']})",
        f"input      {inp.get('file', '?')}: {inp['chunks']} chunks x {inp['ctx']} tokens, "
        f"{inp['tokens_scored']} scored (second half of each chunk)",
        f"vocab      {report['vocab']['compared_rows']} rows compared "
        f"(artifact {report['vocab']['artifact_rows']}, reference {report['vocab']['reference_rows']})",
        *_kernel_lines(report.get("kernels")),
        "",
        f"  {'metric':<26}{'value':>14}   limit",
        f"  {'perplexity artifact':<26}{m['ppl']:>14.4f}",
        f"  {'perplexity reference':<26}{m['ppl_ref']:>14.4f}",
        f"  {'perplexity ratio':<26}{m['ppl_ratio']:>14.6f}",
        f"  {'KL mean (nats)':<26}{m['kld_mean']:>14.3e}   <= {th['max_kld']:g}",
        f"  {'KL median':<26}{m['kld_median']:>14.3e}",
        f"  {'KL p99':<26}{m['kld_p99']:>14.3e}",
        f"  {'KL max':<26}{m['kld_max']:>14.3e}",
        f"  {'top-1 agreement':<26}{m['top1_agreement']:>14.2%}   >= {th['min_top1']:.2%}",
        f"  {'max |logit diff|':<26}{m['logit_max_abs_diff']:>14.3e}",
        f"  {'mean |logit diff|':<26}{m['logit_mean_abs_diff']:>14.3e}",
    ]
    lines.append("")
    for check in report["checks"]:
        lines.append(f"  {check['name']:<10} {check['status'].replace('_', ' '):<12} {check['summary']}")
    lines += _chat_lines(report.get("chat_template") or {})
    for note in report["notes"][:10]:
        lines.append(f"  note: {note}")
    lines.append("")
    if report["verdict"] == "pass":
        lines.append("PASS")
    else:
        lines.append("FAIL")
        lines += [f"  - {r}" for r in report["reasons"]]
    return "\n".join(lines)


_JSON_TYPES = {"float": (int, float), "int": (int,), "str": (str,), "dict": (dict,), "bool": (bool,),
               "list[str]": (list,), "list[dict]": (list,), "list[float]": (list,)}


def check_document(document: dict, path) -> None:
    """A report read back (``oss-convert card``), held to ``Report``'s types: every typed block a
    JSON object whose fields have their types (a figure may be null: strict JSON's NaN or inf),
    every check a name, status and summary. A wrong one is an ``InputError`` naming the file."""
    from ..errors import InputError

    def fail(where: str, want: str):
        raise InputError(f"{where} must be {want}: not a report of this oss-convert", file=path)

    for block_field in fields(Report):
        block = globals().get(str(block_field.type).removesuffix(" | None"))
        value = document.get(block_field.name)
        if block is None or not hasattr(block, "__dataclass_fields__") or value is None:
            continue
        if not isinstance(value, dict):
            fail(block_field.name, "a JSON object")
        for f in fields(block):
            kind = str(f.type).removesuffix(" | None")
            got = value.get(f.name)
            if kind in _JSON_TYPES and got is not None and (
                    not isinstance(got, _JSON_TYPES[kind]) or isinstance(got, bool) != (kind == "bool")):
                fail(f"{block_field.name}.{f.name}", kind)
    if document.get("verdict") not in ("pass", "fail"):
        fail("verdict", '"pass" or "fail"')
    for key in ("reasons", "notes", "checks"):
        if not isinstance(document.get(key, []), list):
            fail(key, "a list")
    for check in document.get("checks", []):
        if not isinstance(check, dict) or not all(isinstance(check.get(k), str) for k in ("name", "status", "summary")):
            fail("each of checks", "an object with a name, a status and a summary")
    conversations = (document.get("chat_template") or {}).get("conversations", [])
    if not isinstance(conversations, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("status"), str)
            for c in conversations):
        fail("chat_template.conversations", "a list of objects with a name and a status")
