"""Approximate marginalisation and normalisation as generative functions.

Both follow the proper-weighting contract of docs/design.md. With `q` the density of
what `simulate` outputs:
- `simulate` returns `x ~ q` and `Trace.log_density = log Ẑ(x)` where `1/Ẑ(x)` is an
  unbiased estimate of `1/q(x)` given `x`;
- `assess(x)` returns `log ẑ(x)` where `ẑ(x)` is an unbiased estimate of `q(x)`.
Objectives that use these logs where exact log densities would go are, by Jensen, bounds
on the exact objective, tightening as `num_particles` grows.

Reference: Lew, Cusumano-Towner & Mansinghka 2022, "Recursive Monte Carlo and variational
inference with auxiliary variables"; Becker et al. 2024, "Probabilistic programming with
programmable variational inference".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import logsumexp
from jaxtyping import Array

from ..adev import AbstractEstimator, reinforce, sample
from ..gen import AbstractGenerativeFunction, Trace
from ..gen._protocol import score_function_densities_kept


def _keeps_score_densities(method):
    """Run `method` with every density of what it calls kept whole (it combines them
    nonlinearly; see `gen.score_function_densities_stopped`)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with score_function_densities_kept():
            return method(self, *args, **kwargs)

    return wrapped


def _split(choices: dict, keep: Sequence[str]) -> tuple[dict, dict]:
    missing = [name for name in keep if name not in choices]
    if missing:
        raise ValueError(f"marginal: the kept choices {missing} are not choices of the model.")
    kept = {name: choices[name] for name in keep}
    rest = {name: value for name, value in choices.items() if name not in kept}
    return kept, rest


def _check_particles(num_particles):
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}.")


def _check_gen_fn(where: str, name: str, value) -> None:
    if not isinstance(value, AbstractGenerativeFunction):
        hint = (" Wrap a NumPyro model or guide function as px.gen.NumPyroModel(fn)."
                if callable(value) else "")
        raise TypeError(f"{where}: `{name}` must be a generative function, got "
                        f"{type(value).__name__}.{hint}")


class Marginal(AbstractGenerativeFunction):
    """`q(x) = ∫ q(x, u) du` estimated by importance sampling with a proposal `r(u | x)`.

    `simulate` runs `q(x, u)`, keeps the `u` that produced `x`, draws `K - 1` more
    `u_k ~ r(· | x)` and returns `log Ẑ` with `Ẑ = mean_k q(x, u_k) / r(u_k | x)`;
    `assess(x)` draws all `K` from `r`. The proposal is called as
    `proposal.simulate(params, kept_choices, *args)` and `proposal.assess(u, params,
    kept_choices, *args)`. `x` is an exact draw of the marginal.
    """

    model: AbstractGenerativeFunction
    keep: tuple[str, ...] = eqx.field(static=True)
    proposal: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        _check_particles(self.num_particles)
        _check_gen_fn("marginal", "model", self.model)
        _check_gen_fn("marginal", "proposal", self.proposal)

    def _log_weight(self, kept, params, args, kwargs):
        trace = self.proposal.simulate(params, kept, *args, **kwargs)
        log_q = self.model.assess({**kept, **trace.choices}, params, *args, **kwargs)
        return log_q - trace.log_density

    def _fresh_log_weights(self, num, kept, params, args, kwargs) -> Array:
        def body(carry, _):
            return carry, self._log_weight(kept, params, args, kwargs)

        return lax.scan(body, None, length=num)[1]

    @_keeps_score_densities
    def simulate(self, params, *args, **kwargs) -> Trace:
        """Draw `x` exactly; `log_density` is `log Ẑ` (see the class docstring)."""
        trace = self.model.simulate(params, *args, **kwargs)
        kept, rest = _split(trace.choices, self.keep)
        log_r = self.proposal.assess(rest, params, kept, *args, **kwargs)
        log_weights = trace.log_density[None] - log_r
        if self.num_particles > 1:
            fresh = self._fresh_log_weights(self.num_particles - 1, kept, params, args, kwargs)
            log_weights = jnp.concatenate([log_weights.reshape(1), fresh])
        log_z = logsumexp(log_weights) - math.log(self.num_particles)
        return Trace(kept, log_z, trace.retval)

    @_keeps_score_densities
    def assess(self, choices, params, *args, **kwargs) -> Array:
        """`log ẑ(x)`, `ẑ` an unbiased estimate of the marginal density `q(x)`."""
        log_weights = self._fresh_log_weights(self.num_particles, dict(choices), params,
                                              args, kwargs)
        return logsumexp(log_weights) - math.log(self.num_particles)


class Normalize(AbstractGenerativeFunction):
    """Sampling importance resampling: approximately `p̃(x) / Z` with proposal `r(x)`.

    `simulate` draws `K` candidates from `r`, selects one with probability proportional to
    its weight `p̃/r` (a categorical sample site, estimated with `selection_estimator`:
    `px.reinforce` by default, or `px.enum` to sum over the `K` candidates exactly) and
    returns `log_density = log p̃(x) - log Ẑ` with `Ẑ` the mean weight. `assess(x)` puts `x`
    among `K - 1` fresh candidates and returns `log p̃(x) - log Ẑ`. The unnormalised target
    is assessed as `target.assess(x, params, *args)`; the proposal is called as
    `proposal.simulate(params, *args)`.
    """

    target: AbstractGenerativeFunction
    proposal: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True, default=1)
    selection_estimator: AbstractEstimator = eqx.field(static=True, default=reinforce)

    def __check_init__(self):
        _check_particles(self.num_particles)
        _check_gen_fn("normalize", "target", self.target)
        _check_gen_fn("normalize", "proposal", self.proposal)

    def _candidates(self, num, params, args, kwargs):
        def body(carry, _):
            trace = self.proposal.simulate(params, *args, **kwargs)
            log_p = self.target.assess(trace.choices, params, *args, **kwargs)
            return carry, (trace.choices, log_p, log_p - trace.log_density)

        return lax.scan(body, None, length=num)[1]

    @_keeps_score_densities
    def simulate(self, params, *args, **kwargs) -> Trace:
        """Draw by SIR; `log_density` is `log p̃(x) - log Ẑ`."""
        choices, log_p, log_w = self._candidates(self.num_particles, params, args, kwargs)
        index = sample(dist.Categorical(logits=log_w), self.selection_estimator,
                       name="normalize selection")
        selected = {name: value[index] for name, value in choices.items()}
        log_z = logsumexp(log_w) - math.log(self.num_particles)
        return Trace(selected, log_p[index] - log_z, None)

    @_keeps_score_densities
    def assess(self, choices, params, *args, **kwargs) -> Array:
        """`log p̃(x) - log Ẑ` with `x` among `K - 1` fresh candidates."""
        log_p = self.target.assess(dict(choices), params, *args, **kwargs)
        log_w_x = log_p - self.proposal.assess(dict(choices), params, *args, **kwargs)
        if self.num_particles == 1:
            return log_p - log_w_x
        _, _, log_w = self._candidates(self.num_particles - 1, params, args, kwargs)
        log_z = logsumexp(jnp.concatenate([log_w_x.reshape(1), log_w])) - math.log(
            self.num_particles
        )
        return log_p - log_z


def marginal(
    model: AbstractGenerativeFunction,
    keep: Sequence[str],
    proposal: AbstractGenerativeFunction,
    num_particles: int = 1,
) -> Marginal:
    """Marginalise all choices of `model` except `keep`, with proposal `r(u | x)`.

    See `Marginal`. With `num_particles = K`, objectives that use it are bounds that
    tighten with `K` (hierarchical VI: HVI at `K = 1`, IWHVI for `K > 1`).
    """
    return Marginal(model, tuple(keep), proposal, num_particles)


def normalize(
    target: AbstractGenerativeFunction,
    proposal: AbstractGenerativeFunction,
    num_particles: int = 1,
    selection_estimator: AbstractEstimator = reinforce,
) -> Normalize:
    """Approximate the normalised `target` by sampling importance resampling. See `Normalize`."""
    return Normalize(target, proposal, num_particles, selection_estimator)
