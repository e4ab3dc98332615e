"""Log densities by the probability-flow ODE, against a closed-form Gaussian.

The linear path from `N(0, I)` to `N(m, Σ)` in two dimensions has the affine velocity
`v(t, x) = m + (t Σ - (1-t) I) C_t⁻¹ (x - t m)`, `C_t = (1-t)² I + t² Σ`, whose flow at
`t = 1` is exactly `N(m, Σ)`. A non-diagonal `Σ` makes Hutchinson's estimator random
(for Rademacher probes its variance is `2 Σ_{i≠j} A_ij²`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from ppl_ext.flows import hutchinson_log_density, log_density
from tests.helpers import assert_unbiased, many

K_SE = 4
MEAN = np.array([1.0, -0.5])
COVARIANCE = np.array([[1.5, 0.9], [0.9, 0.8]])
POINTS = jnp.array([[1.0, -0.5], [0.0, 0.0], [2.5, 1.0]])


def velocity(t, x):
    sigma = jnp.asarray(COVARIANCE, x.dtype)
    identity = jnp.eye(2, dtype=x.dtype)
    c_t = (1 - t) ** 2 * identity + t**2 * sigma
    return MEAN + (t * sigma - (1 - t) * identity) @ jnp.linalg.solve(c_t, x - t * MEAN)


def exact(points):
    return multivariate_normal(MEAN, COVARIANCE).logpdf(np.asarray(points, np.float64))


@pytest.mark.parametrize("solver,num_steps", [("tsit5", None), ("heun", 200)])
def test_exact_divergence_log_density_is_the_gaussian(solver, num_steps):
    values = jax.jit(lambda x: log_density(velocity, x, solver=solver,
                                           num_steps=num_steps))(POINTS)
    np.testing.assert_allclose(values, exact(POINTS), atol=2e-4)
    one = log_density(velocity, POINTS[1])
    assert one.shape == () and np.isclose(one, exact(POINTS[1]), atol=2e-4)


@pytest.mark.parametrize("probe,num_probes", [("rademacher", 1), ("gaussian", 2)])
def test_hutchinson_log_density_is_unbiased(probe, num_probes):
    point = POINTS[2]

    def estimate(key):
        return hutchinson_log_density(key, velocity, point, num_probes=num_probes,
                                      probe=probe)

    draws = many(estimate, num=10_000)
    assert np.std(np.asarray(draws)) > 0.05  # random: the check below has teeth
    solver_exact = float(log_density(velocity, point))
    assert_unbiased(draws, solver_exact, k=K_SE, what=f"Hutchinson/{probe} vs solver")
    assert_unbiased(draws, exact(point), k=K_SE, what=f"Hutchinson/{probe} vs closed form")


@pytest.mark.parametrize("kwargs,match", [
    ({"probe": "sphere"}, "probe"),
    ({"num_probes": 0}, "num_probes"),
    ({"solver": "euler"}, "num_steps"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hutchinson_log_density(jax.random.key(0), velocity, POINTS[0], **kwargs)
    if "solver" in kwargs:
        with pytest.raises(ValueError, match=match):
            log_density(velocity, POINTS[0], **kwargs)


def test_hutchinson_needs_a_key():
    with pytest.raises(ValueError, match="needs a key"):
        hutchinson_log_density(None, velocity, POINTS[0])


def test_bad_point_shape():
    with pytest.raises(ValueError, match="shape"):
        log_density(velocity, jnp.zeros((1, 2, 2)))
