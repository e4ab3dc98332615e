"""The batched rollout: policies evaluated only on the rows that matter (packed tiers)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ppl_ext.gfn import Hypergrid, MLPPolicy, SetGeneration
from ppl_ext.gfn._objectives import _batch, _on_rows, _row_tiers


def test_row_tiers_cover_every_count():
    for num_rows, min_rows, factor in [(1920, 128, 4), (14848, 512, 4), (512, 0, 2), (7, 0, 2)]:
        sizes = _row_tiers(num_rows, min_rows, factor)
        assert sizes[-1] == num_rows and sizes == sorted(set(sizes))
        assert sizes[0] >= min(num_rows, max(min_rows, 8))


def test_packed_rows_match_plain_vmap_in_value_and_gradient():
    rows = jax.random.normal(jax.random.key(0), (50, 3))
    keep = jax.random.bernoulli(jax.random.key(1), 0.3, (50,))
    weights = jnp.array([0.5, -1.0, 2.0])

    def fn(w, row):
        return jnp.sin(row @ w) + row[0] * w[1]

    def packed(w):
        return jnp.sum(jnp.where(keep, _on_rows(lambda r: fn(w, r), rows, keep), 0.0))

    def plain(w):
        return jnp.sum(jnp.where(keep, jax.vmap(lambda r: fn(w, r))(rows), 0.0))

    np.testing.assert_allclose(packed(weights), plain(weights), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(packed)(weights), jax.grad(plain)(weights), rtol=1e-5)


def _replay(policy, params, batch, i):
    """`log P_F` and `log P_B` of trajectory `i`, one step at a time on the host."""
    env = policy.env
    forward = jax.jit(policy.forward_log_probs)
    backward = jax.jit(policy.backward_log_probs)
    step, to_backward = jax.jit(env.step), jax.jit(env.to_backward_action)
    states, actions = np.asarray(batch.states[i]), np.asarray(batch.actions[i])
    log_pf, log_pb = [], []
    for t in range(int(np.sum(batch.active[i]))):
        state, action = jnp.asarray(states[t]), int(actions[t])
        log_pf.append(float(forward(params, state)[action]))
        if action != env.exit_action:
            np.testing.assert_array_equal(step(state, jnp.int32(action)), states[t + 1])
            back = int(to_backward(state, jnp.int32(action)))
            log_pb.append(float(backward(params, jnp.asarray(states[t + 1]))[back]))
    return sum(log_pf), sum(log_pb)


def test_batch_log_probs_match_a_step_by_step_replay():
    for env in (Hypergrid(dimension=2, side=4), SetGeneration((0.9, -0.8, 0.4, -0.5, 0.7),
                                                              set_size=3)):
        policy = MLPPolicy(env, hidden_sizes=(16,))
        params = policy.init(jax.random.key(2))
        uniforms = jax.random.uniform(jax.random.key(3), (40, env.max_length))
        batch = eqx.filter_jit(_batch)(policy, params, uniforms, 0.2)
        for i in range(0, 40, 10):
            log_pf, log_pb = _replay(policy, params, batch, i)
            np.testing.assert_allclose(float(jnp.sum(batch.log_pf[i])), log_pf, rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(float(jnp.sum(batch.log_pb[i])), log_pb, rtol=1e-5,
                                       atol=1e-5)
