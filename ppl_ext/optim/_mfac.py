"""M-FAC: inverse empirical-Fisher preconditioning over a sliding window of gradients.

Frantar, Kurtic and Alistarh, "M-FAC: Efficient matrix-free approximations of
second-order information", NeurIPS 2021 (the "dynamic algorithm", their Section 3.2 and
the optimiser of their Section 5). The curvature is the damped empirical Fisher of the
last `m` gradients `g_1, ..., g_m` (rows of `G`, shape `(m, d)`):

    F = λ I + (1/m) Σ_i g_i g_iᵀ = λ I + GᵀG / m,

and the update is `F⁻¹ g` for the newest gradient `g` (inserted into the window first).
By the Woodbury identity

    F⁻¹ v = (v - Gᵀ (m λ I + G Gᵀ)⁻¹ G v) / λ,

so only the `m × m` Gram matrix `G Gᵀ` is needed besides `G`. Per gradient the window
replaces its oldest row (a ring buffer) and one row and column of the Gram matrix
(`O(d m)`), and refactors `m λ I + G Gᵀ` by Cholesky (`O(m³)`, the paper's bound for
adding or removing a gradient; its LU without pivoting of the same symmetric positive
definite matrix is this factorisation up to scaling); a product costs `O(d m + m²)`.
Unfilled slots hold zeros, so while the window fills `F` is `λ I + (1/m) Σ_{i ≤ t} g_i
g_iᵀ` with the paper's fixed `1/m`.
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
    """State of `mfac`: the gradient window, its Gram matrix and the step count.

    Attributes:
        gradients: `(num_gradients, d)` the window `G` of flattened gradients (a ring
            buffer; unfilled rows are zero).
        gram: `(num_gradients, num_gradients)` the Gram matrix `G Gᵀ`.
        count: int32 scalar, the number of gradients inserted so far (the next one goes
            to row `count % num_gradients`).

    Example:
        >>> import jax.numpy as jnp
        >>> state = MFACState(jnp.zeros((4, 3)), jnp.zeros((4, 4)), jnp.array(0))
        >>> state.gradients.shape
        (4, 3)
    """

    gradients: jax.Array
    gram: jax.Array
    count: jax.Array


def mfac_inverse_product(state: MFACState, vector: jax.Array, damping: float) -> jax.Array:
    """`F⁻¹ v` for the window of `state`: `F = damping · I + GᵀG / num_gradients`.

    By the Woodbury identity `F⁻¹ v = (v - Gᵀ (m λ I + G Gᵀ)⁻¹ G v) / λ`, with a Cholesky
    solve of the `m × m` system (`O(d m + m³)` here; `mfac` reuses the factorisation).

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
    vector = jnp.asarray(vector)
    if vector.shape != state.gradients.shape[1:]:
        raise ValueError(
            f"mfac_inverse_product: vector has shape {vector.shape}, the window's gradients "
            f"have shape {state.gradients.shape[1:]}.")
    factor = _factor(state.gram, damping)
    return _solve(state.gradients, factor, vector, damping)


def _factor(gram, damping):
    num_gradients = gram.shape[0]
    system = gram + num_gradients * damping * jnp.eye(num_gradients, dtype=gram.dtype)
    return jsl.cho_factor(system, lower=True)


def _solve(gradients, factor, vector, damping):
    coefficients = jsl.cho_solve(factor, gradients @ vector)
    return (vector - gradients.T @ coefficients) / damping


def mfac(num_gradients: int = 32, damping: float = 1e-4) -> optax.GradientTransformation:
    """M-FAC preconditioning: `g ↦ F⁻¹ g`, `F = λ I + (1/m) Σ_{last m} g_i g_iᵀ`.

    The dynamic algorithm of Frantar, Kurtic and Alistarh (NeurIPS 2021): each update
    inserts the gradient `g` into a sliding window of the last `m = num_gradients`
    gradients (replacing the oldest), then returns the inverse damped empirical-Fisher
    product `F⁻¹ g` with the window including `g`, through the Woodbury identity
    `F⁻¹ v = (v - Gᵀ (m λ I + G Gᵀ)⁻¹ G v) / λ` on the `m × m` Gram matrix. Per step:
    `O(d m)` to update the window and its Gram matrix, `O(m³)` to refactor it (the
    paper's cost of adding a gradient), `O(d m)` for the product; memory `O(d m)`.

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
        return MFACState(jnp.zeros((num_gradients, flat.size), flat.dtype),
                         jnp.zeros((num_gradients, num_gradients), flat.dtype),
                         jnp.zeros((), jnp.int32))

    def update(updates, state: MFACState, params=None):
        del params
        flat, unravel = ravel_pytree(updates)
        if flat.shape != state.gradients.shape[1:]:
            raise ValueError(
                f"mfac: the gradient has {flat.size} entries, the window was initialised for "
                f"{state.gradients.shape[1]}.")
        flat = flat.astype(state.gradients.dtype)
        slot = state.count % num_gradients
        gradients = state.gradients.at[slot].set(flat)
        dots = gradients @ flat  # the new row (and column) of G Gᵀ
        gram = state.gram.at[slot, :].set(dots).at[:, slot].set(dots)
        factor = _factor(gram, damping)
        coefficients = jsl.cho_solve(factor, dots)  # G g is the new Gram row
        direction = (flat - gradients.T @ coefficients) / damping
        return unravel(direction), MFACState(gradients, gram, state.count + 1)

    return optax.GradientTransformation(init, update)

