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


_AUCTION_BIDDERS = 32  # unassigned persons bidding per round (block Jacobi auction)
_AUCTION_FIRST_EPSILON = 0.25  # of the cost range; the first epsilon-scaling phase
_AUCTION_SCALING = 8.0  # epsilon divided by this between phases
_AUCTION_MAX_ROUNDS = 200_000  # per phase; a guard against float pathologies only


def _check_tolerance(tolerance, who):
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            0.0 < float(tolerance) <= 1.0):
        raise ValueError(f"{who}: tolerance must be a float in (0, 1], got {tolerance!r}.")
    return float(tolerance)


def auction_assignment(cost: ArrayLike, *, tolerance: float = 1e-3) -> Array:
    """A permutation `j` with `Σ_i cost[i, j[i]]` within `tolerance × (max cost − min cost)`
    of the minimum over all permutations: Bertsekas' auction algorithm with ε-scaling.

    Persons (rows) bid for objects (columns) at prices `p`; a person bids for its best
    object `j₁` (least `cost[i, j] + p[j]`), raising its price by the margin to the second
    best plus `ε`. At the end of a phase every row holds an object within `ε` of its best
    (ε-complementary slackness), so the total cost is within `n ε` of optimal (Bertsekas
    1988, "The auction algorithm: a distributed relaxation method for the assignment
    problem"). Phases run with `ε = 0.25, 0.25/8, …` down to `tolerance / n` (relative to
    the cost range), each started from the previous phase's prices; up to 32 unassigned
    rows bid per round (a block Jacobi auction). All of it is `jax.lax` loops: it jits,
    vmaps over a batch of cost matrices and runs inside a training step.

    Exactness: it is *exactly* optimal when the optimum beats every other permutation by
    more than `tolerance × (max cost − min cost)`, e.g. for integer costs whose range
    times `tolerance` is below 1; otherwise it is optimal to within that bound (plus
    float rounding, about `n` units in the last place of the scaled costs). The result is
    always a permutation.

    Args:
        cost: a square matrix `(n, n)`.
        tolerance: the bound on the excess total cost, relative to the cost range, in
            `(0, 1]`; smaller costs more phases (one per factor 8).

    Returns:
        The column `j[i]` assigned to each row `i`, int32 of shape `(n,)`.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import auction_assignment
        >>> cost = jnp.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
        >>> tuple(int(j) for j in auction_assignment(cost))
        (1, 0, 2)
    """
    tolerance = _check_tolerance(tolerance, "auction_assignment")
    cost = jnp.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] == 0:
        raise ValueError(f"auction_assignment: cost must be a non-empty square matrix, got "
                         f"shape {cost.shape}.")
    if not jnp.issubdtype(cost.dtype, jnp.floating):
        cost = cost.astype(jnp.result_type(float))
    n = cost.shape[0]
    if n == 1:
        return jnp.zeros(1, jnp.int32)
    dtype = cost.dtype
    cost = jax.lax.stop_gradient(cost)
    low = jnp.min(cost)
    span = jnp.max(cost) - low
    # benefits in [-1, 0]; a constant matrix (span 0) makes every permutation optimal
    benefit = -(cost - low) / jnp.where(span > 0, span, 1.0)
    epsilons = [_AUCTION_FIRST_EPSILON]
    while epsilons[-1] > tolerance / n:
        epsilons.append(max(epsilons[-1] / _AUCTION_SCALING, tolerance / n))
    num_bid = min(_AUCTION_BIDDERS, n)
    rows_k = jnp.arange(num_bid)
    neg_inf = jnp.array(-jnp.inf, dtype)
    spacing = jnp.finfo(dtype).eps

    def phase(prices, epsilon):
        def unfinished(state):
            person, _, _, rounds = state
            return jnp.any(person < 0) & (rounds < _AUCTION_MAX_ROUNDS)

        def bidding_round(state):
            person, owner, prices, rounds = state
            bidders = jnp.nonzero(person < 0, size=num_bid, fill_value=n)[0]
            valid = bidders < n
            values = benefit[jnp.minimum(bidders, n - 1)] - prices  # (num_bid, n)
            best = jnp.argmax(values, axis=1)
            first = values[rows_k, best]
            second = jnp.max(values.at[rows_k, best].set(neg_inf), axis=1)
            bid = jnp.where(valid, prices[best] + (first - second) + epsilon, neg_inf)
            top = jnp.full(n, neg_inf).at[best].max(bid)
            # the highest bid on each object wins (the lowest row on ties)
            contender = jnp.where(valid & (bid >= top[best]), bidders, n)
            winner = jnp.full(n, n, jnp.int32).at[best].min(contender.astype(jnp.int32))
            wins = valid & (winner[best] == bidders)
            objects = jnp.where(wins, best, n)  # n: dropped by the scatters
            displaced = jnp.where(wins, owner[best], -1)
            person = person.at[jnp.where(displaced >= 0, displaced, n)].set(-1, mode="drop")
            person = person.at[jnp.where(wins, bidders, n)].set(best.astype(jnp.int32),
                                                                 mode="drop")
            owner = owner.at[objects].set(bidders.astype(jnp.int32), mode="drop")
            # strictly increasing prices, even where the increment is below float spacing
            old = prices[best]
            raised = jnp.maximum(bid, old + 2 * spacing * jnp.maximum(jnp.abs(old), 1.0))
            prices = prices.at[objects].set(raised, mode="drop")
            return person, owner, prices, rounds + 1

        start = (jnp.full(n, -1, jnp.int32), jnp.full(n, -1, jnp.int32), prices, 0)
        person, owner, prices, _ = jax.lax.while_loop(unfinished, bidding_round, start)
        return prices, (person, owner)

    _, (person, owner) = jax.lax.scan(phase, jnp.zeros(n, dtype),
                                      jnp.asarray(epsilons, dtype))
    person, owner = person[-1], owner[-1]
    # only if the round guard stopped a phase: the free objects to the free rows, in order
    free_objects = jnp.argsort(owner >= 0, stable=True).astype(jnp.int32)
    free_rank = jnp.cumsum(person < 0) - 1
    return jnp.where(person < 0, free_objects[jnp.maximum(free_rank, 0)], person)


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
    `AuctionOTCoupling` reaches the same optimum up to a stated tolerance with a
    different loop structure (its speed relative to this one depends on the data); use
    smaller minibatches or `EntropicOTCoupling` for larger ones.

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


class AuctionOTCoupling(AbstractCoupling):
    """The optimal-transport permutation of the minibatch for the squared Euclidean cost,
    by the auction algorithm (`auction_assignment`): JAX loops that jit and vmap inside
    the training step.

    Cost: about a thousand bidding rounds of `O(32 b)` work for `b = 256` points from a
    Gaussian to two moons; on a CPU that is of the order of the Hungarian
    `ExactOTCoupling` (sometimes faster, sometimes slower) and far above the cost of a
    small model's step (see benchmarks/bench_cfm.py).

    The pairing is a permutation (no duplicated targets) whose total squared distance is
    within `tolerance × (max − min squared distance)` of the optimal one, and equal to it
    whenever the optimum wins by more than that (on random minibatches in practice).

    Args:
        tolerance: the bound on the excess total cost relative to the cost range.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import AuctionOTCoupling
        >>> x0 = jnp.array([[0.0], [1.0]]); x1 = jnp.array([[1.1], [0.1]])
        >>> tuple(int(j) for j in AuctionOTCoupling().match(x0, x1))
        (1, 0)
    """

    tolerance: float = eqx.field(default=1e-3, static=True)

    def __check_init__(self):
        _check_tolerance(self.tolerance, "AuctionOTCoupling")

    def match(self, x0, x1, uniforms=None):
        x0, x1 = _check_batches(x0, x1, "AuctionOTCoupling")
        return auction_assignment(squared_distances(x0, x1), tolerance=self.tolerance)


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
                  "auction_ot": AuctionOTCoupling, "entropic_ot": EntropicOTCoupling}


def as_coupling(coupling: AbstractCoupling | str) -> AbstractCoupling:
    """A coupling, or the one named `"independent"`, `"exact_ot"`, `"auction_ot"` or
    `"entropic_ot"`."""
    if isinstance(coupling, AbstractCoupling):
        return coupling
    if isinstance(coupling, str):
        if coupling not in COUPLING_NAMES:
            raise ValueError(f"unknown coupling {coupling!r}; known: "
                             f"{sorted(COUPLING_NAMES)} (or pass a px.flows.AbstractCoupling).")
        return COUPLING_NAMES[coupling]()
    raise TypeError(f"coupling must be a px.flows.AbstractCoupling or a name, got "
                    f"{type(coupling).__name__}.")
