"""Variance sanity: the estimators rank as theory says on simple problems."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import many


def grad_variance(estimator, theta=0.5, num=10_000):
    f = px.expectation(lambda t: (px.sample(dist.Normal(t, 1.0), estimator) - 3.0) ** 2)
    return float(np.var(np.asarray(many(lambda k: f.grad(k, theta), num=num))))


def test_reparam_below_reinforce_on_normal_location():
    # Var of the reparam gradient 2(x - 3) is 4; the score-function one is far larger.
    assert grad_variance(px.reparam) < 0.5 * grad_variance(px.reinforce)


def test_baseline_reduces_reinforce_variance():
    # E[(x - 3)^2] = 7.25 at theta = 0.5: a baseline near it removes most of the variance.
    assert grad_variance(px.Reinforce(baseline=7.25)) < 0.5 * grad_variance(px.reinforce)
    assert grad_variance(px.LeaveOneOut(8)) < grad_variance(px.reinforce)


@pytest.mark.parametrize("estimator", [px.enum, px.mvd], ids=["enum", "mvd"])
def test_exact_gradients_have_zero_variance_on_deterministic_programs(estimator):
    values = jnp.array([1.0, 4.0, -2.0])
    f = px.expectation(
        lambda t: values[px.sample(dist.Categorical(logits=t * jnp.arange(3.0)), estimator)])
    grads = np.asarray(many(lambda k: f.grad(k, 0.3), num=1000))
    assert np.ptp(grads) < 1e-5
    p = jax.nn.softmax(0.3 * jnp.arange(3.0))
    exact = jax.grad(lambda t: jnp.dot(jax.nn.softmax(t * jnp.arange(3.0)), values))(0.3)
    assert np.allclose(grads[0], exact, rtol=1e-4)
    if estimator is px.enum:
        vals = np.asarray(many(lambda k: f.estimate(k, 0.3), num=100))
        assert np.allclose(vals, float(jnp.dot(p, values)), rtol=1e-5)


def test_unused_draws_are_dropped_and_add_no_variance():
    def used_only(t):
        return px.sample(dist.Normal(t, 1.0)) ** 2

    def with_unused(t):
        unused = px.sample(dist.Normal(t, 1.0), px.reinforce)  # noqa: F841
        return px.sample(dist.Normal(t, 1.0)) ** 2

    var = [float(np.var(np.asarray(many(lambda k: px.expectation(f).grad(k, 2.0)))))
           for f in (used_only, with_unused)]
    assert var[1] < 1.2 * var[0]  # the score term of the unused site would multiply it
