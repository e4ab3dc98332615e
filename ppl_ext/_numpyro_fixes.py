"""Corrections to NumPyro log densities whose gradients are wrong at a single point.

NumPyro 0.22 computes `Bernoulli(logits=l).log_prob` as
`-(clip(l, 0) + log1p(exp(-|l|)) - l y)` and `Binomial(n, logits=l).log_prob` with the same
`clip`/`abs` pair. Both values are right, but JAX's derivatives of `clip` and `abs` at 0
(1 and 0) do not add up to the derivative of the softplus they represent (1/2), so at
exactly `l = 0` the gradient of the log density is off by 1/2 per unit of count:
`d/dl log p(1) = 1` instead of `1/2`. Logits start at exactly 0 whenever a parameter is
initialised with zeros, and every score-function or enumeration gradient, and every
gradient of a log likelihood, evaluated there is silently biased (NumPyro's own ELBOs
too).

`apply()` (run when ppl_ext is imported) replaces the two computations with softplus-based
ones that have the same values, the same handling of infinite logits, and the correct
derivative everywhere. It changes nothing else and is idempotent; set the environment
variable `PPL_EXT_NO_NUMPYRO_FIXES=1` before importing ppl_ext to skip it. Tests in
`tests/test_numpyro_fixes.py` compare values with NumPyro's and gradients with the exact
`y - n sigmoid(l)`.

`apply()` also marks NumPyro's support checks for ppl_ext's continuity check (always, the
environment variable above does not turn this off: without it every validated log density
of a reparameterised draw would be refused). With `validate_args` on (NumPyro's default),
`log_prob` is `jnp.where(support(value), lp, -inf)`, a case split on the value. While an
expectation program is traced (`ppl_ext.adev._primitives.inside_expectation()`),
`Distribution._validate_sample` wraps its mask in `ppl_ext.adev._analysis.support_check_p`,
an identity that records the constraint and the checked value; the continuity check
(`ppl_ext/adev/_continuity.py`) then accepts the mask only where it is constant (the value
is a draw from a site whose support lies inside the constraint, or provably satisfies it)
and refuses it as a step otherwise. In the same way the outputs of NumPyro's transforms
(`__call__` and `_inverse` of every `Transform` subclass defined when ppl_ext is imported)
are wrapped in `ppl_ext.adev._analysis.transform_p`, which records the transform's domain
and codomain: `biject_to(simplex)(u)` lies in the simplex for any finite `u`, so an
autoguide's point mass at it passes a model's simplex check. Outside expectation programs
nothing changes; inside, values and gradients are unchanged (the marks are identities).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

_APPLIED = False
#: NumPyro's replaced functions, by name (kept for tests and for undoing the change).
ORIGINALS: dict = {}


def binary_cross_entropy_with_logits(x, y):
    """`-y log sigmoid(x) - (1 - y) log(1 - sigmoid(x))`, with the right gradient at `x = 0`.

    Same values as NumPyro's function, including the limits at `x = ±inf`.
    """
    finite = jnp.isfinite(x)
    safe_x = jnp.where(finite, x, jnp.zeros_like(x))
    usual = jax.nn.softplus(safe_x) - safe_x * y
    return jnp.where(finite, usual, jnp.inf * jnp.logical_xor(y, x > 0))


def _binomial_logits_log_prob(self, value):
    total_count = jnp.array(self.total_count, dtype=jnp.result_type(float))
    normalize_term = total_count * jax.nn.softplus(self.logits) - gammaln(total_count + 1)
    return (value * self.logits - gammaln(value + 1) - gammaln(total_count - value + 1)
            - normalize_term)


def _validate_sample(self, value):
    """NumPyro's `Distribution._validate_sample`, its mask marked inside expectations."""
    mask = ORIGINALS["Distribution._validate_sample"](self, value)
    if isinstance(mask, jax.core.Tracer):
        from ppl_ext.adev._primitives import inside_expectation

        if inside_expectation():
            from ppl_ext.adev._continuity import mark_support

            mask = mark_support(mask, value, self.support, type(self).__name__)
    return mask


def _mark_transform(transform, out, inp, forward: bool):
    if not isinstance(out, jax.core.Tracer):
        return out
    from ppl_ext.adev._primitives import inside_expectation

    if not inside_expectation():
        return out
    from ppl_ext.adev._continuity import mark_transform

    try:
        domain, codomain = transform.domain, transform.codomain
        if forward:
            return mark_transform(out, inp, domain, codomain)
        return mark_transform(out, inp, codomain, domain)
    except Exception:  # noqa: BLE001 - an unusual transform: left unmarked (conservative)
        return out


def _marked_call(original):
    @functools.wraps(original)
    def __call__(self, x, *args, **kwargs):
        y = original(self, x, *args, **kwargs)
        return y if args or kwargs else _mark_transform(self, y, x, True)

    return __call__


def _marked_inverse(original):
    @functools.wraps(original)
    def _inverse(self, y, *args, **kwargs):
        x = original(self, y, *args, **kwargs)
        return x if args or kwargs else _mark_transform(self, x, y, False)

    return _inverse


def _transform_classes() -> list:
    from numpyro.distributions.transforms import Transform

    found, stack = [Transform], [Transform]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                stack.append(sub)
    return found


def mark_support_checks() -> bool:
    """Mark NumPyro's support checks and transforms for the continuity check; True if
    installed now."""
    from numpyro.distributions.distribution import Distribution

    if "Distribution._validate_sample" in ORIGINALS:
        return False
    ORIGINALS["Distribution._validate_sample"] = Distribution._validate_sample
    _validate_sample.__doc__ = Distribution._validate_sample.__doc__
    Distribution._validate_sample = _validate_sample
    wrapped = []
    for cls in _transform_classes():
        for name, wrap in (("__call__", _marked_call), ("_inverse", _marked_inverse)):
            original = cls.__dict__.get(name)
            if callable(original):
                wrapped.append((cls, name, original))
                setattr(cls, name, wrap(original))
    ORIGINALS["Transform methods"] = wrapped
    return True


def apply() -> bool:
    """Install the corrections into `numpyro.distributions.discrete` (and the support-check
    marks, see the module docstring); True if the corrections were installed now."""
    global _APPLIED
    mark_support_checks()
    if _APPLIED or os.environ.get("PPL_EXT_NO_NUMPYRO_FIXES") == "1":
        return False
    from numpyro.distributions import discrete
    from numpyro.distributions.util import validate_sample

    if hasattr(discrete, "binary_cross_entropy_with_logits"):
        ORIGINALS["binary_cross_entropy_with_logits"] = discrete.binary_cross_entropy_with_logits
        discrete.binary_cross_entropy_with_logits = binary_cross_entropy_with_logits
    ORIGINALS["BinomialLogits.log_prob"] = discrete.BinomialLogits.log_prob
    binomial_log_prob = validate_sample(_binomial_logits_log_prob)
    binomial_log_prob.__doc__ = discrete.BinomialLogits.log_prob.__doc__
    discrete.BinomialLogits.log_prob = binomial_log_prob
    _APPLIED = True
    return True
