"""Trajectory sampling and the balance objectives (trajectory and detailed balance).

A batch of trajectories is a `lax.scan` of `env.max_length` steps, vmapped over the
batch; a trajectory that has exited stays where it is and its later steps are masked out.
Actions are drawn by inverse CDF from one uniform number per step, so the objectives are
`px.expectation` programs with a single sample site (the uniforms, which do not depend
on the parameters). The sampled trajectory is therefore never differentiated: gradients
flow through the log-probabilities of the sampled actions only, the usual on-policy
(and off-policy, with exploration) balance-objective gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax

from ..adev import Expectation, expectation, reinforce, sample
from ._policy import AbstractPolicy


class Trajectories(NamedTuple):
    """A batch of trajectories (leading axis: the batch; second: the step).

    Attributes:
        states: `(batch, max_length + 1, *state_shape)`, the states visited (a finished
            trajectory repeats its terminal state).
        actions: `(batch, max_length)` int32 forward actions (meaningless where not
            `active`).
        active: `(batch, max_length)` bool, the steps actually taken (exit included).
        log_pf: `(batch, max_length)`, `log P_F(a_t | s_t)` of the policy (0 where not
            active), differentiable in the parameters.
        log_pb: `(batch, max_length)`, `log P_B(s_t | s_{t+1})` (0 at the exit step and
            where not active).
        terminal_state: `(batch, *state_shape)`, the state each trajectory exited from.
        log_reward: `(batch,)`, `log R` of the terminal states.
    """

    states: jax.Array
    actions: jax.Array
    active: jax.Array
    log_pf: jax.Array
    log_pb: jax.Array
    terminal_state: jax.Array
    log_reward: jax.Array


def _check_common(policy, num_samples, exploration, who):
    if not isinstance(policy, AbstractPolicy):
        raise TypeError(f"{who} needs a policy (e.g. px.gfn.MLPPolicy), got "
                        f"{type(policy).__name__}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise ValueError(f"{who}: num_samples must be an int >= 1, got {num_samples!r}.")
    if not 0.0 <= float(exploration) <= 1.0:
        raise ValueError(f"{who}: exploration must be in [0, 1], got {exploration!r}.")


def _categorical(probs: jax.Array, uniform: jax.Array) -> jax.Array:
    """Inverse-CDF draw; never an action of probability 0 (strict comparison)."""
    cumulative = jnp.cumsum(probs)
    return jnp.argmax(cumulative > uniform * cumulative[-1]).astype(jnp.int32)


def _rollout(policy: AbstractPolicy, params, uniforms: jax.Array, exploration: float):
    """One trajectory from `s0`, driven by `uniforms` `(max_length,)`."""
    env = policy.env

    def body(carry, uniform):
        state, done = carry
        log_probs = policy.forward_log_probs(params, state)
        mask = env.forward_mask(state)
        probs = lax.stop_gradient(jnp.exp(log_probs))
        if exploration > 0.0:
            probs = (1.0 - exploration) * probs + exploration * mask / jnp.sum(mask)
        action = _categorical(probs, uniform)
        is_exit = action == env.exit_action
        next_state = env.step(state, action)
        backward = env.to_backward_action(state, action)
        log_pb = policy.backward_log_probs(params, next_state)[
            jnp.where(is_exit, 0, backward)]
        active = ~done
        next_state = jnp.where(done, state, next_state)
        out = (state, action, active, jnp.where(active, log_probs[action], 0.0),
               jnp.where(active & ~is_exit, log_pb, 0.0))
        return (next_state, done | is_exit), out

    init = (env.initial_state(), jnp.zeros((), bool))
    (last, done), (states, actions, active, log_pf, log_pb) = lax.scan(body, init, uniforms)
    states = jnp.concatenate([states, last[None]], axis=0)
    return Trajectories(states, actions, active, log_pf, log_pb, last,
                        env.log_reward(last)), done


def _batch(policy, params, uniforms, exploration) -> Trajectories:
    trajectories, _ = jax.vmap(lambda u: _rollout(policy, params, u, exploration))(uniforms)
    return trajectories


def sample_trajectories(key: jax.Array, policy: AbstractPolicy, params: dict,
                        num_samples: int, exploration: float = 0.0) -> Trajectories:
    """Draw `num_samples` independent trajectories from the forward policy.

    With `exploration = ε`, each action is drawn from `(1 - ε) P_F(· | s) + ε U(valid)`;
    the recorded `log_pf` is always the policy's own.

    Args:
        key: a JAX PRNG key.
        policy: an `AbstractPolicy` (e.g. `MLPPolicy`).
        params: its parameters (`policy.init(key)`).
        num_samples: the number of trajectories.
        exploration: ε in [0, 1] (default 0: on-policy).

    Returns:
        `Trajectories`.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, sample_trajectories
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0))
        >>> batch = sample_trajectories(jax.random.key(1), policy, params, 5)
        >>> batch.terminal_state.shape, batch.active.shape
        ((5, 2), (5, 7))
    """
    _check_common(policy, num_samples, exploration, "sample_trajectories")
    return _sample_trajectories(key, policy, params, num_samples, float(exploration))


@eqx.filter_jit
def _sample_trajectories(key, policy, params, num_samples, exploration):
    uniforms = jax.random.uniform(key, (num_samples, policy.env.max_length))
    return _batch(policy, params, uniforms, exploration)


def _uniforms(policy, num_samples):
    """The objectives' one sample site: uniforms driving the inverse-CDF action draws.

    Its distribution does not depend on the parameters, so its score term is zero and the
    estimator adds nothing: the gradient is that of the loss with the trajectories held
    fixed. (A reparameterised site would be refused, rightly in general, because the
    actions are discontinuous functions of the uniforms.)
    """
    shape = (num_samples, policy.env.max_length)
    return sample(dist.Uniform(0.0, 1.0).expand(shape).to_event(2), reinforce,
                  name="uniforms")


def trajectory_balance(policy: AbstractPolicy, num_samples: int = 128,
                       exploration: float = 0.0) -> Expectation:
    """The trajectory-balance loss as an expectation program `loss(key, params)`.

    For trajectories `τ = (s0 → ... → x)` drawn from the (exploring) forward policy,

        L(θ) = mean over the batch of (log Z + Σ_t log P_F(s_{t+1}|s_t) − log R(x)
                                        − Σ_t log P_B(s_t|s_{t+1}))²,

    with the trajectories held fixed (not differentiated). On-policy, its expected
    gradient in the forward policy is the score-function gradient of KL(P_F ‖ P_B R / Z)
    with log Z acting as a baseline (Malkin et al. 2022).

    Args:
        policy: an `AbstractPolicy`; `params` must hold `"forward"` and `"log_z"` (and
            `"backward"` for a learned backward policy).
        num_samples: trajectories per estimate (the batch size).
        exploration: ε-uniform exploration in [0, 1].

    Returns:
        A `px.Expectation`; minimise it with
        `px.fit(loss, params, optax.adam(1e-3), num_steps, key, maximize=False)`.

    Example:
        >>> import jax, optax
        >>> import ppl_ext as px
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, trajectory_balance, evaluate
        >>> env = Hypergrid(dimension=2, side=4)
        >>> policy = MLPPolicy(env, hidden_sizes=(32,), learned_backward=False)
        >>> params = policy.init(jax.random.key(0))
        >>> loss = trajectory_balance(policy, num_samples=16)
        >>> result = px.fit(loss, params, optax.adam(0.01), 300, jax.random.key(1),
        ...                 maximize=False, progress=False)
        >>> bool(evaluate(policy, result.params).l1_distance
        ...      < evaluate(policy, params).l1_distance)
        True

    Reference: Malkin, Jain, Bengio, Sun, Bengio (2022), "Trajectory balance: improved
    credit assignment in GFlowNets".
    """
    _check_common(policy, num_samples, exploration, "trajectory_balance")
    exploration = float(exploration)

    def trajectory_balance_loss(params):
        batch = _batch(policy, params, _uniforms(policy, num_samples), exploration)
        residual = (params["log_z"] + jnp.sum(batch.log_pf, -1) - batch.log_reward
                    - jnp.sum(batch.log_pb, -1))
        return jnp.mean(residual**2)

    return expectation(trajectory_balance_loss)


def detailed_balance(policy: AbstractPolicy, num_samples: int = 128,
                     exploration: float = 0.0) -> Expectation:
    """The detailed-balance loss as an expectation program `loss(key, params)`.

    For every transition `s → s'` of sampled trajectories,
    `(log F(s) + log P_F(s'|s) − log F(s') − log P_B(s|s'))²`, and for the exit from a
    terminal `x`, `(log F(x) + log P_F(exit|x) − log R(x))²` (torchgfn's convention,
    where every state may be terminal); averaged over all transitions of the batch.
    `log F(s0)` is `params["log_z"]`, other flows are the `params["log_flow"]` head
    (`policy.init(key, log_flow=True)`). Trajectories are held fixed, as in
    `trajectory_balance`.

    Args:
        policy: an `AbstractPolicy` with a state-flow head.
        num_samples: trajectories per estimate.
        exploration: ε-uniform exploration in [0, 1].

    Returns:
        A `px.Expectation` to minimise with `px.fit(..., maximize=False)`.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, detailed_balance
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0), log_flow=True)
        >>> loss = detailed_balance(policy, num_samples=4)
        >>> bool(loss(jax.random.key(1), params) >= 0)
        True

    Reference: Bengio, Lahlou, Deleu, Hu, Tiwari, Bengio (2023), "GFlowNet foundations".
    """
    _check_common(policy, num_samples, exploration, "detailed_balance")
    exploration = float(exploration)
    env = policy.env

    def detailed_balance_loss(params):
        batch = _batch(policy, params, _uniforms(policy, num_samples), exploration)
        flows = jax.vmap(jax.vmap(lambda s: policy.log_flow(params, s)))(batch.states)
        steps = jnp.arange(env.max_length + 1)
        flows = jnp.where(steps == 0, params["log_z"], flows)  # log F(s0) = log Z
        is_exit = batch.actions == env.exit_action
        # the exit's target is log R(x); a move's is log F(s') + log P_B(s | s')
        target = jnp.where(is_exit, batch.log_reward[:, None],
                           flows[:, 1:] + batch.log_pb)
        residual = flows[:, :-1] + batch.log_pf - target
        squares = jnp.where(batch.active, residual**2, 0.0)
        return jnp.sum(squares) / jnp.sum(batch.active)

    return expectation(detailed_balance_loss)
