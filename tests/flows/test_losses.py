"""The interpolant losses at their exact minimisers (finite data, Gaussian source).

The field family `f_θ(t, x) = f*(t, x) + θ_a + θ_b x` around the exact marginal field
`f*` (a softmax over the data points, `tests/flows/exact.py`) has loss gradients known in
closed form from the first two moments of `x_t` (the residual `f* - target` has
conditional mean zero), and the loss value at `θ = 0` is a quadrature of `E|f*|²`.
Means of 10^4 estimates are compared within K_SE = 4 standard errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_ext.flows import (BridgeGamma, LinearPath, TrigonometricPath, denoiser_loss,
                           drift_loss, score_loss, velocity_loss)
from tests.flows import exact
from tests.helpers import assert_unbiased, many

K_SE = 4
DATA = jnp.asarray(exact.DATA)
MEAN, MEAN2 = exact.MEAN, exact.MEAN_SQUARE
THETA = {"a": jnp.asarray(0.3), "b": jnp.asarray(-0.2)}
ZERO = {"a": jnp.asarray(0.0), "b": jnp.asarray(0.0)}


def perturbed(field):
    return lambda params, t, x: field(t, x) + params["a"] + params["b"] * x


def check(loss, exact_value, exact_gradient, what, data=DATA):
    values, grads = many(lambda k: loss.value_and_grad(k, ZERO, data))
    assert_unbiased(values, exact_value, k=K_SE, what=f"{what} value")
    assert_unbiased(np.stack([grads["a"], grads["b"]], -1), exact_gradient(ZERO), k=K_SE,
                    what=f"{what} gradient at the minimiser")
    _, grads = many(lambda k: loss.value_and_grad(k, THETA, data), seed=1)
    expected = exact_gradient(THETA)
    assert np.all(np.abs(expected) > 0.05)  # the test can tell a gradient from zero
    assert_unbiased(np.stack([grads["a"], grads["b"]], -1), expected, k=K_SE,
                    what=f"{what} gradient away from it")


def _quadratic(ex, ex2, factor):
    def gradient(theta):
        a, b = float(theta["a"]), float(theta["b"])
        return factor * np.array([a + b * ex, a * ex + b * ex2])
    return gradient


@pytest.mark.parametrize("batch_size", [None, 2])
def test_velocity_loss_linear_path(batch_size):
    loss = velocity_loss(perturbed(exact.mixture_velocity), "linear", batch_size=batch_size)
    value = 1.0 + MEAN2 - exact.mixture_field_square(exact.mixture_velocity)
    check(loss, value, _quadratic(MEAN / 2, 1 / 3 + MEAN2 / 3, 2.0),
          f"velocity/linear/batch {batch_size}")


def test_velocity_loss_trigonometric_path():
    def field(t, x):
        return exact.mixture_velocity(t, x, exact.trigonometric)

    loss = velocity_loss(perturbed(field), TrigonometricPath())
    value = math.pi**2 / 8 * (1.0 + MEAN2) - exact.mixture_field_square(
        field, exact.trigonometric)
    check(loss, value, _quadratic(2 * MEAN / math.pi, 0.5 + MEAN2 / 2, 2.0),
          "velocity/trigonometric")


def test_drift_loss_bridge_gamma():
    loss = drift_loss(perturbed(exact.mixture_drift_bridge), LinearPath(BridgeGamma(2.0)))
    value = -0.5 * exact.mixture_field_square(exact.mixture_drift_bridge,
                                              gamma_fn=exact.bridge)
    check(loss, value, _quadratic(MEAN / 2, 1 / 3 + MEAN2 / 3 + 2.0 / 6, 1.0),
          "drift/bridge")


def test_score_loss():
    loss = score_loss(perturbed(exact.mixture_score), "linear")

    def sigma_score(t, x):
        return (1 - t) * exact.mixture_score(t, x)

    value = 1.0 - exact.mixture_field_square(sigma_score)
    e_s2, e_s2x, e_s2x2 = 1 / 3, MEAN / 12, 1 / 5 + MEAN2 / 30

    def gradient(theta):
        a, b = float(theta["a"]), float(theta["b"])
        return 2.0 * np.array([a * e_s2 + b * e_s2x, a * e_s2x + b * e_s2x2])

    check(loss, value, gradient, "score")


def test_denoiser_loss():
    def denoiser(t, x):
        return -(1 - t) * exact.mixture_score(t, x)

    loss = denoiser_loss(perturbed(denoiser), "linear")
    value = 1.0 - exact.mixture_field_square(denoiser)
    check(loss, value, _quadratic(MEAN / 2, 1 / 3 + MEAN2 / 3, 2.0), "denoiser")


def test_wrong_target_is_detected():
    """The check above fails for a field that is not the minimiser (a swapped sign)."""
    loss = velocity_loss(perturbed(lambda t, x: -exact.mixture_velocity(t, x)), "linear")
    grads = many(lambda k: loss.grad(k, ZERO, DATA), num=2000)
    assert abs(float(np.mean(grads["a"]))) > 0.5


def test_two_sided_losses_run_with_source_data():
    field = perturbed(lambda t, x: jnp.zeros_like(x))
    source = jnp.linspace(-1.0, 1.0, 5)[:, None]
    for loss in (drift_loss(field, LinearPath(BridgeGamma()), batch_size=4),
                 score_loss(field, LinearPath(BridgeGamma()), batch_size=4),
                 velocity_loss(field, "linear", "exact_ot", batch_size=4)):
        value, grads = loss.value_and_grad(jax.random.key(0), THETA, DATA, source)
        assert np.isfinite(value) and np.isfinite(grads["a"])
    # entropic OT with the Gaussian source: row sampling draws its uniforms as a site
    loss = velocity_loss(field, "linear", "entropic_ot", batch_size=4)
    value, grads = loss.value_and_grad(jax.random.key(1), THETA, DATA)
    assert np.isfinite(value) and np.isfinite(grads["b"])


FIELD = perturbed(lambda t, x: jnp.zeros_like(x))


@pytest.mark.parametrize("build,args,match", [
    (lambda: velocity_loss(FIELD), (jnp.zeros(3),), r"x1 must have shape \(num_data, dim\)"),
    (lambda: velocity_loss(FIELD), (jnp.zeros((0, 1)),), "x1 is empty"),
    (lambda: velocity_loss(FIELD), (DATA, jnp.zeros((3, 2))), "the same dim"),
    (lambda: velocity_loss(FIELD), (DATA, jnp.zeros((4, 1))), "equal lengths"),
    (lambda: score_loss(FIELD), (DATA, jnp.zeros((3, 1))), "no Gaussian part"),
    (lambda: velocity_loss(lambda p, t, x: jnp.zeros(2)), (DATA,), "returned shape"),
])
def test_bad_data(build, args, match):
    with pytest.raises(ValueError, match=match):
        build()(jax.random.key(0), THETA, *args)


@pytest.mark.parametrize("build,error,match", [
    (lambda: velocity_loss(FIELD, time_interval=(-0.1, 1.0)), ValueError, "outside"),
    (lambda: velocity_loss(FIELD, time_interval=(0.5, 1.5)), ValueError, "outside"),
    (lambda: velocity_loss(FIELD, time_interval=(0.5, 0.5)), ValueError, "t_lo < t_hi"),
    (lambda: velocity_loss(FIELD, "lineer"), ValueError, "unknown path 'lineer'"),
    (lambda: velocity_loss(FIELD, coupling="exact"), ValueError, "unknown coupling 'exact'"),
    (lambda: velocity_loss(FIELD, batch_size=0), ValueError, "batch_size"),
    (lambda: velocity_loss("v"), TypeError, "callable"),
    (lambda: velocity_loss(FIELD, LinearPath(BridgeGamma())), ValueError, "drift_loss"),
])
def test_bad_options(build, error, match):
    with pytest.raises(error, match=match):
        build()
