"""PaRIS: online smoothing of additive functionals with O(N) memory in the series length.

For an additive functional `S(x_{0:T}) = h_0(x_0) + Σ_{t=1}^{T} h_t(x_{t-1}, x_t)`, PaRIS
(Olsson and Westerborn, "Efficient particle-based online smoothing in general hidden
Markov models: the PaRIS algorithm", Bernoulli 2017) keeps one statistic per particle,
`τ_t^i ≈ E[S(x_{0:t}) | x_t = x_t^i, y_{0:t}]`, updated at each filter step by `Ñ`
draws `J^{i,1..Ñ}` from the backward kernel `P(J = j) ∝ W_{t-1}^j f(x_t^i | x_{t-1}^j)`:

    τ_t^i = (1/Ñ) Σ_k [τ_{t-1}^{J^{i,k}} + h_t(x_{t-1}^{J^{i,k}}, x_t^i)],

and estimates `E[S | y_{0:t}]` by `Σ_i W_t^i τ_t^i`. Nothing from earlier time steps is
kept. `Ñ = 2` suffices for a stable estimator; `Ñ = 1` degenerates.

Backward draws are exact (O(N) per draw from the N transition densities, O(N²) per step
in all) or, given an upper bound of the transition density, by accept-reject with a
fixed number of proposals from `W_{t-1}` and the exact draw as fallback for the draws
that were not accepted (Dau and Chopin, "On the complexity of backward smoothing
algorithms", ICML 2023), expected O(N) per step when the bound is tight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._kernel import AbstractKernel
from ._filter import (
    AbstractParticleFilter,
    ParticleFilterInfo,
    ParticleFilterState,
    _check_count,
    filter_kernel,
)
from ._backward import backward_indices
from ._resampling import effective_sample_size
from ._ssm import StateSpaceModel, at_time, check_series


class ParisState(NamedTuple):
    """State of PaRIS: the filter's state and one additive statistic per particle.

    Attributes:
        filter: the `ParticleFilterState`.
        statistics: `τ_t^i`, a leading `num_particles` axis on every leaf.
    """

    filter: ParticleFilterState
    statistics: Any


class ParisInfo(NamedTuple):
    """Diagnostics of one PaRIS step: the filter's info and the backward draws.

    Attributes:
        filter: the `ParticleFilterInfo`.
        acceptance_rate: the fraction of backward draws accepted by accept-reject (1.0
            when the draws are exact).
    """

    filter: ParticleFilterInfo
    acceptance_rate: Array


def _weighted(log_weights, tree):
    weights = jnp.exp(log_weights)
    return jax.tree.map(lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1), tree)


class Paris(AbstractKernel):
    """PaRIS as a kernel: a particle filter plus one additive statistic per particle.

    `init(key, params, observation, inputs=None)` and `step(key, state, params,
    observation, inputs=None)` as for the filter; the estimate of `E[S(x_{0:t}) |
    y_{0:t}]` after any step is `estimate(state)`.

    Args:
        filter: the particle filter (`BootstrapFilter`, `GuidedFilter`, `AuxiliaryFilter`).
        additive: `h_t(x_prev, x, t, inputs)` for `t >= 1`, a pytree of arrays.
        initial_additive: `h_0(x, inputs)`; None means zeros shaped like `h_1`'s values.
        num_backward_samples: `Ñ`, backward draws per particle and step (2 by default).
        log_transition_bound: None (exact backward draws, O(N²) per step), or a callable
            `(params, t, inputs) -> log f̄` bounding `log f(x_t | x_{t-1})` for all
            states: accept-reject first, exact fallback.
        num_proposals: accept-reject rounds before the exact fallback.

    Example (E[Σ_t x_t | y] of a random walk observed in noise):
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> kernel = smc.Paris(smc.BootstrapFilter(model, 100),
        ...                    additive=lambda x_prev, x, t, inputs: x,
        ...                    initial_additive=lambda x, inputs: x)
        >>> state = kernel.init(jax.random.key(0), None, jnp.asarray(0.5))
        >>> state, info = kernel.step(jax.random.key(1), state, None, jnp.asarray(1.0))
        >>> kernel.estimate(state).shape
        ()
    """

    filter: AbstractParticleFilter
    additive: Callable[..., Any]
    initial_additive: Callable[..., Any] | None = None
    num_backward_samples: int = 2
    log_transition_bound: Callable[..., Any] | None = None
    num_proposals: int = 10

    def __check_init__(self):
        if not isinstance(self.filter, AbstractParticleFilter):
            raise TypeError(f"Paris: filter must be a particle filter, got "
                            f"{type(self.filter).__name__}")
        if not callable(self.additive):
            raise TypeError("Paris: additive must be a callable (x_prev, x, t, inputs)")
        _check_count("Paris", "num_backward_samples", self.num_backward_samples)
        _check_count("Paris", "num_proposals", self.num_proposals)

    def _initial_statistics(self, particles, inputs):
        if self.initial_additive is not None:
            return jax.vmap(lambda x: self.initial_additive(x, inputs))(particles)
        t = jnp.asarray(1, jnp.int32)
        one = jax.tree.map(lambda a: a[0], particles)
        shape = jax.eval_shape(lambda: self.additive(one, one, t, inputs))
        num = self.filter.num_particles
        return jax.tree.map(lambda s: jnp.zeros((num,) + s.shape, s.dtype), shape)

    def init(self, key: Array, params: Any, observation: Any, inputs: Any = None
             ) -> ParisState:
        """The filter's initial state and `τ_0^i = h_0(x_0^i)`."""
        state = self.filter.init(key, params, observation, inputs)
        return ParisState(state, self._initial_statistics(state.particles, inputs))

    def step(self, key: Array, state: ParisState, params: Any, observation: Any,
             inputs: Any = None) -> tuple[ParisState, ParisInfo]:
        """One filter step, then `Ñ` backward draws per particle update the statistics."""
        key_filter, key_backward = jax.random.split(key)
        previous = state.filter
        new, info = self.filter.step(key_filter, previous, params, observation, inputs)
        bound = (None if self.log_transition_bound is None
                 else self.log_transition_bound(params, new.t, inputs))
        indices, acceptance = backward_indices(
            key_backward, self.filter.model, params, previous.particles,
            previous.log_weights, new.particles, new.t, inputs, self.num_backward_samples,
            bound, self.num_proposals)

        def update(index_row, x):  # (Ñ,) backward indices of one particle x_t^i
            prev = jax.tree.map(lambda a: a[index_row], previous.particles)
            increments = jax.vmap(lambda xp: self.additive(xp, x, new.t, inputs))(prev)
            stats = jax.tree.map(lambda a: a[index_row], state.statistics)
            return jax.tree.map(lambda s, h: jnp.mean(s + h, axis=0).astype(s.dtype),
                                stats, increments)

        statistics = self.filter._constrain(jax.vmap(update)(indices, new.particles))
        return ParisState(new, statistics), ParisInfo(info, acceptance)

    def estimate(self, state: ParisState) -> Any:
        """`Σ_i W_t^i τ_t^i`, the estimate of `E[S(x_{0:t}) | y_{0:t}]`."""
        return _weighted(state.filter.log_weights, state.statistics)


class ParisResult(eqx.Module):
    """What `paris` returns.

    Attributes:
        estimate: the estimate of `E[S(x_{0:T-1}) | y_{0:T-1}]` (a pytree like `h`'s values).
        estimates: `(T, ...)` the online estimates `E[S(x_{0:t}) | y_{0:t}]` at every t.
        log_likelihood: the log of the filter's unbiased marginal-likelihood estimate.
        filtering_means: `(T, ...)` the filtering means.
        ess: `(T,)` effective sample sizes.
        acceptance_rate: `(T,)` the accept-reject acceptance rates of the backward draws
            (1.0 for exact draws and at `t = 0`).
    """

    estimate: Any
    estimates: Any
    log_likelihood: Array
    filtering_means: Any
    ess: Array
    acceptance_rate: Array


def run_paris(key: Array, kernel: Paris, params: Any, observations: Any, inputs: Any = None
              ) -> ParisResult:
    """Run a `Paris` kernel over a series (one `lax.scan`; memory O(N), not O(N T)).

    See `paris` for the convenience form. Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> kernel = smc.Paris(smc.BootstrapFilter(model, 64), lambda xp, x, t, u: xp * x)
        >>> smc.run_paris(jax.random.key(0), kernel, None, jnp.zeros(5)).estimates.shape
        (5,)
    """
    if not isinstance(kernel, Paris):
        raise TypeError(f"run_paris: kernel must be a Paris kernel, got {type(kernel).__name__}")
    num_times = check_series(observations, inputs, "paris")
    keys = jax.random.split(key, num_times)
    state = kernel.init(keys[0], params, at_time(observations, 0), at_time(inputs, 0))

    def summary(state, acceptance):
        return (kernel.estimate(state), _weighted(state.filter.log_weights,
                                                  state.filter.particles),
                effective_sample_size(state.filter.log_weights), acceptance)

    first = summary(state, jnp.ones((), state.filter.log_weights.dtype))

    def body(state, xs):
        step_key, observation, step_inputs = xs
        state, info = kernel.step(step_key, state, params, observation, step_inputs)
        return state, summary(state, info.acceptance_rate)

    later = lambda tree: None if tree is None else jax.tree.map(lambda a: a[1:], tree)
    state, rest = jax.lax.scan(body, state, (keys[1:], later(observations), later(inputs)))
    estimates, means, ess, acceptance = jax.tree.map(
        lambda a, b: jnp.concatenate([jnp.asarray(a)[None].astype(b.dtype), b]), first, rest)
    return ParisResult(kernel.estimate(state), estimates, state.filter.log_likelihood, means,
                       ess, acceptance)


# (a lambda, so that doctest does not collect run_paris's example twice)
_run_paris_jit = eqx.filter_jit(lambda *args: run_paris(*args))


def paris(key: Array, model: StateSpaceModel, params: Any, observations: Any,
          additive: Callable, *, initial_additive: Callable | None = None,
          num_particles: int = 1000, num_backward_samples: int = 2,
          resampling: str = "systematic", ess_threshold: float = 1.0,
          method: str = "bootstrap", inputs: Any = None, log_auxiliary: Callable | None = None,
          log_transition_bound: Callable | None = None, num_proposals: int = 10,
          sharding: Any = None) -> ParisResult:
    """Smooth an additive functional online with PaRIS (jitted, scanned over time).

    Estimates `E[h_0(x_0) + Σ_{t>=1} h_t(x_{t-1}, x_t) | y_{0:T-1}]` with memory O(N)
    (nothing from earlier time steps is stored). The arguments are those of `filter` plus:

    Args:
        additive: `h_t(x_prev, x, t, inputs)` for `t >= 1` (one particle pair; any pytree).
        initial_additive: `h_0(x, inputs)` (default: zero).
        num_backward_samples: `Ñ`, backward draws per particle and step (>= 2 advised).
        log_transition_bound: `(params, t, inputs) -> log f̄` with `f(x_t | x_{t-1}) <= f̄`:
            backward draws by accept-reject with exact fallback (expected O(N) per step).
            Without it the draws are exact (O(N²) per step).
        num_proposals: accept-reject rounds before the exact fallback.

    Returns:
        A `ParisResult`.

    Example (E[Σ_t x_{t-1} x_t | y] of a random walk; `f ≤ 1/sqrt(2π)`):
        >>> import math, jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> result = smc.paris(jax.random.key(0), model, None, jnp.ones(10),
        ...                    lambda x_prev, x, t, inputs: x_prev * x, num_particles=200,
        ...                    log_transition_bound=lambda p, t, u: -0.5 * math.log(2 * math.pi))
        >>> result.estimate.shape, result.estimates.shape
        ((), (10,))
    """
    base = filter_kernel("paris", model, method, log_auxiliary,
                         num_particles=num_particles, resampling=resampling,
                         ess_threshold=ess_threshold, sharding=sharding)
    check_series(observations, inputs, "paris")
    kernel = Paris(base, additive, initial_additive, num_backward_samples,
                   log_transition_bound, num_proposals)
    return _run_paris_jit(key, kernel, params, observations, inputs)



