"""Gradient estimators, one per strategy, chosen per sample site.

Each estimator is an `eqx.Module`. Local estimators (reparameterisation, score function)
need only the final value of the program, so they work inside loop bodies: they return the
sample and two surrogate terms that the interpreter accumulates. Continuation estimators
(enumeration, measure-valued derivatives, leave-one-out) evaluate the rest of the program
more than once; the interpreter hands them the continuation `k`.

Surrogate convention. In surrogate mode every value `v` computed by the interpreter is
numerically the value estimate, and its forward-mode tangent is the ADEV tangent estimate.
With `sg` = `jax.lax.stop_gradient`, a score-function site contributes
`A += log p(x) - sg(log p(x))` (zero in value, score in tangent) and
`B += sg(b) * (log p(x) - sg(log p(x)))`; the program's final value `y` becomes
`y + sg(y) * A - B`, whose tangent is `ẏ + (y - b) * d log p(x)` summed over sites.

Sampling laws (`_laws.py`). Every estimator draws with `distribution.sample` and scores,
enumerates and perturbs the law of that draw: masks and censoring are stripped (their
`log_prob` is not the law's), probabilities of Bernoulli, Binomial and Categorical sites
(and zero-inflated ones over them) are computed from the parameters without numpyro's
clamps (whose derivative is 0 near probability 1 and at zero entries), and an
alternative whose weight is 0 still passes on the derivative of its weight.

Soundness checks, made when a site is traced (`check`; error messages name the site and
the way out): the score-function estimators (`Reinforce`, `LeaveOneOut`) refuse a support
that moves with the parameters anywhere in the distribution tree (a traced bound, or a
transform with traced parameters applied to a set it does not map onto a fixed set) and
a point mass (`Delta`) inside a tree (a traced location has no score; mixed with a
density, numpyro's mixture `log_prob` is not the law's); a `Reinforce` baseline is a
scalar or a per-element array along the site's leading batch axis, and a scalar baseline
is refused where the site is Rao-Blackwellised per element (see `Reinforce`).
"""

import abc
import itertools
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
from equinox import AbstractClassVar
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike

from ._errors import UnsupportedEstimatorError
from ._laws import (
    LawError,
    log_density,
    mass,
    moving_support,
    point_mass_inside,
    sampling_law,
)

sg = jax.lax.stop_gradient

#: Largest joint support that `Enum` enumerates for a batch-shaped site.
MAX_ENUMERATION_SIZE = 4096

Continuation = Callable[[Array], tuple[list[Array], Array]]


def first_invalid(invalid: Array) -> Array:
    """The first invalid site id (>= 0) among evaluations of a continuation, or -1."""
    invalid = jnp.ravel(invalid)
    return jnp.max(invalid)


def _name(distribution: dist.Distribution) -> str:
    return type(distribution).__name__


class AbstractEstimator(eqx.Module):
    """Interface of a gradient estimator for one sample site (a protocol Python checks).

    Abstract or final: an estimator subclasses one of the two kinds,
    `AbstractLocalEstimator` or `AbstractContinuationEstimator`, implements its abstract
    methods (`check`, and `local` or `run`) and states the class-level flags below;
    concrete estimators are final (subclass the kind, never a concrete estimator).
    Python refuses to instantiate a class that leaves a method or a flag out, naming
    them, and refuses to subclass a concrete estimator.

    Class-level flags, read by the interpreter, the static analyses and the objectives
    (`px.vi` site requirements) instead of the estimator's class:

    - `continuation` (set by the kind): the estimator evaluates the rest of the program
      itself (`run`); a local one only returns the draw and surrogate terms (`local`).
    - `pathwise`: the drawn value is a differentiable function of the law's parameters
      and carries their derivative (`x = g(φ, ε)`), so the rest of the program is
      differentiated through it, which is unbiased only where the program is continuous
      in it (the continuity check judges such sites, see `checks_continuity`). False: the
      value carries no derivative (it is `stop_gradient`ed); the law's dependence on the
      parameters reaches the gradient through the estimator's own terms only.
    - `score_function`: those terms include the score `d log q(x; φ)` of the sampling
      law, which misses part of the derivative where the support moves or a point mass
      hides in the law; `check` must refuse those (`check_score_function`).

    | estimator | `continuation` | `pathwise` | `score_function` |
    | --- | --- | --- | --- |
    | `Reparam` | False | True | False |
    | `Reinforce` | False | False | True |
    | `Enum`, `MVD` | True | False | False |
    | `LeaveOneOut` | True | False | True |

    Example (a reparameterisation estimator written by a user):
        >>> import jax, ppl_ext as px, numpyro.distributions as dist
        >>> class MyReparam(px.AbstractLocalEstimator):
        ...     pathwise = True
        ...     score_function = False
        ...     def check(self, distribution, site):
        ...         pass
        ...     def local(self, key, distribution, surrogate):
        ...         return distribution.rsample(key), None, None
        >>> @px.expectation
        ... def f(theta):
        ...     return px.sample(dist.Normal(theta, 1.0), MyReparam()) ** 2
        >>> float(f.grad(jax.random.key(0), 1.0)) == float(
        ...     f.grad(jax.random.key(0), 1.0))
        True
    """

    continuation: AbstractClassVar[bool]
    pathwise: AbstractClassVar[bool]
    score_function: AbstractClassVar[bool]

    def __init_subclass__(cls, **kwargs):
        # Finality is checked here: equinox >= 0.13 accepts `strict=True` but no longer
        # enforces it (abstract classes and abstract methods it still checks).
        super().__init_subclass__(**kwargs)
        for base in cls.__bases__:
            if issubclass(base, AbstractEstimator) and not _is_abstract(base):
                kind = ("AbstractContinuationEstimator" if base.continuation
                        else "AbstractLocalEstimator")
                raise TypeError(
                    f"{base.__name__} is a concrete estimator and concrete estimators are "
                    f"final: {cls.__name__} cannot subclass it. Subclass px.{kind} and "
                    f"write the estimator out (or hold a {base.__name__} as a field)."
                )

    @abc.abstractmethod
    def check(self, distribution: dist.Distribution, site: str) -> None:
        """Raise `UnsupportedEstimatorError` naming `site` if `distribution` is unsupported.

        Called when the site is traced, with the site's label for the message.
        """

    def checks_continuity(self) -> bool:
        """Whether the continuity check judges this estimator's sites.

        True for a `pathwise` estimator, unless the instance opts out with a field
        `allow_discontinuous` set to True (as `px.Reparam(allow_discontinuous=True)`
        does). Not overridden: a pathwise estimator declares that field to opt out.
        """
        return bool(self.pathwise) and not getattr(self, "allow_discontinuous", False)


def _is_abstract(cls: type) -> bool:
    """Whether an estimator class is abstract (a method or a class-level flag left open)."""
    return bool(getattr(cls, "__abstractmethods__", ()) or getattr(cls, "__abstractvars__", ())
                or getattr(cls, "__abstractclassvars__", ()))


class AbstractLocalEstimator(AbstractEstimator):
    """An estimator that needs only the program's final value (works inside loops).

    Implement `check` and `local`, and state `pathwise` and `score_function`.
    """

    continuation: ClassVar[bool] = False

    @abc.abstractmethod
    def local(
        self, key: Array, distribution: dist.Distribution, surrogate: bool
    ) -> tuple[Array, Array | None, Array | None]:
        """Draw the site's value; in surrogate mode also return the `A` and `B` terms.

        Returns `(x, A, B)`: the drawn value (carrying the derivative of the parameters
        exactly when the estimator is `pathwise`), and the site's contributions to the
        surrogate accumulators (`A += log q - sg(log q)` and `B += sg(b) * (log q -
        sg(log q))` for a score function with baseline `b`; see the module docstring), or
        None for no contribution. Value mode (`surrogate=False`) returns `(x, None, None)`.
        """

    def run_plate(
        self, key, distribution, k, dtype, site: str
    ) -> tuple[list, Array] | None:
        """Optional: a lower-variance surrogate using the continuation `k`, or None.

        Called in surrogate mode where the rest of the program is available (not inside
        loop bodies); returning None (the default) means `local` is used. The draw must
        be the one `local` makes with the same key, so values agree across modes.
        """
        return None


class AbstractContinuationEstimator(AbstractEstimator):
    """An estimator that evaluates the rest of the program (the continuation) itself.

    Implement `check` and `run`, and state `pathwise` and `score_function`.
    """

    continuation: ClassVar[bool] = True

    @abc.abstractmethod
    def run(
        self,
        key: Array,
        distribution: dist.Distribution,
        k: Continuation,
        surrogate: bool,
        dtype: Any,
        site: str,
    ) -> tuple[list[Array], Array]:
        """Return the estimate of `E[k(x)]` (a surrogate in surrogate mode).

        `k` maps a value of the site to `(outputs, invalid)`: the list of the program's
        final outputs and the id of the first later site with invalid parameters (-1 if
        none); it is vmappable over a leading axis of values. `site` is the site's label,
        for error messages. Return the combined outputs
        and the first invalid id over all evaluations (`first_invalid`).
        """


def _law(distribution: dist.Distribution, site: str) -> dist.Distribution:
    """The site's sampling law (`_laws.sampling_law`), refusing by name where it has none."""
    try:
        return sampling_law(distribution, site)
    except LawError as error:
        raise UnsupportedEstimatorError(str(error)) from None


def _score(law: dist.Distribution, x: Array) -> Array:
    log_p = jnp.sum(log_density(law, x))
    return log_p - sg(log_p)


class Reparam(AbstractLocalEstimator):
    """Reparameterisation (pathwise) gradient: `x = g(φ, ε)` with `ε` from a fixed base.

    Covers implicit reparameterisation, e.g. numpyro's Gamma, Beta and Dirichlet samplers,
    whose samples are differentiable in their parameters. Unbiased when the rest of the
    program is continuous in `x` (and differentiable almost everywhere); a step function of
    `x` (a comparison that selects a branch, `floor`, a cast to an integer) makes the
    pathwise gradient biased. Such programs are refused when traced, naming the site and
    the primitive; `allow_discontinuous=True` skips that check for a site whose program is
    continuous where the branch switches (e.g. `jnp.where(x > 0, x, 0.0)`).

    Reference: Kingma & Welling 2014; Figurnov et al. 2018 (implicit reparameterisation).
    """

    pathwise: ClassVar[bool] = True
    score_function: ClassVar[bool] = False
    allow_discontinuous: bool = eqx.field(static=True, default=False)

    def check(self, distribution, site):
        if not reparameterisable(distribution):
            raise UnsupportedEstimatorError(
                f"{site}: reparam needs a reparameterisable distribution, and "
                f"{_name(distribution)} has no rsample. Use estimator=px.reinforce, "
                "px.enum (finite support) or px.mvd instead."
            )

    def local(self, key, distribution, surrogate):
        return distribution.rsample(key), None, None


class RunningAverage(eqx.Module):
    """A baseline state: an exponential moving average of objective estimates.

    Pass it to the objective as an argument and use `Reinforce(baseline=state.value)`;
    after each step call `state = state.update(estimate)`. The baseline used at a step
    never depends on that step's draws, so the estimator stays unbiased.

    Example:
        >>> import jax.numpy as jnp, ppl_ext as px
        >>> state = px.RunningAverage(jnp.array(0.0), decay=0.5)
        >>> float(state.update(jnp.array(2.0)).value)
        1.0
    """

    value: Array
    decay: float = eqx.field(static=True, default=0.9)

    def update(self, estimate: ArrayLike) -> "RunningAverage":
        """Return the state after seeing one more objective estimate."""
        new = self.decay * self.value + (1.0 - self.decay) * sg(jnp.asarray(estimate))
        return RunningAverage(new, self.decay)


class Reinforce(AbstractLocalEstimator):
    """Score-function (REINFORCE) gradient with an optional baseline.

    Tangent: `ẏ + (y - b) · d/dε log q(x; φ + εφ̇)` where `y` is the program's final value,
    `q` the site's sampling law (masks stripped, no probability clamps: `_laws.py`) and `b`
    a baseline that must not depend on `x` (a constant, a `RunningAverage`, or a learned
    value passed into the objective as an argument; its gradient is zero, so learn it
    with its own loss, e.g. `(y - b)²`). Works for every distribution with a `log_prob`,
    except where it would be silently biased, which is refused when the site is traced,
    naming the site: a support that moves with the parameters anywhere in the
    distribution tree (`Uniform(0, θ)`, an affine map with traced parameters of a bounded
    base, a mixture with such a component), and a point mass (`Delta`) inside a mixture.

    **Baselines.** `baseline` is None, a scalar, or, for a site with a leading batch axis
    of `n` independent elements (a numpyro plate, `.expand`), an array of shape `(n,)`:
    one baseline `b_i` per element, scoring element `i` as `(y - b_i) d log q(x_i)` (or
    `(g_i - b_i) d log q(x_i)` when Rao-Blackwellised, below). Each `b_i` must not depend
    on the site's draws (e.g. a per-data-point baseline network's output, as in NVIL).

    **Rao-Blackwellisation per element.** A batch-shaped site whose elements' terms are
    added up by the rest of the program (an ELBO over data points) is scored per element,
    as NumPyro's `TraceGraph_ELBO` does with plates: element `i`'s score multiplies only
    its own term, `Σ_i (sg(g_i(x_i)) - b_i) d log q(x_i)` (`b_i = 0` without a baseline),
    which drops the other elements' terms (zero in expectation, not in variance). This
    needs the rest of the program, so it applies outside loop bodies and when
    `rao_blackwellise` is true (the default); otherwise the score of the summed log
    density multiplies the whole `y - b`. Inside the group of a site on another plate
    (a plate of another size, the site's law free of that group's elements, no
    baseline), element `i`'s score multiplies `y(x) - y(x with x_i redrawn)` instead: the
    reference term has mean zero whatever `y` is, and the difference is `g_i(x_i) -
    g_i(x'_i)` where `y` adds up terms per element.

    **Rao-Blackwellisation along the dependency graph.** A site at the top level of the
    program (not inside a loop, cond, call or nested expectation), without a baseline,
    scores against the terms of `y` that depend on its draw only: `(y - R) d log q(x)`,
    `R` the sum of the additive terms of `y` that provably do not depend on `x` (as
    NumPyro's `TraceGraph_ELBO`; `_graph.py`). Off with `rao_blackwellise=False`.

    A scalar baseline on a site that is Rao-Blackwellised per element is refused, naming
    the site: a scalar is a baseline for the whole objective, and none of its per-element
    readings is safe. Measured on a 30-element plate of Bernoulli assignments with data of
    scales 0.1 to 30 (an ELBO-like sum, `tests/adev/test_estimator_soundness.py`; total
    gradient variance, and the largest per-element ratio to no baseline): no baseline
    98k; `b_i = b / n` 80k, but one element's variance 1500x larger (with a plain term of
    -2000 in `y`: 112k, 8500x); the other elements' mean `b_i = mean_{j≠i} g_j` 86k,
    1650x; `b` on the whole objective 428k; per-element `b_i = E[g_i]` 0.77k. Ignoring `b`
    is no safe reading either: with one element far out (`x = 40` among `N(0, 1)` data)
    no baseline gave 161k against 11.5k for `b` on the whole objective. Pass a
    per-element baseline `(n,)`, no baseline, or `rao_blackwellise=False` to use the
    scalar on the whole objective.

    Reference: Williams 1992; Mohamed et al. 2020, section 4; Mnih & Gregor 2014 (NVIL).
    """

    pathwise: ClassVar[bool] = False
    score_function: ClassVar[bool] = True
    baseline: Any = None
    rao_blackwellise: bool = eqx.field(static=True, default=True)

    def check(self, distribution, site):
        check_score_function(distribution, site, "px.reinforce")
        b = self._baseline_value()
        if b is None or jnp.shape(b) == ():
            return
        batch = tuple(distribution.batch_shape)
        if batch and tuple(jnp.shape(b)) == batch[:1]:
            return
        per_element = (f" or a per-element array of shape {batch[:1]} (one value per "
                       "element of the site's leading batch axis)" if batch else "")
        raise UnsupportedEstimatorError(
            f"{site}: a Reinforce baseline must be a scalar{per_element}, got shape "
            f"{jnp.shape(b)}."
        )

    def _baseline_value(self):
        if isinstance(self.baseline, RunningAverage):
            return self.baseline.value
        return self.baseline

    def local(self, key, distribution, surrogate):
        x = sg(distribution.sample(key))
        if not surrogate:
            return x, None, None
        law = _law(distribution, "")
        b = self._baseline_value()
        if b is None or jnp.ndim(b) == 0:
            score = _score(law, x)
            return x, score, (None if b is None else sg(jnp.asarray(b)) * score)
        n = jnp.shape(b)[0]  # per-element baselines: Σ_i b_i · (log q_i - sg)
        log_q = _element_log_density(law, x[None], n)[0]
        scores = log_q - sg(log_q)
        return x, jnp.sum(scores), jnp.sum(sg(jnp.asarray(b)).astype(scores.dtype) * scores)


def _scalar_support(distribution: dist.Distribution, site: str) -> Array:
    """The support of one scalar entry of a finite-support site, shape `(K,)`."""
    base = _univariate_base(distribution)
    if not base.has_enumerate_support:
        raise UnsupportedEstimatorError(
            f"{site}: enum needs finite support, and {_name(distribution)} has no "
            "enumerate_support. Use px.reinforce, px.reparam or px.mvd."
        )
    if base.event_shape != ():
        raise UnsupportedEstimatorError(
            f"{site}: enumerating a batch of {_name(base)} (event shape "
            f"{base.event_shape}) is supported only entry by entry, for scalar events. "
            "Use an unbatched site per element, px.mvd or px.reinforce."
        )
    # supports that do not depend on the parameters' values, as constants
    if isinstance(base, (dist.BernoulliProbs, dist.BernoulliLogits)):
        return np.arange(2)
    if isinstance(base, dist.CategoricalLogits):
        return np.arange(jnp.shape(base.logits)[-1])
    if isinstance(base, dist.CategoricalProbs):
        return np.arange(jnp.shape(base.probs)[-1])
    return base.enumerate_support(expand=False).reshape(-1)


def _joint_values(support: Array, shape: tuple[int, ...], site: str, what: str) -> Array:
    """All joint values of `prod(shape)` entries with the given support, `(V,) + shape`."""
    n = math.prod(shape)
    size = support.shape[0] ** n
    if size > MAX_ENUMERATION_SIZE:
        raise UnsupportedEstimatorError(
            f"{site}: enumerating {what} means {n} entries with {support.shape[0]} values "
            f"each, {support.shape[0]}^{n} joint values (limit {MAX_ENUMERATION_SIZE}). "
            "Use px.mvd or "
            "px.reinforce, or split the site."
        )
    combos = np.array(list(itertools.product(range(support.shape[0]), repeat=n)), np.int32)
    combos = combos.reshape((size,) + tuple(shape))
    if not isinstance(support, jax.core.Tracer):  # a constant support: no gather to trace
        return np.asarray(support)[combos]
    return support[combos]


def _support_values(distribution: dist.Distribution, site: str, dtype) -> Array:
    """All joint values of a finite-support site, shape `(S,) + distribution.shape()`."""
    wrapped = isinstance(distribution, (dist.Independent, dist.ExpandedDistribution))
    if math.prod(distribution.batch_shape) == 1 and not wrapped:
        return distribution.enumerate_support(expand=True).astype(dtype)
    support = _scalar_support(distribution, site)
    return _joint_values(support, distribution.shape(), site, "the site jointly").astype(dtype)


def _element_values(distribution: dist.Distribution, site: str, dtype) -> Array:
    """Joint values of one element along batch axis 0, shape `(V,) + shape[1:]`.

    A constant where the support does not depend on traced values (Bernoulli, Categorical):
    computed at trace time, so the compiled program holds the values, not their recipe.
    """
    with jax.ensure_compile_time_eval():
        support = _scalar_support(distribution, site)
        shape = distribution.shape()[1:]
        return _joint_values(support, shape, site, "one element of batch axis 0").astype(dtype)


def _factorisable(distribution: dist.Distribution) -> bool:
    batch = distribution.batch_shape
    return len(batch) > 0 and batch[0] > 1


def _weighted_sum(weights: Array, values: Array, axes: int) -> Array:
    """`Σ w · v` over the leading `axes` axes, with `0 · (±inf or nan)` counted as 0.

    An alternative whose weight is 0 adds 0 to the value but `ẇ · v` to the tangent: the
    derivative of `Σ_s p_s f(s)` in a probability that is currently 0 is `f(s)`, not 0.
    Where such a `v` is not finite (the derivative is infinite) it adds nothing.
    """
    w = weights.reshape(weights.shape + (1,) * (values.ndim - axes)).astype(values.dtype)
    positive = w > 0
    safe = jnp.where(positive | jnp.isfinite(values), values, 0)
    # at a zero weight only `ẇ · v` (the value's own tangent, times 0, is left out: it may
    # be infinite there, as before)
    return jnp.sum(jnp.where(positive, w * safe, w * sg(safe)), axis=tuple(range(axes)))


def _element_log_density(law, values, n):
    """Per-element log densities `(A, n)` of alternatives `(A,) + shape` (no clamps)."""
    log_q = jax.vmap(lambda v: log_density(law, v))(values)  # (A,) + batch_shape
    if log_q.shape[1:] == (n,):
        return log_q
    return log_q.reshape(log_q.shape[:1] + (n, -1)).sum(-1)


def _broadcasts_values(law) -> bool:
    """Whether `_laws.mass` of this law reads leading value axes as sample axes: the
    laws it computes from the parameters (Bernoulli, Categorical), possibly expanded,
    made independent or masked (their `_laws` rules broadcast the value)."""
    while isinstance(law, (dist.ExpandedDistribution, dist.Independent,
                           dist.MaskedDistribution)):
        law = law.base_dist
    return isinstance(law, (dist.BernoulliProbs, dist.BernoulliLogits,
                            dist.CategoricalProbs, dist.CategoricalLogits))


def _element_mass(law, values, n):
    """Per-element probabilities `(A, n)` of alternatives `(A,) + shape` (`_laws.mass`)."""
    if _broadcasts_values(law):  # `mass` takes the leading axis as a sample axis
        q = mass(law, values)
    else:
        q = jax.vmap(lambda v: mass(law, v))(values)  # (A,) + batch_shape
    if q.shape[1:] == (n,):
        return q
    return q.reshape(q.shape[:1] + (n, -1)).prod(-1)


class Enum(AbstractContinuationEstimator):
    """Exact enumeration over a finite support: `Σ_s p_s(φ) k(s)`, as a dual number.

    Supports every numpyro distribution with `has_enumerate_support` (Bernoulli,
    Categorical, Binomial, DiscreteUniform, ...), also expanded, wrapped by `to_event`, or
    masked (the weights are the sampling law's, `_laws.py`). The rest of the program is
    evaluated once per value, vectorised with `vmap`, with the same randomness for every
    value (common random numbers, which keeps it unbiased). The weights are computed from
    the parameters without numpyro's probability clamps (`_laws.mass`), so the gradient is
    exact also near probability 1 and at probabilities that are 0 (`dE/dp_s = f(s)`).

    A site with a batch axis (a numpyro plate, `.expand`) is enumerated *per element* of
    its leading batch axis when the rest of the program is a sum of per-element terms (an
    ELBO over the plate's data points is): then `K` evaluations cover all `n` elements
    (`K` values per element, jointly over the element's other axes, at most
    `MAX_ENUMERATION_SIZE`). Otherwise the site is enumerated jointly, which is refused
    beyond `MAX_ENUMERATION_SIZE` joint values with an error naming the site and the
    operation that combines its elements. Both are exact. A continuation estimator:
    refused inside loop bodies.
    """

    pathwise: ClassVar[bool] = False
    score_function: ClassVar[bool] = False

    def check(self, distribution, site):
        law = _law(distribution, site)
        if not law.has_enumerate_support:
            raise UnsupportedEstimatorError(
                f"{site}: enum needs finite support, and {_name(distribution)} has no "
                "enumerate_support. Use px.reinforce, px.reparam or px.mvd."
            )
        if _factorisable(law):
            _element_values(law, site, jnp.int32)
        else:
            _support_values(law, site, jnp.int32)

    def run(self, key, distribution, k, surrogate, dtype, site):
        law = _law(distribution, site)
        values = _support_values(law, site, dtype)
        size = values.shape[0]
        weights = jax.vmap(lambda v: mass(law, v))(values).reshape(size, -1).prod(-1)
        outs, invalid = jax.vmap(k)(values)
        return [_weighted_sum(weights, out, 1) for out in outs], first_invalid(invalid)


def _univariate_base(distribution: dist.Distribution) -> dist.Distribution:
    base = distribution
    while isinstance(base, (dist.ExpandedDistribution, dist.Independent)):
        base = base.base_dist
    return base


_MVD_FAMILIES = (
    dist.Normal,
    dist.BernoulliProbs,
    dist.BernoulliLogits,
    dist.CategoricalProbs,
    dist.CategoricalLogits,
    dist.Poisson,
)


class _MVDTerm(NamedTuple):
    """One parameter's weak derivative: `∂φ_m p = c_m (p⁺_m - p⁻_m)` for entries `m`."""

    param: Array  # (M,), differentiable
    weight: Array  # (M,) the constants c_m
    element: np.ndarray  # (M,) flat index of the element changed
    plus: Array  # (M,) value of that element under p⁺
    minus: Array | None  # (M,) value under p⁻, or None when p⁻ is the site's own law


def _mvd_terms(base, shape, x_flat, key) -> list[_MVDTerm]:
    n = x_flat.shape[0]
    elements = np.arange(n)
    if isinstance(base, dist.Normal):
        loc = jnp.broadcast_to(base.loc, shape).reshape(n)
        scale = jnp.broadcast_to(base.scale, shape).reshape(n)
        k1, k2, k3 = jax.random.split(key, 3)
        # Positive/negative parts of ∂μ N are μ ± σ·Rayleigh(1); ∂σ N = (Maxwell - N)/σ.
        rayleigh = jnp.sqrt(-2.0 * jnp.log(jax.random.uniform(k1, (n,), minval=1e-12)))
        maxwell = jnp.linalg.norm(jax.random.normal(k2, (n, 3)), axis=-1)
        maxwell = maxwell * jax.random.rademacher(k3, (n,), dtype=maxwell.dtype)
        c_loc = 1.0 / (sg(scale) * math.sqrt(2.0 * math.pi))
        return [
            _MVDTerm(loc, c_loc, elements, sg(loc + scale * rayleigh), sg(loc - scale * rayleigh)),
            _MVDTerm(scale, 1.0 / sg(scale), elements, sg(loc + scale * maxwell), None),
        ]
    if isinstance(base, (dist.BernoulliProbs, dist.BernoulliLogits)):
        probs = jnp.broadcast_to(base.probs, shape).reshape(n)
        one = jnp.ones((n,), x_flat.dtype)
        return [_MVDTerm(probs, jnp.ones_like(probs), elements, one, jnp.zeros_like(one))]
    if isinstance(base, (dist.CategoricalProbs, dist.CategoricalLogits)):
        num = base.probs.shape[-1]
        probs = jnp.broadcast_to(base.probs, shape + (num,)).reshape(n * num)
        plus = jnp.tile(jnp.arange(num, dtype=x_flat.dtype), n)
        # Σ_j ṗ_j = 0, so Σ_j ṗ_j (k(j) - k(x)) = Σ_j ṗ_j k(j): p⁻ is the site's own law.
        return [_MVDTerm(probs, jnp.ones_like(probs), np.repeat(elements, num), plus, None)]
    if isinstance(base, dist.Poisson):
        rate = jnp.broadcast_to(base.rate, shape).reshape(n)
        # ∂λ Pois(k; λ) = Pois(k - 1; λ) - Pois(k; λ): p⁺ is the site's law shifted by one.
        return [_MVDTerm(rate, jnp.ones_like(rate), elements, x_flat + 1, None)]
    raise AssertionError(type(base))


class MVD(AbstractContinuationEstimator):
    """Measure-valued derivative: `∂φ p = c(φ)(p⁺ - p⁻)`, with coupled positive/negative draws.

    Tangent: `Σ_m φ̇_m c_m (k(x⁺_m) - k(x⁻_m))` plus the tangent of `k(x)` itself, where
    `x⁺_m` (`x⁻_m`) replaces the element of `x` that parameter entry `m` controls by a draw
    from `p⁺` (`p⁻`). Supported: Normal (loc: `μ ± σ·Rayleigh`; scale:
    double-sided Maxwell against the Normal itself), Bernoulli (`δ₁ - δ₀`), Categorical
    (`δ_j`, using `Σ_j ṗ_j = 0`) and Poisson (shift by one), also batch-shaped, expanded
    or wrapped by `to_event`, or masked (the perturbations are the sampling law's:
    `_laws.py`). The rest of the program runs once more per parameter entry
    (vectorised), with the same downstream randomness; for a batch-shaped site whose
    elements' terms are added up by the rest of the program, all elements are perturbed in
    the same evaluation (a handful of evaluations however many elements). In value mode it
    costs one evaluation. A continuation estimator: refused inside loop bodies.

    Reference: Mohamed, Rosca, Figurnov & Mnih 2020, "Monte Carlo gradient estimation in
    machine learning", section 6 and table 1; Pflug 1989.
    """

    pathwise: ClassVar[bool] = False
    score_function: ClassVar[bool] = False

    def check(self, distribution, site):
        base = _univariate_base(_law(distribution, site))
        if not isinstance(base, _MVD_FAMILIES) or base.event_shape != ():
            raise UnsupportedEstimatorError(
                f"{site}: mvd supports Normal, Bernoulli, Categorical and Poisson (possibly "
                f"expanded or to_event), not {_name(distribution)}. Use px.reinforce, "
                "px.reparam or px.enum."
            )

    def run(self, key, distribution, k, surrogate, dtype, site):
        key_x, key_mvd = jax.random.split(key)
        x = sg(distribution.sample(key_x)).astype(dtype)
        outs, invalid = k(x)
        if not surrogate:
            return outs, invalid
        shape = distribution.shape()
        x_flat = x.reshape(-1)
        terms = _mvd_terms(_univariate_base(_law(distribution, site)), shape, x_flat, key_mvd)
        alternatives = []
        for term in terms:
            alternatives.append(x_flat[None, :].repeat(term.element.size, 0)
                                .at[np.arange(term.element.size), term.element]
                                .set(term.plus.astype(dtype)))
            if term.minus is not None:
                alternatives.append(x_flat[None, :].repeat(term.element.size, 0)
                                    .at[np.arange(term.element.size), term.element]
                                    .set(term.minus.astype(dtype)))
        stacked = jnp.concatenate(alternatives, 0).reshape((-1,) + shape)
        alt_outs, alt_invalid = jax.vmap(k)(stacked)
        result = []
        for out, alt in zip(outs, alt_outs):
            alt = sg(alt)
            correction = jnp.zeros_like(out)
            offset = 0
            for term in terms:
                m = term.element.size
                diff = alt[offset : offset + m] - (
                    alt[offset + m : offset + 2 * m] if term.minus is not None else sg(out)[None]
                )
                offset += 2 * m if term.minus is not None else m
                coeff = (term.param - sg(term.param)) * sg(term.weight)
                coeff = coeff.reshape((m,) + (1,) * out.ndim).astype(out.dtype)
                correction = correction + jnp.sum(coeff * diff, axis=0)
            result.append(out + correction)
        return result, jnp.maximum(invalid, first_invalid(alt_invalid))


def mvd_alternatives(x, terms, shape, dtype):
    """`x` and its perturbations with entry `j` changed in *every* element: `(A,) + shape`.

    Returns the stacked alternatives and, per term, `(element of each entry, (rows of the
    plus values, rows of the minus values or None))`; None when a term's entries are not
    laid out element by element.
    """
    n = shape[0]
    m = math.prod(shape[1:])
    x_flat = x.reshape(-1)
    alternatives, layout = [x_flat[None]], []
    offset = 1
    for term in terms:
        per_entry = term.element.size // (n * m)
        element = np.asarray(term.element)
        if not np.array_equal(element, np.repeat(np.arange(n * m), per_entry)):
            return None
        rank = np.arange(element.size) % per_entry
        slot = (element % m) * per_entry + rank  # which alternative changes this entry
        num_slots = m * per_entry
        rows = []
        for values in (term.plus, term.minus):
            if values is None:
                rows.append(None)
                continue
            alt = jnp.tile(x_flat, (num_slots, 1)).at[slot, element].set(values.astype(dtype))
            alternatives.append(alt)
            rows.append(offset + slot)
            offset += num_slots
        layout.append((element // m, rows))
    return jnp.concatenate(alternatives, 0).reshape((-1,) + shape), layout


class LeaveOneOut(AbstractContinuationEstimator):
    """`num_samples` iid draws, each scored against the mean of the others (VIMCO-style).

    Value: `(1/n) Σ_i k(x_i)`. Tangent: `(1/n) Σ_i [k̇(x_i) + (k(x_i) - b_i) · d log p(x_i)]`
    with `b_i = mean_{j≠i} k(x_j)`. Unbiased because `b_i` does not depend on `x_i`. The rest
    of the program runs once per draw (vectorised) with shared downstream randomness.
    Scores use the sampling law without clamps, and the same refusals as `Reinforce`
    apply (moving supports, point masses inside a tree). A continuation estimator:
    refused inside loop bodies.

    Reference: Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline for
    free!"; Mnih & Rezende 2016 (VIMCO).
    """

    pathwise: ClassVar[bool] = False
    score_function: ClassVar[bool] = True
    num_samples: int = eqx.field(static=True, default=4)

    def check(self, distribution, site):
        check_score_function(distribution, site, "px.LeaveOneOut")
        if not isinstance(self.num_samples, int) or self.num_samples < 2:
            raise UnsupportedEstimatorError(
                f"{site}: LeaveOneOut needs num_samples >= 2, got {self.num_samples!r}."
            )

    def run(self, key, distribution, k, surrogate, dtype, site):
        n = self.num_samples
        xs = sg(distribution.sample(key, (n,))).astype(dtype)
        outs, invalid = jax.vmap(k)(xs)
        invalid = first_invalid(invalid)
        if not surrogate:
            return [jnp.mean(out, axis=0) for out in outs], invalid
        law = _law(distribution, site)
        log_p = jax.vmap(lambda x: log_density(law, x))(xs).reshape(n, -1).sum(-1)
        score = log_p - sg(log_p)
        result = []
        for out in outs:
            y = sg(out)
            baseline = (jnp.sum(y, axis=0, keepdims=True) - y) / (n - 1)
            s = score.reshape((n,) + (1,) * (out.ndim - 1)).astype(out.dtype)
            result.append(jnp.mean(out + (y - baseline) * s, axis=0))
        return result, invalid


reparam = Reparam()
reinforce = Reinforce()
enum = Enum()
mvd = MVD()


def check_score_function(distribution: dist.Distribution, site: str, estimator: str) -> None:
    """Refuse a score-function estimator where its gradient would be silently biased.

    The score function `f(x) ∇log q(x)` differentiates the density of the sampling law
    at a fixed `x`. It is refused (naming `site` and the way out) when the sampling law
    cannot be rebuilt (a mask inside an unknown composite), when the tree holds a point
    mass (`Delta`) it cannot score (`_laws.point_mass_inside`), and when the support may
    move with the parameters (`_laws.moving_support`: a traced bound anywhere in the tree,
    or a transform with traced parameters applied to a set it does not map onto a fixed
    set), where the gradient also has a boundary term that the score misses.
    """
    law = _law(distribution, site)
    reason = point_mass_inside(law)
    if reason is not None:
        raise UnsupportedEstimatorError(
            f"{site}: {estimator} cannot be used here: {reason}. Write the mixture "
            "explicitly: draw the component index at its own site (e.g. "
            "px.sample(dist.Categorical(probs=w), px.enum)), then the chosen component at "
            "a second site (a Delta there is a point mass, passed through pathwise)."
        )
    reason = moving_support(law)
    if reason is not None:
        alternative = ("px.reparam (the default for this distribution)"
                       if reparameterisable(distribution) else "a reparameterisable family")
        raise UnsupportedEstimatorError(
            f"{site}: {estimator} is biased when the support moves with the parameters "
            f"(its gradient misses the boundary term), and here {reason}. Use "
            f"{alternative}; or, if the bound does not depend on anything differentiated, "
            "close over it as a constant."
        )


#: Former name of `check_score_function`.
check_fixed_support = check_score_function


def default_estimator(distribution: dist.Distribution) -> AbstractEstimator:
    """Reparameterisation when the distribution is reparameterisable, score function otherwise."""
    return reparam if reparameterisable(distribution) else reinforce


def reparameterisable(distribution: dist.Distribution) -> bool:
    """Whether draws are differentiable in the parameters (numpyro's `has_rsample`, checked).

    numpyro's `has_rsample` compares `reparametrized_params` with `arg_constraints`, which is
    vacuously true for a user-defined distribution that declares neither; such a class only
    counts as reparameterisable if it overrides `rsample` or `has_rsample` itself.
    """
    base = getattr(distribution, "base_dist", None)
    if isinstance(base, dist.Distribution):  # Expanded, Independent, Masked, Transformed
        return bool(distribution.has_rsample) and reparameterisable(base)
    if not distribution.has_rsample:
        return False
    cls = type(distribution)
    return bool(distribution.reparametrized_params) or (
        cls.rsample is not dist.Distribution.rsample
        or cls.has_rsample is not dist.Distribution.has_rsample
    )
