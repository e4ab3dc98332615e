"""Learning with SMC: maximum likelihood by Fisher's identity, and Markovian score climbing.

Fisher's identity writes the score of the marginal likelihood as a smoothing expectation
of an additive functional,

    ∇θ log p_θ(y_{0:T-1}) = E[ Σ_t ∇θ log f_θ(x_t | x_{t-1}) + ∇θ log g_θ(y_t | x_t) | y ]

(with `∇θ log μ_θ(x_0)` for the first term), which PaRIS estimates online with memory O(N)
(`fisher_score`), or PaRIS particle Gibbs with a bias decaying in its sweeps
(`smoother="ppg"`). `fisher_objective` packages that estimate as an expectation program for
`px.fit`: its value is the filter's `log p̂(y)` and its gradient the PaRIS score, so any
optax transformation (and any gradient back-end) does maximum likelihood.

Markovian score climbing (Naesseth, Lindsten and Blei, "Markovian score climbing:
variational inference with KL(p||q)", NeurIPS 2020) fits a variational family
`q_λ(x_{0:T-1})` to the smoothing law by minimising the inclusive KL(p || q_λ): a
conditional SMC kernel with `q_λ` as its proposal leaves `p(x | y)` invariant, and
`λ ← λ + ε_k ∇λ log q_λ(x_k)` at the chain's state `x_k` is a stochastic-approximation
step whose mean field is `-∇λ KL(p || q_λ)` (`MarkovScoreClimbing`,
`markov_score_climbing`); with `markov_kernel="ppg"` the move is a PPG sweep and the step
the sweep's PaRIS estimate of `E[∇λ log q_λ(x) | y]`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from jax.extend import core as jex_core
from jaxtyping import Array

from .._kernel import AbstractKernel
from ..adev import expectation, reinforce, sample
from ..adev._expectation import Expectation
from ..optim._progress import ProgressBar
from ._filter import filter_kernel, run_filter
from ._paris import Paris, run_paris
from ._ppg import ParisParticleGibbs, PPGState, _ppg
from ._resampling import SCHEMES, categorical, normalize
from ._ssm import (
    StateSpaceModel,
    at_time,
    check_observation_shape,
    check_series,
    scalar_log_density,
)

# ------------------------------------------------------------------------------ checks


def _check_int(owner: str, name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} "
                        f"{value!r}")
    if value < least:
        raise ValueError(f"{owner}: {name} must be at least {least}, got {value}")
    return int(value)


def _check_float_tree(owner: str, what: str, tree) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"{owner}: {what} has no array leaves (nothing to differentiate)")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            raise TypeError(f"{owner}: {what}{jax.tree_util.keystr(path)} has dtype "
                            f"{jnp.asarray(leaf).dtype}; differentiated parameters must be "
                            "floating-point arrays")


def _check_model_params(owner: str, model: StateSpaceModel, params, observations,
                        inputs) -> None:
    """Evaluate every law once (abstractly): a params tree the model cannot read raises."""
    if not isinstance(model, StateSpaceModel):
        raise TypeError(f"{owner}: model must be a px.smc.StateSpaceModel, got "
                        f"{type(model).__name__}")
    num_times = check_series(observations, inputs, owner)

    def trace(params):
        t0 = jnp.asarray(0, jnp.int32)
        inputs_0 = at_time(inputs, 0)
        initial = model.initial(params, inputs_0)
        x0 = initial.sample(jax.random.key(0))
        out = [scalar_log_density(initial, x0, "initial")]
        law = model.observation(params, x0, t0, inputs_0)
        check_observation_shape(law, at_time(observations, 0), owner)
        out.append(scalar_log_density(law, at_time(observations, 0), "observation"))
        if num_times > 1:
            t1 = jnp.asarray(1, jnp.int32)
            transition = model.transition(params, x0, t1, at_time(inputs, 1))
            out.append(scalar_log_density(transition, x0, "transition"))
        return out

    try:
        closed = jax.make_jaxpr(trace)(params)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(
            f"{owner}: the model's laws fail on params ({type(exc).__name__}: {exc}); "
            f"params must be the pytree the model reads (got {jax.tree.structure(params)})"
        ) from exc
    if num_times > 1:  # every law was evaluated: a leaf none of them reads gets no score
        used = set()
        for eqn in closed.jaxpr.eqns:
            used.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
        used.update(v for v in closed.jaxpr.outvars if not isinstance(v, jex_core.Literal))
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0]]
        unused = [p for p, v in zip(paths, closed.jaxpr.invars) if v not in used]
        if unused:
            warnings.warn(f"{owner}: the model's initial, transition and observation laws do "
                          f"not read params{', params'.join(unused)}; their score is 0 (a "
                          "misspelt name, or a parameter of the proposal only?)",
                          stacklevel=3)


# ------------------------------------------------------------------ Fisher's identity


def _directional(log_density, params, observation, inputs, observation_dot, inputs_dot):
    """`(∇θ log_density, d/dε log_density(y + ε ẏ, u + ε u̇))` at one time step."""
    score = jax.grad(log_density)(params, observation, inputs)
    if observation_dot is None:
        return score, jnp.zeros((), jnp.result_type(float))

    def tangent(value, value_dot):  # integer data (counts) have no derivative
        if jnp.issubdtype(jnp.asarray(value).dtype, jnp.inexact):
            return value_dot
        return np.zeros(jnp.shape(value), jax.dtypes.float0)

    data = (observation, inputs)
    data_dot = jax.tree.map(tangent, data, (observation_dot, inputs_dot))
    _, direction = jax.jvp(lambda y, u: log_density(params, y, u), data, data_dot)
    return score, direction


class _InitialScore(eqx.Module):
    """`h_0(x_0) = ∇θ [log μ_θ(x_0) + log g_θ(y_0 | x_0)]` (a pytree like `params`), and
    the derivative of the same log density along the data's tangent `(ẏ_0, u̇_0)`."""

    model: StateSpaceModel
    params: Any
    observations: Any
    observations_dot: Any = None
    inputs_dot: Any = None

    def __call__(self, x, inputs):
        t0 = jnp.asarray(0, jnp.int32)

        def log_density(params, y, u):
            return (scalar_log_density(self.model.initial(params, u), x, "initial")
                    + scalar_log_density(self.model.observation(params, x, t0, u), y,
                                         "observation"))

        return _directional(log_density, self.params, at_time(self.observations, 0), inputs,
                            at_time(self.observations_dot, 0), at_time(self.inputs_dot, 0))


class _StepScore(eqx.Module):
    """`h_t(x_{t-1}, x_t) = ∇θ [log f_θ(x_t | x_{t-1}) + log g_θ(y_t | x_t)]`, and the
    derivative of the same log density along the data's tangent `(ẏ_t, u̇_t)`."""

    model: StateSpaceModel
    params: Any
    observations: Any
    observations_dot: Any = None
    inputs_dot: Any = None

    def __call__(self, x_prev, x, t, inputs):
        def log_density(params, y, u):
            return (scalar_log_density(self.model.transition(params, x_prev, t, u), x,
                                       "transition")
                    + scalar_log_density(self.model.observation(params, x, t, u), y,
                                         "observation"))

        return _directional(log_density, self.params, at_time(self.observations, t), inputs,
                            at_time(self.observations_dot, t), at_time(self.inputs_dot, t))


#: the smoothers of the Fisher score: PaRIS, and PaRIS particle Gibbs
SMOOTHERS = ("paris", "ppg")


class _ScoreSettings(eqx.Module):
    """The filter and smoother settings of a Fisher-score estimate (all static)."""

    model: StateSpaceModel
    num_particles: int = eqx.field(static=True)
    num_backward_samples: int = eqx.field(static=True)
    method: str = eqx.field(static=True)
    resampling: str = eqx.field(static=True)
    ess_threshold: float = eqx.field(static=True)
    log_auxiliary: Callable | None = eqx.field(static=True)
    log_transition_bound: Callable | None = eqx.field(static=True)
    num_proposals: int = eqx.field(static=True)
    smoother: str = eqx.field(default="paris", static=True)
    num_sweeps: int = eqx.field(default=1, static=True)
    num_burnin: int = eqx.field(default=0, static=True)

    def ppg_kernel(self, params, observations, observations_dot=None,
                   inputs_dot=None) -> ParisParticleGibbs:
        """The `ParisParticleGibbs` kernel whose additive functional is the score."""
        data = (observations, observations_dot, inputs_dot)
        return ParisParticleGibbs(self.model, _StepScore(self.model, params, *data),
                                  _InitialScore(self.model, params, *data),
                                  self.num_particles, self.num_backward_samples,
                                  self.log_transition_bound, self.num_proposals)

    def kernel(self, owner: str, params, observations, observations_dot=None,
               inputs_dot=None) -> Paris:
        base = filter_kernel(owner, self.model, self.method, self.log_auxiliary,
                             num_particles=self.num_particles, resampling=self.resampling,
                             ess_threshold=self.ess_threshold, sharding=None)
        data = (observations, observations_dot, inputs_dot)
        return Paris(base, _StepScore(self.model, params, *data),
                     _InitialScore(self.model, params, *data),
                     self.num_backward_samples, self.log_transition_bound,
                     self.num_proposals)


def _settings(owner, model, *, num_particles, num_backward_samples, method, resampling,
              ess_threshold, log_auxiliary, log_transition_bound, num_proposals,
              smoother="paris", num_sweeps=1, num_burnin=0) -> _ScoreSettings:
    _check_int(owner, "num_particles", num_particles, 2)
    _check_int(owner, "num_backward_samples", num_backward_samples, 1)
    _check_int(owner, "num_proposals", num_proposals, 1)
    if not isinstance(smoother, str) or smoother not in SMOOTHERS:
        raise ValueError(f"{owner}: smoother must be one of {', '.join(map(repr, SMOOTHERS))}, "
                         f"got {smoother!r}")
    _check_int(owner, "num_sweeps", num_sweeps, 1)
    _check_int(owner, "num_burnin", num_burnin, 0)
    if num_burnin >= num_sweeps:
        raise ValueError(f"{owner}: num_burnin ({num_burnin}) must be below num_sweeps "
                         f"({num_sweeps}): the PPG estimate averages the sweeps after the "
                         "burn-in")
    settings = _ScoreSettings(model, int(num_particles), int(num_backward_samples), method,
                              resampling, ess_threshold, log_auxiliary,
                              log_transition_bound, int(num_proposals), smoother,
                              int(num_sweeps), int(num_burnin))
    settings.kernel(owner, None, None)  # checks the method, resampling and threshold
    return settings


def _run_score(settings: _ScoreSettings, key, params, observations, inputs,
               observations_dot=None, inputs_dot=None):
    """`(score, derivative along (ẏ, u̇), log p̂)` from one PaRIS run, or from PPG sweeps
    (then `log p̂` from a filter run with `key`, as `_score_log_likelihood` computes it)."""
    kernel = settings.kernel("fisher_score", params, observations, observations_dot,
                             inputs_dot)
    if settings.smoother == "ppg":
        log_likelihood = run_filter(key, kernel.filter, params, observations, inputs, None,
                                    False).log_likelihood
        ppg_kernel = settings.ppg_kernel(params, observations, observations_dot, inputs_dot)
        result = _ppg(jax.random.fold_in(key, 1), ppg_kernel, params, observations, inputs,
                      None, settings.num_sweeps, settings.num_burnin)
        (score, direction) = result.estimate
        return score, direction, log_likelihood
    result = run_paris(key, kernel, params, observations, inputs)
    (score, direction) = result.estimate
    return score, direction, result.log_likelihood


_run_score_jit = eqx.filter_jit(_run_score)


def fisher_score(key: Array, model: StateSpaceModel, params: Any, observations: Any, *,
                 num_particles: int = 1000, num_backward_samples: int = 2,
                 method: str = "bootstrap", resampling: str = "systematic",
                 ess_threshold: float = 1.0, inputs: Any = None,
                 log_auxiliary: Callable | None = None,
                 log_transition_bound: Callable | None = None,
                 num_proposals: int = 10, smoother: str = "paris", num_sweeps: int = 10,
                 num_burnin: int = 2) -> tuple[Any, Array]:
    """Estimate the score `∇θ log p_θ(y_{0:T-1})` by Fisher's identity and PaRIS or PPG.

    The score is the smoothing expectation of the additive functional
    `S(x) = ∇θ log μ_θ(x_0) + Σ_t ∇θ log f_θ(x_t | x_{t-1}) + Σ_t ∇θ log g_θ(y_t | x_t)`
    (Fisher's identity; Poyiadjis, Doucet and Singh, Biometrika 2011), estimated online by
    PaRIS with `h_t = jax.grad` of the step's log densities (Olsson and Westerborn,
    Bernoulli 2017, section 4): memory O(N), cost O(N Ñ) log-density gradients per step
    plus the backward draws.

    Bias: the PaRIS estimate is self-normalised, so it is biased, with a bias of order
    `T / N` (and a variance of order `T / N`); it is NOT the gradient of the returned
    `log p̂`. With multinomial resampling, `p̂(y) · (score estimate) / p(y)` is exactly
    unbiased for the score (the PaRIS statistic averages to the FFBS smoother); the plain
    estimate is consistent as `N → ∞`.

    With `smoother="ppg"` the same additive functional is estimated by PaRIS particle
    Gibbs (`ppg`; Cardoso, Janati, Le Corff, Moulines and Olsson, ICML 2023):
    `num_sweeps` conditional-bootstrap-filter sweeps of `N` particles (multinomial
    resampling), each running PaRIS on its particle system, averaged after the first
    `num_burnin`. A sweep whose reference has the smoothing law is unbiased, so the bias
    is that of the reference chain not yet at stationarity, and decays with the sweeps
    instead of PaRIS's `O(T/N)`; the cost is `num_sweeps` PaRIS runs of `N` particles.
    The chain starts afresh from one bootstrap-filter genealogy at every call (the
    reference is not carried over between calls), so keep `num_burnin >= 1`. The
    returned `log p̂` then comes from one run of the filter that `method`, `resampling`,
    `ess_threshold` and `log_auxiliary` describe (those settings do not change the
    sweeps).

    Args:
        key: a PRNG key.
        model: the `StateSpaceModel`; its laws must be differentiable in `params`.
        params: its parameters, a pytree of floating-point arrays (what is differentiated).
        observations: the observations, a leading time axis of length `T >= 1`.
        num_particles: the particles `N` (at least 2).
        num_backward_samples: PaRIS's `Ñ` (2 by default; 1 degenerates).
        method: the filter, `"bootstrap"`, `"guided"` or `"auxiliary"` (see `filter`).
        resampling: the resampling scheme (see `filter`).
        ess_threshold: resample when the ESS is below `ess_threshold · N`.
        inputs: optional time-varying inputs (leading time axis of length `T`).
        log_auxiliary: the auxiliary filter's look-ahead (method `"auxiliary"`).
        log_transition_bound: `(params, t, inputs) -> log f̄` for accept-reject backward
            draws (see `paris`); None draws exactly (O(N²) per step).
        num_proposals: accept-reject rounds before the exact fallback.
        smoother: `"paris"` (default) or `"ppg"` (PaRIS particle Gibbs, see above).
        num_sweeps: PPG's sweeps `k`, burn-in included (at least 1; `"ppg"` only).
        num_burnin: PPG's first sweeps left out of the average (`0 <= k_0 < k`).

    Returns:
        `(score, log_likelihood)`: the score estimate, a pytree like `params`, and the
        log of the filter's unbiased estimate of `p(y_{0:T-1})`.

    Raises:
        ValueError: empty or mismatched observations, `num_particles < 2`, an unknown
            `smoother`, `num_sweeps < 1`, `num_burnin` outside `[0, num_sweeps)`, or
            `params` the model's laws cannot read (a missing or misspelt entry).
        TypeError: a non-floating parameter leaf.

    Example (the score of `a` in `x_t ~ N(a x_{t-1}, 1)`, `y_t ~ N(x_t, 1)`):
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(params["a"] * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> params = {"a": jnp.asarray(0.5)}
        >>> _, ys = model.sample(jax.random.key(0), params, 20)
        >>> score, log_likelihood = smc.fisher_score(jax.random.key(1), model, params, ys,
        ...                                          num_particles=200)
        >>> score["a"].shape, log_likelihood.shape
        ((), ())
    """
    owner = "fisher_score"
    settings = _settings(owner, model, num_particles=num_particles,
                         num_backward_samples=num_backward_samples, method=method,
                         resampling=resampling, ess_threshold=ess_threshold,
                         log_auxiliary=log_auxiliary,
                         log_transition_bound=log_transition_bound,
                         num_proposals=num_proposals, smoother=smoother,
                         num_sweeps=num_sweeps, num_burnin=num_burnin)
    _check_float_tree(owner, "params", params)
    _check_model_params(owner, model, params, observations, inputs)
    score, _, log_likelihood = _run_score_jit(settings, key, params, observations, inputs)
    return score, log_likelihood


def _key_from_site():
    """A PRNG key drawn at one `px.sample` site (two uniforms, 24 random bits each).

    The site's law has no parameters, so its score term is zero (`px.reinforce`: the
    draw feeds a discontinuous filter, which a pathwise estimator would refuse); it gives
    the program fresh randomness at every call, derived from the expectation's key.
    """
    u = sample(dist.Uniform(0.0, 1.0).expand((2,)).to_event(1), estimator=reinforce,
               name="fisher_key")
    bits = jnp.floor(jnp.asarray(u, jnp.float32) * 2.0**24).astype(jnp.uint32)
    return jax.random.fold_in(jax.random.key(bits[0]), bits[1])


def _score_log_likelihood(settings, key_data, params, observations, inputs):
    key = jax.random.wrap_key_data(key_data)
    base = settings.kernel("fisher_objective", params, observations).filter
    return run_filter(key, base, params, observations, inputs, None, False).log_likelihood


_score_log_likelihood = jax.custom_jvp(_score_log_likelihood, nondiff_argnums=(0,))


def _score_log_likelihood_jvp(settings, primals, tangents):
    key_data, params, observations, inputs = primals
    _, params_dot, observations_dot, inputs_dot = tangents

    def tangent_of(value, tangent):  # integer data's float0 tangents: indexable stand-ins
        if jnp.issubdtype(jnp.asarray(value).dtype, jnp.inexact):
            return tangent
        return jnp.zeros(jnp.shape(value), jnp.result_type(float))

    observations_dot = jax.tree.map(tangent_of, observations, observations_dot)
    inputs_dot = None if inputs is None else jax.tree.map(tangent_of, inputs, inputs_dot)
    score, direction, log_likelihood = _run_score(
        settings, jax.random.wrap_key_data(key_data), params, observations, inputs,
        observations_dot, inputs_dot)
    terms = jax.tree.map(lambda s, t: jnp.sum(s * t).astype(log_likelihood.dtype), score,
                         params_dot)
    tangent = sum(jax.tree.leaves(terms), direction.astype(log_likelihood.dtype))
    return log_likelihood, tangent


_score_log_likelihood.defjvp(_score_log_likelihood_jvp)


def fisher_objective(model: StateSpaceModel, *, num_particles: int = 1000,
                     num_backward_samples: int = 2, method: str = "bootstrap",
                     resampling: str = "systematic", ess_threshold: float = 1.0,
                     log_auxiliary: Callable | None = None,
                     log_transition_bound: Callable | None = None,
                     num_proposals: int = 10, smoother: str = "paris",
                     num_sweeps: int = 10, num_burnin: int = 2) -> Expectation:
    """Maximum likelihood as an expectation program for `px.fit`: value `log p̂`, gradient
    the Fisher score.

    Returns the `px.Expectation` `objective(key, params, observations, inputs=None)` whose
    value is the particle filter's `log p̂_θ(y)` and whose gradient (`jax.grad`, and so
    every gradient back-end of `px.fit`) is the PaRIS estimate of Fisher's identity
    (`fisher_score`; one PaRIS run gives both). So
    `px.fit(fisher_objective(model), params, optax.adam(1e-2), num_steps, key, ys)` is
    stochastic-gradient maximum likelihood with any optax transformation.

    Why an objective rather than a back-end: `px.fit` hands a back-end only the objective,
    and every existing back-end (optax through `OptaxBackend`, the value-only ones) only
    needs `(value, gradient)` from it. Putting the score in the objective's derivative
    (a `jax.custom_jvp` on the filter run, whose randomness comes from one parameter-free
    `px.sample` site) lets all of them do maximum likelihood unchanged, and lets the
    objective be evaluated and differentiated wherever an expectation program can.

    Bias (stated, not hidden): the value is the log of an unbiased estimate of `p(y)`,
    hence biased low (`E[log p̂] <= log p(y)`, Jensen); the gradient is the PaRIS score,
    biased O(T/N) (self-normalised) and not the derivative of `E[log p̂]`. Both vanish as
    `N → ∞`; the fixed points of the ascent are those of `log p(y)` up to that bias.
    With `smoother="ppg"` the gradient is the PPG score of `fisher_score` (`num_sweeps`
    sweeps from a fresh bootstrap genealogy at every step), whose bias decays with the
    sweeps rather than with `N`; the value stays the filter's `log p̂`.
    Differentiating with respect to the observations or inputs raises `ValueError`; the
    laws must be differentiable in `params`.

    Args:
        model: the `StateSpaceModel`.
        num_particles: the particles `N` (at least 2).
        num_backward_samples: PaRIS's `Ñ`.
        method: the filter, `"bootstrap"`, `"guided"` or `"auxiliary"`.
        resampling: the resampling scheme.
        ess_threshold: resample when the ESS is below `ess_threshold · N`.
        log_auxiliary: the auxiliary filter's look-ahead (method `"auxiliary"`).
        log_transition_bound: `(params, t, inputs) -> log f̄` for accept-reject backward
            draws; None draws exactly.
        num_proposals: accept-reject rounds before the exact fallback.
        smoother: `"paris"` (default) or `"ppg"` (see `fisher_score`).
        num_sweeps: PPG's sweeps, burn-in included (`"ppg"` only).
        num_burnin: PPG's first sweeps left out of the average.

    Returns:
        A `px.Expectation` of `(params, observations, inputs=None)`.

    Example (maximum likelihood of `a` in `x_t ~ N(a x_{t-1}, 1)`, `y_t ~ N(x_t, 1)`):
        >>> import jax, jax.numpy as jnp, optax
        >>> import numpyro.distributions as dist
        >>> import ppl_ext as px
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(params["a"] * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> _, ys = model.sample(jax.random.key(0), {"a": jnp.asarray(0.8)}, 50)
        >>> objective = smc.fisher_objective(model, num_particles=100)
        >>> result = px.fit(objective, {"a": jnp.asarray(0.0)}, optax.adam(0.05), 100,
        ...                 jax.random.key(1), ys, progress=False)
        >>> bool(result.params["a"] > 0.3), result.history.value.shape
        (True, (100,))
    """
    owner = "fisher_objective"
    if not isinstance(model, StateSpaceModel):
        raise TypeError(f"{owner}: model must be a px.smc.StateSpaceModel, got "
                        f"{type(model).__name__}")
    settings = _settings(owner, model, num_particles=num_particles,
                         num_backward_samples=num_backward_samples, method=method,
                         resampling=resampling, ess_threshold=ess_threshold,
                         log_auxiliary=log_auxiliary,
                         log_transition_bound=log_transition_bound,
                         num_proposals=num_proposals, smoother=smoother,
                         num_sweeps=num_sweeps, num_burnin=num_burnin)

    def fisher_log_likelihood(params, observations, inputs=None):
        _check_float_tree(owner, "params", params)
        _check_model_params(owner, model, params, observations, inputs)
        key = _key_from_site()
        return _score_log_likelihood(settings, jax.random.key_data(key), params,
                                     observations, inputs)

    return expectation(fisher_log_likelihood)


# ------------------------------------------------------------ Markovian score climbing


class TrajectoryFamily(eqx.Module):
    """A variational family over trajectories, `q_λ(x_{0:T-1}) = q_0(x_0) Π_t q_t(x_t | x_{t-1})`.

    Given as the laws of a Markov chain, so that conditional SMC can use it as its proposal
    (`MarkovScoreClimbing`); a mean-field family ignores `x_prev`
    (`mean_field_gaussian`). Each law is a callable returning a numpyro distribution over
    ONE state (its `log_prob` a scalar; `.to_event(1)` for vectors):

    - `initial(params, inputs)`: `q_0`;
    - `transition(params, x_prev, t, inputs)`: `q_t(· | x_{t-1})`, `t >= 1` an int32 scalar.

    `params` is the family's parameter pytree `λ`; `inputs` the time step's slice of the
    model's optional inputs. `num_steps`, if given, is the only series length the family
    describes (checked against the observations).

    Example (a mean-field Gaussian over 3 scalar states):
        >>> import jax, jax.numpy as jnp
        >>> import ppl_ext.smc as smc
        >>> family, params = smc.mean_field_gaussian(3)
        >>> trajectory = family.sample(jax.random.key(0), params, 3)
        >>> trajectory.shape, family.log_density(params, trajectory).shape
        ((3,), ())
    """

    initial: Callable[..., Any] = eqx.field(static=True)
    transition: Callable[..., Any] = eqx.field(static=True)
    num_steps: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.num_steps is not None:
            _check_int("TrajectoryFamily", "num_steps", self.num_steps, 1)
        for name in ("initial", "transition"):
            if not callable(getattr(self, name)):
                raise TypeError(f"TrajectoryFamily.{name} must be a callable returning a "
                                f"numpyro distribution, got {getattr(self, name)!r}")

    def log_density(self, params: Any, trajectory: Any, inputs: Any = None) -> Array:
        """`log q_λ(x_{0:T-1})` of one trajectory (a leading time axis on every leaf)."""
        num_times = _leading(trajectory, "TrajectoryFamily.log_density")
        first = scalar_log_density(self.initial(params, at_time(inputs, 0)),
                                   at_time(trajectory, 0), "family's initial")
        if num_times == 1:
            return first

        def one(t):
            law = self.transition(params, at_time(trajectory, t - 1), t, at_time(inputs, t))
            return scalar_log_density(law, at_time(trajectory, t), "family's transition")

        return first + jnp.sum(jax.vmap(one)(jnp.arange(1, num_times, dtype=jnp.int32)))

    def sample(self, key: Array, params: Any, num_steps: int, inputs: Any = None) -> Any:
        """Draw one trajectory of `num_steps` time steps from `q_λ`."""
        _check_int("TrajectoryFamily.sample", "num_steps", num_steps, 1)
        keys = jax.random.split(key, num_steps)
        x0 = self.initial(params, at_time(inputs, 0)).sample(keys[0])

        def body(x_prev, xs):
            step_key, t = xs
            x = self.transition(params, x_prev, t, at_time(inputs, t)).sample(step_key)
            x = jax.tree.map(lambda a, b: a.astype(b.dtype), x, x_prev)
            return x, x

        _, rest = jax.lax.scan(body, x0, (keys[1:], jnp.arange(1, num_steps, dtype=jnp.int32)))
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), x0, rest)


def _leading(tree, owner: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError(f"{owner}: a trajectory needs a leading time axis on every leaf")
    return int(jnp.shape(leaves[0])[0])


class _MeanFieldLaw(eqx.Module):
    """`N(loc[t], exp(log_scale[t]))` at time `t` (ignoring `x_prev`), shapes checked."""

    num_steps: int = eqx.field(static=True)
    initial: bool = eqx.field(static=True)

    def __call__(self, params, *args):
        t = 0 if self.initial else args[1]
        for name in ("loc", "log_scale"):
            shape = jnp.shape(params[name])
            if not shape or shape[0] != self.num_steps:
                raise ValueError(f"mean_field_gaussian: params[{name!r}] has shape {shape}; "
                                 f"its leading axis must be the family's {self.num_steps} "
                                 "time steps (the observations' length)")
        loc, log_scale = params["loc"][t], params["log_scale"][t]
        law = dist.Normal(loc, jnp.exp(log_scale))
        return law.to_event(jnp.ndim(loc)) if jnp.ndim(loc) else law


def mean_field_gaussian(num_steps: int, state_shape: tuple[int, ...] = (),
                        loc: Any = 0.0, scale: Any = 1.0) -> tuple[TrajectoryFamily, dict]:
    """The mean-field Gaussian family `q_λ(x_{0:T-1}) = Π_t N(x_t; m_t, diag(s_t²))`.

    Args:
        num_steps: the number of time steps `T` (at least 1).
        state_shape: the shape of one state (`()` for scalar states).
        loc: the initial means (broadcast to `(T, *state_shape)`).
        scale: the initial standard deviations (positive; broadcast likewise).

    Returns:
        `(family, params)`: a `TrajectoryFamily` and its initial parameters
        `{"loc": (T, *state_shape), "log_scale": (T, *state_shape)}`.

    Example:
        >>> import ppl_ext.smc as smc
        >>> family, params = smc.mean_field_gaussian(10, scale=2.0)
        >>> params["loc"].shape, round(float(params["log_scale"].mean()), 3)  # log 2
        ((10,), 0.693)
    """
    _check_int("mean_field_gaussian", "num_steps", num_steps, 1)
    shape = (num_steps, *tuple(state_shape))
    scale = jnp.asarray(scale, jnp.result_type(float))
    try:
        positive = bool(jnp.all(scale > 0))
    except jax.errors.ConcretizationTypeError:  # traced (inside jit): not checkable here
        positive = True
    if not positive:
        raise ValueError(f"mean_field_gaussian: scale must be positive, got {scale}")
    params = {"loc": jnp.broadcast_to(jnp.asarray(loc, scale.dtype), shape),
              "log_scale": jnp.broadcast_to(jnp.log(scale), shape)}
    family = TrajectoryFamily(_MeanFieldLaw(num_steps, True), _MeanFieldLaw(num_steps, False),
                              num_steps)
    return family, params


class MSCState(NamedTuple):
    """State of Markovian score climbing.

    Attributes:
        trajectory: the Markov chain's current trajectory `x_k` (leading time axis).
        params: the family's parameters `λ_k`.
        opt_state: the optax transformation's state.
        model_params: the model's parameters `θ_k` when they are learned jointly (with a
            `model_optimizer`), else None.
        model_opt_state: the `model_optimizer`'s state, else None.
    """

    trajectory: Any
    params: Any
    opt_state: Any
    model_params: Any = None
    model_opt_state: Any = None


class MSCInfo(NamedTuple):
    """Diagnostics of one Markovian-score-climbing step.

    Attributes:
        log_density: `log q_{λ_{k-1}}(x_k)` at the new state, an estimate (along the chain)
            of `E_p[log q_λ] = -KL(p || q_λ) - H(p)`: it rises as `q_λ` covers `p`.
        grad_norm: the global L2 norm of the step's gradient `∇λ log q_λ(x_k)`.
        fraction_changed: the fraction of time steps whose state changed (mixing).
        ess: `(T,)` the conditional filter's effective sample sizes.
    """

    log_density: Array
    grad_norm: Array
    fraction_changed: Array
    ess: Array


def _csmc_with_proposal(key, model, model_params, family, params, observations, inputs,
                        reference, num_particles):
    """One conditional-SMC update of `reference` with `q_λ` as proposal (ancestor sampling).

    Particle 0 is the reference; the `N - 1` others are resampled multinomially, moved by
    `q_t(· | x_{t-1})` and weighted by `f(x_t | x_{t-1}) g(y_t | x_t) / q_t(x_t | x_{t-1})`
    (`μ g / q_0` at t = 0); the reference's ancestor is drawn with probability
    `∝ W_{t-1}^i f(x*_t | x_{t-1}^i)` (Lindsten, Jordan and Schön, JMLR 2014), and the new
    trajectory is the genealogy of a particle drawn from `W_{T-1}`. `p(x | y)` is invariant.
    """
    num = num_particles
    num_times = jax.tree.leaves(observations)[0].shape[0]
    keys = jax.random.split(key, num_times + 1)
    inputs_0 = at_time(inputs, 0)

    def put_reference(particles, t):
        return jax.tree.map(lambda a, r: a.at[0].set(r[t].astype(a.dtype)), particles,
                            reference)

    def log_weight_0(x):
        t0 = jnp.asarray(0, jnp.int32)
        proposal = family.initial(params, inputs_0)
        return (scalar_log_density(model.initial(model_params, inputs_0), x, "initial")
                + scalar_log_density(model.observation(model_params, x, t0, inputs_0),
                                     at_time(observations, 0), "observation")
                - scalar_log_density(proposal, x, "family's initial"))

    key_init, key_moves = jax.random.split(keys[0])
    particles = jax.vmap(lambda k: family.initial(params, inputs_0).sample(k))(
        jax.random.split(key_init, num))
    particles = jax.tree.map(lambda a, r: a.astype(r.dtype), particles, reference)
    particles = put_reference(particles, 0)
    log_weights, _ = normalize(jax.vmap(log_weight_0)(particles))

    def body(carry, xs):
        particles_prev, log_weights_prev = carry
        step_key, t, observation, step_inputs = xs
        key_resample, key_reference, key_move = jax.random.split(step_key, 3)
        free = SCHEMES["multinomial"](key_resample, jnp.exp(log_weights_prev), num - 1)
        x_ref = jax.tree.map(lambda r: r[t], reference)

        def log_transition(x_prev, x):
            law = model.transition(model_params, x_prev, t, step_inputs)
            return scalar_log_density(law, x, "transition")

        ancestor_0 = categorical(
            key_reference,
            log_weights_prev + jax.vmap(lambda xp: log_transition(xp, x_ref))(particles_prev))
        ancestors = jnp.concatenate([ancestor_0[None].astype(jnp.int32),
                                     free.astype(jnp.int32)])
        parents = jax.tree.map(lambda a: a[ancestors], particles_prev)
        moved = jax.vmap(
            lambda k, xp: family.transition(params, xp, t, step_inputs).sample(k))(
            jax.random.split(key_move, num), parents)
        moved = jax.tree.map(lambda new, old: new.astype(old.dtype), moved, particles_prev)
        moved = put_reference(moved, t)

        def log_weight(xp, x):
            proposal = family.transition(params, xp, t, step_inputs)
            return (log_transition(xp, x)
                    + scalar_log_density(model.observation(model_params, x, t, step_inputs),
                                         observation, "observation")
                    - scalar_log_density(proposal, x, "family's transition"))

        new_log_weights, _ = normalize(jax.vmap(log_weight)(parents, moved))
        return (moved, new_log_weights), (moved, new_log_weights, ancestors)

    later = lambda tree: None if tree is None else jax.tree.map(lambda a: a[1:], tree)
    times = jnp.arange(1, num_times, dtype=jnp.int32)
    _, (rest, rest_log_weights, rest_ancestors) = jax.lax.scan(
        body, (particles, log_weights), (keys[1:-1], times, later(observations),
                                         later(inputs)))
    stack = lambda first, others: jnp.concatenate([first[None], others])
    all_particles = jax.tree.map(stack, particles, rest)
    all_log_weights = stack(log_weights, rest_log_weights)
    all_ancestors = stack(jnp.arange(num, dtype=jnp.int32), rest_ancestors)
    last = categorical(keys[-1], all_log_weights[-1])

    def trace(index, xs):
        particles_t, ancestors_t = xs
        return ancestors_t[index], jax.tree.map(lambda a: a[index], particles_t)

    _, path = jax.lax.scan(trace, last, (all_particles, all_ancestors), reverse=True)
    ess = jnp.exp(-jax.nn.logsumexp(2 * all_log_weights, axis=1))
    return path, ess


def _log_joint(model, model_params, trajectory, observations, inputs):
    """`log p_θ(x_{0:T-1}, y_{0:T-1})` of one trajectory."""
    num_times = jax.tree.leaves(observations)[0].shape[0]
    t0 = jnp.asarray(0, jnp.int32)
    x0, inputs_0 = at_time(trajectory, 0), at_time(inputs, 0)
    first = (scalar_log_density(model.initial(model_params, inputs_0), x0, "initial")
             + scalar_log_density(model.observation(model_params, x0, t0, inputs_0),
                                  at_time(observations, 0), "observation"))
    if num_times == 1:
        return first

    def one(t):
        x, u = at_time(trajectory, t), at_time(inputs, t)
        law = model.transition(model_params, at_time(trajectory, t - 1), t, u)
        return (scalar_log_density(law, x, "transition")
                + scalar_log_density(model.observation(model_params, x, t, u),
                                     at_time(observations, t), "observation"))

    return first + jnp.sum(jax.vmap(one)(jnp.arange(1, num_times, dtype=jnp.int32)))


class _FamilyInitialScore(eqx.Module):
    """`h_0(x_0) = (∇λ log q_0(x_0), [∇θ log μ_θ(x_0) g_θ(y_0 | x_0)])` for a PPG move."""

    family: TrajectoryFamily
    params: Any
    model_score: _InitialScore | None

    def __call__(self, x, inputs):
        grad = jax.grad(lambda p: scalar_log_density(self.family.initial(p, inputs), x,
                                                     "family's initial"))(self.params)
        if self.model_score is None:
            return (grad,)
        return grad, self.model_score(x, inputs)[0]


class _FamilyStepScore(eqx.Module):
    """`h_t(x_{t-1}, x_t) = (∇λ log q_t(x_t | x_{t-1}), [∇θ log f_θ g_θ])` for a PPG move."""

    family: TrajectoryFamily
    params: Any
    model_score: _StepScore | None

    def __call__(self, x_prev, x, t, inputs):
        grad = jax.grad(lambda p: scalar_log_density(
            self.family.transition(p, x_prev, t, inputs), x, "family's transition"))(
            self.params)
        if self.model_score is None:
            return (grad,)
        return grad, self.model_score(x_prev, x, t, inputs)[0]


#: the Markov kernels of Markovian score climbing
MSC_KERNELS = ("csmc", "ppg")


class MarkovScoreClimbing(AbstractKernel):
    """Markovian score climbing: fit `q_λ` to the smoothing law by minimising KL(p || q_λ).

    One step (Naesseth, Lindsten and Blei, NeurIPS 2020, algorithm 1 with the conditional
    SMC kernel of their section 3): move the chain's trajectory by conditional SMC with
    `q_{λ_{k-1}}` as the proposal and ancestor sampling (`p(x_{0:T-1} | y)` invariant for
    every `λ`, `N >= 2`), then take an optax step on the loss `-log q_λ(x_k)` at
    `λ_{k-1}`, i.e. `λ_k = λ_{k-1} + ε_k ∇λ log q_λ(x_k)` for SGD. Since
    `∇λ KL(p || q_λ) = -E_p[∇λ log q_λ(x)]`, the steps follow a stochastic approximation
    of the KL's gradient along a Markov chain; with Robbins–Monro step sizes
    (`Σ ε_k = ∞`, `Σ ε_k² < ∞`, e.g. a decaying schedule) `λ_k` converges to a stationary
    point of KL(p || q_λ) (their theorem 1). The per-step gradient is not an unbiased
    estimate of the KL's gradient (the chain is not at stationarity), only asymptotically.
    For a mean-field Gaussian family the minimiser matches each smoothing marginal's mean
    and variance.

    With a `model_optimizer`, the model's parameters are learned jointly (the paper's
    section 3.2): after the move, `θ_k = θ_{k-1} + ε_k ∇θ log p_θ(x_k, y)` (an optax step
    on `-log p_θ(x_k, y)`), a stochastic approximation of Fisher's identity
    `∇θ log p_θ(y) = E_{p_θ(x | y)}[∇θ log p_θ(x, y)]` along the chain, whose stable
    points are stationary points of `log p_θ(y)`. The parameters then live in the state
    (`state.model_params`, started at `init`'s `model_params`), and `step`'s
    `model_params` must be None.

    With `markov_kernel="ppg"` the move is a sweep of PaRIS particle Gibbs
    (`ParisParticleGibbs`: the conditional bootstrap filter with the chain's trajectory
    frozen, then backward sampling of the next one, `p(x | y)` invariant as well), and the
    step's gradient is the sweep's PaRIS estimate of `E[∇λ log q_λ(x) | y]` over its whole
    particle system (`log q_λ` is additive along the trajectory) instead of the value at
    the one trajectory `x_k`: a Rao-Blackwellised estimate of the same mean field, exactly
    unbiased for it when the chain is at stationarity (Cardoso, Janati, Le Corff, Moulines
    and Olsson, ICML 2023). `q_λ` is then not a proposal (the sweep proposes from the
    model's transition), so it need not cover the posterior's tails for the move to mix.
    With a `model_optimizer`, `∇θ log p_θ(x, y)` is averaged the same way (the PPG
    estimate of Fisher's identity along the chain).

    `init(key, params, model_params, observations, inputs=None)` draws a first trajectory
    from `q_λ`; `step(key, state, model_params, observations, inputs=None)`.

    Args:
        model: the `StateSpaceModel` (its parameters `model_params` held fixed).
        family: the `TrajectoryFamily` `q_λ`.
        optimizer: an optax `GradientTransformation` (it minimises `-log q_λ(x_k)`).
        num_particles: the particles `N` of each conditional SMC run (at least 2).
        model_optimizer: None (the model's parameters are fixed), or an optax
            `GradientTransformation` that learns them jointly (it minimises
            `-log p_θ(x_k, y)`).
        markov_kernel: `"csmc"` (conditional SMC with `q_λ` as proposal and ancestor
            sampling, default) or `"ppg"` (a PaRIS-particle-Gibbs sweep, see above).
        num_backward_samples: PaRIS's `Ñ` in a `"ppg"` sweep (at least 1).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(0.9 * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
        >>> ys = jnp.zeros(5)
        >>> family, params = smc.mean_field_gaussian(5)
        >>> kernel = smc.MarkovScoreClimbing(model, family, optax.sgd(0.01), 20)
        >>> state = kernel.init(jax.random.key(0), params, None, ys)
        >>> state, info = kernel.step(jax.random.key(1), state, None, ys)
        >>> state.params["loc"].shape, info.log_density.shape
        ((5,), ())
    """

    model: StateSpaceModel
    family: TrajectoryFamily
    optimizer: optax.GradientTransformation
    num_particles: int = 100
    model_optimizer: optax.GradientTransformation | None = None
    markov_kernel: str = eqx.field(default="csmc", static=True)
    num_backward_samples: int = eqx.field(default=2, static=True)

    def __check_init__(self):
        owner = "MarkovScoreClimbing"
        if not isinstance(self.markov_kernel, str) or self.markov_kernel not in MSC_KERNELS:
            raise ValueError(f"{owner}: markov_kernel must be one of "
                             f"{', '.join(map(repr, MSC_KERNELS))}, got {self.markov_kernel!r}")
        _check_int(owner, "num_backward_samples", self.num_backward_samples, 1)
        if self.model_optimizer is not None and not isinstance(
                self.model_optimizer, optax.GradientTransformation):
            raise TypeError(f"{owner}: model_optimizer must be None or an "
                            "optax.GradientTransformation, got "
                            f"{type(self.model_optimizer).__name__}")
        if not isinstance(self.model, StateSpaceModel):
            raise TypeError(f"{owner}: model must be a px.smc.StateSpaceModel, got "
                            f"{type(self.model).__name__}")
        if not isinstance(self.family, TrajectoryFamily):
            raise TypeError(f"{owner}: family must be a px.smc.TrajectoryFamily (e.g. from "
                            f"mean_field_gaussian), got {type(self.family).__name__}")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(f"{owner}: optimizer must be an optax.GradientTransformation "
                            f"(e.g. optax.adam(1e-2)), got {type(self.optimizer).__name__}")
        _check_int(owner, "num_particles", self.num_particles, 2)

    def init(self, key: Array, params: Any, model_params: Any, observations: Any,
             inputs: Any = None) -> MSCState:
        """A first trajectory drawn from `q_λ`, the family's parameters and optax state."""
        num_times = check_series(observations, inputs, "MarkovScoreClimbing.init")
        if self.family.num_steps is not None and self.family.num_steps != num_times:
            raise ValueError(f"MarkovScoreClimbing: the family describes "
                             f"{self.family.num_steps} time steps, the observations have "
                             f"{num_times}")
        trajectory = self.family.sample(key, params, num_times, inputs)
        if self.model_optimizer is None:
            return MSCState(trajectory, params, self.optimizer.init(params))
        _check_float_tree("MarkovScoreClimbing.init", "model_params", model_params)
        return MSCState(trajectory, params, self.optimizer.init(params), model_params,
                        self.model_optimizer.init(model_params))

    def step(self, key: Array, state: MSCState, model_params: Any, observations: Any,
             inputs: Any = None) -> tuple[MSCState, MSCInfo]:
        """A conditional-SMC (or PPG) move, then an optax step on `-log q_λ(x_k)`."""
        num_times = check_series(observations, inputs, "MarkovScoreClimbing.step")
        for leaf in jax.tree.leaves(state.trajectory):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_times:
                raise ValueError(f"MarkovScoreClimbing.step: the trajectory's leaves need a "
                                 f"leading time axis of length {num_times}, got shape "
                                 f"{jnp.shape(leaf)}")
        if self.model_optimizer is not None:
            if model_params is not None:
                raise ValueError("MarkovScoreClimbing.step: with a model_optimizer the "
                                 "model's parameters live in state.model_params; pass "
                                 "model_params=None")
            model_params = state.model_params
        params = state.params
        if self.markov_kernel == "ppg":
            trajectory, ess, grads, model_grads = self._ppg_move(
                key, state, params, model_params, observations, inputs)
            log_density = -self.family.log_density(params, trajectory, inputs)
        else:
            trajectory, ess = _csmc_with_proposal(
                key, self.model, model_params, self.family, jax.lax.stop_gradient(params),
                observations, inputs, state.trajectory, self.num_particles)
            trajectory = jax.lax.stop_gradient(
                jax.tree.map(lambda new, old: new.astype(old.dtype), trajectory,
                             state.trajectory))
            log_density, grads = jax.value_and_grad(
                lambda p: -self.family.log_density(p, trajectory, inputs))(params)
            model_grads = None
        updates, opt_state = self.optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_params = jax.tree.map(lambda new, old: new.astype(jnp.asarray(old).dtype),
                                  new_params, params)

        def changed(new, old):
            return (new != old).reshape(num_times, -1).any(axis=1)

        per_time = jnp.stack(jax.tree.leaves(jax.tree.map(changed, trajectory,
                                                          state.trajectory))).any(axis=0)
        info = MSCInfo(-log_density, optax.tree.norm(grads),
                       jnp.mean(per_time.astype(ess.dtype)), ess)
        if self.model_optimizer is None:
            return MSCState(trajectory, new_params, opt_state), info
        if model_grads is None:
            model_grads = jax.grad(lambda theta: -_log_joint(
                self.model, theta, trajectory, observations, inputs))(model_params)
        model_updates, model_opt_state = self.model_optimizer.update(
            model_grads, state.model_opt_state, model_params)
        new_model_params = jax.tree.map(
            lambda new, old: new.astype(jnp.asarray(old).dtype),
            optax.apply_updates(model_params, model_updates), model_params)
        return MSCState(trajectory, new_params, opt_state, new_model_params,
                        model_opt_state), info


    def _ppg_move(self, key, state, params, model_params, observations, inputs):
        """A PPG sweep: the next trajectory, the ESS and the PaRIS estimates of the
        gradients of `-log q_λ` (and of `-log p_θ(x, y)` when θ is learned)."""
        frozen = jax.lax.stop_gradient(params)
        learn = self.model_optimizer is not None
        theta = jax.lax.stop_gradient(model_params) if learn else None
        step_score = _StepScore(self.model, theta, observations) if learn else None
        initial_score = _InitialScore(self.model, theta, observations) if learn else None
        kernel = ParisParticleGibbs(
            self.model, _FamilyStepScore(self.family, frozen, step_score),
            _FamilyInitialScore(self.family, frozen, initial_score), self.num_particles,
            self.num_backward_samples)
        new_state, info = kernel.step(key, PPGState(state.trajectory), model_params,
                                      observations, inputs)
        trajectory = jax.lax.stop_gradient(
            jax.tree.map(lambda new, old: new.astype(old.dtype), new_state.trajectory,
                         state.trajectory))
        estimate = jax.lax.stop_gradient(info.estimate)
        negate = lambda tree, like: jax.tree.map(
            lambda e, p: -e.astype(jnp.asarray(p).dtype), tree, like)
        grads = negate(estimate[0], params)
        model_grads = negate(estimate[1], model_params) if learn else None
        return trajectory, jax.lax.stop_gradient(info.ess), grads, model_grads


class MSCResult(NamedTuple):
    """What `markov_score_climbing` returns.

    Attributes:
        params: the family's final parameters `λ`.
        averaged_params: the Polyak–Ruppert average of `λ_k` over the last half of the
            steps (less noisy than `params` when the step size does not decay to 0).
        state: the final `MSCState` (to continue the chain).
        log_density: `(num_steps,)` `log q_{λ_{k-1}}(x_k)` along the chain (see `MSCInfo`).
        fraction_changed: `(num_steps,)` the fraction of time steps each update changed.
        model_params: the model's final parameters when learned (`model_optimizer`), else
            None.
        averaged_model_params: their Polyak–Ruppert average over the last half, else None.
    """

    params: Any
    averaged_params: Any
    state: MSCState
    log_density: Array
    fraction_changed: Array
    model_params: Any = None
    averaged_model_params: Any = None


@eqx.filter_jit
def _msc_chunk(kernel, state, average, start, length, key, model_params, observations,
               inputs, first_averaged, buffer):
    def body(i, carry):
        state, average, log_densities, changed = carry
        step = start + i
        state, info = kernel.step(jax.random.fold_in(key, step), state, model_params,
                                  observations, inputs)
        count = jnp.maximum(step - first_averaged + 1, 1).astype(log_densities.dtype)
        average = jax.tree.map(
            lambda a, p: jnp.where(step >= first_averaged, a + (p - a) / count, a),
            average, (state.params, state.model_params))
        return (state, average, log_densities.at[i].set(info.log_density),
                changed.at[i].set(info.fraction_changed))

    dtype = jnp.result_type(float)
    empty = jnp.full((buffer,), jnp.nan, dtype)
    return jax.lax.fori_loop(0, length, body, (state, average, empty, empty))


def markov_score_climbing(key: Array, model: StateSpaceModel, model_params: Any,
                          family: TrajectoryFamily, params: Any, observations: Any,
                          optimizer: optax.GradientTransformation, *, num_steps: int,
                          num_particles: int = 100, inputs: Any = None,
                          model_optimizer: optax.GradientTransformation | None = None,
                          progress: bool = True, markov_kernel: str = "csmc",
                          num_backward_samples: int = 2) -> MSCResult:
    """Fit `q_λ` to the smoothing law `p(x_{0:T-1} | y)` by Markovian score climbing.

    Runs `num_steps` steps of `MarkovScoreClimbing` (conditional SMC with `q_λ` as the
    proposal, then an optax step along `∇λ log q_λ(x_k)`), compiled in chunks of up to
    256 steps with a progress bar as `px.fit` shows. Step `k` uses
    `jax.random.fold_in(key, k)`. Why a function and not a `px.fit` back-end: the loss
    `-log q_λ(x_k)` is evaluated at the chain's state, which lives in the kernel's state,
    and the objective `E_p[log q_λ]` is not an expectation program (`p(x | y)` cannot be
    sampled directly), so there is no objective to hand `px.fit`.

    Args:
        key: a PRNG key.
        model: the `StateSpaceModel`.
        model_params: its parameters (held fixed).
        family: the `TrajectoryFamily` (e.g. `mean_field_gaussian(T)[0]`).
        params: the family's initial parameters `λ_0`.
        observations: the observations, a leading time axis of length `T >= 1`.
        optimizer: an optax `GradientTransformation`; use a decaying schedule (Robbins–Monro)
            for convergence.
        num_steps: the number of steps (at least 1).
        num_particles: the particles of each conditional SMC run (at least 2).
        inputs: optional time-varying inputs.
        model_optimizer: None (`model_params` fixed), or an optax transformation that
            learns the model's parameters jointly from `model_params` (see
            `MarkovScoreClimbing`); the result's `model_params` then holds them.
        progress: show a tqdm progress bar.
        markov_kernel: `"csmc"` (conditional SMC with `q_λ` as proposal, default) or
            `"ppg"` (a PaRIS-particle-Gibbs sweep whose PaRIS estimate of
            `E[∇λ log q_λ(x) | y]` is the gradient; see `MarkovScoreClimbing`).
        num_backward_samples: PaRIS's `Ñ` in a `"ppg"` sweep.

    Returns:
        An `MSCResult`.

    Raises:
        ValueError: empty or mismatched observations, `num_particles < 2`, `num_steps < 1`,
            an unknown `markov_kernel`, or model or family parameters the laws cannot read.

    Example (fit a mean-field Gaussian to the smoothing law of a random walk):
        >>> import jax, jax.numpy as jnp, optax
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
        >>> ys = jnp.array([0.5, 1.0, 1.5])
        >>> family, params = smc.mean_field_gaussian(3)
        >>> result = smc.markov_score_climbing(
        ...     jax.random.key(0), model, None, family, params, ys,
        ...     optax.adam(optax.cosine_decay_schedule(0.05, 500)), num_steps=500,
        ...     num_particles=10, progress=False)
        >>> result.averaged_params["loc"].shape, result.log_density.shape
        ((3,), (500,))
    """
    owner = "markov_score_climbing"
    kernel = MarkovScoreClimbing(model, family, optimizer, num_particles, model_optimizer,
                                 markov_kernel, num_backward_samples)
    num_steps = _check_int(owner, "num_steps", num_steps, 1)
    num_times = check_series(observations, inputs, owner)
    _check_model_params(owner, model, model_params, observations, inputs)
    _check_float_tree(owner, "params", params)
    if family.num_steps is not None and family.num_steps != num_times:
        raise ValueError(f"{owner}: the family describes {family.num_steps} time steps, the "
                         f"observations have {num_times}")
    try:
        jax.eval_shape(lambda: family.log_density(
            params, family.sample(jax.random.key(0), params, num_times, inputs), inputs))
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(f"{owner}: the family's laws fail on params ({type(exc).__name__}: "
                         f"{exc}); params must be the pytree the family reads") from exc
    key_init, key_steps = jax.random.split(key)
    state = kernel.init(key_init, params, model_params, observations, inputs)
    strong = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.asarray(a).dtype), tree)
    state = state._replace(params=strong(state.params),
                           model_params=strong(state.model_params))
    average = jax.tree.map(jnp.zeros_like, (state.params, state.model_params))
    step_model_params = None if model_optimizer is not None else model_params
    first_averaged = num_steps // 2
    buffer = min(num_steps, 256)
    log_densities, changed = [], []
    bar = ProgressBar(num_steps, "markov_score_climbing") if progress else None
    try:
        done = 0
        while done < num_steps:
            length = min(buffer, num_steps - done)
            state, average, values, fractions = _msc_chunk(
                kernel, state, average, np.int32(done), np.int32(length), key_steps,
                step_model_params, observations, inputs, np.int32(first_averaged), buffer)
            values, fractions = jax.device_get((values, fractions))
            log_densities.append(values[:length])
            changed.append(fractions[:length])
            done += length
            if bar is not None:
                bar.advance(length, float(np.mean(values[:length])))
    finally:
        if bar is not None:
            bar.close()
    return MSCResult(state.params, average[0], state,
                     jnp.asarray(np.concatenate(log_densities)),
                     jnp.asarray(np.concatenate(changed)), state.model_params, average[1])
