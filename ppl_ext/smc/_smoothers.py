"""Smoothers from a stored particle-filter run: genealogy tracing and FFBS.

Both read the `particles`, `log_weights` and `ancestors` a `FilterResult` keeps with
`store_particles=True` and return trajectories `x_{0:T-1}` with a leading sample axis.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._filter import FilterResult
from ._guard import refuse_derivatives
from ._backward import backward_indices
from ._resampling import categorical
from ._ssm import StateSpaceModel, check_series


def _check_stored(result, owner: str) -> None:
    if not isinstance(result, FilterResult):
        raise TypeError(f"{owner}: expected the FilterResult of px.smc.filter, got "
                        f"{type(result).__name__}")
    if result.particles is None or result.log_weights is None or result.ancestors is None:
        raise ValueError(f"{owner}: the filter result has no stored particles; run the filter "
                         "with store_particles=True")


def genealogy(result: FilterResult) -> tuple[Any, Array]:
    """Trace every final particle's ancestry back to time 0 (the path-space smoother).

    Following `ancestors` backwards from each particle `i` at `T-1` gives a trajectory
    `x_{0:T-1}^{(i)}`; weighted by the final weights `W_{T-1}^i` these estimate the
    smoothing law `p(x_{0:T-1} | y_{0:T-1})` (Kitagawa 1996). Cheap (O(N T)) but the paths
    coalesce: for `t` far from `T` few distinct ancestors remain (path degeneracy), which
    FFBS avoids.

    Returns:
        `(trajectories, log_weights)`: `(N, T, ...)` trajectories and their `(N,)`
        normalised log weights.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> result = smc.filter(jax.random.key(0), model, None, jnp.zeros(6), num_particles=32)
        >>> paths, log_weights = smc.genealogy(result)
        >>> paths.shape, log_weights.shape
        ((32, 6), (32,))
    """
    _check_stored(result, "genealogy")
    return _genealogy(result)


@eqx.filter_jit
def _genealogy(result):
    num = result.log_weights.shape[-1]

    def back(index, xs):
        particles, ancestors = xs
        states = jax.tree.map(lambda a: a[index], particles)
        return ancestors[index], states

    _, paths = jax.lax.scan(back, jnp.arange(num, dtype=jnp.int32),
                            (result.particles, result.ancestors), reverse=True)
    paths = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), paths)
    return paths, result.log_weights[-1]


def ffbs(key: Array, model: StateSpaceModel, params: Any, result: FilterResult,
         num_samples: int = 1, inputs: Any = None, log_transition_bound: Any = None,
         num_proposals: int = 10) -> Any:
    """Forward filtering, backward simulation: trajectories from the particle smoother.

    Draws `x_{T-1} ~ Σ_i W_{T-1}^i δ_{x_{T-1}^i}` and then, backwards,
    `x_t = x_t^J` with `P(J = i) ∝ W_t^i f(x_{t+1} | x_t^i)` (Godsill, Doucet and West,
    "Monte Carlo smoothing for nonlinear time series", 2004). Each trajectory costs O(N T)
    transition densities, so `num_samples = N` trajectories cost O(N² T); the draws are
    independent given the filter run and do not suffer path degeneracy.

    With `log_transition_bound` (`log f̄ >= log f(x_t | x_{t-1})` for all states), each
    backward draw first tries `num_proposals` rounds of accept-reject from `W_t` and
    falls back to the exact O(N) draw only when all fail: the hybrid FFBS of Dau and
    Chopin ("On the complexity of backward smoothing algorithms", ICML 2023), expected
    O(N T) for `num_samples = N` when the bound is tight. The draws have the same law.

    Args:
        key: a PRNG key.
        model: the `StateSpaceModel` the filter ran on.
        params: its parameters.
        result: a `FilterResult` with stored particles (`store_particles=True`).
        num_samples: the number of trajectories.
        inputs: the inputs the filter ran with (the transition reads them).
        log_transition_bound: None (exact backward draws), or a callable
            `(params, t, inputs) -> log f̄` for the hybrid accept-reject draws.
        num_proposals: accept-reject rounds before the exact fallback.

    Returns:
        `(num_samples, T, ...)` trajectories (a pytree like the states).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> result = smc.filter(jax.random.key(0), model, None, jnp.zeros(6), num_particles=32)
        >>> smc.ffbs(jax.random.key(1), model, None, result, num_samples=10).shape
        (10, 6)
    """
    _check_stored(result, "ffbs")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"ffbs: num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(model, StateSpaceModel):
        raise TypeError(f"ffbs: model must be a px.smc.StateSpaceModel, got "
                        f"{type(model).__name__}")
    num_times = result.log_weights.shape[0]
    if inputs is not None:
        check_series(result.log_weights, inputs, "ffbs")
    if isinstance(num_proposals, bool) or not isinstance(num_proposals, int) or num_proposals < 1:
        raise ValueError(f"ffbs: num_proposals must be a positive int, got {num_proposals!r}")
    trajectories = _ffbs(key, model, params, result, num_samples, inputs,
                         log_transition_bound, num_proposals)
    return refuse_derivatives(trajectories, "ffbs")


@eqx.filter_jit
def _ffbs(key, model, params, result, num_samples, inputs, log_transition_bound,
          num_proposals):
    num_times = result.log_weights.shape[0]
    key_last, key_back = jax.random.split(key)
    last = categorical(key_last, result.log_weights[-1], (num_samples,))
    x_last = jax.tree.map(lambda a: a[-1][last], result.particles)

    def back(x_next, xs):
        step_key, particles, log_weights, t_next, inputs_next = xs
        bound = (None if log_transition_bound is None
                 else log_transition_bound(params, t_next, inputs_next))
        index, _ = backward_indices(step_key, model, params, particles, log_weights, x_next,
                                    t_next, inputs_next, 1, bound, num_proposals)
        x = jax.tree.map(lambda a: a[index[:, 0]], particles)
        return x, x

    if num_times == 1:
        return jax.tree.map(lambda a: a[:, None], x_last)
    head = lambda tree: jax.tree.map(lambda a: a[:-1], tree)
    later_inputs = None if inputs is None else jax.tree.map(lambda a: a[1:], inputs)
    xs = (jax.random.split(key_back, num_times - 1), head(result.particles),
          result.log_weights[:-1], jnp.arange(1, num_times, dtype=jnp.int32), later_inputs)
    _, earlier = jax.lax.scan(back, x_last, xs, reverse=True)
    trajectories = jax.tree.map(lambda e, x: jnp.concatenate([e, x[None]]), earlier, x_last)
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), trajectories)
