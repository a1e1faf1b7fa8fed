"""The hostile corpus: crafted inputs derived from valid artifacts, as a stranger's download could
be, each with the command that reads it and what the command must do.

Each ``Case`` copies the valid artifacts it names (``uses``) into a folder of its own, breaks them
(``edit``) and runs ``args`` there. The classes are the issue's: structure, sizes, values,
placement, templates, file system, side files, output placement, terminal, odd ends. What every
case must do is checked in ``tests/promises/test_hostile_inputs.py``: the exit code asked (2: a bad
input; 1: a verification that ran and failed), one line on stderr naming ``names`` (the file, and
the tensor or key), no traceback, bounded time and memory, the inputs unchanged and nothing
created outside the output.

Placeholders in ``args``: ``{repo}`` (an original/ checkpoint with its tokenizer files), ``{gguf}``,
``{mlx}``, ``{hf}`` (transformers' root layout), ``{ref}`` (a reference .npz), ``{report}`` (a
verify report), ``{metal}`` (a full-vocabulary model.bin), ``{out}`` (where an output may go).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BASES = ("repo", "gguf", "mlx", "hf", "ref", "report", "metal")
BASE_NAMES = {"repo": "repo", "gguf": "model.gguf", "mlx": "mlx", "hf": "hf", "ref": "ref.npz",
              "report": "report.json", "metal": "metal/model.bin"}


@dataclass(frozen=True)
class Case:
    name: str  # "class/format/what"
    args: tuple[str, ...]
    edit: Callable[[Path], None]
    names: tuple[str, ...]  # what the one-line message must contain (a file's name, a key, a rule)
    exits: tuple[int, ...] = (2,)
    seconds: int = 30
    memory: int = 1 << 30  # peak resident bytes allowed (the process starts near 0.2 GiB)
    bases: tuple[str, ...] = ()  # artifacts copied in that ``args`` does not name

    @property
    def klass(self) -> str:
        return self.name.split("/")[0]

    def uses(self) -> list[str]:
        return [b for b in BASES if "{" + b + "}" in " ".join(self.args) or b in self.bases]

    def command(self, work: Path) -> list[str]:
        places = {b: str(work / BASE_NAMES[b]) for b in BASES} | {"out": str(work / "out")}
        return [a.format(**places) for a in self.args]


# --------------------------------------------------------------------------------------
# Editing helpers


def json_edit(rel: str, change: Callable[[object], object], replace: bool = False) -> Callable[[Path], None]:
    """Load ``rel`` (a JSON file), let ``change`` edit it in place (or, with ``replace``, return
    the document to write instead), write it."""
    def edit(work: Path) -> None:
        path = work / rel
        doc = json.loads(path.read_text(encoding="utf-8"))
        new = change(doc)
        path.write_text(json.dumps(new if replace else doc, ensure_ascii=False), encoding="utf-8")
    return edit


def set_key(rel: str, dotted: str, value) -> Callable[[Path], None]:
    def change(doc):
        *parents, last = dotted.split(".")
        for p in parents:
            doc = doc[int(p)] if isinstance(doc, list) else doc[p]
        doc[last] = value
    return json_edit(rel, change)


def drop_key(rel: str, dotted: str) -> Callable[[Path], None]:
    def change(doc):
        *parents, last = dotted.split(".")
        for p in parents:
            doc = doc[int(p)] if isinstance(doc, list) else doc[p]
        del doc[last]
    return json_edit(rel, change)


def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return edit


def sparse(rel: str, size: int) -> Callable[[Path], None]:
    """``rel`` grown to ``size`` bytes (sparse: costs no disk)."""
    def edit(work: Path) -> None:
        with open(work / rel, "r+b") as fh:
            fh.truncate(size)
    return edit


def fifo(rel: str) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        os.mkfifo(path)
    return edit


def symlink_loop(rel: str) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.name + ".b", path)
        os.symlink(path.name, path.with_name(path.name + ".b"))
    return edit


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        for e in edits:
            e(work)
    return edit


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------------------
# GGUF: the key-value section rewritten (the tensor infos and data kept, re-aligned)

STRING, ARRAY, UINT32, INT32, FLOAT32, BOOL, UINT64 = 8, 9, 4, 5, 6, 7, 10
_SCALAR = {UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?", UINT64: "<Q"}


def _gguf_string(s: bytes | str) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype: int, value, item_type: int | None = None) -> bytes:
    if vtype == STRING:
        return struct.pack("<I", STRING) + _gguf_string(value)
    if vtype == ARRAY:
        body = b"".join(_gguf_string(v) if item_type == STRING else struct.pack(_SCALAR[item_type], v) for v in value)
        return struct.pack("<IIQ", ARRAY, item_type, len(value)) + body
    return struct.pack("<I", vtype) + struct.pack(_SCALAR[vtype], value)


def gguf_rewrite(rel: str, changes: dict[str, bytes | None], tensor_count: int | None = None,
                 kv_count: int | None = None) -> Callable[[Path], None]:
    """Replace (or, with None, drop; or add) key-value pairs, given as ``gguf_value`` bytes;
    ``tensor_count``/``kv_count`` override the header's counts."""
    def edit(work: Path) -> None:
        import gguf
        import numpy as np

        path = work / rel
        reader = gguf.GGUFReader(path)
        raw = path.read_bytes()
        kvs = []
        seen = set()
        for name, f in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            seen.add(name)
            if name in changes:
                if changes[name] is not None:
                    kvs.append(_gguf_string(name) + changes[name])
                continue
            kvs.append(b"".join(np.asarray(p).tobytes() for p in f.parts))
        kvs += [_gguf_string(k) + v for k, v in changes.items() if k not in seen and v is not None]
        infos = b"".join(b"".join(np.asarray(p).tobytes() for p in t.field.parts) for t in reader.tensors)
        head = struct.pack("<4sIQQ", b"GGUF", 3, len(reader.tensors) if tensor_count is None else tensor_count,
                           len(kvs) if kv_count is None else kv_count)
        body = head + b"".join(kvs) + infos
        body += b"\0" * (-len(body) % reader.alignment)
        path.write_bytes(body + raw[reader.data_offset:])
    return edit


def gguf_kv(key: str, vtype: int, value, item_type: int | None = None) -> Callable[[Path], None]:
    return gguf_rewrite("model.gguf", {key: gguf_value(vtype, value, item_type)})


def gguf_tokens(edit_list: Callable[[list], list], key="tokenizer.ggml.tokens", item=STRING):
    def edit(work: Path) -> None:
        import gguf

        reader = gguf.GGUFReader(work / "model.gguf")
        f = reader.fields[key]
        values = [bytes(f.parts[i]).decode("utf-8") if item == STRING else int(f.parts[i][0]) for i in f.data]
        gguf_rewrite("model.gguf", {key: gguf_value(ARRAY, edit_list(values), item)})(work)
    return edit


# --------------------------------------------------------------------------------------
# The reference .npz and the report


def npz_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        import numpy as np

        path = work / "ref.npz"
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        change(arrays)
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    return edit


def npz_bomb(work: Path) -> None:
    """A member that inflates to 6 GiB of zeros (deflated: a few MB)."""
    path = work / "ref.npz"
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("bomb.npy", "w", force_zip64=True) as fh:
            header = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
            descr = "{'descr': '<f4', 'fortran_order': False, 'shape': (1610612736,), }".ljust(117) + "\n"
            fh.write(header + descr.encode())
            block = bytes(64 << 20)
            for _ in range(96):
                fh.write(block)


# --------------------------------------------------------------------------------------
# Templates that cost: each must be a failed template check (exit 1), in bounded time and memory

EXPENSIVE_TEMPLATES = {
    "nested-loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "lipsum": "{{ lipsum(n=100000000) }}",
    "power": "{{ (10 ** 100000) ** (10 ** 100000) }}",
    "string-repetition": "{{ 'x' * 10000000000 }}",
    "recursive-macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "output-flood": "{% for a in range(10000000000) %}{{ 'x' * 1000 }}{% endfor %}",
    "doubling": "{% set s = namespace(x='x') %}{% for i in range(64) %}{% set s.x = s.x ~ s.x %}{% endfor %}{{ s.x }}",
    "big-range-list": "{{ range(10000000000) | list | length }}",
}


# The renderer's child may use its whole 1 GiB address space (tokens.bounded.MEMORY); the peak
# measured is that of the largest process, so these cases allow it with room
RENDER_MEMORY = 5 << 28


def _template_cases() -> list[Case]:
    out = []
    for what, text in EXPENSIVE_TEMPLATES.items():
        out.append(Case(f"templates/mlx/{what}", ("verify", "{mlx}", "--reference", "{ref}", "--quiet", "--no-tensors"),
                        write("mlx/chat_template.jinja", text), ("chat_template.jinja",), exits=(1,),
                        memory=RENDER_MEMORY))
    out.append(Case("templates/gguf/power", ("verify", "{gguf}", "--reference", "{ref}", "--quiet"),
                    gguf_kv("tokenizer.chat_template", STRING, EXPENSIVE_TEMPLATES["power"]), ("model.gguf",),
                    exits=(1,), memory=RENDER_MEMORY))
    out.append(Case("templates/gguf/lipsum", ("verify", "{gguf}", "--reference", "{ref}", "--quiet"),
                    gguf_kv("tokenizer.chat_template", STRING, EXPENSIVE_TEMPLATES["lipsum"]), ("model.gguf",),
                    exits=(1,), memory=RENDER_MEMORY))
    out.append(Case("templates/repo/recursive-macro", ("convert", "{repo}", "--to", "gguf", "-o", "{out}", "--quiet",
                                                        "--chat-template", "keep"),
                    write("repo/chat_template.jinja", EXPENSIVE_TEMPLATES["recursive-macro"]), (),
                    exits=(0,)))
    return out


# --------------------------------------------------------------------------------------
# The cases

INSPECT = {b: ("inspect", "{" + b + "}") for b in ("repo", "gguf", "mlx", "hf")}
TO_GGUF = ("convert", "{repo}", "--to", "gguf", "-o", "{out}", "--quiet")
TO_MLX = ("convert", "{repo}", "--to", "mlx", "-o", "{out}", "--quiet")
VERIFY_MLX = ("verify", "{mlx}", "--reference", "{ref}", "--quiet", "--no-tensors")
VERIFY_GGUF = ("verify", "{gguf}", "--reference", "{ref}", "--quiet")
VERIFY_HF = ("verify", "{hf}", "--reference", "{ref}", "--quiet", "--no-tensors")
REFERENCE = ("reference", "{repo}", "-o", "{out}.npz", "--quiet", "--chunks", "1")
COMPARE = ("compare", "{mlx}", "{gguf}", "--reference", "{ref}", "--quiet")
CARD = ("card", "{mlx}", "--report", "{report}")

CONFIG = "repo/original/config.json"
TOKENIZER = "repo/tokenizer.json"


def structure_cases() -> list[Case]:
    c = []
    for what, edit in {
        "list": json_edit(CONFIG, lambda d: [d], replace=True),
        "string-count": set_key(CONFIG, "num_hidden_layers", "4"),
        "float-count": set_key(CONFIG, "num_hidden_layers", 4.0),
        "bool-count": set_key(CONFIG, "num_experts", True),
        "missing-key": drop_key(CONFIG, "num_experts"),
        "nested": write(CONFIG, nested(100000)),
        "not-utf8": write(CONFIG, b'{"num_hidden_layers": "\xff\xfe"}'),
        "empty": write(CONFIG, b""),
    }.items():
        c.append(Case(f"structure/original-config/{what}", INSPECT["repo"], edit, ("config.json",)))
        c.append(Case(f"structure/original-config/{what}/convert", TO_GGUF, edit, ("config.json",)))
    for what, edit in {
        "weight-map-list": set_key("repo/original/model.safetensors.index.json", "weight_map", []),
        "weight-map-int": json_edit("repo/original/model.safetensors.index.json",
                                    lambda d: d["weight_map"].update({k: 7 for k in d["weight_map"]})),
        "index-nested": write("repo/original/model.safetensors.index.json", nested(50000)),
        "dtypes-list": write("repo/original/dtypes.json", "[1, 2]"),
        "dtypes-int-values": json_edit("repo/original/dtypes.json", lambda d: {k: 3 for k in d}, replace=True),
    }.items():
        # gpt-oss's reference (and so our reader) globs original/*.safetensors and reads neither file:
        # a broken one costs nothing, and a conversion writes its own
        c.append(Case(f"structure/original-index/{what}", TO_GGUF, edit, (), exits=(0,)))
    tok = {
        "added-without-id": json_edit(TOKENIZER, lambda d: d["added_tokens"][0].pop("id")),
        "added-mapping": set_key(TOKENIZER, "added_tokens", {"a": 1}),
        "vocab-list": set_key(TOKENIZER, "model.vocab", ["a", "b"]),
        "id-string": json_edit(TOKENIZER, lambda d: d["model"]["vocab"].update({"!": "0"})),
        "model-string": set_key(TOKENIZER, "model", "BPE"),
        "merges-mapping": set_key(TOKENIZER, "model.merges", {"a": "b"}),
        "merges-ints": set_key(TOKENIZER, "model.merges", [1, 2, 3]),
        "nested": write(TOKENIZER, nested(100000)),
        "not-utf8": write(TOKENIZER, b"\xff" * 100),
        "content-int": json_edit(TOKENIZER, lambda d: d["added_tokens"][0].update({"content": 5})),
    }
    for what, edit in tok.items():
        c.append(Case(f"structure/tokenizer/{what}", TO_GGUF, edit, ("tokenizer.json",)))
        c.append(Case(f"structure/tokenizer/{what}/reference", REFERENCE, edit, ("tokenizer.json",)))
    for what, edit in {
        "tokenizer-config-list": write("repo/tokenizer_config.json", "[]"),
        "tokenizer-config-template-int": set_key("repo/tokenizer_config.json", "chat_template", 5),
        "tokenizer-config-eos-int": set_key("repo/tokenizer_config.json", "eos_token", 5),
        "tokenizer-config-eos-list": set_key("repo/tokenizer_config.json", "eos_token", ["<|return|>"]),
        "generation-config-list": write("repo/generation_config.json", "[1]"),
        "generation-config-eos-string": set_key("repo/generation_config.json", "eos_token_id", "x"),
        "special-tokens-map-list": write("repo/special_tokens_map.json", "[1]"),
    }.items():
        file = "special_tokens_map.json" if what.startswith("special") else what.split("-config")[0] + "_config.json"
        c.append(Case(f"structure/side-files/{what}", TO_GGUF, edit, (file,)))
        c.append(Case(f"structure/side-files/{what}/mlx", TO_MLX, edit, (file,)))
    for what, edit in {
        "config-list": write("mlx/config.json", "[]"),
        "quantization-string": set_key("mlx/config.json", "quantization", "mxfp4"),
        "layer-types-mapping": set_key("mlx/config.json", "layer_types", {"a": 1}),
        "rope-scaling-list": set_key("mlx/config.json", "rope_scaling", [32]),
    }.items():
        c.append(Case(f"structure/mlx-config/{what}", INSPECT["mlx"], edit, ("config.json",)))
        c.append(Case(f"structure/mlx-config/{what}/verify", VERIFY_MLX, edit, ("config.json",)))
    # mlx-lm loads these: the block's group_size serves only modules it would quantize by default (none
    # here: each module's tensors say), generation_config.json's eos_token_id overrides config.json's
    c.append(Case("structure/mlx-config/group-size-string", VERIFY_MLX, json_edit("mlx/config.json", lambda d: (
        d["quantization"].update(group_size="32"), d["quantization_config"].update(group_size="32"))), (), exits=(0,)))
    c.append(Case("structure/mlx-config/eos-string", VERIFY_MLX, set_key("mlx/config.json", "eos_token_id", "x"), (),
                  exits=(0,)))
    for what, edit in {
        "config-list": write("hf/config.json", "[]"),
        "rope-scaling-string": set_key("hf/config.json", "rope_scaling", "yarn"),
        "index-weight-map-list": set_key("hf/model.safetensors.index.json", "weight_map", ["x"]),
    }.items():
        c.append(Case(f"structure/hf/{what}", INSPECT["hf"], edit, ("hf/",)))
    for what, edit in {
        "not-a-zip": write("ref.npz", b"PK\x03\x04 not a zip at all"),
        "truncated": lambda w: (w / "ref.npz").write_bytes((w / "ref.npz").read_bytes()[:5000]),
        "missing-array": npz_edit(lambda a: a.pop(sorted(a)[0])),
        "text": write("ref.npz", "hello"),
        "pickled-object": npz_edit(lambda a: a.update({k: a[k].astype(object) for k in list(a)[:1]})),
    }.items():
        c.append(Case(f"structure/reference/{what}", VERIFY_MLX, edit, ("ref.npz",)))
    for what, edit in {
        "list": write("report.json", "[]"),
        "nested": write("report.json", nested(100000)),
        "wrong-type": set_key("report.json", "verdict", 5),
    }.items():
        c.append(Case(f"structure/report/{what}", CARD, edit, ("report.json",)))
    for what, edit in {
        "manifest-list": write("mlx/oss-convert-manifest.json", "[]"),
        "manifest-outputs-list": set_key("mlx/oss-convert-manifest.json", "outputs", []),
    }.items():
        c.append(Case(f"structure/manifest/{what}", ("verify", "{mlx}", "--integrity"), edit,
                      ("oss-convert-manifest.json",)))
    c.append(Case("structure/gguf/block-count-string", INSPECT["gguf"], gguf_kv("gpt-oss.block_count", STRING, "4"),
                  ("model.gguf", "gpt-oss.block_count")))
    c.append(Case("structure/gguf/tokens-ints", VERIFY_GGUF,
                  gguf_rewrite("model.gguf", {"tokenizer.ggml.tokens": gguf_value(ARRAY, list(range(1024)), INT32)}),
                  ("model.gguf", "tokenizer.ggml.tokens")))
    c.append(Case("structure/gguf/template-array", VERIFY_GGUF,
                  gguf_kv("tokenizer.chat_template", ARRAY, ["a", "b"], STRING),
                  ("model.gguf", "tokenizer.chat_template")))
    c.append(Case("structure/gguf/name-not-utf8", INSPECT["gguf"], gguf_kv("general.name", STRING, b"\xff\xfe"),
                  ("model.gguf",), exits=(0, 2)))
    return c


def size_cases() -> list[Case]:
    c = [
        Case("sizes/original-config/billion-layers", INSPECT["repo"], set_key(CONFIG, "num_hidden_layers", 10**9),
             ("config.json", "num_hidden_layers")),
        Case("sizes/original-config/billion-experts", TO_GGUF, set_key(CONFIG, "num_experts", 10**9),
             ("config.json", "num_experts")),
        Case("sizes/original-config/huge-vocab", INSPECT["repo"], set_key(CONFIG, "vocab_size", 10**12),
             ("config.json", "vocab_size")),
        Case("sizes/original-config/1GB", INSPECT["repo"], sparse(CONFIG, 1 << 30), ("config.json",)),
        Case("sizes/tokenizer/1GB", TO_GGUF, sparse(TOKENIZER, 1 << 30), ("tokenizer.json",)),
        Case("sizes/tokenizer/3M-tokens", TO_GGUF,
             json_edit(TOKENIZER, lambda d: d["model"]["vocab"].update({f"t{i}": 5000 + i for i in range(3_000_000)})),
             ("tokenizer.json",), seconds=60, memory=3 << 30),
        Case("sizes/tokenizer/3M-added", TO_GGUF,
             json_edit(TOKENIZER, lambda d: d["added_tokens"].extend(
                 {"id": 5000 + i, "content": f"<{i}>"} for i in range(1_000_000))),
             ("tokenizer.json",), seconds=60, memory=3 << 30),
        Case("sizes/template/20MB", VERIFY_MLX, write("mlx/chat_template.jinja", "x" * (20 << 20)),
             ("chat_template.jinja",)),
        Case("sizes/mlx-config/1GB", INSPECT["mlx"], sparse("mlx/config.json", 1 << 30), ("config.json",)),
        Case("sizes/mlx-config/billion-layers", VERIFY_MLX, set_key("mlx/config.json", "num_hidden_layers", 10**9),
             ("config.json", "num_hidden_layers")),
        Case("sizes/gguf/million-tensors", INSPECT["gguf"], gguf_rewrite("model.gguf", {}, tensor_count=10**7),
             ("model.gguf",)),
        Case("sizes/gguf/2^63-kvs", INSPECT["gguf"], gguf_rewrite("model.gguf", {}, kv_count=1 << 63),
             ("model.gguf",)),
        Case("sizes/gguf/billion-token-array", INSPECT["gguf"],
             gguf_rewrite("model.gguf", {"tokenizer.ggml.tokens": struct.pack("<IIQ", ARRAY, STRING, 10**9)}),
             ("model.gguf",)),
        Case("sizes/gguf/million-empty-strings", VERIFY_GGUF,
             gguf_rewrite("model.gguf", {"tokenizer.ggml.tokens": gguf_value(ARRAY, [""] * 1_000_000, STRING)}),
             ("model.gguf", "tokenizer.ggml.tokens"), seconds=30),
        Case("sizes/gguf/string-length-2^62", INSPECT["gguf"],
             gguf_rewrite("model.gguf", {"general.name": struct.pack("<IQ", STRING, 1 << 62)}), ("model.gguf",)),
        Case("sizes/gguf/split-99999", ("inspect", "model-00001-of-99999.gguf"),
             lambda w: os.link(w / "model.gguf", w / "model-00001-of-99999.gguf"), ("99999",), bases=("gguf",)),
        Case("sizes/gguf/split-missing-many", ("inspect", "model-00001-of-00900.gguf"),
             lambda w: os.link(w / "model.gguf", w / "model-00001-of-00900.gguf"), ("899 of its 900",),
             bases=("gguf",)),
        Case("sizes/reference/inflates-6GiB", VERIFY_MLX, npz_bomb, ("ref.npz",), seconds=60),
        Case("sizes/original-index/million-entries", INSPECT["repo"],
             json_edit("repo/original/model.safetensors.index.json",
                       lambda d: d["weight_map"].update({f"x{i}": "model--00001-of-00002.safetensors"
                                                         for i in range(1_000_000)})),
             (), exits=(0,)),
    ]
    return c


def value_cases() -> list[Case]:
    c = []
    for key, value in {"rope_theta": 1, "initial_context_length": 0, "rope_ntk_beta": 0, "num_attention_heads": 0,
                       "sliding_window": -1, "experts_per_token": 0, "num_key_value_heads": 3,
                       "head_dim": 0, "hidden_size": -5, "rope_scaling_factor": 0.5}.items():
        c.append(Case(f"values/original-config/{key}", TO_GGUF, set_key(CONFIG, key, value), ("config.json", key)))
    for key, value in {"rope_theta": 1, "num_attention_heads": 0, "num_experts_per_tok": 0, "sliding_window": -1,
                       "rms_norm_eps": -1.0, "head_dim": 0, "num_local_experts": 0, "num_hidden_layers": 2.0,
                       "vocab_size": "1024"}.items():
        c.append(Case(f"values/mlx-config/{key}", VERIFY_MLX, set_key("mlx/config.json", key, value),
                      ("config.json", key)))
        c.append(Case(f"values/hf-config/{key}", VERIFY_HF, set_key("hf/config.json", key, value),
                      ("config.json", key)))
    c.append(Case("values/mlx-config/yarn-beta-0", VERIFY_MLX, set_key("mlx/config.json", "rope_scaling.beta_fast", 0),
                  ("config.json", "beta_fast")))
    for key, vtype, value in [("gpt-oss.block_count", UINT32, 0), ("gpt-oss.attention.head_count", UINT32, 0),
                              ("gpt-oss.expert_used_count", UINT32, 0), ("gpt-oss.expert_used_count", UINT32, 2**32 - 1),
                              ("gpt-oss.rope.freq_base", FLOAT32, 1.0), ("gpt-oss.rope.freq_base", FLOAT32, float("nan")),
                              ("gpt-oss.context_length", UINT32, 0), ("gpt-oss.embedding_length", UINT32, 161),
                              ("gpt-oss.attention.sliding_window", UINT32, 0),
                              ("gpt-oss.rope.scaling.yarn_beta_fast", FLOAT32, 0.0),
                              ("gpt-oss.attention.layer_norm_rms_epsilon", FLOAT32, float("inf")),
                              ("gpt-oss.expert_count", UINT32, 7)]:
        names = ("model.gguf", "ffn_gate_inp") if key.endswith("expert_count") else ("model.gguf", key)
        c.append(Case(f"values/gguf/{key.split('.', 1)[1]}={value}", VERIFY_GGUF, gguf_kv(key, vtype, value), names))
    c.append(Case("values/gguf/inspect-json-nan", ("inspect", "--json", "{gguf}"),
                  gguf_kv("gpt-oss.rope.freq_base", FLOAT32, float("nan")), ("model.gguf",), exits=(2,)))
    c.append(Case("values/gguf/bos-out-of-vocab", VERIFY_GGUF, gguf_kv("tokenizer.ggml.bos_token_id", UINT32, 10**6),
                  ("model.gguf", "bos")))
    return c


def metal_poke(field: int, fmt: str, value) -> Callable[[Path], None]:
    """One field of the model header (``MetalHeader``'s order) rewritten in place."""
    def edit(work: Path) -> None:
        with open(work / "metal" / "model.bin", "r+b") as fh:
            fh.seek(32 + 4 * field)
            fh.write(struct.pack("<" + fmt, value))
    return edit


def metal_cases() -> list[Case]:
    inspect = ("inspect", "{metal}")
    return [Case(f"values/metal/{what}", inspect, metal_poke(field, fmt, value), ("model.bin", key))
            for what, field, fmt, value, key in [
                ("no-active-experts", 3, "I", 0, "experts_per_token"),
                ("2^32-1-active-experts", 3, "I", 2**32 - 1, "experts_per_token"),
                ("no-window", 10, "I", 0, "sliding_window"),
                ("eps-nan", 16, "f", float("nan"), "rmsnorm_epsilon"),
                ("theta-1", 11, "f", 1.0, "rope_theta"),
                ("billion-blocks", 1, "I", 10**9, "truncated"),
            ]]


def placement_cases() -> list[Case]:
    return [
        Case("placement/gguf/token-types-strings", VERIFY_GGUF,
             gguf_rewrite("model.gguf", {"tokenizer.ggml.token_type": gguf_value(ARRAY, ["1"] * 1024, STRING)}),
             ("model.gguf", "tokenizer.ggml.token_type")),
        Case("placement/gguf/token-types-short", VERIFY_GGUF,
             gguf_rewrite("model.gguf", {"tokenizer.ggml.token_type": gguf_value(ARRAY, [1] * 10, INT32)}),
             ("model.gguf", "tokenizer.ggml.token_type")),
        Case("placement/gguf/token-type-99", VERIFY_GGUF,
             gguf_tokens(lambda v: [99] * len(v), key="tokenizer.ggml.token_type", item=INT32),
             ("model.gguf", "tokenizer.ggml.token_type")),
        Case("placement/gguf/duplicate-tokens", VERIFY_GGUF, gguf_tokens(lambda v: [v[1]] + v[1:]),
             ("model.gguf", "tokenizer.ggml.tokens"), exits=(1, 2)),
        Case("placement/tokenizer/duplicate-ids", TO_GGUF,
             json_edit(TOKENIZER, lambda d: d["model"]["vocab"].update({"\u00e9\u00e9\u00e9": 3})),
             ("tokenizer.json", "3")),
        Case("placement/tokenizer/duplicate-added-ids", TO_GGUF,
             json_edit(TOKENIZER, lambda d: d["added_tokens"].append(dict(d["added_tokens"][0], content="<|x|>"))),
             ("tokenizer.json",)),
        Case("placement/tokenizer/negative-added-id", TO_GGUF,
             json_edit(TOKENIZER, lambda d: d["added_tokens"][0].update({"id": -1})), ("tokenizer.json",)),
        Case("placement/mlx/override-disagrees", VERIFY_MLX,
             json_edit("mlx/config.json", lambda d: d["quantization"].update(
                 {"model.layers.0.mlp.experts.gate_proj": {"bits": 4, "group_size": 64, "mode": "affine"}})),
             ("config.json", "model.layers.0.mlp.experts.gate_proj")),
        Case("placement/mlx/override-string", VERIFY_MLX,
             json_edit("mlx/config.json", lambda d: d["quantization"].update({"model.layers.1.mlp.router": "x"})),
             ("config.json", "model.layers.1.mlp.router")),
        Case("placement/mlx/override-false-on-quantized", VERIFY_MLX,
             json_edit("mlx/config.json", lambda d: d["quantization"].update(
                 {"model.layers.0.mlp.experts.down_proj": False})),
             ("config.json", "model.layers.0.mlp.experts.down_proj")),
        Case("placement/mlx/block-without-bits", VERIFY_MLX, drop_key("mlx/config.json", "quantization.bits"),
             ("config.json", "bits")),
        # mlx-lm (0.32) quantizes a module the block does not name as its tensors say: it loads these
        Case("placement/mlx/global-mode-unknown", VERIFY_MLX,
             json_edit("mlx/config.json", lambda d: (d["quantization"].update(mode="nf4"),
                                                     d["quantization_config"].update(mode="nf4"))),
             (), exits=(0,)),
        # mlx-lm globs model*.safetensors and never reads the index
        Case("placement/mlx/index-names-missing-file", VERIFY_MLX,
             json_edit("mlx/model.safetensors.index.json",
                       lambda d: d["weight_map"].update({k: "../../etc/passwd" for k in list(d["weight_map"])[:1]})),
             (), exits=(0,)),
        Case("placement/hf/index-names-other-file", VERIFY_HF,
             json_edit("hf/model.safetensors.index.json",
                       lambda d: d["weight_map"].update({k: "../../etc/passwd" for k in list(d["weight_map"])[:1]})),
             ("model.safetensors.index.json", "etc/passwd")),
        Case("placement/hf/index-leaves-out", VERIFY_HF,
             json_edit("hf/model.safetensors.index.json", lambda d: d["weight_map"].pop(sorted(d["weight_map"])[0])),
             ("model.safetensors.index.json", "leaves out")),
        Case("placement/original/index-escapes-folder", INSPECT["repo"],
             json_edit("repo/original/model.safetensors.index.json",
                       lambda d: d["weight_map"].update({k: "../tokenizer.json" for k in list(d["weight_map"])[:1]})),
             (), exits=(0,)),
    ]


def filesystem_cases() -> list[Case]:
    return [
        Case("filesystem/gguf/fifo", INSPECT["gguf"], fifo("model.gguf"), ("model.gguf", "not a regular file")),
        Case("filesystem/gguf/fifo-verify", VERIFY_GGUF, fifo("model.gguf"), ("model.gguf",)),
        Case("filesystem/mlx/fifo-shard", VERIFY_MLX, fifo("mlx/model.safetensors"), ("model.safetensors",)),
        Case("filesystem/mlx/fifo-template", VERIFY_MLX, fifo("mlx/chat_template.jinja"), ("chat_template.jinja",)),
        Case("filesystem/mlx/fifo-tokenizer-config", VERIFY_MLX, fifo("mlx/tokenizer_config.json"),
             ("tokenizer_config.json",)),
        Case("filesystem/metal/fifo", ("inspect", "metal/model.bin"), fifo("metal/model.bin"), ("model.bin",)),
        Case("filesystem/metal/fifo-folder", ("inspect", "metal"), fifo("metal/model.bin"), ("model.bin",)),
        Case("filesystem/reference/fifo", VERIFY_MLX, fifo("ref.npz"), ("ref.npz",)),
        Case("filesystem/repo/additional-templates-fifo", TO_GGUF, fifo("repo/additional_chat_templates/tool.jinja"),
             ("tool.jinja",)),
        Case("filesystem/repo/additional-templates-loop", TO_GGUF,
             symlink_loop("repo/additional_chat_templates/loop.jinja"), ("loop.jinja",)),
        Case("filesystem/repo/additional-templates-fifo-mlx", TO_MLX,
             fifo("repo/additional_chat_templates/tool.jinja"), ("tool.jinja",)),
        Case("filesystem/repo/config-symlink-loop", INSPECT["repo"], both(
            lambda w: (w / CONFIG).unlink(), symlink_loop(CONFIG)), ("config.json",)),
        Case("filesystem/repo/fifo-readme", TO_GGUF, fifo("repo/README.md"), ("README.md",)),
    ]


README_CASES = {
    "malformed-yaml": "---\nlicense: [apache\n---\n# x\n",
    "not-utf8": b"---\nlicense: \xff\xfe\n---\n",
    "wrong-types": "---\nlicense: 5\ntags: {a: b}\nbase_model: [1, 2]\ndatasets: 7\n---\n",
    "alias-bomb": "---\n" + "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)) + "---\n",
    "python-tag": "---\nlicense: !!python/object/apply:os.system ['echo pwned']\n---\n",
    "huge": "---\nlicense: mit\n---\n" + "x" * (20 << 20),
}


def side_file_cases() -> list[Case]:
    # an alias bomb costs nothing until something expands it: gguf-py reads none of those keys
    c = [Case(f"side-files/readme/{what}", TO_GGUF, write("repo/README.md", text),
              () if what == "alias-bomb" else ("README.md",), exits=(0,) if what == "alias-bomb" else (2,))
         for what, text in README_CASES.items()]
    bomb_in_tags = README_CASES["alias-bomb"].removesuffix("---\n") + "tags: *a9\n---\n"  # 10^10 tags
    c.append(Case("side-files/readme/alias-bomb-in-tags", TO_GGUF, write("repo/README.md", bomb_in_tags),
                  ("README.md", "tags")))
    for what, edit in {
        "root-config-list": write("repo/config.json", "[]"),
        "root-config-malformed": write("repo/config.json", "{"),
        "root-config-nested": write("repo/config.json", nested(100000)),
        "tokenizer-config-malformed": write("repo/tokenizer_config.json", "{"),
        "generation-config-malformed": write("repo/generation_config.json", "{,"),
        "tokenizer-config-added-decoder-list": set_key("repo/tokenizer_config.json", "added_tokens_decoder", [1]),
        "tokenizer-config-added-decoder-negative": set_key("repo/tokenizer_config.json", "added_tokens_decoder",
                                                           {"-5": {"content": "<x>", "special": True}}),
        "special-tokens-map-malformed": write("repo/special_tokens_map.json", "{"),
    }.items():
        file = {"root": "config.json", "tokenizer": "tokenizer_config.json", "generation": "generation_config.json",
                "special": "special_tokens_map.json"}[what.split("-")[0]]
        c.append(Case(f"side-files/{what}", TO_GGUF, edit, (file,)))
    return c


def output_cases() -> list[Case]:
    return [
        Case("output/verify-json-into-artifact", VERIFY_MLX + ("--json", "{mlx}/report.safetensors"), lambda w: None,
             ("report.safetensors",)),
        Case("output/compare-csv-into-reference-folder", COMPARE + ("--csv", "{mlx}/x.safetensors"), lambda w: None,
             ("x.safetensors",)),
        Case("output/verify-json-over-file", VERIFY_MLX + ("--json", "{out}"), write("out", "keep me"), ("out",)),
        Case("output/reference-over-input", ("reference", "{repo}", "-o", "{ref}", "--quiet"), lambda w: None,
             ("ref.npz",)),
        Case("output/convert-into-source", ("convert", "{repo}", "--to", "gguf", "-o", "{repo}/original/x.gguf",
                                            "--quiet"), lambda w: None, ("original",)),
        Case("output/card-over-input", CARD + ("-o", "{mlx}/config.json"), lambda w: None, ("config.json",)),
    ]


def terminal_cases() -> list[Case]:
    return [
        Case("terminal/gguf/escape-in-name", INSPECT["gguf"], gguf_kv("general.name", STRING, "\x1b[2J\x1b[31mred"),
             ("\\x1b[2J",), exits=(0,)),
        Case("terminal/tokenizer/escape-in-token", TO_GGUF,
             json_edit(TOKENIZER, lambda d: d["model"]["vocab"].update({"\x1b[2Jevil": 3})),
             ("tokenizer.json", "\\x1b[2Jevil")),
        Case("terminal/config/escape-in-key", INSPECT["repo"],
             set_key(CONFIG, "num_hidden_layers", "\x1b[2J4"), ("\\x1b[2J",)),
    ]


def all_cases() -> list[Case]:
    return (structure_cases() + size_cases() + value_cases() + metal_cases() + placement_cases() + _template_cases()
            + filesystem_cases() + side_file_cases() + output_cases() + terminal_cases())
