"""A GFlowNet's forward policy as a generative function over trajectories.

`ForwardPolicySampler(policy)` draws a complete trajectory `s_0 → ... → x → exit` by
sampling every action at a `px.sample` site of a `Categorical` over the valid actions, so
inside an expectation program each action carries its gradient estimator (`px.reinforce`
by default) and any objective over sampled objects is differentiated without bias with
respect to the policy's parameters. The trajectory's density is exact,
`P_F(τ) = Π_t P_F(a_t | s_t)`: `simulate` returns it and `assess(actions)` recomputes it
by replaying the actions.

A trained sampler is then a variational family or a proposal over trajectories like any
other generative function. The law of the terminal object `x` alone is a marginal, whose
density can be estimated with a backward policy as proposal (`P_B(τ | x) / P_F(τ)` is
unbiased for `1 / P_T(x)` when `τ` is the trajectory that produced `x`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jaxtyping import Array

from ..adev import AbstractLocalEstimator, reinforce, sample
from ..gen._protocol import AbstractGenerativeFunction, Trace
from ._policy import AbstractPolicy


class SampledObject(NamedTuple):
    """`ForwardPolicySampler.simulate`'s return value.

    Attributes:
        terminal_state: the object `x` the trajectory ends at.
        log_reward: `log R(x)`.
        length: the number of actions taken, the exit included.
    """

    terminal_state: Array
    log_reward: Array
    length: Array


class ForwardPolicySampler(AbstractGenerativeFunction):
    """Trajectories of a GFlowNet's forward policy, as a generative function.

    Args:
        policy: an `AbstractPolicy`; `params` of `simulate`/`assess` are its parameters.
        estimator: the local estimator of every action site (default `px.reinforce`; the
            actions are discrete, so a pathwise estimator does not apply, and
            continuation estimators cannot run inside the rollout's `lax.scan`).

    `simulate(params)` returns a `Trace` with choices `{"actions": (max_length,) int32}`
    (after the exit, the padding repeats the exit action and has no density),
    `log_density = log P_F(τ)` and `retval` a `SampledObject`.
    `assess({"actions": ...}, params)` returns `log P_F(τ)` of those actions, or `-inf`
    when one of them is invalid where it is taken or the trajectory never exits.

    Example (the expected log reward and its gradient):
        >>> import jax
        >>> import ppl_ext as px
        >>> from ppl_ext.gfn import ForwardPolicySampler, Hypergrid, TabularPolicy
        >>> policy = TabularPolicy(Hypergrid(dimension=2, side=3))
        >>> sampler = ForwardPolicySampler(policy)
        >>> @px.expectation
        ... def expected_log_reward(params):
        ...     return sampler.simulate(params).retval.log_reward
        >>> params = policy.init(jax.random.key(0))
        >>> expected_log_reward.grad(jax.random.key(1), params)["forward"].shape
        (9, 3)
    """

    policy: AbstractPolicy
    estimator: AbstractLocalEstimator = reinforce

    def __check_init__(self):
        if not isinstance(self.policy, AbstractPolicy):
            raise TypeError("ForwardPolicySampler.policy must be a px.gfn policy "
                            f"(AbstractPolicy), got {type(self.policy).__name__}")
        if not isinstance(self.estimator, AbstractLocalEstimator):
            raise TypeError(
                "ForwardPolicySampler.estimator must be a local estimator (px.reinforce or a "
                "px.Reinforce with a baseline): the actions are drawn inside a lax.scan, "
                f"where continuation estimators cannot run; got {self.estimator!r}")

    def _logits(self, params, state, done):
        """Masked log-probabilities at `state`; after the exit, only the exit, constant."""
        env = self.policy.env
        log_probs = self.policy.forward_log_probs(params, state)
        padding = jnp.where(jnp.arange(env.num_actions) == env.exit_action, 0.0, -jnp.inf)
        return jnp.where(done, padding, log_probs)

    def simulate(self, params) -> Trace:
        """Roll the forward policy out from `s_0` until it exits (see the class)."""
        env = self.policy.env

        def body(carry, _):
            state, done, log_pf = carry
            logits = self._logits(params, state, done)
            action = sample(dist.Categorical(logits=logits), self.estimator,
                            name="gfn_action").astype(jnp.int32)
            log_pf = log_pf + jnp.where(done, 0.0, logits[action])
            is_exit = action == env.exit_action
            next_state = jnp.where(done | is_exit, state, env.step(state, action))
            return (next_state, done | is_exit, log_pf), (action, ~done)

        init = (env.initial_state(), jnp.zeros((), bool), jnp.zeros(()))
        (last, _, log_pf), (actions, active) = lax.scan(body, init, None,
                                                        length=env.max_length)
        return Trace({"actions": actions}, log_pf,
                     SampledObject(last, env.log_reward(last), jnp.sum(active)))

    def assess(self, choices, params) -> Array:
        """`log P_F` of the given actions (`-inf` for an impossible trajectory)."""
        env = self.policy.env
        if not isinstance(choices, dict) or set(choices) != {"actions"}:
            raise ValueError("ForwardPolicySampler.assess takes choices {'actions': ...}, got "
                             f"{sorted(choices) if isinstance(choices, dict) else choices!r}")
        actions = jnp.asarray(choices["actions"])
        if actions.shape != (env.max_length,):
            raise ValueError(f"ForwardPolicySampler.assess: actions must have shape "
                             f"({env.max_length},) (the environment's max_length), got "
                             f"{actions.shape}")

        def body(carry, action):
            state, done, log_pf = carry
            logits = self._logits(params, state, done)
            in_range = (action >= 0) & (action < env.num_actions)  # a gather would clamp
            log_p = jnp.where(in_range, logits[jnp.clip(action, 0, env.num_actions - 1)],
                              -jnp.inf)
            log_pf = log_pf + jnp.where(done, 0.0, log_p)
            is_exit = action == env.exit_action
            next_state = jnp.where(done | is_exit, state, env.step(state, action))
            return (next_state, done | is_exit, log_pf), None

        init = (env.initial_state(), jnp.zeros((), bool), jnp.zeros(()))
        (_, done, log_pf), _ = lax.scan(body, init, actions.astype(jnp.int32))
        return jnp.where(done, log_pf, -jnp.inf)

