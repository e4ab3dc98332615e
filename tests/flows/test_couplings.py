"""Minibatch couplings against brute force and an independent Sinkhorn."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_ext.flows import (EntropicOTCoupling, ExactOTCoupling, IndependentCoupling,
                           squared_distances)
from tests.helpers import assert_unbiased

K_SE = 4


def brute_force(x0, x1):
    """The permutation of least total squared distance, by enumerating all of them."""
    x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    best = min(itertools.permutations(range(len(x0))),
               key=lambda p: sum(cost[i, j] for i, j in enumerate(p)))
    return np.array(best), cost


@pytest.mark.parametrize("size,dim,seed", [(2, 1, 0), (3, 2, 1), (4, 1, 2), (5, 3, 3),
                                           (6, 2, 4), (6, 1, 5)])
def test_exact_coupling_is_the_brute_force_optimum(size, dim, seed):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0, x1 = jax.random.normal(k0, (size, dim)), 2.0 * jax.random.normal(k1, (size, dim))
    indices = np.asarray(jax.jit(ExactOTCoupling().match)(x0, x1))
    assert sorted(indices.tolist()) == list(range(size)), "not a permutation"
    best, cost = brute_force(x0, x1)
    np.testing.assert_array_equal(indices, best)
    # and the identity is worse (the test can fail)
    assert cost[np.arange(size), best].sum() <= cost[np.arange(size), np.arange(size)].sum()


def test_independent_coupling_is_the_identity():
    x = jnp.zeros((4, 2))
    np.testing.assert_array_equal(IndependentCoupling().match(x, x), np.arange(4))


def numpy_sinkhorn(cost, epsilon, num_iterations=5000):
    """Plan with uniform marginals for `cost / mean(cost)` at regularisation epsilon."""
    cost = cost / cost.mean()
    size = cost.shape[0]
    kernel = np.exp(-cost / epsilon)
    u, v = np.ones(size), np.ones(size)
    for _ in range(num_iterations):
        u = (1.0 / size) / (kernel @ v)
        v = (1.0 / size) / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


def test_entropic_plan_matches_an_independent_sinkhorn():
    k0, k1 = jax.random.split(jax.random.key(7))
    x0, x1 = jax.random.normal(k0, (5, 2)), jax.random.normal(k1, (5, 2)) + 1.0
    coupling = EntropicOTCoupling(epsilon=0.2)
    plan = np.asarray(jax.jit(coupling.plan)(x0, x1))
    expected = numpy_sinkhorn(np.asarray(squared_distances(x0, x1), np.float64), 0.2)
    np.testing.assert_allclose(plan, expected, atol=2e-4)


def test_entropic_row_sampling_follows_the_plan():
    k0, k1 = jax.random.split(jax.random.key(8))
    x0, x1 = jax.random.normal(k0, (4, 1)), jax.random.normal(k1, (4, 1))
    coupling = EntropicOTCoupling(epsilon=2.0)
    plan = np.asarray(jax.jit(coupling.plan)(x0, x1), np.float64)
    conditional = plan / plan.sum(1, keepdims=True)
    assert conditional.max() < 0.9  # a plan far from a permutation: a real test

    def one_hot(key):
        uniforms = jax.random.uniform(key, (4,))
        return jax.nn.one_hot(coupling.match(x0, x1, uniforms), 4)

    draws = jax.jit(jax.vmap(one_hot))(jax.random.split(jax.random.key(9), 20_000))
    assert_unbiased(draws, conditional, k=K_SE, what="row sampling")


def test_entropic_permutation_tends_to_exact_ot():
    k0, k1 = jax.random.split(jax.random.key(10))
    x0, x1 = jax.random.normal(k0, (6, 2)), jax.random.normal(k1, (6, 2))
    indices = np.asarray(jax.jit(EntropicOTCoupling(epsilon=0.01, permutation=True).match)(
        x0, x1))
    assert sorted(indices.tolist()) == list(range(6))
    np.testing.assert_array_equal(indices, brute_force(x0, x1)[0])


@pytest.mark.parametrize("call,match", [
    (lambda: ExactOTCoupling().match(jnp.zeros((3, 2)), jnp.zeros((4, 2))), "shape"),
    (lambda: ExactOTCoupling().match(jnp.zeros(3), jnp.zeros(3)), "shape"),
    (lambda: ExactOTCoupling().match(jnp.zeros((0, 2)), jnp.zeros((0, 2))), "empty"),
    (lambda: EntropicOTCoupling(epsilon=0.0), "epsilon"),
    (lambda: EntropicOTCoupling().match(jnp.zeros((3, 1)), jnp.ones((3, 1))), "uniforms"),
    (lambda: EntropicOTCoupling().match(jnp.zeros((3, 1)), jnp.ones((3, 1)), jnp.zeros(2)),
     "uniforms"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
