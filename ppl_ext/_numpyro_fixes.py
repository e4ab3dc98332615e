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
"""

from __future__ import annotations

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


def apply() -> bool:
    """Install the corrections into `numpyro.distributions.discrete`; True if installed now."""
    global _APPLIED
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
