"""The one interface every format reader offers to the verifier and to ``inspect``.

A *canonical model* presents weights under the ``original/`` names and in the ``original/``
layout (fused qkv in the reference row order, mlp1 rows gate/linear interleaved, ``[out, in]``
linear weights), whatever the artifact stores. Readers undo their format's transformations
(the Metal q/k permutation and pre-scaling, GGUF's gate/up split and nibble order, MLX's
uint32 packing) so artifacts can be compared tensor by tensor and run by one forward pass.

Expert weights have two views: ``mxfp4(layer, which)`` returns the exact OpenAI blocks and
scales when the artifact stores MXFP4 (``None`` otherwise), and ``f32`` dequantizes them.
Logical expert names are ``block.N.mlp.mlp1_weight`` ``[E, 2I, H]`` and ``block.N.mlp.mlp2_weight``
``[E, H, I]``. A reader whose vocabulary is truncated (Metal keeps 200014 rows) returns the rows
it has and says so with ``config.vocab_size``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .formats.original import ModelConfig, Mxfp4Pair


def logical_names(config: ModelConfig) -> list[str]:
    """Canonical tensor names: the ``original/`` names with each MXFP4 pair as one weight."""
    names = ["embedding.weight"]
    for n in range(config.num_hidden_layers):
        p = f"block.{n}."
        names += [p + s for s in (
            "attn.norm.scale", "attn.qkv.weight", "attn.qkv.bias", "attn.sinks", "attn.out.weight",
            "attn.out.bias", "mlp.norm.scale", "mlp.gate.weight", "mlp.gate.bias", "mlp.mlp1_weight",
            "mlp.mlp1_bias", "mlp.mlp2_weight", "mlp.mlp2_bias",
        )]
    return names + ["norm.scale", "unembedding.weight"]


@runtime_checkable
class CanonicalModel(Protocol):
    config: ModelConfig

    def f32(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, canonical name and shape."""

    def mxfp4(self, layer: int, which: str) -> Mxfp4Pair | None:
        """OpenAI-layout blocks/scales of ``mlp1``/``mlp2`` if stored losslessly as MXFP4."""

    def storage(self, name: str) -> str:
        """How the artifact stores the tensor: "BF16", "F32", "MXFP4", "Q8_0", "affine-4bit", ..."""

    def close(self) -> None: ...
