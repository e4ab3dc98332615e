"""The generative-function protocol: simulate / assess / generate, and traces."""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple

import equinox as eqx
from jaxtyping import Array


class Trace(NamedTuple):
    """One run of a generative function.

    - `choices`: the random choices, a dict from site name to value;
    - `log_density`: `log q(choices)`, or for constructs with only estimable densities the
      log of an estimate `ŵ` with `E[ŵ | choices] = 1/q(choices)`, negated (see
      docs/design.md, proper weighting). A site whose log density is scaled (numpyro's
      `scale` handler, a subsampling plate: scale `N/m`) counts with its scaled log
      density, `scale · log q_site(value)`, as in NumPyro's `log_density`;
    - `retval`: the return value.
    """

    choices: dict[str, Array]
    log_density: Array
    retval: Any


class DensityTerm(NamedTuple):
    """A term of `simulate`'s `Trace.log_density` that is not the density of a draw.

    `simulate` reports such terms with `report_density_term` while
    `recording_density_terms` is active (objectives that need `log_density` to be exactly
    the log density of the function's `px.sample` draws, such as `px.vi.vimco` and
    `px.vi.iwelbo_dreg`, trace `simulate` that way and refuse them):

    - `label`: names the term and its generative function, for error messages (read
      after "the guide's", e.g. `"observed site 'x' of 'guide'"`);
    - `kind`: `"observed"` (an observed site or a factor: the density of a value that was
      not drawn) or `"estimate"` (the log density is an estimate, e.g. `px.vi.marginal`);
    - `log_density`: the term's value (a traced array), from which the objective reads
      what it depends on.
    """

    label: str
    kind: str
    log_density: Any


_DENSITY_TERMS: contextvars.ContextVar[list[DensityTerm] | None] = contextvars.ContextVar(
    "ppl_ext_density_terms", default=None
)


@contextlib.contextmanager
def recording_density_terms() -> Iterator[list[DensityTerm]]:
    """Collect the `DensityTerm`s that `simulate` calls report in this dynamic extent."""
    terms: list[DensityTerm] = []
    token = _DENSITY_TERMS.set(terms)
    try:
        yield terms
    finally:
        _DENSITY_TERMS.reset(token)


def density_terms_recorded() -> bool:
    """Whether `report_density_term` records (compute a term's value only then)."""
    return _DENSITY_TERMS.get() is not None


def report_density_term(term: DensityTerm) -> None:
    """Report a `DensityTerm` of the running `simulate` (a no-op unless recording)."""
    terms = _DENSITY_TERMS.get()
    if terms is not None:
        terms.append(term)


_STOP_SCORE_DENSITIES: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ppl_ext_stop_score_densities", default=False
)


@contextlib.contextmanager
def score_function_densities_stopped() -> Iterator[None]:
    """Within this (trace-time) extent, `simulate` may put the log density of each draw
    whose estimator is not pathwise under `stop_gradient`.

    The parameter derivative of `log q(z)` at such a draw has mean zero
    (`E_q[∇ log q(z)] = 0`, the value carrying no tangent), so an objective that is
    *linear* in the guide's log density (the ELBO) stays unbiased without it and loses
    its variance, as NumPyro's TraceGraph_ELBO does. Objectives nonlinear in it (IWELBO,
    Rényi, VIMCO) must not use this: there the term no longer has mean zero; nor may
    constructs that combine densities nonlinearly pass it on to what they call (they run
    it under `score_function_densities_kept`).
    """
    token = _STOP_SCORE_DENSITIES.set(True)
    try:
        yield
    finally:
        _STOP_SCORE_DENSITIES.reset(token)


@contextlib.contextmanager
def score_function_densities_kept() -> Iterator[None]:
    """Undo `score_function_densities_stopped` within this extent.

    A construct that uses the densities of the generative functions it calls nonlinearly
    (`px.vi.marginal`'s log-mean-exp, `px.vi.normalize`'s weights) runs them in this
    context: there the dropped term would no longer have mean zero.
    """
    token = _STOP_SCORE_DENSITIES.set(False)
    try:
        yield
    finally:
        _STOP_SCORE_DENSITIES.reset(token)


def score_function_densities_are_stopped() -> bool:
    """Whether `score_function_densities_stopped` is active (read while tracing)."""
    return _STOP_SCORE_DENSITIES.get()


class AbstractGenerativeFunction(eqx.Module):
    """A probabilistic program with a density over its random choices.

    The protocol is two abstract methods, `simulate(params, *args)` and
    `assess(choices, params, *args)`; `generate`, running with some choices fixed, is the
    sub-protocol `AbstractConditionable`, which a class implements or visibly does not
    (`px.vi.marginal` and `px.vi.normalize` do not). Concrete classes are final.

    Methods are called inside expectation programs (`px.expectation`): their random choices
    are `px.sample` sites, so each site's gradient estimator applies and the randomness
    comes from the expectation's key.

    Exact and estimated densities. `simulate`'s `Trace.log_density` is `log q(choices)`
    for an exact generative function, and then `assess(trace.choices, ...)` returns the same
    number (the conformance suite checks it). Constructs whose density can only be
    estimated return properly weighted estimates instead (see `Trace`).

    Scaled sites. A site may carry a scale `s` (numpyro's `scale` handler; a subsampling
    plate gives its sites `s = N/m`). Every log density of the protocol is then the
    *scaled* one: `simulate`'s `log_density`, `assess`, and both sides of `generate`'s
    weight count such a site as `s · log p_site(value)`. Objectives stay unbiased for the
    full-data ones that way (`E[Σ_batch (N/m) f_i] = Σ_all f_i` for an ELBO), and in
    `generate` a site drawn from its own law cancels exactly whatever its scale.

    `simulate` reports terms of its `log_density` that are not the density of one of its
    draws (observed sites, factors, estimated densities) with `report_density_term`.

    Skeleton of a new generative function (one file, plus an entry in the conformance
    registry `tests/conformance/registry.py`):

        >>> import jax.numpy as jnp, numpyro.distributions as dist, ppl_ext as px
        >>> class Coin(px.gen.AbstractGenerativeFunction):
        ...     def simulate(self, params, *args):
        ...         law = dist.Bernoulli(logits=params["logit"])
        ...         x = px.sample(law)
        ...         return px.gen.Trace({"x": x}, law.log_prob(x), x)
        ...     def assess(self, choices, params, *args):
        ...         return dist.Bernoulli(logits=params["logit"]).log_prob(choices["x"])
        >>> float(Coin().assess({"x": jnp.asarray(1.0)}, {"logit": jnp.asarray(0.0)}))
        -0.6931...
    """

    @abc.abstractmethod
    def simulate(self, params, *args, **kwargs) -> Trace:
        """Draw choices and return them with their log density and the return value."""

    @abc.abstractmethod
    def assess(self, choices: dict[str, Array], params, *args, **kwargs) -> Array:
        """Log density of `choices` (all of the function's choices must be given)."""


class AbstractConditionable(AbstractGenerativeFunction):
    """A generative function that also runs with some of its choices fixed: `generate`.

    Needed by objectives that condition a model on data through `generate` rather than
    `assess` (an importance sampler whose proposal is the model's own prior for the free
    choices). A class that cannot honour the weight identity below (its density is only
    estimable) stays an `AbstractGenerativeFunction`.
    """

    @abc.abstractmethod
    def generate(
        self, constraints: dict[str, Array], params, *args, **kwargs
    ) -> tuple[Trace, Array]:
        """Draw the unconstrained choices; return the trace and the log importance weight.

        The weight is `log p(all choices) - log p(drawn choices | the others)`, both with
        *scaled* site densities (class docstring): the drawn sites are drawn from their own
        law (the function's prior for them), so their terms cancel, scaled or not, and the
        weight is the scaled log density of the constrained and observed sites given the
        drawn ones. Subtracting the unscaled density of a scaled drawn site instead would
        leave `(s - 1) · log p_site(value)` in the weight, which no objective expects.
        With every choice constrained the weight is `assess(constraints, ...)`; with none,
        it is the log density of what `simulate` would not draw (the observed sites).
        """
