"""Draws from the backward kernel `P(J = j | x_t) ∝ W_{t-1}^j f(x_t | x_{t-1}^j)`.

Shared by FFBS and PaRIS: exact draws by inverting the CDF of the N backward weights
(O(N) each), or the hybrid of Dau and Chopin ("On the complexity of backward smoothing
algorithms", ICML 2023): accept-reject from `W_{t-1}` with an upper bound of the
transition density, and the exact draw only for the draws no proposal was accepted for.

The exact draws (`_exact_draws`) invert the CDF in two levels: two reductions over the
`rows × N` log weights (each row's maximum, then the sums of `exp(logit - max)` over
blocks of `B ≈ √N` columns), one uniform per draw picks a block from the cumulative
block sums, and only that block's `B` weights are formed again to find the column: no
`rows × N` cumulative sum and no binary-search loop. The law is that of the one-level
inverse CDF (the same partial sums, added in another order); one uniform per draw, not
the `N` of Gumbel-max. The accept-reject proposals from `W_{t-1}` are found the same
way up to `_COUNT_MAX` particles (`_count_at_most`, equal to `searchsorted` without its
`log N`-step loop) and by `searchsorted` above.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._ssm import StateSpaceModel, scalar_log_density


#: at most this many transition densities are held at once by the exact fallback
_FALLBACK_ELEMENTS = 1 << 20
#: the fallback's chunks hold at most `N · num_samples / _CHUNK_DIVISOR` draws (at least 8)
_CHUNK_DIVISOR = 32
#: the accept-reject rounds after the first try at most `N · num_samples / _BUFFER_DIVISOR`
#: pending draws per iteration (at least 8)
_BUFFER_DIVISOR = 4
#: `_count_at_most` counts up to this many entries, and searches above it
_COUNT_MAX = 2048
#: the pending draws' second, smaller buffer: `N · num_samples / _SMALL_BUFFER_DIVISOR`
_SMALL_BUFFER_DIVISOR = 64
#: ... used from this many draws a step on (below it the extra branch cost more than it saved:
#: PaRIS at N = 100, 9.9 against 14.9 ms)
_SMALL_BUFFER_MIN_DRAWS = 4096
#: accept-reject rounds per iteration for the pending draws (all drawn at once)
_ROUNDS_PER_ITERATION = 3


def backward_indices(key: Array, model: StateSpaceModel, params: Any, particles_prev: Any,
                     log_weights_prev: Array, particles: Any, t: Array, inputs: Any,
                     num_samples: int, log_transition_bound: Any = None,
                     num_proposals: int = 10) -> tuple[Array, Array]:
    """Draw `num_samples` indices `J` per particle `x_t^i` from `W_{t-1}^j f(x_t^i | x_{t-1}^j)`.

    Exact draws cost O(N) each; with `log_transition_bound` (a scalar `log f̄ >= log f`),
    each draw first tries up to `num_proposals` rounds of accept-reject from `W_{t-1}`
    (round 1 for all draws at once, the later ones only for the draws still pending,
    compacted, at most `max(8, N·num_samples/4)` per iteration (from 4,096 draws a step
    on, the last `max(8, N·num_samples/64)` pending ones in a buffer of that size), up to
    3 rounds each per iteration, the first accepted proposal kept) and only the draws
    still missing use the exact kernel, in chunks of at most `max(8, N·num_samples/32)`
    draws (fewer for large `N`, so that a chunk holds at most `2^20` transition
    densities): the fallback costs O(N) per missing draw and O(chunk·N) memory, never
    an `N × N` table, and is skipped (`lax.cond`) when every draw was accepted. Small
    chunks suit the failures, which are few at most steps and many at a few (FFBS on
    the linear-Gaussian model, N = 1000: 16 of 1000 per step on average, none at 68% of
    the steps, up to 583). Every draw has the exact backward law (a mixture of exact laws).
    Returns `(indices (N, num_samples), acceptance)`, the fraction of draws accepted by
    accept-reject.
    """
    num = jax.tree.leaves(particles)[0].shape[0]  # the particles at t (those drawn for)

    def log_transition(x_prev, x):
        law = model.transition(params, x_prev, t, inputs)
        return scalar_log_density(law, x, "transition")

    if log_transition_bound is None:
        u = jax.random.uniform(key, (num, num_samples), log_weights_prev.dtype)
        indices = _exact_draws(log_transition, log_weights_prev, particles_prev, particles, u)
        return indices, jnp.ones((), log_weights_prev.dtype)

    bound = jnp.asarray(log_transition_bound)
    size = num * num_samples
    num_prev = log_weights_prev.shape[0]
    # draw p is for particle p // num_samples; the proposal CDF is formed once per step
    flat_particles = jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), particles)
    cumulative = jnp.cumsum(jnp.exp(log_weights_prev - jnp.max(log_weights_prev)))

    def attempts(key, positions, num_rounds):  # `num_rounds` rounds for each position
        uniforms = jax.random.uniform(key, (2, num_rounds) + positions.shape,
                                      cumulative.dtype)  # proposal, acceptance
        proposed = jnp.minimum(_count_at_most(cumulative, uniforms[0] * cumulative[-1]),
                               num_prev - 1)
        prev = jax.tree.map(lambda a: a[proposed], particles_prev)
        xs = jax.tree.map(lambda a: a[jnp.minimum(positions, size - 1)], flat_particles)
        log_f = jax.vmap(lambda prev: jax.vmap(log_transition)(prev, xs))(prev)
        # a proposal of weight 0 (drawn only through float rounding of the CDF) is rejected,
        # as accept-reject with its ratio W f / (q f̄) = 0 would
        return proposed, ((jnp.log(uniforms[1]) < log_f - bound)
                          & (log_weights_prev[proposed] > -jnp.inf))  # (rounds, positions)

    # round 1 for every draw; the later rounds only for the draws still pending,
    # compacted, `buffer` of them per iteration, `_ROUNDS_PER_ITERATION` rounds at once
    # (the first accepted proposal is kept), each draw at most `num_proposals` rounds in
    # all: per draw the same algorithm as `num_proposals` sequential rounds
    key_first, key_more, key_fallback = jax.random.split(key, 3)
    chosen, accepted = attempts(key_first, jnp.arange(size), 1)
    chosen, accepted = chosen[0], accepted[0]
    more = min(num_proposals - 1, _ROUNDS_PER_ITERATION)
    buffer = max(1, min(size, max(8, size // _BUFFER_DIVISOR)))
    round_index = jnp.arange(more)[:, None]

    def pending_of(carry):
        _, _, pending, rounds = carry
        return pending & (rounds < num_proposals)

    def another_of(buffer):  # one iteration for at most `buffer` pending draws
        def another(carry):
            step, flat, pending, rounds = carry
            (position,) = jnp.nonzero(pending_of(carry), size=buffer, fill_value=size)
            proposed, ok = attempts(jax.random.fold_in(key_more, step), position, more)
            # rounds past a draw's `num_proposals` do not count
            ok = ok & (round_index < num_proposals - rounds.at[position].get(mode="fill",
                                                                              fill_value=0))
            first = jnp.min(jnp.where(ok, round_index, more), axis=0)  # first accepted round
            pick = jnp.take_along_axis(proposed, jnp.minimum(first, more - 1)[None], axis=0)[0]
            target = jnp.where(first < more, position, size)  # `size`: dropped
            return (step + 1, flat.at[target].set(pick, mode="drop"),
                    pending.at[target].set(False, mode="drop"),
                    rounds.at[position].add(more, mode="drop"))

        return another

    # the few draws left after the first iterations (low acceptance) run in a small buffer,
    # so that their rounds do not cost `buffer` transition densities each
    small = max(1, min(buffer, max(8, size // _SMALL_BUFFER_DIVISOR)))
    if size >= _SMALL_BUFFER_MIN_DRAWS:
        def another(carry):
            return jax.lax.cond(jnp.sum(pending_of(carry)) <= small, another_of(small),
                                another_of(buffer), carry)
    else:
        another = another_of(buffer)

    if num_proposals > 1:
        _, chosen, pending, _ = jax.lax.while_loop(
            lambda carry: jnp.any(pending_of(carry)), another,
            (jnp.zeros((), jnp.int32), chosen, ~accepted, jnp.ones((size,), jnp.int32)))
    else:
        pending = ~accepted
    any_accepted = ~pending
    failed = pending
    num_failed = jnp.sum(failed)
    chunk = max(1, min(size, max(8, min(size // _CHUNK_DIVISOR,
                                        _FALLBACK_ELEMENTS // max(num_prev, 1)))))
    padded = -(-size // chunk) * chunk

    def fill(carry):
        step, flat, order = carry
        position = jax.lax.dynamic_slice(order, (step * chunk,), (chunk,))
        rows = jnp.minimum(position, size - 1) // num_samples
        xs = jax.tree.map(lambda a: a[rows], particles)
        u = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key_fallback, p), (1,),
                                                  log_weights_prev.dtype))(position)
        draws = _exact_draws(log_transition, log_weights_prev, particles_prev, xs,
                             u)[:, 0].astype(flat.dtype)
        return step + 1, flat.at[position].set(draws, mode="drop"), order  # `size`: dropped

    num_chunks = (num_failed + chunk - 1) // chunk

    def fallback(flat):
        (order,) = jnp.nonzero(failed, size=padded, fill_value=size)  # failed ones first
        _, flat, _ = jax.lax.while_loop(lambda carry: carry[0] < num_chunks, fill,
                                        (jnp.zeros((), num_chunks.dtype), flat, order))
        return flat

    # most steps leave no draw to the fallback: skip its compaction and loop entirely
    flat = jax.lax.cond(num_failed > 0, fallback, lambda flat: flat, chosen)
    indices = flat.reshape(num, num_samples)
    return indices, jnp.mean(any_accepted.astype(log_weights_prev.dtype))


def _block_size(num: int) -> int:
    """The column block of `_exact_draws`: the power of two nearest `√num`, in [8, 256]."""
    return int(min(256, max(8, 2 ** round(math.log2(max(num, 1)) / 2))))


def _exact_draws(log_transition, log_weights_prev: Array, particles_prev: Any, xs: Any,
                 u: Array) -> Array:
    """Exact backward indices for the rows `xs`, one per uniform of `u (rows, S)`.

    Column `j` of row `i` has the weight `w_ij = W^j f(x_i | x_prev^j)`; the draw is the
    first `j` whose partial sum exceeds `u · Σ_j w_ij` (inversion of the CDF). The sums
    are taken over blocks of `B` columns: pass 1 the row maxima `m_i`, pass 2 the block
    sums of `exp(log w_ij - m_i)` (`rows × N/B` of them), then per draw the
    block (compare-and-count over the cumulative block sums) and, from that block's `B`
    weights formed again, the column. Columns of weight 0 are never drawn (a count that
    lands on one, through float rounding of the partial sums, moves to the next positive
    block or column, or the last positive one).
    """
    num = log_weights_prev.shape[0]
    block = _block_size(num)
    num_blocks = -(-num // block)
    padded = num_blocks * block
    columns = jnp.arange(padded)
    valid = columns < num
    prev = jax.tree.map(lambda a: a[jnp.minimum(columns, num - 1)], particles_prev)
    log_w = jnp.where(valid, log_weights_prev[jnp.minimum(columns, num - 1)], -jnp.inf)

    def logits(x, prev, log_w, valid):
        values = log_w + jax.vmap(lambda xp: log_transition(xp, x))(prev)
        return jnp.where(valid, values, -jnp.inf).astype(log_w.dtype)

    row_max = jax.vmap(lambda x: jnp.max(logits(x, prev, log_w, valid)))(xs)
    block_sums = jax.vmap(lambda x, m: jnp.sum(
        jnp.exp(logits(x, prev, log_w, valid) - m).reshape(num_blocks, block), axis=1))(
            xs, row_max)
    cumulative = jnp.cumsum(block_sums, axis=1)  # (rows, num_blocks)
    target = u.astype(cumulative.dtype) * cumulative[:, -1:]  # (rows, S)
    # the first block of positive sum from the counted one on (float rounding of the sums
    # can give a block of sum 0 an interval of an ulp), the last positive one past the end
    blocks = jnp.arange(num_blocks)
    last_block = jnp.max(jnp.where(block_sums > 0, blocks, 0), axis=1)
    counted = jnp.sum(cumulative[:, None, :] <= target[:, :, None], axis=-1)  # (rows, S)
    chosen = jnp.min(jnp.where((blocks >= counted[..., None]) & (block_sums[:, None, :] > 0),
                               blocks, last_block[:, None, None]), axis=-1)
    below = jnp.where(chosen > 0, jnp.take_along_axis(cumulative, jnp.maximum(chosen - 1, 0),
                                                      axis=1), 0.0)
    rest = target - below

    def within(x, m, blocks, rests):  # one row: its S draws
        def one(b, r):
            index = b * block + jnp.arange(block)
            weights = jnp.exp(logits(x, jax.tree.map(lambda a: a[index], prev), log_w[index],
                                     valid[index]) - m)
            count = jnp.sum(jnp.cumsum(weights) <= r)
            columns = jnp.arange(block)
            last = jnp.max(jnp.where(weights > 0, columns, 0))
            return b * block + jnp.min(jnp.where((columns >= count) & (weights > 0), columns,
                                                 last))

        return jax.vmap(one)(blocks, rests)

    return jax.vmap(within)(xs, row_max, chosen, rest).astype(jnp.int32)


def _count_at_most(cumulative: Array, values: Array) -> Array:
    """`jnp.searchsorted(cumulative, values, side="right")` (equal to it for a
    non-decreasing vector) without its `log N`-step loop: count the blocks of `B ≈ √N`
    entries that end at or below each value, then the entries at or below it in the next
    block (two fused compare-and-count passes and a gather of `B` entries per value).
    Above `_COUNT_MAX` entries it is `searchsorted` itself (PaRIS at N = 10⁴: 1,840 against
    1,230 ns a particle-step)."""
    num = cumulative.shape[0]
    if num > _COUNT_MAX:  # its O(√N) passes per value cost more than the search's O(log N)
        return jnp.searchsorted(cumulative, values, side="right").astype(jnp.int32)
    block = _block_size(num)
    num_blocks = -(-num // block)
    padded = jnp.pad(cumulative, (0, num_blocks * block - num),
                     constant_values=jnp.inf).reshape(num_blocks, block)
    full = jnp.sum(padded[:, -1] <= values[..., None], axis=-1)  # blocks wholly at or below
    b = jnp.minimum(full, num_blocks - 1)
    within = jnp.sum(padded[b] <= values[..., None], axis=-1)
    return (b * block + within).astype(jnp.int32)
