"""mlx-lm LoRA adapters (``mlx_lm.lora``): ``adapter_config.json`` + ``adapters.safetensors``.

What ``mlx_lm.tuner`` writes for its ``gpt_oss`` model (read off ``tuner/lora.py`` and
``tuner/utils.py``): keys ``model.layers.N.<module>.lora_a`` / ``.lora_b`` on mlx-lm's module
names (``formats.mlx.mlx_names``); ``LoRALinear`` stores ``lora_a [in, r]`` and ``lora_b [r, out]``
(delta ``(scale * lora_b.T) @ lora_a.T``), ``LoRASwitchLinear`` on the experts ``lora_a [E, r, in]``
and ``lora_b [E, out, r]`` (delta ``(scale * lora_b) @ lora_a``), one pair each for ``gate_proj``,
``up_proj`` (the even and odd rows of the canonical ``mlp1``) and ``down_proj``. The config gives
``fine_tune_type`` (only ``lora`` is merged here), ``num_layers`` (the last layers adapted) and
``lora_parameters`` with ``rank`` and ``scale`` (no alpha).
Imports: base modules, ``formats.safetensors``, ``formats.base``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..lora import FLOAT_DTYPES, Adapter, LoraPair, check_rank, owning_file
from ..model import ModelConfig, TensorSpec
from .base import Format, folder_of, json_folder_with, read_json_object
from .safetensors import SafetensorsFile

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>a|b)$")
_LAYER = re.compile(r"^model\.layers\.(?P<n>\d+)\.(?P<rest>.+)$")
# mlx-lm module -> (canonical target in the layer, which part: q/k/v index or gate/up parity)
MODULES = {"self_attn.q_proj": ("attn.qkv.weight", ("qkv", 0)), "self_attn.k_proj": ("attn.qkv.weight", ("qkv", 1)),
           "self_attn.v_proj": ("attn.qkv.weight", ("qkv", 2)), "self_attn.o_proj": ("attn.out.weight", None),
           "mlp.router": ("mlp.gate.weight", None), "mlp.experts.gate_proj": ("mlp.mlp1_weight", ("parity", 0)),
           "mlp.experts.up_proj": ("mlp.mlp1_weight", ("parity", 1)), "mlp.experts.down_proj": ("mlp.mlp2_weight", None)}


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    config = read_json_object(path, "adapter config")
    if not isinstance(config.get("lora_parameters"), dict):
        raise InputError("no lora_parameters: not an mlx-lm adapter config", file=path)
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise InputError(f"fine_tune_type {kind!r}: only LoRA adapters have an exact merge here (DoRA rescales "
                         "the weight's columns; 'full' is a whole model, not an adapter)", file=path)
    params = config["lora_parameters"]
    for key in ("rank", "scale"):
        if isinstance(params.get(key), bool) or not isinstance(params.get(key), (int, float)):
            raise InputError(f"lora_parameters.{key} must be a number, got {params.get(key)!r}", file=path)
    return config


def recognises(path: Path) -> bool:
    return json_folder_with(path, CONFIG_FILE, WEIGHTS_FILE, "lora_parameters")


def read(path: str | Path, base: ModelConfig | None = None) -> Adapter:
    """The adapter at ``path`` on canonical names (``base`` places q/k/v rows; ``inspect`` goes without)."""
    folder = folder_of(Path(path))
    config = read_config(folder)
    params = config["lora_parameters"]
    rank, scale = int(params["rank"]), float(params["scale"])
    weights = SafetensorsFile(folder / WEIGHTS_FILE)
    return owning_file(lambda: _adapter(folder, config, weights, rank, scale, base), weights.close)


def _adapter(folder: Path, config: dict, weights: SafetensorsFile, rank: int, scale: float,
             base: ModelConfig | None) -> Adapter:
    """``read`` once the weights file is open: its pairs on canonical names, each key checked."""
    check_rank(rank, file=weights.path, key="lora_parameters.rank")
    found: dict[str, dict[str, str]] = {}
    for key, entry in weights.entries.items():
        match = _KEY.match(key)
        if match is None:
            raise InputError("is not a LoRA factor (expected <module>.lora_a / .lora_b)", file=weights.path, tensor=key)
        if entry.dtype not in FLOAT_DTYPES:
            raise InputError(f"is {entry.dtype}; LoRA factors are {'/'.join(FLOAT_DTYPES)}", file=weights.path, tensor=key)
        found.setdefault(match["module"], {})[match["side"]] = key
    pairs = [_pair(weights, module, sides, rank, scale, base) for module, sides in sorted(found.items())]
    info = {"num_layers": config.get("num_layers"), "rank": rank, "scale": scale,
            "keys": (config["lora_parameters"].get("keys") or None)}
    return Adapter("mlx-lm", folder, [folder / CONFIG_FILE, folder / WEIGHTS_FILE], pairs, info)


def _pair(weights: SafetensorsFile, module: str, sides: dict, rank: int, scale: float,
          base: ModelConfig | None) -> LoraPair:
    if set(sides) != {"a", "b"}:
        raise InputError(f"has no lora_{'b' if 'a' in sides else 'a'} partner", file=weights.path,
                         tensor=next(iter(sides.values())))
    a_key, b_key = sides["a"], sides["b"]
    if module == "lm_head":
        target, part, name = "unembedding.weight", None, module
    else:
        match = _LAYER.match(module)
        if match is None or match["rest"] not in MODULES:
            raise InputError(f"adapts {module!r}, which is no LoRA target of gpt-oss here (an adapter for another "
                             "architecture, or of the embedding?)", file=weights.path, tensor=a_key)
        rest, part = MODULES[match["rest"]]
        target, name = f"block.{match['n']}.{rest}", match["rest"]
    a, b = weights.array(a_key), weights.array(b_key)
    expert = a.ndim == 3
    want = 3 if expert else 2
    if a.ndim != want or b.ndim != want:
        raise InputError(f"A {list(a.shape)} and B {list(b.shape)} are not a LoRA pair", file=weights.path, tensor=a_key)
    if expert:  # lora_a [E, r, in], lora_b [E, out, r]: already the canonical pair
        r = a.shape[1]
        fits = b.shape[0] == a.shape[0] and b.shape[2] == r
    else:  # lora_a [in, r], lora_b [r, out] -> a [r, in], b [out, r] (transposed views)
        r = a.shape[1]
        fits = b.shape[0] == r
        a, b = a.T, b.T
    if r != rank or not fits:
        raise InputError(f"A {list(weights.entries[a_key].shape)} and B {list(weights.entries[b_key].shape)} do not "
                         f"make a rank-{rank} pair (lora_parameters.rank)", file=weights.path, tensor=a_key)
    return LoraPair(target, a, b, weights.entries[a_key].dtype, scale, f"{WEIGHTS_FILE}: {a_key}", name,
                    _rows(part, base), scale_first=True, release=weights.releaser(a_key, b_key))


def _rows(part, base: ModelConfig | None) -> slice | None:
    if part is None:
        return None
    kind, index = part
    if kind == "parity":
        return slice(index, None, 2)
    if base is None:  # inspect: q/k/v are named, not placed
        return None
    return base.qkv_slices[index]


def describe(path: str | Path, *, scan: bool = False) -> dict:
    return read(path).summary()


FORMAT = Format("mlx-lm-adapter", "an mlx-lm LoRA adapter (adapter_config.json + adapters.safetensors)", recognises,
                describe=describe, adapter=read,
                files=lambda path: {name: folder_of(path) / name for name in (CONFIG_FILE, WEIGHTS_FILE)})


# --------------------------------------------------------------------------------------
# Writing: an adapter as mlx_lm.load(base, adapter_path=...) applies it


def runtime_names(target: str) -> list[str]:
    """mlx-lm's modules of canonical ``target`` (q, k, v; gate, up), the inverse of ``MODULES``."""
    n, _, rest = target.removeprefix("block.").partition(".")
    modules = sorted(((part or ("", 0))[1], module) for module, (canonical, part) in MODULES.items() if canonical == rest)
    if not target.startswith("block.") or not modules:
        raise InputError(f"mlx-lm has no LoRA layer for {target} (its adapters cover the attention, the router "
                         "and the experts)", tensor=target)
    return [f"model.layers.{n}.{module}" for _, module in modules]


def write(adapter, config: ModelConfig, folder: Path) -> dict[str, Path]:
    """``adapters.safetensors`` + ``adapter_config.json`` in ``folder``, float32, one tensor in
    memory at a time. mlx-lm has one rank and one scale per adapter: where the pairs differ, each
    scaling is folded into its B (scale 1) and smaller ranks are padded with zeros (exact)."""
    from ..lora import runtime_pairs
    from .safetensors import SafetensorsWriter

    pairs, uniform = runtime_pairs(adapter, config, runtime_names)
    rank = max(pair.shapes()[0][-2] for pair in pairs)
    specs, makers = [], []
    for pair in pairs:
        (a_shape, b_shape), expert = pair.shapes(), len(pair.shapes()[0]) == 3
        a = (*a_shape[:-2], rank, a_shape[-1]) if expert else (a_shape[-1], rank)  # linear: (in, r)
        b = (*b_shape[:-1], rank) if expert else (rank, b_shape[-2])  # linear: (r, out)
        specs += [TensorSpec(f"{pair.name}.lora_a", "F32", a), TensorSpec(f"{pair.name}.lora_b", "F32", b)]
        makers += [lambda pair=pair, expert=expert: _padded(pair.a(), rank, -2, expert),
                   lambda pair=pair, expert=expert: _padded(pair.b(), rank, -1, expert)]
    with open(folder / WEIGHTS_FILE, "wb") as out:
        writer = SafetensorsWriter(out, specs, {"format": "mlx"})
        for spec, make in zip(specs, makers):
            writer.write(spec.name, make())
        writer.finish()
    first = adapter.pairs[0]
    layers = sorted({int(_LAYER.match(p.name)["n"]) for p in pairs})
    keys = sorted({_LAYER.match(p.name)["rest"] for p in pairs})
    (folder / CONFIG_FILE).write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": config.num_hidden_layers - layers[0],
        "lora_parameters": {"rank": rank, "scale": float(first.scaling) if uniform else 1.0, "dropout": 0.0,
                            "keys": keys}}, indent=2) + "\n")
    return {name: folder / name for name in (CONFIG_FILE, WEIGHTS_FILE)}


def _padded(value: np.ndarray, rank: int, axis: int, expert: bool) -> np.ndarray:
    """``value`` with its rank axis zero-padded to ``rank``, in mlx-lm's orientation (a linear
    layer's factors transposed: ``(in, r)``, ``(r, out)``)."""
    if value.shape[axis] < rank:
        pad = [(0, 0)] * value.ndim
        pad[axis] = (0, rank - value.shape[axis])
        value = np.pad(value, pad)
    return np.ascontiguousarray(value if expert else value.T)
