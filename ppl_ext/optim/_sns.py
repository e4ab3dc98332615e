"""Sinkhorn-Newton-Sparse: entropic optimal transport by Sinkhorn, then sparse Newton steps.

Tang, Shavlovsky, Rahmanian, Tardini, Thekumparampil, Xiao and Ying, "Accelerating
Sinkhorn algorithm with sparse Newton iterations", ICLR 2024 (arXiv:2401.12253).

The balanced entropic problem between marginals `a` (n) and `b` (m) with cost `C` and
regularisation `ε` has the concave dual (ott-jax's convention)

    D(f, g) = <a, f> + <b, g> - ε Σ_ij exp((f_i + g_j - C_ij) / ε),

whose maximiser gives the plan `P_ij = exp((f_i + g_j - C_ij) / ε)` with `P 1 = a` and
`Pᵀ 1 = b`. Sinkhorn is block coordinate ascent on `D`. SNS runs a few Sinkhorn sweeps and
then Newton steps on `L = -D`, whose gradient is `(P 1 - a, Pᵀ 1 - b)` and Hessian

    ∇²L = (1/ε) [[diag(P 1), P], [Pᵀ, diag(Pᵀ 1)]].

The off-diagonal block is replaced by a sparse `S ≤ P` that keeps, in each row and each
column of `P`, its `num_kept` largest entries (a fixed-size pattern, so the solver jits
and vmaps), the diagonal kept exact. `xᵀ H_S x = Σ S_ij (x_i + y_j)² + Σ_i (P1 - S1)_i x_i²
+ Σ_j (Pᵀ1 - Sᵀ1)_j y_j² ≥ 0`, so the sparsified Hessian is positive semi-definite with at
most the null direction `(1, -1)` (a constant shift of the potentials, which the gradient
is orthogonal to); a small ridge makes it definite. The Newton direction solves
`H_S d = -∇L` by Jacobi-preconditioned conjugate gradients (`jax.scipy.sparse.linalg.cg`)
with a gather / `segment_sum` mat-vec of cost `O((n + m) num_kept)` (small systems,
`n + m <= max_dense_size`, by a dense Cholesky factorisation instead), and a backtracking
(Armijo) line search on `L` sets the step; a failed line search falls back to one
Sinkhorn sweep. Sparsification changes only the path: the iteration stops where the
exact gradient `(P 1 - a, Pᵀ 1 - b)` vanishes, Sinkhorn's fixed point.

It is a solver, not an objective back-end: it does not join `BACKENDS` (`px.fit` has no
use for it); its output mirrors ott-jax's `SinkhornOutput`, so code that calls
`ott.solvers.linear.sinkhorn.Sinkhorn()(ot_prob)` can call `SinkhornNewtonSparse()(ot_prob)`.
Gradients come by implicit differentiation of the optimality conditions with ott-jax's
`ImplicitDiff`, exactly as ott's Sinkhorn computes them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # ott loads on first use: `import ppl_ext` stays light
    from ott.geometry.geometry import Geometry
    from ott.problems.linear.linear_problem import LinearProblem
    from ott.solvers.linear.sinkhorn import SinkhornOutput

_ARMIJO = 1e-4  # sufficient-decrease constant of the line search (Nocedal and Wright)
_MAX_FORCING = 1e-2  # loosest relative CG tolerance (inexact Newton forcing term)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class SNSOutput(eqx.Module):
    """Result of `SinkhornNewtonSparse`, with the field names of ott-jax's `SinkhornOutput`.

    `errors[i]` is the marginal error `‖P 1 - a‖₁ + ‖Pᵀ 1 - b‖₁` after iteration `i` (the
    Sinkhorn sweeps first, then the Newton steps; during the sweeps, whose row marginals
    are exact, `‖Pᵀ 1 - b‖₁`), `-1` for iterations not run (ott's convention).
    `to_sinkhorn_output()` gives the ott object itself, for every other method of ott's
    output (`apply`, `to_dual_potentials`, ...).

    Example:
        >>> import jax
        >>> from ott.geometry import pointcloud
        >>> x = jax.random.uniform(jax.random.key(0), (20, 2))
        >>> geom = pointcloud.PointCloud(x, x[::-1] + 0.1, epsilon=0.05)
        >>> out = SinkhornNewtonSparse(threshold=1e-5)(geom)
        >>> bool(out.converged), out.matrix.shape
        (True, (20, 20))
    """

    potentials: tuple[jax.Array, jax.Array]
    errors: jax.Array
    reg_ot_cost: jax.Array
    ot_prob: Any
    threshold: jax.Array
    converged: jax.Array
    num_sinkhorn_steps: jax.Array
    num_newton_steps: jax.Array

    @property
    def f(self) -> jax.Array:
        """The first dual potential."""
        return self.potentials[0]

    @property
    def g(self) -> jax.Array:
        """The second dual potential."""
        return self.potentials[1]

    @property
    def geom(self) -> Geometry:
        """The problem's geometry."""
        return self.ot_prob.geom

    @property
    def a(self) -> jax.Array:
        """The first marginal."""
        return self.ot_prob.a

    @property
    def b(self) -> jax.Array:
        """The second marginal."""
        return self.ot_prob.b

    @property
    def n_iters(self) -> jax.Array:
        """Sinkhorn sweeps plus Newton steps run (ott's name)."""
        return self.num_sinkhorn_steps + self.num_newton_steps

    @property
    def matrix(self) -> jax.Array:
        """The transport plan `exp((f_i + g_j - C_ij) / ε)`."""
        return self.ot_prob.geom.transport_from_potentials(self.f, self.g)

    def marginal(self, axis: int) -> jax.Array:
        """Marginal of the plan: `Pᵀ 1` for `axis=0`, `P 1` for `axis=1` (ott's convention)."""
        return self.ot_prob.geom.marginal_from_potentials(self.f, self.g, axis=axis)

    @property
    def primal_cost(self) -> jax.Array:
        """Transport cost `<P, C>` of the plan."""
        return self.to_sinkhorn_output().primal_cost

    @property
    def ent_reg_cost(self) -> jax.Array:
        """Entropy-regularised cost `<P, C> - ε H(P)` (ott's definition)."""
        return self.to_sinkhorn_output().ent_reg_cost

    def to_sinkhorn_output(self) -> SinkhornOutput:
        """The same solution as an ott-jax `SinkhornOutput` (`inner_iterations=1`)."""
        from ott.solvers.linear.sinkhorn import SinkhornOutput

        return SinkhornOutput(self.potentials, errors=self.errors,
                              reg_ot_cost=self.reg_ot_cost, ot_prob=self.ot_prob,
                              threshold=self.threshold, converged=self.converged,
                              inner_iterations=1)


class SinkhornNewtonSparse(eqx.Module):
    r"""Sinkhorn-Newton-Sparse solver for balanced entropic optimal transport.

    Runs at most `num_sinkhorn_steps` Sinkhorn sweeps (log domain), then at most
    `num_newton_steps` Newton steps on the dual with the Hessian's plan block sparsified to
    the `num_kept` largest entries of each row and column of the plan, stopping as soon as
    the marginal error $\|P1 - a\|_1 + \|P^T 1 - b\|_1$ is below `threshold`. The fixed
    point is the exact entropic optimum (sparsification only changes the path). Gradients
    of the outputs with respect to the problem (geometry, marginals) use the implicit
    function theorem on the optimality conditions (ott-jax's `ImplicitDiff`); the
    regularised cost uses Danskin's theorem, as ott's Sinkhorn does.

    Args:
        threshold: marginal-error tolerance for convergence (in float32, about 1e-5 is
            the floor that rounding allows; below it the solver runs all its Newton steps
            and reports `converged=False`).
        num_sinkhorn_steps: maximal Sinkhorn sweeps before the Newton stage (the paper's N1).
        num_newton_steps: maximal Newton steps (the paper's N2).
        num_kept: plan entries kept per row and per column in the sparsified Hessian
            (`None`: `min(n, m, 16)`); at most `min(n, m)`.
        cg_tolerance: tightest relative residual tolerance of the conjugate-gradient
            solve; each Newton step solves to `max(cg_tolerance, min(1e-2, √err))`, `err`
            the current marginal error (inexact Newton: loose far from the optimum).
        max_cg_steps: conjugate-gradient iterations per Newton step.
        max_backtracks: halvings of the step in the line search before falling back to a
            Sinkhorn sweep.
        ridge: ridge added to the sparsified Hessian, relative to its mean diagonal.
        max_dense_size: Newton systems of size `n + m` up to this are solved by a dense
            Cholesky factorisation of the same sparsified Hessian (`O((n + m)³)` per step)
            instead of CG. When few plan entries per row are significant (small `n` with
            small `ε`, e.g. n = 100 at ε = 1/1200) the plan is nearly disconnected, the
            Jacobi-scaled Hessian has several eigenvalues near 0, CG stops far from the
            solution and the error stalls (near 1e-6 there); the dense solve converges.
            0 always uses CG.

    Example:
        >>> import jax
        >>> from ott.geometry import geometry
        >>> from ott.problems.linear import linear_problem
        >>> cost = jax.random.uniform(jax.random.key(0), (30, 30))
        >>> prob = linear_problem.LinearProblem(geometry.Geometry(cost, epsilon=0.01))
        >>> out = SinkhornNewtonSparse(threshold=1e-5, num_kept=5)(prob)
        >>> bool(out.converged), bool(out.errors[out.n_iters - 1] < 1e-5)
        (True, True)

    Reference: Tang et al., "Accelerating Sinkhorn algorithm with sparse Newton
    iterations", ICLR 2024.
    """

    threshold: float = eqx.field(static=True, default=1e-6)
    num_sinkhorn_steps: int = eqx.field(static=True, default=20)
    num_newton_steps: int = eqx.field(static=True, default=100)
    num_kept: int | None = eqx.field(static=True, default=None)
    cg_tolerance: float = eqx.field(static=True, default=1e-7)
    max_cg_steps: int = eqx.field(static=True, default=200)
    max_backtracks: int = eqx.field(static=True, default=40)
    ridge: float = eqx.field(static=True, default=1e-10)
    max_dense_size: int = eqx.field(static=True, default=512)

    def __check_init__(self):
        owner = type(self).__name__
        for name in ("threshold", "cg_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{owner}: `{name}` must be a positive number, got {value!r}")
        for name in ("num_sinkhorn_steps", "num_newton_steps", "max_cg_steps",
                     "max_backtracks", "max_dense_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{owner}: `{name}` must be a non-negative integer, "
                                 f"got {value!r}")
        if self.num_sinkhorn_steps + self.num_newton_steps == 0:
            raise ValueError(f"{owner}: `num_sinkhorn_steps + num_newton_steps` is 0; "
                             "allow at least one iteration")
        if self.num_kept is not None and (
                not isinstance(self.num_kept, (int, np.integer))
                or isinstance(self.num_kept, bool) or self.num_kept < 1):
            raise ValueError(f"{owner}: `num_kept` must be a positive integer or None, "
                             f"got {self.num_kept!r}")
        if not isinstance(self.ridge, (int, float)) or not self.ridge >= 0:
            raise ValueError(f"{owner}: `ridge` must be non-negative, got {self.ridge!r}")

    def __call__(self, ot_prob: LinearProblem | Geometry,
                 init: tuple[jax.Array, jax.Array] | None = None) -> SNSOutput:
        """Solve `ot_prob` (an ott `LinearProblem`, or a geometry with uniform marginals).

        Args:
            ot_prob: the balanced linear problem (`tau_a = tau_b = 1`).
            init: initial potentials `(f, g)`; zeros when `None`.

        Returns:
            An `SNSOutput` (potentials, plan, `reg_ot_cost`, `converged`, `errors`, and the
            numbers of Sinkhorn and Newton iterations run).
        """
        from ott.geometry.geometry import Geometry
        from ott.problems.linear.linear_problem import LinearProblem
        from ott.solvers.linear.sinkhorn import compute_kl_reg_cost

        if isinstance(ot_prob, Geometry):
            ot_prob = LinearProblem(ot_prob)
        if not isinstance(ot_prob, LinearProblem):
            raise TypeError("SinkhornNewtonSparse: `ot_prob` must be an ott LinearProblem or "
                            f"Geometry, got {type(ot_prob).__name__}")
        num_kept = self._check_problem(ot_prob)
        n, m = ot_prob.geom.shape
        dtype = ot_prob.geom.dtype
        if init is None:
            init = (jnp.zeros((n,), dtype), jnp.zeros((m,), dtype))
        f0, g0 = (jnp.asarray(x, dtype) for x in init)
        if f0.shape != (n,) or g0.shape != (m,):
            raise ValueError(f"SinkhornNewtonSparse: `init` potentials must have shapes "
                             f"({n},) and ({m},), got {f0.shape} and {g0.shape}")
        f, g, err, errors, num_sinkhorn, num_newton = _solve(self, num_kept, ot_prob, f0, g0)
        cost = compute_kl_reg_cost(jax.lax.stop_gradient(f), jax.lax.stop_gradient(g),
                                   ot_prob, lse_mode=True)  # Danskin, as ott's default
        converged = jnp.isfinite(err) & (err < self.threshold)
        return SNSOutput((f, g), errors, cost, ot_prob, jnp.asarray(self.threshold, dtype),
                         converged, num_sinkhorn, num_newton)

    def _check_problem(self, ot_prob) -> int:
        owner = "SinkhornNewtonSparse"
        if ot_prob.tau_a != 1.0 or ot_prob.tau_b != 1.0:
            raise ValueError(f"{owner}: only balanced problems (tau_a = tau_b = 1) are "
                             f"supported, got tau_a={ot_prob.tau_a}, tau_b={ot_prob.tau_b}; "
                             "use ott's Sinkhorn for unbalanced transport")
        geom = ot_prob.geom
        n, m = geom.shape
        if n < 1 or m < 1:
            raise ValueError(f"{owner}: empty problem of shape {(n, m)}")
        a, b = ot_prob.a, ot_prob.b
        if a.shape != (n,) or b.shape != (m,):
            raise ValueError(f"{owner}: marginals of shapes {a.shape} and {b.shape} do not "
                             f"match the cost matrix of shape {(n, m)}")
        num_kept = min(n, m, 16) if self.num_kept is None else int(self.num_kept)
        if num_kept > min(n, m):
            raise ValueError(f"{owner}: `num_kept`={num_kept} exceeds min(n, m)={min(n, m)} "
                             "(the rows and columns of the plan); lower it")
        eps = geom.epsilon
        if _is_concrete(eps) and not float(eps) > 0:
            raise ValueError(f"{owner}: the geometry's epsilon must be positive, got "
                             f"{float(eps)}")
        if _is_concrete(a) and _is_concrete(b):
            if not (bool(jnp.all(a > 0)) and bool(jnp.all(b > 0))):
                raise ValueError(f"{owner}: marginals `a` and `b` must be strictly positive; "
                                 "drop the points of zero mass (their potentials are "
                                 "-inf) or use ott's Sinkhorn")
            mass_a, mass_b = float(jnp.sum(a)), float(jnp.sum(b))
            rtol = float(np.sqrt(np.finfo(np.dtype(a.dtype)).eps))
            if abs(mass_a - mass_b) > rtol * max(mass_a, mass_b):
                raise ValueError(f"{owner}: marginals of different mass ({mass_a:.6g} and "
                                 f"{mass_b:.6g}); the problem is balanced, normalise them")
        return num_kept


def sinkhorn_newton_sparse(ot_prob: LinearProblem | Geometry, a: jax.Array | None = None,
                           b: jax.Array | None = None, **options) -> SNSOutput:
    """Solve an entropic OT problem with `SinkhornNewtonSparse(**options)`.

    Args:
        ot_prob: an ott `LinearProblem`, or a geometry (then `a`, `b` are its marginals,
            uniform when `None`).
        a: first marginal (only with a geometry).
        b: second marginal (only with a geometry).
        **options: `SinkhornNewtonSparse` fields (`threshold`, `num_kept`, ...).

    Returns:
        An `SNSOutput`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ott.geometry import geometry
        >>> cost = jax.random.uniform(jax.random.key(1), (10, 12))
        >>> a, b = jnp.full(10, 0.1), jnp.full(12, 1 / 12)
        >>> out = sinkhorn_newton_sparse(geometry.Geometry(cost, epsilon=0.05), a, b)
        >>> round(float(out.matrix.sum()), 4)
        1.0
    """
    from ott.geometry.geometry import Geometry
    from ott.problems.linear.linear_problem import LinearProblem

    if isinstance(ot_prob, Geometry):
        ot_prob = LinearProblem(ot_prob, a=a, b=b)
    elif a is not None or b is not None:
        raise ValueError("sinkhorn_newton_sparse: pass `a`, `b` with a geometry only; a "
                         "LinearProblem carries its own marginals")
    return SinkhornNewtonSparse(**options)(ot_prob)


# ----------------------------------------------------------------------------------------
# The iteration


def _plan(f, g, cost, eps):
    return jnp.exp((f[:, None] + g[None, :] - cost) / eps)


def _error(plan, a, b):
    return jnp.sum(jnp.abs(plan.sum(1) - a)) + jnp.sum(jnp.abs(plan.sum(0) - b))


def _sinkhorn_sweep(f, g, cost, eps, log_a, log_b):
    """One log-domain sweep: `g` fits `b`, then `f` fits `a` (ott's order)."""
    g = eps * log_b - eps * jax.nn.logsumexp((f[:, None] - cost) / eps, axis=0)
    f = eps * log_a - eps * jax.nn.logsumexp((g[None, :] - cost) / eps, axis=1)
    return f, g


def _kept_entries(plan, num_kept):
    """`(i_idx, j_idx, values, P1, Pᵀ1)`: the entries of S, the top entries of P (each once)."""
    n, m = plan.shape
    rows = plan.sum(1)
    cols = plan.sum(0)
    # The pattern is chosen in float32: XLA's CPU top_k sorts float32 about 8x faster than
    # float64, and any pattern keeps the fixed point (the values stay in full precision).
    pattern = plan.astype(jnp.float32)
    _, row_idx = jax.lax.top_k(pattern, num_kept)  # (n, k): columns kept in each row
    _, col_idx = jax.lax.top_k(pattern.T, num_kept)  # (m, k): rows kept in each column
    row_values = jnp.take_along_axis(plan, row_idx, axis=1)
    col_values = jnp.take_along_axis(plan.T, col_idx, axis=1)
    # an entry kept by both its row and its column counts once: drop it from the column set
    # (an index test, not a value test, so ties at a row's k-th value are handled too)
    in_row_set = jnp.any(row_idx[col_idx] == jnp.arange(m)[:, None, None], axis=-1)
    col_values = jnp.where(in_row_set, 0.0, col_values)
    row_of_row_entries = jnp.broadcast_to(jnp.arange(n)[:, None], (n, num_kept)).ravel()
    col_of_col_entries = jnp.broadcast_to(jnp.arange(m)[:, None], (m, num_kept)).ravel()
    i_idx = jnp.concatenate([row_of_row_entries, col_idx.ravel()])
    j_idx = jnp.concatenate([row_idx.ravel(), col_of_col_entries])
    values = jnp.concatenate([row_values.ravel(), col_values.ravel()])
    return i_idx, j_idx, values, rows, cols


def _sparse_hessian(plan, num_kept, ridge):
    """Mat-vec of `[[diag(P1), S], [Sᵀ, diag(Pᵀ1)]] + ridge`, S the top entries of P."""
    n, m = plan.shape
    i_idx, j_idx, values, rows, cols = _kept_entries(plan, num_kept)
    diagonal = jnp.concatenate([rows, cols])
    shift = ridge * jnp.mean(diagonal)

    def matvec(z):
        x, y = z[:n], z[n:]
        top = rows * x + jax.ops.segment_sum(values * y[j_idx], i_idx, num_segments=n)
        bottom = cols * y + jax.ops.segment_sum(values * x[i_idx], j_idx, num_segments=m)
        return jnp.concatenate([top, bottom]) + shift * z

    return matvec, diagonal + shift


def _dense_sparse_hessian(plan, num_kept, ridge):
    """The matrix of `_sparse_hessian`'s mat-vec, `(n + m, n + m)`, built densely."""
    n, m = plan.shape
    i_idx, j_idx, values, rows, cols = _kept_entries(plan, num_kept)
    diagonal = jnp.concatenate([rows, cols])
    block = jnp.zeros((n, m), plan.dtype).at[i_idx, j_idx].add(values)
    hessian = jnp.block([[jnp.diag(rows), block], [block.T, jnp.diag(cols)]])
    return hessian + ridge * jnp.mean(diagonal) * jnp.eye(n + m, dtype=plan.dtype)


def _newton_direction(solver, num_kept, plan, grad, err):
    """Solve `H_S d = -grad` (the sparsified Hessian without its 1/ε): densely by Cholesky
    when `n + m <= solver.max_dense_size`, else by Jacobi-preconditioned CG to the relative
    residual `max(cg_tolerance, min(1e-2, √err))`, `err` the marginal error (an inexact
    Newton forcing term, Eisenstat and Walker's `η ~ ‖∇L‖^½`: loose far from the optimum,
    where the step is damped anyway, tight near it, which keeps the local convergence
    superlinear; measured on the 28 x 28 W1 grid at ε = 1e-3, CG to 1e-7 at every step took
    15.8 s for 241 Newton steps, this 8.8 s for 254, at load ~5).

    Why dense for small problems: when few plan entries per row are significant (small n,
    small ε: at n = 100, ε = 1/1200, about 5 per row), the plan is nearly disconnected
    into blocks, and the Jacobi-scaled Hessian has an eigenvalue near 0 per block (about
    1e-10 against 2 at the top, measured) besides the exact null direction: CG then stops
    at its iteration cap with a relative residual near 1, the Newton steps are no better
    than preconditioned gradient steps, and the error stalls (near 1e-6 to 1e-9). At n =
    500 the gap is about 1e-3 and CG converges. The dense solve adds `c v vᵀ` for the
    exact Hessian's null direction `v = (1, -1) / √(n + m)` (the gradient is orthogonal
    to it, so the exact Newton step is unchanged), with `c` the mean diagonal."""
    n, m = plan.shape
    if n + m <= solver.max_dense_size:
        hessian = _dense_sparse_hessian(plan, num_kept, solver.ridge)
        v = jnp.concatenate([jnp.ones((n,), plan.dtype), -jnp.ones((m,), plan.dtype)])
        v = v / jnp.sqrt(jnp.asarray(n + m, plan.dtype))
        hessian = hessian + jnp.mean(jnp.diagonal(hessian)) * jnp.outer(v, v)
        factor = jax.scipy.linalg.cho_factor(hessian)
        return jax.scipy.linalg.cho_solve(factor, -grad)
    matvec, diagonal = _sparse_hessian(plan, num_kept, solver.ridge)
    tolerance = jnp.maximum(solver.cg_tolerance, jnp.minimum(_MAX_FORCING, jnp.sqrt(err)))
    d, _ = jax.scipy.sparse.linalg.cg(
        matvec, -grad, tol=tolerance, maxiter=solver.max_cg_steps,
        M=lambda z: z / diagonal)
    return d


def _iterate(solver, num_kept, cost, eps, a, b, f, g):
    n, m = cost.shape
    log_a, log_b = jnp.log(a), jnp.log(b)
    total = solver.num_sinkhorn_steps + solver.num_newton_steps
    errors = -jnp.ones((total,), cost.dtype)

    # Stage 1: Sinkhorn sweeps until the warm start is spent or the tolerance is met. After
    # an f-update the row marginals are exact, and the column marginal of the current
    # potentials, exp((g + lse_col) / ε), comes free with the next g-update: the error of
    # sweep i is recorded at the start of sweep i + 1 (as cheap as ott's sweeps).
    def sinkhorn_cond(state):
        _, _, err, i, _ = state
        return (i < solver.num_sinkhorn_steps) & ~(err < solver.threshold)

    def sinkhorn_body(state):
        f, g, _, i, errors = state  # i: sweeps done
        lse_col = eps * jax.nn.logsumexp((f[:, None] - cost) / eps, axis=0)
        err = jnp.sum(jnp.abs(jnp.exp((g + lse_col) / eps) - b))
        err = jnp.where(i > 0, err, jnp.inf)  # the initial potentials fit no marginal
        errors = errors.at[jnp.maximum(i - 1, 0)].set(jnp.where(i > 0, err, -1.0))
        stop = err < solver.threshold
        g_new = eps * log_b - lse_col
        f_new = eps * log_a - eps * jax.nn.logsumexp((g_new[None, :] - cost) / eps, axis=1)
        return (jnp.where(stop, f, f_new), jnp.where(stop, g, g_new), err,
                i + jnp.where(stop, 0, 1), errors)

    f, g, _, num_sinkhorn, errors = jax.lax.while_loop(
        sinkhorn_cond, sinkhorn_body,
        (f, g, jnp.asarray(jnp.inf, cost.dtype), jnp.asarray(0), errors))
    # the two-sided error of the last state, which the Newton stage starts from
    plan = _plan(f, g, cost, eps)
    err = _error(plan, a, b)
    errors = jnp.where(num_sinkhorn > 0, errors.at[jnp.maximum(num_sinkhorn - 1, 0)].set(err),
                       errors)

    # Stage 2: damped Newton steps with the sparsified Hessian. The plan of the current
    # potentials is carried: the line search's trial plan at the accepted step is the next
    # one, so a step that takes the full Newton step costs one exponential of the cost
    # matrix's size (plus the top_k pattern and the CG solve).
    def newton_cond(state):
        _, _, _, err, i, _ = state
        return (i < solver.num_newton_steps) & ~(err < solver.threshold) & jnp.isfinite(err)

    def newton_body(state):
        f, g, plan, err, i, errors = state
        grad = jnp.concatenate([plan.sum(1) - a, plan.sum(0) - b])
        d = _newton_direction(solver, num_kept, plan, grad, err)
        step = eps * d  # the Hessian of L carries 1/ε
        df, dg = step[:n], step[n:]
        slope = jnp.dot(grad, step)

        def trial(alpha):
            """The plan after a step `alpha` and `L(z + α Δ) - L(z) - c α slope`.

            `L(z + α Δ) - L(z) = α slope + ε Σ P_ij φ(t_ij)`, `t_ij = α (df_i + dg_j) / ε`,
            `φ(t) = eᵗ - 1 - t ≥ 0`: for small `|t|` by its series (no cancellation), else
            as `P eᵗ - P (1 + t)` with `P eᵗ` the trial plan itself, exponentiated from the
            new potentials (an entry that underflows to 0 in P may still overflow after
            the step at small ε, which then fails the search)."""
            new_plan = _plan(f + alpha * df, g + alpha * dg, cost, eps)
            t = alpha * (df[:, None] + dg[None, :]) / eps
            small = jnp.abs(t) < 1e-2
            series = t * t * (0.5 + t * (1 / 6 + t * (1 / 24 + t * (1 / 120 + t / 720))))
            curvature = jnp.where(small, plan * series, new_plan - plan * (1.0 + t))
            return new_plan, (1 - _ARMIJO) * alpha * slope + eps * jnp.sum(curvature)

        def search_cond(carry):
            _, gap, _, k = carry
            return ~(jnp.isfinite(gap) & (gap <= 0)) & (k < solver.max_backtracks)

        def search_body(carry):
            alpha, _, _, k = carry
            new_plan, gap = trial(alpha / 2)
            return alpha / 2, gap, new_plan, k + 1

        # no search along a non-descent direction (a failed CG solve): sweep instead
        descent = (slope < 0) & jnp.all(jnp.isfinite(step))
        one = jnp.asarray(1.0, cost.dtype)
        new_plan, gap = trial(one)
        gap = jnp.where(descent, gap, jnp.inf)
        alpha, gap, new_plan, _ = jax.lax.while_loop(
            lambda c: search_cond(c) & descent, search_body, (one, gap, new_plan, 0))
        accepted = descent & jnp.isfinite(gap) & (gap <= 0)

        def newton_step():
            return f + alpha * df, g + alpha * dg, new_plan

        def sweep():
            f_sweep, g_sweep = _sinkhorn_sweep(f, g, cost, eps, log_a, log_b)
            return f_sweep, g_sweep, _plan(f_sweep, g_sweep, cost, eps)

        f, g, plan = jax.lax.cond(accepted, newton_step, sweep)
        err = _error(plan, a, b)
        # the record is contiguous: Newton entries follow the Sinkhorn sweeps actually run
        return f, g, plan, err, i + 1, errors.at[num_sinkhorn + i].set(err)

    f, g, _, err, num_newton, errors = jax.lax.while_loop(
        newton_cond, newton_body, (f, g, plan, err, jnp.asarray(0), errors))
    return f, g, err, errors, num_sinkhorn, num_newton


# compiled once per (solver, num_kept, shapes, dtype): eager calls reuse the executable
_iterate_jit = jax.jit(_iterate, static_argnums=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _solve(solver, num_kept, ot_prob, f0, g0):
    geom = ot_prob.geom
    return _iterate_jit(solver, num_kept, geom.cost_matrix, jnp.asarray(geom.epsilon),
                        ot_prob.a, ot_prob.b, f0, g0)


def _solve_fwd(solver, num_kept, ot_prob, f0, g0):
    out = _solve(solver, num_kept, ot_prob, f0, g0)
    return out, (out[0], out[1], ot_prob, f0, g0)


def _solve_bwd(solver, num_kept, residuals, cotangents):
    from ott.solvers.linear.implicit_differentiation import ImplicitDiff

    f, g, ot_prob, f0, g0 = residuals
    # identity preconditioning: the system is the dual's Hessian, symmetric PSD (lineax CG);
    # its null direction (1, -1) shifts f and g oppositely and leaves the plan unchanged
    tolerance = 1e-10 if f.dtype == jnp.float64 else 1e-6
    implicit = ImplicitDiff(precondition_fun=lambda x: x, symmetric=True,
                            solver_kwargs={"rtol": tolerance, "atol": tolerance})
    (prob_cotangent,) = implicit.gradient(ot_prob, f, g, True, (cotangents[0], cotangents[1]))
    return prob_cotangent, jnp.zeros_like(f0), jnp.zeros_like(g0)


_solve.defvjp(_solve_fwd, _solve_bwd)
