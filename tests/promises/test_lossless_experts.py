"""Promise: lossless experts. Every registered target keeps the MXFP4 expert weights bit for bit
(a ``uint32`` view for MLX, a nibble re-order for GGUF, scales + 14 for Metal, byte copies for
the transformers and ``original/`` layouts), or, where it stores them dense (``hf-bf16``), as
their exact values: read back through the registry, every expert equals the source's."""

from __future__ import annotations

import numpy as np
import pytest

from oss_convert import formats
from oss_convert.formats import mxfp4
from oss_convert.formats.original import OriginalCheckpoint

from helpers import run_sub
from targets import params


@pytest.mark.parametrize("case", params())
def test_every_target_keeps_the_experts_exactly(case, request, tmp_path):
    source = request.getfixturevalue(case.source)
    result = run_sub(*case.args(source, tmp_path / case.output, "--no-manifest"))
    assert result.returncode == 0, result.stderr
    with OriginalCheckpoint(source) as src, formats.open_canonical(result.stdout.strip()) as art:
        for layer in range(src.config.num_hidden_layers):
            for which in ("mlp1", "mlp2"):
                want, got = src.mxfp4(layer, which), art.mxfp4(layer, which)
                if got is None:  # stored dense: the exact values, nothing rounded
                    assert art.storage(f"block.{layer}.mlp.{which}_weight") == "BF16"
                    np.testing.assert_array_equal(art.f32(f"block.{layer}.mlp.{which}_weight"),
                                                  mxfp4.decode(want.blocks, want.scales))
                    continue
                assert np.array_equal(got.blocks, want.blocks) and np.array_equal(got.scales, want.scales), \
                    (case.name, layer, which)
