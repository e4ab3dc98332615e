"""Training options for GFlowNets: a replay buffer of terminal states and the back-end that
carries it through `px.fit`.

Exploration (`exploration = ε`, actions from `(1 − ε) P_F + ε U(valid)`) and the reward
temperature (`temperature = T`, target `R^(1/T)`) are arguments of every balance objective;
replay needs state that changes from step to step, so it lives here: a `ReplayBuffer`
(an `eqx.Module` of arrays) is the objective's last argument, and `ReplayBackend` wraps
any back-end, keeps the buffer in its state, hands the current buffer to the objective at
every step and adds freshly sampled terminal states to it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..optim._backend import AbstractBackend, OptaxBackend
from ._env import AbstractEnvironment
from ._objectives import _batch, _check_common
from ._policy import AbstractPolicy


class ReplayBuffer(eqx.Module):
    """A first-in first-out buffer of terminal states (a fixed-size ring of arrays).

    Objectives built with `num_replay_samples = m` and called as
    `loss(key, params, buffer)` add `m` trajectories to each batch: terminal states drawn
    uniformly from the buffer, each completed backward to `s0` with `P_B`. Those rows
    are masked out while the buffer is empty.

    Attributes:
        states: `(capacity, *state_shape)`, the stored states (slots beyond `size` hold
            `s0` and are never drawn).
        size: int32 scalar, the number of stored states (at most the capacity).
        position: int32 scalar, the slot the next state is written to.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.gfn import Hypergrid, ReplayBuffer
        >>> buffer = ReplayBuffer.empty(Hypergrid(dimension=2, side=4), capacity=3)
        >>> buffer = buffer.add(jnp.array([[1, 2], [3, 3]])).add(jnp.array([[0, 1], [2, 2]]))
        >>> int(buffer.size), buffer.capacity, buffer.states[0].tolist()
        (3, 3, [2, 2])
    """

    states: jax.Array
    size: jax.Array
    position: jax.Array

    @classmethod
    def empty(cls, env: AbstractEnvironment, capacity: int) -> ReplayBuffer:
        """An empty buffer for `capacity` states of `env`.

        Raises:
            ValueError: `capacity` is not an int >= 1.
        """
        if not isinstance(env, AbstractEnvironment):
            raise TypeError(f"ReplayBuffer.empty needs an environment, got "
                            f"{type(env).__name__}.")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be an int >= 1, got {capacity!r}.")
        s0 = env.initial_state()
        states = jnp.broadcast_to(s0, (int(capacity), *s0.shape))
        return cls(states, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        """The number of slots."""
        return self.states.shape[0]

    def add(self, states: jax.Array) -> ReplayBuffer:
        """The buffer with `states` (a batch, leading axis) written over the oldest slots.

        Raises:
            ValueError: the batch's state shape differs from the buffer's, or the batch is
                larger than the capacity.
        """
        states = jnp.asarray(states)
        if states.shape[1:] != self.states.shape[1:]:
            raise ValueError(f"ReplayBuffer.add takes a batch of states of shape "
                             f"(num, {', '.join(map(str, self.states.shape[1:]))}), got "
                             f"{states.shape}.")
        number = states.shape[0]
        if number > self.capacity:
            raise ValueError(f"ReplayBuffer.add got {number} states for a buffer of capacity "
                             f"{self.capacity}; make the buffer larger.")
        slots = (self.position + jnp.arange(number, dtype=jnp.int32)) % self.capacity
        return ReplayBuffer(self.states.at[slots].set(states.astype(self.states.dtype)),
                            jnp.minimum(self.size + number, self.capacity).astype(jnp.int32),
                            ((self.position + number) % self.capacity).astype(jnp.int32))


class ReplayState(NamedTuple):
    """State of `ReplayBackend`: the wrapped back-end's state and the current buffer."""

    inner: Any
    buffer: ReplayBuffer


class ReplayBackend(AbstractBackend):
    """Any back-end, with a replay buffer of terminal states carried in its state.

    `px.fit(loss, params, ReplayBackend(optax.adam(1e-3), policy), num_steps, key,
    ReplayBuffer.empty(env, capacity))`: the objective's last argument is the initial
    buffer; at every step the wrapped back-end sees the current buffer there instead,
    and then `num_samples` trajectories are drawn from the (exploring) forward policy at
    the step's starting parameters and their terminal states are added to the buffer
    (first in, first out). `FitResult.state.buffer` is the final buffer. The objective
    must be built with `num_replay_samples >= 1` to read the buffer.

    Replayed trajectories make the batch off-policy: use balance objectives (trajectory,
    detailed, sub-trajectory, forward-looking, flow matching, log-partition variance),
    which remain zero exactly at the balanced flows under any behaviour distribution.

    Args:
        backend: an `AbstractBackend` or an optax `GradientTransformation`.
        policy: the GFlowNet policy (its forward policy fills the buffer).
        num_samples: terminal states added per step (at most the buffer's capacity).
        exploration: ε-uniform exploration of the trajectories that fill the buffer.

    Example:
        >>> import jax, optax
        >>> import ppl_ext as px
        >>> from ppl_ext.gfn import (Hypergrid, ReplayBackend, ReplayBuffer, TabularPolicy,
        ...                          trajectory_balance)
        >>> env = Hypergrid(dimension=2, side=4)
        >>> policy = TabularPolicy(env)
        >>> loss = trajectory_balance(policy, num_samples=8, num_replay_samples=8)
        >>> result = px.fit(loss, policy.init(jax.random.key(0)),
        ...                 ReplayBackend(optax.adam(0.05), policy, num_samples=8), 20,
        ...                 jax.random.key(1), ReplayBuffer.empty(env, 64), maximize=False,
        ...                 progress=False)
        >>> int(result.state.buffer.size)
        64
    """

    backend: AbstractBackend
    policy: AbstractPolicy
    num_samples: int = eqx.field(static=True, default=16)
    exploration: float = eqx.field(static=True, default=0.0)

    def __init__(self, backend, policy: AbstractPolicy, num_samples: int = 16,
                 exploration: float = 0.0):
        if isinstance(backend, optax.GradientTransformation):
            backend = OptaxBackend(backend)
        if not isinstance(backend, AbstractBackend):
            raise TypeError(f"ReplayBackend wraps a ppl_ext.optim.AbstractBackend or an optax "
                            f"GradientTransformation, got {type(backend).__name__}.")
        _check_common(policy, num_samples, exploration, "ReplayBackend")
        self.backend = backend
        self.policy = policy
        self.num_samples = int(num_samples)
        self.exploration = float(exploration)

    def _buffer(self, args, who) -> ReplayBuffer:
        if not args or not isinstance(args[-1], ReplayBuffer):
            raise TypeError(
                f"ReplayBackend.{who}: the objective's last argument must be the initial "
                f"px.gfn.ReplayBuffer: px.fit(loss, params, ReplayBackend(...), num_steps, "
                f"key, ReplayBuffer.empty(env, capacity)).")
        buffer = args[-1]
        if self.num_samples > buffer.capacity:
            raise ValueError(f"ReplayBackend adds num_samples={self.num_samples} states per "
                             f"step to a buffer of capacity {buffer.capacity}; make the "
                             f"buffer at least that large.")
        return buffer

    def init(self, key, params, objective, *args, **kwargs) -> ReplayState:
        """The wrapped back-end's initial state and the initial buffer (`args[-1]`)."""
        buffer = self._buffer(args, "init")
        return ReplayState(self.backend.init(key, params, objective, *args, **kwargs), buffer)

    def step(self, key, state: ReplayState, objective, *args, **kwargs):
        """One step of the wrapped back-end on the current buffer, then add terminals."""
        self._buffer(args, "step")
        key_step, key_fill = jax.random.split(key)
        params = jax.lax.stop_gradient(self.backend.params(state.inner))
        inner, info = self.backend.step(key_step, state.inner, objective, *args[:-1],
                                        state.buffer, **kwargs)
        uniforms = jax.random.uniform(key_fill, (self.num_samples, self.policy.env.max_length))
        batch = _batch(self.policy, params, uniforms, self.exploration)
        return ReplayState(inner, state.buffer.add(batch.terminal_state)), info

    def params(self, state: ReplayState):
        """The wrapped back-end's current parameters."""
        return self.backend.params(state.inner)
