"""The kernel protocol shared by every iterative method (optimisers, samplers, SMC steps).

A kernel is a pure, state-passing pair of functions, as in blackjax's `base.py`:

- `init(*args, **kwargs) -> State` builds the initial state;
- `step(key, state, *args, **kwargs) -> (State, Info)` advances it by one iteration.

`State` and `Info` are NamedTuples or `eqx.Module`s of arrays (pytrees), so a loop over a
kernel is a `lax.scan` (or `fori_loop`) whose carry is the state: nothing iterative keeps
Python-side state, and a kernel works under `jit`, `vmap` and `scan`. The key comes first
and is used as is: the caller splits or folds in keys between steps.

This module imports nothing from ppl_ext, so every layer can build on it.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx

#: A kernel's state: a NamedTuple or `eqx.Module` of arrays (a pytree).
State = Any
#: A kernel's per-step diagnostics: a NamedTuple or `eqx.Module` of arrays (a pytree).
Info = Any


class AbstractKernel(eqx.Module):
    """An iterative method as two pure functions: `init(...) -> State`, `step(key, state, ...)`.

    Subclasses are `eqx.Module`s holding the method's settings (step sizes, the target's
    log density, ...) as fields and implement both methods; concrete kernels are final.
    `step(key, state, *args)` must be a pure function of its inputs, traceable by JAX, and
    return a state with the same tree structure, shapes and dtypes as the one it received
    (so that `lax.scan` can carry it). Per-step randomness comes only from `key`.

    A copyable skeleton, random-walk Metropolis on a log density `log_density_fn`:

        >>> from collections.abc import Callable
        >>> from typing import NamedTuple
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext._kernel import AbstractKernel  # also exported as px.AbstractKernel
        >>> class RandomWalkState(NamedTuple):
        ...     position: jax.Array
        ...     log_density: jax.Array
        >>> class RandomWalkInfo(NamedTuple):
        ...     acceptance_probability: jax.Array
        >>> class RandomWalk(AbstractKernel):
        ...     log_density_fn: Callable
        ...     step_size: float
        ...
        ...     def init(self, position):
        ...         position = jnp.asarray(position, float)
        ...         return RandomWalkState(position, self.log_density_fn(position))
        ...
        ...     def step(self, key, state):
        ...         key_move, key_accept = jax.random.split(key)
        ...         noise = jax.random.normal(key_move, jnp.shape(state.position))
        ...         proposal = state.position + self.step_size * noise
        ...         log_density = self.log_density_fn(proposal)
        ...         log_ratio = log_density - state.log_density
        ...         accept = jnp.log(jax.random.uniform(key_accept)) < log_ratio
        ...         new = RandomWalkState(jnp.where(accept, proposal, state.position),
        ...                               jnp.where(accept, log_density, state.log_density))
        ...         return new, RandomWalkInfo(jnp.minimum(1.0, jnp.exp(log_ratio)))
        >>> kernel = RandomWalk(lambda x: -0.5 * jnp.sum((x - 2.0) ** 2), step_size=1.0)
        >>> def one_step(state, key):
        ...     state, info = kernel.step(key, state)
        ...     return state, state.position
        >>> keys = jax.random.split(jax.random.key(0), 4000)
        >>> _, positions = jax.lax.scan(one_step, kernel.init(0.0), keys)
        >>> bool(abs(positions[1000:].mean() - 2.0) < 0.2)  # the target's mean is 2
        True

    Instantiating a class that leaves either method abstract raises `TypeError`.
    """

    @abc.abstractmethod
    def init(self, *args: Any, **kwargs: Any) -> State:
        """The initial state of the method (a NamedTuple or `eqx.Module` of arrays)."""

    @abc.abstractmethod
    def step(self, key: Any, state: State, *args: Any, **kwargs: Any) -> tuple[State, Info]:
        """One iteration from `state` with randomness from the PRNG `key`.

        Returns `(new_state, info)`: a state of the same structure, shapes and dtypes,
        and per-step diagnostics (a NamedTuple or `eqx.Module` of arrays).
        """
