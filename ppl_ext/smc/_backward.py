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


def backward_indices(key: Array, model: StateSpaceModel, params: Any, particles_prev: Any,
                     log_weights_prev: Array, particles: Any, t: Array, inputs: Any,
                     num_samples: int, log_transition_bound: Any = None,
                     num_proposals: int = 10) -> tuple[Array, Array]:
    """Draw `num_samples` indices `J` per particle `x_t^i` from `W_{t-1}^j f(x_t^i | x_{t-1}^j)`.

    Exact draws cost O(N) each; with `log_transition_bound` (a scalar `log f̄ >= log f`),
    `num_proposals` rounds of accept-reject from `W_{t-1}` run first and only the draws
    still missing use the exact kernel, in chunks of at most `max(8, N·num_samples/8)`
    draws (fewer for large `N`, so that a chunk holds at most `2^20` transition
    densities): the fallback costs O(N) per missing draw and O(chunk·N) memory, never
    an `N × N` table. Every draw has the exact backward law (a mixture of exact laws).
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
    key_propose, key_accept = jax.random.split(key_reject)
    shape = (num_proposals, num, num_samples)
    proposals = categorical(key_propose, log_weights_prev, shape)
    log_u = jnp.log(jax.random.uniform(key_accept, shape, log_weights_prev.dtype))

    def log_density_of(proposed, x):  # (num_proposals, num_samples) for one particle x
        prev = jax.tree.map(lambda a: a[proposed.reshape(-1)], particles_prev)
        return jax.vmap(lambda xp: log_transition(xp, x))(prev).reshape(proposed.shape)

    log_f = jax.vmap(log_density_of, in_axes=(1, 0), out_axes=1)(proposals, particles)
    accepted = log_u < log_f - bound
    first = jnp.argmax(accepted, axis=0)  # the first accepted round, per draw
    any_accepted = jnp.any(accepted, axis=0)
    chosen = jnp.take_along_axis(proposals, first[None], axis=0)[0].astype(jnp.int32)
    # exact draws for the draws no proposal was accepted for, `chunk` of them at a time
    # (static shapes: O(chunk·N) memory, time proportional to the failures)
    failed = ~any_accepted.reshape(-1)
    num_failed = jnp.sum(failed)
    size = num * num_samples
    num_prev = log_weights_prev.shape[0]
    chunk = max(1, min(size, max(8, min(size // 8, _FALLBACK_ELEMENTS // max(num_prev, 1)))))
    padded = -(-size // chunk) * chunk
    (order,) = jnp.nonzero(failed, size=padded, fill_value=size)  # failed positions first
    key_fallback, _ = jax.random.split(key_exact)

    def one(key, x):
        logits = log_weights_prev + jax.vmap(lambda xp: log_transition(xp, x))(
            particles_prev)
        return categorical(key, logits)

    def fill(carry):
        step, flat = carry
        position = jax.lax.dynamic_slice(order, (step * chunk,), (chunk,))
        rows = jnp.minimum(position, size - 1) // num_samples
        xs = jax.tree.map(lambda a: a[rows], particles)
        keys = jax.vmap(lambda p: jax.random.fold_in(key_fallback, p))(position)
        draws = jax.vmap(one)(keys, xs).astype(flat.dtype)
        return step + 1, flat.at[position].set(draws, mode="drop")  # `size`: dropped

    num_chunks = (num_failed + chunk - 1) // chunk
    _, flat = jax.lax.while_loop(lambda carry: carry[0] < num_chunks, fill,
                                 (jnp.zeros((), num_chunks.dtype), chosen.reshape(-1)))
    indices = flat.reshape(num, num_samples)
    return indices, jnp.mean(any_accepted.astype(log_weights_prev.dtype))
