"""PEFT LoRA adapters of gpt-oss: ``adapter_config.json`` + ``adapter_model.safetensors``.

What PEFT writes for transformers' ``GptOssForCausalLM`` (peft 0.17+; read off peft 0.21's
``LoraModel`` and ``ParamWrapper``):

- keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; ``<module>`` is
  ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.router`` or ``lm_head``
  (``target_modules``, ``"all-linear"`` included), ``A [r, in]``, ``B [out, r]``;
- the 3-D experts through ``target_parameters`` (``mlp.experts.gate_up_proj``,
  ``mlp.experts.down_proj``, or one layer's: ``"7.mlp.experts.gate_up_proj"``): each expert has
  its own rank-r pair, packed A expert-major ``[r*E, in]`` (expert e owns rows ``e*r..e*r+r-1``)
  and B rank-major ``[out, r*E]`` (expert e owns columns ``e, e+E, ...``). transformers stores
  ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` (``x @ W``), so ``in`` is H and I and the
  delta ``B_e @ A_e`` is already the canonical ``[out, in]`` orientation. Two parameters of one
  module nest: PEFT wraps them in ``sorted(target_parameters)`` order... see ``_expert_params``.
  peft 0.19.0 wrote the orientation inverted (in and out swapped; fixed in 0.19.1).
- scaling ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), r and alpha per module from
  ``rank_pattern`` / ``alpha_pattern`` matched as PEFT's ``get_pattern_key`` does.

Refused (exit 2, naming file and key): anything that has no exact merge here (DoRA and other
LoRA variants, ``lora_bias``, biases, ``modules_to_save``, embedding LoRA), keys of another
architecture, ranks that contradict the config, and expert pairs whose orientation cannot be
told (``H == I`` makes ``down_proj`` square: then the peft version or the layer's ``gate_up_proj``
decides, or it is refused).
Imports: base modules, ``formats.safetensors``, ``formats.base``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import InputError
from ..lora import FLOAT_DTYPES, Adapter, LoraPair, check_rank, owning_file
from ..model import ModelConfig
from .base import Format, folder_of, json_folder_with, read_json_object
from .safetensors import SafetensorsFile

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
INVERTED_VERSIONS = ("0.19.0",)  # wrote the 3-D expert orientation inverted (peft#2885)
# Config keys whose truthy value means an adapter the plain merge W + s*B@A does not reproduce.
NOT_PLAIN_LORA = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "velora_config", "kasa_config",
                  "arrow_config", "trainable_token_indices", "layer_replication")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(?P<n>\d+)\.(?P<rest>.+)$")
LINEAR_MODULES = {"self_attn.q_proj": ("attn.qkv.weight", 0), "self_attn.k_proj": ("attn.qkv.weight", 1),
                  "self_attn.v_proj": ("attn.qkv.weight", 2), "self_attn.o_proj": ("attn.out.weight", None),
                  "mlp.router": ("mlp.gate.weight", None)}
EXPERT_PARAMS = {"gate_up_proj": "mlp1", "down_proj": "mlp2"}


def pattern_key(pattern_keys, key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key``, else ``key``."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def rank_and_scaling(config: dict, key: str) -> tuple[int, float]:
    """The configured rank and scaling of module (or parameter) ``key``, as ``LoraModel._create_and_replace``."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(pattern_key(ranks.keys(), key), config.get("r", 8))
    alpha = alphas.get(pattern_key(alphas.keys(), key), config.get("lora_alpha", 8))
    return int(r), (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    config = read_json_object(path, "adapter config")
    if config.get("peft_type") != "LORA":
        raise InputError(f"peft_type {config.get('peft_type')!r}: only LoRA adapters can be merged", file=path)
    for name in NOT_PLAIN_LORA:
        if config.get(name):
            raise InputError(f"{name}={config[name]!r}: that adapter has no exact W + scaling*B@A merge here", file=path)
    if config.get("bias", "none") != "none":
        raise InputError(f"bias={config['bias']!r}: trained biases are not a LoRA delta (only bias='none' is merged)",
                         file=path)
    if config.get("fan_in_fan_out"):
        raise InputError("fan_in_fan_out=True is for Conv1D models; gpt-oss has none", file=path)
    if config.get("modules_to_save"):
        raise InputError(f"modules_to_save={config['modules_to_save']!r}: whole trained modules, not LoRA deltas",
                         file=path)
    return config


def recognises(path: Path) -> bool:
    return json_folder_with(path, CONFIG_FILE, WEIGHTS_FILE, "peft_type")


def read(path: str | Path, base: ModelConfig | None = None) -> Adapter:
    """The adapter at ``path`` on canonical names. ``base`` (the model it is merged into) decides
    the expert orientation where shapes alone cannot; without it (``inspect``) the standard one is
    assumed unless the peft version says otherwise."""
    folder = folder_of(Path(path))
    config = read_config(folder)
    weights = SafetensorsFile(folder / WEIGHTS_FILE)
    return owning_file(lambda: _adapter(folder, config, weights, base), weights.close)


def _adapter(folder: Path, config: dict, weights: SafetensorsFile, base) -> Adapter:
    """``read`` once the weights file is open: its pairs on canonical names, each key checked."""
    factors = _factors(weights)
    pairs: list[LoraPair] = []
    experts: dict[int, dict[str, tuple]] = {}
    for module, (a_key, b_key) in sorted(factors.items()):
        if module == "lm_head":
            pairs.append(_linear(weights, config, module, a_key, b_key, "unembedding.weight", None, base))
            continue
        match = _LAYER.match(module)
        rest = match["rest"] if match else None
        if rest in LINEAR_MODULES:
            target, part = LINEAR_MODULES[rest]
            pairs.append(_linear(weights, config, module, a_key, b_key, f"block.{match['n']}.{target}", part, base))
        elif rest is not None and re.fullmatch(r"mlp\.experts(\.base_layer)*", rest):
            experts.setdefault(int(match["n"]), {})[rest] = (a_key, b_key)
        else:
            raise InputError(f"adapts {module!r}, which is no LoRA target of gpt-oss here (attention q/k/v/o_proj, "
                             "mlp.router, the experts' gate_up_proj/down_proj, lm_head); an adapter for another "
                             "architecture?", file=folder / WEIGHTS_FILE, tensor=a_key)
    for layer, nested in sorted(experts.items()):
        pairs += _expert_pairs(weights, config, layer, nested, base, folder)
    info = {"peft_version": config.get("peft_version"), "base_model": config.get("base_model_name_or_path"),
            "target_modules": config.get("target_modules"), "target_parameters": config.get("target_parameters"),
            "use_rslora": bool(config.get("use_rslora"))}
    saved = {SAVED_BASE_WEIGHTS[k.removeprefix(PREFIX)]: (weights.array(k), weights.entries[k].dtype, k)
             for k in weights.entries if k.removeprefix(PREFIX) in SAVED_BASE_WEIGHTS}
    return Adapter("peft", folder, [folder / CONFIG_FILE, folder / WEIGHTS_FILE], pairs, info, saved)


# PEFT saves the whole weight of a targeted lm_head / embedding beside its factors
# (``save_embedding_layers``): loading puts it back into the model, so it must be the base's own.
SAVED_BASE_WEIGHTS = {"lm_head.base_layer.weight": "unembedding.weight",
                      "model.embed_tokens.base_layer.weight": "embedding.weight"}


def _factors(weights: SafetensorsFile) -> dict[str, tuple[str, str]]:
    """module -> (A key, B key), every key accounted for."""
    found: dict[str, dict[str, str]] = {}
    for key, entry in weights.entries.items():
        if key.removeprefix(PREFIX) in SAVED_BASE_WEIGHTS:
            continue
        if "lora_embedding_" in key:
            raise InputError("embedding LoRA is not merged here (target the attention and experts instead)",
                             file=weights.path, tensor=key)
        match = _KEY.match(key)
        if match is None or not key.startswith(PREFIX):
            raise InputError("is not a LoRA factor (expected base_model.model.<module>.lora_A/B.weight)",
                             file=weights.path, tensor=key)
        if entry.dtype not in FLOAT_DTYPES or len(entry.shape) != 2:
            raise InputError(f"is {entry.dtype}{list(entry.shape)}; LoRA factors are 2-D {'/'.join(FLOAT_DTYPES)}",
                             file=weights.path, tensor=key)
        found.setdefault(match["module"].removeprefix(PREFIX), {})[match["side"]] = key
    for module, sides in found.items():
        if set(sides) != {"A", "B"}:
            missing = "B" if "A" in sides else "A"
            raise InputError(f"has no lora_{missing} partner", file=weights.path, tensor=next(iter(sides.values())))
    return {module: (sides["A"], sides["B"]) for module, sides in found.items()}


def _linear(weights, config, module, a_key, b_key, target, part, base) -> LoraPair:
    a, b = weights.array(a_key), weights.array(b_key)
    r, scaling = rank_and_scaling(config, module)
    _check_factor_rank(weights, a_key, a.shape[0], r)
    if b.shape[1] != a.shape[0]:
        raise InputError(f"B is {list(b.shape)} but A has rank {a.shape[0]}", file=weights.path, tensor=b_key)
    rows = None
    if part is not None and base is not None:  # without a base (inspect) q/k/v are named, not placed
        rows = base.qkv_slices[part]
    return LoraPair(target, a, b, weights.entries[a_key].dtype, scaling, f"{WEIGHTS_FILE}: {a_key}",
                    _LAYER.sub(r"\g<rest>", module), rows, release=weights.releaser(a_key, b_key))


def _check_factor_rank(weights, key: str, rows: int, r: int) -> None:
    check_rank(r, file=weights.path, key=key)
    if rows != r:
        raise InputError(f"has rank {rows} but the config's r/rank_pattern give {r}", file=weights.path, tensor=key)


def _expert_params(config: dict, layer: int, nested: dict, folder: Path) -> dict[str, str]:
    """Which nesting level holds which parameter. PEFT wraps the targeted parameters of one module
    in the order ``named_parameters`` meets them (``gate_up_proj`` before ``down_proj``, the order
    ``GptOssExperts`` defines them); each later one wraps the wrapper, so the first parameter ends
    deepest (``experts.base_layer.lora_*``) and the last outermost (``experts.lora_*``)."""
    targets = config.get("target_parameters") or []
    key = f"model.layers.{layer}.mlp.experts"
    params = [p for p in EXPERT_PARAMS if any(f"{key}.{p}" == t or f"{key}.{p}".endswith("." + t) for t in targets)]
    levels = sorted(nested, key=lambda rest: -rest.count(".base_layer"))  # deepest first
    if len(params) != len(levels):
        raise InputError(f"layer {layer} has {len(levels)} expert LoRA pairs but target_parameters names "
                         f"{params or 'none'} there", file=folder / CONFIG_FILE)
    return dict(zip(levels, params))


def _expert_pairs(weights, config, layer: int, nested: dict, base: ModelConfig | None, folder: Path) -> list[LoraPair]:
    placed = _expert_params(config, layer, nested, folder)
    shapes = {}
    for rest, param in placed.items():
        a_key, b_key = nested[rest]
        a, b = weights.array(a_key), weights.array(b_key)
        r, scaling = rank_and_scaling(config, f"model.layers.{layer}.mlp.experts.{param}")
        check_rank(r, file=weights.path, key=a_key)
        if a.shape[0] % r or b.shape[1] != a.shape[0]:
            raise InputError(f"A {list(a.shape)} and B {list(b.shape)} are not r={r} pairs of whole experts",
                             file=weights.path, tensor=a_key)
        shapes[param] = (a_key, b_key, a, b, r, scaling)
    inverted = {param: _inverted(param, a.shape[1], b.shape[0], base, config) for param, (_, _, a, b, _, _) in shapes.items()}
    if None in inverted.values():  # square down_proj: follow the layer's gate_up_proj if it tells
        known = {v for v in inverted.values() if v is not None}
        if len(known) != 1:
            a_key = shapes["down_proj"][0]
            raise InputError(
                "down_proj is square (hidden size == expert size), so its orientation cannot be told from the shapes "
                "(peft 0.19.0 wrote it inverted); no peft_version in the config and no gate_up_proj pair in this layer "
                "to follow: refusing rather than guessing", file=weights.path, tensor=a_key)
        inverted = {param: known.pop() if v is None else v for param, v in inverted.items()} if known else inverted
    pairs = []
    for param, (a_key, b_key, a, b, r, scaling) in shapes.items():
        E = a.shape[0] // r
        a3 = a.reshape(E, r, a.shape[1])  # expert-major
        b3 = b.reshape(b.shape[0], r, E).transpose(2, 0, 1)  # rank-major -> [E, out, r]
        pairs.append(LoraPair(f"block.{layer}.mlp.{EXPERT_PARAMS[param]}_weight", a3, b3, weights.entries[a_key].dtype,
                              scaling, f"{WEIGHTS_FILE}: {a_key}", f"mlp.experts.{param}", None, inverted[param],
                              release=weights.releaser(a_key, b_key)))
    return pairs


def _inverted(param: str, a_in: int, b_out: int, base: ModelConfig | None, config: dict) -> bool | None:
    """Is this expert pair in peft 0.19.0's inverted orientation? ``None``: the shapes cannot tell."""
    if config.get("peft_version") is not None:
        version = str(config["peft_version"]).split("+")[0]
        return version in INVERTED_VERSIONS
    if base is None:
        return False
    H, I = base.hidden_size, base.intermediate_size
    standard, inverted = ((H, 2 * I), (2 * I, H)) if param == "gate_up_proj" else ((I, H), (H, I))
    if standard == inverted:
        return None
    return (a_in, b_out) == inverted


def describe(path: str | Path, *, scan: bool = False) -> dict:
    return read(path).summary()


FORMAT = Format("peft", "a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)", recognises,
                describe=describe, adapter=read,
                files=lambda path: {name: folder_of(path) / name for name in (CONFIG_FILE, WEIGHTS_FILE)})
