"""Minibatch couplings against brute force and an independent Sinkhorn."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scipy.optimize import linear_sum_assignment

from ppl_ext.flows import (AuctionOTCoupling, EntropicOTCoupling, ExactOTCoupling,
                           IndependentCoupling, auction_assignment, squared_distances,
                           velocity_loss)
from tests.helpers import assert_unbiased

K_SE = 4


def brute_force(x0, x1):
    """The permutation of least total squared distance, by enumerating all of them."""
    x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    best = min(itertools.permutations(range(len(x0))),
               key=lambda p: sum(cost[i, j] for i, j in enumerate(p)))
    return np.array(best), cost


@pytest.mark.parametrize("solver", ["pot", "scipy", "hungarian"])
@pytest.mark.parametrize("size,dim,seed", [(2, 1, 0), (3, 2, 1), (4, 1, 2), (5, 3, 3),
                                           (6, 2, 4), (6, 1, 5)])
def test_exact_coupling_is_the_brute_force_optimum(size, dim, seed, solver):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0, x1 = jax.random.normal(k0, (size, dim)), 2.0 * jax.random.normal(k1, (size, dim))
    indices = np.asarray(jax.jit(ExactOTCoupling(solver=solver).match)(x0, x1))
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
    (lambda: ExactOTCoupling(solver="lapjv"), "solver"),
    (lambda: ExactOTCoupling().match(jnp.zeros((3, 2)).at[1, 0].set(jnp.nan),
                                     jnp.zeros((3, 2))), "x0 has NaN"),
    (lambda: ExactOTCoupling(solver="hungarian").match(
        jnp.zeros((3, 2)), jnp.zeros((3, 2)).at[0, 1].set(jnp.inf)), "x1 has NaN"),
    (lambda: EntropicOTCoupling(epsilon=0.0), "epsilon"),
    (lambda: AuctionOTCoupling(tolerance=0.0), "tolerance"),
    (lambda: AuctionOTCoupling(tolerance=True), "tolerance"),
    (lambda: AuctionOTCoupling().match(jnp.zeros((3, 2)), jnp.zeros((2, 2))), "shape"),
    (lambda: auction_assignment(jnp.zeros((3, 2))), "square"),
    (lambda: auction_assignment(jnp.zeros((2, 2)), tolerance=2.0), "tolerance"),
    (lambda: EntropicOTCoupling().match(jnp.zeros((3, 1)), jnp.ones((3, 1))), "uniforms"),
    (lambda: EntropicOTCoupling().match(jnp.zeros((3, 1)), jnp.ones((3, 1)), jnp.zeros(2)),
     "uniforms"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------- the auction algorithm


def scipy_optimum(cost):
    cost = np.asarray(cost, np.float64)
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].sum()


def total(cost, indices):
    cost = np.asarray(cost, np.float64)
    return cost[np.arange(len(indices)), np.asarray(indices)].sum()


def assert_permutation(indices, size):
    assert sorted(np.asarray(indices).tolist()) == list(range(size)), "not a permutation"


@pytest.mark.parametrize("size,dim,seed", [(6, 2, 4)])
def test_auction_coupling_is_the_brute_force_optimum(size, dim, seed):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0, x1 = jax.random.normal(k0, (size, dim)), 2.0 * jax.random.normal(k1, (size, dim))
    indices = np.asarray(jax.jit(AuctionOTCoupling().match)(x0, x1))
    assert_permutation(indices, size)
    np.testing.assert_array_equal(indices, brute_force(x0, x1)[0])


def test_auction_minibatches_within_the_bound_and_optimal_in_practice():
    """A vmapped batch of 2-D minibatches of 64 (Gaussian to a shifted Gaussian) against
    scipy's linear_sum_assignment: a permutation within the stated bound, and in fact at
    the optimal cost up to float32 rounding; the identity (independent pairing) is far."""
    size, tolerance = 64, 1e-3
    keys = jax.random.split(jax.random.key(11), 2 * 4).reshape(4, 2)
    x0 = jax.vmap(lambda k: jax.random.normal(k[0], (size, 2)))(keys)
    x1 = jax.vmap(lambda k: 0.5 * jax.random.normal(k[1], (size, 2)) + 2.0)(keys)
    coupling = AuctionOTCoupling(tolerance=tolerance)
    indices = jax.jit(jax.vmap(coupling.match))(x0, x1)
    for b in range(4):
        cost = np.asarray(squared_distances(x0[b], x1[b]), np.float64)
        assert_permutation(indices[b], size)
        best, got = scipy_optimum(cost), total(cost, indices[b])
        assert got <= best + tolerance * (cost.max() - cost.min()) + 1e-4 * best
        np.testing.assert_allclose(got, best, rtol=1e-5)
        assert total(cost, np.arange(size)) > 1.1 * best


def test_auction_is_exact_on_integer_costs():
    """Integer costs with range × tolerance < 1: the auction's optimum is exact."""
    rng = np.random.default_rng(12)
    cost = rng.integers(0, 100, size=(30, 30)).astype(np.float32)
    indices = jax.jit(auction_assignment)(cost)
    assert_permutation(indices, 30)
    assert total(cost, indices) == scipy_optimum(cost)


def test_auction_degenerate_costs():
    solve = jax.jit(auction_assignment)
    assert_permutation(solve(jnp.ones((6, 6))), 6)  # all permutations tie
    np.testing.assert_array_equal(auction_assignment(jnp.array([[3.0]])), [0])
    # equal rows: every row prefers column 0; ties broken without duplicates
    assert_permutation(solve(jnp.tile(jnp.arange(6.0), (6, 1)) ** 2), 6)


def test_auction_coupling_by_name_in_a_loss():
    field = lambda params, t, x: params * x  # noqa: E731
    loss = velocity_loss(field, "linear", "auction_ot", batch_size=4)
    data = jax.random.normal(jax.random.key(13), (20, 2)) + 3.0
    value, grad = jax.jit(jax.value_and_grad(loss, argnums=1))(jax.random.key(14), 0.5, data)
    assert np.isfinite(value) and np.isfinite(grad)


# ------------------------------------------------ the exact coupling's solvers at scale


def reference_cost(x0, x1):
    """Squared distances in float64 with numpy, written apart from ppl_ext."""
    x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    return ((x0[:, None, :] - x1[None, :, :]) ** 2).sum(-1)


def gaussian_pairs(seed, size, dim=2, num=None):
    k0, k1 = jax.random.split(jax.random.key(seed))
    shape = (size, dim) if num is None else (num, size, dim)
    return jax.random.normal(k0, shape), 0.5 * jax.random.normal(k1, shape) + 2.0


@pytest.mark.parametrize("solver", ["pot", "scipy", "hungarian"])
def test_exact_solvers_reach_the_optimum_on_random_minibatches(solver):
    """Gaussian to a shifted Gaussian, b = 64 and 100: the total float64 cost of the
    permutation equals the optimum of an independent float64 solve (the identity is
    far from it, so the test can fail)."""
    match = jax.jit(ExactOTCoupling(solver=solver).match)
    for seed, size in ((20, 64), (21, 100)):
        x0, x1 = gaussian_pairs(seed, size)
        indices = match(x0, x1)
        assert indices.dtype == jnp.int32 and indices.shape == (size,)
        assert_permutation(indices, size)
        cost = reference_cost(x0, x1)
        best = scipy_optimum(cost)
        np.testing.assert_allclose(total(cost, indices), best, rtol=1e-6 if
                                   solver == "hungarian" else 1e-12)
        assert total(cost, np.arange(size)) > 1.1 * best


@pytest.mark.parametrize("solver", ["pot", "scipy", "hungarian"])
def test_exact_solvers_with_ties_and_duplicate_points(solver):
    """Duplicated points and integer grids (many optimal permutations): still a
    permutation of optimal total cost; brute force on a small tied case."""
    rng = np.random.default_rng(22)
    match = jax.jit(ExactOTCoupling(solver=solver).match)
    grid = rng.integers(0, 3, size=(40, 2)).astype(np.float32)
    x1 = np.repeat(rng.integers(0, 3, size=(10, 2)), 4, axis=0).astype(np.float32)
    for a, b in ((grid, x1), (x1, x1), (np.zeros((40, 2), np.float32), x1)):
        indices = match(a, b)
        assert_permutation(indices, 40)
        cost = reference_cost(a, b)
        assert total(cost, indices) == scipy_optimum(cost)
    small0 = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    small1 = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    indices = match(small0, small1)
    assert_permutation(indices, 5)
    best, cost = brute_force(small0, small1)
    assert total(cost, indices) == total(cost, best)


def test_scipy_solver_under_jit_and_vmap_equals_a_loop():
    x0, x1 = gaussian_pairs(23, 32, num=3)
    coupling = ExactOTCoupling()
    batched = jax.jit(jax.vmap(coupling.match))(x0, x1)
    shared = jax.jit(jax.vmap(coupling.match, (0, None)))(x0, x1[0])
    assert batched.shape == (3, 32) and batched.dtype == jnp.int32
    for k in range(3):
        np.testing.assert_array_equal(batched[k], coupling.match(x0[k], x1[k]))
        np.testing.assert_array_equal(shared[k], coupling.match(x0[k], x1[0]))
        np.testing.assert_array_equal(
            batched[k], linear_sum_assignment(reference_cost(x0[k], x1[k]))[1])


def test_pot_solver_falls_back_to_scipy_when_the_simplex_stops_early(monkeypatch):
    """An early stop of the network simplex (iteration limit) must not give a suboptimal
    pairing: the assignment is solved again by scipy."""
    import ot.lp

    from ppl_ext.flows import _couplings

    x0, x1 = gaussian_pairs(27, 16)
    cost = reference_cost(x0, x1)
    real_emd = ot.lp.emd

    def stopped_early(a, b, m, numItermax, log):
        plan, info = real_emd(a, b, m, numItermax=3, log=True)
        return plan, dict(info, result_code=2)

    monkeypatch.setattr(ot.lp, "emd", stopped_early)
    got = _couplings._emd_permutation(cost)
    assert sorted(got.tolist()) == list(range(16))
    assert total(cost, got) == pytest.approx(total(cost, linear_sum_assignment(cost)[1]),
                                             rel=1e-12)


def test_scipy_solver_nan_under_jit_is_an_error_not_a_hang():
    x0, x1 = gaussian_pairs(24, 8)
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.block_until_ready(jax.jit(ExactOTCoupling().match)(x0.at[3, 1].set(jnp.nan),
                                                               x1))


def test_exact_coupling_by_name_in_a_loss_is_differentiable():
    field = lambda params, t, x: params * x  # noqa: E731
    data = jax.random.normal(jax.random.key(25), (20, 2)) + 3.0
    loss = velocity_loss(field, "linear", "exact_ot", batch_size=8)  # the scipy solver
    value, grad = jax.jit(jax.value_and_grad(loss, argnums=1))(jax.random.key(26), 0.5, data)
    assert np.isfinite(value) and np.isfinite(grad)
