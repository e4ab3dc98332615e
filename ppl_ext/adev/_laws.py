"""Sampling laws of sample sites: what the gradient estimators score, enumerate and perturb.

A site's value is drawn by `distribution.sample`; its gradient estimators must use the law
of that draw. Four rules make sure they do, all decided at trace time (Python walks over
the distribution object, nothing added to the compiled program):

1. **The sampling law** (`sampling_law`). `MaskedDistribution` (`d.mask(m)`,
   `numpyro.handlers.mask`) and the censored distributions draw from their base law but
   define `log_prob` differently (0 where masked; `log F` where censored). The random
   choice's law is the base law, so scores, enumeration weights, MVD perturbations and
   leave-one-out scores use it: masks and censoring are stripped, and the wrappers around
   them (`Independent`, `ExpandedDistribution`, `TransformedDistribution`, mixtures)
   are rebuilt around the unmasked base. A mask inside any other composite is refused
   (`LawError`). A program's own use of `log_prob` (an ELBO's guide term) is untouched.

2. **Exact probabilities** (`mass`, `log_density`). numpyro clamps probabilities in
   `BernoulliProbs`/`BinomialProbs.log_prob` (`clamp_probs`, to `[tiny, 1 - eps]`) and
   maps zero `Categorical` probabilities to a `log` of `-inf` through a `where`; the
   derivative of a clamp is 0, so `exp(log_prob)` has a zero gradient at probabilities
   near 1 (`1 - 2^-24` in float32) and at zero entries, where `E = Σ_s p_s f(s)` has
   `dE/dp_s = f(s)`. `mass` computes enumeration weights from the parameters (Bernoulli,
   Binomial and Categorical with probs or logits, `ZeroInflated*` over them; Binomial
   probabilities through a custom JVP, `d/dp B(k; n, p) = n (B(k-1; n-1, p) - B(k; n-1, p))`,
   exact at `p = 0` and `p = 1` too); `log_density` computes the scores of the same
   families without clamps. Other families use numpyro's `log_prob` (checked to have no
   clamp: `DiscreteUniform`, `BetaBinomial`, `Categorical`'s score, continuous families).

3. **Fixed supports** (`moving_support`). A score function `f(x) ∇ log q(x)`
   differentiates the density at a fixed `x`; when the support moves with the
   parameters the gradient has a boundary term that it misses. The rule walks the whole
   distribution tree (every attribute that is a `Distribution` or a list of them, and the
   transforms of a `TransformedDistribution`, `ComposeTransform` and
   `IndependentTransform` parts included). A support moves if any node's support
   constraint has a bound that is a traced floating value, or if a transform whose
   parameters are traced is applied to a set that it is not known to map onto a fixed
   set. Known (whitelisted) cases: `AffineTransform`, `LowerCholeskyAffine` and
   `RecursiveLinearTransform` map the whole real line (space) onto itself whatever their
   parameters; an `AffineTransform` with a constant zero `loc` and a `PowerTransform` map
   the positive half-line onto a fixed half-line. A transform without traced parameters
   maps a fixed set onto a fixed set. Everything else with traced parameters on a bounded
   set (an interval, a half-line, a discrete set, a set it cannot identify) counts as
   moving. A discrete distribution's own support never counts (integer bounds are not
   differentiated); a distribution that declares no support is trusted.

4. **Point masses inside a tree** (`point_mass_inside`). A `Delta` below a mixture (or
   any other composite) has no score for its location, and numpyro's mixture `log_prob`
   adds its probability to the other components' densities. Score-function estimators
   refuse a tree with a `Delta` whose location (or weight) is traced or that sits under a
   transform with traced parameters (the atom moves), and one where a `Delta` is mixed
   with a component that has a density. Point masses at constant locations mixed only
   with each other or with discrete components are a discrete law and are accepted. (A
   `Delta` site, possibly wrapped, is a point mass that `px.sample` passes through
   pathwise.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import gammaln, xlog1py, xlogy
from numpyro.distributions import constraints
from numpyro.distributions import transforms as T

_CENSORED = tuple(
    getattr(dist, name)
    for name in ("LeftCensoredDistribution", "RightCensoredDistribution",
                 "IntervalCensoredDistribution")
    if hasattr(dist, name)
)
#: Wrappers whose `sample` draws from their base law but whose `log_prob` is something else.
_LAW_WRAPPERS = (dist.MaskedDistribution,) + _CENSORED


class LawError(Exception):
    """The sampling law of a site cannot be rebuilt (a mask inside an unknown composite)."""


# ---------------------------------------------------------------------------- tree walks


def children(distribution: dist.Distribution) -> Iterator[tuple[str, dist.Distribution]]:
    """`(attribute, child)` for every attribute that is a Distribution or a list of them."""
    for name, value in vars(distribution).items():
        if isinstance(value, dist.Distribution):
            yield name, value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, dist.Distribution):
                    yield f"{name}[{i}]", item


def _nodes(distribution: dist.Distribution) -> Iterator[dist.Distribution]:
    yield distribution
    for _, child in children(distribution):
        yield from _nodes(child)


def _is_traced_float(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer) and jnp.issubdtype(x.dtype, jnp.inexact)


def traced_value(obj: Any, _seen: set | None = None) -> bool:
    """Whether `obj` (an array, constraint, transform, or a list/dict of them) holds a traced
    floating value: one computed from the program's inputs."""
    if _is_traced_float(obj):
        return True
    if isinstance(obj, (str, bytes, int, float, bool, type(None), np.ndarray, jax.Array)):
        return False
    _seen = set() if _seen is None else _seen
    if id(obj) in _seen:
        return False
    _seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        return any(traced_value(item, _seen) for item in obj)
    if isinstance(obj, dict):
        return any(traced_value(item, _seen) for item in obj.values())
    if isinstance(obj, (T.Transform, constraints.Constraint)):
        return any(traced_value(item, _seen) for item in vars(obj).values())
    return False


# -------------------------------------------------------------------------- sampling law


def sampling_law(distribution: dist.Distribution, site: str = "") -> dist.Distribution:
    """The law that `distribution.sample` draws from, as a distribution to score with.

    The distribution itself unless masks or censoring sit in it (see the module
    docstring, rule 1); then a copy without them. Raises `LawError` for a mask inside a
    composite that it cannot rebuild.
    """
    if not any(isinstance(node, _LAW_WRAPPERS) for node in _nodes(distribution)):
        return distribution
    return _strip(distribution, site)


def _strip(d: dist.Distribution, site: str) -> dist.Distribution:
    if isinstance(d, dist.MaskedDistribution):
        return _strip(d.base_dist, site)
    if isinstance(d, _CENSORED):  # sample: base_dist.expand(batch_shape).sample
        return _strip(d.base_dist, site).expand(d.batch_shape)
    if not any(isinstance(node, _LAW_WRAPPERS) for node in _nodes(d)):
        return d
    if isinstance(d, dist.Independent):
        return dist.Independent(_strip(d.base_dist, site), d.reinterpreted_batch_ndims,
                                validate_args=d._validate_args)
    if isinstance(d, dist.ExpandedDistribution):
        return _strip(d.base_dist, site).expand(d.batch_shape)
    if isinstance(d, dist.TransformedDistribution):
        return dist.TransformedDistribution(_strip(d.base_dist, site), list(d.transforms),
                                            validate_args=d._validate_args)
    if isinstance(d, dist.MixtureSameFamily):
        return dist.MixtureSameFamily(_strip(d.mixing_distribution, site),
                                      _strip(d.component_distribution, site),
                                      validate_args=d._validate_args)
    if isinstance(d, dist.MixtureGeneral):
        return dist.MixtureGeneral(_strip(d.mixing_distribution, site),
                                   [_strip(c, site) for c in d._component_distributions],
                                   support=d._support, validate_args=d._validate_args)
    raise LawError(
        f"{site}: a masked or censored distribution sits inside {type(d).__name__}, whose "
        "draws then come from the unmasked law while its log_prob uses the masked one; "
        "ppl_ext cannot rebuild its sampling law. Mask the whole site instead "
        "(numpyro.handlers.mask or d.mask(m) on the outermost distribution)."
    )


# ------------------------------------------------------------------ exact probabilities


def _univariate(law: dist.Distribution) -> dist.Distribution:
    while isinstance(law, (dist.Independent, dist.ExpandedDistribution)):
        law = law.base_dist
    return law


_EXACT = (dist.BernoulliProbs, dist.BernoulliLogits, dist.BinomialProbs,
          dist.BinomialLogits, dist.CategoricalProbs, dist.CategoricalLogits,
          dist.ZeroInflatedProbs)


def _wrapped(law, value, leaf_fn, reduce):
    """Apply `leaf_fn` at the univariate base and undo `Independent`/`Expanded` around it."""
    if isinstance(law, dist.Independent):
        out = _wrapped(law.base_dist, value, leaf_fn, reduce)
        axes = tuple(range(-law.reinterpreted_batch_ndims, 0))
        return reduce(out, axes) if axes else out
    if isinstance(law, dist.ExpandedDistribution):
        out = _wrapped(law.base_dist, value, leaf_fn, reduce)
        shape = lax.broadcast_shapes(
            tuple(law.batch_shape), jnp.shape(value)[: max(jnp.ndim(value) - law.event_dim, 0)])
        return jnp.broadcast_to(out, shape)
    return leaf_fn(law, value)


def log_density(law: dist.Distribution, value) -> jax.Array:
    """`law.log_prob(value)` without numpyro's probability clamps (for scores)."""
    if not isinstance(_univariate(law), _EXACT):
        return law.log_prob(value)
    return _wrapped(law, value, _leaf_log_density, jnp.sum)


def mass(law: dist.Distribution, value) -> jax.Array:
    """The probability of `value` under a finite-support law, shaped like its `log_prob`,
    computed from the parameters (no clamps; the weights of an enumeration)."""
    return _wrapped(law, value, _leaf_mass, jnp.prod)


def _float(x, like):
    return jnp.asarray(x, jnp.result_type(like, float))


def _count_log(count, log_p):
    """`count · log_p`, 0 where `count` is 0 (also where `log_p` is -inf)."""
    return jnp.where(count > 0, count * jnp.where(count > 0, log_p, 0.0), 0.0)


def _leaf_log_density(law, value):
    if isinstance(law, dist.BernoulliProbs):
        p = _float(law.probs, 0.0)
        one = jnp.asarray(value) == 1
        p1 = jnp.where(one, p, 0.5)
        p0 = jnp.where(one, 0.5, p)
        return jnp.where(one, jnp.log(p1), jnp.log1p(-p0))
    if isinstance(law, dist.BernoulliLogits):
        logits = _float(law.logits, 0.0)
        one = jnp.asarray(value) == 1
        return jnp.where(one, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
    if isinstance(law, (dist.BinomialProbs, dist.BinomialLogits)):
        n = _float(law.total_count, 0.0)
        k = _float(value, n)
        log_c = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
        if isinstance(law, dist.BinomialProbs):
            p = _float(law.probs, n)
            log_p = jnp.log(jnp.where(k > 0, p, 1.0))
            log_q = jnp.log1p(-jnp.where(n - k > 0, p, 0.0))
        else:
            logits = _float(law.logits, n)
            log_p, log_q = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
        return log_c + _count_log(k, log_p) + _count_log(n - k, log_q)
    if isinstance(law, dist.ZeroInflatedProbs):  # ZeroInflatedLogits sets `gate` too
        base = _wrapped(law.base_dist, value, _leaf_log_density, jnp.sum)
        zero = jnp.asarray(value) == 0
        gate = jnp.broadcast_to(law.gate, jnp.shape(base))
        g_zero, g_other = jnp.where(zero, gate, 0.5), jnp.where(zero, 0.5, gate)
        return jnp.where(zero, jnp.log(g_zero + (1.0 - g_zero) * jnp.exp(base)),
                         jnp.log1p(-g_other) + base)
    return law.log_prob(value)


def _take(probs, value):
    """`probs[..., value]` broadcast over the batch shapes of both."""
    batch = lax.broadcast_shapes(jnp.shape(value), jnp.shape(probs)[:-1])
    probs = jnp.broadcast_to(probs, batch + jnp.shape(probs)[-1:])
    index = jnp.broadcast_to(jnp.asarray(value), batch).astype(jnp.int32)[..., None]
    return jnp.take_along_axis(probs, index, axis=-1)[..., 0]


def _leaf_mass(law, value):
    if isinstance(law, dist.MaskedDistribution):
        return _wrapped(law.base_dist, value, _leaf_mass, jnp.prod)
    if isinstance(law, dist.BernoulliProbs):
        p = _float(law.probs, 0.0)
        return jnp.where(jnp.asarray(value) == 1, p, 1.0 - p)
    if isinstance(law, dist.BernoulliLogits):
        logits = _float(law.logits, 0.0)
        return jnp.where(jnp.asarray(value) == 1, jax.nn.sigmoid(logits),
                         jax.nn.sigmoid(-logits))
    if isinstance(law, dist.BinomialProbs):
        p = _float(law.probs, 0.0)
        return binomial_pmf(_float(value, p), _float(law.total_count, p), p)
    if isinstance(law, dist.BinomialLogits):
        return jnp.exp(_leaf_log_density(law, value))
    if isinstance(law, dist.CategoricalProbs):
        return _take(law.probs, value)
    if isinstance(law, dist.CategoricalLogits):
        return _take(jax.nn.softmax(law.logits, axis=-1), value)
    if isinstance(law, dist.ZeroInflatedProbs):  # ZeroInflatedLogits sets `gate` too
        gate = law.gate
        base = _wrapped(law.base_dist, value, _leaf_mass, jnp.prod)
        return (1.0 - gate) * base + gate * (jnp.asarray(value) == 0)
    return jnp.exp(law.log_prob(value))


def _bernstein(k, n, p):
    """`C(n, k) p^k (1 - p)^(n - k)`, 0 outside `0 <= k <= n`, exact at `p` in {0, 1}."""
    inside = (k >= 0) & (k <= n)
    k = jnp.where(inside, k, 0.0)
    m = jnp.where(inside, n, 0.0)
    log_c = gammaln(m + 1) - gammaln(k + 1) - gammaln(m - k + 1)
    return jnp.where(inside, jnp.exp(log_c + xlogy(k, p) + xlog1py(m - k, -p)), 0.0)


@jax.custom_jvp
def binomial_pmf(k, n, p):
    """The Binomial(n, p) probability of `k`, with the exact derivative in `p` everywhere
    (`n (B(k-1; n-1, p) - B(k; n-1, p))`, also at `p = 0` and `p = 1`)."""
    return _bernstein(k, n, p)


@binomial_pmf.defjvp
def _binomial_pmf_jvp(primals, tangents):
    k, n, p = primals
    value = _bernstein(k, n, p)
    slope = n * (_bernstein(k - 1.0, n - 1.0, p) - _bernstein(k, n - 1.0, p))
    return value, slope * tangents[2]


# ------------------------------------------------------------------------ fixed supports


class _Set(NamedTuple):
    """A support that does not move: `constraint` (independent() stripped) when known, else
    None (fixed, but not identified)."""

    constraint: Any


def _strip_independent(constraint):
    while isinstance(constraint, constraints._IndependentConstraint):
        constraint = constraint.base_constraint
    return constraint


def _same_set(a, b) -> bool:
    if a is None or b is None:
        return False
    a, b = _strip_independent(a), _strip_independent(b)
    return a is b or (type(a) is type(b) and isinstance(a, constraints.ParameterFreeConstraint))


def _concrete_zero(x) -> bool:
    return not isinstance(x, jax.core.Tracer) and bool(np.all(np.asarray(x) == 0))


def _half_line(constraint) -> bool:
    """Whether the set is `(0, inf)` or `[0, inf)` with a constant bound."""
    c = _strip_independent(constraint) if constraint is not None else None
    return isinstance(c, constraints._GreaterThan) and _concrete_zero(c.lower_bound)


_BOUND_NAMES = ("lower_bound", "upper_bound")


def _own_support(d: dist.Distribution):
    """`(constraint or None, traced bound name or None)` of the node `d`."""
    try:
        support = d.support
    except Exception:  # noqa: BLE001 - a support that cannot be built here: unknown
        return None, None
    if support is None or not isinstance(support, constraints.Constraint):
        return None, None
    base = _strip_independent(support)
    for attr in _BOUND_NAMES:
        if _is_traced_float(getattr(base, attr, None)):
            return base, attr
    if traced_value(base):
        return base, "bounds"
    return base, None


def _through(transform, current: _Set, owner: str):
    """The image of the set `current` under `transform`: `_Set` or a reason it moves."""
    if isinstance(transform, T.ComposeTransform):
        for part in transform.parts:
            current = _through(part, current, owner)
            if isinstance(current, str):
                return current
        return current
    if isinstance(transform, T.IndependentTransform):
        return _through(transform.base_transform, current, owner)
    name = type(transform).__name__
    if not traced_value(transform):  # constant map: a fixed set goes to a fixed set
        try:
            domain, codomain = transform.domain, transform.codomain
        except Exception:  # noqa: BLE001
            return _Set(None)
        if _same_set(current.constraint, domain) and not traced_value(codomain):
            return _Set(_strip_independent(codomain))
        return _Set(None)
    c = current.constraint
    real = c is not None and _strip_independent(c) is constraints.real
    if real and isinstance(transform, (T.AffineTransform, T.LowerCholeskyAffine,
                                       T.RecursiveLinearTransform)):
        return _Set(constraints.real)  # onto the whole space, whatever the parameters
    if _half_line(c) and (isinstance(transform, T.PowerTransform) or (
            isinstance(transform, T.AffineTransform) and _concrete_zero(transform.loc))):
        return _Set(None)  # s·(0, inf) and (0, inf)^p are fixed half-lines (s, p != 0)
    what = "a set it cannot identify" if c is None else f"the set {c}"
    return (f"{name} in {owner} has parameters computed from the program's inputs and is "
            f"applied to {what}, which it maps onto a set that moves with them (only "
            "affine maps of the whole real line, and scalings and powers of the positive "
            "half-line, are known to keep it fixed)")


def _support_of(d: dist.Distribution):
    """`_Set` for a node whose support does not move, else the reason (a string)."""
    name = type(d).__name__
    own, bound = _own_support(d)
    if own is not None and getattr(own, "is_discrete", False) and not isinstance(
            d, dist.TransformedDistribution):
        return _Set(own)  # discrete supports never count
    if bound is not None:
        what = bound.replace("_", " ")
        return (f"the {what} of {name}'s support is computed from the program's inputs "
                f"({own})")
    if isinstance(d, dist.TransformedDistribution):
        current = _support_of(d.base_dist)
        if isinstance(current, str):
            return current
        for transform in d.transforms:
            current = _through(transform, current, name)
            if isinstance(current, str):
                return current
        return current
    for _, child in children(d):
        found = _support_of(child)
        if isinstance(found, str):
            return found
    if isinstance(d, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        return _support_of(d.base_dist)
    return _Set(own)


def moving_support(distribution: dist.Distribution) -> str | None:
    """Why the support of `distribution` may move with traced parameters, or None."""
    found = _support_of(distribution)
    return found if isinstance(found, str) else None


# ------------------------------------------------------------------ point masses in trees


def _is_discrete(d: dist.Distribution) -> bool:
    try:
        return bool(d.support.is_discrete)
    except Exception:  # noqa: BLE001
        return False


def _deltas(d: dist.Distribution, moved: bool = False):
    """`(Delta, moved)` for every point mass in the tree; `moved` when a transform with
    traced parameters is applied above it (the atom then moves with them)."""
    if isinstance(d, dist.Delta):
        yield d, moved
        return
    if isinstance(d, dist.TransformedDistribution) and traced_value(d.transforms):
        moved = True
    for _, child in children(d):
        yield from _deltas(child, moved)


def point_mass_inside(distribution: dist.Distribution) -> str | None:
    """Why a score function is wrong for a tree holding a `Delta`, or None (rule 4)."""
    deltas = list(_deltas(distribution))
    if not deltas:
        return None
    for delta, moved in deltas:
        if moved or traced_value(delta.v) or traced_value(delta.log_density):
            return (f"{type(distribution).__name__} holds a point mass (Delta) at a "
                    "location (or with a weight) computed from the program's inputs, and a "
                    "score function has no term for the location of an atom (its gradient "
                    "would be 0)")
    dense = [node for node in _nodes(distribution)  # leaves with a density
             if not isinstance(node, dist.Delta) and not any(True for _ in children(node))
             and not _is_discrete(node)]
    if dense:
        return (f"{type(distribution).__name__} mixes a point mass (Delta) with a component "
                f"that has a density ({type(dense[0]).__name__}): its log_prob adds a "
                "probability to a density, so its score is not the score of its law")
    return None
