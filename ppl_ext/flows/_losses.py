"""Training losses of interpolant models, as `px.expectation` programs.

Every loss is `loss(key, params, x1, x0=None)`: an unbiased estimate (its gradient by
the core transformation, unbiased too) of

    E_{t ~ U(t_lo, t_hi)} E_{(x0, x1) ~ coupling, z ~ N(0, I)} ℓ(f(params, t, x_t), ...)

over pairs drawn from the data: `x1 (num_data, dim)` and, for a two-sided interpolant,
`x0 (num_data0, dim)`; without `x0` data the source is `x0 ~ N(0, I)` (one-sided). With
`batch_size=None` the arrays passed are the minibatch (pass a fresh one each call, or the
whole data set); with `batch_size=b` each estimate draws `b` indices uniformly with
replacement from each array. The minibatch is then re-paired by the coupling.

The random choices are parameter-free (times, Gaussians, indices, the coupling's
uniforms), so no score-function term arises: the gradient is that of the loss at the
drawn values. `t` is kept within `[1e-6, 1 - 1e-6]`, where coefficients such as
`BridgeGamma`'s derivative are finite.

Reference: Albergo, Boffi, Vanden-Eijnden (2023), "Stochastic interpolants: a unifying
framework for flows and diffusions" (losses for b, s and the denoiser η_z); Lipman,
Chen, Ben-Hamu, Nickel, Le (2023), "Flow matching for generative modeling".
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ..adev import Expectation, expectation, reinforce, reparam, sample
from ._couplings import AbstractCoupling, IndependentCoupling, as_coupling
from ._kinetic import _check_interval
from ._paths import AbstractPath, as_path

_TIME_MARGIN = 1e-6


def _check_options(field, path, coupling, batch_size, time_interval, who):
    if not callable(field):
        raise TypeError(f"{who}: field must be a callable field(params, t, x), got "
                        f"{type(field).__name__}.")
    path, coupling = as_path(path), as_coupling(coupling)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"{who}: batch_size must be an int >= 1 or None, got {batch_size!r}.")
    try:
        interval = _check_interval(time_interval, who)
    except ValueError as error:
        if "must satisfy" not in str(error):  # not a pair
            raise
        raise ValueError(f"{error} Times outside [0, 1] are not on the path.") from None
    return path, coupling, interval


def _check_data(x, name, who):
    if jnp.ndim(x) != 2:
        raise ValueError(f"{who}: {name} must have shape (num_data, dim), got "
                         f"{jnp.shape(x)}.")
    if jnp.shape(x)[0] == 0:
        raise ValueError(f"{who}: {name} is empty.")


class _Batch:
    """One drawn minibatch: times, paired endpoints, latent Gaussian."""

    def __init__(self, path, coupling, x1, x0, batch_size, time_interval, who):
        _check_data(x1, "x1", who)
        dim = x1.shape[1]
        if x0 is not None:
            _check_data(x0, "x0", who)
            if x0.shape[1] != dim:
                raise ValueError(f"{who}: x0 and x1 must have the same dim, got "
                                 f"{x0.shape} and {x1.shape}.")
            if batch_size is None and x0.shape[0] != x1.shape[0]:
                raise ValueError(f"{who}: with batch_size=None, x0 and x1 are the "
                                 f"minibatch and must have equal lengths, got {x0.shape[0]} "
                                 f"and {x1.shape[0]}.")
        size = x1.shape[0] if batch_size is None else int(batch_size)
        if batch_size is not None:
            x1 = x1[_indices(x1.shape[0], size, "x1 minibatch")]
            if x0 is not None:
                x0 = x0[_indices(x0.shape[0], size, "x0 minibatch")]
        self.gaussian_source = x0 is None
        if x0 is None:
            # The coupling is a discontinuous function of x0 (a permutation), so a
            # pathwise site would be refused; the law is parameter-free, so the score
            # term of px.reinforce is zero and the gradient is the same.
            estimator = reparam if isinstance(coupling, IndependentCoupling) else reinforce
            x0 = sample(dist.Normal(0.0, 1.0).expand((size, dim)).to_event(2), estimator,
                        name="x0")
        uniforms = None
        if coupling.random:
            uniforms = sample(dist.Uniform(0.0, 1.0).expand((size,)).to_event(1),
                              reinforce, name="coupling")
        x1 = x1[coupling.match(x0, x1, uniforms)]
        low, high = time_interval
        u = sample(dist.Uniform(0.0, 1.0).expand((size,)).to_event(1), reparam, name="t")
        self.t = jnp.clip(low + (high - low) * u, _TIME_MARGIN, 1.0 - _TIME_MARGIN)
        self.z = None
        if not path.gamma.is_zero():
            self.z = sample(dist.Normal(0.0, 1.0).expand((size, dim)).to_event(2), reparam,
                            name="z")
        self.x0, self.x1, self.path, self.dim = x0, x1, path, dim

    def point(self, sign: float = 1.0):
        """`x_t` for every pair (with `sign · z` for the antithetic partner)."""
        zs = jnp.zeros_like(self.x0) if self.z is None else sign * self.z
        return jax.vmap(self.path.interpolate)(self.t, self.x0, self.x1, zs)

    def velocity(self, sign: float = 1.0):
        zs = jnp.zeros_like(self.x0) if self.z is None else sign * self.z
        return jax.vmap(self.path.velocity)(self.t, self.x0, self.x1, zs)

    def noise(self):
        """`(σ(t), ε)`: the Gaussian part `n = σ ε` of `x_t` (`alpha x0` for a Gaussian
        source, plus `gamma z`), with `ε ~ N(0, I)`."""
        alpha, _, gamma = jax.vmap(self.path.coefficients)(self.t)
        variance = jnp.zeros_like(self.t)
        noise = jnp.zeros_like(self.x0)
        if self.gaussian_source:
            variance, noise = variance + alpha**2, noise + alpha[:, None] * self.x0
        if self.z is not None:
            variance, noise = variance + gamma**2, noise + gamma[:, None] * self.z
        sigma = jnp.sqrt(variance)
        return sigma, noise / sigma[:, None]


def _indices(num_data: int, size: int, name: str):
    law = dist.DiscreteUniform(0, num_data - 1).expand((size,)).to_event(1)
    return sample(law, reinforce, name=name)


def _evaluate(field, params, t, x, dim, who):
    out = jax.vmap(field, (None, 0, 0))(params, t, x)
    if out.shape != x.shape:
        raise ValueError(f"{who}: the field returned shape {out.shape[1:]} for a point of "
                         f"shape ({dim},); it must return the point's shape.")
    return out


def _squared(a):
    return jnp.mean(jnp.sum(a**2, axis=-1))


def velocity_loss(field: Callable, path: AbstractPath | str = "linear",
                  coupling: AbstractCoupling | str = "independent", *,
                  batch_size: int | None = None,
                  time_interval: tuple[float, float] = (0.0, 1.0)) -> Expectation:
    """The flow-matching (velocity regression) loss.

        L(θ) = E |v_θ(t, x_t) - (alpha'(t) x0 + beta'(t) x1 + gamma'(t) z)|²,

    minimised by the marginal velocity `v(t, x) = E[d x_t/dt | x_t = x]`, whose flow
    transports the law of `x0` to that of `x1`. A path whose `gamma'` is not square
    integrable (`BridgeGamma`) makes this expectation infinite and is refused: use
    `drift_loss`.

    Args:
        field: the model `field(params, t, x)`.
        path: an `AbstractPath` or `"linear"`, `"trigonometric"`, `"vp"`.
        coupling: an `AbstractCoupling` or `"independent"`, `"exact_ot"`, `"entropic_ot"`.
        batch_size: pairs per estimate drawn from the data, or None (the arrays passed
            are the minibatch).
        time_interval: `(t_lo, t_hi)` within `[0, 1]`; `t ~ U(t_lo, t_hi)`.

    Returns:
        A `px.Expectation` `loss(key, params, x1, x0=None)`; minimise it with
        `px.fit(loss, params, optax.adam(1e-3), num_steps, key, x1, maximize=False)`.

    Example:
        >>> import jax, ppl_ext as px
        >>> from ppl_ext.flows import MLPField, velocity_loss
        >>> field = MLPField(2, hidden_sizes=(16,))
        >>> loss = velocity_loss(field, "linear", "exact_ot")
        >>> data = jax.random.normal(jax.random.key(1), (32, 2)) + 3.0
        >>> loss(jax.random.key(2), field.init(jax.random.key(0)), data).shape
        ()
    """
    who = "velocity_loss"
    path, coupling, interval = _check_options(field, path, coupling, batch_size,
                                              time_interval, who)
    if not path.gamma.square_integrable_derivative:
        raise ValueError(f"velocity_loss: {type(path.gamma).__name__}'s derivative is not "
                         "square integrable, so this least-squares loss is infinite; use "
                         "px.flows.drift_loss (antithetic form) for this path.")

    def velocity_loss(params, x1, x0=None):
        batch = _Batch(path, coupling, x1, x0, batch_size, interval, who)
        prediction = _evaluate(field, params, batch.t, batch.point(), batch.dim, who)
        return _squared(prediction - batch.velocity())

    return expectation(velocity_loss)


def drift_loss(field: Callable, path: AbstractPath | str = "linear",
               coupling: AbstractCoupling | str = "independent", *,
               batch_size: int | None = None,
               time_interval: tuple[float, float] = (0.0, 1.0)) -> Expectation:
    """The stochastic-interpolant drift loss, in antithetic form.

        L(θ) = E[ ½ |b_θ(t, x_t)|² - (alpha' x0 + beta' x1 + gamma' z) · b_θ(t, x_t) ]

    (Albergo et al. 2023, Theorem 2.7), minimised by `b(t, x) = E[d x_t/dt | x_t = x]`;
    its minimum is `-½ E|b(t, x_t)|²`. Each draw averages the pair `x_t^± = alpha x0 +
    beta x1 ± gamma z` (both have the law of `x_t`, so the expectation is unchanged), which
    keeps the variance finite when `gamma'` is infinite at the endpoints (`BridgeGamma`):
    the `gamma' z` term becomes `gamma' z · (b(x_t^+) - b(x_t^-)) / 2 = O(gamma' gamma)`.

    Args and Returns: as `velocity_loss` (any path).
    """
    who = "drift_loss"
    path, coupling, interval = _check_options(field, path, coupling, batch_size,
                                              time_interval, who)

    def drift_loss(params, x1, x0=None):
        batch = _Batch(path, coupling, x1, x0, batch_size, interval, who)
        plus = _evaluate(field, params, batch.t, batch.point(1.0), batch.dim, who)
        deterministic = batch.velocity(0.0)
        if batch.z is None:
            per_pair = 0.5 * jnp.sum(plus**2, -1) - jnp.sum(deterministic * plus, -1)
            return jnp.mean(per_pair)
        minus = _evaluate(field, params, batch.t, batch.point(-1.0), batch.dim, who)
        gamma_dot = jax.vmap(path.gamma.derivative)(batch.t)
        per_pair = (0.25 * (jnp.sum(plus**2, -1) + jnp.sum(minus**2, -1))
                    - 0.5 * jnp.sum(deterministic * (plus + minus), -1)
                    - 0.5 * gamma_dot * jnp.sum(batch.z * (plus - minus), -1))
        return jnp.mean(per_pair)

    return expectation(drift_loss)


def _check_noise(path, who):
    def check(x0):
        if x0 is not None and path.gamma.is_zero():
            raise ValueError(f"{who}: with x0 data and gamma = 0 the path has no Gaussian "
                             "part, so its score is not learnable this way; use a path "
                             "with latent noise (e.g. LinearPath(BridgeGamma())) or drop "
                             "x0 (Gaussian source).")
    return check


def score_loss(field: Callable, path: AbstractPath | str = "linear",
               coupling: AbstractCoupling | str = "independent", *,
               batch_size: int | None = None,
               time_interval: tuple[float, float] = (0.0, 1.0)) -> Expectation:
    """Denoising score matching, weighted by the noise variance.

    `x_t` has a Gaussian part `σ(t) ε` (`σ² = alpha² + gamma²` for a Gaussian source,
    `gamma²` for data at both ends). The loss

        L(θ) = E |σ(t) s_θ(t, x_t) + ε|²

    is minimised by the score `s(t, x) = ∇ log p_t(x) = -E[ε | x_t = x] / σ(t)`
    (Tweedie); the weight `σ²` keeps it finite where `σ → 0`.

    Args and Returns: as `velocity_loss`.
    """
    who = "score_loss"
    path, coupling, interval = _check_options(field, path, coupling, batch_size,
                                              time_interval, who)
    check = _check_noise(path, who)

    def score_loss(params, x1, x0=None):
        check(x0)
        batch = _Batch(path, coupling, x1, x0, batch_size, interval, who)
        sigma, epsilon = batch.noise()
        score = _evaluate(field, params, batch.t, batch.point(), batch.dim, who)
        return _squared(sigma[:, None] * score + epsilon)

    return expectation(score_loss)


def denoiser_loss(field: Callable, path: AbstractPath | str = "linear",
                  coupling: AbstractCoupling | str = "independent", *,
                  batch_size: int | None = None,
                  time_interval: tuple[float, float] = (0.0, 1.0)) -> Expectation:
    """The denoiser loss `L(θ) = E |η_θ(t, x_t) - ε|²`, with `ε` the standardised
    Gaussian part of `x_t` (see `score_loss`).

    Minimised by `η(t, x) = E[ε | x_t = x]`; the score is `-η(t, x) / σ(t)`.

    Args and Returns: as `velocity_loss`.
    """
    who = "denoiser_loss"
    path, coupling, interval = _check_options(field, path, coupling, batch_size,
                                              time_interval, who)
    check = _check_noise(path, who)

    def denoiser_loss(params, x1, x0=None):
        check(x0)
        batch = _Batch(path, coupling, x1, x0, batch_size, interval, who)
        _, epsilon = batch.noise()
        prediction = _evaluate(field, params, batch.t, batch.point(), batch.dim, who)
        return _squared(prediction - epsilon)

    return expectation(denoiser_loss)
