"""A flow as a generative function and as a NumPyro distribution (exact Gaussian field)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density as numpyro_log_density
from scipy.stats import norm

import ppl_ext as px
from ppl_ext.flows import FlowDistribution, FlowModel
from tests.flows import exact
from tests.helpers import assert_unbiased, many

K_SE = 4
PARAMS = {"m": jnp.asarray(1.0), "s": jnp.asarray(2.0)}


def field(params, t, x):
    return exact.gaussian_velocity(t, x, params["m"], params["s"])


def test_simulate_and_assess_give_the_gaussian_density():
    flow = FlowModel(field, dim=1)

    @px.expectation
    def run(params):
        trace = flow.simulate(params)
        return trace.choices["x"], trace.log_density, flow.assess(trace.choices, params)

    x, simulated, assessed = many(lambda k: run(k, PARAMS), num=10_000)
    closed_form = norm.logpdf(np.asarray(x[:, 0], np.float64), 1.0, 2.0)
    np.testing.assert_allclose(simulated, closed_form, atol=1e-4)
    np.testing.assert_allclose(assessed, closed_form, atol=1e-4)
    assert_unbiased(x[:, 0], 1.0, k=K_SE, what="flow mean")
    assert_unbiased((x[:, 0] - 1.0) ** 2, 4.0, k=K_SE, what="flow variance")


def test_entropy_gradient_through_the_flow():
    """`E[-log q(x)]` of N(m, s²) is `log s + const`: gradient `(0, 1/s)`."""
    flow = FlowModel(field, dim=1, num_steps=16)

    @px.expectation
    def entropy(params):
        return -flow.simulate(params).log_density

    grads = entropy.grad(jax.random.key(0), PARAMS)
    np.testing.assert_allclose([grads["m"], grads["s"]], [0.0, 0.5], atol=1e-4)


def test_numpyro_distribution_as_a_prior():
    prior = FlowDistribution(field, PARAMS, dim=1)

    def model(y):
        z = numpyro.sample("z", prior)
        numpyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    z, y = jnp.array([0.3]), jnp.array([1.5])
    def log_joint(z):
        return numpyro_log_density(model, (y,), {}, {"z": z})[0]

    value, grad = jax.jit(jax.value_and_grad(log_joint))(z)
    expected = norm.logpdf(0.3, 1.0, 2.0) + norm.logpdf(1.5, 0.3, 1.0)
    np.testing.assert_allclose(value, expected, atol=1e-4)
    np.testing.assert_allclose(grad, [-(0.3 - 1.0) / 4.0 + (1.5 - 0.3)], atol=1e-3)
    draws = jax.jit(lambda k: prior.sample(k, (5000,)))(jax.random.key(3))
    assert draws.shape == (5000, 1)
    assert_unbiased(draws[:, 0], 1.0, k=K_SE, what="FlowDistribution mean")
    assert jax.eval_shape(prior.log_prob, jnp.zeros((2, 3, 1))).shape == (2, 3)


def test_distribution_is_a_pytree_over_its_parameters():
    prior = FlowModel(field, dim=1, num_steps=8).distribution(PARAMS)
    leaves, tree = jax.tree.flatten(prior)
    assert len(leaves) == 2
    shifted = jax.tree.unflatten(tree, [leaf + 1.0 for leaf in leaves])  # m = 2, s = 3
    value = jax.jit(lambda d: d.log_prob(jnp.zeros(1)))(shifted)
    np.testing.assert_allclose(value, norm.logpdf(0.0, 2.0, 3.0), atol=1e-3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: FlowModel(field, dim=0), ValueError, "dim"),
    (lambda: FlowModel("v", dim=1), TypeError, "callable"),
    (lambda: FlowModel(field, dim=1, solver="rk9"), ValueError, "unknown solver"),
    (lambda: FlowModel(field, dim=1, num_steps=0), ValueError, "num_steps"),
    (lambda: FlowModel(field, dim=2).assess({"x": jnp.zeros(3)}, PARAMS), ValueError,
     r"shape \(2,\)"),
    (lambda: FlowModel(field, dim=2).assess({"y": jnp.zeros(2)}, PARAMS), ValueError,
     "must hold 'x'"),
    (lambda: FlowDistribution(field, PARAMS, dim=1).log_prob(jnp.zeros(2)), ValueError,
     r"end in \(1,\)"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
