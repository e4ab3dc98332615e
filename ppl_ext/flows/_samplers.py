"""Samplers: the probability-flow ODE and the SDE `dX = (b + ε s) dt + sqrt(2ε) dW`,
integrated with diffrax.

Fields here are callables `f(t, x)` of one point `x (dim,)` (close over trained
parameters: `lambda t, x: field(params, t, x)`). A batch `x0 (batch, dim)` is integrated
point by point under `jax.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
from jaxtyping import Array, ArrayLike

#: solver names accepted where a solver may be given by name
SOLVERS = {"tsit5": diffrax.Tsit5, "heun": diffrax.Heun, "dopri5": diffrax.Dopri5,
           "euler": diffrax.Euler}
_MAX_STEPS = 4096


def as_solver(solver) -> diffrax.AbstractSolver:
    """A diffrax solver, or the one named `"tsit5"`, `"heun"`, `"dopri5"` or `"euler"`."""
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; known: {sorted(SOLVERS)} (or pass "
                             "a diffrax solver).")
        return SOLVERS[solver]()
    raise TypeError(f"solver must be a diffrax solver or a name, got {type(solver).__name__}.")


def check_num_steps(num_steps, who: str, allow_none: bool = True):
    """Validate a step count (None: adaptive)."""
    if num_steps is None and allow_none:
        return None
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or num_steps < 1:
        raise ValueError(f"{who}: num_steps must be an int >= 1"
                         f"{' or None (adaptive)' if allow_none else ''}, got {num_steps!r}.")
    return int(num_steps)


def _check_times(t0, t1, who):
    for name, value in (("t0", t0), ("t1", t1)):
        if not isinstance(value, jax.core.Tracer) and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{who}: {name} must lie in [0, 1], got {value!r}.")


def step_control(solver, num_steps, rtol, atol, t0, t1, who, norm=None, dtmax=None):
    """`(dt0, stepsize_controller)`: fixed steps, or a PID controller (adaptive)."""
    if num_steps is not None:
        return (t1 - t0) / num_steps, diffrax.ConstantStepSize()
    if solver.order(diffrax.ODETerm(lambda t, y, a: y)) is None or isinstance(
            solver, diffrax.Euler):
        raise ValueError(f"{who}: {type(solver).__name__} has no error estimate; give "
                         "num_steps for fixed steps, or use an adaptive solver (tsit5, heun).")
    kwargs = {} if norm is None else {"norm": norm}
    if dtmax is not None:
        kwargs["dtmax"] = dtmax
    return (t1 - t0) / 100.0, diffrax.PIDController(rtol=rtol, atol=atol, **kwargs)


def _points(x, who):
    x = jnp.asarray(x)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"{who}: points must have shape (dim,) or (batch, dim), got "
                         f"{x.shape}.")
    return x


def ode_sample(velocity: Callable, x0: ArrayLike, *, solver="tsit5",
               num_steps: int | None = None, rtol: float = 1e-5, atol: float = 1e-5,
               t0: float = 0.0, t1: float = 1.0, save_times: ArrayLike | None = None,
               adjoint: diffrax.AbstractAdjoint | None = None) -> Array:
    """Integrate the probability-flow ODE `dx/dt = v(t, x)` from `t0` to `t1`.

    Args:
        velocity: `velocity(t, x)` for one point.
        x0: start points, `(dim,)` or `(batch, dim)`.
        solver: a diffrax solver or `"tsit5"`, `"heun"`, `"dopri5"`, `"euler"`.
        num_steps: fixed steps, or None for adaptive steps (PID, `rtol`, `atol`).
        rtol, atol: tolerances of adaptive steps.
        t0, t1: the time interval, within `[0, 1]` (`t1 < t0` integrates backwards).
        save_times: times at which to return the state (a trajectory), or None (the end).
        adjoint: diffrax's adjoint (default: its recursive checkpointing, which
            supports reverse-mode differentiation; `diffrax.DirectAdjoint()` supports
            forward mode too).

    Returns:
        The end points (shape of `x0`), or with `save_times` an array with the times on
        axis 0 (after the batch axis when `x0` is a batch: `(batch, times, dim)`).

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.flows import ode_sample
        >>> float(ode_sample(lambda t, x: jnp.ones_like(x), jnp.zeros(1))[0])
        1.0
    """
    who = "ode_sample"
    x0 = _points(x0, who)
    solver = as_solver(solver)
    num_steps = check_num_steps(num_steps, who)
    _check_times(t0, t1, who)
    dt0, controller = step_control(solver, num_steps, rtol, atol, t0, t1, who)
    saveat = diffrax.SaveAt(t1=True) if save_times is None else diffrax.SaveAt(
        ts=jnp.asarray(save_times))
    term = diffrax.ODETerm(lambda t, y, args: velocity(t, y))
    options = {} if adjoint is None else {"adjoint": adjoint}

    def one(x):
        solution = diffrax.diffeqsolve(term, solver, t0, t1, dt0, x, saveat=saveat,
                                       stepsize_controller=controller,
                                       max_steps=max(_MAX_STEPS, (num_steps or 0) + 1),
                                       **options)
        return solution.ys[-1] if save_times is None else solution.ys

    return one(x0) if x0.ndim == 1 else jax.vmap(one)(x0)


def sde_sample(key: jax.Array, drift: Callable, score: Callable, x0: ArrayLike,
               epsilon: float, *, num_steps: int = 200, t0: float = 0.0, t1: float = 1.0,
               brownian: str = "virtual", save_times: ArrayLike | None = None) -> Array:
    """Integrate `dX = (b(t, X) + ε s(t, X)) dt + sqrt(2ε) dW` by Euler–Maruyama.

    With the marginal drift `b` and score `s` of an interpolant, `X_t` has the
    interpolant's law at every `t` for every `ε >= 0` (Albergo et al. 2023, §2.3); `ε = 0`
    is the probability-flow ODE. The result carries the discretisation error of `num_steps`
    Euler–Maruyama steps (weak order 1).

    Args:
        key: a JAX PRNG key (one Brownian path per point).
        drift: `b(t, x)` for one point.
        score: `s(t, x)` for one point (e.g. `score_from_velocity(path, field)` closed
            over the parameters; it may be singular at `t = 1`: then stop at `t1 < 1`).
        x0: start points, `(dim,)` or `(batch, dim)`.
        epsilon: the diffusion coefficient `ε >= 0`.
        num_steps: Euler–Maruyama steps.
        t0, t1: the time interval, within `[0, 1]`.
        brownian: `"virtual"` (`diffrax.VirtualBrownianTree`, reproducible at any time)
            or `"unsafe"` (`diffrax.UnsafeBrownianPath`, faster, fixed steps only, no
            reverse-mode differentiation).
        save_times: times at which to return the state, or None (the end).

    Returns:
        The end points (shape of `x0`), or the states at `save_times` (as `ode_sample`).
    """
    who = "sde_sample"
    x0 = _points(x0, who)
    num_steps = check_num_steps(num_steps, who, allow_none=False)
    _check_times(t0, t1, who)
    if not isinstance(epsilon, jax.core.Tracer) and not float(epsilon) >= 0.0:
        raise ValueError(f"{who}: epsilon must be >= 0, got {epsilon!r}.")
    if brownian not in ("virtual", "unsafe"):
        raise ValueError(f"{who}: brownian must be 'virtual' or 'unsafe', got {brownian!r}.")
    dt0 = (t1 - t0) / num_steps
    saveat = diffrax.SaveAt(t1=True) if save_times is None else diffrax.SaveAt(
        ts=jnp.asarray(save_times))
    scale = jnp.sqrt(2.0 * jnp.asarray(epsilon, x0.dtype))

    def one(key, x):
        if brownian == "virtual":
            path = diffrax.VirtualBrownianTree(min(t0, t1), max(t0, t1),
                                               tol=abs(dt0) / 8, shape=x.shape, key=key)
        else:
            path = diffrax.UnsafeBrownianPath(shape=x.shape, key=key)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, args: drift(t, y) + epsilon * score(t, y)),
            diffrax.ControlTerm(
                lambda t, y, args: lineax.DiagonalLinearOperator(scale * jnp.ones_like(y)),
                path))
        options = {"adjoint": diffrax.ForwardMode()} if brownian == "unsafe" else {}
        solution = diffrax.diffeqsolve(terms, diffrax.Euler(), t0, t1, dt0, x,
                                       saveat=saveat, max_steps=num_steps + 1, **options)
        return solution.ys[-1] if save_times is None else solution.ys

    if x0.ndim == 1:
        return one(key, x0)
    return jax.vmap(one)(jax.random.split(key, x0.shape[0]), x0)
