"""Promise: deterministic. The same input and options give byte-identical output (every file and
the manifest), across runs and thread counts, for every registered target and its variants.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import CLI, tree_hashes
from targets import Case, params

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# MLX reads no thread-count variable; its CPU work is varied through the CPU affinity instead.
# Every target and variant, and one source in the transformers layout.
CASES = params(variants=True) + [pytest.param(Case("original-from-hf", "original", (), "tiny_hf", "model"),
                                              id="original-from-hf")]


def converted_with_threads(case: Case, source: Path, out: Path, threads: int) -> dict[str, str]:
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    cpus = sorted(os.sched_getaffinity(0))[:threads]

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    result = subprocess.run([*CLI, *case.args(source, out)], env=env, preexec_fn=pin, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tree_hashes(out.parent)


@pytest.mark.parametrize("case", CASES)
def test_same_input_gives_identical_bytes_across_runs_and_thread_counts(case, request, tmp_path):
    source = request.getfixturevalue(case.source)
    one = converted_with_threads(case, source, tmp_path / "one" / case.output, threads=1)
    many = converted_with_threads(case, source, tmp_path / "many" / case.output, threads=8)
    assert one == many  # every output file and the manifest, byte for byte
    assert len(one) >= 2  # the artifact and its manifest at least


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("target, recipe, start", [("mlx", None, "fork"), ("original", "search", "fork"),
                                                   ("original", "ocp", "fork"), ("mlx", None, "spawn")])
def test_a_merge_on_worker_processes_writes_the_bytes_threads_write(target, recipe, start, monkeypatch, tmp_path):
    """A merge re-encodes its experts on worker processes where it pays (several cores, large
    experts; forked on Linux, spawned elsewhere) and on threads otherwise: the same files,
    manifest and merge report either way."""
    from oss_convert import converters, encode_workers

    if not encode_workers.available():
        pytest.skip("worker processes need two cores")
    monkeypatch.setattr(encode_workers, "START_METHOD", start)
    base, adapter = EXAMPLES / "gpt-oss-tiny", EXAMPLES / "gpt-oss-tiny-sherlock-lora"
    options = {"recipe": recipe} if recipe else {}
    outputs = []
    for workers in (True, False):
        out = tmp_path / str(workers) / "model"
        converters.convert(base, target, out, adapter=adapter, merge_workers=workers, **options)
        outputs.append(tree_hashes(out.parent))
    assert outputs[0] == outputs[1]
    assert any(name.endswith("quantization.json") for name in outputs[0])  # the merge and its report happened
