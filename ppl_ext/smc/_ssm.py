"""State-space models: initial, transition and observation laws as numpyro distributions.

A state-space (hidden Markov) model with states `x_t` and observations `y_t`, t = 0..T-1:

    x_0 ~ μ_θ(· | u_0),  x_t | x_{t-1} ~ f_θ(· | x_{t-1}, t, u_t),  y_t | x_t ~ g_θ(· | x_t, t, u_t),

with parameters `θ` (any pytree, `params`) and optional time-varying inputs `u_t` (any
pytree whose leaves have a leading time axis). Each law is a callable that returns a
numpyro distribution for ONE particle; the filters vectorise it over particles with
`jax.vmap`, so the callables are written as for a single state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def _leading_length(tree, what: str, owner: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{owner}: {what} is empty (no arrays)")
    lengths = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"{owner}: {what} must have a leading time axis; got a scalar")
        lengths.add(shape[0])
    if len(lengths) != 1:
        raise ValueError(f"{owner}: the leaves of {what} have different leading (time) "
                         f"lengths {sorted(lengths)}")
    return lengths.pop()


def check_series(observations, inputs, owner: str) -> int:
    """The number of time steps `T` of `observations`, checked against `inputs`."""
    if observations is None:
        raise ValueError(f"{owner}: observations is None")
    num_times = _leading_length(observations, "observations", owner)
    if num_times < 1:
        raise ValueError(f"{owner}: observations is empty (zero time steps); a filter needs "
                         "at least one observation")
    if inputs is not None:
        num_inputs = _leading_length(inputs, "inputs", owner)
        if num_inputs != num_times:
            raise ValueError(f"{owner}: inputs have {num_inputs} time steps but observations "
                             f"have {num_times}; give one input per observation")
    return num_times


def at_time(tree, t):
    """The slice `t` of every leaf of `tree` (None stays None)."""
    return None if tree is None else jax.tree.map(lambda a: a[t], tree)


def scalar_log_density(law, value, what: str):
    """`law.log_prob(value)`, which must be a scalar for one particle."""
    log_density = law.log_prob(value)
    if jnp.ndim(log_density) != 0:
        raise ValueError(
            f"the {what} law must describe one particle's whole state: its log density is a "
            f"scalar, got shape {jnp.shape(log_density)} (batch shape {law.batch_shape}); "
            "declare independent coordinates with `.to_event(1)`")
    return log_density


def check_observation_shape(law, observation, owner: str) -> None:
    expected = tuple(law.batch_shape) + tuple(law.event_shape)
    got = tuple(jnp.shape(observation))
    if got != expected:
        raise ValueError(f"{owner}: one time step of the observations has shape {got}, but the "
                         f"observation law's values have shape {expected}")


class StateSpaceModel(eqx.Module):
    """A state-space model given by its initial, transition and observation laws.

    Each law is a callable returning a numpyro distribution over ONE state (or one
    observation); the filters `jax.vmap` it over particles:

    - `initial(params, inputs)`: the law `μ_θ` of `x_0`;
    - `transition(params, x_prev, t, inputs)`: the law `f_θ` of `x_t` given `x_{t-1}`
      (`t >= 1`, an int32 scalar);
    - `observation(params, x, t, inputs)`: the law `g_θ` of `y_t` given `x_t`;
    - `proposal(params, x_prev, t, observation, inputs)` (optional, for
      `GuidedFilter`): the proposal `q_θ(x_t | x_{t-1}, y_t)`;
    - `initial_proposal(params, observation, inputs)` (optional): the proposal of `x_0`
      given `y_0`; the guided filter draws `x_0` from `initial` when it is missing.

    `params` is any pytree; `inputs` is the time step's slice of the optional inputs
    (None when the model has none). A law's `log_prob` of one state must be a scalar (use
    `.to_event(1)` for independent coordinates).

    Example (a random walk observed in noise):
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> from ppl_ext.smc import StateSpaceModel
        >>> model = StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, params["q"]),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, params["r"]))
        >>> states, observations = model.sample(jax.random.key(0), {"q": 1.0, "r": 0.5}, 10)
        >>> states.shape, observations.shape
        ((10,), (10,))
    """

    initial: Callable[..., Any] = eqx.field(static=True)
    transition: Callable[..., Any] = eqx.field(static=True)
    observation: Callable[..., Any] = eqx.field(static=True)
    proposal: Callable[..., Any] | None = eqx.field(default=None, static=True)
    initial_proposal: Callable[..., Any] | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        for name in ("initial", "transition", "observation"):
            if not callable(getattr(self, name)):
                raise TypeError(f"StateSpaceModel.{name} must be a callable returning a numpyro "
                                f"distribution, got {getattr(self, name)!r}")
        for name in ("proposal", "initial_proposal"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"StateSpaceModel.{name} must be None or a callable, got "
                                f"{value!r}")

    def sample(self, key: Array, params: Any, num_steps: int, inputs: Any = None
               ) -> tuple[Any, Any]:
        """Draw states and observations for `num_steps` time steps (a `lax.scan`).

        Returns `(states, observations)`, each with a leading time axis of `num_steps`.
        `inputs`, if given, must have `num_steps` time steps.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"StateSpaceModel.sample: num_steps must be a positive int, got "
                             f"{num_steps!r}")
        if inputs is not None:
            length = _leading_length(inputs, "inputs", "StateSpaceModel.sample")
            if length != num_steps:
                raise ValueError(f"StateSpaceModel.sample: inputs have {length} time steps, "
                                 f"num_steps is {num_steps}")
        return _sample(self, key, params, num_steps, inputs)


@eqx.filter_jit
def _sample(model, key, params, num_steps, inputs):
    keys = jax.random.split(key, 2 * num_steps).reshape(num_steps, 2)
    inputs_0 = at_time(inputs, 0)
    x0 = model.initial(params, inputs_0).sample(keys[0, 0])
    y0 = model.observation(params, x0, jnp.asarray(0, jnp.int32), inputs_0).sample(keys[0, 1])

    def body(x_prev, xs):
        t, step_keys, step_inputs = xs
        x = model.transition(params, x_prev, t, step_inputs).sample(step_keys[0])
        y = model.observation(params, x, t, step_inputs).sample(step_keys[1])
        return x, (x, y)

    later_inputs = None if inputs is None else jax.tree.map(lambda a: a[1:], inputs)
    times = jnp.arange(1, num_steps, dtype=jnp.int32)
    _, (xs, ys) = jax.lax.scan(body, x0, (times, keys[1:], later_inputs))
    states = jnp.concatenate([x0[None], xs.astype(jnp.result_type(x0))])
    observations = jnp.concatenate([y0[None], ys.astype(jnp.result_type(y0))])
    return states, observations
