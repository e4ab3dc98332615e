"""`px.gfn.ForwardPolicySampler`: a forward policy as a generative function over trajectories.

Exact references come from `terminal_distribution`'s dynamic programme over the states
(no sampling), differentiated by `jax.grad` for the gradient checks. K_SE = 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext as px
from ppl_ext.gfn import ForwardPolicySampler, Hypergrid, TabularPolicy, terminal_distribution
from tests.helpers import assert_unbiased, many

ENV = Hypergrid(dimension=2, side=3)
POLICY = TabularPolicy(ENV)
PARAMS = POLICY.init(jax.random.key(0))
PARAMS["forward"] = 0.7 * jax.random.normal(jax.random.key(1), PARAMS["forward"].shape)
STATES = ENV.all_states()
#: a test function of the terminal state, one value per state
VALUES = jax.random.normal(jax.random.key(2), (STATES.shape[0],))


def _value(x):
    return VALUES[ENV.state_index(x)]


def test_terminal_law_matches_the_exact_one():
    sampler = ForwardPolicySampler(POLICY)
    run = px.expectation(lambda p: sampler.simulate(p).retval.terminal_state.astype(float))
    terminals = many(lambda k: run.estimate(k, PARAMS), num=40_000).astype(jnp.int32)
    indices = jax.vmap(ENV.state_index)(terminals)
    frequencies = np.asarray(indices[:, None] == jnp.arange(STATES.shape[0])[None], float)
    exact = np.asarray(terminal_distribution(POLICY, PARAMS))
    assert_unbiased(frequencies, exact, what="P_T(x)")


def test_gradient_of_an_expectation_over_objects_is_unbiased():
    sampler = ForwardPolicySampler(POLICY)
    objective = px.expectation(lambda p: _value(sampler.simulate(p).retval.terminal_state))

    def exact(params):
        return jnp.sum(terminal_distribution(POLICY, params) * VALUES)

    values, grads = many(lambda k: objective.value_and_grad(k, PARAMS), num=40_000)
    assert_unbiased(values, exact(PARAMS), what="E[c(x)]")
    exact_grad = jax.grad(exact)(PARAMS)["forward"]
    assert float(jnp.max(jnp.abs(exact_grad))) > 0.05  # not a test of zeros
    assert_unbiased(grads["forward"], exact_grad, what="d E[c(x)] / d forward logits")


def test_assess_replays_the_trajectory():
    sampler = ForwardPolicySampler(POLICY)
    def program(p):
        trace = sampler.simulate(p)
        return (trace.log_density, trace.choices["actions"].astype(float),
                trace.retval.length.astype(float))

    log_density, actions, length = px.expectation(program).estimate(jax.random.key(5), PARAMS)
    actions = actions.astype(jnp.int32)
    assert np.isclose(sampler.assess({"actions": actions}, PARAMS), log_density, atol=1e-5)
    # padding after the exit repeats the exit and carries no density
    assert np.all(actions[int(length) - 1:] == ENV.exit_action)
    bad = actions.at[0].set(ENV.exit_action + 1)
    assert sampler.assess({"actions": bad}, PARAMS) == -jnp.inf
    never_exits = jnp.zeros(ENV.max_length, jnp.int32)  # keeps moving along axis 0
    assert sampler.assess({"actions": never_exits}, PARAMS) == -jnp.inf


def test_bad_input():
    with pytest.raises(TypeError, match="policy"):
        ForwardPolicySampler(ENV)
    with pytest.raises(TypeError, match="local estimator"):
        ForwardPolicySampler(POLICY, px.enum)
    sampler = ForwardPolicySampler(POLICY)
    with pytest.raises(ValueError, match="choices"):
        sampler.assess({"x": jnp.zeros(3)}, PARAMS)
    with pytest.raises(ValueError, match="shape"):
        sampler.assess({"actions": jnp.zeros(2, jnp.int32)}, PARAMS)
