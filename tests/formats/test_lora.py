"""A merge's delta made a chunk of rows at a time (``lora.delta_rows``) is, value for value, the
delta ``Adapter.delta`` makes whole: the one whose merges are proven against PEFT's
``merge_and_unload`` and mlx-lm's ``fuse`` (test_peft.py, test_mlx_adapter.py). The chunks a merge
uses include single rows, where a BLAS product of one row sums differently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oss_convert import formats
from oss_convert.formats.original import OriginalCheckpoint
from oss_convert.lora import Adapter, LoraPair, delta_rows
from oss_convert.model import expected_tensors, is_expert_weight

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CHUNKS = (1, 2, 3, 7, 45, 10_000)  # rows a chunk: one, a few, a merge's, all


def assert_rows_equal_whole(adapter: Adapter, name: str, shape: tuple[int, ...], experts: range) -> None:
    for e in experts:
        whole = adapter.delta(name, shape, e, zero_is_none=False)
        terms = adapter.terms(name, e)
        for rows in CHUNKS:
            out = np.full(whole.shape, np.nan, dtype=np.float32)
            for first in range(0, whole.shape[0], rows):
                stop = min(first + rows, whole.shape[0])
                delta_rows(terms, first, stop, out[first:stop])
            assert np.array_equal(out, whole), (name, e, rows)


def test_delta_rows_of_the_bundled_peft_adapter():
    base = OriginalCheckpoint(EXAMPLES / "gpt-oss-tiny")
    adapter = formats.read_adapter(EXAMPLES / "gpt-oss-tiny-sherlock-lora", base.config)
    shapes = {s.name: s.shape for s in expected_tensors(base.config, "bf16")}
    experts = [n for n in adapter.by_target if is_expert_weight(n)]
    assert experts  # the example adapts experts
    for name in experts:
        assert_rows_equal_whole(adapter, name, shapes[name], range(base.config.num_experts))


def _pair(rng, target: str, experts: int, rank: int, height: int, cols: int, **kind) -> LoraPair:
    a = rng.standard_normal((experts, rank, cols)).astype(np.float32)
    b = (rng.standard_normal((experts, height, rank)) * 0.1).astype(np.float32)
    return LoraPair(target, a, b, "F32", 1.75, "test", "experts", **kind)


@pytest.mark.parametrize("kind", ["one pair", "mlx-lm gate and up", "transposed", "two pairs, rows"])
def test_delta_rows_of_every_pair_layout(kind):
    """The layouts the readers make: one PEFT pair; mlx-lm's gate and up pairs on the even and
    odd rows of mlp1, scaled first; PEFT 0.19.0's transposed pair; two pairs summed on the same
    rows and on a row range."""
    rng = np.random.default_rng(7)
    E, rows, cols, name = 3, 24, 64, "block.0.mlp.mlp1_weight"
    pairs = {
        "one pair": [_pair(rng, name, E, 4, rows, cols)],
        "mlx-lm gate and up": [_pair(rng, name, E, 4, rows // 2, cols, rows=slice(0, None, 2), scale_first=True),
                               _pair(rng, name, E, 4, rows // 2, cols, rows=slice(1, None, 2), scale_first=True)],
        "transposed": [_pair(rng, name, E, 4, cols, rows, transposed=True)],
        "two pairs, rows": [_pair(rng, name, E, 4, rows, cols), _pair(rng, name, E, 2, 10, cols, rows=slice(5, 15))],
    }[kind]
    adapter = Adapter("peft", Path("."), [], pairs)
    assert_rows_equal_whole(adapter, name, (E, rows, cols), range(E))


def _adapter_files_left_open(run) -> list[str]:
    """The ResourceWarnings of files ``run`` left for the garbage collector to close (named by
    their descriptor: the readers open them with ``os.open``)."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_merge_and_a_refused_adapter_close_the_adapters_file(tmp_path):
    from oss_convert import converters
    from oss_convert.converters.adapter import convert_adapter
    from oss_convert.errors import InputError
    from oss_convert.formats.safetensors import SafetensorsFile

    base, adapter = EXAMPLES / "gpt-oss-tiny", EXAMPLES / "gpt-oss-tiny-sherlock-lora"
    assert not _adapter_files_left_open(lambda: converters.convert(
        base, "hf-bf16", tmp_path / "merged", adapter=adapter, merge_workers=False))
    assert not _adapter_files_left_open(lambda: convert_adapter(
        adapter, "gguf", tmp_path / "lora.gguf", base=base))

    from safetensors.numpy import save_file

    broken = tmp_path / "nan-lora"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    weights = SafetensorsFile(adapter / "adapter_model.safetensors")
    tensors = {name: np.array(weights.array(name)) for name in weights.entries}
    weights.close()
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].astype(np.float32)
    tensors[key].flat[0] = np.nan
    save_file(tensors, str(broken / "adapter_model.safetensors"))

    def refused():
        with pytest.raises(InputError, match="NaN"):
            converters.convert(base, "hf-bf16", tmp_path / "refused", adapter=broken, merge_workers=False)

    assert not _adapter_files_left_open(refused)
