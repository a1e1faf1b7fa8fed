"""A Hugging Face model card made from the proof: ``oss-convert card ARTIFACT --report verify.json``.

The metadata is ``huggingface_hub``'s ``ModelCardData`` (the YAML the Hub reads: base model and
its relation, library, tags, license, pipeline); the body is what the verify report, a compare
table and the provenance manifest say, and nothing else. With no report the card says that
nothing was verified instead of showing figures.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__, formats, provenance
from ..errors import InputError
from ..formats.base import read_json_object
from ..model import ModelConfig
from ..sizes import format_size
from .compare import parameter_count
from .markdown import cell, checks_table, compare_table, metrics_table, num, table, verdict_word
from .report import SCHEMA as VERIFY_SCHEMA
from .report import check_document

LICENSE = "apache-2.0"  # gpt-oss's license, which its conversions keep
# the Hub's library_name per kind (it recognises GGUF files by themselves; Metal has no library)
LIBRARIES = {"mlx": "mlx", "hf": "transformers"}
TAGS = {"mlx": ["mlx"], "hf": ["transformers", "mxfp4"], "gguf": ["gguf", "llama.cpp"], "metal": ["metal"],
        "original": ["mxfp4"]}
RELATIONS = ("quantized", "finetune", "adapter", "merge")
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


def load_report(path: Path, schema: str | None = VERIFY_SCHEMA, keys: tuple[str, ...] = ()) -> dict:
    """A JSON report written by verify (or compare: ``schema=None``), its keys checked."""
    document = read_json_object(path, "report")
    if schema is not None and document.get("schema") != schema:
        raise InputError(f"is not a verify report (schema {document.get('schema')!r}, expected {schema!r})", file=path)
    missing = [k for k in keys if k not in document]
    if missing:
        raise InputError(f"has no {', '.join(missing)}: not a report of this oss-convert", file=path)
    if schema == VERIFY_SCHEMA:
        check_document(document, path)
    elif "rows" in keys:
        _check_compare_rows(document, path)
    return document


_COMPARE_FIGURES = ("bits_per_weight", "ppl_ratio", "kld_mean", "kld_p99", "top1_agreement")


def _check_compare_rows(document: dict, path: Path) -> None:
    """``compare --json``'s rows, as the card's table reads them (a figure may be null)."""
    rows = document["rows"]
    good = isinstance(rows, list) and all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("artifact", "kind", "verdict"))
        and isinstance(r.get("size_bytes"), int) and not isinstance(r.get("size_bytes"), bool)
        and all(r.get(k) is None or (isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool))
                for k in _COMPARE_FIGURES) for r in rows)
    if not good or not isinstance(document["thresholds"], dict):
        raise InputError("rows must be objects with artifact, kind, size_bytes and the figures of compare --json: "
                         "not a table of this oss-convert", file=path)


VERIFY_KEYS = ("verdict", "reasons", "artifact", "reference", "input", "metrics", "thresholds", "checks",
               "tokenizer", "chat_template")
COMPARE_KEYS = ("reference", "rows", "thresholds")


def model_card(artifact: Path, *, report: dict | None = None, compare: dict | None = None, base: str | None = None,
               repo: str | None = None, relation: str | None = None):
    """The ``huggingface_hub.ModelCard`` of ``artifact`` (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    artifact = Path(artifact)
    kind = formats.detect(artifact)
    if report is not None and report["artifact"]["kind"] != kind:
        raise InputError(f"the report is of a {report['artifact']['kind']} artifact, {artifact} is {kind}",
                         file=artifact)
    manifest = provenance.read_manifest(artifact)
    adapter = (manifest or {}).get("adapter_merge") or (report or {}).get("reference", {}).get("adapter")
    base = base or _repo_id((report or {}).get("reference", {}).get("source")) \
        or _repo_id((report or {}).get("reference", {}).get("path"))
    relation = relation or ("finetune" if adapter else "quantized")
    tags = ["gpt-oss", "oss-convert", *TAGS.get(kind, []), *(["lora-merge"] if adapter else [])]
    data = ModelCardData(base_model=base, base_model_relation=relation if base else None,
                         library_name=LIBRARIES.get(kind), license=LICENSE, pipeline_tag="text-generation", tags=tags)
    body = _body(artifact, kind, report, compare, manifest, adapter, base, repo)
    return ModelCard.from_template(data, template_str=TEMPLATE, body=body)


def _repo_id(name: str | None) -> str | None:
    """``openai/gpt-oss-20b`` when ``name`` is a Hub repo id rather than a local path."""
    if not name or Path(name).exists() or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


def _body(artifact, kind, report, compare, manifest, adapter, base, repo) -> str:
    title = repo.split("/")[-1] if repo else artifact.name
    of = f"[{base}](https://huggingface.co/{base})" if base else "a gpt-oss checkpoint"
    lines = [f"# {title}", "",
             f"{_KIND_NAMES.get(kind, kind)} of {of}" + (" with a LoRA adapter merged in" if adapter else "")
             + f", made{' and verified' if report is not None else ''} with oss-convert {__version__}.", ""]
    lines += _verdict(report) + _format(artifact, kind, report, manifest)
    if report is not None:
        lines += _proof(report)
    if compare is not None:
        lines += ["## Compared with other artifacts", "", *compare_table(compare), "",
                  f"Against `{cell(compare['reference'])}`; pass: KL mean <= {compare['thresholds']['max_kld']:g} "
                  f"and top-1 >= {compare['thresholds']['min_top1']:.2%}.", ""]
    lines += _provenance(manifest, adapter) + _commands(artifact, kind, manifest, report, base)
    lines += _how_to_run(kind, artifact, repo)
    return "\n".join(lines).rstrip() + "\n"


_KIND_NAMES = {"mlx": "An MLX (mlx-lm) conversion", "hf": "A Hugging Face transformers (MXFP4) conversion",
               "gguf": "A GGUF (llama.cpp) conversion", "metal": "A gpt-oss Metal (`model.bin`) conversion",
               "original": "An `original/`-layout checkpoint"}


def _verdict(report: dict | None) -> list[str]:
    if report is None:
        return ["> **Not verified.** No verify report was given when this card was written, so it states no",
                "> accuracy figures. Run `oss-convert verify` against the BF16 reference to prove it.", ""]
    m = report["metrics"]
    line = (f"**Verification: {verdict_word(report['verdict'])[2:-2]}** against the BF16 reference: KL mean "
            f"{num(m['kld_mean'], '.3e')} nats, p99 {num(m['kld_p99'], '.3e')}, top-1 agreement "
            f"{num(m['top1_agreement'], '.2%')}, perplexity ratio {num(m['ppl_ratio'], '.5f')}.")
    out = [line, ""]
    if report["verdict"] != "pass":
        out += ["It failed because:", *[f"- {cell(r)}" for r in report["reasons"]], ""]
    return out


def _format(artifact: Path, kind: str, report: dict | None, manifest: dict | None) -> list[str]:
    size = sum(o["size"] for o in manifest["outputs"].values()) if manifest else _size_on_disk(artifact)
    rows = [["format", kind], ["size", f"{format_size(size)} ({size:,} bytes)"]]
    if report is not None:
        config = ModelConfig.from_dict(report["artifact"]["config"])
        params = parameter_count(config)
        rows += [["bits per weight", f"{size * 8 / params:.2f} ({params:,} parameters)"],
                 ["layers, experts", f"{config.num_hidden_layers}, {config.num_experts} "
                                     f"({config.experts_per_token} per token)"]]
    if manifest:
        rows += [[f"option {k}", v] for k, v in manifest.get("options", {}).items() if k != "adapter"]
    return ["## Format", "", *table(["property", "value"], rows), ""]


def _size_on_disk(artifact: Path) -> int:
    return sum(p.stat().st_size for p in provenance.artifact_files(artifact).values())


def _proof(report: dict) -> list[str]:
    inp = report["input"]
    lines = ["## Verification", "",
             f"`oss-convert verify` ran this artifact and the BF16 reference on the same {inp['tokens_scored']} tokens "
             f"({inp['chunks']} chunks of {inp['ctx']}, the second half of each scored"
             + (f", from `{cell(Path(inp['file']).name)}`" if inp.get("file") else "") + ").", "",
             *metrics_table(report), "", *checks_table(report), ""]
    stops = (report.get("tokenizer") or {}).get("stop_ids")
    if stops:
        lines += [f"Stop ids a runtime stops on: {', '.join(map(str, stops))}.", ""]
    lines += _chats(report.get("chat_template") or {})
    return lines


def _chats(template: dict) -> list[str]:
    if not template.get("checked"):
        return [f"Chat template: not checked ({cell(template.get('reason', 'the artifact carries none'))}).", ""]
    rows = [[c["name"], c["status"], c.get("tokens", ""), c.get("first_difference") or ""]
            for c in template.get("conversations", [])]
    return ["### Chat template against openai-harmony", "",
            f"Each chat rendered by the artifact's template (`{cell(template.get('source', '?'))}`, sha256 "
            f"`{str(template.get('sha256', ''))[:16]}…`) and by openai-harmony, token for token.", "",
            *table(["chat", "status", "tokens", "first difference"], rows, "llrl"), ""]


def _provenance(manifest: dict | None, adapter: dict | None) -> list[str]:
    if manifest is None:
        return ["## Provenance", "", "No oss-convert manifest was found beside the artifact.", ""]
    rows = [[f"`{cell(name)}`", "source", f"{d['size']:,}", f"`{d['sha256']}`"]
            for name, d in manifest["source"]["files"].items()]
    rows += [[f"`{cell(name)}`", "artifact", f"{d['size']:,}", f"`{d['sha256']}`"]
             for name, d in manifest["outputs"].items()]
    if adapter:
        rows += [[f"`{cell(name)}`", "LoRA adapter", f"{d['size']:,}", f"`{d['sha256']}`"]
                 for name, d in (adapter.get("adapter") or adapter).get("files", {}).items()]
    return ["## Provenance", "", f"Written by {manifest['tool']['name']} {manifest['tool']['version']}; "
            "`oss-convert verify --integrity` re-hashes the files against its manifest.", "",
            *table(["file", "of", "bytes", "sha256"], rows, "llrl"), ""]


def _commands(artifact: Path, kind: str, manifest: dict | None, report: dict | None, base: str | None) -> list[str]:
    lines = []
    if manifest:
        source = base or Path(manifest["source"]["path"]).parent.name
        flags = "".join(f" --{k.replace('_', '-')} {_quoted(_local_name(k, v))}"
                        for k, v in manifest.get("options", {}).items())
        lines.append(f"oss-convert convert {source} --to {manifest['target']}{flags} -o {artifact.name}")
    if report:
        th, ref = report["thresholds"], report["reference"]
        reference = base or Path(ref.get("source") or ref["path"]).name
        adapter = f" --adapter {Path(ref['adapter'].get('path', 'ADAPTER')).name}" if ref.get("adapter") else ""
        inp = report["input"]
        text = f" --text {Path(inp['file']).name}" if inp.get("file") and not inp["file"].startswith("bundled:") else ""
        lines.append(f"oss-convert verify {artifact.name} --reference {reference}{adapter}{text} --ctx {inp['ctx']} "
                     f"--max-kld {th['max_kld']:g} --min-top1 {th['min_top1']:g} --json report.json")
    if not lines:
        return []
    return ["## How it was made", "", "```bash", *lines, "```", ""]


def _local_name(option: str, value: str) -> str:
    """A path option (the adapter, a template file) by its name: the publisher's folders are theirs."""
    return Path(value).name if option in ("adapter", "vocab") or Path(value).is_absolute() else value


def _quoted(value: str) -> str:
    return value if value and all(c.isalnum() or c in "-_./:=," for c in value) else json.dumps(value)


def _how_to_run(kind: str, artifact: Path, repo: str | None) -> list[str]:
    where = repo or str(artifact)
    runs = {
        "mlx": ["pip install mlx-lm", f'mlx_lm.generate --model {where} --prompt "Hello"'],
        "gguf": [f"llama-cli -m {artifact.name} --jinja -p \"Hello\"" if not repo else
                 f"llama-cli -hf {repo} --jinja -p \"Hello\"",
                 f"llama-server -m {artifact.name} --jinja"],
        "metal": ["# OpenAI's Metal runtime (Apple silicon): pip install \"gpt-oss[metal]\" from the gpt-oss repository",
                  f'python gpt_oss/metal/examples/generate.py {artifact.name} -p "Hello"'],
        "hf": ["# transformers", f"python -c \"from transformers import pipeline; "
                                  f"print(pipeline('text-generation', model='{where}')('Hello'))\"",
               "# vLLM", f"vllm serve {where}"],
        "original": ["# OpenAI's torch reference (pip install gpt-oss)",
                     f'python -m gpt_oss.generate --backend torch {where} -p "Hello"'],
    }
    return ["## How to run it", "", "```bash", *runs.get(kind, [f"# {kind}"]), "```", ""]
