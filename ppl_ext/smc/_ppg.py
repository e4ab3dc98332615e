"""PaRIS particle Gibbs (PPG): PaRIS driven by conditional SMC, with bias decaying in sweeps.

PaRIS (`paris`) estimates `E[S(x_{0:T-1}) | y]` for an additive functional
`S = h_0(x_0) + Σ_{t>=1} h_t(x_{t-1}, x_t)` by self-normalised importance sampling, so it
has a bias of order `1/N`. PPG (Cardoso, Janati, Le Corff, Moulines and Olsson, "State and
parameter learning with PaRIS particle Gibbs", ICML 2023) runs the same PaRIS recursion on
the particle system of a *conditional* particle filter: each sweep

1. runs the conditional bootstrap filter with the reference trajectory `ζ` frozen as one
   particle (its ancestor index fixed, multinomial resampling of the `N - 1` free
   particles from all `N` weights);
2. updates the PaRIS statistics of all `N` particles with `Ñ` backward draws each,
   `τ_t^i = (1/Ñ) Σ_k [τ_{t-1}^{J^{i,k}} + h_t(x_{t-1}^{J^{i,k}}, x_t^i)]`,
   `P(J = j) ∝ W_{t-1}^j f(x_t^i | x_{t-1}^j)`, and estimates `E[S | y]` by
   `Σ_i W_{T-1}^i τ_{T-1}^i`;
3. draws the next reference from the backward indices: `b_{T-1} ~ W_{T-1}`,
   `b_{t-1} = J_t^{b_t, 1}`, `ζ'_t = x_t^{b_t}` (backward sampling, Whiteley 2010).

Given the particle system, the PaRIS statistics average to the backward-sampling smoother
of the same system, whose draw `ζ'` has the smoothing law when `ζ` has it; so a sweep
started from a draw of the smoothing law gives an UNBIASED estimate, for any `N >= 2`.
The chain of references forgets its start (geometrically when it is uniformly ergodic,
as under the paper's strong-mixing assumptions; slowly when `N` is small and the first
reference is far off), and the roll-out estimator `(k - k_0)^{-1} Σ_{l=k_0+1}^{k}
estimate_l` (burn-in `k_0`) has a bias decaying with the number of sweeps instead of
PaRIS's `O(1/N)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._kernel import AbstractKernel
from ._backward import backward_indices
from ._csmc import ConditionalSMC, _check_int
from ._guard import refuse_derivatives
from ._resampling import categorical
from ._ssm import StateSpaceModel, at_time, check_series


class PPGState(NamedTuple):
    """State of PaRIS particle Gibbs: the reference trajectory.

    Attributes:
        trajectory: the reference `ζ = x_{0:T-1}`, a leading time axis of length `T` on
            every leaf.
    """

    trajectory: Any


class PPGInfo(NamedTuple):
    """Diagnostics of one PPG sweep.

    Attributes:
        estimate: the sweep's PaRIS estimate `Σ_i W_{T-1}^i τ_{T-1}^i` of `E[S | y]` (a
            pytree like the additive functional's values).
        log_likelihood: the log of the conditional run's estimate of `p(y_{0:T-1})`.
        ess: `(T,)` effective sample sizes of the conditional filter's weights.
        fraction_changed: the fraction of time steps whose state differs from the
            reference's.
        acceptance_rate: the mean fraction of backward draws accepted by accept-reject
            (1.0 when the draws are exact).
    """

    estimate: Any
    log_likelihood: Array
    ess: Array
    fraction_changed: Array
    acceptance_rate: Array


class ParisParticleGibbs(AbstractKernel):
    """PaRIS particle Gibbs as a kernel over sweeps (Cardoso et al., ICML 2023).

    `init(key, params, observations, inputs=None)` draws a first reference trajectory (the
    genealogy of one particle of a bootstrap-filter run, as `ConditionalSMC.init`);
    `step(key, state, params, observations, inputs=None)` makes one sweep: the
    conditional bootstrap filter with `state.trajectory` frozen, the PaRIS statistics of
    its particles and a new reference drawn from their backward indices. It returns
    `(PPGState, PPGInfo)`; `info.estimate` is the sweep's estimate of `E[S | y]`, which is
    unbiased when the reference has the smoothing law (the law every sweep leaves
    invariant). As for `ConditionalSMC`, the arguments are the WHOLE series and
    derivatives through the outputs are refused.

    Args:
        model: the `StateSpaceModel` (its transition must have a `log_prob`).
        additive: `h_t(x_prev, x, t, inputs)` for `t >= 1`, a pytree of arrays.
        initial_additive: `h_0(x, inputs)`; None means zeros shaped like `h_1`'s values.
        num_particles: the particles `N` of each conditional run, the reference included
            (at least 2).
        num_backward_samples: `Ñ`, backward draws per particle and step (2 by default).
        log_transition_bound: None (exact backward draws, O(N²) per step), or a callable
            `(params, t, inputs) -> log f̄` bounding `log f(x_t | x_{t-1})`: accept-reject
            first, exact fallback (same law).
        num_proposals: accept-reject rounds before the exact fallback.

    Example (E[Σ_t x_t | y] of an AR(1) observed in noise):
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(0.9 * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
        >>> kernel = smc.ParisParticleGibbs(model, lambda x_prev, x, t, inputs: x,
        ...                                 initial_additive=lambda x, inputs: x,
        ...                                 num_particles=16)
        >>> ys = jnp.ones(8)
        >>> state = kernel.init(jax.random.key(0), None, ys)
        >>> state, info = kernel.step(jax.random.key(1), state, None, ys)
        >>> state.trajectory.shape, info.estimate.shape
        ((8,), ())
    """

    model: StateSpaceModel
    # not static: an additive functional may hold arrays (the Fisher score's holds params)
    additive: Callable[..., Any]
    initial_additive: Callable[..., Any] | None = None
    num_particles: int = 100
    num_backward_samples: int = 2
    log_transition_bound: Callable[..., Any] | None = eqx.field(default=None, static=True)
    num_proposals: int = 10

    def __check_init__(self):
        owner = "ParisParticleGibbs"
        if not isinstance(self.model, StateSpaceModel):
            raise TypeError(f"{owner}: model must be a px.smc.StateSpaceModel, got "
                            f"{type(self.model).__name__}")
        if not callable(self.additive):
            raise TypeError(f"{owner}: additive must be a callable (x_prev, x, t, inputs), "
                            f"got {self.additive!r}")
        if self.initial_additive is not None and not callable(self.initial_additive):
            raise TypeError(f"{owner}: initial_additive must be None or a callable "
                            f"(x, inputs), got {self.initial_additive!r}")
        if self.log_transition_bound is not None and not callable(self.log_transition_bound):
            raise TypeError(f"{owner}: log_transition_bound must be None or a callable "
                            f"(params, t, inputs), got {self.log_transition_bound!r}")
        _check_int(owner, "num_particles", self.num_particles, 2)
        _check_int(owner, "num_backward_samples", self.num_backward_samples, 1)
        _check_int(owner, "num_proposals", self.num_proposals, 1)

    def _csmc(self) -> ConditionalSMC:
        # the reference keeps its own ancestor: the new one is drawn backwards
        return ConditionalSMC(self.model, self.num_particles, sampling="backward")

    def _initial_statistics(self, particles, inputs):
        if self.initial_additive is not None:
            return jax.vmap(lambda x: self.initial_additive(x, inputs))(particles)
        t = jnp.asarray(1, jnp.int32)
        one = jax.tree.map(lambda a: a[0], particles)
        shape = jax.eval_shape(lambda: self.additive(one, one, t, inputs))
        return jax.tree.map(lambda s: jnp.zeros((self.num_particles,) + s.shape, s.dtype),
                            shape)

    def _paris(self, key, params, inputs, particles, log_weights):
        """PaRIS statistics over a stored run; returns the estimate, a path and acceptance."""
        num_times = log_weights.shape[0]
        key_back, key_last = jax.random.split(key)
        first = jax.tree.map(lambda a: a[0], particles)
        statistics = self._initial_statistics(first, at_time(inputs, 0))

        def body(statistics, xs):
            step_key, previous, log_weights_prev, current, t, step_inputs = xs
            bound = (None if self.log_transition_bound is None
                     else self.log_transition_bound(params, t, step_inputs))
            indices, acceptance = backward_indices(
                step_key, self.model, params, previous, log_weights_prev, current, t,
                step_inputs, self.num_backward_samples, bound, self.num_proposals)

            def update(index_row, x):
                prev = jax.tree.map(lambda a: a[index_row], previous)
                increments = jax.vmap(lambda xp: self.additive(xp, x, t, step_inputs))(prev)
                stats = jax.tree.map(lambda a: a[index_row], statistics)
                return jax.tree.map(lambda s, h: jnp.mean(s + h, axis=0).astype(s.dtype),
                                    stats, increments)

            statistics = jax.vmap(update)(indices, current)
            return statistics, (indices[:, 0], acceptance)

        head = lambda tree: jax.tree.map(lambda a: a[:-1], tree)
        tail = lambda tree: None if tree is None else jax.tree.map(lambda a: a[1:], tree)
        xs = (jax.random.split(key_back, num_times - 1), head(particles), log_weights[:-1],
              tail(particles), jnp.arange(1, num_times, dtype=jnp.int32), tail(inputs))
        statistics, (parents, acceptance) = jax.lax.scan(body, statistics, xs)
        weights = jnp.exp(log_weights[-1])
        estimate = jax.tree.map(lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1),
                                statistics)

        # the next reference: b_{T-1} ~ W_{T-1}, b_{t-1} = J_t^{b_t, 1}
        def trace(index, xs):
            particles_t, parents_t = xs
            return parents_t[index], jax.tree.map(lambda a: a[index], particles_t)

        last = categorical(key_last, log_weights[-1])
        # row t holds J_t^{·,1}, the parents at t - 1 of the particles at t (row 0 unused)
        shifted = jnp.concatenate([jnp.zeros((1, self.num_particles), jnp.int32), parents])
        _, path = jax.lax.scan(trace, last, (particles, shifted), reverse=True)
        mean_acceptance = (jnp.mean(acceptance) if num_times > 1
                           else jnp.ones((), log_weights.dtype))
        return estimate, path, mean_acceptance

    # ---------------------------------------------------------------- the protocol

    def init(self, key: Array, params: Any, observations: Any, inputs: Any = None
             ) -> PPGState:
        """A first reference: the genealogy of one particle of a bootstrap-filter run."""
        check_series(observations, inputs, "ParisParticleGibbs.init")
        state = self._csmc().init(key, params, observations, inputs)
        return refuse_derivatives(PPGState(state.trajectory), "ParisParticleGibbs.init")

    def step(self, key: Array, state: PPGState, params: Any, observations: Any,
             inputs: Any = None) -> tuple[PPGState, PPGInfo]:
        """One sweep: conditional run with the reference frozen, PaRIS, a new reference."""
        owner = "ParisParticleGibbs.step"
        num_times = check_series(observations, inputs, owner)
        reference = state.trajectory
        for leaf in jax.tree.leaves(reference):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_times:
                raise ValueError(f"{owner}: the reference trajectory's leaves need a leading "
                                 f"time axis of length {num_times} (the observations'), got "
                                 f"shape {jnp.shape(leaf)}")
        key_forward, key_paris = jax.random.split(key)
        particles, log_weights, _, log_likelihood = self._csmc()._forward(
            key_forward, params, observations, inputs, reference, conditional=True)
        estimate, trajectory, acceptance = self._paris(key_paris, params, inputs, particles,
                                                       log_weights)
        trajectory = jax.tree.map(lambda new, old: new.astype(old.dtype), trajectory,
                                  reference)

        def changed(new, old):
            return (new != old).reshape(num_times, -1).any(axis=1)

        per_time = jax.tree.leaves(jax.tree.map(changed, trajectory, reference))
        fraction = jnp.mean(jnp.stack(per_time).any(axis=0).astype(log_weights.dtype))
        ess = jnp.exp(-jax.nn.logsumexp(2 * log_weights, axis=1))
        info = PPGInfo(estimate, log_likelihood, ess, fraction, acceptance)
        return refuse_derivatives(PPGState(trajectory), owner), refuse_derivatives(info, owner)


class PPGResult(eqx.Module):
    """What `ppg` returns.

    Attributes:
        estimate: the roll-out estimate of `E[S(x_{0:T-1}) | y]`, the mean of the sweeps'
            estimates after the burn-in.
        estimates: `(num_sweeps, ...)` every sweep's estimate (burn-in included).
        trajectory: the final reference trajectory (`(T, ...)`, a pytree like the states).
        log_likelihood: `(num_sweeps,)` the conditional runs' log marginal-likelihood
            estimates.
        fraction_changed: `(num_sweeps,)` the fraction of time steps each sweep changed.
    """

    estimate: Any
    estimates: Any
    trajectory: Any
    log_likelihood: Array
    fraction_changed: Array


def ppg(key: Array, model: StateSpaceModel, params: Any, observations: Any,
        additive: Callable, *, initial_additive: Callable | None = None,
        num_particles: int = 100, num_sweeps: int = 20, num_burnin: int = 5,
        num_backward_samples: int = 2, inputs: Any = None,
        log_transition_bound: Callable | None = None, num_proposals: int = 10,
        initial_trajectory: Any = None) -> PPGResult:
    """Estimate `E[h_0(x_0) + Σ_{t>=1} h_t(x_{t-1}, x_t) | y]` by PaRIS particle Gibbs.

    Starting from `initial_trajectory` (default: `ParisParticleGibbs.init`, one
    bootstrap-filter genealogy), makes `num_sweeps` sweeps of `ParisParticleGibbs` (a
    jitted `lax.scan`) and averages the estimates of the sweeps after the first
    `num_burnin`: the roll-out estimator of Cardoso et al. (ICML 2023),

        Π_{k_0,k}(S) = (k - k_0)^{-1} Σ_{l=k_0+1}^{k} Σ_i W_{T-1}^{i,(l)} τ_{T-1}^{i,(l)},

    `k = num_sweeps`, `k_0 = num_burnin`. Its bias is that of the reference chain not yet
    being at the smoothing law, which decays with the sweeps (a sweep from an exact
    smoothing draw is unbiased; more burn-in is needed when `N` is small), where
    `paris`'s self-normalisation bias is `O(1/N)`. Each sweep costs a PaRIS run with `N`
    particles plus O(N T) memory (the run is stored to draw the next reference).

    Args:
        key: a PRNG key.
        model: the `StateSpaceModel` (bootstrap conditional filter; the transition must
            have a `log_prob`).
        params: its parameters (held fixed).
        observations: the observations, a leading time axis of length `T`.
        additive: `h_t(x_prev, x, t, inputs)` for `t >= 1` (one particle pair; any pytree).
        initial_additive: `h_0(x, inputs)` (default: zero).
        num_particles: the particles `N` of each conditional run (at least 2).
        num_sweeps: the number of sweeps `k` (at least 1).
        num_burnin: the sweeps `k_0` left out of the average (`0 <= k_0 < k`).
        num_backward_samples: `Ñ`, backward draws per particle and step.
        inputs: optional time-varying inputs (leading time axis of length `T`).
        log_transition_bound: `(params, t, inputs) -> log f̄` with `f(x_t | x_{t-1}) <= f̄`
            for accept-reject backward draws (exact fallback); None: exact draws.
        num_proposals: accept-reject rounds before the exact fallback.
        initial_trajectory: the first reference `x_{0:T-1}` (a pytree like the states),
            or None.

    Returns:
        A `PPGResult`.

    Example (E[Σ_t x_{t-1} x_t | y] of a random walk):
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> result = smc.ppg(jax.random.key(0), model, None, jnp.ones(10),
        ...                  lambda x_prev, x, t, inputs: x_prev * x, num_particles=16,
        ...                  num_sweeps=12, num_burnin=2)
        >>> result.estimate.shape, result.estimates.shape, result.trajectory.shape
        ((), (12,), (10,))
    """
    kernel = ParisParticleGibbs(model, additive, initial_additive, num_particles,
                                num_backward_samples, log_transition_bound, num_proposals)
    _check_int("ppg", "num_sweeps", num_sweeps, 1)
    _check_int("ppg", "num_burnin", num_burnin, 0)
    if num_burnin >= num_sweeps:
        raise ValueError(f"ppg: num_burnin ({num_burnin}) must be below num_sweeps "
                         f"({num_sweeps}): the estimate averages the sweeps after the "
                         "burn-in")
    num_times = check_series(observations, inputs, "ppg")
    if initial_trajectory is not None:
        for leaf in jax.tree.leaves(initial_trajectory):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_times:
                raise ValueError(f"ppg: initial_trajectory's leaves need a leading time axis "
                                 f"of length {num_times} (the observations'), got shape "
                                 f"{jnp.shape(leaf)}")
    result = _ppg(key, kernel, params, observations, inputs, initial_trajectory, num_sweeps,
                  num_burnin)
    return refuse_derivatives(result, "ppg")


@eqx.filter_jit
def _ppg(key, kernel, params, observations, inputs, initial_trajectory, num_sweeps,
         num_burnin):
    key_init, key_sweeps = jax.random.split(key)
    if initial_trajectory is None:
        state = kernel.init(key_init, params, observations, inputs)
    else:
        state = PPGState(initial_trajectory)

    def body(state, step_key):
        state, info = kernel.step(step_key, state, params, observations, inputs)
        return state, (info.estimate, info.log_likelihood, info.fraction_changed)

    state, (estimates, log_likelihood, fraction) = jax.lax.scan(
        body, state, jax.random.split(key_sweeps, num_sweeps))
    estimate = jax.tree.map(lambda a: jnp.mean(a[num_burnin:], axis=0), estimates)
    return PPGResult(estimate, estimates, state.trajectory, log_likelihood, fraction)
