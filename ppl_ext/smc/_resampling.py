"""Resampling schemes and effective sample sizes, from log weights.

Every scheme draws `num_samples` ancestor indices `A_1, ..., A_M` from normalised weights
`W` with `E[#{j : A_j = i}] = M W_i` (unbiased resampling), so a particle filter that uses
any of them keeps its marginal-likelihood estimate unbiased. They differ in the variance of
the counts: multinomial (independent draws) > residual > stratified >= systematic in
practice (Douc, Cappé and Moulines, "Comparison of resampling schemes for particle
filtering", 2005). The implementations are blackjax's (`blackjax.smc.resampling`):
sorted uniforms and `searchsorted`, O(M log N), no loops, jit- and shard-friendly; except
systematic resampling, whose one shared uniform lets the counts be computed directly in
O(N + M) (`_systematic`, the same strata as blackjax's: 1.4x faster at N = 10^4 and 3.5x at
10^5 on one CPU thread, where the `searchsorted` dominates a filter step).
"""

from __future__ import annotations

import difflib

import jax
import jax.numpy as jnp
from blackjax.smc import resampling as _blackjax
from jaxtyping import Array, ArrayLike

def _systematic(key: Array, weights: Array, num_samples: int) -> Array:
    """Systematic resampling by counts: stratum `j` (the point `(j + U) / M`) goes to the
    first particle `i` with `(j + U) / M <= C_i`, `C` the cumulative weights, so particle
    `i` receives `floor(M C_i - U) - floor(M C_{i-1} - U)` strata. The indices come out
    sorted, as blackjax's `systematic` (which finds each stratum by `searchsorted`) gives
    them; the two agree except where float rounding puts a point on a boundary."""
    num = weights.shape[0]
    u = jax.random.uniform(key, (), weights.dtype)
    cumulative = jnp.cumsum(weights)
    # dividing by the total makes every entry equal to it exactly 1 (x / x == 1 in IEEE
    # arithmetic), so trailing zero-weight particles receive no stratum
    cumulative = cumulative / cumulative[-1]
    below = jnp.clip(jnp.floor(num_samples * cumulative - u) + 1, 0, num_samples)
    below = below.at[-1].set(num_samples)
    counts = jnp.diff(below, prepend=0).astype(jnp.int32)
    return jnp.repeat(jnp.arange(num, dtype=jnp.int32), counts,
                      total_repeat_length=num_samples)


def _never_past_last_positive(scheme):
    """`scheme` with every index capped at the last particle of positive weight.

    blackjax's schemes `searchsorted` points of [0, 1) in the float cumulative weights and
    clip overflow to the last index; when the weights sum to slightly less than 1 (float
    rounding) a point above the sum would pick the last particle even if its weight is 0
    (an impossible state). Capping moves that float-rounding mass to the last particle
    that can be drawn."""

    def wrapped(key: Array, weights: Array, num_samples: int) -> Array:
        positive = weights > 0
        last = weights.shape[0] - 1 - jnp.argmax(positive[::-1])
        return jnp.minimum(scheme(key, weights, num_samples), last)

    wrapped.__name__ = getattr(scheme, "__name__", "scheme")
    return wrapped


#: The resampling schemes, by name.
SCHEMES = {
    "multinomial": _never_past_last_positive(_blackjax.multinomial),
    "systematic": _systematic,
    "stratified": _never_past_last_positive(_blackjax.stratified),
    "residual": _never_past_last_positive(_blackjax.residual),
}


def check_scheme(resampling: str, owner: str = "resampling") -> None:
    """Raise a `ValueError` naming the schemes (and the closest one) for an unknown name."""
    if isinstance(resampling, str) and resampling in SCHEMES:
        return
    close = difflib.get_close_matches(str(resampling), list(SCHEMES), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{owner}: unknown resampling scheme {resampling!r}{hint} "
                     f"(choose one of {', '.join(map(repr, SCHEMES))})")


def normalize(log_weights: ArrayLike) -> tuple[Array, Array]:
    """`(log W, log Σ exp(log_weights))`: normalised log weights and the log normaliser."""
    log_weights = jnp.asarray(log_weights)
    log_total = jax.nn.logsumexp(log_weights)
    return log_weights - log_total, log_total


def effective_sample_size(log_weights: ArrayLike) -> Array:
    """Effective sample size `(Σ w_i)² / Σ w_i²` of unnormalised log weights (Kong, 1992).

    Between 1 (one particle carries all the weight) and the number of particles (equal
    weights). Weights of `-inf` count as zero.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.smc import effective_sample_size
        >>> float(effective_sample_size(jnp.zeros(8)))
        8.0
        >>> round(float(effective_sample_size(jnp.log(jnp.array([3.0, 1.0])))), 3)
        1.6
    """
    log_weights = jnp.asarray(log_weights)
    return jnp.exp(2 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2 * log_weights))


def categorical(key: Array, logits: Array, shape: tuple[int, ...] = ()) -> Array:
    """Indices drawn from `softmax(logits)` (last axis) by inversion of the CDF.

    One uniform per draw and a `searchsorted` (O(log N) per draw once the cumulative sum
    is formed), where `jax.random.categorical` draws N Gumbel variables per draw.
    `logits` has shape `(N,)`; `jax.vmap` it for several rows. Entries of `-inf` are never
    drawn.
    """
    logits = jnp.asarray(logits)
    weights = jnp.exp(logits - jnp.max(logits))
    cumulative = jnp.cumsum(weights)
    u = jax.random.uniform(key, shape, cumulative.dtype) * cumulative[-1]
    index = jnp.searchsorted(cumulative, u, side="right")
    return jnp.clip(index, 0, logits.shape[0] - 1).astype(jnp.int32)


def resample(key: Array, log_weights: ArrayLike, num_samples: int | None = None,
             resampling: str = "systematic") -> Array:
    """Ancestor indices drawn from the weights `softmax(log_weights)` by one scheme.

    `E[#{j : A_j = i}] = num_samples · W_i` for every scheme: `"multinomial"`,
    `"systematic"` (one uniform shared by the strata), `"stratified"` (one uniform per
    stratum) or `"residual"` (the integer parts of `num_samples · W_i` deterministically,
    the rest multinomially). Systematic and multinomial return sorted indices.

    Args:
        key: a PRNG key.
        log_weights: `(num_particles,)` unnormalised log weights.
        num_samples: the number of indices drawn (default: `num_particles`).
        resampling: the scheme's name.

    Returns:
        `(num_samples,)` int32 indices into the particles.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.smc import resample
        >>> log_weights = jnp.log(jnp.array([0.5, 0.25, 0.25]))
        >>> resample(jax.random.key(0), log_weights, 4, "systematic").shape
        (4,)
    """
    check_scheme(resampling, "resample")
    log_weights = jnp.asarray(log_weights)
    if log_weights.ndim != 1 or log_weights.shape[0] < 1:
        raise ValueError("resample: log_weights must be a non-empty vector, got shape "
                         f"{log_weights.shape}")
    num = log_weights.shape[0] if num_samples is None else num_samples
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"resample: num_samples must be a positive int, got {num_samples!r}")
    weights = jnp.exp(normalize(log_weights)[0])
    return SCHEMES[resampling](key, weights, num).astype(jnp.int32)
