"""The merge's worker processes give the conversion's own threads the cores they want."""

import os
import sys

import pytest

from oss_convert import encode_workers


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (4, 4), (8, 7), (16, 14), (64, 62)])
def test_from_8_cores_up_two_are_left_to_the_conversion(cores, workers, monkeypatch):
    monkeypatch.setattr(encode_workers, "_cores", lambda: cores)
    assert encode_workers.worker_count() == workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's (nice 19 elsewhere)")
def test_merge_workers_run_only_when_the_conversion_leaves_a_core_idle(monkeypatch):
    monkeypatch.setattr(encode_workers, "_cores", lambda: 3)  # workers even on a one-core runner
    workers = encode_workers.MergeWorkers(values=1 << 10, factor_values=64)
    try:
        pids = {workers._executor.submit(os.getpid).result() for _ in range(8)}
        policies = {workers._executor.submit(os.sched_getscheduler, 0).result() for _ in range(8)}
    finally:
        workers.close()
    assert os.getpid() not in pids and workers.workers == 3
    assert policies == {os.SCHED_IDLE} and os.sched_getscheduler(0) != os.SCHED_IDLE
