"""The Hessian's spectrum from Hessian-vector products: Lanczos and stochastic Lanczos quadrature.

Sagun, Bottou and LeCun ("Eigenvalues of the Hessian in deep learning", 2016) and
Ghorbani, Krishnan and Xiao ("An investigation into neural net optimization via Hessian
eigenvalue density", ICML 2019) found the Hessian of a network's loss to be a bulk near
zero plus a few large outliers. Both are read off `s` steps of the Lanczos iteration
started from random probe vectors (stochastic Lanczos quadrature, Ubaru, Chen and Saad,
"Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", SIAM J. Matrix Anal. Appl.
2017):

- Lanczos from a unit vector `u` builds an orthonormal basis `V` of the Krylov space
  `span(u, Hu, ..., H^{s-1}u)` and the tridiagonal `T = Vᵀ H V`. Here every new vector is
  reorthogonalised against all earlier ones (twice, "full reorthogonalisation"), so the
  basis stays orthonormal in floating point and no spurious copies of converged
  eigenvalues appear. When the Krylov space is invariant (a breakdown), the iteration
  restarts from a random vector orthogonal to the basis with a zero off-diagonal entry.
- The eigenvalues `θ_k` of `T` (Ritz values) interlace with those of `H`: the `k`-th
  largest Ritz value is at most the `k`-th largest eigenvalue, and the extreme ones
  converge first.
- With `T`'s eigenvectors `y_k`, the weights `τ_k² = (e₁ᵀ y_k)²` define Gauss quadrature
  for the spectral measure of `H` seen from `u`: `Σ_k τ_k² θ_k^p = uᵀ H^p u` exactly for
  `p ≤ 2s - 1`. For `u = z/‖z‖` with `z` Rademacher (or Gaussian), `E[uᵀ H^p u] = tr(H^p)/d`
  (Hutchinson), so the mean over probes of `Σ_k τ_k² θ_k^p` is an UNBIASED estimate of the
  `p`-th moment of the eigenvalue density for every `p < 2s`; for higher moments, and for
  the smoothed density itself, it is a consistent approximation.
- The density is `φ(t) = mean over probes of Σ_k τ_k² N(t; θ_k, σ²)`, a Gaussian-smoothed
  spectral density that integrates to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._cbo import _check_count, _check_positive

#: Probe distributions for `hessian_spectrum`.
PROBES = ("rademacher", "gaussian")


class SpectrumResult(NamedTuple):
    """Ritz values and quadrature weights of `num_probes` Lanczos runs (`hessian_spectrum`).

    Attributes:
        ritz_values: `(num_probes, num_lanczos_steps)`, each row the eigenvalues of one
            run's tridiagonal matrix, ascending.
        ritz_weights: `(num_probes, num_lanczos_steps)`, the squared first components of
            their eigenvectors; each row sums to one.

    Example:
        >>> import jax.numpy as jnp
        >>> result = SpectrumResult(jnp.array([[1.0, 3.0]]), jnp.array([[0.5, 0.5]]))
        >>> float(result.moments(1).mean())
        2.0
    """

    ritz_values: jax.Array
    ritz_weights: jax.Array

    def moments(self, power: int) -> jax.Array:
        """Per-probe estimates `Σ_k τ_k² θ_k^power` of `tr(H^power)/d`, shape `(num_probes,)`.

        Each is `uᵀ H^power u` for its unit probe `u` exactly when `power < 2 ·
        num_lanczos_steps`, so their mean is then unbiased for `tr(H^power)/d` and their
        standard error is the usual one of independent draws.
        """
        return jnp.sum(self.ritz_weights * self.ritz_values ** power, axis=-1)

    def top_eigenvalues(self, num_eigenvalues: int = 1) -> jax.Array:
        """The largest `num_eigenvalues` Ritz values, descending: for each rank `k`, the
        largest over the probes' runs of their `k`-th largest Ritz value, a lower bound on
        the `k`-th largest eigenvalue (Cauchy interlacing), tight once Lanczos converged."""
        _check_count("SpectrumResult.top_eigenvalues", "num_eigenvalues", num_eigenvalues)
        steps = self.ritz_values.shape[-1]
        if num_eigenvalues > steps:
            raise ValueError(
                f"top_eigenvalues: num_eigenvalues ({num_eigenvalues}) exceeds the "
                f"{steps} Ritz values of each run (num_lanczos_steps).")
        descending = jnp.flip(self.ritz_values, axis=-1)[:, :num_eigenvalues]
        return jnp.max(descending, axis=0)

    def density(self, grid: jax.Array, width: float) -> jax.Array:
        """The smoothed spectral density `φ(t) = mean_probes Σ_k τ_k² N(t; θ_k, width²)` at
        the points `grid` (an array of any shape; returns the same shape)."""
        _check_positive("SpectrumResult.density", "width", width)
        grid = jnp.asarray(grid)
        values = self.ritz_values.reshape(-1)
        weights = self.ritz_weights.reshape(-1) / self.ritz_values.shape[0]
        z = (grid[..., None] - values) / width
        return jnp.sum(weights * jnp.exp(-0.5 * z**2), axis=-1) / (width * np.sqrt(2 * np.pi))


def hessian_vector_product(fn: Callable, params: Any, *args: Any, **kwargs: Any) -> Callable:
    """`v ↦ ∇²f(params) v` for a deterministic `f(params, *args, **kwargs)` (forward-over-reverse).

    `v` and the result are trees like `params`. A `px.Expectation` is accepted when its
    program has no sample sites (its program is then an ordinary function); with sample
    sites its second derivatives are not estimated by differentiating estimates twice, and
    this raises: pass an unbiased Hessian-vector product of the expectation instead.

    Args:
        fn: a scalar function of `params` (and `*args`, `**kwargs`), or a deterministic
            `px.Expectation` (called as `f(key, params, ...)`).
        params: the point.
        *args: extra arguments of `fn` (data).
        **kwargs: extra keyword arguments of `fn`.

    Returns:
        A function `v -> H v`.

    Example:
        >>> import jax.numpy as jnp
        >>> hvp = hessian_vector_product(lambda x: jnp.sum(x**3), jnp.array([1.0, 2.0]))
        >>> tuple(float(y) for y in hvp(jnp.array([1.0, 1.0])))  # 6 x ⊙ v
        (6.0, 12.0)
    """
    function = _deterministic_function(fn, params, args, kwargs, "hessian_vector_product")

    def product(vector):
        return jax.jvp(jax.grad(lambda p: function(p, *args, **kwargs)), (params,), (vector,))[1]

    return product


def hessian_spectrum(
    key: jax.Array,
    hvp: Callable,
    params: Any,
    num_lanczos_steps: int = 30,
    num_probes: int = 10,
    probes: str = "rademacher",
) -> SpectrumResult:
    """Ritz values and weights of the Hessian from `num_probes` Lanczos runs (SLQ).

    Runs `s = num_lanczos_steps` steps of Lanczos with full reorthogonalisation from each
    of `num_probes` independent random unit vectors, using only the products `hvp(v) = H v`
    (see the module docstring for the maths). The result gives the top eigenvalues
    (`result.top_eigenvalues(k)`), unbiased estimates of the moments `tr(H^p)/d` for
    `p < 2s` (`result.moments(p)`, one per probe), and the Gaussian-smoothed spectral
    density (`result.density(grid, width)`, plotted by `plot_spectrum`). Ghorbani et al.
    use `s` of about 90 for networks; the top eigenvalue usually needs far fewer.

    Args:
        key: PRNG key for the probes (and restarts after a breakdown).
        hvp: `v -> H v` for trees `v` like `params`: exact (`hessian_vector_product`) or
            an estimate (then the Ritz values are those of the estimated operator: pass a
            function with its key fixed, so that it is one linear operator).
        params: the point whose Hessian `hvp` multiplies by (its tree and dtype shape `v`).
        num_lanczos_steps: `s`, at least 1 and at most the number of parameters `d`.
        num_probes: independent Lanczos runs, at least 1.
        probes: "rademacher" (default; Hutchinson's minimum-variance choice for real
            symmetric matrices) or "gaussian".

    Returns:
        A `SpectrumResult`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> hvp = lambda v: jnp.arange(1.0, 6.0) * v  # H = diag(1, ..., 5)
        >>> result = hessian_spectrum(jax.random.key(0), hvp, jnp.zeros(5),
        ...                           num_lanczos_steps=5, num_probes=4)
        >>> round(float(result.top_eigenvalues(1)[0]), 4)
        5.0
        >>> round(float(result.moments(1).mean()), 4)  # tr(H)/d, exact for diagonal H
        3.0
    """
    flat, unravel = ravel_pytree(params)
    dim = flat.size
    if dim == 0:
        raise ValueError("hessian_spectrum: params has no array leaves.")
    _check_count("hessian_spectrum", "num_lanczos_steps", num_lanczos_steps)
    _check_count("hessian_spectrum", "num_probes", num_probes)
    if num_lanczos_steps > dim:
        raise ValueError(
            f"hessian_spectrum: num_lanczos_steps ({num_lanczos_steps}) exceeds the number of "
            f"parameters d = {dim}; at most d steps give an orthonormal basis.")
    if probes not in PROBES:
        raise ValueError(f"hessian_spectrum: probes must be one of {PROBES}, got {probes!r}.")
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise TypeError(f"hessian_spectrum: params must be floating point, got {flat.dtype}.")
    if not callable(hvp):
        raise TypeError(
            f"hessian_spectrum: hvp must be a callable v -> H v, got {type(hvp).__name__}.")

    def matvec(v):
        out = hvp(unravel(v))
        out_flat, _ = ravel_pytree(out)
        if jax.tree.structure(out) != jax.tree.structure(params) or out_flat.shape != v.shape:
            raise ValueError(
                "hessian_spectrum: hvp(v) must return a tree like params "
                f"({jax.tree.structure(params)}, {dim} entries), got {jax.tree.structure(out)} "
                f"with {out_flat.size} entries.")
        return out_flat.astype(v.dtype)

    def one_probe(probe_key):
        key_start, key_restarts = jax.random.split(probe_key)
        if probes == "rademacher":
            start = jax.random.rademacher(key_start, (dim,), flat.dtype)
        else:
            start = jax.random.normal(key_start, (dim,), flat.dtype)
        alphas, betas = _lanczos(matvec, start, num_lanczos_steps, key_restarts)
        tridiagonal = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
        values, vectors = jnp.linalg.eigh(tridiagonal)
        return values, vectors[0] ** 2

    values, weights = jax.lax.map(one_probe, jax.random.split(key, num_probes))
    return SpectrumResult(values, weights)


def _lanczos(matvec, start, num_steps: int, key):
    """`(alphas (s,), betas (s - 1,))` of `s` Lanczos steps from `start`, fully reorthogonalised."""
    dim, dtype = start.shape[0], start.dtype
    tiny = jnp.finfo(dtype).tiny
    tolerance = jnp.sqrt(jnp.finfo(dtype).eps)

    def orthogonalise(basis, w):
        for _ in range(2):  # twice is enough (Parlett's "twice is enough")
            w = w - basis.T @ (basis @ w)
        return w

    def body(i, carry):
        basis, alphas, betas, v, v_previous, beta_previous, scale, key = carry
        basis = basis.at[i].set(v)
        w = matvec(v)
        alpha = jnp.dot(v, w)
        w = orthogonalise(basis, w - alpha * v - beta_previous * v_previous)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta + beta_previous)
        key, key_restart = jax.random.split(key)
        fresh = orthogonalise(basis, jax.random.normal(key_restart, (dim,), dtype))
        fresh = fresh / jnp.maximum(jnp.linalg.norm(fresh), tiny)
        breakdown = beta <= tolerance * scale
        v_next = jnp.where(breakdown, fresh, w / jnp.maximum(beta, tiny))
        beta = jnp.where(breakdown, jnp.zeros((), dtype), beta)
        alphas = alphas.at[i].set(alpha)
        betas = betas.at[i].set(beta)  # the last one couples to nothing kept
        return basis, alphas, betas, v_next, v, beta, scale, key

    v = start / jnp.linalg.norm(start)
    carry = (jnp.zeros((num_steps, dim), dtype), jnp.zeros(num_steps, dtype),
             jnp.zeros(num_steps, dtype), v, jnp.zeros(dim, dtype),
             jnp.zeros((), dtype), jnp.zeros((), dtype), key)
    _, alphas, betas, *_ = jax.lax.fori_loop(0, num_steps, body, carry)
    return alphas, betas[: num_steps - 1]


def plot_spectrum(
    result: SpectrumResult,
    grid: Any = None,
    width: float | None = None,
    ax: Any = None,
    log: bool = True,
    label: str | None = None,
) -> Any:
    """Plot the smoothed spectral density of a `SpectrumResult` (matplotlib, imported here).

    Args:
        result: from `hessian_spectrum`.
        grid: the eigenvalue axis; default 1,000 points over the Ritz values' range
            extended by three widths.
        width: the Gaussian smoothing `σ`; default 1% of the Ritz values' range (and at
            least 1e-6).
        ax: a matplotlib `Axes`; default a new figure's.
        log: a logarithmic density axis (default; the bulk is orders of magnitude above the
            outliers' mass, as in Ghorbani et al. 2019).
        label: the line's legend label.

    Returns:
        The matplotlib `Axes`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> result = hessian_spectrum(jax.random.key(0), lambda v: 2.0 * v, jnp.zeros(3),
        ...                           num_lanczos_steps=2, num_probes=2)
        >>> ax = plot_spectrum(result)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    values = np.asarray(result.ritz_values)
    low, high = float(values.min()), float(values.max())
    if width is None:
        width = max(0.01 * (high - low), 1e-6)
    if grid is None:
        grid = np.linspace(low - 3 * width, high + 3 * width, 1000)
    grid = np.asarray(grid)
    density = np.asarray(result.density(jnp.asarray(grid), width))
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    if log:
        ax.semilogy(grid, np.maximum(density, 1e-12), label=label)
    else:
        ax.plot(grid, density, label=label)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax


def _deterministic_function(fn, params, args, kwargs, owner: str) -> Callable:
    """The ordinary function behind `fn`: `fn` itself, or a `px.Expectation`'s program when
    it has no sample sites (else a clear error)."""
    from ..adev import Expectation

    if isinstance(fn, Expectation):
        if _has_sample_sites(fn.fn, params, args, kwargs):
            raise ValueError(
                f"{owner}: the expectation {getattr(fn, '__name__', 'objective')} has sample "
                "sites; its Hessian is not the second derivative of an estimate. Pass an "
                "unbiased Hessian-vector product of the expectation instead, e.g. "
                "lambda v: objective.hvp(key, params, *args, v=v).")
        return fn.fn
    if not callable(fn):
        raise TypeError(f"{owner}: fn must be a callable, got {type(fn).__name__}.")
    return fn


_RANDOM_PRIMITIVES = ("ppl_ext_sample", "ppl_ext_expectation")


def _has_sample_sites(program: Callable, params, args, kwargs) -> bool:
    """Whether tracing `program(params, *args, **kwargs)` meets a `px.sample` site or a
    nested expectation (anywhere, including inside control-flow bodies)."""
    closed = jax.make_jaxpr(lambda p: program(p, *args, **kwargs))(params)
    return _jaxpr_has_random(closed.jaxpr)


def _jaxpr_has_random(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _RANDOM_PRIMITIVES:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if hasattr(inner, "eqns") and _jaxpr_has_random(inner):
                    return True
    return False
