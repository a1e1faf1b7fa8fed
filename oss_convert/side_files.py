"""The side files of a Hugging Face repo that no reader of ours needs but a converter hands on:
the README's YAML front matter and the root ``config.json``, which gguf-py's ``Metadata.load``
reads for the GGUF's ``general.*`` keys (base layer).

gguf-py trusts both: malformed YAML, a ``!!python`` tag, a non-UTF-8 README, a license that is
a number or a config that is a list come out of it as tracebacks. ``check_front_matter`` and
``check_root_config`` read them first, bounded, with the types gguf-py's heuristics assume.
Imports: ``errors``, ``reading``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .reading import read_json, read_text

# Keys gguf-py's Metadata takes from the front matter, by the type it assumes
_STRING_KEYS = ("name", "author", "version", "organization", "description", "finetune", "basename", "size_label",
                "url", "doi", "uuid", "repo_url", "model_name", "model_author", "model_version",
                "model_organization", "model_description", "model_finetune", "model_basename", "model_size_label",
                "model_url", "model_doi", "model_uuid", "model_repo_url", "model_creator", "model_type", "license",
                "license_name", "license_link")
_STRING_LIST_KEYS = ("tags", "pipeline_tag", "languages", "language")
_SOURCE_LIST_KEYS = ("base_model", "base_models", "base_model_sources", "datasets", "dataset", "dataset_sources")


def front_matter_text(path: Path) -> str | None:
    """The YAML between a README's first two ``---`` lines, as gguf-py cuts it (None: none)."""
    lines = read_text(path).splitlines()
    if not lines or lines[0] != "---":
        return None
    body = []
    for line in lines[1:]:
        if line == "---":
            break
        body.append(line)
    # gguf-py's own edits (the "Norway problem", tabs) before it parses
    return ("\n".join(body) + "\n").replace("- no\n", '- "no"\n').replace("\t", "  ")


def check_front_matter(path: Path) -> None:
    """A README's front matter as gguf-py will read it: valid YAML (safe tags only), a mapping,
    and each key it uses of the type it assumes."""
    import yaml

    try:
        text = front_matter_text(path)
    except InputError as exc:
        raise InputError(f"cannot read the model card: {exc.bare_message}", file=path) from exc
    if text is None or not text.strip():
        return
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"the model card's YAML front matter is not valid: {str(exc).splitlines()[0]}",
                         file=path) from exc
    except RecursionError as exc:
        raise InputError("the model card's YAML front matter nests too deep", file=path) from exc
    if data is None:
        return
    if not isinstance(data, dict):
        raise InputError("the model card's YAML front matter is not a mapping", file=path)
    for key in _STRING_KEYS:
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise InputError(f"the model card's {key!r} must be a string, got {_short(data[key])}", file=path)
    for key in _STRING_LIST_KEYS:
        if key in data and not _strings(data[key]):
            raise InputError(f"the model card's {key!r} must be a string or a list of strings", file=path)
    for key in _SOURCE_LIST_KEYS:
        value = data.get(key)
        items = value if isinstance(value, list) else [value]
        if key in data and value is not None and not all(
                isinstance(v, str) or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
                for v in items):
            raise InputError(f"the model card's {key!r} must name models or datasets (strings, or mappings of "
                             "strings)", file=path)


def _strings(value) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _short(value) -> str:
    return repr(value)[:60]


def check_root_config(path: Path) -> None:
    """The root ``config.json`` (a transformers config), which gguf-py reads for the model's name."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise InputError("config must be a JSON object", file=path)
    if not isinstance(doc.get("_name_or_path", ""), str):
        raise InputError("config key '_name_or_path' must be a string", file=path)


def check(root: Path) -> None:
    """Both, where the repo root has them."""
    import os

    for name, checker in (("README.md", check_front_matter), ("config.json", check_root_config)):
        path = Path(root) / name
        if path.exists() or os.path.islink(path):
            checker(path)
