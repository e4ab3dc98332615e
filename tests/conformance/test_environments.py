"""Common tests over the GFlowNet environment registry (`registry.ENVIRONMENTS`): the
protocol identities of `px.gfn.AbstractEnvironment`, checked on every state and action."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conformance.registry import ENVIRONMENTS, EnvironmentCase

CASES = pytest.mark.parametrize("case", ENVIRONMENTS, ids=lambda c: c.name)


def _all(env):
    states = env.all_states()
    return states, np.asarray(jax.vmap(env.forward_mask)(states))


@CASES
def test_state_index_enumerates_the_states(case: EnvironmentCase):
    env = case.build()
    states = env.all_states()
    index = np.asarray(jax.vmap(env.state_index)(states))
    np.testing.assert_array_equal(index, np.arange(states.shape[0]))
    assert np.all(np.isfinite(np.asarray(jax.vmap(env.log_reward)(states))))


@CASES
def test_backward_step_undoes_step(case: EnvironmentCase):
    """For every state and every valid forward action other than exit:
    backward_step(step(s, a), to_backward_action(s, a)) == s, and the backward action is
    valid at the new state; exit leaves the state unchanged."""
    env = case.build()
    states, masks = _all(env)
    checked = 0
    for s, mask in zip(states, masks):
        for a in np.flatnonzero(mask):
            action = jnp.asarray(a, jnp.int32)
            new = env.step(s, action)
            if int(a) == int(env.exit_action):
                np.testing.assert_array_equal(new, s)
                continue
            back = env.to_backward_action(s, action)
            assert bool(env.backward_mask(new)[back]), (case.name, s, a)
            np.testing.assert_array_equal(env.backward_step(new, back), s)
            checked += 1
    assert checked > 0
    assert not np.any(np.asarray(env.backward_mask(env.initial_state())))


@CASES
def test_every_state_is_reachable_and_can_finish(case: EnvironmentCase):
    """Breadth-first search from the initial state over valid non-exit actions reaches
    every enumerated state within max_length steps, and from every state some state
    where exit is valid can be reached (no dead ends: every trajectory can terminate)."""
    env = case.build()
    states, masks = _all(env)
    start = int(env.state_index(env.initial_state()))
    depth = {start: 0}
    frontier = [start]
    while frontier:
        nxt = []
        for i in frontier:
            for a in np.flatnonzero(masks[i]):
                if int(a) == int(env.exit_action):
                    continue
                j = int(env.state_index(env.step(states[i], jnp.asarray(a, jnp.int32))))
                if j not in depth:
                    depth[j] = depth[i] + 1
                    nxt.append(j)
        frontier = nxt
    assert len(depth) == states.shape[0]
    assert max(depth.values()) + 1 <= env.max_length
    # backward closure from the states where exit is valid
    exit_action = int(env.exit_action)
    children = {i: [int(env.state_index(env.step(states[i], jnp.asarray(a, jnp.int32))))
                    for a in np.flatnonzero(masks[i]) if int(a) != exit_action]
                for i in range(states.shape[0])}
    finishes = set(np.flatnonzero(masks[:, exit_action]).tolist())
    assert finishes
    changed = True
    while changed:
        changed = False
        for i, kids in children.items():
            if i not in finishes and any(j in finishes for j in kids):
                finishes.add(i)
                changed = True
    assert len(finishes) == states.shape[0]


@CASES
def test_log_energy_is_minus_log_reward_at_terminal_states(case: EnvironmentCase):
    """The forward-looking intermediate energy, where an environment defines one: finite
    everywhere and `E(x) = -log R(x)` wherever exit is valid. Otherwise the default
    raises NotImplementedError naming the environment."""
    env = case.build()
    states, masks = _all(env)
    try:
        energy = np.asarray(jax.vmap(env.log_energy)(states), np.float64)
    except NotImplementedError as error:
        assert type(env).__name__ in str(error)
        return
    log_reward = np.asarray(jax.vmap(env.log_reward)(states), np.float64)
    assert np.all(np.isfinite(energy))
    terminal = masks[:, int(env.exit_action)]
    np.testing.assert_allclose(energy[terminal], -log_reward[terminal], rtol=1e-6, atol=1e-6)


@CASES
def test_log_partition_matches_enumeration(case: EnvironmentCase):
    """`env.log_partition()` (an environment may override it with a closed form or DP)
    equals the log-sum-exp of the rewards of the states where exit is valid, summed on
    the host."""
    env = case.build()
    states, masks = _all(env)
    log_reward = np.asarray(jax.vmap(env.log_reward)(states), np.float64)
    terminal = log_reward[masks[:, int(env.exit_action)]]
    expected = np.log(np.sum(np.exp(terminal - terminal.max()))) + terminal.max()
    assert float(env.log_partition()) == pytest.approx(expected, rel=1e-5, abs=1e-5)


@CASES
def test_jit_and_vmap_match_one_state_at_a_time(case: EnvironmentCase):
    env = case.build()
    states, masks = _all(env)
    actions = jnp.asarray(np.argmax(masks, axis=1), jnp.int32)  # a valid action per state
    stepped = jax.jit(jax.vmap(env.step))(states, actions)
    for s, a, out in zip(states[:8], actions[:8], stepped[:8]):
        np.testing.assert_array_equal(env.step(s, a), out)
    np.testing.assert_array_equal(jax.jit(jax.vmap(env.forward_mask))(states), masks)
