"""Conditional SMC: the particle Gibbs kernel for the latent trajectory of a state-space model.

Given a reference trajectory `x*_{0:T-1}`, a conditional bootstrap filter keeps `x*_t` as
particle 0 at every step and moves the `N - 1` free particles as the bootstrap filter
does (multinomial resampling, transition, weights `g(y_t | x_t)`); a new trajectory is then
drawn from the run (Andrieu, Doucet and Holenstein, "Particle Markov chain Monte Carlo
methods", 2010). The smoothing law `p(x_{0:T-1} | y_{0:T-1})` is invariant, for any
`N >= 2`. Two ways to draw the new trajectory:

- `"ancestor"`: the reference's ancestor at `t` is resampled with
  `P(a = i) ∝ W_{t-1}^i f(x*_t | x_{t-1}^i)` (ancestor sampling, Lindsten, Jordan and
  Schön, "Particle Gibbs with ancestor sampling", JMLR 2014) and the new trajectory is the
  genealogy of a particle drawn from `W_{T-1}`;
- `"backward"`: the reference keeps its own ancestor and the new trajectory is drawn
  backwards, `P(J_t = j) ∝ W_t^j f(x_{t+1} | x_t^j)` (Whiteley 2010, in the discussion of
  Andrieu et al.).

Both fight the path degeneracy of plain conditional SMC, whose new trajectory shares its
early states with the reference. Everything is jitted, scanned over time and vectorised
over particles; memory is O(N T).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._kernel import AbstractKernel
from ._guard import refuse_derivatives
from ._resampling import SCHEMES, categorical, check_scheme, normalize
from ._ssm import (
    StateSpaceModel,
    at_time,
    check_observation_shape,
    check_series,
    scalar_log_density,
)

_SAMPLINGS = ("ancestor", "backward")


class CSMCState(NamedTuple):
    """State of the particle Gibbs chain.

    Attributes:
        trajectory: the current trajectory `x_{0:T-1}`, a leading time axis of length `T`
            on every leaf.
    """

    trajectory: Any


class CSMCInfo(NamedTuple):
    """Diagnostics of one conditional-SMC step.

    Attributes:
        fraction_changed: the fraction of the `T` time steps whose state differs from the
            reference's (the per-step update rate; near 0 at early times is path degeneracy).
        log_likelihood: the log of the conditional run's estimate of `p(y_{0:T-1})`
            (`Σ_t log mean_i g(y_t | x_t^i)`, the reference included).
        ess: `(T,)` effective sample sizes of the conditional filter's weights.
    """

    fraction_changed: Array
    log_likelihood: Array
    ess: Array


def _check_sampling(owner: str, sampling) -> None:
    if isinstance(sampling, str) and sampling in _SAMPLINGS:
        return
    close = difflib.get_close_matches(str(sampling), _SAMPLINGS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{owner}: unknown sampling {sampling!r}{hint} (choose one of "
                     f"{', '.join(map(repr, _SAMPLINGS))})")


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value}")


class ConditionalSMC(AbstractKernel):
    """Conditional SMC (particle Gibbs) as a kernel on the latent trajectory.

    `init(key, params, observations, inputs=None)` draws a first trajectory (one bootstrap
    filter run with all `N` particles free and the genealogy of a particle drawn from the
    final weights); `step(key, state, params, observations, inputs=None)` runs the
    conditional bootstrap filter with `state.trajectory` as particle 0 and returns
    `(CSMCState, CSMCInfo)` with the new trajectory. Unlike the filters' kernels, the
    kernel's arguments are the WHOLE series (leading time axis of length `T`). The smoothing
    law `p(x_{0:T-1} | y_{0:T-1})` is invariant; derivatives through the outputs are
    refused (as for the filters).

    Args:
        model: the `StateSpaceModel` (its `initial`, `transition` and `observation` laws;
            the transition must have a `log_prob`).
        num_particles: the number of particles `N`, the reference included (at least 2).
        resampling: `"multinomial"` (the only scheme whose conditional version is the plain
            scheme on the `N - 1` free particles).
        sampling: `"ancestor"` (ancestor sampling, default) or `"backward"` (backward
            sampling).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(0.9 * x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
        >>> kernel = smc.ConditionalSMC(model, num_particles=10)
        >>> ys = jnp.zeros(8)
        >>> state = kernel.init(jax.random.key(0), None, ys)
        >>> state, info = kernel.step(jax.random.key(1), state, None, ys)
        >>> state.trajectory.shape, info.ess.shape
        ((8,), (8,))
    """

    model: StateSpaceModel
    num_particles: int = 100
    resampling: str = "multinomial"
    sampling: str = "ancestor"

    def __check_init__(self):
        owner = "ConditionalSMC"
        if not isinstance(self.model, StateSpaceModel):
            raise TypeError(f"{owner}: model must be a px.smc.StateSpaceModel, got "
                            f"{type(self.model).__name__}")
        _check_int(owner, "num_particles", self.num_particles, 2)
        check_scheme(self.resampling, owner)
        if self.resampling != "multinomial":
            raise ValueError(f"{owner}: resampling {self.resampling!r} is not supported: the "
                             "conditional version of a scheme other than multinomial is not "
                             "the scheme applied to the N - 1 free particles (the reference "
                             "would be biased); use resampling='multinomial'")
        _check_sampling(owner, self.sampling)

    # ---------------------------------------------------------------- the conditional filter

    def _forward(self, key, params, observations, inputs, reference, conditional):
        """Run the (conditional) bootstrap filter; returns particles, log weights, ancestors.

        With `conditional`, particle 0 is `reference` at every step and its ancestor is 0
        (`sampling="backward"`) or ancestor-sampled (`sampling="ancestor"`).
        """
        num = self.num_particles
        num_times = jax.tree.leaves(observations)[0].shape[0]
        keys = jax.random.split(key, num_times)
        t0 = jnp.asarray(0, jnp.int32)
        inputs_0 = at_time(inputs, 0)
        observation_0 = at_time(observations, 0)

        def log_observation(particles, t, observation, step_inputs):
            def one(x):
                law = self.model.observation(params, x, t, step_inputs)
                return scalar_log_density(law, observation, "observation")

            return jax.vmap(one)(particles)

        def put_reference(particles, t):
            if not conditional:
                return particles
            return jax.tree.map(lambda a, r: a.at[0].set(r[t].astype(a.dtype)), particles,
                                reference)

        particles = jax.vmap(lambda k: self.model.initial(params, inputs_0).sample(k))(
            jax.random.split(keys[0], num))
        template = jax.tree.map(lambda a: a[0], particles)
        check_observation_shape(self.model.observation(params, template, t0, inputs_0),
                                observation_0, "ConditionalSMC")
        if conditional:
            particles = jax.tree.map(lambda a, r: a.astype(r.dtype), particles, reference)
        particles = put_reference(particles, 0)
        log_weights, log_total = normalize(
            log_observation(particles, t0, observation_0, inputs_0))
        log_likelihood = log_total - math.log(num)

        def body(carry, xs):
            particles_prev, log_weights_prev, log_likelihood = carry
            step_key, t, observation, step_inputs = xs
            key_resample, key_reference, key_move = jax.random.split(step_key, 3)
            weights = jnp.exp(log_weights_prev)
            if conditional:
                free = SCHEMES[self.resampling](key_resample, weights, num - 1)
                if self.sampling == "ancestor":
                    x_ref = jax.tree.map(lambda r: r[t], reference)

                    def log_transition(x_prev):
                        law = self.model.transition(params, x_prev, t, step_inputs)
                        return scalar_log_density(law, x_ref, "transition")

                    logits = log_weights_prev + jax.vmap(log_transition)(particles_prev)
                    ancestor_0 = categorical(key_reference, logits)
                else:
                    ancestor_0 = jnp.zeros((), jnp.int32)
                ancestors = jnp.concatenate([ancestor_0[None].astype(jnp.int32),
                                             free.astype(jnp.int32)])
            else:
                ancestors = SCHEMES[self.resampling](key_resample, weights, num).astype(
                    jnp.int32)
            parents = jax.tree.map(lambda a: a[ancestors], particles_prev)
            moved = jax.vmap(
                lambda k, x: self.model.transition(params, x, t, step_inputs).sample(k))(
                jax.random.split(key_move, num), parents)
            moved = jax.tree.map(lambda new, old: new.astype(old.dtype), moved, particles_prev)
            moved = put_reference(moved, t)
            new_log_weights, log_total = normalize(
                log_observation(moved, t, observation, step_inputs))
            log_likelihood = log_likelihood + log_total - math.log(num)
            return ((moved, new_log_weights, log_likelihood),
                    (moved, new_log_weights, ancestors))

        later = lambda tree: None if tree is None else jax.tree.map(lambda a: a[1:], tree)
        times = jnp.arange(1, num_times, dtype=jnp.int32)
        (_, _, log_likelihood), (rest, rest_log_weights, rest_ancestors) = jax.lax.scan(
            body, (particles, log_weights, log_likelihood),
            (keys[1:], times, later(observations), later(inputs)))
        stack = lambda first, others: jnp.concatenate([first[None], others])
        all_particles = jax.tree.map(stack, particles, rest)
        all_log_weights = stack(log_weights, rest_log_weights)
        all_ancestors = stack(jnp.arange(num, dtype=jnp.int32), rest_ancestors)
        return all_particles, all_log_weights, all_ancestors, log_likelihood

    def _draw(self, key, params, inputs, particles, log_weights, ancestors, backward):
        """One trajectory from a run: genealogy tracing, or backward sampling."""
        key_last, key_back = jax.random.split(key)
        last = categorical(key_last, log_weights[-1])
        num_times = log_weights.shape[0]
        if backward:
            head = lambda tree: jax.tree.map(lambda a: a[:-1], tree)
            x_last = jax.tree.map(lambda a: a[-1][last], particles)
            later_inputs = None if inputs is None else jax.tree.map(lambda a: a[1:], inputs)

            def back(x_next, xs):
                step_key, particles_t, log_weights_t, t_next, inputs_next = xs

                def log_transition(x_prev):
                    law = self.model.transition(params, x_prev, t_next, inputs_next)
                    return scalar_log_density(law, x_next, "transition")

                index = categorical(step_key,
                                    log_weights_t + jax.vmap(log_transition)(particles_t))
                x = jax.tree.map(lambda a: a[index], particles_t)
                return x, x

            xs = (jax.random.split(key_back, num_times - 1), head(particles),
                  log_weights[:-1], jnp.arange(1, num_times, dtype=jnp.int32), later_inputs)
            _, earlier = jax.lax.scan(back, x_last, xs, reverse=True)
            return jax.tree.map(lambda e, x: jnp.concatenate([e, x[None]]), earlier, x_last)

        def trace(index, xs):
            particles_t, ancestors_t = xs
            return ancestors_t[index], jax.tree.map(lambda a: a[index], particles_t)

        _, path = jax.lax.scan(trace, last, (particles, ancestors), reverse=True)
        return path

    # ---------------------------------------------------------------- the protocol

    def init(self, key: Array, params: Any, observations: Any, inputs: Any = None
             ) -> CSMCState:
        """A first trajectory: the genealogy of one particle of a bootstrap-filter run."""
        check_series(observations, inputs, "ConditionalSMC.init")
        key_filter, key_draw = jax.random.split(key)
        particles, log_weights, ancestors, _ = self._forward(
            key_filter, params, observations, inputs, None, conditional=False)
        trajectory = self._draw(key_draw, params, inputs, particles, log_weights, ancestors,
                                backward=False)
        return refuse_derivatives(CSMCState(trajectory), "ConditionalSMC.init")

    def step(self, key: Array, state: CSMCState, params: Any, observations: Any,
             inputs: Any = None) -> tuple[CSMCState, CSMCInfo]:
        """One particle Gibbs update of the trajectory (conditional SMC, then a draw)."""
        num_times = check_series(observations, inputs, "ConditionalSMC.step")
        reference = state.trajectory
        for leaf in jax.tree.leaves(reference):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_times:
                raise ValueError(f"ConditionalSMC.step: the trajectory's leaves need a leading "
                                 f"time axis of length {num_times} (the observations'), got "
                                 f"shape {jnp.shape(leaf)}")
        key_forward, key_draw = jax.random.split(key)
        particles, log_weights, ancestors, log_likelihood = self._forward(
            key_forward, params, observations, inputs, reference, conditional=True)
        trajectory = self._draw(key_draw, params, inputs, particles, log_weights, ancestors,
                                backward=self.sampling == "backward")
        trajectory = jax.tree.map(lambda new, old: new.astype(old.dtype), trajectory,
                                  reference)

        def changed(new, old):
            different = new != old
            return different.reshape(num_times, -1).any(axis=1)

        per_time = jax.tree.leaves(jax.tree.map(changed, trajectory, reference))
        any_changed = jnp.stack(per_time).any(axis=0)
        fraction = jnp.mean(any_changed.astype(log_weights.dtype))
        ess = jnp.exp(-jax.nn.logsumexp(2 * log_weights, axis=1))
        info = CSMCInfo(fraction, log_likelihood, ess)
        where = "ConditionalSMC.step"
        return (refuse_derivatives(CSMCState(trajectory), where),
                refuse_derivatives(info, where))


def particle_gibbs(key: Array, model: StateSpaceModel, params: Any, observations: Any, *,
                   num_particles: int = 100, num_steps: int = 100, sampling: str = "ancestor",
                   burn_in: int = 0, inputs: Any = None) -> Any:
    """Run a particle Gibbs chain on the latent trajectory (`ConditionalSMC`), jitted.

    The chain starts from `ConditionalSMC.init` (one bootstrap-filter genealogy draw) and
    makes `num_steps` conditional-SMC updates (a `lax.scan`); the trajectories after the
    first `burn_in` updates are returned. Their law tends to the smoothing law
    `p(x_{0:T-1} | y_{0:T-1})`, which every update leaves invariant.

    Args:
        key: a PRNG key.
        model: the `StateSpaceModel`.
        params: its parameters (held fixed).
        observations: the observations, a leading time axis of length `T`.
        num_particles: the particles `N` of each conditional run (at least 2).
        num_steps: the number of updates (at least 1).
        sampling: `"ancestor"` (ancestor sampling) or `"backward"` (backward sampling).
        burn_in: the number of first updates dropped (`0 <= burn_in < num_steps`).
        inputs: optional time-varying inputs (leading time axis of length `T`).

    Returns:
        `(num_steps - burn_in, T, ...)` trajectories (a pytree like the states).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext.smc as smc
        >>> model = smc.StateSpaceModel(
        ...     initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        ...     transition=lambda params, x, t, inputs: dist.Normal(x, 1.0),
        ...     observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
        >>> paths = smc.particle_gibbs(jax.random.key(0), model, None, jnp.zeros(6),
        ...                            num_particles=8, num_steps=50, burn_in=10)
        >>> paths.shape
        (40, 6)
    """
    kernel = ConditionalSMC(model, num_particles=num_particles, sampling=sampling)
    _check_int("particle_gibbs", "num_steps", num_steps, 1)
    _check_int("particle_gibbs", "burn_in", burn_in, 0)
    if burn_in >= num_steps:
        raise ValueError(f"particle_gibbs: burn_in ({burn_in}) must be below num_steps "
                         f"({num_steps})")
    check_series(observations, inputs, "particle_gibbs")
    trajectories = _particle_gibbs(key, kernel, params, observations, inputs, num_steps,
                                   burn_in)
    return refuse_derivatives(trajectories, "particle_gibbs")


@eqx.filter_jit
def _particle_gibbs(key, kernel, params, observations, inputs, num_steps, burn_in):
    key_init, key_steps = jax.random.split(key)
    state = kernel.init(key_init, params, observations, inputs)

    def body(state, step_key):
        state, _ = kernel.step(step_key, state, params, observations, inputs)
        return state, state.trajectory

    _, trajectories = jax.lax.scan(body, state, jax.random.split(key_steps, num_steps))
    return jax.tree.map(lambda a: a[burn_in:], trajectories)
