"""Common tests over the interpolant-path registry (`registry.PATHS`): boundary
conditions, derivatives against central finite differences, jit/vmap, and the
conditional velocity as the time derivative of the interpolant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext as px
from tests.conformance.registry import PATHS, PathCase

CASES = pytest.mark.parametrize("case", PATHS, ids=lambda c: c.name)
INTERIOR = np.array([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
STEP = 1e-3


@CASES
def test_is_a_path(case: PathCase):
    path = case.build()
    assert isinstance(path, px.flows.AbstractPath)
    assert isinstance(path.gamma, px.flows.AbstractGamma)


@CASES
def test_boundary_conditions(case: PathCase):
    path = case.build()
    tol = type(path).boundary_tolerance
    assert tol <= 0.05
    alpha0, beta0, gamma0 = (float(c) for c in path.coefficients(0.0))
    alpha1, beta1, gamma1 = (float(c) for c in path.coefficients(1.0))
    assert abs(alpha0 - 1.0) <= tol and abs(beta0) <= tol, (alpha0, beta0)
    assert abs(alpha1) <= 1e-5 and abs(beta1 - 1.0) <= 1e-5, (alpha1, beta1)
    assert abs(gamma0) <= 1e-6 and abs(gamma1) <= 1e-6
    gammas = np.asarray(jax.vmap(path.gamma)(jnp.linspace(0.0, 1.0, 21)))
    assert np.all(gammas >= 0.0)
    # x_0 and x_1 are the endpoints (to the path's tolerance)
    x0, x1, z = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0]), jnp.array([0.7, 0.1])
    np.testing.assert_allclose(path.interpolate(0.0, x0, x1, z), x0, atol=5 * tol)
    np.testing.assert_allclose(path.interpolate(1.0, x0, x1, z), x1, atol=1e-4)


@CASES
def test_derivatives_match_finite_differences(case: PathCase):
    path = case.build()
    t = jnp.asarray(INTERIOR, jnp.float32)
    derivatives = np.stack([np.asarray(d) for d in jax.vmap(path.derivatives)(t)])
    plus = np.stack([np.asarray(c, np.float64) for c in jax.vmap(path.coefficients)(t + STEP)])
    minus = np.stack([np.asarray(c, np.float64) for c in jax.vmap(path.coefficients)(t - STEP)])
    finite = (plus - minus) / (2 * STEP)
    np.testing.assert_allclose(derivatives, finite, rtol=5e-3, atol=5e-3)


@CASES
def test_velocity_is_the_time_derivative_of_the_interpolant(case: PathCase):
    path = case.build()
    x0, x1, z = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0]), jnp.array([0.7, 0.1])
    for t in INTERIOR:
        _, tangent = jax.jvp(lambda s: path.interpolate(s, x0, x1, z), (jnp.asarray(t),),
                             (jnp.asarray(1.0),))
        np.testing.assert_allclose(path.velocity(t, x0, x1, z), tangent, rtol=1e-4,
                                   atol=1e-4)


@CASES
def test_jit_and_vmap(case: PathCase):
    path = case.build()
    t = jnp.asarray(INTERIOR)
    batched = jax.jit(jax.vmap(path.coefficients))(t)
    one_by_one = [path.coefficients(s) for s in INTERIOR]
    for i, coefficients in enumerate(one_by_one):
        np.testing.assert_allclose([b[i] for b in batched], coefficients, rtol=1e-5, atol=1e-6)


def test_broken_path_is_refused():
    """A path that does not end at x1 fails its boundary check (the check can fail)."""

    class Broken(px.flows.AbstractPath):
        gamma: px.flows.AbstractGamma = px.flows.ZeroGamma()

        def alpha(self, t):
            return 1.0 - jnp.asarray(t)

        def beta(self, t):
            return 0.9 * jnp.asarray(t)

    with pytest.raises(ValueError, match=r"beta\(1\) = 1.0 violated"):
        Broken()


@pytest.mark.parametrize("build,match", [
    (lambda: px.flows.VPPath(beta_min=1.0, beta_max=0.5), "beta_min < beta_max"),
    (lambda: px.flows.BridgeGamma(-1.0), "scale must be > 0"),
    (lambda: px.flows.ParabolicGamma(0.0), "scale must be > 0"),
    (lambda: px.flows.LinearPath(gamma=0.5), "must be an AbstractGamma"),
])
def test_bad_parameters(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()
