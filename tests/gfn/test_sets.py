"""Set generation (the FL paper's task) and bit sequences: rewards, energies, exact log Z
and exact terminal laws checked against brute-force enumeration on the host."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_ext.gfn import (
    BitSequence,
    MLPPolicy,
    SetGeneration,
    evaluate,
    log_partition,
    reward_distribution,
    sample_trajectories,
    terminal_distribution,
)
from tests.helpers import NUM_ESTIMATES

K_SE = 4


def members(state):
    return tuple(int(i) for i in np.flatnonzero(np.asarray(state)))


# ------------------------------------------------------------------------ SetGeneration


def test_fl_paper_instances_have_the_published_sizes_and_energy_law():
    for size, (universe, k) in {"small": (30, 20), "medium": (80, 60),
                                "large": (100, 80)}.items():
        env = SetGeneration.fl_paper(size)
        assert (env.universe_size, env.set_size) == (universe, k)
        energies = np.asarray(env.energies)
        values, counts = np.unique(energies, return_counts=True)
        # 10 distinct energies in (-1, 1), each taken by exactly U / 10 elements
        assert len(values) == 10 and np.all(counts == universe // 10)
        assert np.all(np.abs(values) < 1)
    # spot checks of the authors' list (set/gflownet.py): first and last elements
    assert SetGeneration.fl_paper("small").energies[0] == 0.6961474461702144
    assert SetGeneration.fl_paper("large").energies[-1] == 0.9244538380742333
    assert SetGeneration.fl_paper("medium").energies[3] == -0.7866830411595669


def test_random_energies_follow_the_balanced_level_law():
    env = SetGeneration.random(jax.random.key(3), 30, 20)
    values, counts = np.unique(np.asarray(env.energies), return_counts=True)
    assert len(values) == 10 and np.all(counts == 3) and np.all(np.abs(values) < 1)
    other = SetGeneration.random(jax.random.key(4), 30, 20)
    assert other.energies != env.energies


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_log_partition_dp_matches_a_float64_elementary_symmetric_recursion(size):
    """log e_k(exp(-e)) by the DP against the textbook recursion in exact rational-free
    float64 (grouping equal energies: C(count, j) ways per level, a sum over
    compositions of k)."""
    env = SetGeneration.fl_paper(size)
    values, counts = np.unique(np.asarray(env.energies, np.float64), return_counts=True)
    # polynomial product over levels of (1 + w_v t)^{count_v}, coefficient of t^k, in logs
    log_coefficients = np.full(env.set_size + 1, -np.inf)
    log_coefficients[0] = 0.0
    for value, count in zip(values, counts):
        new = np.full_like(log_coefficients, -np.inf)
        for j in range(env.set_size + 1):
            terms = [log_coefficients[j - i] + math.log(math.comb(int(count), i)) - i * value
                     for i in range(0, min(int(count), j) + 1)]
            new[j] = np.logaddexp.reduce(terms)
        log_coefficients = new
    assert float(log_partition(env)) == pytest.approx(log_coefficients[env.set_size],
                                                      rel=1e-5)
    # the best set takes the k lowest energies
    assert float(env.top_log_reward()) == pytest.approx(
        -np.sort(np.asarray(env.energies))[: env.set_size].sum(), rel=1e-5)


def test_small_sets_exact_target_and_model_laws_against_enumeration():
    energies = (0.3, -0.7, 0.1, 0.9, -0.2)
    env = SetGeneration(energies, set_size=2)
    states = np.asarray(env.all_states())
    target = np.asarray(reward_distribution(env), np.float64)
    expected = {c: math.exp(-sum(energies[i] for i in c))
                for c in itertools.combinations(range(5), 2)}
    z = sum(expected.values())
    for state, p in zip(states, target):
        assert p == pytest.approx(expected.get(members(state), 0.0) / z, abs=1e-6)
    assert float(log_partition(env)) == pytest.approx(math.log(z), rel=1e-6)
    # a uniform forward policy: every ordered pair of distinct elements w.p. 1/5 * 1/4
    policy = MLPPolicy(env, hidden_sizes=(4,), learned_backward=False)
    params = policy.init(jax.random.key(0))
    params["forward"] = jax.tree.map(jnp.zeros_like, params["forward"])
    model = np.asarray(terminal_distribution(policy, params), np.float64)
    for state, p in zip(states, model):
        assert p == pytest.approx(0.1 if len(members(state)) == 2 else 0.0, abs=1e-6)
    info = evaluate(policy, params)
    assert float(info.l1_distance) == pytest.approx(
        np.abs(model - target).sum(), abs=1e-5)


def test_sampled_sets_follow_the_dp_law():
    env = SetGeneration((0.3, -0.7, 0.1, 0.9, -0.2), set_size=2)
    policy = MLPPolicy(env, hidden_sizes=(8,), learned_backward=False)
    params = policy.init(jax.random.key(1))
    params["forward"] = jax.tree.map(lambda w: 3.0 * w, params["forward"])
    exact = np.asarray(terminal_distribution(policy, params), np.float64)
    batch = sample_trajectories(jax.random.key(2), policy, params, NUM_ESTIMATES)
    assert np.all(np.asarray(batch.terminal_state).sum(1) == 2)
    index = np.asarray(jax.vmap(env.state_index)(batch.terminal_state))
    frequencies = np.bincount(index, minlength=exact.shape[0]) / NUM_ESTIMATES
    se = np.sqrt(exact * (1 - exact) / NUM_ESTIMATES)
    assert np.all(np.abs(frequencies - exact) <= K_SE * se + 1e-12)
    np.testing.assert_allclose(batch.log_reward,
                               -np.asarray(batch.terminal_state) @ np.array(env.energies),
                               atol=1e-5)


def test_large_sets_refuse_enumeration_but_keep_exact_log_z():
    env = SetGeneration.fl_paper("small")
    with pytest.raises(ValueError, match="MAX_ENUMERATED_STATES"):
        env.all_states()
    policy = MLPPolicy(env, hidden_sizes=(8,))
    with pytest.raises(ValueError, match="not possible"):
        evaluate(policy, policy.init(jax.random.key(0)))
    assert np.isfinite(float(log_partition(env)))
    # sampling works at the paper's size: every set has k elements
    batch = sample_trajectories(jax.random.key(0), policy, policy.init(jax.random.key(0)), 8)
    assert np.all(np.asarray(batch.terminal_state).sum(1) == 20)


def test_top_log_rewards_match_brute_force_with_ties():
    """The exact best sets (counted with multiplicity, ties included) against sorting the
    rewards of all C(U, k) sets on the host."""
    energies = (0.3, -0.7, 0.3, 0.9, -0.2, -0.7, 0.1, 0.3)
    for k in (1, 3, 5, 8):
        env = SetGeneration(energies, set_size=k)
        brute = sorted((-sum(energies[i] for i in c)
                        for c in itertools.combinations(range(len(energies)), k)),
                       reverse=True)
        for num_top in (1, 4, 10, 100):
            got = np.asarray(env.top_log_rewards(num_top), np.float64)
            assert got.shape == (min(num_top, len(brute)),)
            np.testing.assert_allclose(got, brute[:num_top], atol=1e-5)
    # at the paper's sizes: the best value is the k lowest energies, values descend, and
    # the count of sets tied at the optimum is the product of binomials of the tied level
    env = SetGeneration.fl_paper("medium")
    top = np.asarray(env.top_log_rewards(100), np.float64)
    assert top[0] == pytest.approx(float(env.top_log_reward()), rel=1e-6)
    assert np.all(np.diff(top) <= 1e-9)
    values, counts = np.unique(np.asarray(env.energies), return_counts=True)
    # 60 = 7 levels of 8 + 4 of the 8th level's elements: C(8, 4) = 70 optimal sets
    assert counts[:7].sum() == 56 and np.sum(np.isclose(top, top[0], atol=1e-6)) == 70
    with pytest.raises(ValueError, match="num_top"):
        env.top_log_rewards(0)


def test_short_forward_looking_run_beats_a_uniform_policy():
    """200 steps of FL-DB on a small universe: the exact terminal law (DP) is closer to
    the target than a uniform policy's, its exact mean log reward is higher, and the
    five best sets (exact top-k search) get more than twice the uniform policy's mass."""
    import optax

    import ppl_ext as px
    from ppl_ext.gfn import forward_looking_detailed_balance

    env = SetGeneration((0.9, -0.8, 0.4, -0.5, 0.7, -0.9, 0.2, 0.0), set_size=4)
    policy = MLPPolicy(env, hidden_sizes=(32,))
    params = policy.init(jax.random.key(0), log_flow=True)
    uniform = dict(params, forward=jax.tree.map(jnp.zeros_like, params["forward"]))
    loss = forward_looking_detailed_balance(policy, num_samples=16, exploration=0.5)
    labels = {name: ("log_z" if name == "log_z" else "net") for name in params}
    optimizer = optax.multi_transform({"net": optax.adam(1e-2), "log_z": optax.adam(0.1)},
                                      labels)
    trained = px.fit(loss, params, optimizer, 200, jax.random.key(1), maximize=False,
                     progress=False, chunk_size=200).params
    # the target by brute force over the sets, in the order of env.all_states()
    states = np.asarray(env.all_states())
    full = states.sum(1) == 4
    log_rewards = -states.astype(np.float64) @ np.asarray(env.energies)
    target = np.where(full, np.exp(log_rewards), 0.0)
    target /= target.sum()
    exact = {}
    for name, p in (("trained", trained), ("uniform", uniform)):
        model = np.asarray(terminal_distribution(policy, p), np.float64)
        exact[name] = (np.abs(model - target).sum(), float(model[full] @ log_rewards[full]))
    assert exact["trained"][0] < 0.5 * exact["uniform"][0]
    assert exact["trained"][1] > exact["uniform"][1] + 0.5
    # the mass on the 5 best sets (their rewards from the exact top-k search) grows
    best = np.asarray(env.top_log_rewards(5), np.float64)
    on_best = full & (log_rewards >= best[-1] - 1e-9)
    assert on_best.sum() == 5
    np.testing.assert_allclose(np.sort(log_rewards[on_best])[::-1], best, atol=1e-5)
    masses = {name: float(np.asarray(terminal_distribution(policy, p))[on_best].sum())
              for name, p in (("trained", trained), ("uniform", uniform))}
    assert masses["trained"] > 2 * masses["uniform"]


def test_set_energy_accumulates_along_a_trajectory():
    env = SetGeneration((0.5, -1.0, 2.0, 0.25), set_size=3)
    state = env.initial_state()
    total = 0.0
    for element in (2, 0, 3):
        state = env.step(state, jnp.int32(element))
        total += env.energies[element]
        assert float(env.log_energy(state)) == pytest.approx(total)
    assert float(env.log_reward(state)) == pytest.approx(-total)
    assert env.forward_mask(state).tolist() == [False] * 4 + [True]


def test_set_generation_bad_input():
    with pytest.raises(ValueError, match="set_size"):
        SetGeneration((0.1, 0.2), set_size=3)
    with pytest.raises(ValueError, match="set_size"):
        SetGeneration((0.1, 0.2), set_size=0)
    with pytest.raises(ValueError, match="at least one"):
        SetGeneration((), set_size=1)
    with pytest.raises(ValueError, match="finite"):
        SetGeneration((0.1, float("nan")), set_size=1)
    with pytest.raises(ValueError, match="size must be one of"):
        SetGeneration.fl_paper("huge")
    with pytest.raises(ValueError, match="num_levels"):
        SetGeneration.random(jax.random.key(0), 5, 2, num_levels=6)
    env = SetGeneration((0.1, 0.2, 0.3), set_size=2)
    with pytest.raises(ValueError, match="shape"):
        env.forward_mask(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="one integer action"):
        env.step(env.initial_state(), jnp.array([0, 1]))


# -------------------------------------------------------------------------- BitSequence


def hamming_reward(bits, modes, temperature=1.0):
    return math.exp(-min(sum(a != b for a, b in zip(bits, m)) for m in modes) / temperature)


def test_bitsequence_rewards_match_hamming_distances_by_enumeration():
    modes = [[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    env = BitSequence(modes, word_size=2, temperature=0.5)
    states = np.asarray(env.all_states())
    assert states.shape == (5**3, 3)
    target = np.asarray(reward_distribution(env), np.float64)
    full = [s for s in states if np.all(s >= 0)]
    assert len(full) == 2**6

    def to_bits(state):
        return [int(b) for w in state for b in format(int(w), "02b")]

    z = sum(hamming_reward(to_bits(s), modes, 0.5) for s in full)
    assert float(log_partition(env)) == pytest.approx(math.log(z), rel=1e-6)
    for s, p in zip(states, target):
        expected = hamming_reward(to_bits(s), modes, 0.5) / z if np.all(s >= 0) else 0.0
        assert p == pytest.approx(expected, abs=1e-6)


def test_bitsequence_non_autoregressive_dag_and_uniform_policy():
    """With a uniform forward policy every full string is equally likely (each of the
    L! orders of filling has the same probability, and the words are uniform)."""
    env = BitSequence([[0, 1, 1, 0]], word_size=1)
    policy = MLPPolicy(env, hidden_sizes=(4,), learned_backward=False)
    params = policy.init(jax.random.key(0))
    params["forward"] = jax.tree.map(jnp.zeros_like, params["forward"])
    model = np.asarray(terminal_distribution(policy, params), np.float64)
    full = np.all(np.asarray(env.all_states()) >= 0, axis=1)
    np.testing.assert_allclose(model[full], 1 / 16, atol=1e-6)
    assert model[~full].sum() == pytest.approx(0.0, abs=1e-7)
    # two parents: [0, -1, 1, -1] can come from emptying position 0 or 2
    state = jnp.array([0, -1, 1, -1], jnp.int32)
    assert env.backward_mask(state).tolist() == [True, False, True, False]


def test_bitsequence_energy_and_modes_found():
    env = BitSequence([[1, 1, 1, 1], [0, 0, 0, 0]], word_size=2)
    partial = jnp.array([3, -1], jnp.int32)  # 11 then empty
    assert float(env.log_energy(partial)) == 0.0  # matches the first mode so far
    assert float(env.log_reward(partial)) == -2.0  # empty bits count as mismatches
    samples = jnp.array([[3, 2], [3, 3], [1, 2]], jnp.int32)  # 1110, 1111, 0110
    assert int(env.num_modes_within(samples, 0)) == 1
    assert int(env.num_modes_within(samples, 2)) == 2  # 0110 is at distance 2 from 0000
    with pytest.raises(ValueError, match="radius"):
        env.num_modes_within(samples, -1)


def test_tb_paper_modes():
    env = BitSequence.tb_paper(jax.random.key(0), length=16, word_size=4, num_modes=20)
    modes = np.array(env.modes)
    assert modes.shape == (20, 16) and len({tuple(m) for m in modes}) == 20
    blocks = {tuple(b) for b in [[0] * 8, [1] * 8, [1] * 4 + [0] * 4, [0] * 4 + [1] * 4,
                                 [0, 0, 1, 1, 1, 1, 0, 0]]}
    assert all(tuple(m[:8]) in blocks and tuple(m[8:]) in blocks for m in modes)
    default = BitSequence.tb_paper(jax.random.key(1))
    assert (default.length, default.word_size, len(default.modes)) == (120, 8, 60)
    with pytest.raises(ValueError, match="exact evaluation by enumeration"):
        default.all_states()


def test_bitsequence_bad_input():
    with pytest.raises(ValueError, match="word_size"):
        BitSequence([[0, 1, 1]], word_size=2)
    with pytest.raises(ValueError, match="0/1"):
        BitSequence([[0, 2]], word_size=1)
    with pytest.raises(ValueError, match="shape"):
        BitSequence([0, 1], word_size=1)
    with pytest.raises(ValueError, match="temperature"):
        BitSequence([[0, 1]], word_size=1, temperature=0.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        BitSequence.tb_paper(jax.random.key(0), length=12)
    with pytest.raises(ValueError, match="num_modes"):
        BitSequence.tb_paper(jax.random.key(0), length=8, num_modes=6)
