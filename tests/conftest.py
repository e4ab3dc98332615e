"""Shared test setup: two host devices, a `key` fixture and the false-failure budget.

Statistical tests compare a Monte-Carlo mean of `n >= 10^4` estimates with an exact value
(or two means with each other) and fail beyond K_SE standard errors (`tests/helpers.py`).
A correct estimator fails one comparison with probability `p = 2 Φ(-K_SE)` (6.3e-5 for
K_SE = 4, two-sided normal tail). The helpers count every comparison actually made; at the
end of the run this file reports the count `N` and the probability that a correct library
fails the run, `1 - (1 - p)^N` (summed over xdist workers). Seeds are fixed, so a given run
is reproducible; the budget is what a fresh choice of seeds would risk.
"""

import math
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import K_SE, comparisons_made  # noqa: E402

_WORKER_COMPARISONS: list[int] = []


@pytest.fixture
def key():
    return jax.random.key(0)


def false_failure_budget(comparisons: int, k: float = K_SE) -> float:
    """Probability that `comparisons` independent k-SE checks of a correct library fail."""
    p = math.erfc(k / math.sqrt(2.0))
    return 1.0 - (1.0 - p) ** comparisons


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the count to the controller
        workeroutput["statistical_comparisons"] = comparisons_made()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    output = getattr(node, "workeroutput", {}) or {}
    _WORKER_COMPARISONS.append(int(output.get("statistical_comparisons", 0)))


def pytest_terminal_summary(terminalreporter):
    total = comparisons_made() + sum(_WORKER_COMPARISONS)
    if total:
        terminalreporter.write_line(
            f"statistical comparisons: {total} at K_SE = {K_SE:g}; probability that a correct "
            f"library fails this run: {false_failure_budget(total):.2%}"
        )
