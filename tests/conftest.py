"""Shared test setup: two host devices, a `key` fixture and the statistical helpers.

Statistical tests compare a Monte-Carlo mean of `n >= 10^4` estimates with the exact value
and fail beyond K_SE standard errors. With K_SE = 4 a correct estimator fails one
comparison with probability about 6.3e-5 (two-sided normal tail); the suite makes fewer
than 150 such comparisons, so a correct library fails a run with probability below 1%
over seeds. Seeds are fixed, so a given run is reproducible.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import pytest  # noqa: E402



@pytest.fixture
def key():
    return jax.random.key(0)
