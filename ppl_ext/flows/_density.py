"""Log densities of flows by the instantaneous change of variables.

For `dx/dt = v(t, x)` pushing `p_0 = N(0, I)` at `t = 0` forward to `p_1` at `t = 1`,

    log p_1(x_1) = log p_0(x(0)) - ∫_0^1 div v(t, x(t)) dt,

with `x(t)` the ODE solution through `x(1) = x_1`, integrated backwards together with the
divergence integral (Chen et al. 2018, "Neural ordinary differential equations";
Grathwohl et al. 2019, FFJORD, for Hutchinson's estimator).
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._samplers import _points, as_solver, check_num_steps, step_control

_PROBES = ("rademacher", "gaussian")
#: adaptive steps are controlled on the position only (so that they never depend on
#: Hutchinson's probes); this cap keeps the divergence integral accurate where the
#: position is easy to integrate (a straight trajectory has no local error at all)
_MAX_STEP = 0.05


def standard_normal_log_density(x: Array) -> Array:
    """`log N(x; 0, I)` summed over the last axis."""
    return -0.5 * jnp.sum(x**2, -1) - 0.5 * x.shape[-1] * jnp.log(2.0 * jnp.pi)


def _state_norm(state) -> Array:
    """RMS norm of the position only: adaptive steps never depend on the probes."""
    return jnp.sqrt(jnp.mean(state[0] ** 2))


def log_density(velocity: Callable, x1: ArrayLike, *, solver="tsit5",
                num_steps: int | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                adjoint: diffrax.AbstractAdjoint | None = None) -> Array:
    """`log p_1(x1)` of the flow of `velocity` from `N(0, I)` at `t = 0`, with the exact
    divergence.

    `div v = tr(∂v/∂x)` by `jax.jacfwd` (`dim` forward passes per evaluation; for low
    dimension). The result is the ODE's log density up to the solver's error. Adaptive
    steps (`num_steps=None`) are controlled on the position `x` only and are at most 0.05
    long (as in `hutchinson_log_density`, so that both integrate on the same steps).

    Args:
        velocity: `velocity(t, x)` for one point.
        x1: points, `(dim,)` or `(batch, dim)`.
        solver, num_steps, rtol, atol, adjoint: as `ode_sample`.

    Returns:
        `log p_1(x1)`, shape `()` or `(batch,)`.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import log_density
        >>> # v = x: the flow at t = 1 is N(0, e²), so log p_1(0) = -log(e sqrt(2π))
        >>> round(float(log_density(lambda t, x: x, jnp.zeros(1))), 4)
        -1.9189
    """
    return _log_density(None, velocity, x1, "exact", 1, "rademacher", solver, num_steps,
                        rtol, atol, adjoint, "log_density")


def hutchinson_log_density(key: jax.Array, velocity: Callable, x1: ArrayLike, *,
                           num_probes: int = 1, probe: str = "rademacher", solver="tsit5",
                           num_steps: int | None = None, rtol: float = 1e-5,
                           atol: float = 1e-5,
                           adjoint: diffrax.AbstractAdjoint | None = None) -> Array:
    """An unbiased estimate of `log_density` with Hutchinson's trace estimator.

    `div v ≈ mean_k ε_kᵀ (∂v/∂x) ε_k` (one Jacobian-vector product per probe), with
    `num_probes` probes `ε_k` (Rademacher or standard Gaussian, both with
    `E[ε εᵀ] = I`) drawn once per point and kept along the trajectory. The trajectory
    does not depend on the probes (adaptive steps are controlled on `x` only), and each
    solver step combines the per-stage estimates linearly, so the estimate is unbiased
    for what the same solver computes with the exact divergence (`log_density`):
    unbiased for the ODE's log density up to the solver's error. Its exponential is not
    unbiased for the density (Jensen).

    Args:
        key: a JAX PRNG key (the probes; one key per point).
        velocity: `velocity(t, x)` for one point.
        x1: points, `(dim,)` or `(batch, dim)`.
        num_probes: probes per point.
        probe: `"rademacher"` or `"gaussian"`.
        solver, num_steps, rtol, atol, adjoint: as `ode_sample`.

    Returns:
        The estimate of `log p_1(x1)`, shape `()` or `(batch,)`.

    Reference: Grathwohl et al. (2019), "FFJORD: free-form continuous dynamics for
    scalable reversible generative models".
    """
    return _log_density(key, velocity, x1, "hutchinson", num_probes, probe, solver,
                        num_steps, rtol, atol, adjoint, "hutchinson_log_density")


def _log_density(key, velocity, x1, divergence, num_probes, probe, solver, num_steps, rtol,
                 atol, adjoint, who):
    x1 = _points(x1, who)
    solver = as_solver(solver)
    num_steps = check_num_steps(num_steps, who)
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"{who}: divergence must be 'exact' or 'hutchinson', got "
                         f"{divergence!r}.")
    if divergence == "hutchinson":
        if key is None:
            raise ValueError(f"{who}: Hutchinson's estimator needs a key for its probes.")
        if probe not in _PROBES:
            raise ValueError(f"{who}: probe must be one of {_PROBES}, got {probe!r}.")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"{who}: num_probes must be an int >= 1, got {num_probes!r}.")
    dt0, controller = step_control(solver, num_steps, rtol, atol, 1.0, 0.0, who,
                                   norm=_state_norm, dtmax=_MAX_STEP)
    options = {} if adjoint is None else {"adjoint": adjoint}

    def one(key, x):
        if divergence == "exact":
            def divergence_at(t, y):
                return jnp.trace(jax.jacfwd(lambda u: velocity(t, u))(y))
        else:
            shape = (num_probes, x.shape[0])
            probes = (jax.random.rademacher(key, shape, x.dtype) if probe == "rademacher"
                      else jax.random.normal(key, shape, x.dtype))

            def divergence_at(t, y):
                def quadratic_form(e):
                    return jnp.dot(jax.jvp(lambda u: velocity(t, u), (y,), (e,))[1], e)
                return jnp.mean(jax.vmap(quadratic_form)(probes))

        def vector_field(t, state, args):
            y, _ = state
            return velocity(t, y), divergence_at(t, y)

        state = (x, jnp.zeros((), x.dtype))
        solution = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), solver, 1.0, 0.0, dt0,
                                       state, stepsize_controller=controller,
                                       max_steps=max(4096, (num_steps or 0) + 1), **options)
        y0, integral = solution.ys[0][-1], solution.ys[1][-1]
        # integral = ∫_1^0 div v dt = -∫_0^1 div v dt
        return standard_normal_log_density(y0) + integral

    if key is None:
        key = jax.random.key(0)  # unused by the exact divergence
    if x1.ndim == 1:
        return one(key, x1)
    return jax.vmap(one)(jax.random.split(key, x1.shape[0]), x1)
