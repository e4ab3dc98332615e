"""Draws from the backward kernel `P(J = j | x_t) ∝ W_{t-1}^j f(x_t | x_{t-1}^j)`.

Shared by FFBS and PaRIS: exact draws by inverting the CDF of the N backward weights
(O(N) each), or the hybrid of Dau and Chopin ("On the complexity of backward smoothing
algorithms", ICML 2023): accept-reject from `W_{t-1}` with an upper bound of the
transition density, and the exact draw only for the draws no proposal was accepted for.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._resampling import categorical
from ._ssm import StateSpaceModel, scalar_log_density


#: at most this many transition densities are held at once by the exact fallback
_FALLBACK_ELEMENTS = 1 << 20
#: the fallback's chunks hold at most `N · num_samples / _CHUNK_DIVISOR` draws (at least 8)
_CHUNK_DIVISOR = 32
#: the accept-reject rounds after the first try at most `N · num_samples / _BUFFER_DIVISOR`
#: pending draws per iteration (at least 8)
_BUFFER_DIVISOR = 4


def backward_indices(key: Array, model: StateSpaceModel, params: Any, particles_prev: Any,
                     log_weights_prev: Array, particles: Any, t: Array, inputs: Any,
                     num_samples: int, log_transition_bound: Any = None,
                     num_proposals: int = 10) -> tuple[Array, Array]:
    """Draw `num_samples` indices `J` per particle `x_t^i` from `W_{t-1}^j f(x_t^i | x_{t-1}^j)`.

    Exact draws cost O(N) each; with `log_transition_bound` (a scalar `log f̄ >= log f`),
    each draw first tries up to `num_proposals` rounds of accept-reject from `W_{t-1}`
    (round 1 for all draws at once, the later ones only for the draws still pending,
    compacted, at most `max(8, N·num_samples/4)` per iteration) and only the draws
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

    def exact(key, x):
        logits = log_weights_prev + jax.vmap(lambda xp: log_transition(xp, x))(particles_prev)
        return categorical(key, logits, (num_samples,))

    key_exact, key_reject = jax.random.split(key)
    exact_keys = jax.random.split(key_exact, num)
    if log_transition_bound is None:
        indices = jax.vmap(exact)(exact_keys, particles)
        return indices, jnp.ones((), log_weights_prev.dtype)

    bound = jnp.asarray(log_transition_bound)
    size = num * num_samples
    num_prev = log_weights_prev.shape[0]
    # draw p is for particle p // num_samples; the proposal CDF is formed once per step
    flat_particles = jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), particles)
    cumulative = jnp.cumsum(jnp.exp(log_weights_prev - jnp.max(log_weights_prev)))

    def attempt(key, positions):  # one accept-reject round for the draws at `positions`
        key_propose, key_accept = jax.random.split(key)
        u = jax.random.uniform(key_propose, positions.shape, cumulative.dtype)
        proposed = jnp.clip(jnp.searchsorted(cumulative, u * cumulative[-1], side="right"),
                            0, num_prev - 1).astype(jnp.int32)
        prev = jax.tree.map(lambda a: a[proposed], particles_prev)
        xs = jax.tree.map(lambda a: a[jnp.minimum(positions, size - 1)], flat_particles)
        log_u = jnp.log(jax.random.uniform(key_accept, positions.shape,
                                           log_weights_prev.dtype))
        return proposed, log_u < jax.vmap(log_transition)(prev, xs) - bound

    # round 1 for every draw; the later rounds only for the draws still pending, at most
    # `buffer` of them per iteration (compacted), each draw at most `num_proposals` rounds
    # in all: the same per-draw algorithm as `num_proposals` bulk rounds, at the cost of
    # the rounds actually needed (most draws are accepted in the first)
    key_first, key_more = jax.random.split(key_reject)
    chosen, accepted = attempt(key_first, jnp.arange(size))
    buffer = max(1, min(size, max(8, size // _BUFFER_DIVISOR)))

    def pending_of(carry):
        _, _, pending, rounds = carry
        return pending & (rounds < num_proposals)

    def another(carry):
        step, flat, pending, rounds = carry
        (position,) = jnp.nonzero(pending_of(carry), size=buffer, fill_value=size)
        proposed, ok = attempt(jax.random.fold_in(key_more, step), position)
        target = jnp.where(ok, position, size)  # `size`: dropped
        return (step + 1, flat.at[target].set(proposed, mode="drop"),
                pending.at[target].set(False, mode="drop"),
                rounds.at[position].add(1, mode="drop"))

    _, chosen, pending, _ = jax.lax.while_loop(
        lambda carry: jnp.any(pending_of(carry)), another,
        (jnp.zeros((), jnp.int32), chosen, ~accepted, jnp.ones((size,), jnp.int32)))
    any_accepted = ~pending
    failed = pending
    num_failed = jnp.sum(failed)
    chunk = max(1, min(size, max(8, min(size // _CHUNK_DIVISOR,
                                        _FALLBACK_ELEMENTS // max(num_prev, 1)))))
    padded = -(-size // chunk) * chunk
    key_fallback, _ = jax.random.split(key_exact)

    def one(key, x):
        logits = log_weights_prev + jax.vmap(lambda xp: log_transition(xp, x))(
            particles_prev)
        return categorical(key, logits)

    def fill(carry):
        step, flat, order = carry
        position = jax.lax.dynamic_slice(order, (step * chunk,), (chunk,))
        rows = jnp.minimum(position, size - 1) // num_samples
        xs = jax.tree.map(lambda a: a[rows], particles)
        keys = jax.vmap(lambda p: jax.random.fold_in(key_fallback, p))(position)
        draws = jax.vmap(one)(keys, xs).astype(flat.dtype)
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
