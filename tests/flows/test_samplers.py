"""ODE and SDE samplers with the exact field of a Gaussian-to-Gaussian linear path.

From `N(0, 1)` to `N(m, s²)` the marginal velocity and score are affine in `x`
(`tests/flows/exact.py`), the flow map is `x_t = t m + sqrt((1-t)² + t² s²) x0`, and the
Euler–Maruyama chain of the SDE is a Gaussian recursion computed here in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_ext.flows import ode_sample, sde_sample
from tests.flows import exact
from tests.helpers import assert_unbiased

K_SE = 4
M, S = 1.0, 2.0
NUM = 10_000


def velocity(t, x):
    return exact.gaussian_velocity(t, x, M, S)


def score(t, x):
    return exact.gaussian_score(t, x, M, S)


@pytest.fixture(scope="module")
def x0():
    return jax.random.normal(jax.random.key(0), (NUM, 1))


@pytest.mark.parametrize("solver,num_steps,tol", [("tsit5", None, 1e-3), ("heun", 64, 1e-3),
                                                  ("dopri5", 8, 1e-3)])
def test_ode_transports_gaussian_to_gaussian(x0, solver, num_steps, tol):
    x1 = jax.jit(lambda x: ode_sample(velocity, x, solver=solver, num_steps=num_steps))(x0)
    np.testing.assert_allclose(x1, M + S * x0, atol=tol)
    assert_unbiased(x1[:, 0], M, k=K_SE, what="mean")
    assert_unbiased((x1[:, 0] - M) ** 2, S**2, k=K_SE, what="variance")


def test_ode_trajectory_follows_the_flow_map(x0):
    times = jnp.array([0.0, 0.3, 0.7, 1.0])
    path = ode_sample(velocity, x0[:5], save_times=times)
    assert path.shape == (5, 4, 1)
    scale = np.sqrt((1 - times) ** 2 + times**2 * S**2)
    expected = times[None, :, None] * M + scale[None, :, None] * x0[:5, None, :]
    np.testing.assert_allclose(path, expected, atol=1e-3)


def euler_maruyama_moments(epsilon, num_steps, t1=1.0):
    """Mean and variance of the Euler–Maruyama chain from N(0, 1) (float64 recursion)."""
    mean, variance, h = 0.0, 1.0, t1 / num_steps
    for k in range(num_steps):
        t = k * h
        v_t = (1 - t) ** 2 + t**2 * S**2
        slope = (t * S**2 - (1 - t)) / v_t - epsilon / v_t  # coefficient of x in b + ε s
        intercept = M - slope * t * M  # b + ε s = slope (x - t m) + m
        mean = mean + h * (slope * mean + intercept)
        variance = (1 + h * slope) ** 2 * variance + 2 * epsilon * h
    return mean, variance


@pytest.mark.parametrize("brownian,epsilon", [("virtual", 0.5), ("unsafe", 1.0)])
def test_sde_matches_the_euler_maruyama_law(x0, brownian, epsilon):
    num_steps = 50
    x1 = jax.jit(lambda k, x: sde_sample(k, velocity, score, x, epsilon,
                                         num_steps=num_steps, brownian=brownian))(
        jax.random.key(1), x0)
    mean, variance = euler_maruyama_moments(epsilon, num_steps)
    assert abs(mean - M) < 0.05 and abs(variance - S**2) < 0.3  # near the continuous law
    assert_unbiased(x1[:, 0], mean, k=K_SE, what="SDE mean")
    assert_unbiased((x1[:, 0] - mean) ** 2, variance, k=K_SE, what="SDE variance")
    # the diffusion acts: the end point is not the ODE's image of x0
    assert np.std(np.asarray(x1 - (M + S * x0))) > 0.3


def test_sde_with_zero_epsilon_is_the_ode(x0):
    x1 = jax.jit(lambda x: sde_sample(jax.random.key(2), velocity, score, x, 0.0,
                                      num_steps=400))(x0[:10])
    np.testing.assert_allclose(x1, M + S * x0[:10], atol=2e-2)


@pytest.mark.parametrize("call,match", [
    (lambda: sde_sample(jax.random.key(0), velocity, score, jnp.zeros(1), -0.1), "epsilon"),
    (lambda: ode_sample(velocity, jnp.zeros(1), t1=1.5), r"t1 must lie in \[0, 1\]"),
    (lambda: sde_sample(jax.random.key(0), velocity, score, jnp.zeros(1), 0.1, t0=-0.5),
     r"t0 must lie in \[0, 1\]"),
    (lambda: ode_sample(velocity, jnp.zeros(1), solver="rk4"), "unknown solver 'rk4'"),
    (lambda: ode_sample(velocity, jnp.zeros(1), solver="euler"), "num_steps"),
    (lambda: ode_sample(velocity, jnp.zeros(1), num_steps=0), "num_steps"),
    (lambda: ode_sample(velocity, jnp.zeros((2, 2, 1))), "shape"),
    (lambda: sde_sample(jax.random.key(0), velocity, score, jnp.zeros(1), 0.1,
                        brownian="levy"), "brownian"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9])
def test_score_from_velocity_is_the_gaussian_score(t):
    from ppl_ext.flows import LinearPath, TrigonometricPath, score_from_velocity

    def field(params, t, x):
        return velocity(t, x)

    x = jnp.array([0.7, -1.2])
    score_field = score_from_velocity(LinearPath(), field)
    np.testing.assert_allclose(score_field(None, t, x), score(t, x), rtol=1e-4, atol=1e-5)
    # the trigonometric path's own Gaussian field: x_t ~ N(sin m, cos² + sin² s²)
    c, s_ = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
    variance = c**2 + s_**2 * S**2
    dc, ds = -np.pi / 2 * s_, np.pi / 2 * c

    def trig_velocity(params, t, x):
        return ds * M + (dc * c + ds * s_ * S**2) * (x - s_ * M) / variance

    trig_score = score_from_velocity(TrigonometricPath(), trig_velocity)
    np.testing.assert_allclose(trig_score(None, t, x), -(x - s_ * M) / variance, rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(ValueError, match="gamma = 0"):
        from ppl_ext.flows import BridgeGamma
        score_from_velocity(LinearPath(BridgeGamma()), field)
