"""Gradient-regularised Newton with adaptive regularisation and approximate Hessians.

Semenov, Jaggi and Doikov, "Gradient-normalized smoothness for optimization with
approximate Hessians" (arXiv:2506.13710, 2025; ICLR 2026), Algorithm 1. With `g = ∇f(x)`
and a curvature matrix `H` (the Hessian or an approximation: Fisher, Gauss-Newton, a
matrix-free product), one step is

    λ = ‖g‖ / γ,        x⁺ = x - (H + λ I)⁻¹ g,

with the adaptive search on `γ` (the "gradient-normalised smoothness", a radius): the step
is accepted when `f(x) - f(x⁺) ≥ ‖∇f(x⁺)‖² / (8 λ)`, and then `γ ← 2γ` for the next
iteration; otherwise `γ ← γ/2` and the step is recomputed. For a Hessian that is
`L`-Lipschitz, `γ = sqrt(‖g‖ / L)` gives the classical `λ = sqrt(L ‖g‖)` of
gradient-regularised Newton (Mishchenko 2023; Doikov and Nesterov 2024); the search finds
a suitable `γ` without knowing `L`, and for approximate Hessians it adapts to their error.

Curvatures (`AbstractCurvature`), all on the flattened parameters:

- `ExactHessian`: the dense Hessian of the objective's program when it has no sample
  sites (`jax.hessian`), or, for an expectation with sample sites, the core's unbiased
  Hessian-vector products (`objective.hvp`) where the objective provides them;
- `MatrixFreeHessian`: conjugate gradients on `(H + λI) s = g` with Hessian-vector
  products only (exact ones, the objective's `hvp`, or a user callable);
- `FiniteDifferenceHessian`: `Hv ≈ (ĝ(x + εv) - ĝ(x - εv)) / (2ε)` from two gradient
  estimates with common random numbers, for any expectation;
- `EmpiricalFisher`: `(1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ` from per-sample losses `ℓ_i`;
- `GaussNewton`: `Jᵀ ∇²L(z) J` for a loss `L` of a model's outputs `z(x)`, `J = ∂z/∂x`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jssl
from jax.flatten_util import ravel_pytree

from ..adev import Expectation
from ._backend import AbstractBackend
from ._cbo import _check_count, _check_positive
from ._spectrum import _has_sample_sites

#: γ is kept in [GAMMA_MIN, GAMMA_MAX] (a long run of accepted steps doubles it each time).
GAMMA_MIN, GAMMA_MAX = 1e-20, 1e20


# ------------------------------------------------------------------------------ curvatures


class AbstractCurvature(eqx.Module):
    """A curvature matrix `H` at the current point, on the flattened parameters.

    Subclasses implement `product(key, params, objective, *args, **kwargs)`, returning a
    function `v ↦ H v` on flat vectors; dense ones override `matrix(...)` (by default the
    `d` products with the unit vectors, symmetrised). `matrix_free` says whether
    `GradientRegularisedNewton` solves with conjugate gradients (True) or an
    eigendecomposition of `matrix` (False).
    """

    matrix_free: ClassVar[bool] = False

    @abc.abstractmethod
    def product(self, key, params, objective, *args, **kwargs) -> Callable:
        """`v ↦ H v` for flat vectors `v` at `params`."""

    def regularised_solver(self, key, params, objective, g, *args, **kwargs):
        """`solve(λ) -> (Δ, valid)`, `Δ = -(H + λI)⁻¹ g`, for a curvature with a cheaper
        solve than the dense or conjugate-gradient ones (a low-rank `H`), or None (the
        default) to let `GradientRegularisedNewton` use `matrix` or `product`."""
        return None

    def matrix(self, key, params, objective, *args, **kwargs) -> jax.Array:
        """The dense `(d, d)` matrix `H` at `params` (symmetrised)."""
        flat, _ = ravel_pytree(params)
        product = self.product(key, params, objective, *args, **kwargs)
        columns = jax.vmap(product)(jnp.eye(flat.size, dtype=flat.dtype))
        return 0.5 * (columns + columns.T)


def _flat_function(key, params, objective, args, kwargs, owner: str):
    """`(f(flat) scalar, flat, unravel)`: the objective as a deterministic function of the
    flat parameters, or None for `f` when it has sample sites."""
    flat, unravel = ravel_pytree(params)
    if isinstance(objective, Expectation):
        if _has_sample_sites(objective.fn, params, args, kwargs):
            return None, flat, unravel
        return (lambda x: objective.fn(unravel(x), *args, **kwargs)), flat, unravel
    if not callable(objective):
        raise TypeError(f"{owner}: the objective must be callable, got {type(objective).__name__}.")
    return (lambda x: objective(key, unravel(x), *args, **kwargs)), flat, unravel


def _objective_hvp(key, params, objective, args, kwargs, owner: str) -> Callable:
    """Flat `v ↦ H v` from the objective's own unbiased `hvp(key, params, *args, v=v)`."""
    hvp = getattr(objective, "hvp", None)
    name = getattr(objective, "__name__", type(objective).__name__)
    if hvp is None:
        raise ValueError(
            f"{owner}: the objective {name} has sample sites, so its Hessian is not the "
            "second derivative of an estimate, and it offers no unbiased hvp method. Use "
            "FiniteDifferenceHessian() (two gradient estimates with common random numbers, "
            "O(ε²) bias), EmpiricalFisher(per_sample_loss), GaussNewton(model, loss) or "
            "MatrixFreeHessian(hvp=...) with your own Hessian-vector product.")
    _, unravel = ravel_pytree(params)

    def product(v):
        # the core's signature: objective.hvp(key, params, *args, v=tangent, **kwargs)
        out = hvp(key, params, *args, v=unravel(v), **kwargs)
        return ravel_pytree(out)[0].astype(v.dtype)

    return product


class ExactHessian(AbstractCurvature):
    """The objective's Hessian: dense `jax.hessian` of its program when it has no sample
    sites; for an expectation with sample sites, its unbiased `hvp` where it has one (the
    `d` products give an unbiased dense estimate), else an error naming the alternatives.

    Dense: `O(d²)` memory and an `O(d³)` eigendecomposition per step, for small `d`.

    Example:
        >>> import jax, jax.numpy as jnp, ppl_ext as px
        >>> @px.expectation
        ... def f(x):
        ...     return jnp.sum(x**4)
        >>> h = ExactHessian().matrix(jax.random.key(0), jnp.array([1.0, 2.0]), f)
        >>> float(h[1, 1])
        48.0
    """

    def product(self, key, params, objective, *args, **kwargs) -> Callable:
        """`v ↦ H v` (forward over reverse, or the objective's `hvp`)."""
        f, flat, _ = _flat_function(key, params, objective, args, kwargs, "ExactHessian")
        if f is None:
            return _objective_hvp(key, params, objective, args, kwargs, "ExactHessian")
        return lambda v: jax.jvp(jax.grad(f), (flat,), (v,))[1]

    def matrix(self, key, params, objective, *args, **kwargs) -> jax.Array:
        """The dense Hessian `(d, d)`."""
        f, flat, _ = _flat_function(key, params, objective, args, kwargs, "ExactHessian")
        if f is None:
            return super().matrix(key, params, objective, *args, **kwargs)
        return jax.hessian(f)(flat)


class MatrixFreeHessian(AbstractCurvature):
    """Hessian-vector products only; `GradientRegularisedNewton` solves by conjugate gradients.

    Args:
        hvp: `(key, params, v, *args, **kwargs) -> H v` with trees like `params`, or None:
            exact products (forward over reverse) of a program without sample sites, or the
            objective's own unbiased `hvp` method.
        num_cg_steps: the most conjugate-gradient iterations per solve (at least 1).
        tolerance: CG's relative residual tolerance.

    With estimated products each solve uses one key (one linear operator `Ĥ`), and
    `(Ĥ + λI)⁻¹ g` is not unbiased for `(H + λI)⁻¹ g` (an inverse of an estimate).

    Example:
        >>> import jax, jax.numpy as jnp, ppl_ext as px
        >>> @px.expectation
        ... def f(x):
        ...     return jnp.sum(x**4)
        >>> hv = MatrixFreeHessian().product(jax.random.key(0), jnp.array([1.0, 2.0]), f)
        >>> float(hv(jnp.array([0.0, 1.0]))[1])
        48.0
    """

    hvp: Callable | None = None
    num_cg_steps: int = 50
    tolerance: float = 1e-6
    matrix_free: ClassVar[bool] = True

    def __check_init__(self):
        if self.hvp is not None and not callable(self.hvp):
            raise TypeError(
                f"MatrixFreeHessian.hvp must be a callable (key, params, v, *args) -> H v or None, "
                f"got {type(self.hvp).__name__}.")
        _check_count("MatrixFreeHessian", "num_cg_steps", self.num_cg_steps)
        _check_positive("MatrixFreeHessian", "tolerance", self.tolerance)

    def product(self, key, params, objective, *args, **kwargs) -> Callable:
        """`v ↦ H v` from `hvp`, or exact / the objective's when `hvp` is None."""
        if self.hvp is None:
            return ExactHessian().product(key, params, objective, *args, **kwargs)
        _, unravel = ravel_pytree(params)
        hvp = self.hvp

        def product(v):
            return ravel_pytree(hvp(key, params, unravel(v), *args, **kwargs))[0].astype(v.dtype)

        return product


class FiniteDifferenceHessian(AbstractCurvature):
    """`H v ≈ (ĝ(x + εv; ω) - ĝ(x - εv; ω)) / (2ε)` from gradient estimates with one key `ω`.

    Each gradient estimate is unbiased at its point, so the mean of this product is the
    central difference of the exact gradient, `H v + O(ε² ‖∇³f‖ ‖v‖²)`: a stated bias
    that vanishes for quadratics. Common random numbers keep its variance bounded as
    `ε → 0` for reparameterised sites; for score-function or discrete sites the two
    estimates may differ by `O(1)`, and the variance grows like `1/ε²`.

    Args:
        spacing: `ε > 0` (relative to the unit-norm direction; `v` is normalised first).

    Example:
        >>> import jax, jax.numpy as jnp, ppl_ext as px
        >>> @px.expectation
        ... def f(x):
        ...     return jnp.sum(3.0 * x**2)
        >>> h = FiniteDifferenceHessian().matrix(jax.random.key(0), jnp.zeros(2), f)
        >>> round(float(h[0, 0]), 3), round(float(h[0, 1]), 3)
        (6.0, 0.0)
    """

    spacing: float = 1e-3

    def __check_init__(self):
        _check_positive("FiniteDifferenceHessian", "spacing", self.spacing)

    def product(self, key, params, objective, *args, **kwargs) -> Callable:
        """`v ↦` the central difference of two gradient estimates along `v`."""
        flat, unravel = ravel_pytree(params)

        def grad(x):
            return ravel_pytree(jax.grad(
                lambda p: objective(key, p, *args, **kwargs))(unravel(x)))[0]

        def product(v):
            norm = jnp.linalg.norm(v)
            safe = jnp.where(norm > 0, norm, 1.0)
            u = v / safe
            eps = jnp.asarray(self.spacing, flat.dtype)
            return (grad(flat + eps * u) - grad(flat - eps * u)) / (2 * eps) * norm

        return product


class EmpiricalFisher(AbstractCurvature):
    """`F = (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ` from the gradients of per-sample losses `ℓ_i`.

    It approximates the Hessian of the MEAN of the per-sample losses, so the minimised
    objective should be `mean_i ℓ_i(params)` (use `fit(..., maximize=False)`); positive
    semidefinite, of rank at most `n`.

    With fewer losses than parameters (`n < d`) `GradientRegularisedNewton` never forms
    the `d × d` matrix: by the Woodbury identity
    `(JᵀJ/n + λI)⁻¹ g = (g - Jᵀ (nλ I + J Jᵀ)⁻¹ J g) / λ` (`J` the `(n, d)` per-sample
    gradients) a step costs `O(n d + n³)`, and one eigendecomposition of the `n × n` Gram
    matrix per step serves every `λ` of the search. With one loss (`n = 1`) this is the
    rank-one Fisher `H = ∇ℓ ∇ℓᵀ` and Sherman-Morrison's closed form
    `Δ = -(g - ∇ℓ (∇ℓ·g)/(λ + ‖∇ℓ‖²)) / λ`, `O(d)` a step. For instance for
    `f = ‖u(x)‖^p / p` (nonlinear equations `u(x) = 0`, `p > 2`) the "Fisher term" of its
    Hessian, `(p - 2) ∇f ∇fᵀ / ‖u‖^p`, is the empirical Fisher of the one loss
    `ℓ = 2 sqrt((p - 2) f / p)` (Semenov, Jaggi and Doikov 2025).

    Args:
        per_sample_loss: `(params, *args, **kwargs) -> (n,)`, the losses `ℓ_i`, with the
            objective's extra arguments.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
        >>> fisher = EmpiricalFisher(lambda w, x: x @ w)  # ∇ℓ_i = x_i
        >>> f = fisher.matrix(jax.random.key(0), jnp.zeros(2), None, x)
        >>> float(f[0, 0]), float(f[1, 1])  # (x_1 x_1ᵀ + x_2 x_2ᵀ) / 2
        (0.5, 2.0)
    """

    per_sample_loss: Callable

    def __check_init__(self):
        if not callable(self.per_sample_loss):
            raise TypeError(
                "EmpiricalFisher.per_sample_loss must be a callable (params, *args) -> (n,), "
                f"got {type(self.per_sample_loss).__name__}.")

    def jacobian(self, params, *args, **kwargs) -> jax.Array:
        """The `(n, d)` per-sample gradients `∇ℓ_i` (rows) on the flat parameters."""
        flat, unravel = ravel_pytree(params)
        shape = jax.eval_shape(lambda x: self.per_sample_loss(unravel(x), *args, **kwargs), flat)
        if getattr(shape, "ndim", None) != 1 or shape.shape[0] == 0:
            raise ValueError(
                "EmpiricalFisher.per_sample_loss must return a non-empty vector (n,) of "
                f"per-sample losses, got {getattr(shape, 'shape', shape)}.")
        return jax.jacrev(lambda x: self.per_sample_loss(unravel(x), *args, **kwargs))(flat)

    def product(self, key, params, objective, *args, **kwargs) -> Callable:
        """`v ↦ Jᵀ (J v) / n`."""
        jacobian = self.jacobian(params, *args, **kwargs)
        return lambda v: jacobian.T @ (jacobian @ v) / jacobian.shape[0]

    def matrix(self, key, params, objective, *args, **kwargs) -> jax.Array:
        """`Jᵀ J / n`."""
        jacobian = self.jacobian(params, *args, **kwargs)
        return jacobian.T @ jacobian / jacobian.shape[0]

    def regularised_solver(self, key, params, objective, g, *args, **kwargs):
        """For `n < d`: `solve(λ) = -(g - Jᵀ (nλ I + J Jᵀ)⁻¹ J g) / λ` (Woodbury; `O(n d)`
        a trial after one `O(n² d + n³)` Gram eigendecomposition); None for `n ≥ d`."""
        flat, _ = ravel_pytree(params)
        shape = jax.eval_shape(lambda p: self.per_sample_loss(p, *args, **kwargs), params)
        num = shape.shape[0] if getattr(shape, "ndim", None) == 1 else None
        if num is None or num >= flat.size:
            return None
        jacobian = self.jacobian(params, *args, **kwargs).astype(g.dtype)
        projected = jacobian @ g  # J g
        if num == 1:  # Sherman-Morrison
            row = jacobian[0]
            squared = row @ row
            # g = parallel + perpendicular to ∇ℓ: (H + λI)⁻¹ scales them by 1/(λ + ‖∇ℓ‖²)
            # and 1/λ (no cancellation in the parallel part, which is all of g when g ∥ ∇ℓ)
            parallel = row * jnp.where(squared > 0, projected[0] / jnp.where(
                squared > 0, squared, 1.0), 0.0)
            perpendicular = g - parallel

            def solve(lam):
                return -(perpendicular / lam + parallel / (lam + squared)), jnp.asarray(True)

            return solve
        eigenvalues, vectors = jnp.linalg.eigh(jacobian @ jacobian.T)
        rotated = vectors.T @ projected

        def solve(lam):
            shifted = jnp.maximum(eigenvalues, 0) + num * lam
            coefficients = vectors @ (rotated / shifted)
            return -(g - jacobian.T @ coefficients) / lam, jnp.asarray(True)

        return solve


class GaussNewton(AbstractCurvature):
    """The generalised Gauss-Newton matrix `G = Jᵀ ∇²L(z) J` of `f(x) = L(z(x))`.

    `z = model(params, *args)` are the model's outputs (any shape), `J = ∂z/∂x` their
    Jacobian on the flat parameters and `∇²L` the Hessian of the loss in the outputs. It
    drops the term `Σ_k ∂L/∂z_k ∇²z_k` of the Hessian, so it is positive semidefinite for a
    convex loss and equals the Hessian for a model linear in its parameters.

    Args:
        model: `(params, *args, **kwargs) -> z`.
        loss: `(z, *args, **kwargs) -> scalar`, with the objective's extra arguments; the
            minimised objective should be `loss(model(params, ...), ...)`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[1.0, 2.0]])
        >>> gn = GaussNewton(lambda w, x: x @ w, lambda z, x: 0.5 * jnp.sum(z**2))
        >>> float(gn.matrix(jax.random.key(0), jnp.zeros(2), None, x)[0, 1])  # xᵀx
        2.0
    """

    model: Callable
    loss: Callable

    def __check_init__(self):
        for name in ("model", "loss"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"GaussNewton.{name} must be a callable, got "
                    f"{type(getattr(self, name)).__name__}.")

    def _pieces(self, params, args, kwargs):
        flat, unravel = ravel_pytree(params)
        outputs = self.model(params, *args, **kwargs)
        out_shape = jnp.shape(outputs)
        loss_value = jax.eval_shape(lambda z: self.loss(z, *args, **kwargs), outputs)
        if getattr(loss_value, "shape", None) != ():
            raise ValueError(
                "GaussNewton.loss must return a scalar, got shape "
                f"{getattr(loss_value, 'shape', loss_value)}.")
        jacobian = jax.jacfwd(
            lambda x: jnp.reshape(self.model(unravel(x), *args, **kwargs), (-1,)))(flat)
        loss_hessian = jax.hessian(
            lambda z: self.loss(jnp.reshape(z, out_shape), *args, **kwargs))(
                jnp.reshape(outputs, (-1,)))
        return jacobian, loss_hessian

    def product(self, key, params, objective, *args, **kwargs) -> Callable:
        """`v ↦ Jᵀ (∇²L (J v))`."""
        jacobian, loss_hessian = self._pieces(params, args, kwargs)
        return lambda v: jacobian.T @ (loss_hessian @ (jacobian @ v))

    def matrix(self, key, params, objective, *args, **kwargs) -> jax.Array:
        """`Jᵀ ∇²L J`."""
        jacobian, loss_hessian = self._pieces(params, args, kwargs)
        return jacobian.T @ loss_hessian @ jacobian


# ------------------------------------------------------------------------------ back-end


class NewtonState(NamedTuple):
    """State of `GradientRegularisedNewton`.

    Attributes:
        params: the current parameters.
        gamma: `γ`, the adaptive gradient-normalised smoothness (`λ = ‖g‖ / γ`).
        count: int32, the steps taken (for a step-size schedule).

    Example:
        >>> import jax.numpy as jnp
        >>> state = NewtonState(jnp.zeros(2), jnp.array(1.0), jnp.array(0))
        >>> float(state.gamma)
        1.0
    """

    params: Any
    gamma: jax.Array
    count: jax.Array


class NewtonInfo(NamedTuple):
    """Per-step diagnostics of `GradientRegularisedNewton` (extends `BackendInfo`).

    Attributes:
        value: the objective estimate at the step's starting point.
        grad_norm: `‖g‖` there.
        regularisation: the `λ` of the last trial step.
        num_trials: how many trial steps the adaptive search computed.
        accepted: whether a trial passed the acceptance test (otherwise the parameters
            did not move).

    Example:
        >>> import jax.numpy as jnp
        >>> info = NewtonInfo(jnp.array(1.0), jnp.array(0.5), jnp.array(0.1), jnp.array(1),
        ...                   jnp.array(True))
        >>> int(info.num_trials)
        1
    """

    value: jax.Array
    grad_norm: jax.Array
    regularisation: jax.Array
    num_trials: jax.Array
    accepted: jax.Array


class GradientRegularisedNewton(AbstractBackend):
    """Gradient-regularised Newton (Semenov, Jaggi and Doikov 2025, Algorithm 1).

    Each step computes `g` (the objective's gradient, an unbiased estimate on an
    expectation) and a curvature `H` (`curvature`), then tries

        λ = ‖g‖ / γ,   Δ = -(H + λ I)⁻¹ g,

    accepting `x + Δ` when `f(x) - f(x + Δ) ≥ ‖∇f(x + Δ)‖² / (8 λ)` (both evaluated with
    the step's key: common random numbers) and doubling `γ`; a rejected trial halves `γ`
    and is recomputed, up to `num_search_steps` trials (after which the parameters stay).
    `adaptive=False` takes one trial with the fixed `γ = initial_gamma` (the acceptance
    test then only guards against non-finite values). Dense curvatures are solved by one
    eigendecomposition per step (every trial then costs `O(d²)`; a trial with
    `H + λI` not positive definite is rejected); matrix-free ones by conjugate gradients;
    an `EmpiricalFisher` of fewer losses than parameters by the Woodbury identity
    (`O(n d)` a trial; Sherman-Morrison's `O(d)` for the rank-one Fisher of one loss).

    The parameters move by `step_size · Δ` (default 1: the method as published). On an
    expectation with sample sites the gradient and the acceptance test are noisy, and
    iterates jump to the minimiser of each step's sampled objective: a decreasing
    `step_size` schedule (an optax schedule of the step count) averages the noise, as
    for stochastic gradient methods. With an estimated curvature (the objective's
    unbiased `hvp`, finite differences of estimates, a Fisher of sampled gradients) the
    step `(Ĥ + λI)⁻¹ ĝ` is not an unbiased estimate of `(H + λI)⁻¹ g` (the inverse of an
    estimate is biased, and correlated `Ĥ` and `ĝ` can shift where the steps average to
    zero): a heuristic there, like stochastic quasi-Newton methods.

    Args:
        curvature: an `AbstractCurvature` (default `ExactHessian()`).
        initial_gamma: `γ₀ > 0`.
        adaptive: the doubling/halving search (default True).
        num_search_steps: the most trials per step (at least 1).
        step_size: a float or an optax schedule `count -> float` scaling accepted steps.

    Returns `NewtonState` from `init` and `(NewtonState, NewtonInfo)` from `step`.

    Example:
        >>> import jax, jax.numpy as jnp, ppl_ext as px
        >>> @px.expectation
        ... def loss(x):
        ...     return jnp.sum(jnp.logaddexp(0.0, 3.0 * x) - x)  # min at x = -log(2) / 3
        >>> result = px.fit(loss, jnp.ones(3), GradientRegularisedNewton(), 15,
        ...                 jax.random.key(0), maximize=False, progress=False)
        >>> bool(jnp.allclose(result.params, -jnp.log(2.0) / 3, atol=1e-5))
        True
    """

    curvature: AbstractCurvature = ExactHessian()
    initial_gamma: float = 1.0
    adaptive: bool = True
    num_search_steps: int = 30
    step_size: Any = 1.0

    def __check_init__(self):
        if not isinstance(self.curvature, AbstractCurvature):
            raise TypeError(
                "GradientRegularisedNewton.curvature must be an AbstractCurvature (ExactHessian(), "
                "MatrixFreeHessian(), FiniteDifferenceHessian(), EmpiricalFisher(...), "
                f"GaussNewton(...)), got {type(self.curvature).__name__}.")
        _check_positive("GradientRegularisedNewton", "initial_gamma", self.initial_gamma)
        _check_count("GradientRegularisedNewton", "num_search_steps", self.num_search_steps)
        if not callable(self.step_size):
            _check_positive("GradientRegularisedNewton", "step_size", self.step_size)

    def init(self, key, params, objective, *args, **kwargs) -> NewtonState:
        """`NewtonState(params, initial_gamma, 0)`."""
        flat, _ = ravel_pytree(params)
        if flat.size == 0:
            raise ValueError("GradientRegularisedNewton: params has no array leaves.")
        return NewtonState(params, jnp.asarray(self.initial_gamma, flat.dtype),
                           jnp.zeros((), jnp.int32))

    def params(self, state: NewtonState) -> Any:
        """`state.params`."""
        return state.params

    def step(self, key, state: NewtonState, objective, *args, **kwargs):
        """One regularised Newton step with the adaptive search on `γ`."""
        key_value, key_curvature = jax.random.split(key)
        flat, unravel = ravel_pytree(state.params)
        dtype = flat.dtype

        def value_and_grad(x):
            value, grads = jax.value_and_grad(
                lambda p: objective(key_value, p, *args, **kwargs))(unravel(x))
            return value, ravel_pytree(grads)[0].astype(dtype)

        value, g = value_and_grad(flat)
        g_norm = jnp.linalg.norm(g)
        solve = self._solver(key_curvature, state.params, objective, g, args, kwargs)
        tiny = jnp.finfo(dtype).tiny

        def trial(gamma):
            lam = jnp.maximum(g_norm / gamma, tiny)
            delta, valid = solve(lam)
            delta = jnp.where(g_norm > 0, delta, jnp.zeros_like(delta))
            new_value, new_g = value_and_grad(flat + delta)
            finite = jnp.isfinite(new_value) & jnp.all(jnp.isfinite(delta))
            if self.adaptive:
                decrease = value - new_value >= jnp.sum(new_g**2) / (8 * lam)
                ok = valid & finite & decrease
            else:
                ok = valid & finite
            return delta, lam, ok

        def body(carry):
            i, gamma, _, _, _ = carry
            delta, lam, ok = trial(gamma)
            if self.adaptive:
                gamma = jnp.clip(jnp.where(ok, 2 * gamma, gamma / 2), GAMMA_MIN, GAMMA_MAX)
            return i + 1, gamma.astype(dtype), ok, delta, lam.astype(dtype)

        def cond(carry):
            i, _, accepted, _, _ = carry
            return (i < (self.num_search_steps if self.adaptive else 1)) & ~accepted

        start = (jnp.zeros((), jnp.int32), state.gamma, jnp.zeros((), bool),
                 jnp.zeros_like(flat), jnp.zeros((), dtype))
        num_trials, gamma, accepted, delta, lam = jax.lax.while_loop(cond, body, start)
        rate = self.step_size(state.count) if callable(self.step_size) else self.step_size
        moved = flat + jnp.asarray(rate, dtype) * delta
        params = unravel(jnp.where(accepted, moved, flat))
        new_state = NewtonState(params, gamma, state.count + 1)
        return new_state, NewtonInfo(value, g_norm, lam, num_trials, accepted)

    def _solver(self, key, params, objective, g, args, kwargs):
        """`solve(λ) -> (Δ, valid)` with `Δ = -(H + λI)⁻¹ g`."""
        curvature = self.curvature
        low_rank = curvature.regularised_solver(key, params, objective, g, *args, **kwargs)
        if low_rank is not None:
            return low_rank
        if curvature.matrix_free:
            product = curvature.product(key, params, objective, *args, **kwargs)

            def solve(lam):
                delta, _ = jssl.cg(lambda v: product(v) + lam * v, -g,
                                   tol=curvature.tolerance, maxiter=curvature.num_cg_steps)
                return delta, jnp.dot(delta, g) < 0

            return solve
        matrix = curvature.matrix(key, params, objective, *args, **kwargs)
        matrix = 0.5 * (matrix + matrix.T)
        eigenvalues, vectors = jnp.linalg.eigh(matrix)
        projected = vectors.T @ g

        def solve(lam):
            shifted = eigenvalues + lam
            valid = jnp.min(shifted) > 0
            safe = jnp.where(shifted > 0, shifted, 1.0)
            return -(vectors @ (projected / safe)), valid

        return solve
