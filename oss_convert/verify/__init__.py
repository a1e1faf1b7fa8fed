"""Verify an artifact against a BF16 reference: one command, one verdict.

- ``runner``: a gpt-oss forward pass in float32 over any ``CanonicalModel`` (layer-streamed;
  numpy and BLAS on the CPU, MLX operations on a GPU; every weight decoded exactly).
- ``reference``: llama-perplexity style chunking and the ``.npz`` cache of top-k log-probs.
- ``metrics``: per-token NLL / KL / top-1 / logit differences and their summary.
- ``tensors``: exact per-tensor comparison (experts bit-identical, BF16 identical, F16/Q8_0 bounds).
- ``report``: the checks (config, tensors, tokenizer, KL, top-1) as one list, the verdict, the
  documented JSON schema, the readable table.
- ``check``: orchestration. The commands are ``cli/verify.py``'s.
Imports: support and base modules and ``formats``; never ``converters`` or ``cli``.
"""

from .check import Inputs, make_reference, score, verify
from .reference import Reference
from .runner import Runner

__all__ = ["Inputs", "Reference", "Runner", "make_reference", "score", "verify"]
