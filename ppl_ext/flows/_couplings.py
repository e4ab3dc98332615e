"""Minibatch couplings: which `x1` of a minibatch each `x0` is paired with.

A coupling maps a minibatch `x0 (b, dim)`, `x1 (b, dim)` and `b` uniforms (its only
randomness, drawn by the loss as a parameter-free sample site) to indices `j (b,)`: the
pairs are `(x0[i], x1[j[i]])`. Minibatch optimal-transport couplings straighten the
learned flow (Tong et al. 2024, "Improving and generalizing flow-based generative models
with minibatch optimal transport"; Pooladian et al. 2023, "Multisample flow matching").
The flow then transports the source to the *minibatch-coupled* target marginal, which is
still the data distribution: every coupling here leaves both marginals unchanged
(a permutation, or row sampling from a plan with uniform marginals).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike


def _check_batches(x0, x1, who: str):
    x0, x1 = jnp.asarray(x0), jnp.asarray(x1)
    if x0.ndim != 2 or x1.ndim != 2 or x0.shape != x1.shape:
        raise ValueError(f"{who}: x0 and x1 must both have shape (batch, dim), got "
                         f"{x0.shape} and {x1.shape}.")
    if x0.shape[0] == 0:
        raise ValueError(f"{who}: empty minibatch.")
    return x0, x1


def squared_distances(x0: ArrayLike, x1: ArrayLike) -> Array:
    """The cost matrix `C[i, j] = |x0[i] - x1[j]|²`."""
    x0, x1 = jnp.asarray(x0), jnp.asarray(x1)
    return jnp.sum((x0[:, None, :] - x1[None, :, :]) ** 2, axis=-1)


def _assignment(cost: Array) -> Array:
    """The permutation `j` minimising `Σ_i cost[i, j[i]]` (Hungarian algorithm)."""
    rows, cols = optax.assignment.hungarian_algorithm(cost)
    return jnp.zeros(cost.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))


class AbstractCoupling(eqx.Module):
    """A minibatch coupling; `match(x0, x1, uniforms)` returns the indices `j`.

    `random` says whether `match` reads its uniforms (losses draw them only then).
    """

    random: ClassVar[bool] = False

    @abc.abstractmethod
    def match(self, x0: ArrayLike, x1: ArrayLike, uniforms: ArrayLike | None = None) -> Array:
        """Indices `j` of shape `(batch,)`: `x0[i]` is paired with `x1[j[i]]`."""


class IndependentCoupling(AbstractCoupling):
    """Pair `x0[i]` with `x1[i]`: the independent (product) coupling of the minibatches."""

    def match(self, x0, x1, uniforms=None):
        x0, _ = _check_batches(x0, x1, "IndependentCoupling")
        return jnp.arange(x0.shape[0], dtype=jnp.int32)


class ExactOTCoupling(AbstractCoupling):
    """The exact optimal-transport permutation of the minibatch for the squared Euclidean
    cost, by the Hungarian algorithm (`optax.assignment.hungarian_algorithm`, `O(b³)`).

    Cost: it dominates a training step beyond a few dozen points (on a CPU, about
    0.15 s per 256-point minibatch against 3 ms for the rest of a small model's step);
    use smaller minibatches or `EntropicOTCoupling` for larger ones.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import ExactOTCoupling
        >>> x0 = jnp.array([[0.0], [1.0]]); x1 = jnp.array([[1.1], [0.1]])
        >>> tuple(int(j) for j in ExactOTCoupling().match(x0, x1))
        (1, 0)
    """

    def match(self, x0, x1, uniforms=None):
        x0, x1 = _check_batches(x0, x1, "ExactOTCoupling")
        return _assignment(squared_distances(x0, x1))


class EntropicOTCoupling(AbstractCoupling):
    """Entropic optimal transport of the minibatch (Sinkhorn, through ott-jax).

    Solves `min_P <P, C> - ε H(P)` with uniform marginals for the squared Euclidean cost
    `C` (scaled by its mean, so `epsilon` is relative). Then:

    - `permutation=False` (default): each `x0[i]` draws its partner from row `i` of the
      plan, `j[i] ~ P[i, :] / P[i, :].sum()` (by inverse CDF from the loss's uniforms).
      A pair `(x0[i], x1[j[i]])` with `i` uniform is then distributed as the plan itself
      (Tong et al.'s sampling), but different rows may pick the same `x1`: it is not a
      permutation, and the `x1` marginal within one minibatch is only right on average.
    - `permutation=True`: the permutation of largest plan probability (Hungarian
      algorithm on `-log P`), deterministic; it tends to the exact OT permutation as
      `epsilon → 0` and to an arbitrary one as `epsilon` grows.

    Args:
        epsilon: the entropic regularisation, relative to the mean cost, `> 0`.
        permutation: return a permutation (see above).
    """

    epsilon: float = 0.05
    permutation: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        if not isinstance(self.epsilon, jax.core.Tracer) and not float(self.epsilon) > 0:
            raise ValueError(f"EntropicOTCoupling: epsilon must be > 0, got {self.epsilon!r}.")

    @property
    def random(self) -> bool:  # type: ignore[override]
        return not self.permutation

    def plan(self, x0: ArrayLike, x1: ArrayLike) -> Array:
        """The Sinkhorn plan `P` (rows and columns each sum to `1/batch`)."""
        from ott.geometry import pointcloud
        from ott.solvers import linear

        x0, x1 = _check_batches(x0, x1, "EntropicOTCoupling")
        geometry = pointcloud.PointCloud(x0, x1, epsilon=self.epsilon, scale_cost="mean")
        return linear.solve(geometry).matrix

    def match(self, x0, x1, uniforms=None):
        x0, x1 = _check_batches(x0, x1, "EntropicOTCoupling")
        if not self.permutation:
            if uniforms is None:
                raise ValueError("EntropicOTCoupling(permutation=False).match needs "
                                 "uniforms of shape (batch,) to sample from the plan's rows.")
            uniforms = jnp.asarray(uniforms)
            if uniforms.shape != (x0.shape[0],):
                raise ValueError(f"EntropicOTCoupling: uniforms must have shape "
                                 f"({x0.shape[0]},), got {uniforms.shape}.")
        plan = jax.lax.stop_gradient(self.plan(x0, x1))
        if self.permutation:
            return _assignment(-jnp.log(jnp.maximum(plan, jnp.finfo(plan.dtype).tiny)))
        cumulative = jnp.cumsum(plan, axis=1)
        threshold = uniforms[:, None] * cumulative[:, -1:]
        return jnp.argmax(cumulative > threshold, axis=1).astype(jnp.int32)


#: coupling names accepted where a coupling may be given by name
COUPLING_NAMES = {"independent": IndependentCoupling, "exact_ot": ExactOTCoupling,
                  "entropic_ot": EntropicOTCoupling}


def as_coupling(coupling: AbstractCoupling | str) -> AbstractCoupling:
    """A coupling, or the one named `"independent"`, `"exact_ot"` or `"entropic_ot"`."""
    if isinstance(coupling, AbstractCoupling):
        return coupling
    if isinstance(coupling, str):
        if coupling not in COUPLING_NAMES:
            raise ValueError(f"unknown coupling {coupling!r}; known: "
                             f"{sorted(COUPLING_NAMES)} (or pass a px.flows.AbstractCoupling).")
        return COUPLING_NAMES[coupling]()
    raise TypeError(f"coupling must be a px.flows.AbstractCoupling or a name, got "
                    f"{type(coupling).__name__}.")
