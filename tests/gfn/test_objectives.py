"""Trajectory and detailed balance: hand-set optima, unbiased gradients, training by px.fit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppl_ext as px
from ppl_ext.gfn import (
    Hypergrid,
    MLPPolicy,
    detailed_balance,
    evaluate,
    log_partition,
    subtrajectory_balance,
    trajectory_balance,
)
from tests.helpers import assert_unbiased, many


def chain_optimum(side):
    """On the 1-D grid (a chain), the policy with P_T = R / Z, set by hand.

    Exiting at x with probability e_x = R(x) / S_x, S_x = Σ_{y >= x} R(y), ends at x with
    probability Π_{y<x} (1 - e_y) e_x = R(x) / S_0; the state flow is F(x) = S_x.
    With no hidden layer the MLP is linear in the one-hot state, so weights set the
    logits of each state directly.
    """
    env = Hypergrid(dimension=1, side=side)
    policy = MLPPolicy(env, hidden_sizes=(), learned_backward=False)
    params = policy.init(jax.random.key(0), log_flow=True)
    rewards = np.exp(np.asarray(jax.vmap(env.log_reward)(env.all_states()), np.float64))
    tails = np.cumsum(rewards[::-1])[::-1]
    exits = rewards / tails
    logits = np.zeros((2, side))
    logits[0, :-1] = np.log1p(-exits[:-1])
    logits[1, :-1] = np.log(exits[:-1])
    (layer,) = params["forward"]
    layer = eqx_set(layer, weight=jnp.asarray(logits, jnp.float32), bias=jnp.zeros(2))
    (flow,) = params["log_flow"]
    flow = eqx_set(flow, weight=jnp.asarray(np.log(tails)[None], jnp.float32),
                   bias=jnp.zeros(1))
    params = {"forward": (layer,), "log_flow": (flow,),
              "log_z": jnp.asarray(np.log(tails[0]), jnp.float32)}
    return policy, params


def eqx_set(module, **fields):
    import equinox as eqx

    names = list(fields)
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], module,
                       [fields[n] for n in names])


def test_hand_set_optimum_has_zero_losses_and_gradients(key):
    policy, params = chain_optimum(side=6)
    info = evaluate(policy, params)
    assert float(info.l1_distance) < 1e-5 and float(info.log_z_error) < 1e-5
    tb_params = {k: params[k] for k in ("forward", "log_z")}
    tb = trajectory_balance(policy, num_samples=64)
    value, grads = tb.value_and_grad(key, tb_params)
    assert float(value) < 1e-9
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-4
    db = detailed_balance(policy, num_samples=64)
    value, grads = db.value_and_grad(key, params)
    assert float(value) < 1e-9
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-4
    # shifting log Z by 0.5 shifts every trajectory's TB residual by exactly 0.5
    shifted = dict(tb_params, log_z=tb_params["log_z"] + 0.5)
    assert float(tb(key, shifted)) == pytest.approx(0.25, abs=1e-4)
    assert float(db(key, dict(params, log_z=params["log_z"] + 0.5))) > 1e-3
    # initial_flow="head" (torchgfn's DB): log F(s0) is the flow head at s0, log_z unused
    for head in (detailed_balance(policy, num_samples=64, initial_flow="head"),
                 subtrajectory_balance(policy, num_samples=64, initial_flow="head")):
        value, grads = head.value_and_grad(key, params)
        assert float(value) < 1e-9 and float(grads["log_z"]) == 0.0
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-4
        assert float(head(key, dict(params, log_z=params["log_z"] + 0.5))) == float(value)
        (flow,) = params["log_flow"]
        moved = eqx_set(flow, weight=flow.weight.at[0, 0].add(0.5))  # log F(s0) + 0.5
        assert float(head(key, dict(params, log_flow=(moved,)))) > 1e-3
    log_z = policy.log_flow(params, policy.env.initial_state())
    assert float(evaluate(policy, dict(params, log_z=jnp.asarray(9.0)),
                          log_z=log_z).log_z_error) < 1e-5
    with pytest.raises(ValueError, match="initial_flow must be one of 'log_z', 'head'"):
        detailed_balance(policy, initial_flow="network")


def exact_chain_tb(policy, params, hold_fixed=True):
    """E[TB] over the chain's trajectories, the sampling distribution held fixed."""
    env = policy.env
    states = env.all_states()
    log_probs = jax.vmap(lambda s: policy.forward_log_probs(params, s))(states)
    moves = jnp.concatenate([jnp.zeros(1), jnp.cumsum(log_probs[:-1, 0])])
    log_pf = moves + log_probs[:, 1]  # the trajectory to x: x moves, then exit
    residual = params["log_z"] + log_pf - jax.vmap(env.log_reward)(states)
    weights = jnp.exp(log_pf)
    return jnp.sum((jax.lax.stop_gradient(weights) if hold_fixed else weights) * residual**2)


def test_tb_value_and_gradient_are_unbiased():
    # the gradient with trajectories held fixed, not the gradient of E[TB] (which would add
    # a score-function term): 4 x 2 weights, 2 biases and log Z, K_SE = 4, 10^4 estimates
    env = Hypergrid(dimension=1, side=4)
    policy = MLPPolicy(env, hidden_sizes=(), learned_backward=False)
    params = policy.init(jax.random.key(1))
    params["log_z"] = jnp.asarray(0.3)
    loss = trajectory_balance(policy, num_samples=1)
    values, grads = many(lambda k: loss.value_and_grad(k, params))
    assert_unbiased(values, exact_chain_tb(policy, params), what="TB value")
    exact = jax.grad(exact_chain_tb, argnums=1)(policy, params)
    for path, sampled, expected in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                       jax.tree.leaves(grads), jax.tree.leaves(exact)):
        assert_unbiased(sampled, expected, what=f"TB gradient {jax.tree_util.keystr(path[0])}")
    # the test can tell: the gradient of E[TB] (with the score-function term) differs
    full = jax.grad(exact_chain_tb, argnums=1)(policy, params, False)
    differences = [float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(exact))]
    assert max(differences) > 0.1


def adam(params, learning_rate=1e-3, log_z_learning_rate=0.1):
    """torchgfn's setting: one learning rate for the networks, a larger one for log Z."""
    labels = {name: ("log_z" if name == "log_z" else "net") for name in params}
    return optax.multi_transform(
        {"net": optax.adam(learning_rate), "log_z": optax.adam(log_z_learning_rate)}, labels)


def test_trajectory_balance_training_reaches_small_exact_l1():
    # measured: exact L1 0.0007, |log Z error| 1e-4 after 1000 steps (about 5 s)
    env = Hypergrid(dimension=2, side=8)
    policy = MLPPolicy(env, hidden_sizes=(64, 64), learned_backward=True)
    params = policy.init(jax.random.key(0))
    before = evaluate(policy, params)
    assert float(before.l1_distance) > 0.3
    loss = trajectory_balance(policy, num_samples=128)
    result = px.fit(loss, params, adam(params), 1000, jax.random.key(2), maximize=False,
                    progress=False)
    after = evaluate(policy, result.params)
    assert float(after.l1_distance) < 0.02, after
    assert float(after.log_z_error) < 0.02, after
    assert abs(float(result.params["log_z"]) - float(log_partition(env))) < 0.02


def test_detailed_balance_training_reaches_small_exact_l1():
    # measured: exact L1 0.0016, |log Z error| 5e-5 after 1000 steps (about 6 s)
    env = Hypergrid(dimension=2, side=8)
    policy = MLPPolicy(env, hidden_sizes=(64, 64), learned_backward=False)
    params = policy.init(jax.random.key(0), log_flow=True)
    loss = detailed_balance(policy, num_samples=128)
    result = px.fit(loss, params, adam(params), 1000, jax.random.key(2), maximize=False,
                    progress=False)
    after = evaluate(policy, result.params)
    assert float(after.l1_distance) < 0.02, after
    assert float(after.log_z_error) < 0.02, after


def test_exploration_changes_samples_not_the_loss_definition(key):
    policy, params = chain_optimum(side=6)
    tb_params = {k: params[k] for k in ("forward", "log_z")}
    # at the optimum every trajectory has residual 0, whoever samples it
    assert float(trajectory_balance(policy, 64, exploration=0.5)(key, tb_params)) < 1e-9


def test_losses_work_under_jit_and_vmap(key):  # (jit of the gradient: px.fit above)
    policy = MLPPolicy(Hypergrid(2, 4), hidden_sizes=(8,))
    params = policy.init(jax.random.key(0), log_flow=True)
    for loss in (detailed_balance(policy, 4),):
        keys = jax.random.split(key, 3)
        values = jax.jit(jax.vmap(lambda k: loss(k, params)))(keys)
        assert values.shape == (3,) and bool(jnp.all(jnp.isfinite(values)))


def test_bad_arguments():
    policy = MLPPolicy(Hypergrid(2, 4), hidden_sizes=(8,))
    with pytest.raises(ValueError, match="num_samples"):
        trajectory_balance(policy, num_samples=0)
    with pytest.raises(ValueError, match="exploration"):
        detailed_balance(policy, exploration=1.5)
    with pytest.raises(TypeError, match="needs a policy"):
        trajectory_balance(Hypergrid(2, 4))
    with pytest.raises(KeyError, match="log_flow"):
        detailed_balance(policy, 4)(jax.random.key(0), policy.init(jax.random.key(0)))
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLPPolicy(Hypergrid(2, 4), hidden_sizes=(0,))
