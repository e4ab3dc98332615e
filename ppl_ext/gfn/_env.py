"""GFlowNet environments: the protocol and the hypergrid.

An environment is a DAG of states with a source `s0`. Methods act on *one* state (an
array); batches are `jax.vmap`s of them, so every method must be traceable and free of
Python control flow on state values. A forward action either moves to a child or is the
exit action, which ends the trajectory: the state it is taken from is the terminal object
`x`, rewarded with `R(x)`.
"""

from __future__ import annotations

import abc
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def _check_action(action, name: str) -> jax.Array:
    action = jnp.asarray(action)
    if action.shape != () or not jnp.issubdtype(action.dtype, jnp.integer):
        raise ValueError(
            f"{name} takes one integer action (shape ()), got dtype {action.dtype} and shape "
            f"{action.shape}; vmap over a batch of states and actions.")
    return action


class AbstractEnvironment(eqx.Module):
    """A GFlowNet environment: states, action masks, transitions and a terminal reward.

    Every method takes one state; batches are `jax.vmap`s. A concrete environment
    declares the number of forward actions (`num_actions`, the last of which,
    `exit_action`, ends a trajectory) and of backward actions (`num_backward_actions`),
    and `max_length`, the most forward actions (exit included) any trajectory takes, so
    a sampler is a `lax.scan` of that length. Small instances enumerate their states
    (`all_states`, `state_index`) for exact evaluation by dynamic programming.

    Protocol identities (checked in the tests): `backward_step(step(s, a),
    to_backward_action(s, a)) == s` for every valid non-exit `a`; `step(s, exit_action)
    == s`; `backward_mask(initial_state())` is all False.

    Example (the hypergrid is the concrete environment shipped here):
        >>> import jax.numpy as jnp
        >>> from ppl_ext.gfn import Hypergrid
        >>> env = Hypergrid(dimension=2, side=4)
        >>> s = env.step(env.initial_state(), jnp.int32(1))
        >>> s.tolist(), env.forward_mask(s).tolist(), env.backward_mask(s).tolist()
        ([0, 1], [True, True, True], [False, True])
    """

    @property
    @abc.abstractmethod
    def num_actions(self) -> int:
        """Number of forward actions; the last one is the exit action."""

    @property
    @abc.abstractmethod
    def num_backward_actions(self) -> int:
        """Number of backward actions (undoing one non-exit forward action)."""

    @property
    def exit_action(self) -> int:
        """Index of the exit action: it ends the trajectory at the current state."""
        return self.num_actions - 1

    @property
    @abc.abstractmethod
    def max_length(self) -> int:
        """The most forward actions (exit included) that any trajectory takes."""

    @property
    @abc.abstractmethod
    def encoding_size(self) -> int:
        """Length of `encode(state)`, the policy network's input."""

    @abc.abstractmethod
    def initial_state(self) -> jax.Array:
        """The source state `s0`."""

    @abc.abstractmethod
    def forward_mask(self, state: jax.Array) -> jax.Array:
        """Boolean `(num_actions,)`: the forward actions valid at `state`."""

    @abc.abstractmethod
    def backward_mask(self, state: jax.Array) -> jax.Array:
        """Boolean `(num_backward_actions,)`: the backward actions valid at `state`."""

    @abc.abstractmethod
    def step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """The child reached by forward `action` (the state itself for the exit action)."""

    @abc.abstractmethod
    def backward_step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """The parent reached by backward `action`."""

    @abc.abstractmethod
    def to_backward_action(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """The backward action that undoes forward `action` taken at `state`."""

    @abc.abstractmethod
    def log_reward(self, state: jax.Array) -> jax.Array:
        """`log R(x)` of a terminal state `x` (a scalar)."""

    def log_energy(self, state: jax.Array) -> jax.Array:
        """The intermediate energy `E(s)` of forward-looking objectives (a scalar).

        Forward-looking (FL) GFlowNets (Pan et al. 2023, "Better training of GFlowNets
        with local credit and incomplete trajectories") write the state flow as
        `log F(s) = log F̃(s) − E(s)` and learn only `F̃`. `E` is in log-reward units
        (despite the name, it is an energy, not its logarithm) and must satisfy
        `E(x) = −log R(x)` at every terminal state `x` (checked by the conformance tests);
        elsewhere any finite choice is valid, and a good one carries partial credit.

        The default raises `NotImplementedError`: an environment opts in by overriding it.

        Args:
            state: one state.

        Returns:
            `E(state)`, a float scalar.

        Raises:
            NotImplementedError: the environment defines no intermediate energy.
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines no intermediate energy log_energy(state), which "
            f"forward-looking objectives need; override log_energy in the environment or use "
            f"an objective that does not need it (e.g. trajectory_balance).")

    @abc.abstractmethod
    def encode(self, state: jax.Array) -> jax.Array:
        """A float vector `(encoding_size,)` describing `state` for a policy network."""

    def log_partition(self) -> jax.Array:
        """The exact `log Z = log Σ_x R(x)` over the terminal states (a scalar).

        The default enumerates `all_states()` (the states where exit is valid);
        environments with a closed form or a cheaper DP override it, so `log Z` stays
        exact where the states cannot be enumerated.
        """
        states = self.all_states()
        can_exit = jax.vmap(self.forward_mask)(states)[:, self.exit_action]
        return jax.nn.logsumexp(jnp.where(can_exit, jax.vmap(self.log_reward)(states),
                                          -jnp.inf))

    @abc.abstractmethod
    def all_states(self) -> jax.Array:
        """Every state, stacked on a leading axis, in the order of `state_index`."""

    @abc.abstractmethod
    def state_index(self, state: jax.Array) -> jax.Array:
        """The position of `state` in `all_states()` (an integer scalar)."""


class Hypergrid(AbstractEnvironment):
    """The hypergrid of Bengio et al. (2021), defined as torchgfn's `HyperGrid`.

    States are points `x ∈ {0, ..., H-1}^D` (int32 arrays of shape `(D,)`), starting at the
    origin. Forward action `d < D` increments coordinate `d` (valid while `x_d < H - 1`);
    action `D` exits, making `x` terminal, so every state is a possible terminal object
    and there are `H^D` of them. Backward action `d` decrements coordinate `d` (valid
    where `x_d > 0`). With `a_d = |x_d / (H - 1) - 1/2|` the reward is

        R(x) = R0 + R1 · Π_d 1[a_d > 0.25] + R2 · Π_d 1[0.3 < a_d ≤ 0.4]

    torchgfn's "original" reward (`src/gfn/gym/hypergrid.py` / `helpers/hypergrid/rewards.py`,
    `OriginalReward`, defaults `R0=0.1, R1=0.5, R2=2.0`) computes `(0.25 + EPS < ax)` and
    `(0.3 + EPS < ax) * (ax < 0.4 + EPS)` with `EPS = 1e-12`: strict lower bounds and an
    upper bound that includes 0.4. Here the comparisons are made exactly in integers,
    `a_d = |2 x_d - (H - 1)| / (2 (H - 1))`, so no rounding decides a boundary case.
    The state encoding is torchgfn's one-hot per coordinate (`D · H` values).

    Args:
        dimension: D, at least 1.
        side: H, at least 2.
        r0, r1, r2: the reward constants R0 > 0, R1, R2 (torchgfn's defaults).

    Raises:
        ValueError: `dimension < 1`, `side < 2` or `r0 <= 0` (log R must be finite).

    Example:
        >>> from ppl_ext.gfn import Hypergrid
        >>> import jax.numpy as jnp
        >>> env = Hypergrid(dimension=2, side=8)
        >>> tuple(round(float(jnp.exp(env.log_reward(jnp.array(x)))), 4)
        ...       for x in ([0, 0], [1, 6], [3, 4], [0, 7]))
        (0.6, 2.6, 0.1, 0.6)

    Reference: Bengio, Jain, Korablyov, Precup, Bengio (2021), "Flow network based
    generative models for non-iterative diverse candidate generation"; torchgfn.
    """

    dimension: int = eqx.field(static=True)
    side: int = eqx.field(static=True)
    r0: float = eqx.field(static=True, default=0.1)
    r1: float = eqx.field(static=True, default=0.5)
    r2: float = eqx.field(static=True, default=2.0)

    def __check_init__(self):
        if not isinstance(self.dimension, (int, np.integer)) or self.dimension < 1:
            raise ValueError(f"Hypergrid needs dimension >= 1, got {self.dimension!r}.")
        if not isinstance(self.side, (int, np.integer)) or self.side < 2:
            raise ValueError(f"Hypergrid needs side >= 2, got {self.side!r}.")
        if not self.r0 > 0:
            raise ValueError(f"Hypergrid needs r0 > 0 (log R(x) must be finite), got "
                             f"{self.r0!r}.")

    @property
    def num_actions(self) -> int:
        """`D + 1`: increment one of the D coordinates, or exit."""
        return self.dimension + 1

    @property
    def num_backward_actions(self) -> int:
        """`D`: decrement one coordinate."""
        return self.dimension

    @property
    def max_length(self) -> int:
        """`D (H - 1) + 1`: walk to the far corner, then exit."""
        return self.dimension * (self.side - 1) + 1

    @property
    def encoding_size(self) -> int:
        """`D · H` (one-hot per coordinate)."""
        return self.dimension * self.side

    def _check_state(self, state, name):
        state = jnp.asarray(state)
        if state.shape != (self.dimension,):
            raise ValueError(f"Hypergrid.{name} takes one state of shape ({self.dimension},), "
                             f"got shape {state.shape}; vmap over a batch.")
        return state

    def initial_state(self) -> jax.Array:
        """The origin, int32 `(D,)` zeros."""
        return jnp.zeros((self.dimension,), jnp.int32)

    def forward_mask(self, state: jax.Array) -> jax.Array:
        """Increment `d` where `x_d < H - 1`; exit always."""
        state = self._check_state(state, "forward_mask")
        return jnp.concatenate([state < self.side - 1, jnp.ones((1,), bool)])

    def backward_mask(self, state: jax.Array) -> jax.Array:
        """Decrement `d` where `x_d > 0`."""
        return self._check_state(state, "backward_mask") > 0

    def step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """`x + e_action` (unchanged for the exit action `D`)."""
        state = self._check_state(state, "step")
        action = _check_action(action, "Hypergrid.step")
        return state + (jnp.arange(self.dimension) == action).astype(state.dtype)

    def backward_step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """`x - e_action`."""
        state = self._check_state(state, "backward_step")
        action = _check_action(action, "Hypergrid.backward_step")
        return state - (jnp.arange(self.dimension) == action).astype(state.dtype)

    def to_backward_action(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """Incrementing `d` is undone by decrementing `d`."""
        return _check_action(action, "Hypergrid.to_backward_action")

    def log_reward(self, state: jax.Array) -> jax.Array:
        """`log R(x)` (see the class docstring), exact at the region boundaries."""
        state = self._check_state(state, "log_reward")
        h1 = self.side - 1
        # a_d = distance / (2 (H - 1)), with distance = |2 x_d - (H - 1)| an integer
        distance = jnp.abs(2 * state - h1)
        outer = jnp.all(2 * distance > h1)  # a_d > 1/4
        ring = jnp.all((5 * distance > 3 * h1) & (5 * distance <= 4 * h1))  # 0.3 < a_d <= 0.4
        reward = self.r0 + self.r1 * outer + self.r2 * ring
        return jnp.log(jnp.asarray(reward, dtype=jnp.result_type(float)))

    def log_energy(self, state: jax.Array) -> jax.Array:
        """`E(s) = −log R(s)`: every hypergrid state can exit, so every state is terminal
        and the FL constraint `E(x) = −log R(x)` fixes `E` everywhere."""
        return -self.log_reward(state)

    def encode(self, state: jax.Array) -> jax.Array:
        """One-hot per coordinate, `(D · H,)` floats."""
        state = self._check_state(state, "encode")
        return jax.nn.one_hot(state, self.side).reshape(-1)

    def all_states(self) -> jax.Array:
        """All `H^D` points, int32 `(H^D, D)`, in lexicographic (row-major) order."""
        grid = list(itertools.product(range(self.side), repeat=self.dimension))
        return jnp.asarray(np.array(grid, dtype=np.int32).reshape(-1, self.dimension))

    def state_index(self, state: jax.Array) -> jax.Array:
        """Row-major index `Σ_d x_d H^(D-1-d)`."""
        state = self._check_state(state, "state_index")
        weights = self.side ** jnp.arange(self.dimension - 1, -1, -1, dtype=jnp.int32)
        return jnp.sum(state * weights)
