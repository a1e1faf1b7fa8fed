"""``verify``: run an artifact against a reference and decide pass or fail."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import formats
from ..adapters import AdaptedModel, adapter_identity
from ..errors import InputError, UsageError
from ..progress import SILENT, Progress
from ..tokens.files import chat_template as folder_template
from . import ranks, template as chat_template
from . import text as textmod
from .metrics import Rows, TokenMetrics, Wanted, collect, compare_rows, distance, summarize, then
from .reference import DEFAULT_CTX, DEFAULT_TOP_K, METAL_VOCAB_ROWS, Reference, chunk_tokens, compute_reference, scored_rows
from .report import DEFAULT_MAX_KLD, DEFAULT_MIN_TOP1, build_report
from .runner import Runner, device_of, kernels_of
from .tensors import compare_models



@dataclass
class Inputs:
    """Where the evaluation tokens come from (at most one of ``text_file``/``tokens_file``)."""

    text_file: Path | None = None
    tokens_file: Path | None = None
    ctx: int = DEFAULT_CTX
    max_chunks: int | None = None
    top_k: int = DEFAULT_TOP_K
    meta: dict = field(default_factory=dict)
    device: str | None = None  # the Runner's: "cpu" (numpy + BLAS), "gpu" (MLX); None: MLX's default device decides


def prepare_tokens(inputs: Inputs, tokenizer_json: Path | None, window: int) -> tuple[np.ndarray, dict]:
    """Chunks ``[C, ctx]`` and a description of their source."""
    if inputs.ctx <= window:
        raise InputError(f"--ctx {inputs.ctx} must exceed the sliding window ({window}) or window bugs stay invisible")
    if inputs.tokens_file is not None:
        ids = textmod.read_token_ids(inputs.tokens_file)
        source = {"kind": "token_ids", "file": str(inputs.tokens_file)}
    else:
        if tokenizer_json is None:
            raise InputError("no tokenizer.json found beside the reference; pass --tokens FILE with token ids")
        if inputs.text_file is not None:
            try:
                text = Path(inputs.text_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read text: {exc}", file=inputs.text_file) from exc
            source = {"kind": "text", "file": str(inputs.text_file)}
        else:
            text = textmod.bundled_text()
            source = {"kind": "text", "file": "bundled:" + textmod.BUNDLED}
        ids = textmod.tokenize(text, tokenizer_json)
        source.update(text_sha256=textmod.sha256(text), tokenizer=str(tokenizer_json))
    chunks = chunk_tokens(ids, inputs.ctx, inputs.max_chunks)
    source.update(total_tokens=int(len(ids)))
    return chunks, source


def make_reference(src: str | Path, inputs: Inputs, progress: Progress = SILENT,
                   experts: str | None = None, cut_rows: tuple[int, ...] = (METAL_VOCAB_ROWS,),
                   adapter: str | Path | None = None) -> Reference:
    """The BF16 reference of ``src`` (any artifact; normally an ``original/`` checkpoint), with
    ``adapter`` applied exactly when given."""
    kind = formats.format_of(src)
    model = open_reference_model(src, adapter)
    try:
        return reference_of(model, src, kind.name, inputs, progress, experts, cut_rows)
    finally:
        model.close()


def open_reference_model(src: str | Path, adapter: str | Path | None):
    """The reference model: ``src`` as it is, or base + ``adapter`` in float32 (``AdaptedModel``)."""
    model = formats.open_canonical(src)
    if adapter is None:
        return model
    try:
        return AdaptedModel(model, formats.read_adapter(adapter, model.config, model.f32_rows))
    except BaseException:
        model.close()
        raise


def reference_kernels(model) -> str:
    """How the reference's experts reach the runner (``Runner``'s ``experts``): MXFP4 ones (every
    ``original/`` checkpoint) as their bytes, decoded where the products run, like an MXFP4
    artifact's; dense ones (a BF16 fine-tune) as their values. Either way the values are exact,
    so the same weights give the same logits bit for bit on each device."""
    return "quantized" if model.mxfp4(0, "mlp1") is not None else "dequantized"


def reference_of(model, src: str | Path, kind: str, inputs: Inputs, progress: Progress = SILENT,
                 experts: str | None = None, cut_rows: tuple[int, ...] = (METAL_VOCAB_ROWS,)) -> Reference:
    """The reference distribution of an opened ``model`` (read from ``src``, of format ``kind``)."""
    tokenizer = textmod.find_tokenizer(src, model)
    chunks, source = prepare_tokens(inputs, tokenizer, model.config.sliding_window)
    t0 = time.perf_counter()
    with progress.task("reference", chunks[ranks.world().share(len(chunks))].size, unit="tok") as advance:
        meta = {"source": str(src), "source_kind": kind, "input": source}
        template = folder_template(Path(tokenizer).parent) if tokenizer is not None else None
        if template is not None:  # a verify against the cache compares templates with it, wherever it runs
            meta["chat_template"] = {"source": template[0], "text": template[1]}
        if isinstance(model, AdaptedModel):
            meta["adapter"] = adapter_identity(model.adapter)
        runner = Runner(model, experts or reference_kernels(model), device=inputs.device)
        meta["kernels"] = runner.kernels
        ref = compute_reference(runner, chunks, top_k=inputs.top_k, cut_rows=cut_rows, progress=advance, meta=meta)
    ref.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return ref


def score(artifact_model, ref: Reference, progress: Progress = SILENT,
          experts: str = "quantized", device: str | None = None) -> tuple[dict, TokenMetrics]:
    """Run the artifact on the reference's tokens; summary numbers and per-token metrics."""
    runner = Runner(artifact_model, experts, device=device)
    if int(ref.tokens.max()) >= runner.vocab_rows:
        raise InputError(f"the evaluation tokens use ids up to {int(ref.tokens.max())} but the artifact has "
                         f"only {runner.vocab_rows} vocabulary rows")
    shared = min(runner.vocab_rows, ref.vocab_size)
    top_lp, lse, tgt_lp = ref.over_rows(shared)
    targets = ref.targets
    world = ranks.world()
    rows = scored_rows(ref.ctx)
    per_chunk = len(range(ref.ctx)[rows])
    with world.checked():  # this rank's share of the chunks (all of them without mlx.launch)
        mine = world.share(ref.tokens.shape[0])
        s = slice(mine.start * per_chunk, mine.stop * per_chunk)  # this share's rows of the reference's flat arrays
        # the reference's own cuts: a GPU then sums the same pieces of each row as it did, so the
        # same logits give the same logsumexp to the bit (a lossless artifact scores KL 0)
        cuts = tuple(c for c in ref.cut_logsumexp if c < shared)
        want = Wanted(targets=targets[s], pick=ref.top_ids[s], vocab=shared, cuts=cuts)
        at = s.start

        def compare(piece: Rows) -> TokenMetrics:
            """One piece's metrics: ``at`` walks the reference's flat arrays in chunk order."""
            nonlocal at
            r, at = slice(at, at + len(piece.lse)), at + len(piece.lse)
            return compare_rows(piece, shared, top_lp[r], lse[r], tgt_lp[r])

        with progress.task("artifact", ref.tokens[mine].size, unit="tok") as advance:
            parts = collect(then(runner.iter_rows(ref.tokens[mine], rows, advance, want), compare))
    local = TokenMetrics.concat(parts)
    metrics = TokenMetrics(**world.gather_rows(vars(local)))  # every rank's, in chunk order
    return summarize(metrics), metrics


def kernel_block(artifact_model, ref: Reference, kernels: str) -> dict:
    """Which arithmetic each side ran (``kernels``: the artifact's runner's), and where they differ
    (a cache made on another device, say), how far apart the two are on identical weights: the
    artifact's first chunk run by both, its KL and logit differences are the noise floor under
    which the verify's figures say nothing. A reference's kernels on a GPU this machine lacks run
    on MLX's device here, which the block says."""
    recorded = ref.meta.get("kernels")
    block = {"reference": recorded, "artifact": kernels, "same": recorded == kernels}
    if block["same"]:
        block["note"] = "the same arithmetic on the same decoded weights: a lossless artifact scores KL 0 exactly"
        return block
    if recorded is None:
        block["note"] = "the reference cache does not say which kernels made it (an older oss-convert): noise floor not measured"
        return block
    theirs = kernels_of(device_of(recorded))
    chunk, rows = ref.tokens[:1], scored_rows(ref.ctx)
    here = next(Runner(artifact_model, device=device_of(kernels)).iter_logits(chunk, rows))
    there = next(Runner(artifact_model, device=device_of(recorded)).iter_logits(chunk, rows))
    block.update({f"noise_{k}": v for k, v in distance(there, here).items()})
    block["note"] = (f"noise floor: the artifact's first chunk run by {theirs} and by {kernels}" +
                     ("" if theirs == recorded else f" ({recorded} is not on this machine)"))
    return block


def verify(artifact: str | Path, reference: str | Path, inputs: Inputs, *, max_kld: float = DEFAULT_MAX_KLD,
           min_top1: float = DEFAULT_MIN_TOP1, check_tensors: bool = True, strict_chat_template: bool = False,
           progress: Progress = SILENT, adapter: str | Path | None = None) -> dict:
    """The full report (see ``report.py``) for ``artifact`` against a checkpoint or a ``.npz`` cache;
    with ``adapter``, against the checkpoint with the adapter applied exactly (a merged artifact's
    KL is then what its storage lost). Each input is recognised and opened once."""
    t0 = time.perf_counter()
    if adapter is not None and is_cache(reference):
        raise UsageError("--adapter applies to a checkpoint reference; a reference cache made with "
                         "`reference BASE --adapter ADAPTER` already holds it")
    artifact_format = formats.format_of(artifact)
    art = formats.open_canonical(artifact)
    ref_model = None
    try:
        if is_cache(reference):
            ref = Reference.load(reference)
        else:
            reference_format = formats.format_of(reference)
            ref_model = open_reference_model(reference, adapter)
            ref = reference_of(ref_model, reference, reference_format.name, inputs, progress,
                               cut_rows=(METAL_VOCAB_ROWS, art.config.vocab_size))
        t_ref = time.perf_counter()
        summary, metrics = score(art, ref, progress, device=inputs.device)
        t_art = time.perf_counter()
        leader = ranks.world().leader  # the checks that read whole files run once, where the report is written
        tensors = compare_models(ref_model, art) if ref_model is not None and check_tensors and leader else None
        ref_json = _reference_tokenizer(ref)
        kernels = kernel_block(art, ref, Runner(art, device=inputs.device).kernels) if leader else None
        if leader:
            tokenizer = _check_tokenizer(art, textmod.find_tokenizer(artifact, art), ref_json, ref)
            template = chat_template.check(art, _reference_template(ref, ref_json), strict=strict_chat_template)
        else:
            tokenizer = template = {"checked": False, "reason": "checked on rank 0"}
        timings = {"reference_s": round(t_ref - t0, 3) if ref_model is not None else 0.0,
                   "artifact_s": round(t_art - t_ref, 3), "tensors_s": round(time.perf_counter() - t_art, 3),
                   "total_s": round(time.perf_counter() - t0, 3), "ranks": ranks.world().size,
                   "exchange_s": round(ranks.world().seconds, 3)}
        return build_report(
            artifact=str(artifact), artifact_kind=artifact_format.name, artifact_config=art.config.to_dict(),
            reference=ref, reference_path=str(reference), summary=summary, tensors=tensors, tokenizer=tokenizer,
            chat_template=template, kernels=kernels, kld_by_position=kld_by_position(metrics.kld, ref.ctx),
            thresholds={"max_kld": max_kld, "min_top1": min_top1}, timings=timings)
    finally:
        art.close()
        if ref_model is not None:
            ref_model.close()


def kld_by_position(kld: np.ndarray, ctx: int) -> np.ndarray:
    """Mean KL at each scored position of a chunk (``ctx//2+1 .. ctx-1``), over the chunks."""
    return kld.reshape(-1, ctx - 1 - ctx // 2).mean(axis=0)


def is_cache(reference: str | Path) -> bool:
    p = Path(reference)
    return p.is_file() and p.suffix == ".npz"


def _check_tokenizer(model, found: Path | None, ref_json: Path | None, ref: Reference) -> dict:
    """What the artifact embeds (every id's bytes, the specials, BOS/EOS/pad, the stop ids)
    against the reference repo's ``ref_json``, and its tokenizer's ids (``found``, its
    tokenizer.json) for the reference's text."""
    from . import vocabulary

    result: dict = {"checked": False}
    source = ref.meta.get("input", {})
    embedded = model.embedded()
    if ref_json is None or embedded is None or embedded.vocabulary is None:
        result["reason"] = ("no tokenizer.json beside the reference" if ref_json is None
                            else "the artifact carries no tokenizer")
    else:
        art_vocab = embedded.vocabulary
        problems = vocabulary.compare(vocabulary.of_reference(ref_json), art_vocab,
                                      min(model.config.vocab_size, ref.vocab_size))
        stop_problems, stop_notes = vocabulary.stop_problems(embedded)
        result.update(checked=True, vocabulary=art_vocab.file, reference_tokenizer=str(ref_json),
                      same_vocabulary=not problems, vocabulary_problems=problems,
                      stop_ids=vocabulary.stop_ids(embedded), stop_problems=stop_problems,
                      stop_notes=stop_notes)
    text = _same_ids(found, source, ref)
    result.update(text)
    if "same_ids" in text:
        result["checked"] = True
    result.setdefault("same_ids", None)
    return result


def _reference_template(ref: Reference, ref_json: Path | None) -> tuple[str, str] | None:
    """The reference's chat template (where from, text): beside its tokenizer, else as its cache
    recorded it."""
    found = folder_template(ref_json.parent) if ref_json is not None else None
    if found is None and ref.meta.get("chat_template") is not None:
        recorded = ref.meta["chat_template"]
        found = (f"{recorded['source']} (as recorded in the reference cache)", recorded["text"])
    return found


def _reference_tokenizer(ref: Reference) -> Path | None:
    recorded = ref.meta.get("input", {}).get("tokenizer")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    source = ref.meta.get("source")
    return textmod.find_tokenizer(source) if source and Path(source).exists() else None


def _same_ids(found: Path | None, source: dict, ref: Reference) -> dict:
    """Does the artifact's own tokenizer.json give the reference's token ids for the same text?"""
    if found is None or source.get("kind") != "text":
        return {}
    if Path(found).resolve() == Path(source.get("tokenizer", "")).resolve():
        return {}  # the artifact shares the reference's tokenizer.json
    file = source.get("file", "")
    text = textmod.bundled_text() if file.startswith("bundled:") else Path(file).read_text(encoding="utf-8")
    if textmod.sha256(text) != source.get("text_sha256"):
        return {"text_note": "the reference's text file changed since the reference was made"}
    ids = textmod.tokenize(text, found)
    want = ref.tokens.reshape(-1)
    same = len(ids) >= len(want) and np.array_equal(ids[: len(want)], want)
    result = {"tokenizer": str(found), "same_ids": bool(same)}
    if not same:
        n = min(len(ids), len(want))
        mismatch = np.nonzero(ids[:n] != want[:n])[0]
        result["first_mismatch"] = int(mismatch[0]) if len(mismatch) else n
    return result
