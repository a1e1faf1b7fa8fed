"""In CI every oracle test must run: a skip there is a failure.

``.ci/run`` sets ``OSS_CONVERT_REQUIRE_ORACLES=1``; then any skipped test or module (a missing
torch, gpt-oss, llama-cpp-python, mlx-lm, transformers ...) is reported as failed, with the skip
reason. Locally, without the variable, a missing oracle still skips.
"""

from __future__ import annotations

import os

import pytest

ENV = "OSS_CONVERT_REQUIRE_ORACLES"


def _strict() -> bool:
    return os.environ.get(ENV) == "1"


def _fail(report, what: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{what} was skipped, but {ENV}=1 (CI) requires every oracle test to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _strict() and report.skipped:
        _fail(report, collector.nodeid)
