"""Kinetic energy of Gaussian paths and kinetic-optimal (KO) paths on a finite data set.

A one-sided Gaussian path `x_t = alpha(t) x0 + beta(t) x1`, `x0 ~ N(0, I_d)`, carries
data `x1` (uniform on the rows `y_1..y_n` of a data set) from noise (`t = 0`) to data
(`t = 1`). Its (marginal) kinetic energy is

    KE = ∫_0^1 E |u_t(x_t)|² dt,   u_t(x) = E[alpha' x0 + beta' x1 | x_t = x],

the exact marginal velocity (`marginal_velocity`). For a single data point `x1` the
marginal field is the conditional one, `u_t(x) = (alpha'/alpha)(x - beta x1) + beta' x1`,
and `KE = ∫ alpha'² d + beta'² |x1|² dt` (`conditional_kinetic_energy`): `|x1|² + d` for
Cond-OT (`LinearPath`), `(π²/8)(|x1|² + d)` for the cosine path (`TrigonometricPath`).

Reduced form (Shaul, Chen, Nickel, Le, Lipman 2023, "On kinetic optimal probability
paths for generative models"). Since `E|alpha' x0 + beta' x1|² = d alpha'² + M beta'²`
(`M = E|x1|²`) and the conditional velocity is `(alpha'/alpha) x_t + alpha snr' x1` with
the signal-to-noise ratio `snr = beta / alpha`,

    KE = ∫ d alpha'² + M beta'² - alpha² snr'² D(snr) dt,
    D(s) = E tr Cov[x1 | x0 + s x1],

so the data enter through one scalar function of the SNR. In the coordinates
`a = sqrt(d) alpha = r cos(phi)`, `b = sqrt(M) beta = r sin(phi)` this is

    KE = ∫ r'² + r² lambda(phi) phi'² dt,   lambda = 1 - D(s) (1/M + s²/d),
    s = sqrt(d/M) tan(phi),

with the *data separation function* `lambda ∈ [0, 1]` (`DataSeparation`; `lambda = 1`
for a single point; for normalised data `lambda → 1` away from `s = 0` as
`n / sqrt(d) → 0`, while `lambda(0) = |mean|² / M` stays put). The
metric `dr² + r² lambda(phi) dphi²` is a flat cone: with `psi(phi) = ∫_0^phi
sqrt(lambda)` (the 1-D ODE `dpsi/dphi = sqrt(lambda(phi))`, `psi(0) = 0`) it reads
`dr² + r² dpsi²`, so the kinetic-optimal path is the constant-speed straight segment
from `(r, psi) = (sqrt(d), 0)` to `(sqrt(M), Psi)`, `Psi = psi(π/2) <= π/2`, unfolded into
the plane (`KineticOptimalPath`), with

    KE_KO = d + M - 2 sqrt(d M) cos(Psi)   (<= d + M, Cond-OT's conditional KE).

With `lambda ≡ 1` (a single point) this is Cond-OT. Estimates: `D` by Monte Carlo over
`x0` with one fixed set of draws for every `s` (common random numbers, so `lambda` is
smooth in `s`), the ODE by the trapezoid rule on a grid of `phi`, time integrals by
Gauss–Legendre quadrature.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from ._paths import AbstractGamma, AbstractPath, ZeroGamma, as_path

#: the largest SNR evaluated (the data separation function is 1 to float precision there)
_MAX_SNR = 1e6
#: a floor on sqrt(lambda), so that psi(phi) is strictly increasing and invertible
_SQRT_FLOOR = 1e-6


class KineticEnergy(NamedTuple):
    """A kinetic-energy estimate and its Monte-Carlo standard error (0 when exact in `x`)."""

    estimate: Array
    standard_error: Array


def _check_data(data, who: str) -> Array:
    data = jnp.asarray(data)
    if data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 1:
        raise ValueError(f"{who}: data must be an array of shape (num_data, dim), got shape "
                         f"{tuple(data.shape)}.")
    if not jnp.issubdtype(data.dtype, jnp.floating):
        data = data.astype(jnp.result_type(float))
    if not isinstance(data, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(data))):
        raise ValueError(f"{who}: data must be finite.")
    return data


def _check_count(value, name: str, who: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_interval(time_interval, who: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in time_interval)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: time_interval must be a pair (t_lo, t_hi), got "
                         f"{time_interval!r}.") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"{who}: time_interval must satisfy 0 <= t_lo < t_hi <= 1, got "
                         f"{time_interval!r}.")
    return low, high


def _check_path(path, who: str) -> AbstractPath:
    path = as_path(path)
    if not path.gamma.is_zero():
        raise ValueError(f"{who}: the kinetic energy here is that of a one-sided Gaussian "
                         "path (gamma = ZeroGamma()); got a path with latent noise.")
    return path


def _legendre(num_times: int, time_interval: tuple[float, float]):
    nodes, weights = np.polynomial.legendre.leggauss(num_times)
    low, high = time_interval
    half = 0.5 * (high - low)
    return low + half * (nodes + 1.0), half * weights


def marginal_velocity(path: AbstractPath | str, data: ArrayLike):
    """The exact marginal velocity field of a one-sided Gaussian path to a finite data set.

    `u_t(x) = Σ_k w_k(x) [(alpha'/alpha)(x - beta y_k) + beta' y_k]` with posterior weights
    `w_k ∝ exp(-|x - beta y_k|² / (2 alpha²))` (data uniform on the rows `y_k`, source
    `N(0, I)`). Defined for `t < 1` (`alpha > 0`).

    Args:
        path: a path with `gamma = 0` (or its name).
        data: the data set, shape `(num_data, dim)`.

    Returns:
        A field `field(params, t, x)` (`params` ignored), usable with `ode_sample`.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import LinearPath, marginal_velocity
        >>> field = marginal_velocity(LinearPath(), jnp.array([[1.0, 2.0]]))
        >>> u = field(None, 0.5, jnp.array([0.5, 1.0]))
        >>> round(float(u[0]), 4), round(float(u[1]), 4)
        (1.0, 2.0)
    """
    path = _check_path(path, "marginal_velocity")
    data = _check_data(data, "marginal_velocity")

    def field(params, t, x):
        del params
        x = jnp.asarray(x)
        alpha, beta = path.alpha(t), path.beta(t)
        alpha_dot, beta_dot = path.alpha_derivative(t), path.beta_derivative(t)
        residual = x[None, :] - beta * data
        weights = jax.nn.softmax(-0.5 * jnp.sum(residual**2, -1) / alpha**2)
        conditional = (alpha_dot / alpha) * residual + beta_dot * data
        return weights @ conditional

    return field


def conditional_kinetic_energy(path: AbstractPath | str, x1: ArrayLike, *,
                               num_times: int = 64,
                               time_interval: tuple[float, float] = (0.0, 1.0)) -> Array:
    """The kinetic energy `∫ E|u_t(x_t | x1)|² dt` of a Gaussian path to one point `x1`.

    The field is the conditional velocity `u_t(x) = (alpha'/alpha)(x - beta x1) + beta' x1`
    (the marginal field when the data set is `{x1}`). `x ~ N(beta x1, alpha² I)` is
    integrated by the symmetric degree-3 cubature `x = beta x1 ± alpha sqrt(d) e_i`
    (`2d` points), exact for the square norm of an affine field; `t` by Gauss–Legendre
    with `num_times` nodes on `time_interval`. Closed forms: `|x1|² + d` for `LinearPath`,
    `(π²/8)(|x1|² + d)` for `TrigonometricPath`.

    Args:
        path: a path with `gamma = 0` (or its name).
        x1: the data point, shape `(dim,)`.
        num_times: Gauss–Legendre nodes in `t`.
        time_interval: `(t_lo, t_hi)`, the integration range (`VPPath`'s KE diverges at
            `t = 1`; integrate it to `1 - 1e-3` or so).

    Returns:
        The kinetic energy (a scalar).

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import LinearPath, conditional_kinetic_energy
        >>> round(float(conditional_kinetic_energy(LinearPath(), jnp.array([1.0, 2.0]))), 4)
        7.0
    """
    who = "conditional_kinetic_energy"
    path = _check_path(path, who)
    x1 = jnp.asarray(x1)
    if x1.ndim != 1 or x1.shape[0] < 1:
        raise ValueError(f"{who}: x1 must be a point of shape (dim,), got shape "
                         f"{tuple(x1.shape)}.")
    num_times = _check_count(num_times, "num_times", who, 1)
    times, weights = _legendre(num_times, _check_interval(time_interval, who))
    dtype = jnp.result_type(float)
    return _conditional_energy(path, x1.astype(dtype), jnp.asarray(times, dtype),
                               jnp.asarray(weights, dtype))


@eqx.filter_jit
def _conditional_energy(path, x1, times, weights):
    dim = x1.shape[0]
    field = marginal_velocity(path, x1[None, :])
    directions = math.sqrt(dim) * jnp.concatenate([jnp.eye(dim), -jnp.eye(dim)])

    def at(t):
        points = path.beta(t) * x1 + path.alpha(t) * directions
        values = jax.vmap(lambda x: field(None, t, x))(points)
        return jnp.mean(jnp.sum(values**2, -1))

    return jnp.dot(weights, jax.vmap(at)(times))


def marginal_kinetic_energy(key: jax.Array, path: AbstractPath | str, data: ArrayLike, *,
                            num_samples: int = 256, num_times: int = 64,
                            time_interval: tuple[float, float] = (0.0, 1.0)) -> KineticEnergy:
    """The marginal kinetic energy `∫ E|u_t(x_t)|² dt` of a path on a finite data set.

    `u_t` is the exact marginal field (`marginal_velocity`). For every data point `y_k`,
    `num_samples` draws `z ~ N(0, I)` give `x_t = alpha(t) z + beta(t) y_k` at every
    Gauss–Legendre node (the same `z` along the path), so each draw contributes one
    time integral; the estimate is the mean of those (stratified over `k`) and the
    standard error is that of the mean. Unbiased up to the (deterministic) quadrature
    error in `t`.

    Args:
        key: a PRNG key.
        path: a path with `gamma = 0` (or its name).
        data: the data set, shape `(num_data, dim)`.
        num_samples: draws of `x0` per data point (at least 2).
        num_times: Gauss–Legendre nodes in `t`.
        time_interval: `(t_lo, t_hi)`, the integration range.

    Returns:
        A `KineticEnergy(estimate, standard_error)`.
    """
    who = "marginal_kinetic_energy"
    path = _check_path(path, who)
    data = _check_data(data, who)
    num_samples = _check_count(num_samples, "num_samples", who, 2)
    num_times = _check_count(num_times, "num_times", who, 1)
    times, weights = _legendre(num_times, _check_interval(time_interval, who))
    dtype = data.dtype
    times, weights = jnp.asarray(times, dtype), jnp.asarray(weights, dtype)
    num_data, dim = data.shape
    noise = jax.random.normal(key, (num_data, num_samples, dim), dtype)
    values = _time_integrals(path, data, noise, times, weights)  # (num_data, num_samples)
    estimate = jnp.mean(values)
    variance = jnp.sum(jnp.var(values, axis=1, ddof=1)) / (num_samples * num_data**2)
    return KineticEnergy(estimate, jnp.sqrt(variance))


@eqx.filter_jit
def _time_integrals(path, data, noise, times, weights):
    """`∫ |u_t(alpha z + beta y_k)|² dt` (Gauss–Legendre) for every draw `z` and point `y_k`."""
    field = marginal_velocity(path, data)

    def integral(z, y):
        def at(t):
            return jnp.sum(field(None, t, path.alpha(t) * z + path.beta(t) * y) ** 2)
        return jnp.dot(weights, jax.vmap(at)(times))

    return jax.vmap(lambda zs, y: jax.vmap(lambda z: integral(z, y))(zs))(noise, data)


@jax.jit
def _separation_table(data, noise, snr, mean_square):
    dim = data.shape[1]
    trace = jax.vmap(lambda s: _posterior_trace_covariance(data, noise, s))(snr)
    return 1.0 - trace * (1.0 / mean_square + snr**2 / dim)


@functools.partial(jax.jit, static_argnums=2)
def _tabulate(data, noise, num_grid):
    """`M`, the `phi` grid, `lambda` on it (clipped to [0, 1]) and `psi` (trapezoid rule)."""
    dtype, dim = data.dtype, data.shape[1]
    mean_square = jnp.mean(jnp.sum(data**2, -1))
    angles = jnp.linspace(0.0, 0.5 * jnp.pi, num_grid, dtype=dtype)
    snr = jnp.minimum(jnp.sqrt(dim / mean_square) * jnp.tan(angles), _MAX_SNR)
    snr = snr.at[-1].set(_MAX_SNR)
    values = _separation_table(data, noise, snr, mean_square)
    values = jnp.clip(values, 0.0, 1.0).at[-1].set(1.0)
    root = jnp.maximum(jnp.sqrt(values), _SQRT_FLOOR)
    steps = 0.5 * (root[1:] + root[:-1]) * jnp.diff(angles)
    cumulative = jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(steps)])
    return mean_square, angles, values, cumulative


@eqx.filter_jit
def _reduced_energy(separation, path, times, weights):
    root_d, root_m = math.sqrt(separation.dim), jnp.sqrt(separation.mean_square)

    def at(t):
        a, b = root_d * path.alpha(t), root_m * path.beta(t)
        a_dot, b_dot = root_d * path.alpha_derivative(t), root_m * path.beta_derivative(t)
        lam = jnp.interp(jnp.arctan2(b, a), separation.angles, separation.values)
        cross = a * b_dot - b * a_dot
        return a_dot**2 + b_dot**2 - (1.0 - lam) * cross**2 / (a**2 + b**2)

    return jnp.dot(weights, jax.vmap(at)(times))


def _posterior_trace_covariance(data, noise, snr):
    """`mean over k, z of tr Cov[x1 | x0 + s x1 = z + s y_k]` for one SNR `s`."""
    norms = jnp.sum(data**2, -1)

    def one(z, y):
        observation = z + snr * y
        logits = snr * (data @ observation) - 0.5 * snr**2 * norms
        weights = jax.nn.softmax(logits)
        mean = weights @ data
        return weights @ norms - mean @ mean

    return jnp.mean(jax.vmap(lambda zs, y: jax.vmap(lambda z: one(z, y))(zs))(noise, data))


class DataSeparation(eqx.Module):
    """The data separation function `lambda` of a finite data set, tabulated on a grid
    of the angle `phi ∈ [0, π/2]` (see the module docstring), with `psi(phi) = ∫ sqrt(lambda)`.

    `lambda(s) = 1 - D(s) (1/M + s²/d)`, `D(s) = E tr Cov[x1 | x0 + s x1]`, `M = E|x1|²`,
    and `phi = arctan(sqrt(M/d) s)`. `D` is estimated by Monte Carlo with one set of
    `num_samples` draws of `x0` per data point shared by all grid points (so the table is
    smooth), `lambda` is clipped to `[0, 1]`, and the ODE `dpsi/dphi = sqrt(lambda)` is
    integrated by the trapezoid rule on the grid. `D(0) = M - |mean|²` is exact, so
    `lambda(0) = |mean|² / M` (0 for centred data).

    Build it with `DataSeparation.from_data(key, data)`.

    Attributes:
        dim: `d`.
        mean_square: `M = E|x1|²`.
        angles: the grid of `phi`, shape `(num_grid,)`.
        values: `lambda` on the grid.
        cumulative: `psi` on the grid (`psi(0) = 0`).
    """

    dim: int = eqx.field(static=True)
    mean_square: Array
    angles: Array
    values: Array
    cumulative: Array

    @classmethod
    def from_data(cls, key: jax.Array, data: ArrayLike, *, num_samples: int = 256,
                  num_grid: int = 1025) -> DataSeparation:
        """Tabulate `lambda` for `data (num_data, dim)` (see the class docstring).

        Args:
            key: a PRNG key (the draws of `x0`).
            data: the data set, shape `(num_data, dim)`, not all zero.
            num_samples: draws of `x0` per data point.
            num_grid: grid points in `phi` (at least 3).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from ppl_ext.flows import DataSeparation
            >>> sep = DataSeparation.from_data(jax.random.key(0), jnp.array([[2.0, 0.0]]))
            >>> float(sep.values.min())  # a single point: lambda = 1
            1.0
        """
        who = "DataSeparation.from_data"
        data = _check_data(data, who)
        num_samples = _check_count(num_samples, "num_samples", who, 1)
        num_grid = _check_count(num_grid, "num_grid", who, 3)
        num_data, dim = data.shape
        mean_square = jnp.mean(jnp.sum(data**2, -1))
        if not float(mean_square) > 0.0:
            raise ValueError(f"{who}: data must not be all zero (E|x1|² = 0).")
        noise = jax.random.normal(key, (num_data, num_samples, dim), data.dtype)
        mean_square, angles, values, cumulative = _tabulate(data, noise, num_grid)
        return cls(dim, mean_square, angles, values, cumulative)

    def angle(self, snr: ArrayLike) -> Array:
        """`phi = arctan(sqrt(M/d) snr)`."""
        return jnp.arctan(jnp.sqrt(self.mean_square / self.dim) * jnp.asarray(snr))

    def __call__(self, snr: ArrayLike) -> Array:
        """`lambda(snr)` (linear interpolation in `phi`)."""
        return jnp.interp(self.angle(snr), self.angles, self.values)

    @property
    def total_angle(self) -> Array:
        """`Psi = psi(π/2) = ∫_0^{π/2} sqrt(lambda(phi)) dphi` (`π/2` when `lambda ≡ 1`)."""
        return self.cumulative[-1]

    def optimal_kinetic_energy(self) -> Array:
        """The kinetic-optimal path's energy `d + M - 2 sqrt(d M) cos(Psi)`."""
        d, m = self.dim, self.mean_square
        return d + m - 2.0 * jnp.sqrt(d * m) * jnp.cos(self.total_angle)

    def kinetic_energy(self, path: AbstractPath | str, *, num_times: int = 256,
                       time_interval: tuple[float, float] = (0.0, 1.0)) -> Array:
        """A path's marginal kinetic energy by the reduced form
        `∫ a'² + b'² - (1 - lambda(phi)) (a b' - b a')² / r² dt` (`a = sqrt(d) alpha`,
        `b = sqrt(M) beta`), Gauss–Legendre in `t` with `num_times` nodes.

        Deterministic given the table (the Monte Carlo is in `lambda`); compare paths on
        one table. `marginal_kinetic_energy` estimates the same number from the fields.
        """
        who = "DataSeparation.kinetic_energy"
        path = _check_path(path, who)
        num_times = _check_count(num_times, "num_times", who, 1)
        times, weights = _legendre(num_times, _check_interval(time_interval, who))
        dtype = self.angles.dtype
        return _reduced_energy(self, path, jnp.asarray(times, dtype),
                               jnp.asarray(weights, dtype))


def data_separation(key: jax.Array, data: ArrayLike, snr: ArrayLike, *,
                    num_samples: int = 256) -> Array:
    """The data separation function `lambda(snr) = 1 - D(snr) (1/M + snr²/d)` at the
    given signal-to-noise ratios `snr = beta / alpha >= 0` (Monte Carlo over `x0` with
    `num_samples` draws per data point, shared by all `snr`; see `DataSeparation`).

    Args:
        key: a PRNG key.
        data: the data set, shape `(num_data, dim)`.
        snr: SNR values, any shape, `>= 0`.
        num_samples: draws of `x0` per data point.

    Returns:
        `lambda` at `snr` (same shape), unclipped.
    """
    who = "data_separation"
    data = _check_data(data, who)
    num_samples = _check_count(num_samples, "num_samples", who, 1)
    snr = jnp.asarray(snr, data.dtype)
    if not bool(jnp.all(snr >= 0.0)):
        raise ValueError(f"{who}: snr must be >= 0.")
    num_data, dim = data.shape
    mean_square = jnp.mean(jnp.sum(data**2, -1))
    noise = jax.random.normal(key, (num_data, num_samples, dim), data.dtype)
    return _separation_table(data, noise, snr.reshape(-1), mean_square).reshape(snr.shape)


class KineticOptimalPath(AbstractPath):
    """The kinetic-optimal Gaussian path of a data set (Shaul et al. 2023), one-sided.

    In the flat unfolding `(X, Y) = r (cos psi, sin psi)` of the kinetic-energy metric
    (module docstring) the path is the constant-speed segment
    `P(t) = (1 - t) (sqrt(d), 0) + t sqrt(M) (cos Psi, sin Psi)`; then `r = |P|`,
    `phi = psi^{-1}(atan2(P_y, P_x))` (inverting the tabulated solution of
    `dpsi/dphi = sqrt(lambda)`), `alpha = r cos(phi) / sqrt(d)` and
    `beta = r sin(phi) / sqrt(M)`. When `lambda ≡ 1` this is Cond-OT (`LinearPath`). For
    centred data `lambda(0) = 0`, so `beta` grows like `sqrt(t)` near `t = 0`: the
    conditional velocity's second moment is not integrable there (the marginal KE is
    finite); train with `time_interval=(1e-3, 1.0)` or so.

    Args:
        separation: the data set's `DataSeparation` (or use `from_data`).
    """

    separation: DataSeparation
    gamma: AbstractGamma

    def __init__(self, separation: DataSeparation):
        self.separation = separation
        self.gamma = ZeroGamma()

    def __check_init__(self):
        if not isinstance(self.separation, DataSeparation):
            raise TypeError("KineticOptimalPath: separation must be a px.flows.DataSeparation "
                            f"(e.g. DataSeparation.from_data(key, data)), got "
                            f"{type(self.separation).__name__}.")
        if not self.gamma.is_zero():
            raise ValueError("KineticOptimalPath is one-sided: gamma must be ZeroGamma().")

    @classmethod
    def from_data(cls, key: jax.Array, data: ArrayLike, *, num_samples: int = 256,
                  num_grid: int = 1025) -> KineticOptimalPath:
        """The KO path of `data (num_data, dim)` (`DataSeparation.from_data` arguments).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from ppl_ext.flows import KineticOptimalPath
            >>> data = jnp.array([[-1.0, 0.0], [1.0, 0.0]])
            >>> path = KineticOptimalPath.from_data(jax.random.key(0), data)
            >>> round(float(path.alpha(0.0)), 4), round(float(path.beta(1.0)), 4)
            (1.0, 1.0)
        """
        return cls(DataSeparation.from_data(key, data, num_samples=num_samples,
                                            num_grid=num_grid))

    def _polar(self, t):
        sep = self.separation
        t = jnp.asarray(t, sep.angles.dtype)
        root_d, root_m = math.sqrt(sep.dim), jnp.sqrt(sep.mean_square)
        total = sep.total_angle
        x = (1.0 - t) * root_d + t * root_m * jnp.cos(total)
        y = t * root_m * jnp.sin(total)
        radius = jnp.sqrt(x**2 + y**2)
        psi = jnp.clip(jnp.arctan2(y, x), 0.0, total)
        phi = jnp.interp(psi, sep.cumulative, sep.angles)
        return radius, phi, root_d, root_m

    def alpha(self, t: ArrayLike) -> Array:
        radius, phi, root_d, _ = self._polar(t)
        return jnp.where(phi >= 0.5 * jnp.pi, 0.0, radius * jnp.cos(phi) / root_d)

    def beta(self, t: ArrayLike) -> Array:
        radius, phi, _, root_m = self._polar(t)
        return radius * jnp.sin(phi) / root_m

    def kinetic_energy(self) -> Array:
        """The path's marginal kinetic energy `d + M - 2 sqrt(d M) cos(Psi)` (the minimum
        over Gaussian paths, for the tabulated `lambda`)."""
        return self.separation.optimal_kinetic_energy()
