"""Exact terminal distributions by dynamic programming, against enumeration and sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_ext.gfn import (
    Hypergrid,
    MLPPolicy,
    empirical_terminal_distribution,
    evaluate,
    log_partition,
    reward_distribution,
    sample_trajectories,
    terminal_distribution,
)
from tests.helpers import NUM_ESTIMATES, assert_unbiased


def random_policy(dimension, side, seed=0, hidden_sizes=(16,), scale=3.0):
    policy = MLPPolicy(Hypergrid(dimension, side), hidden_sizes=hidden_sizes,
                       learned_backward=False)
    params = policy.init(jax.random.key(seed))
    # larger weights than the default init, so the policy is far from uniform
    params["forward"] = jax.tree.map(lambda w: scale * w, params["forward"])
    return policy, params


def enumerate_terminal_distribution(policy, params):
    """Sum over every trajectory, by recursion on the host (independent of the DP)."""
    env = policy.env
    side, dimension = env.side, env.dimension
    table = {}
    states = env.all_states()
    log_probs = jax.vmap(lambda s: policy.forward_log_probs(params, s))(states)
    for s, row in zip(np.asarray(states), np.asarray(log_probs, np.float64)):
        table[tuple(s)] = np.exp(row)
    out = np.zeros(side**dimension)

    def walk(state, probability):
        probs = table[state]
        out[int(np.ravel_multi_index(state, (side,) * dimension))] += probability * probs[-1]
        for d in range(dimension):
            if state[d] < side - 1:
                child = tuple(x + (i == d) for i, x in enumerate(state))
                walk(child, probability * probs[d])

    walk((0,) * dimension, 1.0)
    return out


@pytest.mark.parametrize("dimension,side", [(1, 5), (2, 4), (3, 3)])
def test_dp_matches_enumeration_of_all_trajectories(dimension, side):
    policy, params = random_policy(dimension, side)
    exact = enumerate_terminal_distribution(policy, params)
    dp = np.asarray(terminal_distribution(policy, params), np.float64)
    np.testing.assert_allclose(dp, exact, atol=1e-6)
    assert dp.sum() == pytest.approx(1.0, abs=1e-5)


def test_uniform_policy_dp_in_one_dimension():
    # a chain 0 -> 1 -> 2 -> 3 exiting w.p. 1/2 except at the end: 1/2, 1/4, 1/8, 1/8
    policy, params = random_policy(1, 4)
    params["forward"] = jax.tree.map(jnp.zeros_like, params["forward"])
    np.testing.assert_allclose(terminal_distribution(policy, params),
                               [0.5, 0.25, 0.125, 0.125], atol=1e-7)


def test_dp_sums_to_one_on_larger_grids():
    for dimension, side in [(2, 8), (4, 5)]:
        policy, params = random_policy(dimension, side)
        assert float(terminal_distribution(policy, params).sum()) == pytest.approx(1.0, abs=1e-4)


def test_dp_matches_monte_carlo_histogram():
    # K_SE = 4 standard errors per state, 16 states, 10^4 trajectories
    policy, params = random_policy(2, 4, seed=1, scale=1.0)
    batch = sample_trajectories(jax.random.key(2), policy, params, NUM_ESTIMATES)
    index = jax.vmap(policy.env.state_index)(batch.terminal_state)
    indicators = np.asarray(jax.nn.one_hot(index, 16), np.float64)
    exact = np.asarray(terminal_distribution(policy, params), np.float64)
    assert exact.min() > 1e-3  # every state is visited often enough for the check to bite
    assert_unbiased(indicators, exact, what="terminal histogram")


def test_full_exploration_samples_the_uniform_valid_action_policy():
    policy, params = random_policy(2, 4, seed=3)
    batch = sample_trajectories(jax.random.key(4), policy, params, NUM_ESTIMATES,
                                exploration=1.0)
    index = jax.vmap(policy.env.state_index)(batch.terminal_state)
    indicators = np.asarray(jax.nn.one_hot(index, 16), np.float64)
    uniform = dict(params, forward=jax.tree.map(jnp.zeros_like, params["forward"]))
    exact = np.asarray(terminal_distribution(policy, uniform), np.float64)
    assert_unbiased(indicators, exact, what="epsilon = 1 histogram")


def test_sampled_trajectories_are_consistent():
    policy, params = random_policy(2, 4, seed=5)
    env = policy.env
    batch = sample_trajectories(jax.random.key(6), policy, params, 200)
    active = np.asarray(batch.active)
    lengths = active.sum(1)
    assert np.all(active[:, 0]) and np.all(lengths >= 1)
    # active steps come first; the last active action is the exit
    assert np.all(np.diff(active.astype(int), axis=1) <= 0)
    last = np.asarray(batch.actions)[np.arange(200), lengths - 1]
    assert np.all(last == env.exit_action)
    # the number of moves equals the coordinate sum of the terminal state
    np.testing.assert_array_equal(lengths - 1, np.asarray(batch.terminal_state).sum(1))
    np.testing.assert_array_equal(np.asarray(batch.states)[:, -1], batch.terminal_state)
    # recomputed log-probabilities agree with the recorded ones
    for i in range(5):
        for t in range(int(lengths[i])):
            s, a = batch.states[i, t], batch.actions[i, t]
            assert float(batch.log_pf[i, t]) == pytest.approx(
                float(policy.forward_log_probs(params, s)[a]), abs=1e-5)
    np.testing.assert_allclose(batch.log_reward, jax.vmap(env.log_reward)(batch.terminal_state))


def test_evaluate_reports_exact_distances():
    policy, params = random_policy(2, 8)
    info = evaluate(policy, params)
    p, q = terminal_distribution(policy, params), reward_distribution(policy.env)
    assert float(info.l1_distance) == pytest.approx(float(jnp.abs(p - q).sum()), rel=1e-6)
    assert float(info.total_variation) == pytest.approx(float(info.l1_distance) / 2)
    assert float(info.log_z_error) == pytest.approx(float(log_partition(policy.env)), rel=1e-6)
    # torchgfn's l1_dist is the mean over the 64 terminal states
    assert float(info.torchgfn_l1_distance) == pytest.approx(
        float(jnp.abs(p - q).mean()), rel=1e-6)


def test_empirical_distribution_is_the_histogram_of_sampled_terminal_states():
    policy, params = random_policy(2, 4, seed=7, scale=1.0)
    key = jax.random.key(8)
    frequencies = np.asarray(empirical_terminal_distribution(key, policy, params, 5000))
    batch = sample_trajectories(key, policy, params, 5000)
    index = np.asarray(jax.vmap(policy.env.state_index)(batch.terminal_state))
    np.testing.assert_allclose(frequencies, np.bincount(index, minlength=16) / 5000,
                               atol=1e-7)


def test_evaluation_rejects_non_policies():
    with pytest.raises(TypeError, match="needs a policy"):
        terminal_distribution(Hypergrid(2, 4), {})
    with pytest.raises(TypeError, match="needs an environment"):
        reward_distribution("hypergrid")
