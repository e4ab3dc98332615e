"""Particle filters on the kernel protocol: bootstrap, guided and auxiliary.

One step from time `t-1` to `t` (Gordon, Salmond and Smith 1993; Pitt and Shephard 1999;
the presentation of Chopin and Papaspiliopoulos, "An introduction to sequential Monte
Carlo", 2020, chapter 10):

1. auxiliary weights `W̃_{t-1}^i ∝ W_{t-1}^i η_t(x_{t-1}^i)` (η = 1 except for the
   auxiliary filter);
2. if the effective sample size of `W̃` is below `ess_threshold · N`, draw ancestors
   `A^i` from `W̃` and reset the weights to `1/N`; otherwise `A^i = i` and the weights
   stay `W̃` (ESS-adaptive resampling);
3. move: `x_t^i ~ q_t(· | x_{t-1}^{A^i}, y_t)` (the transition for the bootstrap filter);
4. reweight by `G_t^i = f(x_t^i | x_{t-1}^{A^i}) g(y_t | x_t^i) / q_t(x_t^i | ...)`, divided
   by `η_t(x_{t-1}^{A^i})` for the auxiliary filter.

The log of the unbiased estimate of `p(y_{0:t})` grows by
`log Σ_i W_{t-1}^i η^i + log Σ_i W̄^i G_t^i` (`W̄` the weights after step 2), which is the
usual `log mean_i G_t^i` after resampling and `log Σ W G` without.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._kernel import AbstractKernel
from ._guard import refuse_derivatives
from ._resampling import SCHEMES, check_scheme, effective_sample_size, normalize
from ._ssm import (
    StateSpaceModel,
    at_time,
    check_observation_shape,
    check_series,
    scalar_log_density,
)

_METHODS = ("bootstrap", "guided", "auxiliary")


class ParticleFilterState(NamedTuple):
    """State of a particle filter after time step `t`.

    Attributes:
        particles: the particles `x_t^i`, a leading `num_particles` axis on every leaf.
        log_weights: `(num_particles,)` normalised log filtering weights `log W_t^i`.
        log_likelihood: the log of the unbiased estimate of `p(y_{0:t})`.
        t: the time step (int32 scalar).
    """

    particles: Any
    log_weights: Array
    log_likelihood: Array
    t: Array


class ParticleFilterInfo(NamedTuple):
    """Diagnostics of one particle-filter step.

    Attributes:
        ancestors: `(num_particles,)` int32 indices of the particles at `t-1` that the new
            particles descend from (`arange` when the step did not resample).
        resampled: whether the step resampled.
        ess: the effective sample size of the new filtering weights.
        log_likelihood_increment: `log p̂(y_t | y_{0:t-1})`, the step's factor of the
            marginal-likelihood estimate.
    """

    ancestors: Array
    resampled: Array
    ess: Array
    log_likelihood_increment: Array


def _check_count(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be at least 1, got {value}")


def _check_threshold(owner: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{owner}: ess_threshold must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{owner}: ess_threshold must be in [0, 1], got {value}")


def _check_model(owner: str, model) -> None:
    if not isinstance(model, StateSpaceModel):
        raise TypeError(f"{owner}: model must be a px.smc.StateSpaceModel, got "
                        f"{type(model).__name__}")


class AbstractParticleFilter(AbstractKernel):
    """A particle filter as a kernel: `init` weights the first observation, `step` the next.

    `init(key, params, observation, inputs=None)` draws and weights `x_0` and returns a
    `ParticleFilterState`; `step(key, state, params, observation, inputs=None)` advances
    it by one time step and returns `(ParticleFilterState, ParticleFilterInfo)`.
    `observation` and `inputs` are ONE time step's slices. Concrete filters say how
    particles are proposed (`_propose`, `_propose_initial`) and, for the auxiliary filter,
    the look-ahead log weight (`_log_auxiliary`).
    """

    model: eqx.AbstractVar[StateSpaceModel]
    num_particles: eqx.AbstractVar[int]
    resampling: eqx.AbstractVar[str]
    ess_threshold: eqx.AbstractVar[float]
    sharding: eqx.AbstractVar[Any]

    def _check_common(self) -> None:
        owner = type(self).__name__
        _check_model(owner, self.model)
        _check_count(owner, "num_particles", self.num_particles)
        check_scheme(self.resampling, owner)
        _check_threshold(owner, self.ess_threshold)

    # ---------------------------------------------------------------- per-particle pieces

    def _propose_initial(self, key, params, observation, inputs):
        """One `x_0` and its log weight `log μ(x_0) - log q_0(x_0)` (before `g`)."""
        x = self.model.initial(params, inputs).sample(key)
        return x, jnp.zeros((), jnp.result_type(float))

    def _propose(self, key, params, x_prev, t, observation, inputs):
        """One `x_t` from `x_{t-1}` and its log weight `log f - log q` (before `g`)."""
        x = self.model.transition(params, x_prev, t, inputs).sample(key)
        return x, jnp.zeros((), jnp.result_type(float))

    def _log_auxiliary(self, params, x_prev, t, observation, inputs):
        """The look-ahead log weight `log η_t(x_{t-1})` (0 except for the auxiliary filter)."""
        return jnp.zeros((), jnp.result_type(float))

    def _looks_ahead(self) -> bool:
        """Whether `_log_auxiliary` is overridden (else η = 1 and step skips it)."""
        return type(self)._log_auxiliary is not AbstractParticleFilter._log_auxiliary

    # ---------------------------------------------------------------- helpers

    def _constrain(self, tree):
        if self.sharding is None:
            return tree
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.sharding), tree)

    def _log_observation(self, params, particles, t, observation, inputs):
        def one(x):
            law = self.model.observation(params, x, t, inputs)
            return scalar_log_density(law, observation, "observation")

        return jax.vmap(one)(particles)

    # ---------------------------------------------------------------- the protocol

    def init(self, key: Array, params: Any, observation: Any, inputs: Any = None
             ) -> ParticleFilterState:
        """Draw `x_0^i` (from the initial law or proposal), weight them by `y_0`."""
        owner = type(self).__name__
        t = jnp.asarray(0, jnp.int32)
        keys = self._constrain(jax.random.split(key, self.num_particles))
        particles, log_correction = jax.vmap(
            lambda k: self._propose_initial(k, params, observation, inputs))(keys)
        particles = self._constrain(particles)
        template = jax.tree.map(lambda a: a[0], particles)
        check_observation_shape(self.model.observation(params, template, t, inputs),
                                observation, owner)
        log_increment = log_correction + self._log_observation(params, particles, t,
                                                               observation, inputs)
        log_weights, log_total = normalize(log_increment)
        log_likelihood = log_total - math.log(self.num_particles)
        return refuse_derivatives(ParticleFilterState(
            particles, self._constrain(log_weights), log_likelihood, t), f"{owner}.init")

    def step(self, key: Array, state: ParticleFilterState, params: Any, observation: Any,
             inputs: Any = None) -> tuple[ParticleFilterState, ParticleFilterInfo]:
        """Resample (if the ESS is low), move and reweight the particles by one time step."""
        key_resample, key_move = jax.random.split(key)
        t = state.t + 1
        num = self.num_particles
        looks_ahead = self._looks_ahead()
        if looks_ahead:
            log_auxiliary = jax.vmap(
                lambda x: self._log_auxiliary(params, x, t, observation, inputs))(
                    state.particles)
            log_weights, log_auxiliary_total = normalize(state.log_weights + log_auxiliary)
        else:  # η = 1: the state's weights are normalised already (no logsumexp, no gather)
            log_weights, log_auxiliary_total = state.log_weights, 0.0
        index = jnp.arange(num, dtype=jnp.int32)

        def with_resampling(_):
            weights = jnp.exp(log_weights)
            ancestors = SCHEMES[self.resampling](key_resample, weights, num).astype(jnp.int32)
            return ancestors, jnp.full((num,), -math.log(num), log_weights.dtype)

        def without_resampling(_):
            return index, log_weights

        if self.ess_threshold >= 1.0:
            resampled = jnp.asarray(True)
            ancestors, prior_log_weights = with_resampling(None)
        elif self.ess_threshold <= 0.0:
            resampled = jnp.asarray(False)
            ancestors, prior_log_weights = without_resampling(None)
        else:
            resampled = effective_sample_size(log_weights) < self.ess_threshold * num
            ancestors, prior_log_weights = jax.lax.cond(
                resampled, with_resampling, without_resampling, None)
        ancestors = self._constrain(ancestors)
        parents = self._constrain(jax.tree.map(lambda a: a[ancestors], state.particles))
        keys = self._constrain(jax.random.split(key_move, num))
        particles, log_correction = jax.vmap(
            lambda k, x: self._propose(k, params, x, t, observation, inputs))(keys, parents)
        particles = self._constrain(particles)
        for new, old in zip(jax.tree.leaves(particles), jax.tree.leaves(state.particles)):
            if new.shape != old.shape:
                raise ValueError(f"{type(self).__name__}: the transition (or proposal) gives "
                                 f"states of shape {new.shape[1:]}, the initial law "
                                 f"{old.shape[1:]}")
        particles = jax.tree.map(lambda new, old: new.astype(old.dtype), particles,
                                 state.particles)
        log_increment = (log_correction
                         + self._log_observation(params, particles, t, observation, inputs))
        if looks_ahead:
            log_increment = log_increment - log_auxiliary[ancestors]
        new_log_weights, log_total = normalize(prior_log_weights + log_increment)
        increment = log_auxiliary_total + log_total
        new_log_weights = self._constrain(new_log_weights.astype(state.log_weights.dtype))
        new_state = ParticleFilterState(
            particles, new_log_weights,
            (state.log_likelihood + increment).astype(state.log_likelihood.dtype), t)
        info = ParticleFilterInfo(ancestors, resampled, _ess_of_normalised(new_log_weights),
                                  increment)
        where = f"{type(self).__name__}.step"
        return refuse_derivatives(new_state, where), refuse_derivatives(info, where)




class BootstrapFilter(AbstractParticleFilter):
    """The bootstrap particle filter: particles move by the transition, weights `g(y_t | x_t)`.

    Gordon, Salmond and Smith, "Novel approach to nonlinear/non-Gaussian Bayesian state
    estimation", 1993.

    Args:
        model: the `StateSpaceModel`.
        num_particles: the number of particles `N` (at least 1).
        resampling: `"systematic"` (default), `"stratified"`, `"residual"` or
            `"multinomial"`.
        ess_threshold: resample when the effective sample size is below
            `ess_threshold · N`; `1.0` (default) resamples at every step, `0.0` never.
        sharding: `None`, or a `jax.sharding.Sharding` for arrays whose leading axis is
            the particle axis (e.g. `NamedSharding(mesh, PartitionSpec("particles"))`):
            particles, weights and ancestors are constrained to it at every step, so `jit`
            spreads the particles over the devices. Results equal one device's.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> from ppl_ext.smc import BootstrapFilter, StateSpaceModel
        >>> model = StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(0.9 * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
        >>> kernel = BootstrapFilter(model, num_particles=100)
        >>> state = kernel.init(jax.random.key(0), None, jnp.asarray(0.3))
        >>> state, info = kernel.step(jax.random.key(1), state, None, jnp.asarray(-0.2))
        >>> state.particles.shape, int(state.t)
        ((100,), 1)
    """

    model: StateSpaceModel
    num_particles: int = 1000
    resampling: str = "systematic"
    ess_threshold: float = 1.0
    sharding: Any = None

    def __check_init__(self):
        self._check_common()


class GuidedFilter(AbstractParticleFilter):
    """The guided particle filter: particles move by the proposal `q(x_t | x_{t-1}, y_t)`.

    Weights are `f(x_t | x_{t-1}) g(y_t | x_t) / q(x_t | x_{t-1}, y_t)`; `x_0` comes from
    `model.initial_proposal` when given (weighted by `μ / q_0`), else from `model.initial`.
    With the locally optimal proposal `p(x_t | x_{t-1}, y_t)` the weights are
    `p(y_t | x_{t-1})` (Doucet, Godsill and Andrieu, 2000).

    Args:
        model: the `StateSpaceModel`.
        num_particles: the number of particles `N` (at least 1).
        resampling: `"systematic"` (default), `"stratified"`, `"residual"` or
            `"multinomial"`.
        ess_threshold: resample when the effective sample size is below
            `ess_threshold · N`; `1.0` (default) resamples at every step, `0.0` never.
        sharding: `None`, or a `jax.sharding.Sharding` for arrays whose leading axis is
            the particle axis (e.g. `NamedSharding(mesh, PartitionSpec("particles"))`):
            particles, weights and ancestors are constrained to it at every step, so `jit`
            spreads the particles over the devices. Results equal one device's.

    Raises `ValueError` when the model has no `proposal`.

    Example (the locally optimal proposal of a linear-Gaussian model):
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> from ppl_ext.smc import GuidedFilter, StateSpaceModel
        >>> def proposal(params, x, t, y, inputs):  # p(x_t | x_{t-1}, y_t) for the laws below
        ...     return dist.Normal((x + y) / 2, 0.5 ** 0.5)
        >>> model = StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     proposal=proposal)
        >>> kernel = GuidedFilter(model, num_particles=50)
        >>> state = kernel.init(jax.random.key(0), None, jnp.asarray(0.3))
        >>> state, info = kernel.step(jax.random.key(1), state, None, jnp.asarray(1.0))
        >>> state.particles.shape, info.ancestors.shape
        ((50,), (50,))
    """

    model: StateSpaceModel
    num_particles: int = 1000
    resampling: str = "systematic"
    ess_threshold: float = 1.0
    sharding: Any = None

    def __check_init__(self):
        self._check_common()
        if self.model.proposal is None:
            raise ValueError("GuidedFilter: the model has no proposal; give "
                             "StateSpaceModel(..., proposal=...) or use BootstrapFilter")

    def _propose_initial(self, key, params, observation, inputs):
        return _guided_initial(self, key, params, observation, inputs)

    def _propose(self, key, params, x_prev, t, observation, inputs):
        return _guided_move(self, key, params, x_prev, t, observation, inputs)


def _guided_initial(kernel, key, params, observation, inputs):
    model = kernel.model
    if model.initial_proposal is None:
        x = model.initial(params, inputs).sample(key)
        return x, jnp.zeros((), jnp.result_type(float))
    proposal = model.initial_proposal(params, observation, inputs)
    x = proposal.sample(key)
    log_prior = scalar_log_density(model.initial(params, inputs), x, "initial")
    return x, log_prior - scalar_log_density(proposal, x, "initial proposal")


def _guided_move(kernel, key, params, x_prev, t, observation, inputs):
    model = kernel.model
    proposal = model.proposal(params, x_prev, t, observation, inputs)
    x = proposal.sample(key)
    law = model.transition(params, x_prev, t, inputs)
    return x, (scalar_log_density(law, x, "transition")
               - scalar_log_density(proposal, x, "proposal"))


class AuxiliaryFilter(AbstractParticleFilter):
    """The auxiliary particle filter: resampling looks ahead with `η_t(x_{t-1})`.

    Ancestors are drawn from `W_{t-1}^i η_t(x_{t-1}^i)`, with
    `log η_t = log_auxiliary(params, x_prev, t, observation, inputs)` (e.g. `log g(y_t |
    E[x_t | x_{t-1}])`, or `log p(y_t | x_{t-1})` for the fully adapted filter), and the
    weights divide by `η` again, so the likelihood estimate stays unbiased. Particles move
    by the transition, or by the model's proposal with `guided=True` (Pitt and Shephard,
    "Filtering via simulation: auxiliary particle filters", 1999; Johansen and Doucet,
    2008).

    Args:
        model: the `StateSpaceModel`.
        num_particles: the number of particles `N` (at least 1).
        resampling: `"systematic"` (default), `"stratified"`, `"residual"` or
            `"multinomial"`.
        ess_threshold: resample when the effective sample size is below
            `ess_threshold · N`; `1.0` (default) resamples at every step, `0.0` never.
        sharding: `None`, or a `jax.sharding.Sharding` for arrays whose leading axis is
            the particle axis (e.g. `NamedSharding(mesh, PartitionSpec("particles"))`):
            particles, weights and ancestors are constrained to it at every step, so `jit`
            spreads the particles over the devices. Results equal one device's.
        log_auxiliary: the look-ahead log weight, a callable of one particle.
        guided: move by `model.proposal` (and `initial_proposal`) instead of the transition.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> from ppl_ext.smc import AuxiliaryFilter, StateSpaceModel
        >>> model = StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(0.9 * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
        >>> look_ahead = lambda params, x, t, y, inputs: dist.Normal(0.9 * x, 1.2).log_prob(y)
        >>> kernel = AuxiliaryFilter(model, num_particles=100, log_auxiliary=look_ahead)
        >>> state = kernel.init(jax.random.key(0), None, jnp.asarray(0.3))
        >>> state, info = kernel.step(jax.random.key(1), state, None, jnp.asarray(-0.2))
        >>> state.particles.shape
        (100,)
    """

    model: StateSpaceModel
    num_particles: int = 1000
    resampling: str = "systematic"
    ess_threshold: float = 1.0
    sharding: Any = None
    log_auxiliary: Callable[..., Any] | None = None
    guided: bool = False

    def __check_init__(self):
        self._check_common()
        if not callable(self.log_auxiliary):
            raise TypeError("AuxiliaryFilter: log_auxiliary must be a callable "
                            "(params, x_prev, t, observation, inputs) -> log η")
        if self.guided and self.model.proposal is None:
            raise ValueError("AuxiliaryFilter(guided=True): the model has no proposal")

    def _propose_initial(self, key, params, observation, inputs):
        if self.guided:
            return _guided_initial(self, key, params, observation, inputs)
        return super()._propose_initial(key, params, observation, inputs)

    def _propose(self, key, params, x_prev, t, observation, inputs):
        if self.guided:
            return _guided_move(self, key, params, x_prev, t, observation, inputs)
        return super()._propose(key, params, x_prev, t, observation, inputs)

    def _log_auxiliary(self, params, x_prev, t, observation, inputs):
        value = jnp.asarray(self.log_auxiliary(params, x_prev, t, observation, inputs))
        if value.ndim != 0:
            raise ValueError(f"AuxiliaryFilter: log_auxiliary must return a scalar per "
                             f"particle, got shape {value.shape}")
        return value


# ------------------------------------------------------------------------ the whole series


class FilterResult(eqx.Module):
    """What `filter` returns: the likelihood estimate, filtering moments and the history.

    Attributes:
        log_likelihood: `log p̂(y_{0:T-1})`, the log of an unbiased estimate of the
            marginal likelihood (its exponential is unbiased, not the log itself).
        log_likelihood_increments: `(T,)` `log p̂(y_t | y_{0:t-1})`; their cumulative sum
            is the log of the unbiased estimate of `p(y_{0:t})`.
        filtering_means: `(T, ...)` `Σ_i W_t^i x_t^i`, estimates of `E[x_t | y_{0:t}]`.
        filtering_expectations: `(T, ...)` `Σ_i W_t^i φ(x_t^i)` for the `functional` `φ`
            given to `filter` (None without one).
        ess: `(T,)` effective sample sizes of the filtering weights.
        resampled: `(T,)` whether step `t` resampled (False at `t = 0`).
        ancestors: `(T, N)` ancestor indices (`ancestors[t, i]` is the index at `t-1` of the
            parent of particle `i` at `t`; `arange` at `t = 0`); None unless stored.
        particles: `(T, N, ...)` the filtering particles; None unless stored.
        log_weights: `(T, N)` their normalised log weights; None unless stored.
    """

    log_likelihood: Array
    log_likelihood_increments: Array
    filtering_means: Any
    filtering_expectations: Any
    ess: Array
    resampled: Array
    ancestors: Array | None
    particles: Any
    log_weights: Array | None


def _ess_of_normalised(log_weights):
    """`effective_sample_size` of normalised log weights, from `W = exp(log W)`: shares
    the `exp` with the weighted means of the same step (no two extra logsumexps)."""
    weights = jnp.exp(log_weights)
    return jnp.square(jnp.sum(weights)) / jnp.sum(jnp.square(weights))


def _weighted_mean(log_weights, values):
    weights = jnp.exp(log_weights)
    return jax.tree.map(lambda v: jnp.tensordot(weights.astype(v.dtype), v, axes=1)
                        if jnp.issubdtype(v.dtype, jnp.inexact)
                        else jnp.tensordot(weights, v.astype(weights.dtype), axes=1), values)


def _summaries(state, functional, store_particles):
    out = {"mean": _weighted_mean(state.log_weights, state.particles)}
    if functional is not None:
        out["functional"] = _weighted_mean(state.log_weights, jax.vmap(functional)(state.particles))
    if store_particles:
        out["particles"] = state.particles
        out["log_weights"] = state.log_weights
    return out


def run_filter(key: Array, kernel: AbstractParticleFilter, params: Any, observations: Any,
               inputs: Any = None, functional: Callable | None = None,
               store_particles: bool = True) -> FilterResult:
    """Run a particle-filter kernel over a whole series with one `lax.scan` over time.

    The kernel-level counterpart of `filter` (which builds the kernel from a name): `key`
    is split into one key per time step, `kernel.init` weights `y_0` and `kernel.step`
    runs for `t = 1, ..., T-1`. Jit it (or call it inside `jit`/`vmap`); see `filter` for
    the arguments and the returned `FilterResult`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> from ppl_ext.smc import BootstrapFilter, StateSpaceModel, run_filter
        >>> model = StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> result = run_filter(jax.random.key(0), BootstrapFilter(model, 64), None,
        ...                     jnp.zeros(5))
        >>> result.filtering_means.shape, result.ancestors.shape
        ((5,), (5, 64))
    """
    if not isinstance(kernel, AbstractParticleFilter):
        raise TypeError(f"run_filter: kernel must be a particle filter (e.g. BootstrapFilter), "
                        f"got {type(kernel).__name__}")
    num_times = check_series(observations, inputs, "filter")
    keys = jax.random.split(key, num_times)
    state = kernel.init(keys[0], params, at_time(observations, 0), at_time(inputs, 0))
    first = _summaries(state, functional, store_particles)
    num = kernel.num_particles
    first_info = ParticleFilterInfo(
        jnp.arange(num if store_particles else 0, dtype=jnp.int32), jnp.asarray(False),
        effective_sample_size(state.log_weights), state.log_likelihood)

    def body(state, xs):
        step_key, observation, step_inputs = xs
        state, info = kernel.step(step_key, state, params, observation, step_inputs)
        if not store_particles:  # no (T, N) ancestors in the scan's outputs
            info = info._replace(ancestors=jnp.zeros((0,), jnp.int32))
        return state, (_summaries(state, functional, store_particles), info)

    later = lambda tree: None if tree is None else jax.tree.map(lambda a: a[1:], tree)
    state, (rest, infos) = jax.lax.scan(body, state, (keys[1:], later(observations),
                                                      later(inputs)))
    stack = lambda a, b: jnp.concatenate([jnp.asarray(a)[None].astype(b.dtype), b])
    summaries = jax.tree.map(stack, first, rest)
    infos = jax.tree.map(stack, first_info, infos)
    return FilterResult(
        log_likelihood=state.log_likelihood,
        log_likelihood_increments=infos.log_likelihood_increment,
        filtering_means=summaries["mean"],
        filtering_expectations=summaries.get("functional"),
        ess=infos.ess,
        resampled=infos.resampled,
        ancestors=infos.ancestors if store_particles else None,
        particles=summaries.get("particles"),
        log_weights=summaries.get("log_weights"),
    )


# (a lambda, so that doctest does not collect run_filter's example twice)
_run_filter_jit = eqx.filter_jit(lambda *args: run_filter(*args))


def filter_kernel(owner: str, model: StateSpaceModel, method: str,
                  log_auxiliary: Callable | None, *, num_particles: int, resampling: str,
                  ess_threshold: float, sharding: Any) -> AbstractParticleFilter:
    """The filter kernel that `method` names, its settings checked (for `filter`, `paris`)."""
    if not isinstance(method, str) or method not in _METHODS:
        import difflib

        close = difflib.get_close_matches(str(method), _METHODS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{owner}: unknown method {method!r}{hint} (choose one of "
                         f"{', '.join(map(repr, _METHODS))})")
    _check_model(owner, model)
    if log_auxiliary is not None and method != "auxiliary":
        raise ValueError(f"{owner}: log_auxiliary is used by method='auxiliary' only, got "
                         f"method={method!r}")
    _check_count(owner, "num_particles", num_particles)
    check_scheme(resampling, owner)
    common = dict(num_particles=num_particles, resampling=resampling,
                  ess_threshold=ess_threshold, sharding=sharding)
    if method == "bootstrap":
        return BootstrapFilter(model, **common)
    if method == "guided":
        return GuidedFilter(model, **common)
    if log_auxiliary is None:
        raise ValueError(f"{owner}(method='auxiliary') needs log_auxiliary")
    return AuxiliaryFilter(model, **common, log_auxiliary=log_auxiliary)


def filter(key: Array, model: StateSpaceModel, params: Any, observations: Any, *,
           num_particles: int = 1000, resampling: str = "systematic",
           ess_threshold: float = 1.0, method: str = "bootstrap", inputs: Any = None,
           functional: Callable | None = None, log_auxiliary: Callable | None = None,
           store_particles: bool = True, sharding: Any = None) -> FilterResult:
    """Filter a whole series with a particle filter, jitted and scanned over time.

    Estimates `p(y_{0:T-1})` without bias (its exponential), the filtering laws
    `p(x_t | y_{0:t})` by weighted particles, and keeps what the smoothers need.

    Args:
        key: a PRNG key.
        model: the `StateSpaceModel`.
        params: its parameters (a pytree).
        observations: the observations, a leading time axis of length `T >= 1` on every
            leaf.
        num_particles: the number of particles `N`.
        resampling: `"systematic"` (default), `"stratified"`, `"residual"` or
            `"multinomial"`.
        ess_threshold: resample when the ESS is below `ess_threshold · N` (1.0: always).
        method: `"bootstrap"` (default), `"guided"` (the model's proposal) or
            `"auxiliary"` (with `log_auxiliary`).
        inputs: optional time-varying inputs (leading time axis of length `T`).
        functional: `φ(x)` of one particle; its filtering expectations are returned.
        log_auxiliary: the auxiliary filter's look-ahead `log η(params, x_prev, t,
            observation, inputs)`.
        store_particles: keep the particles, weights and ancestors of every step (what
            `genealogy` and `ffbs` need; O(N T) memory). False keeps O(N).
        sharding: `None`, or a `jax.sharding.Sharding` for the particle axis.

    Returns:
        A `FilterResult`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(params["a"] * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
        >>> params = {"a": jnp.asarray(0.9)}
        >>> _, ys = model.sample(jax.random.key(0), params, 20)
        >>> result = smc.filter(jax.random.key(1), model, params, ys, num_particles=500)
        >>> result.filtering_means.shape, result.ess.shape
        ((20,), (20,))
    """
    kernel = filter_kernel("filter", model, method, log_auxiliary,
                           num_particles=num_particles, resampling=resampling,
                           ess_threshold=ess_threshold, sharding=sharding)
    check_series(observations, inputs, "filter")
    return _run_filter_jit(key, kernel, params, observations, inputs, functional,
                           store_particles)
