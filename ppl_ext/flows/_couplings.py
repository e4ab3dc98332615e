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
import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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


@jax.jit  # compiled once per shape also when called eagerly (op by op it is slow)
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


_EXACT_SOLVERS = ("pot", "scipy", "hungarian")


def _lsa_permutation(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    out = np.empty(cost.shape[0], np.int32)
    out[rows] = cols
    return out


def _emd_permutation(cost: np.ndarray) -> np.ndarray:
    """The optimal permutation by POT's network simplex (`ot.emd`) with uniform marginals.

    The simplex ends at a vertex of the scaled Birkhoff polytope, a permutation matrix;
    if it stops early (iteration limit) or its plan is not a permutation (degenerate
    pivoting in floating point), the assignment is solved again by scipy, so the result
    is always an optimal permutation."""
    import warnings

    from ot.lp import emd

    n = cost.shape[0]
    marginal = np.full(n, 1.0 / n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an early stop is read from `result_code` below
        plan, log = emd(marginal, marginal, cost, numItermax=max(100_000, 100 * n * n),
                        log=True)
    if log.get("result_code") == 1:
        out = np.argmax(plan, axis=1).astype(np.int32)
        if (np.all(plan[np.arange(n), out] > 0.5 / n)
                and np.array_equal(np.bincount(out, minlength=n), np.ones(n, np.int64))):
            return out
    return _lsa_permutation(cost)


def _host_assignment(x0: np.ndarray, x1: np.ndarray, *, solver: str) -> np.ndarray:
    """On the host: the optimal permutations of a batch `(..., n, dim)` of minibatch pairs
    for the squared Euclidean cost, computed in float64 (`scipy.spatial.distance.cdist`)
    and solved by POT's `ot.emd` (`solver="pot"`) or
    `scipy.optimize.linear_sum_assignment` (`solver="scipy"`)."""
    from scipy.spatial.distance import cdist

    x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    n, dim = x0.shape[-2:]
    flat0, flat1 = x0.reshape(-1, n, dim), x1.reshape(-1, n, dim)
    out = np.empty((flat0.shape[0], n), np.int32)
    solve = _emd_permutation if solver == "pot" else _lsa_permutation
    for k in range(flat0.shape[0]):
        cost = cdist(flat0[k], flat1[k], "sqeuclidean")
        if not np.all(np.isfinite(cost)):
            raise ValueError(f"ExactOTCoupling(solver={solver!r}): the cost matrix has NaN "
                             "or infinite entries (x0 or x1 is not finite).")
        out[k] = solve(cost)
    return out.reshape(x0.shape[:-1])


def _check_finite(x, name, who):
    """A clear error for non-finite concrete inputs (traced values are checked where the
    solver runs: on the host for `"scipy"`)."""
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{who}: {name} has NaN or infinite entries; the cost matrix "
                         "would not be finite.")


class ExactOTCoupling(AbstractCoupling):
    """The exact optimal-transport permutation of the minibatch for the squared Euclidean
    cost.

    Solvers:

    - `"pot"` (default): POT's network simplex (`ot.emd`, what torchcfm uses) with
      uniform marginals, on the cost computed in float64; its plan is a permutation
      matrix, read off by rows (checked; if the simplex stops early the assignment is
      solved again by `"scipy"`). On this project's CPU it takes about 1 ms for
      `b = 128` and 13 ms for `b = 256` (2-D Gaussian to two moons), about half of
      `"scipy"`'s time on such costs.
    - `"scipy"`: `scipy.optimize.linear_sum_assignment` (a C++ shortest augmenting path
      method, `O(b³)` worst case), also in float64.

      Both host solvers are called through `jax.pure_callback`, so they jit, vmap (a
      batch of minibatches is solved in one host call, one after the other) and run
      inside a training step. They run on the *host CPU*: on an accelerator each call is
      a device-to-host-to-device round trip of the minibatch and the indices, and they
      are not differentiable (the indices are integers; inputs are passed through
      `stop_gradient`). Non-finite points raise an error from the callback (a
      `ValueError` when called outside `jit`).
    - `"hungarian"`: `optax.assignment.hungarian_algorithm` in JAX (`O(b³)`), on the cost
      in the input dtype: no host round trip (for accelerators), but about 0.4 s per
      256-point minibatch on a CPU. Non-finite points raise a `ValueError` outside
      `jit` only (inside, the result is then an arbitrary permutation).

    All three return an optimal permutation (ties broken differently); `AuctionOTCoupling` is
    a JAX alternative optimal up to a stated tolerance; `EntropicOTCoupling` for larger
    minibatches.

    Args:
        solver: `"pot"`, `"scipy"` or `"hungarian"`.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import ExactOTCoupling
        >>> x0 = jnp.array([[0.0], [1.0]]); x1 = jnp.array([[1.1], [0.1]])
        >>> tuple(int(j) for j in ExactOTCoupling().match(x0, x1))
        (1, 0)
        >>> tuple(int(j) for j in ExactOTCoupling(solver="hungarian").match(x0, x1))
        (1, 0)
    """

    solver: str = eqx.field(default="pot", static=True)

    def __check_init__(self):
        if self.solver not in _EXACT_SOLVERS:
            raise ValueError(f"ExactOTCoupling: solver must be one of {_EXACT_SOLVERS}, got "
                             f"{self.solver!r}.")

    def match(self, x0, x1, uniforms=None):
        who = "ExactOTCoupling"
        x0, x1 = _check_batches(x0, x1, who)
        _check_finite(x0, "x0", who)
        _check_finite(x1, "x1", who)
        x0, x1 = jax.lax.stop_gradient(x0), jax.lax.stop_gradient(x1)
        if self.solver == "hungarian":
            return _assignment(squared_distances(x0, x1))
        result = jax.ShapeDtypeStruct(x0.shape[:1], jnp.int32)
        return jax.pure_callback(functools.partial(_host_assignment, solver=self.solver),
                                 result, x0, x1, vmap_method="broadcast_all")


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


@eqx.filter_jit  # compiled also when called eagerly (ott-jax op by op is slow)
def _sinkhorn_plan(x0, x1, epsilon):
    from ott.geometry import pointcloud
    from ott.solvers import linear

    geometry = pointcloud.PointCloud(x0, x1, epsilon=epsilon, scale_cost="mean")
    return linear.solve(geometry).matrix


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
        x0, x1 = _check_batches(x0, x1, "EntropicOTCoupling")
        return _sinkhorn_plan(x0, x1, self.epsilon)

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
