"""Interpolant paths `x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z` (stochastic interpolants).

A path carries the three coefficients and their time derivatives. With `gamma = 0` and
`x0 ~ N(0, I)` it is a one-sided interpolant (flow matching's Gaussian-to-data paths);
with data at both ends and a latent `gamma(t) z`, `z ~ N(0, I)`, a two-sided one
(Albergo, Boffi, Vanden-Eijnden 2023, "Stochastic interpolants: a unifying framework for
flows and diffusions"). Whether `x0` is Gaussian is decided by the loss (it draws `x0`
when no `x0` data are given), not by the path.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

#: how far boundary values may be from their targets (float32 arithmetic)
_BOUNDARY_ATOL = 1e-5


def _concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


class AbstractGamma(eqx.Module):
    """The latent-noise coefficient `gamma(t)` of a two-sided interpolant.

    It must vanish at `t = 0` and `t = 1` and be non-negative in between. Subclasses
    define `__call__(t)`; `derivative(t)` defaults to `jax.jvp` of it.
    `square_integrable_derivative` says whether `∫_0^1 gamma'(t)² dt < ∞`: if not (e.g.
    `sqrt(a t (1 - t))`), a least-squares velocity loss has infinite expectation and
    `drift_loss` (antithetic form) must be used.
    """

    square_integrable_derivative: ClassVar[bool] = True

    @abc.abstractmethod
    def __call__(self, t: ArrayLike) -> Array:
        """`gamma(t)`."""

    def derivative(self, t: ArrayLike) -> Array:
        """`gamma'(t)` (by forward-mode differentiation unless overridden)."""
        t = jnp.asarray(t, jnp.result_type(float))
        return jax.jvp(self.__call__, (t,), (jnp.ones_like(t),))[1]

    def is_zero(self) -> bool:
        """Whether `gamma` is identically zero (no latent noise)."""
        return False


class ZeroGamma(AbstractGamma):
    """`gamma(t) = 0`: no latent noise (flow matching's deterministic paths)."""

    def __call__(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(jnp.asarray(t, jnp.result_type(float)))

    def derivative(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(jnp.asarray(t, jnp.result_type(float)))

    def is_zero(self) -> bool:
        return True


class BridgeGamma(AbstractGamma):
    """`gamma(t) = sqrt(a t (1 - t))`, a Brownian bridge's standard deviation.

    `a = 2` is the choice of Albergo et al. Its derivative
    `a (1 - 2t) / (2 sqrt(a t (1 - t)))` is infinite at the endpoints and not square
    integrable, so only `drift_loss`, `score_loss` and `denoiser_loss` accept it.

    Args:
        scale: `a > 0`.
    """

    scale: float = 2.0
    square_integrable_derivative: ClassVar[bool] = False

    def __check_init__(self):
        if _concrete(self.scale) and not float(self.scale) > 0.0:
            raise ValueError(f"BridgeGamma: scale must be > 0, got {self.scale!r}.")

    def __call__(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t, jnp.result_type(float))
        return jnp.sqrt(self.scale * t * (1.0 - t))

    def derivative(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t, jnp.result_type(float))
        return self.scale * (1.0 - 2.0 * t) / (2.0 * jnp.sqrt(self.scale * t * (1.0 - t)))


class ParabolicGamma(AbstractGamma):
    """`gamma(t) = a t (1 - t)`, smooth with a bounded derivative `a (1 - 2t)`.

    Args:
        scale: `a > 0`.
    """

    scale: float = 1.0

    def __check_init__(self):
        if _concrete(self.scale) and not float(self.scale) > 0.0:
            raise ValueError(f"ParabolicGamma: scale must be > 0, got {self.scale!r}.")

    def __call__(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t, jnp.result_type(float))
        return self.scale * t * (1.0 - t)

    def derivative(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t, jnp.result_type(float))
        return self.scale * (1.0 - 2.0 * t)


class AbstractPath(eqx.Module):
    """An interpolant path `x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z`, `t ∈ [0, 1]`.

    Boundary conditions `alpha(0) = beta(1) = 1`, `alpha(1) = beta(0) = 0`,
    `gamma(0) = gamma(1) = 0` are checked when the path is built (within
    `boundary_tolerance`, which is 0 up to rounding except for paths that only
    approximate them, such as `VPPath`). Subclasses define `alpha`, `beta` and a `gamma`
    field; derivatives default to forward-mode differentiation.
    """

    gamma: eqx.AbstractVar[AbstractGamma]
    boundary_tolerance: ClassVar[float] = _BOUNDARY_ATOL

    def __check_init__(self):
        if not isinstance(self.gamma, AbstractGamma):
            raise TypeError(f"{type(self).__name__}: gamma must be an AbstractGamma (e.g. "
                            f"px.flows.BridgeGamma()), got {type(self.gamma).__name__}.")
        leaves = jax.tree.leaves(self)
        if not all(_concrete(x) for x in leaves):
            return  # built under a transformation: checked when built concretely
        tol = self.boundary_tolerance
        checks = {"alpha(0)": (self.alpha(0.0), 1.0), "alpha(1)": (self.alpha(1.0), 0.0),
                  "beta(0)": (self.beta(0.0), 0.0), "beta(1)": (self.beta(1.0), 1.0),
                  "gamma(0)": (self.gamma(0.0), 0.0), "gamma(1)": (self.gamma(1.0), 0.0)}
        for name, (value, target) in checks.items():
            value = float(value)
            atol = tol if name.startswith(("alpha", "beta")) else _BOUNDARY_ATOL
            if not math.isfinite(value) or abs(value - target) > atol:
                raise ValueError(f"{type(self).__name__}: boundary condition {name} = "
                                 f"{target} violated ({name} = {value}).")
        grid = np.linspace(0.0, 1.0, 11)
        if np.any(np.asarray(self.gamma(grid)) < 0.0):
            raise ValueError(f"{type(self).__name__}: gamma(t) must be >= 0 on [0, 1].")

    @abc.abstractmethod
    def alpha(self, t: ArrayLike) -> Array:
        """Coefficient of `x0`."""

    @abc.abstractmethod
    def beta(self, t: ArrayLike) -> Array:
        """Coefficient of `x1`."""

    def alpha_derivative(self, t: ArrayLike) -> Array:
        """`alpha'(t)`."""
        t = jnp.asarray(t, jnp.result_type(float))
        return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

    def beta_derivative(self, t: ArrayLike) -> Array:
        """`beta'(t)`."""
        t = jnp.asarray(t, jnp.result_type(float))
        return jax.jvp(self.beta, (t,), (jnp.ones_like(t),))[1]

    def coefficients(self, t: ArrayLike) -> tuple[Array, Array, Array]:
        """`(alpha(t), beta(t), gamma(t))`."""
        return self.alpha(t), self.beta(t), self.gamma(t)

    def derivatives(self, t: ArrayLike) -> tuple[Array, Array, Array]:
        """`(alpha'(t), beta'(t), gamma'(t))`."""
        return self.alpha_derivative(t), self.beta_derivative(t), self.gamma.derivative(t)

    def interpolate(self, t: ArrayLike, x0: ArrayLike, x1: ArrayLike,
                    z: ArrayLike | None = None) -> Array:
        """`x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z` for one point (`t` a scalar).

        Args:
            t: a time in `[0, 1]` (scalar).
            x0: the source point, shape `(dim,)`.
            x1: the target point, shape `(dim,)`.
            z: the latent Gaussian, shape `(dim,)` (ignored when `gamma = 0`).

        Returns:
            `x_t`, shape `(dim,)`.

        Example:
            >>> import jax.numpy as jnp
            >>> from ppl_ext.flows import LinearPath
            >>> float(LinearPath().interpolate(0.25, jnp.zeros(1), jnp.ones(1))[0])
            0.25
        """
        alpha, beta, gamma = self.coefficients(t)
        out = alpha * jnp.asarray(x0) + beta * jnp.asarray(x1)
        if z is not None and not self.gamma.is_zero():
            out = out + gamma * jnp.asarray(z)
        return out

    def velocity(self, t: ArrayLike, x0: ArrayLike, x1: ArrayLike,
                 z: ArrayLike | None = None) -> Array:
        """`d/dt x_t = alpha'(t) x0 + beta'(t) x1 + gamma'(t) z` (the conditional velocity)."""
        alpha, beta, gamma = self.derivatives(t)
        out = alpha * jnp.asarray(x0) + beta * jnp.asarray(x1)
        if z is not None and not self.gamma.is_zero():
            out = out + gamma * jnp.asarray(z)
        return out


class LinearPath(AbstractPath):
    """`alpha = 1 - t`, `beta = t`: the conditional optimal-transport path of flow matching
    (Lipman et al. 2023, rectified flow), with an optional latent `gamma`.

    Args:
        gamma: the latent-noise coefficient (default `ZeroGamma()`).
    """

    gamma: AbstractGamma = ZeroGamma()

    def alpha(self, t: ArrayLike) -> Array:
        return 1.0 - jnp.asarray(t, jnp.result_type(float))

    def beta(self, t: ArrayLike) -> Array:
        return jnp.asarray(t, jnp.result_type(float))

    def alpha_derivative(self, t: ArrayLike) -> Array:
        return -jnp.ones_like(jnp.asarray(t, jnp.result_type(float)))

    def beta_derivative(self, t: ArrayLike) -> Array:
        return jnp.ones_like(jnp.asarray(t, jnp.result_type(float)))


class TrigonometricPath(AbstractPath):
    """`alpha = cos(π t / 2)`, `beta = sin(π t / 2)` (variance preserving for independent
    standardised endpoints: `alpha² + beta² = 1`), with an optional latent `gamma`.

    Args:
        gamma: the latent-noise coefficient (default `ZeroGamma()`).
    """

    gamma: AbstractGamma = ZeroGamma()

    def alpha(self, t: ArrayLike) -> Array:
        return jnp.cos(0.5 * jnp.pi * jnp.asarray(t, jnp.result_type(float)))

    def beta(self, t: ArrayLike) -> Array:
        return jnp.sin(0.5 * jnp.pi * jnp.asarray(t, jnp.result_type(float)))


class VPPath(AbstractPath):
    """Flow matching's variance-preserving (diffusion) path (Lipman et al. 2023, §4.1).

    With `T(s) = s beta_min + s² (beta_max - beta_min) / 2` and `a(s) = exp(-T(s) / 2)`:
    `beta(t) = a(1 - t)`, `alpha(t) = sqrt(1 - a(1 - t)²)`, `gamma = 0`. The boundary at
    `t = 0` holds only approximately (`beta(0) = exp(-T(1)/2)`, 0.0064 by default; a
    path whose `beta(0)` exceeds 0.05 is refused), and `alpha'(t)` is infinite at `t = 1`
    (`alpha` behaves like `sqrt(1 - t)`): losses on this path should draw `t` from
    `time_interval=(0.0, 1.0 - 1e-3)` or so, since `∫ alpha'(t)² dt` diverges.

    Args:
        beta_min: the noise rate at the data end, `> 0`.
        beta_max: the noise rate at the noise end, `> beta_min`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    gamma: AbstractGamma = ZeroGamma()
    boundary_tolerance: ClassVar[float] = 0.05

    def __check_init__(self):
        if _concrete(self.beta_min) and _concrete(self.beta_max):
            if not 0.0 < float(self.beta_min) < float(self.beta_max):
                raise ValueError("VPPath: need 0 < beta_min < beta_max, got beta_min="
                                 f"{self.beta_min!r}, beta_max={self.beta_max!r}.")
        if not self.gamma.is_zero():
            raise ValueError("VPPath is one-sided: gamma must be ZeroGamma().")

    def _a(self, s):
        integral = s * self.beta_min + 0.5 * s**2 * (self.beta_max - self.beta_min)
        return jnp.exp(-0.5 * integral)

    def alpha(self, t: ArrayLike) -> Array:
        a = self._a(1.0 - jnp.asarray(t, jnp.result_type(float)))
        return jnp.sqrt(jnp.maximum(1.0 - a**2, 0.0))

    def beta(self, t: ArrayLike) -> Array:
        return self._a(1.0 - jnp.asarray(t, jnp.result_type(float)))


#: path names accepted where a path may be given by name
PATH_NAMES = {"linear": LinearPath, "trigonometric": TrigonometricPath, "vp": VPPath}


def as_path(path: AbstractPath | str) -> AbstractPath:
    """A path, or the path named `"linear"`, `"trigonometric"` or `"vp"`."""
    if isinstance(path, AbstractPath):
        return path
    if isinstance(path, str):
        if path not in PATH_NAMES:
            raise ValueError(f"unknown path {path!r}; known: {sorted(PATH_NAMES)} (or pass "
                             "a px.flows.AbstractPath).")
        return PATH_NAMES[path]()
    raise TypeError(f"path must be a px.flows.AbstractPath or a name, got "
                    f"{type(path).__name__}.")
