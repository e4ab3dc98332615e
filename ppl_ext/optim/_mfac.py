"""M-FAC: inverse empirical-Fisher preconditioning over a sliding window of gradients.

Frantar, Kurtic and Alistarh, "M-FAC: Efficient matrix-free approximations of
second-order information", NeurIPS 2021 (the "dynamic algorithm", their Section 3.2 and
the optimiser of their Section 5). The curvature is the damped empirical Fisher of the
last `m` gradients `g_1, ..., g_m` (rows of `G`, shape `(m, d)`):

    F = λ I + (1/m) Σ_i g_i g_iᵀ = λ I + GᵀG / m,

and the update is `F⁻¹ g` for the newest gradient `g` (inserted into the window first).
By the Woodbury identity

    F⁻¹ v = (v - Gᵀ (m λ I + G Gᵀ)⁻¹ G v) / λ,

so only the `m × m` matrix `B = m λ I + G Gᵀ` is needed besides `G`. Per gradient the
window replaces its oldest row (a ring buffer): `O(d m)` for the new dot products `G g`.
The paper refactors `B` after each replacement (`O(m³)`); here the Cholesky factor of `B`
is kept *in age order* (oldest gradient first) and updated in `O(m²)`:

* removing the oldest gradient deletes the first row and column of `B`; for
  `L = [[l₀₀, 0], [l, L₂₂]]` the factor of the remaining block `L₂₂L₂₂ᵀ + l lᵀ` is a
  rank-one *update* (never a downdate) `L₂₂ C`, with `C = chol(I + p pᵀ)`, `p = L₂₂⁻¹ l`,
  in closed form: `C_kk = √(s_k / s_{k-1})`, `C_ik = p_i p_k / √(s_k s_{k-1})` (`i > k`),
  `s_k = 1 + Σ_{j ≤ k} p_j²`, so `L₂₂ C` is a scaled copy of `L₂₂` plus suffix sums of its
  columns (`O(m²)`, vectorised);
* appending the new gradient adds a last row `xᵀ = (L⁻¹ b)ᵀ` (`b` its dot products with
  the others) and the diagonal `√(m λ + ‖g‖² - ‖x‖²)`, one triangular solve.

Both steps are backward stable (no downdate, no explicit inverse), so nothing drifts over
long runs. A product then costs two triangular solves (`O(m²)`) and two `(m, d)` matrix
products (`O(d m)`): `O(d m + m²)` per step in all. Unfilled slots hold zeros (the
"oldest" gradients), so while the window fills `F` is `λ I + (1/m) Σ_{i ≤ t} g_i g_iᵀ`
with the paper's fixed `1/m`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import optax
from jax.flatten_util import ravel_pytree

from ._cbo import _check_count, _check_positive


class MFACState(NamedTuple):
    """State of `mfac`: the gradient window, its Gram matrix and Cholesky factor, the count.

    Attributes:
        gradients: `(num_gradients, d)` the window `G` of flattened gradients (a ring
            buffer; unfilled rows are zero).
        gram: `(num_gradients, num_gradients)` the Gram matrix `G Gᵀ` (ring order).
        count: int32 scalar, the number of gradients inserted so far (the next one goes
            to row `count % num_gradients`).
        factor: `(num_gradients, num_gradients)` lower Cholesky factor of
            `m λ I + G Gᵀ` with rows and columns in age order (position `k` is row
            `(count + k) % num_gradients` of `gradients`, oldest first), kept by `mfac`
            for its damping; `None` in a state built by hand (`mfac_inverse_product`
            does not use it).

    Example:
        >>> import jax.numpy as jnp
        >>> state = MFACState(jnp.zeros((4, 3)), jnp.zeros((4, 4)), jnp.array(0))
        >>> state.gradients.shape
        (4, 3)
    """

    gradients: jax.Array
    gram: jax.Array
    count: jax.Array
    factor: jax.Array | None = None


def mfac_inverse_product(state: MFACState, vector: jax.Array, damping: float) -> jax.Array:
    """`F⁻¹ v` for the window of `state`: `F = damping · I + GᵀG / num_gradients`.

    By the Woodbury identity `F⁻¹ v = (v - Gᵀ (m λ I + G Gᵀ)⁻¹ G v) / λ`, with a Cholesky
    factorisation of the `m × m` system built from `state.gram` (`O(d m + m³)`: any
    damping is allowed here; `mfac` itself keeps the factor for its own damping and
    updates it in `O(m²)`).

    Args:
        state: an `MFACState` (its `gradients` and `gram`).
        vector: a flat vector of length `d`.
        damping: `λ > 0`.

    Returns:
        The flat vector `F⁻¹ v`.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 0.0], [0.0, 0.0]])  # one gradient in a window of two
        >>> state = MFACState(g, g @ g.T, jnp.array(1))
        >>> # F = 0.5 I + diag(1/2, 0) = diag(1, 0.5)
        >>> tuple(float(x) for x in mfac_inverse_product(state, jnp.ones(2), 0.5))
        (1.0, 2.0)
    """
    _check_positive("mfac_inverse_product", "damping", damping)
    vector = jnp.asarray(vector)
    if vector.shape != state.gradients.shape[1:]:
        raise ValueError(
            f"mfac_inverse_product: vector has shape {vector.shape}, the window's gradients "
            f"have shape {state.gradients.shape[1:]}.")
    num_gradients = state.gram.shape[0]
    system = state.gram + num_gradients * damping * jnp.eye(num_gradients, dtype=state.gram.dtype)
    coefficients = jsl.cho_solve(jsl.cho_factor(system, lower=True), state.gradients @ vector)
    return (vector - coefficients @ state.gradients) / damping


def _rank_one_update(factor: jax.Array, vector: jax.Array) -> jax.Array:
    """Lower Cholesky factor of `factor factorᵀ + vector vectorᵀ` in `O(n²)`, vectorised.

    `L L̃ᵀ = L (I + p pᵀ) Lᵀ` with `p = L⁻¹ v`, and `chol(I + p pᵀ) = diag(c) + strict
    lower part of p qᵀ` (`c_k = √(s_k/s_{k-1})`, `q_k = p_k/√(s_k s_{k-1})`,
    `s_k = 1 + Σ_{j≤k} p_j²`), so column `k` of the new factor is
    `c_k L[:, k] + q_k Σ_{i>k} p_i L[:, i]`.
    """
    p = jsl.solve_triangular(factor, vector, lower=True)
    s = 1.0 + jnp.cumsum(p * p)
    s_before = jnp.concatenate([jnp.ones((1,), s.dtype), s[:-1]])
    c = jnp.sqrt(s / s_before)
    q = p / jnp.sqrt(s * s_before)
    weighted = factor * p[None, :]
    # suffix sums over columns i > k: total minus inclusive prefix sums
    after = jnp.sum(weighted, axis=1, keepdims=True) - jnp.cumsum(weighted, axis=1)
    return factor * c[None, :] + after * q[None, :]


def _slide(factor: jax.Array, dots_age: jax.Array, diagonal_shift) -> jax.Array:
    """The age-ordered Cholesky factor after dropping the oldest gradient (position 0) and
    appending the newest, whose dot products with the window (age order, itself last) are
    `dots_age`. `O(m²)`."""
    m = factor.shape[0]
    if m == 1:
        return jnp.sqrt(dots_age[-1:] + diagonal_shift)[:, None]
    kept = _rank_one_update(factor[1:, 1:], factor[1:, 0])
    row = jsl.solve_triangular(kept, dots_age[:-1], lower=True)
    corner = jnp.sqrt(jnp.maximum(dots_age[-1] + diagonal_shift - row @ row, diagonal_shift))
    top = jnp.concatenate([kept, jnp.zeros((m - 1, 1), factor.dtype)], axis=1)
    bottom = jnp.concatenate([row, corner[None]])[None, :]
    return jnp.concatenate([top, bottom], axis=0)


def mfac(num_gradients: int = 32, damping: float = 1e-4) -> optax.GradientTransformation:
    """M-FAC preconditioning: `g ↦ F⁻¹ g`, `F = λ I + (1/m) Σ_{last m} g_i g_iᵀ`.

    The dynamic algorithm of Frantar, Kurtic and Alistarh (NeurIPS 2021): each update
    inserts the gradient `g` into a sliding window of the last `m = num_gradients`
    gradients (replacing the oldest), then returns the inverse damped empirical-Fisher
    product `F⁻¹ g` with the window including `g`, through the Woodbury identity
    `F⁻¹ v = (v - Gᵀ (m λ I + G Gᵀ)⁻¹ G v) / λ`. Per step: `O(d m)` for the new dot
    products `G g` and for `Gᵀ` times the coefficients, and `O(m²)` to slide the Cholesky
    factor of `m λ I + G Gᵀ` (a stable rank-one update for the gradient that leaves and a
    triangular solve for the one that enters; the paper refactors in `O(m³)`) and to
    solve with it; memory `O(d m)`.

    The output is a preconditioned gradient, not a step: chain it with a learning rate,
    `optax.chain(mfac(...), optax.scale_by_learning_rate(1e-3))`. Parameters may be any
    pytree (the window holds flattened gradients). With gradient *estimates* (px.fit on an
    expectation with sample sites) each update is `F̂⁻¹ ĝ` with `F̂` built from the same
    estimates, a preconditioned direction whose mean is not `F⁻¹ ∇f` (the inverse of an
    estimate is biased): a heuristic preconditioner, like Adam's.

    Args:
        num_gradients: `m`, the window length (at least 1).
        damping: `λ > 0`. Small `λ` trusts the window's span fully and scales directions
            outside it by `1/λ`.

    Returns:
        An `optax.GradientTransformation` with state `MFACState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> transformation = mfac(num_gradients=2, damping=1.0)
        >>> state = transformation.init(jnp.zeros(2))
        >>> direction, state = transformation.update(jnp.array([2.0, 0.0]), state)
        >>> # F = I + g gᵀ / 2 = diag(3, 1), so F⁻¹ g = (2/3, 0)
        >>> round(float(direction[0]), 4), float(direction[1])
        (0.6667, 0.0)
        >>> optimiser = optax.chain(mfac(num_gradients=16, damping=1e-3),
        ...                         optax.scale_by_learning_rate(1e-2))
    """
    _check_count("mfac", "num_gradients", num_gradients)
    _check_positive("mfac", "damping", damping)
    num_gradients = int(num_gradients)

    def init(params) -> MFACState:
        flat, _ = ravel_pytree(params)
        if flat.size == 0:
            raise ValueError("mfac needs parameters: params has no array leaves.")
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            raise TypeError(f"mfac preconditions floating-point parameters, got {flat.dtype}.")
        shift = num_gradients * damping
        return MFACState(jnp.zeros((num_gradients, flat.size), flat.dtype),
                         jnp.zeros((num_gradients, num_gradients), flat.dtype),
                         jnp.zeros((), jnp.int32),
                         jnp.sqrt(jnp.asarray(shift, flat.dtype)) * jnp.eye(num_gradients,
                                                                            dtype=flat.dtype))

    def update(updates, state: MFACState, params=None):
        del params
        flat, unravel = ravel_pytree(updates)
        if flat.shape != state.gradients.shape[1:]:
            raise ValueError(
                f"mfac: the gradient has {flat.size} entries, the window was initialised for "
                f"{state.gradients.shape[1]}.")
        if state.factor is None:
            raise ValueError("mfac: the state has no Cholesky factor; build it with "
                             "mfac(...).init(params).")
        dtype = state.gradients.dtype
        flat = flat.astype(dtype)
        slot = state.count % num_gradients
        gradients = state.gradients.at[slot].set(flat)
        dots = gradients @ flat  # the new row (and column) of G Gᵀ: O(d m)
        gram = state.gram.at[slot, :].set(dots).at[:, slot].set(dots)
        # age order after the insertion: position k is slot (count + 1 + k) % m, newest last
        order = (state.count + 1 + jnp.arange(num_gradients)) % num_gradients
        dots_age = dots[order]
        shift = jnp.asarray(num_gradients * damping, dtype)
        eye = jnp.eye(num_gradients, dtype=dtype)
        factor = jax.lax.cond(
            # once per wrap of the window a fresh factorisation (O(m³) every m steps, so
            # O(m²) amortised) bounds the round-off the sliding updates accumulate
            (state.count + 1) % num_gradients == 0,
            lambda: jnp.linalg.cholesky(gram[order][:, order] + shift * eye),
            lambda: _slide(state.factor, dots_age, shift))

        def solve(rhs):  # (m λ I + G Gᵀ)⁻¹ rhs, rhs and result in ring order
            out = jsl.cho_solve((factor, True), rhs[order])
            return jnp.zeros_like(out).at[order].set(out)

        coefficients = solve(dots)
        # one step of iterative refinement against the exact Gram matrix (O(m²))
        coefficients = coefficients + solve(dots - gram @ coefficients - shift * coefficients)
        direction = (flat - coefficients @ gradients) / damping  # (m,)·(m, d): one pass
        return unravel(direction), MFACState(gradients, gram, state.count + 1, factor)

    return optax.GradientTransformation(init, update)
