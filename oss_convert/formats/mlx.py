"""MLX (mlx-lm ``gpt_oss``) folders: the one home of the format, written and read.

Layout (spec mlx-gpt-oss.md §1.2, §2, §7): mlx-lm's ``gpt_oss`` names (``mlx_names``); the MoE
experts as ``QuantizedSwitchLinear(mode="mxfp4")`` parameters, i.e. OpenAI's ``.blocks`` bytes
viewed as uint32 (``as_mlx_words``, undone by ``from_mlx_words``) with the uint8 scales as they
are; ``mlp1`` split into ``gate_proj`` (even rows) and ``up_proj`` (odd rows) as mlx-lm's
``sanitize`` does (``model.gate_up_rows``, undone by ``model.interleave``); ``config.json`` with the
quantization block both old and new mlx-lm accept (``mlx_config``); the index's
``total_parameters`` as mlx-lm counts them.

Reads any gpt-oss folder mlx-lm loads: ours, and mlx-community style ones whose non-expert
layers are quantized (affine 8/4-bit, or mxfp4/mxfp8/nvfp4), or old ones with dequantized BF16
experts. Quantized layers are dequantized with ``mx.dequantize``; parameters come from the
tensor shapes (as mlx-lm 0.32's ``infer_quant_config`` does), the mode from whether the layer
has ``.biases`` (affine) and its group size. MXFP4 experts are returned exactly by ``mxfp4()``.
Imports: base modules, ``formats.safetensors``, ``formats.mxfp4``, ``formats.hf``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..dtypes import bf16_to_f32
from ..errors import InputError
from ..reading import read_json
from ..model import (ModelConfig, Mxfp4Pair, TensorSpec, VocabRows, expert_name, interleave,
                     is_expert_weight)
from ..tokens.files import TOKENIZER_FILES, FolderTokens
from . import mxfp4
from .hf import hf_config, model_config_from_hf
from .base import Format
from .safetensors import FolderLayout, SafetensorsFile, ShardedReader

FLOAT_DTYPES = ("BF16", "F16", "F32")
MXFP4_QUANTIZATION = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
AFFINE_GROUP_SIZE = 64
ROUTER_QUANTIZATION = {"group_size": 64, "bits": 8}  # gpt_oss Model.quant_predicate: no "mode" key
# mlx-community's names for MXFP4 experts with the other linear layers affine n-bit
# (what ``mlx_lm.convert -q --q-bits n`` makes of gpt-oss): recipe -> bits.
AFFINE_RECIPES = {"mxfp4-q8": 8, "mxfp4-q4": 4}
# Needed for mlx_lm.load to build a tokenizer at all; the others only add chat/generation defaults.
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# generation_config.json only overrides eos_token_id, which config.json already carries: no warning.
OPTIONAL_TOKENIZER_FILES = ("generation_config.json",)


# --------------------------------------------------------------------------------------
# Names: canonical (original/) tensor -> MLX modules or tensors, for both directions


def mlx_names(name: str, num_layers: int) -> list[str]:
    """The MLX modules (``...proj``, ``...router``: a ``.weight``, maybe ``.scales``/``.biases``) or
    plain tensors holding canonical tensor ``name``, in the order they are concatenated
    (q, k, v) or interleaved (gate, up). ``KeyError`` for a name that is not canonical."""
    top = {"embedding.weight": ["model.embed_tokens"], "unembedding.weight": ["lm_head"],
           "norm.scale": ["model.norm.weight"]}
    if name in top:
        return top[name]
    try:
        _, n, rest = name.split(".", 2)
        layer = int(n)
    except ValueError:
        raise KeyError(name) from None
    if not 0 <= layer < num_layers:
        raise KeyError(name)
    p = f"model.layers.{n}."
    a, m = p + "self_attn.", p + "mlp."
    return {
        "attn.norm.scale": [p + "input_layernorm.weight"],
        "attn.qkv.weight": [a + "q_proj", a + "k_proj", a + "v_proj"],
        "attn.qkv.bias": [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"],
        "attn.sinks": [a + "sinks"],
        "attn.out.weight": [a + "o_proj"],
        "attn.out.bias": [a + "o_proj.bias"],
        "mlp.norm.scale": [p + "post_attention_layernorm.weight"],
        "mlp.gate.weight": [m + "router"],
        "mlp.gate.bias": [m + "router.bias"],
        "mlp.mlp1_weight": [m + "experts.gate_proj", m + "experts.up_proj"],
        "mlp.mlp1_bias": [m + "experts.gate_proj.bias", m + "experts.up_proj.bias"],
        "mlp.mlp2_weight": [m + "experts.down_proj"],
        "mlp.mlp2_bias": [m + "experts.down_proj.bias"],
    }[rest]


# --------------------------------------------------------------------------------------
# Byte layouts, both directions


def as_mlx_words(blocks: np.ndarray) -> np.ndarray:
    """OpenAI blocks ``[..., G, 16]`` uint8 -> MLX mxfp4 weight ``[..., G*4]`` uint32: the same
    bytes (little-endian host), so the experts are never decoded."""
    words = np.ascontiguousarray(blocks).view("<u4")
    return words.reshape(*blocks.shape[:-2], blocks.shape[-2] * 4)


def from_mlx_words(words: np.ndarray) -> np.ndarray:
    """Inverse of ``as_mlx_words``: ``[..., G*4]`` uint32 -> ``[..., G, 16]`` uint8."""
    w = np.ascontiguousarray(words)
    return w.view(np.uint8).reshape(*w.shape[:-1], w.shape[-1] // 4, 16)


# --------------------------------------------------------------------------------------
# config.json and the index


def mlx_config(config: ModelConfig, overrides: dict[str, dict] | None = None, eos_token_id=None) -> dict:
    """HF ``GptOssForCausalLM`` keys plus the quantization block both old and new mlx-lm accept.

    ``quantization`` carries ``mode`` (mlx-lm 0.28 assumes affine without it) and is repeated as
    ``quantization_config``, as ``mlx_lm.utils.save_config`` writes it. ``eos_token_id``: the
    list of a ``generation_config.json`` beside the source, which ``mlx_lm.convert`` (through
    ``load_config``) writes in place of the config's own.
    """
    doc = hf_config(config)
    if eos_token_id is not None:
        doc["eos_token_id"] = eos_token_id
    quantization = dict(MXFP4_QUANTIZATION)
    quantization.update(overrides or {})
    doc["quantization"] = quantization
    doc["quantization_config"] = quantization
    return dict(sorted(doc.items()))


def total_parameters(specs: list[TensorSpec]) -> int:
    """``mlx_lm.utils.get_total_parameters``: quantized weights count ``size * 32 / bits``; scales
    and affine biases are not parameters, and neither are the attention sinks (it counts only
    leaf modules' parameters, and ``sinks`` belongs to the non-leaf ``Attention``)."""
    by_name = {spec.name: spec for spec in specs}
    total = 0
    for name, spec in by_name.items():
        size = int(np.prod(spec.shape))
        if name.endswith((".scales", ".biases", ".sinks")):
            continue
        if spec.dtype == "U32":
            module = name.rsplit(".", 1)[0]
            scales = by_name[module + ".scales"]
            in_dim = scales.shape[-1] * (AFFINE_GROUP_SIZE if module + ".biases" in by_name else 32)
            bits = spec.shape[-1] * 32 // in_dim
            size = size * 32 // bits
        total += size
    return total


# mlx_lm.utils.save_model: 1-based names, the index always (weight_map sorted, total_parameters),
# indent 4; safetensors metadata {"format": "mlx"}; shards of at most 5 GiB.
LAYOUT = FolderLayout(index_always=True, index_indent=4, sort_weight_map=True, metadata=(("format", "mlx"),),
                      index_metadata=lambda specs: {"total_parameters": total_parameters(specs)})


def folder_files(config: ModelConfig, overrides: dict[str, dict], eos_token_id=None) -> dict[str, str]:
    return {"config.json": json.dumps(mlx_config(config, overrides, eos_token_id), indent=4) + "\n"}


def missing_tokenizer_warning(root: Path) -> str | None:
    """What an MLX folder made from ``root`` will lack, or ``None`` (the files are copied if present)."""
    missing = [n for n in TOKENIZER_FILES if not (root / n).is_file() and n not in OPTIONAL_TOKENIZER_FILES]
    if any(n in missing for n in REQUIRED_TOKENIZER_FILES):
        return (f"no {' or '.join(n for n in REQUIRED_TOKENIZER_FILES if n in missing)} in {root}: "
                "mlx_lm.load and the mlx_lm CLI tools will not open the output until you add the tokenizer files "
                "(mlx_lm.utils.load_model still loads the weights)")
    if missing:
        return f"{', '.join(missing)} not found in {root}; not copied"
    return None


# --------------------------------------------------------------------------------------
# Reading


def _modules(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight-bearing module (possibly quantized) -> its logical weight shape."""
    c = config
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    q, k, v = c.qkv_rows
    shapes = {"model.embed_tokens": (V, H), "lm_head": (V, H)}
    for n in range(c.num_hidden_layers):
        a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        shapes.update({a + "q_proj": (q, H), a + "k_proj": (k, H), a + "v_proj": (v, H),
                       a + "o_proj": (H, c.num_attention_heads * c.head_dim), m + "router": (E, H),
                       m + "experts.gate_proj": (E, I, H), m + "experts.up_proj": (E, I, H),
                       m + "experts.down_proj": (E, H, I)})
    return shapes


def _plain_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every non-module tensor (norms, biases, sinks) -> shape."""
    c = config
    H, I, E = c.hidden_size, c.intermediate_size, c.num_experts
    shapes = {"model.norm.weight": (H,)}
    q, k, v = c.qkv_rows
    for n in range(c.num_hidden_layers):
        a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        shapes.update({
            f"model.layers.{n}.input_layernorm.weight": (H,), f"model.layers.{n}.post_attention_layernorm.weight": (H,),
            a + "q_proj.bias": (q,), a + "k_proj.bias": (k,), a + "v_proj.bias": (v,), a + "o_proj.bias": (H,),
            a + "sinks": (c.num_attention_heads,), m + "router.bias": (E,),
            m + "experts.gate_proj.bias": (E, I), m + "experts.up_proj.bias": (E, I), m + "experts.down_proj.bias": (E, H),
        })
    return shapes


# MLX's quantization modes, with the (bits, group size) each allows and its defaults (mlx.core.quantize)
MLX_MODES = {"affine": ({2, 3, 4, 5, 6, 8}, {32, 64, 128}, (4, 64)), "mxfp4": ({4}, {32}, (4, 32)),
             "nvfp4": ({4}, {16}, (4, 16)), "mxfp8": ({8}, {32}, (8, 32))}


def _quantization_params(spec: dict, key: str, file: Path) -> tuple[str, int, int]:
    """``(mode, bits, group_size)`` of a quantization block (or a module's override), as mlx reads it."""
    mode = spec.get("mode", "affine")
    if mode not in MLX_MODES:
        raise InputError(f"config key '{key}.mode' is {mode!r}; MLX knows {sorted(MLX_MODES)}", file=file)
    allowed_bits, allowed_groups, (bits, group_size) = MLX_MODES[mode]
    bits, group_size = spec.get("bits", bits), spec.get("group_size", group_size)
    for name, value, allowed in (("bits", bits, allowed_bits), ("group_size", group_size, allowed_groups)):
        if not (isinstance(value, int) and not isinstance(value, bool)) or value not in allowed:
            raise InputError(f"config key '{key}.{name}' is {value!r}; MLX's {mode} mode takes {sorted(allowed)}",
                             file=file)
    return mode, bits, group_size


def _quantization_text(params: tuple[str, int, int] | None) -> str:
    return "dense" if params is None else f"{params[0]} {params[1]}-bit, group {params[2]}"


class Quantized:
    """How one module is stored: ``mode`` ("affine", "mxfp4", ...), ``bits``, ``group_size``."""

    def __init__(self, mode: str, bits: int, group_size: int):
        self.mode, self.bits, self.group_size = mode, bits, group_size

    @property
    def params(self) -> tuple[str, int, int]:
        return self.mode, self.bits, self.group_size

    @property
    def storage(self) -> str:
        return f"affine-{self.bits}bit" if self.mode == "affine" else self.mode.upper()

    @property
    def is_openai_mxfp4(self) -> bool:
        return self.mode == "mxfp4" and self.bits == 4 and self.group_size == 32


class MlxModel(ShardedReader, VocabRows, FolderTokens):
    """A validated, memory-mapped MLX gpt-oss folder under ``original/`` names (``CanonicalModel``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.mlx_config = self._read_config(self.config_path)
        self.config = model_config_from_hf(self.mlx_config, file=self.config_path)
        # mlx_lm.utils.load_model globs model*.safetensors and ignores the index
        self._open_shards(self.path, "model*.safetensors")
        self.quant = self._check()

    @property
    def repo_root(self) -> Path:
        return self.path

    # -- validation -----------------------------------------------------------------------

    def _fail(self, name: str, message: str) -> InputError:
        entry = self.entries.get(name)
        return InputError(message, file=entry.file if entry else self.path, tensor=name)

    def _check(self) -> dict[str, Quantized | None]:
        """Shapes and dtypes against config.json; returns each module's quantization (None = dense)."""
        seen: set[str] = set()
        for name, shape in _plain_shapes(self.config).items():
            entry = self.entries.get(name)
            if entry is None:
                raise self._fail(name, f"missing from every shard; config.json implies {list(shape)}")
            if entry.dtype not in FLOAT_DTYPES or entry.shape != shape:
                raise self._fail(name, f"is {entry.dtype}{list(entry.shape)}, expected a float tensor {list(shape)}")
            seen.add(name)
        quant = {}
        for module, shape in _modules(self.config).items():
            quant[module] = self._module_quantization(module, shape)
            seen |= {module + s for s in (".weight", ".scales", ".biases")} & self.entries.keys()
        extra = sorted(self.entries.keys() - seen)
        if extra:
            raise self._fail(extra[0], f"unexpected tensors for a model with this config.json: {extra[:5]}")
        self._check_quantization_block(quant)
        return quant

    def _check_quantization_block(self, quant: dict[str, "Quantized | None"]) -> None:
        """config.json's ``quantization`` as mlx-lm (0.32) reads it: it must be an object with
        ``group_size`` and ``bits``; a module it names is quantized as its entry says (false: not at
        all) and then loaded strictly, so an entry that disagrees with the module's tensors does
        not load; a module it does not name is quantized as its tensors say."""
        block = self.mlx_config.get("quantization", self.mlx_config.get("quantization_config"))
        if block is None:
            if any(q is not None for q in quant.values()):
                raise InputError("quantized tensors but no quantization block in config.json (mlx-lm cannot load it)",
                                 file=self.config_path)
            return
        if not isinstance(block, dict) or not {"group_size", "bits"} <= block.keys():
            raise InputError(f"config key 'quantization' must be an object with group_size and bits "
                             f"(mlx-lm reads both), got {block!r:.200}", file=self.config_path)
        for module, stored in quant.items():
            if module not in block:
                continue
            spec = block[module]
            if spec is False:
                wanted = None
            elif isinstance(spec, dict):
                wanted = _quantization_params(spec, f"quantization.{module}", self.config_path)
            else:
                raise InputError(f"config key 'quantization.{module}' must be an object or false, got {spec!r:.100}",
                                 file=self.config_path)
            if wanted != (stored.params if stored is not None else None):
                raise InputError(f"config key 'quantization.{module}' makes mlx-lm load it as "
                                 f"{_quantization_text(wanted)}, but its tensors are "
                                 f"{_quantization_text(stored.params if stored is not None else None)}",
                                 file=self.config_path)

    def _module_quantization(self, module: str, shape: tuple[int, ...]) -> Quantized | None:
        name = module + ".weight"
        weight = self.entries.get(name)
        if weight is None:
            raise self._fail(name, f"missing from every shard; config.json implies {list(shape)}")
        if weight.dtype in FLOAT_DTYPES:
            if weight.shape != shape:
                raise self._fail(name, f"is {weight.dtype}{list(weight.shape)} but config.json implies {list(shape)}")
            return None
        scales, biases = self.entries.get(module + ".scales"), self.entries.get(module + ".biases")
        in_dim = shape[-1]
        if weight.dtype != "U32" or scales is None or weight.shape[:-1] != shape[:-1] or scales.shape[:-1] != shape[:-1] \
                or (weight.shape[-1] * 32) % in_dim or scales.shape[-1] == 0 or in_dim % scales.shape[-1]:
            raise self._fail(name, f"quantized weight {weight.dtype}{list(weight.shape)} with scales "
                                   f"{list(scales.shape) if scales else None} does not fit {list(shape)}")
        bits, group_size = weight.shape[-1] * 32 // in_dim, in_dim // scales.shape[-1]
        if biases is not None:
            if biases.shape != scales.shape:
                raise self._fail(module + ".biases", f"shape {list(biases.shape)} differs from scales {list(scales.shape)}")
            return Quantized("affine", bits, group_size)
        if scales.dtype != "U8":
            raise self._fail(module + ".scales", f"is {scales.dtype} without .biases: neither affine nor a fp mode")
        mode = {(4, 32): "mxfp4", (8, 32): "mxfp8", (4, 16): "nvfp4"}.get((bits, group_size))
        if mode is None:
            raise self._fail(name, f"{bits}-bit, group {group_size} with uint8 scales matches no MLX mode")
        return Quantized(mode, bits, group_size)

    # -- reading ----------------------------------------------------------------------------

    def _array(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        return self._file(entry).array(name)

    def _float(self, name: str, expert: int | None = None) -> np.ndarray:
        data, dtype = self._array(name), self.entries[name].dtype
        data = data if expert is None else data[expert]
        return bf16_to_f32(np.ascontiguousarray(data)) if dtype == "BF16" else data.astype(np.float32)

    def _module_f32(self, module: str, expert: int | None = None) -> np.ndarray:
        """A module's weight as float32 (dequantized where quantized); ``expert``: only that expert's."""
        q = self.quant[module]
        if q is None:
            return self._float(module + ".weight", expert)
        import mlx.core as mx

        def load(name: str):
            data, dtype = self._array(name), self.entries[name].dtype
            array = mx.array(np.ascontiguousarray(data if expert is None else data[expert]))
            return array.view(mx.bfloat16) if dtype == "BF16" else array

        biases = load(module + ".biases") if q.mode == "affine" else None
        # On the CPU stream whatever the default device: the values go to numpy anyway, and on
        # mlx-cuda 0.32.4 an affine 8-bit module's GPU dequantize parts from the CPU's (the trained
        # model's logits moved by 11%, bench/gpu_exact.py), where every other kernel agrees to 1e-6.
        out = mx.dequantize(load(module + ".weight"), load(module + ".scales"), biases, group_size=q.group_size,
                            bits=q.bits, mode=q.mode, dtype=mx.float32, stream=mx.cpu)
        return np.array(out)

    def _sources(self, name: str) -> list[str]:
        """MLX modules (``...proj``) or tensors behind a canonical name."""
        try:
            return mlx_names(name, self.config.num_hidden_layers)
        except KeyError:
            raise InputError("no such tensor", file=self.path, tensor=name) from None

    def f32(self, name: str) -> np.ndarray:
        """A canonical tensor as float32 (quantized layers dequantized; experts decoded exactly)."""
        if is_expert_weight(name):
            layer, which = expert_name(name)
            pair = self.mxfp4(layer, which)
            if pair is not None:
                return mxfp4.decode(pair.blocks, pair.scales)
        sources = self._sources(name)
        read = (lambda s: self._module_f32(s)) if sources[0] in self.quant else self._float
        parts = [read(s) for s in sources]
        if name.endswith(("mlp1_weight", "mlp1_bias")):  # gate rows even, linear (up) rows odd
            return interleave(*parts, axis=1)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def expert_f32(self, name: str, expert: int) -> np.ndarray:
        """``f32(name)[expert]``, reading and dequantizing only that expert (a 120b layer is 8.5 GB
        in float32); mlx-lm's gate and up interleaved as ``f32`` does."""
        sources = self._sources(name)
        if all(self.quant[m] is not None and self.quant[m].is_openai_mxfp4 for m in sources):
            parts = [mxfp4.decode(from_mlx_words(self._array(m + ".weight")[expert]),
                                  np.ascontiguousarray(self._array(m + ".scales")[expert])) for m in sources]
        else:
            parts = [self._module_f32(m, expert) for m in sources]
        return interleave(*parts, axis=0) if len(parts) == 2 else parts[0]

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        """OpenAI blocks ``[E, O, G, 16]`` / scales ``[E, O, G]``, bit-exact, if stored as MXFP4."""
        modules = self._sources(f"block.{layer}.mlp.{which}_weight")
        if not all(self.quant[m] is not None and self.quant[m].is_openai_mxfp4 for m in modules):
            return None
        words = [self._array(m + ".weight") for m in modules]
        scales = [self._array(m + ".scales") for m in modules]
        if len(modules) == 2:
            words, scales = [interleave(*words, axis=1)], [interleave(*scales, axis=1)]
        return Mxfp4Pair(from_mlx_words(words[0]), np.ascontiguousarray(scales[0]))

    def mxfp4_halves(self, layer: int, which: str) -> tuple[Mxfp4Pair, Mxfp4Pair] | None:
        """mlx-lm keeps ``mlp1``'s gate and up apart: the two as OpenAI-layout pairs (the even and
        the odd rows of ``mxfp4(layer, "mlp1")``), mapped views, for a caller that interleaves them
        elsewhere (the GPU runner, on the device); ``None`` for a single module or other storage."""
        modules = self._sources(f"block.{layer}.mlp.{which}_weight")
        if len(modules) != 2 or not all(self.quant[m] is not None and self.quant[m].is_openai_mxfp4 for m in modules):
            return None
        gate, up = (Mxfp4Pair(from_mlx_words(self._array(m + ".weight")), self._array(m + ".scales")) for m in modules)
        return gate, up

    def _bf16_bits(self, name: str) -> np.ndarray | None:
        """A tensor stored whole as one plain BF16 tensor (not split, not quantized): its bits."""
        sources = self._sources(name)
        if len(sources) != 1 or self.quant.get(sources[0]) is not None:
            return None
        tensor = sources[0] + ".weight" if sources[0] in self.quant else sources[0]
        entry = self.entries.get(tensor)
        return self._array(tensor) if entry is not None and entry.dtype == "BF16" else None

    def storage(self, name: str) -> str:
        sources = self._sources(name)
        q = self.quant.get(sources[0])
        if q is not None:
            return q.storage
        weight = sources[0] + ".weight" if sources[0] in self.quant else sources[0]
        return self.entries[weight].dtype

    def _stored(self, name: str) -> list[str]:
        parts = []
        for source in self._sources(name):
            tensors = [source + s for s in (".weight", ".scales", ".biases")] if source in self.quant else [source]
            parts += [t for t in tensors if t in self.entries]
        return parts

    def scan(self, progress=None) -> list[str]:
        """Read every value that can be invalid: NaN/Inf in float tensors, E8M0 scale byte 255
        (NaN) in MXFP layers."""
        e8m0 = {m + ".scales" for m, q in self.quant.items() if q is not None and q.mode in ("mxfp4", "mxfp8")}
        return self.scan_values(e8m0.__contains__, progress=progress)


# --------------------------------------------------------------------------------------
# The registry's record (``formats/__init__.py``)


def looks_mlx(folder: str | Path) -> bool:
    """A gpt-oss folder in mlx-lm's layout: a ``quantization`` block, or (dequantized, e.g.
    ``mlx_lm.convert -d``) expert tensors named ``experts.gate_proj`` rather than HF's ``gate_up_proj``."""
    folder = Path(folder)
    try:
        config = read_json(folder / "config.json")
    except InputError:
        return False
    if not isinstance(config, dict) or config.get("model_type") != "gpt_oss":
        return False
    if "quantization" in config:
        return True
    for path in sorted(folder.glob("model*.safetensors")):
        try:
            f = SafetensorsFile(path)
        except InputError:
            return False
        f.close()
        if any(".mlp.experts.gate_proj." in name for name in f.entries):
            return True
    return False


def open_canonical(path: str | Path) -> MlxModel:
    return MlxModel(path)


def _parameters(model: MlxModel) -> int:
    """Logical parameter count (quantized weights counted unpacked, sinks included)."""
    total = sum(math.prod(s) for s in _plain_shapes(model.config).values())
    return total + sum(math.prod(s) for s in _modules(model.config).values())


def describe(path: str | Path, *, scan: bool = False) -> dict:
    """Summary for ``inspect``; raises ``InputError`` if the folder does not validate."""
    with MlxModel(path) as model:
        summary = model.summary(scan)
        notes = []
        quantization = model.mlx_config.get("quantization") or model.mlx_config.get("quantization_config") or {}
        if quantization and "mode" not in quantization and "quant_method" not in quantization:
            notes.append('quantization has no "mode": mlx-lm < 0.32 assumes affine and fails on MXFP4 experts')
        tokenizer_files = sorted(n for n in TOKENIZER_FILES if (model.path / n).is_file())
        if "tokenizer.json" not in tokenizer_files:
            notes.append("no tokenizer.json: mlx_lm.load and the mlx_lm CLI tools cannot open this folder")
        storage = {}
        for what, name in (("embedding", "embedding.weight"), ("attention", "block.0.attn.qkv.weight"),
                           ("router", "block.0.mlp.gate.weight"), ("experts", "block.0.mlp.mlp1_weight"),
                           ("unembedding", "unembedding.weight")):
            storage[what] = model.storage(name)
        return {
            **summary, "notes": notes, "storage": storage,
            "quantization": {k: v for k, v in quantization.items() if not isinstance(v, dict)},
            "quantized_overrides": sum(isinstance(v, dict) for v in quantization.values()),
            "parameters": _parameters(model), "tokenizer_files": tokenizer_files,
        }


FORMAT = Format(
    "mlx", "an MLX folder mlx_lm.load opens", lambda path: Path(path).is_dir() and looks_mlx(path),
    open=open_canonical, describe=describe, weights=lambda path: sorted(Path(path).glob("model*.safetensors")),
)
