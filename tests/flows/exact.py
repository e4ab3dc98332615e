"""Closed-form fields and moments for the flows tests, written without ppl_ext.

Data: a finite set of points `x1_k` (uniform mixture of point masses), source
`x0 ~ N(0, 1)`, optional latent `gamma(t) z`. Given `k`, `x_t` is Gaussian with mean
`beta x1_k` and variance `alpha² + gamma²`, so every conditional expectation is a
softmax-weighted sum over `k`.
"""

import jax
import jax.numpy as jnp
import numpy as np

DATA = np.array([[-2.0], [0.5], [3.0]])
MEAN, MEAN_SQUARE = float(DATA.mean()), float((DATA**2).mean())


def linear(t):
    return 1.0 - t, t, -jnp.ones_like(t), jnp.ones_like(t)


def trigonometric(t):
    c, s = jnp.cos(jnp.pi * t / 2), jnp.sin(jnp.pi * t / 2)
    return c, s, -jnp.pi / 2 * s, jnp.pi / 2 * c


def bridge(t, a=2.0):
    """`gamma = sqrt(a t (1-t))` and `gamma gamma' = a (1 - 2t) / 2`."""
    return jnp.sqrt(a * t * (1 - t)), a * (1 - 2 * t) / 2


def _posterior(t, x, coefficients, gamma):
    """Weights `w_k ∝ N(x; beta x1_k, alpha² + gamma²)` and the residuals `x - beta x1_k`."""
    alpha, beta, _, _ = coefficients(t)
    variance = alpha**2 + gamma**2
    residual = jnp.asarray(x)[..., None] - beta * jnp.asarray(DATA[:, 0])
    weights = jax.nn.softmax(-0.5 * residual**2 / variance, axis=-1)
    return weights, residual, variance


def mixture_velocity(t, x, coefficients=linear):
    """`E[alpha' x0 + beta' x1 | x_t = x]` with `gamma = 0`."""
    alpha, _, alpha_dot, beta_dot = coefficients(t)
    weights, residual, variance = _posterior(t, x, coefficients, 0.0)
    mean_x0 = alpha * residual / variance
    return jnp.sum(weights * (alpha_dot * mean_x0 + beta_dot * DATA[:, 0]), -1)


def mixture_drift_bridge(t, x, a=2.0):
    """`E[-x0 + x1 + gamma' z | x_t]` on the linear path with `gamma = sqrt(a t(1-t))`."""
    gamma, gamma_gamma_dot = bridge(t, a)
    weights, residual, variance = _posterior(t, x, linear, gamma)
    drift = DATA[:, 0] + (-(1 - t) + gamma_gamma_dot) * residual / variance
    return jnp.sum(weights * drift, -1)


def mixture_score(t, x):
    """`∇ log p_t(x)` on the linear path, `gamma = 0`: `-E[(1-t) x0 | x] / (1-t)²`."""
    weights, residual, variance = _posterior(t, x, linear, 0.0)
    return jnp.sum(weights * -residual / variance, -1)


def gaussian_velocity(t, x, m, s):
    """Linear path from `N(0, 1)` to `N(m, s²)` (per coordinate): affine in `x`."""
    variance = (1 - t) ** 2 + t**2 * s**2
    return m + (t * s**2 - (1 - t)) * (x - t * m) / variance


def gaussian_score(t, x, m, s):
    return -(x - t * m) / ((1 - t) ** 2 + t**2 * s**2)


def gauss_legendre(num=64):
    nodes, weights = np.polynomial.legendre.leggauss(num)
    return 0.5 * (nodes + 1), 0.5 * weights


def mixture_field_square(field, coefficients=linear, gamma_fn=None, num_legendre=64,
                         num_hermite=80):
    """`∫_0^1 E|field(t, x_t)|² dt` by Gauss–Legendre in t and Gauss–Hermite per mixture
    component; `field(t, xs)` is vectorised over `xs` (one coordinate)."""
    t_nodes, t_weights = gauss_legendre(num_legendre)
    u, w = np.polynomial.hermite_e.hermegauss(num_hermite)
    w = w / w.sum()
    total = 0.0
    for t, wt in zip(t_nodes, t_weights):
        alpha, beta, _, _ = (float(c) for c in coefficients(jnp.asarray(t)))
        gamma = 0.0 if gamma_fn is None else float(gamma_fn(t)[0])
        scale = np.sqrt(alpha**2 + gamma**2)
        xs = (beta * DATA[:, 0][:, None] + scale * u[None, :]).ravel()
        values = np.asarray(field(jnp.asarray(t), jnp.asarray(xs)), np.float64) ** 2
        total += wt * np.dot(np.tile(w, len(DATA)), values) / len(DATA)
    return total
