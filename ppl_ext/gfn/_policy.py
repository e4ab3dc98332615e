"""GFlowNet policies: forward and backward action distributions, log Z and log state flows.

A policy is an `eqx.Module` holding only structure (the environment, layer sizes); its
trainable arrays live in a separate `params` dict (made by `policy.init(key)`), so the
same `params` go to `px.fit`, the objectives and the exact evaluation.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp

from ._env import AbstractEnvironment


def _masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """log-softmax over the valid entries; `-inf` at invalid ones.

    Invalid logits are replaced by a large finite negative number first, so a state with
    no valid action (the backward policy at `s0`) gives no NaN value or gradient.
    """
    logits = jnp.where(mask, logits, -1e30)
    return jnp.where(mask, jax.nn.log_softmax(logits), -jnp.inf)


def _mlp_init(key, sizes: tuple[int, ...]) -> tuple[eqx.nn.Linear, ...]:
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))


def _mlp_apply(layers, x: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x = jax.nn.relu(layer(x))
    return layers[-1](x)


class AbstractPolicy(eqx.Module):
    """Forward and backward policies, log Z and log state flows of a GFlowNet.

    Concrete policies hold their environment as `env` and implement `init(key, ...)`,
    returning the `params` dict (always `"forward"` and `"log_z"`), and the methods below,
    each on one state (vmap for batches).
    """

    env: eqx.AbstractVar[AbstractEnvironment]

    @abc.abstractmethod
    def init(self, key: jax.Array, log_flow: bool = False) -> dict:
        """The initial `params` dict; with `log_flow=True` it includes a state-flow head."""

    @abc.abstractmethod
    def forward_log_probs(self, params: dict, state: jax.Array) -> jax.Array:
        """`log P_F(a | s)` for every forward action, `-inf` at invalid ones."""

    @abc.abstractmethod
    def backward_log_probs(self, params: dict, state: jax.Array) -> jax.Array:
        """`log P_B(b | s)` for every backward action, `-inf` at invalid ones."""

    def log_flow(self, params: dict, state: jax.Array) -> jax.Array:
        """`log F(s)`, the learned log state flow (needs `init(key, log_flow=True)`)."""
        raise NotImplementedError(f"{type(self).__name__} has no state-flow head.")

    def forward_logits(self, params: dict, state: jax.Array) -> jax.Array:
        """Unnormalised forward logits, `-inf` at invalid actions; `forward_log_probs` is
        their log-softmax. Flow matching reads them as log edge flows `log F(s → s')`."""
        raise NotImplementedError(f"{type(self).__name__} exposes no forward logits (flow "
                                  f"matching needs forward_logits).")


class MLPPolicy(AbstractPolicy):
    """Multilayer perceptrons on `env.encode(state)`, as in torchgfn's hypergrid example.

    `params["forward"]`: an MLP (ReLU hidden layers of `hidden_sizes`) giving logits over
    `env.num_actions`, masked by `env.forward_mask` (log-softmax over the valid actions).
    `params["backward"]` (when `learned_backward`): the same for backward actions;
    otherwise the backward policy is uniform over the valid backward actions.
    `params["log_z"]`: a scalar, log Z. `params["log_flow"]` (with `init(key,
    log_flow=True)`): an MLP giving one number, log F(s); detailed balance pins
    `log F(s0)` to `params["log_z"]`.

    Args:
        env: the environment.
        hidden_sizes: widths of the hidden layers (torchgfn's default: `(256, 256)`).
        learned_backward: learn the backward policy (default) or keep it uniform.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy
        >>> env = Hypergrid(dimension=2, side=4)
        >>> policy = MLPPolicy(env, hidden_sizes=(16,), learned_backward=False)
        >>> params = policy.init(jax.random.key(0))
        >>> sorted(params)
        ['forward', 'log_z']
        >>> corner = jnp.array([3, 3])
        >>> jnp.exp(policy.forward_log_probs(params, corner)).tolist()  # only exit is valid
        [0.0, 0.0, 1.0]
    """

    env: AbstractEnvironment
    hidden_sizes: tuple[int, ...] = eqx.field(static=True, default=(256, 256))
    learned_backward: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not isinstance(self.env, AbstractEnvironment):
            raise TypeError(f"MLPPolicy needs an AbstractEnvironment, got "
                            f"{type(self.env).__name__}.")
        if any(not isinstance(h, int) or h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive ints, got {self.hidden_sizes!r}.")

    def init(self, key: jax.Array, log_flow: bool = False) -> dict:
        """`{"forward", "log_z"}` plus `"backward"` (if learned) and `"log_flow"` (if asked).

        Layers are equinox's default (uniform fan-in) initialisation; `log_z` starts at 0.
        """
        env, hidden = self.env, tuple(self.hidden_sizes)
        key_forward, key_backward, key_flow = jax.random.split(key, 3)
        params = {
            "forward": _mlp_init(key_forward, (env.encoding_size, *hidden, env.num_actions)),
            "log_z": jnp.zeros((), jnp.result_type(float)),
        }
        if self.learned_backward:
            params["backward"] = _mlp_init(
                key_backward, (env.encoding_size, *hidden, env.num_backward_actions))
        if log_flow:
            params["log_flow"] = _mlp_init(key_flow, (env.encoding_size, *hidden, 1))
        return params

    def forward_log_probs(self, params: dict, state: jax.Array) -> jax.Array:
        """Masked log-softmax of the forward MLP's logits."""
        logits = _mlp_apply(params["forward"], self.env.encode(state))
        return _masked_log_softmax(logits, self.env.forward_mask(state))

    def backward_log_probs(self, params: dict, state: jax.Array) -> jax.Array:
        """Masked log-softmax of the backward MLP's logits, or uniform over valid actions."""
        mask = self.env.backward_mask(state)
        if self.learned_backward:
            logits = _mlp_apply(params["backward"], self.env.encode(state))
        else:
            logits = jnp.zeros(mask.shape, jnp.result_type(float))
        return _masked_log_softmax(logits, mask)

    def log_flow(self, params: dict, state: jax.Array) -> jax.Array:
        """The state-flow MLP's output (a scalar)."""
        if "log_flow" not in params:
            raise KeyError("params has no 'log_flow' head: make them with "
                           "policy.init(key, log_flow=True).")
        return _mlp_apply(params["log_flow"], self.env.encode(state))[0]

    def forward_logits(self, params: dict, state: jax.Array) -> jax.Array:
        """The forward MLP's logits, `-inf` at invalid actions."""
        logits = _mlp_apply(params["forward"], self.env.encode(state))
        return jnp.where(self.env.forward_mask(state), logits, -jnp.inf)


class TabularPolicy(AbstractPolicy):
    """One free parameter per (state, action): tables indexed by `env.state_index`.

    For enumerable environments. `params["forward"]`: `(num_states, num_actions)` logits
    (masked log-softmax as in `MLPPolicy`); `params["backward"]` (when
    `learned_backward`): `(num_states, num_backward_actions)` logits, otherwise the
    backward policy is uniform over valid actions; `params["log_z"]`: a scalar;
    `params["log_flow"]` (with `init(key, log_flow=True)`): `(num_states,)` log state
    flows. Every table starts at zero (uniform policies), so `key` is unused; any
    policy and flow on the environment is representable, which makes the exact optimum of
    every balance objective reachable.

    Args:
        env: an enumerable environment (`all_states`, `state_index`).
        learned_backward: learn the backward policy or keep it uniform (default).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.gfn import Hypergrid, TabularPolicy
        >>> policy = TabularPolicy(Hypergrid(dimension=2, side=3))
        >>> params = policy.init(jax.random.key(0), log_flow=True)
        >>> params["forward"].shape, params["log_flow"].shape
        ((9, 3), (9,))
        >>> round(float(jnp.exp(policy.forward_log_probs(params, jnp.array([0, 0])))[2]), 4)
        0.3333
    """

    env: AbstractEnvironment
    learned_backward: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.env, AbstractEnvironment):
            raise TypeError(f"TabularPolicy needs an AbstractEnvironment, got "
                            f"{type(self.env).__name__}.")

    def init(self, key: jax.Array, log_flow: bool = False) -> dict:
        """Zero tables: `{"forward", "log_z"}`, plus `"backward"`, `"log_flow"` if asked."""
        env = self.env
        num_states = int(env.all_states().shape[0])
        dtype = jnp.result_type(float)
        params = {"forward": jnp.zeros((num_states, env.num_actions), dtype),
                  "log_z": jnp.zeros((), dtype)}
        if self.learned_backward:
            params["backward"] = jnp.zeros((num_states, env.num_backward_actions), dtype)
        if log_flow:
            params["log_flow"] = jnp.zeros((num_states,), dtype)
        return params

    def forward_logits(self, params: dict, state: jax.Array) -> jax.Array:
        """The row of `params["forward"]` of `state`, `-inf` at invalid actions."""
        logits = params["forward"][self.env.state_index(state)]
        return jnp.where(self.env.forward_mask(state), logits, -jnp.inf)

    def forward_log_probs(self, params: dict, state: jax.Array) -> jax.Array:
        """Masked log-softmax of the state's row of `params["forward"]`."""
        logits = params["forward"][self.env.state_index(state)]
        return _masked_log_softmax(logits, self.env.forward_mask(state))

    def backward_log_probs(self, params: dict, state: jax.Array) -> jax.Array:
        """Masked log-softmax of the state's row of `params["backward"]`, or uniform."""
        mask = self.env.backward_mask(state)
        if self.learned_backward:
            logits = params["backward"][self.env.state_index(state)]
        else:
            logits = jnp.zeros(mask.shape, jnp.result_type(float))
        return _masked_log_softmax(logits, mask)

    def log_flow(self, params: dict, state: jax.Array) -> jax.Array:
        """The state's entry of `params["log_flow"]`."""
        if "log_flow" not in params:
            raise KeyError("params has no 'log_flow' table: make them with "
                           "policy.init(key, log_flow=True).")
        return params["log_flow"][self.env.state_index(state)]
