"""The Hugging Face transformers layout of gpt-oss (``GptOssForCausalLM``), written, read and described.

Two variants share the names (spec §1.5, transformers ``models/gpt_oss/modeling_gpt_oss.py``):

- MXFP4 as on the Hub: ``model.layers.N.mlp.experts.gate_up_proj_{blocks,scales}`` and
  ``down_proj_{blocks,scales}``, byte-identical to ``original/``'s ``mlp1``/``mlp2`` pairs;
- dense (a fine-tune, or ``oss-convert convert --to hf-bf16``): ``experts.gate_up_proj``
  ``[E, H, 2I]`` and ``experts.down_proj`` ``[E, I, H]``, the ``original/`` weights transposed
  (``x @ W`` instead of ``W @ x``); gate/linear stay interleaved along ``2I``.

Everything else is a rename, except that ``attn.qkv`` is split into ``q/k/v_proj`` without
permutation. ``HfCheckpoint`` presents such a folder under the ``original/`` names and layout
(the ``CanonicalModel`` interface), so converters and the verifier treat it like an
``original/`` checkpoint.

Writing the Hub's MXFP4 root (``--to hf``), as transformers' ``convert_gpt_oss_weights_to_hf.py``
(``write_model(mxfp4=True)``, ``save_sharded_model``) made ``openai/gpt-oss-20b`` / ``-120b``
(spec hf-root-and-harmony.md part A), found out and written down here:

- shards are named **0-based with "of" the last index** (``model-00000-of-00002.safetensors`` for
  three files; ``model-00000-of-00000.safetensors`` for one) and filled greedily in state-dict
  order up to ``max_shard_size = 4800000000`` bytes (decimal); the index is always written, as
  ``json.dump`` on one line: ``{"metadata": {"total_size": N}, "weight_map": {...}}``;
- tensor dtypes: the expert ``_blocks``/``_scales`` are U8 (copied from ``original/``); every
  other tensor is BF16. The converter casts every tensor whose name lacks "norm" to BF16 and
  leaves the norms as ``original/`` stores them, which is BF16 too, so the published root keeps
  no tensor in float32 (transformers upcasts the norms itself at load time);
- ``config.json``: ``GptOssForCausalLM`` keys, ``quantization_config`` =
  ``{"modules_to_not_convert": [self_attn, router, embed_tokens, lm_head], "quant_method":
  "mxfp4"}``, no ``torch_dtype`` and no ``bos_token_id``; ``generation_config.json``: bos
  ``<|startoftext|>``, eos ``[<|return|>, <|endoftext|>, <|call|>]``, pad ``<|endoftext|>``,
  ``do_sample`` true; keys sorted, indent 2, as ``save_pretrained`` writes them;
- the tokenizer files and ``chat_template.jinja`` from the source's repo root; never the
  ``chat_template.json`` the conversion script still writes (the Hub deleted it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from ..dtypes import bf16_to_f32, f32_to_bf16
from ..errors import InputError
from ..reading import read_json
from ..tokens.files import TOKENIZER_FILES, FolderTokens
from ..tokens.vocabulary import special_ids
from . import mxfp4
from .original import OriginalCheckpoint
from ..model import (RMS_NORM_EPS, SWIGLU_ALPHA, ModelConfig, Mxfp4Pair, VocabRows, expected_tensors, is_number,
                     expert_name, is_expert_weight, is_windowed, iter_chunks)
from .base import Format
from .safetensors import FolderLayout, ShardedReader

MODEL_TYPE = "gpt_oss"


# --------------------------------------------------------------------------------------
# Names


def hf_names(name: str) -> list[str]:
    """HF tensor names holding the canonical ``original/`` tensor ``name`` (qkv: three parts).

    Dense expert weights (``block.N.mlp.mlp1_weight``) map to ``gate_up_proj``; their
    ``.blocks``/``.scales`` parts to ``gate_up_proj_blocks``/``_scales``.
    """
    if name == "embedding.weight":
        return ["model.embed_tokens.weight"]
    if name == "norm.scale":
        return ["model.norm.weight"]
    if name == "unembedding.weight":
        return ["lm_head.weight"]
    _, n, rest = name.split(".", 2)
    p = f"model.layers.{n}."
    if rest.startswith("attn.qkv."):
        kind = rest.rsplit(".", 1)[1]
        return [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"]
    simple = {
        "attn.norm.scale": "input_layernorm.weight",
        "attn.sinks": "self_attn.sinks",
        "attn.out.weight": "self_attn.o_proj.weight",
        "attn.out.bias": "self_attn.o_proj.bias",
        "mlp.norm.scale": "post_attention_layernorm.weight",
        "mlp.gate.weight": "mlp.router.weight",
        "mlp.gate.bias": "mlp.router.bias",
        "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
        "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
        "mlp.mlp1_weight": "mlp.experts.gate_up_proj",
        "mlp.mlp2_weight": "mlp.experts.down_proj",
        "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
        "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
        "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
        "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    }
    try:
        return [p + simple[rest]]
    except KeyError:
        raise ValueError(f"no HF name for {name!r}") from None


HUB_SHARD_BYTES = 4_800_000_000  # save_sharded_model's max_shard_size
QUANTIZATION_CONFIG = {  # convert_gpt_oss_weights_to_hf.py, as on the Hub
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}


def hub_shard_names(count: int) -> list[str]:
    """``save_sharded_model``'s names: 0-based, "of" the last index, even for one file."""
    return [f"model-{i:05d}-of-{count - 1:05d}.safetensors" for i in range(count)]


# The Hub's MXFP4 root: 0-based names, the index always, as json.dump writes it on one line.
HUB_LAYOUT = FolderLayout(shard_names=hub_shard_names, index_always=True, index_indent=None, index_newline=False,
                          default_shard_size=HUB_SHARD_BYTES)
# A dense transformers folder as save_pretrained writes it: 1-based names, the index when split.
BF16_LAYOUT = FolderLayout()


def hub_files(config: ModelConfig) -> dict[str, str]:
    """``config.json`` and ``generation_config.json`` of the Hub root (keys sorted, indent 2)."""
    return {"config.json": json.dumps(hub_config(config), indent=2, sort_keys=True) + "\n",
            "generation_config.json": json.dumps(generation_config(config), indent=2) + "\n"}


def bf16_files(config: ModelConfig) -> dict[str, str]:
    return {"config.json": json.dumps(hf_config(config), indent=2) + "\n"}


def hub_config(config: ModelConfig) -> dict:
    """The Hub root's ``config.json``: the transformers keys plus ``quantization_config``, no ``torch_dtype``."""
    doc = hf_config(config)
    del doc["torch_dtype"]
    doc["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return dict(sorted(doc.items()))


def generation_config(config: ModelConfig) -> dict:
    """The Hub's ``generation_config.json`` (after HF PR #105/#109): stop on return, endoftext and call."""
    bos, ret, end, call = special_ids(config.vocab_size, "<|startoftext|>", "<|return|>", "<|endoftext|>", "<|call|>")
    return {"bos_token_id": bos, "do_sample": True, "eos_token_id": [ret, end, call], "pad_token_id": end}


# --------------------------------------------------------------------------------------
# Config


def hf_config(config: ModelConfig, *, torch_dtype: str = "bfloat16") -> dict:
    """``config.json`` of ``GptOssForCausalLM`` for an ``original/`` config (keys sorted, as HF writes)."""
    c = config
    doc = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": special_ids(c.vocab_size, "<|return|>")[0],
        "experts_per_token": c.experts_per_token,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initial_context_length": c.initial_context_length,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_types": hf_config_layer_types(c.num_hidden_layers),
        "max_position_embeddings": int(c.initial_context_length * c.rope_scaling_factor),
        "model_type": MODEL_TYPE,
        "num_attention_heads": c.num_attention_heads,
        "num_experts_per_tok": c.experts_per_token,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "num_local_experts": c.num_experts,
        "output_router_logits": False,
        "pad_token_id": special_ids(c.vocab_size, "<|endoftext|>")[0],
        "rms_norm_eps": RMS_NORM_EPS,
        # YaRN as the reference computes it: NTK-by-parts ramp between beta_slow (alpha) and
        # beta_fast (beta), no rounding of the ramp ends (truncate false), concentration
        # 0.1*ln(factor)+1.
        "rope_scaling": {
            "beta_fast": float(c.rope_ntk_beta),
            "beta_slow": float(c.rope_ntk_alpha),
            "factor": float(c.rope_scaling_factor),
            "original_max_position_embeddings": c.initial_context_length,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": c.rope_theta,
        "router_aux_loss_coef": 0.9,
        "sliding_window": c.sliding_window,
        "swiglu_limit": c.swiglu_limit,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }
    return doc


def _integral(value: float) -> float | int:
    """The ``original/`` files write rope_theta, ntk alpha and beta as JSON ints (spec §1.2)."""
    return int(value) if float(value).is_integer() else value


# What a transformers config calls each of the 16 keys (for messages: a key is named as the file spells it).
HF_NAMES = {"num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok",
            "rope_scaling_factor": "rope_scaling.factor", "rope_ntk_alpha": "rope_scaling.beta_slow",
            "rope_ntk_beta": "rope_scaling.beta_fast"}


def _number(doc: dict, key: str, file: Path | None, default=None, where: str = ""):
    """``doc[key]`` if it is a JSON number (``default`` when absent); anything else names the key."""
    value = doc.get(key, default)
    if value is None:
        raise InputError(f"config key {where}{key!r} is missing", file=file)
    if not is_number(value):
        raise InputError(f"config key {where}{key!r} must be a number, got {value!r}", file=file)
    return value


def model_config_from_hf(raw: dict, *, file: Path | None = None) -> ModelConfig:
    """The 16 ``original/`` keys from a ``GptOssForCausalLM`` config; refuses what the reference cannot run."""
    if raw.get("model_type") != MODEL_TYPE:
        raise InputError(f"model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}", file=file)
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise InputError(f"config key 'rope_scaling' must be a JSON object, got {rope!r}", file=file)
    names = dict(HF_NAMES)
    experts_per_token = "num_experts_per_tok" if "num_experts_per_tok" in raw else "experts_per_token"
    names["experts_per_token"] = experts_per_token
    values = {key: _number(raw, hf_key, file) for key, hf_key in (
        ("num_hidden_layers", "num_hidden_layers"), ("num_experts", "num_local_experts"),
        ("experts_per_token", experts_per_token), ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
        ("intermediate_size", "intermediate_size"), ("num_attention_heads", "num_attention_heads"),
        ("num_key_value_heads", "num_key_value_heads"), ("sliding_window", "sliding_window"))}
    values["swiglu_limit"] = _number(raw, "swiglu_limit", file, 7.0)
    if "head_dim" in raw:
        values["head_dim"] = _number(raw, "head_dim", file)
    else:  # transformers' default; the division waits for check() to know the head count is sane
        heads = values["num_attention_heads"]
        values["head_dim"] = values["hidden_size"] // heads if isinstance(heads, int) and heads > 0 else 0
    if "initial_context_length" in raw:
        values["initial_context_length"] = _number(raw, "initial_context_length", file)
    else:
        values["initial_context_length"] = _number(rope, "original_max_position_embeddings", file,
                                                   where="rope_scaling.")
        names["initial_context_length"] = "rope_scaling.original_max_position_embeddings"
    if "rope_theta" in raw:
        values["rope_theta"] = _integral(_number(raw, "rope_theta", file))
    else:
        values["rope_theta"] = _integral(_number(rope, "rope_theta", file, 150000, where="rope_scaling."))
        names["rope_theta"] = "rope_scaling.rope_theta"
    values["rope_scaling_factor"] = float(_number(rope, "factor", file, 1.0, where="rope_scaling."))
    values["rope_ntk_alpha"] = _integral(_number(rope, "beta_slow", file, 1, where="rope_scaling."))
    values["rope_ntk_beta"] = _integral(_number(rope, "beta_fast", file, 32, where="rope_scaling."))
    config = ModelConfig.from_dict(values, file=file, names=names)  # types and bounds first: then relations
    problems = []
    if rope and rope.get("rope_type", "yarn") != "yarn":
        problems.append(f"rope_type {rope.get('rope_type')!r} (the reference uses yarn)")
    if rope.get("truncate", False):
        problems.append("rope_scaling.truncate true (the reference does not round the YaRN ramp)")
    for key, value in (("rms_norm_eps", RMS_NORM_EPS), ("swiglu_alpha", SWIGLU_ALPHA)):
        if raw.get(key, value) != value:
            problems.append(f"{key} {raw[key]!r} (the reference uses {value})")
    if not raw.get("attention_bias", True):
        problems.append("attention_bias false")
    types = raw.get("layer_types")
    if types is not None and types != hf_config_layer_types(config.num_hidden_layers):
        problems.append("layer_types differ from the reference (sliding window on even layers)")
    if problems:
        raise InputError("config describes a model the gpt-oss reference cannot run: " + "; ".join(problems), file=file)
    return config


def hf_config_layer_types(layers: int) -> list[str]:
    return ["sliding_attention" if is_windowed(i) else "full_attention" for i in range(layers)]


# --------------------------------------------------------------------------------------
# Reading


def looks_hf(folder: str | Path) -> bool:
    """A transformers ``gpt_oss`` folder: that model_type, no MLX ``quantization`` key, safetensors."""
    folder = Path(folder)
    try:
        config = read_json(folder / "config.json")
    except InputError:
        return False
    return (isinstance(config, dict) and config.get("model_type") == MODEL_TYPE and "quantization" not in config
            and any(folder.glob("*.safetensors")))


class HfCheckpoint(ShardedReader, VocabRows, FolderTokens):
    """A validated, memory-mapped HF-layout folder seen through ``original/`` names.

    ``raw(name)`` gives BF16 bits (uint16) of a canonical tensor: zero-copy views for plain
    renames, a transposed view for dense experts (index one expert to materialise it), a
    concatenation for ``attn.qkv``, an RNE-rounded copy if the file stores F32/F16.
    ``.blocks``/``.scales`` names give the uint8 MXFP4 parts. ``experts`` is ``"mxfp4"`` or
    ``"bf16"`` as for ``OriginalCheckpoint``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.hf_config = self._read_config(self.config_path)
        self.config = model_config_from_hf(self.hf_config, file=self.config_path)
        self._open_shards(self.path, "*.safetensors")
        self._check_index(self.path)  # transformers finds the tensors through it
        self.tied = bool(self.hf_config.get("tie_word_embeddings", False)) and "lm_head.weight" not in self.entries
        self.experts = "mxfp4" if "model.layers.0.mlp.experts.gate_up_proj_blocks" in self.entries else "bf16"
        self.specs = expected_tensors(self.config, self.experts)
        # canonical names served: the file-level ones plus logical expert weights
        self._canonical = {s.name for s in self.specs} | {
            f"block.{n}.mlp.{w}_weight" for n in range(self.config.num_hidden_layers) for w in ("mlp1", "mlp2")}
        self._check()

    @property
    def repo_root(self) -> Path:
        return self.path

    def _expected_hf(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """HF name -> (shape, allowed dtypes) implied by config.json."""
        floats = ("BF16", "F16", "F32")
        expected = {}
        for spec in self.specs:
            names = self._sources(spec.name)
            if spec.name.endswith("attn.qkv.weight") or spec.name.endswith("attn.qkv.bias"):
                for hf_name, rows in zip(names, self.config.qkv_rows):
                    expected[hf_name] = ((rows,) + spec.shape[1:], floats)
            elif is_expert_weight(spec.name):
                E, rows, cols = spec.shape
                expected[names[0]] = ((E, cols, rows), floats)
            elif spec.dtype == "U8":
                expected[names[0]] = (spec.shape, ("U8",))
            else:
                expected[names[0]] = (spec.shape, floats)
        return expected

    def _sources(self, name: str) -> list[str]:
        """HF names behind a canonical name of this checkpoint (``InputError`` for any other)."""
        if name not in self._canonical:
            raise InputError("no such tensor", file=self.path, tensor=name)
        if name == "unembedding.weight" and self.tied:
            return ["model.embed_tokens.weight"]
        return hf_names(name)

    def _check(self) -> None:
        expected = self._expected_hf()
        for hf_name, (shape, dtypes) in expected.items():
            entry = self.entries.get(hf_name)
            if entry is None:
                raise InputError(f"missing from every shard; config.json implies {dtypes[0]}{list(shape)}",
                                 file=self.path, tensor=hf_name)
            if entry.dtype not in dtypes or entry.shape != shape:
                raise InputError(f"is {entry.dtype}{list(entry.shape)} but config.json implies {dtypes[0]}{list(shape)}",
                                 file=entry.file, tensor=hf_name)
        extra = sorted(set(self.entries) - set(expected))
        if extra:
            raise InputError(f"unexpected tensors for a model with this config.json: {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''}", file=self.entries[extra[0]].file, tensor=extra[0])

    # -- access -------------------------------------------------------------------------

    def _array(self, hf_name: str) -> np.ndarray:
        entry = self.entries[hf_name]
        return self._file(entry).array(hf_name)

    def _bits(self, hf_name: str) -> np.ndarray:
        """BF16 bits of a float tensor, zero-copy when it is stored as BF16."""
        dtype = self.entries[hf_name].dtype
        array = self._array(hf_name)
        if dtype == "BF16":
            return array
        return f32_to_bf16(array.astype(np.float32))

    def raw(self, name: str) -> np.ndarray:
        sources = self._sources(name)
        if len(sources) == 3:  # q, k, v rows in reference order
            return np.concatenate([self._bits(s) for s in sources])
        if name.endswith((".blocks", ".scales")):
            return self._array(sources[0])
        bits = self._bits(sources[0])
        return bits.transpose(0, 2, 1) if is_expert_weight(name) else bits

    def f32(self, name: str) -> np.ndarray:
        """A canonical tensor as float32: BF16 widened, F32/F16 as stored, MXFP4 experts decoded."""
        if is_expert_weight(name) and self.experts == "mxfp4":
            layer, which = expert_name(name)
            pair = self.mxfp4(layer, which)
            return mxfp4.decode(pair.blocks, pair.scales)
        sources = self._sources(name)
        if len(sources) == 1 and self.entries[sources[0]].dtype != "BF16":
            array = self._array(sources[0]).astype(np.float32)  # not rounded to BF16
            return array.transpose(0, 2, 1) if is_expert_weight(name) else array
        return bf16_to_f32(np.ascontiguousarray(self.raw(name)))

    def expert_f32(self, name: str, expert: int) -> np.ndarray:
        """``f32(name)[expert]``, reading only that expert (a 120b layer is 8.5 GB in float32): the
        stored ``[in, out]`` matrix widened (BF16) or cast, then transposed."""
        if self.experts == "mxfp4":
            pair = self.mxfp4(*expert_name(name))
            return mxfp4.decode(pair.blocks[expert], pair.scales[expert])
        source = self._sources(name)[0]
        stored = self._array(source)[expert]
        values = bf16_to_f32(np.ascontiguousarray(stored)) if self.entries[source].dtype == "BF16" \
            else stored.astype(np.float32)
        return np.ascontiguousarray(values.T)

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        if self.experts != "mxfp4":
            return None
        prefix = f"block.{layer}.mlp.{which}_weight"
        return Mxfp4Pair(self.raw(prefix + ".blocks"), self.raw(prefix + ".scales"))

    def chunks(self, name: str, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
        """``raw(name)`` in pieces along its first axis, the pages released once all are read."""
        yield from iter_chunks(self.raw(name), max_bytes)
        self.release(name)

    def _stored(self, name: str) -> list[str]:
        names = [name + ".blocks", name + ".scales"] if is_expert_weight(name) and self.experts == "mxfp4" else [name]
        return [hf_name for canonical in names for hf_name in self._sources(canonical)]

    def _bf16_bits(self, name: str) -> np.ndarray | None:
        sources = self._sources(name)
        return self._array(sources[0]) if len(sources) == 1 and self.entries[sources[0]].dtype == "BF16" else None

    def storage(self, name: str) -> str:
        if is_expert_weight(name) and self.experts == "mxfp4":
            return "MXFP4"
        return self.entries[self._sources(name)[0]].dtype

    def scan(self, progress=None) -> list[str]:
        """Read every value that can be invalid: NaN/Inf in float tensors, scale byte 255.
        ``progress(nbytes)`` per tensor."""
        return self.scan_values(lambda name: name.endswith("_scales"), progress=progress)


# --------------------------------------------------------------------------------------
# The registry's record (``formats/__init__.py``)


def open_canonical(path: str | Path) -> HfCheckpoint:
    return HfCheckpoint(path)


def open_source(source: str | Path) -> OriginalCheckpoint | HfCheckpoint:
    """What ``convert`` reads: an HF-layout folder, else an ``original/`` checkpoint (or repo id).

    A Hub repo root holds both layouts; its ``original/`` wins, as it is the reference's input.
    """
    path = Path(source)
    if path.is_dir() and not (path / "original" / "config.json").is_file() and looks_hf(path):
        return HfCheckpoint(path)
    return OriginalCheckpoint(source)


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """Summary for ``inspect``; raises ``InputError`` if the folder does not validate."""
    with HfCheckpoint(path) as ckpt:
        return {
            **ckpt.summary(scan), "experts": ckpt.experts,
            "parameters": sum(math.prod(e.shape) * (2 if e.name.endswith("_blocks") else 1)
                              for e in ckpt.entries.values() if not e.name.endswith("_scales")),
            "tokenizer_files": sorted(n for n in TOKENIZER_FILES if (ckpt.path / n).is_file()),
        }


FORMAT = Format(
    "hf", "a Hugging Face transformers folder (the Hub's MXFP4 root, or dense BF16)",
    lambda path: Path(path).is_dir() and looks_hf(path), open=open_canonical, describe=describe,
    weights=lambda path: sorted(Path(path).glob("*.safetensors")),
)
