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


# ----------------------------------------------------------- divergences and sample metrics


def test_kl_and_jensen_shannon_on_hand_computed_distributions():
    import math

    from ppl_ext.gfn import jensen_shannon, kl_divergence

    p, q = [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]
    assert float(kl_divergence(p, q)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(kl_divergence(q, p)) == math.inf  # q puts mass where p has none
    assert float(kl_divergence(q, q)) == pytest.approx(0.0, abs=1e-7)
    assert float(jensen_shannon([1.0, 0.0], [0.0, 1.0])) == pytest.approx(math.log(2))
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4)
    expected = 0.5 * (math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    assert float(jensen_shannon([1.0, 0.0], [0.5, 0.5])) == pytest.approx(expected, rel=1e-6)
    assert float(jensen_shannon([0.5, 0.5], [1.0, 0.0])) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same length"):
        kl_divergence([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        jensen_shannon([], [])


def test_evaluate_reports_exact_kls_and_js():
    policy, params = random_policy(2, 4, seed=3)
    info = evaluate(policy, params)
    p = np.asarray(terminal_distribution(policy, params), np.float64)
    q = np.asarray(reward_distribution(policy.env), np.float64)
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(np.where(a > 0, a * np.log(a / b), 0.0)))  # noqa: E731
    assert float(info.kl_target_model) == pytest.approx(kl(q, p), rel=1e-4)
    assert float(info.kl_model_target) == pytest.approx(kl(p, q), rel=1e-4)
    assert float(info.jensen_shannon) == pytest.approx((kl(p, m) + kl(q, m)) / 2, rel=1e-4)
    assert 0 < float(info.jensen_shannon) < np.log(2)


def test_num_modes_found_counts_distinct_modes_once():
    from ppl_ext.gfn import num_modes_found

    env = Hypergrid(dimension=2, side=8)  # the ring {1, 6}^2 has R = 2.6 (4 states)
    samples = jnp.array([[1, 1], [1, 1], [6, 1], [6, 1], [0, 0], [3, 4], [1, 6]])
    # num_top = 1: ties with the best reward count, so the 4 ring states are the modes
    assert int(num_modes_found(env, samples, num_top=1)) == 3
    assert int(num_modes_found(env, samples, num_top=4)) == 3
    # the 5th best reward is 0.6 (12 outer states); (0, 0) joins
    assert int(num_modes_found(env, samples, num_top=5)) == 4
    is_mode = lambda s: env.log_reward(s) > jnp.log(0.35)  # noqa: E731  R in {0.6, 2.6}
    assert int(num_modes_found(env, samples, is_mode=is_mode)) == 4
    with pytest.raises(ValueError, match="exactly one"):
        num_modes_found(env, samples)
    with pytest.raises(ValueError, match="exactly one"):
        num_modes_found(env, samples, is_mode=is_mode, num_top=2)
    with pytest.raises(ValueError, match="num_top"):
        num_modes_found(env, samples, num_top=0)
    with pytest.raises(ValueError, match="empty batch"):
        num_modes_found(env, jnp.zeros((0, 2), jnp.int32), num_top=1)
    with pytest.raises(ValueError, match="shape"):
        num_modes_found(env, jnp.zeros((3,), jnp.int32), num_top=1)


def test_num_modes_found_ignores_states_that_cannot_exit():
    from ppl_ext.gfn import SetGeneration, num_modes_found

    env = SetGeneration((0.0, -1.0, 1.0), set_size=2)
    samples = jnp.array([[1, 1, 0], [0, 1, 0], [0, 1, 1]])  # {0,1}, {1} (partial), {1,2}
    # is_mode true everywhere: only the two complete sets count
    assert int(num_modes_found(env, samples, is_mode=lambda s: True)) == 2
    # the best set is {0, 1} (energy -1)
    assert int(num_modes_found(env, samples, num_top=1)) == 1


def test_top_k_reward_uses_distinct_states():
    import math

    from ppl_ext.gfn import top_k_reward

    env = Hypergrid(dimension=2, side=8)
    samples = jnp.array([[1, 1], [1, 1], [1, 1], [0, 0], [3, 4], [0, 7]])
    # distinct rewards: 2.6, 0.6, 0.1, 0.6
    assert float(top_k_reward(env, samples, num_top=1)) == pytest.approx(2.6, rel=1e-5)
    assert float(top_k_reward(env, samples, num_top=3)) == pytest.approx(3.8 / 3, rel=1e-5)
    # fewer distinct states than num_top: their mean
    assert float(top_k_reward(env, samples, num_top=100)) == pytest.approx(3.9 / 4, rel=1e-5)
    assert math.isfinite(float(top_k_reward(env, samples[:1], num_top=5)))
    with pytest.raises(ValueError, match="num_top"):
        top_k_reward(env, samples, num_top=0)


def test_first_occurrences_match_numpy_unique():
    from ppl_ext.gfn._evaluate import _first_occurrences

    rows = np.asarray(jax.random.randint(jax.random.key(0), (300, 3), 0, 4))
    first = np.asarray(_first_occurrences(jnp.asarray(rows)))
    _, index = np.unique(rows, axis=0, return_index=True)
    expected = np.zeros(300, bool)
    expected[index] = True
    np.testing.assert_array_equal(first, expected)
