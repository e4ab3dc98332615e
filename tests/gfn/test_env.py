"""The hypergrid against torchgfn's definition, the protocol identities and input errors."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl_ext.gfn import AbstractEnvironment, Hypergrid, log_partition, reward_distribution


def torchgfn_reward(x, side, r0=0.1, r1=0.5, r2=2.0):
    """torchgfn's OriginalReward (src/gfn/gym/hypergrid.py), in float64, EPS = 1e-12."""
    eps = 1e-12
    ax = np.abs(np.asarray(x, np.float64) / (side - 1) - 0.5)
    return (r0 + np.prod(0.25 + eps < ax) * r1
            + np.prod((0.3 + eps < ax) * (ax < 0.4 + eps)) * r2)


@pytest.mark.parametrize("point,reward", [
    ((0, 0), 0.6), ((7, 7), 0.6), ((0, 7), 0.6),  # outer corners: R0 + R1
    ((1, 1), 2.6), ((1, 6), 2.6), ((6, 6), 2.6),  # the ring 0.3 < a <= 0.4: R0 + R1 + R2
    ((0, 1), 0.6), ((2, 2), 0.1), ((3, 4), 0.1), ((0, 2), 0.1), ((1, 5), 0.1),
])
def test_hand_checked_rewards_on_the_2d_h8_grid(point, reward):
    # H = 8: x/7 - 1/2 for x = 0..7 is ±1/2, ±5/14 (0.357), ±3/14 (0.214), ±1/14
    env = Hypergrid(dimension=2, side=8)
    assert float(jnp.exp(env.log_reward(jnp.array(point, jnp.int32)))) == pytest.approx(
        reward, rel=1e-6)


@pytest.mark.parametrize("dimension,side", [(1, 2), (1, 11), (2, 6), (2, 8), (3, 5), (2, 21)])
def test_every_reward_matches_torchgfn_formula(dimension, side):
    env = Hypergrid(dimension=dimension, side=side, r0=0.01, r1=0.5, r2=2.0)
    states = env.all_states()
    ours = np.exp(np.asarray(jax.vmap(env.log_reward)(states), np.float64))
    theirs = np.array([torchgfn_reward(x, side, 0.01) for x in np.asarray(states)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_terminal_states_count_and_indexing():
    for dimension, side in [(1, 2), (2, 8), (3, 4), (4, 3)]:
        env = Hypergrid(dimension=dimension, side=side)
        states = np.asarray(env.all_states())
        assert states.shape == (side**dimension, dimension)
        assert {tuple(s) for s in states} == set(
            itertools.product(range(side), repeat=dimension))
        index = np.asarray(jax.vmap(env.state_index)(jnp.asarray(states)))
        np.testing.assert_array_equal(index, np.arange(side**dimension))
        assert reward_distribution(env).shape == (side**dimension,)


def test_masks_and_transitions():
    env = Hypergrid(dimension=3, side=4)
    assert isinstance(env, AbstractEnvironment)
    assert (env.num_actions, env.num_backward_actions, env.exit_action) == (4, 3, 3)
    assert env.max_length == 3 * 3 + 1
    s0 = env.initial_state()
    assert s0.tolist() == [0, 0, 0]
    assert env.forward_mask(s0).tolist() == [True] * 4
    assert env.backward_mask(s0).tolist() == [False] * 3
    x = jnp.array([3, 1, 0], jnp.int32)
    assert env.forward_mask(x).tolist() == [False, True, True, True]
    assert env.backward_mask(x).tolist() == [True, True, False]
    assert env.step(x, jnp.int32(1)).tolist() == [3, 2, 0]
    assert env.step(x, jnp.int32(env.exit_action)).tolist() == [3, 1, 0]
    assert env.backward_step(x, jnp.int32(0)).tolist() == [2, 1, 0]
    encoded = env.encode(x)
    assert encoded.shape == (env.encoding_size,) == (12,)
    assert encoded.reshape(3, 4).argmax(-1).tolist() == [3, 1, 0]


def test_backward_step_undoes_step_everywhere():
    env = Hypergrid(dimension=2, side=5)
    for s in np.asarray(env.all_states()):
        s = jnp.asarray(s)
        mask = np.asarray(env.forward_mask(s))
        for a in range(env.num_actions - 1):
            if mask[a]:
                child = env.step(s, jnp.int32(a))
                b = env.to_backward_action(s, jnp.int32(a))
                assert bool(env.backward_mask(child)[b])
                assert env.backward_step(child, b).tolist() == s.tolist()


def test_exact_log_partition_2d_h8():
    # 4 ring states at 2.6, 12 other outer states at 0.6, 48 at 0.1
    assert float(log_partition(Hypergrid(2, 8))) == pytest.approx(math.log(22.4), abs=1e-5)


def test_methods_work_under_jit_and_vmap():
    env = Hypergrid(dimension=2, side=8)
    states = env.all_states()
    masks = jax.jit(jax.vmap(env.forward_mask))(states)
    assert masks.shape == (64, 3)
    children = jax.jit(jax.vmap(env.step))(states, jnp.zeros(64, jnp.int32))
    assert children.shape == (64, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dimension=0, side=8), "dimension >= 1"),
    (dict(dimension=2, side=1), "side >= 2"),
    (dict(dimension=2.5, side=8), "dimension >= 1"),
    (dict(dimension=2, side=8, r0=0.0), "r0 > 0"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hypergrid(**kwargs)


def test_bad_actions_and_states():
    env = Hypergrid(dimension=2, side=8)
    s = env.initial_state()
    with pytest.raises(ValueError, match="one integer action"):
        env.step(s, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="one integer action"):
        env.step(s, jnp.float32(1.0))
    with pytest.raises(ValueError, match="one integer action"):
        env.backward_step(s, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.forward_mask(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.log_reward(jnp.zeros((5, 2), jnp.int32))


def test_log_energy_default_raises_naming_the_environment():
    class NoEnergy(Hypergrid):
        def log_energy(self, state):  # back to the protocol's default
            return AbstractEnvironment.log_energy(self, state)

    env = NoEnergy(dimension=2, side=3)
    with pytest.raises(NotImplementedError, match="NoEnergy defines no intermediate energy"):
        env.log_energy(env.initial_state())


def test_hypergrid_energy_is_minus_log_reward_everywhere():
    # every hypergrid state is terminal, so E(s) = -log R(s) is forced
    env = Hypergrid(dimension=2, side=8)
    for point, reward in [((0, 0), 0.6), ((1, 6), 2.6), ((3, 4), 0.1)]:
        assert float(env.log_energy(jnp.array(point))) == pytest.approx(-math.log(reward),
                                                                        rel=1e-6)


def test_default_log_partition_enumerates_terminal_states():
    env = Hypergrid(dimension=1, side=4)  # x = 0..3: a = 1/2, 1/6, 1/6, 1/2
    assert float(env.log_partition()) == pytest.approx(math.log(0.6 + 0.1 + 0.1 + 0.6),
                                                       rel=1e-6)
