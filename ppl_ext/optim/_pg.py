"""Normalised policy-gradient back-ends: N-PG-IGT and N-HARPG.

Fatkhullin, Barakat, Kireeva and He, "Stochastic policy gradient methods: improved sample
complexity for Fisher-non-degenerate policies" (ICML 2023), Algorithms 1 and 2, written
for MINIMISING an expectation `F(θ) = E[f]` (as every back-end does; `px.fit` negates a
return to maximise). With a step count `t = 0, 1, ...`, a momentum weight `η_t ∈ (0, 1]`,
a step size `γ_t > 0` and unbiased gradient estimates `ĝ` of the objective (one sampled
trajectory each, for a policy-gradient objective):

**N-PG-IGT** (normalised momentum with implicit gradient transport)

    θ̃_t = θ_t + (1 - η_t) / η_t · (θ_t - θ_{t-1}),
    d_t  = (1 - η_t) d_{t-1} + η_t ĝ(θ̃_t),
    θ_{t+1} = θ_t - γ_t d_t / ‖d_t‖;

the gradient is taken at the extrapolated point `θ̃_t`, which transports the momentum's
stale gradients to `θ_t` to second order, without a Hessian. One trajectory per step.

**N-HARPG** (normalised Hessian-aided recursive policy gradient)

    q_t ~ U(0, 1),  θ̂_t = q_t θ_t + (1 - q_t) θ_{t-1},
    v_t = Ĥ(θ̂_t) (θ_t - θ_{t-1}),
    d_t = (1 - η_t)(d_{t-1} + v_t) + η_t ĝ(θ_t),
    θ_{t+1} = θ_t - γ_t d_t / ‖d_t‖;

`v_t` is an unbiased estimate of
`∫₀¹ ∇²F(θ_{t-1} + q(θ_t - θ_{t-1})) dq (θ_t - θ_{t-1}) = ∇F(θ_t) - ∇F(θ_{t-1})`, from the
objective's unbiased Hessian-vector product `objective.hvp` (ppl_ext/adev/_hvp.py) at
the random point `θ̂_t`, so `d_t` is a STORM-like recursive estimate of `∇F(θ_t)`. Two
trajectories per step (one at `θ_t`, one at `θ̂_t`).

Both start with `θ_{-1} = θ_0`, `d_{-1} = 0`; with the default `η_0 = 1` the first
direction is the first gradient estimate. Default momentum weights are of the form of the
paper's theorems for Fisher-non-degenerate policies: `η_t = (2 / (t + 2))^{4/5}` for
N-PG-IGT and `η_t = 2 / (t + 2)` for N-HARPG; the step size (a float: constant, or an
optax schedule of `t`) is the user's choice, e.g. `γ_t = γ_0 · 2 / (t + 2)` as
`decaying_step_size(γ_0)`. The paper's constants (Lipschitz and Fisher-degeneracy
constants) are unknown in practice, so `γ_0` is tuned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._backend import AbstractBackend, BackendInfo
from ._cbo import _check_positive


class PolicyGradientState(NamedTuple):
    """State of `NormalisedPGIGT` and `NormalisedHARPG`.

    Attributes:
        params: the current parameters `θ_t`.
        previous: the parameters `θ_{t-1}` of the step before (`θ_0` at the start).
        direction: the momentum direction `d_{t-1}`, flat (a vector of the parameters'
            total size; zeros at the start).
        count: int32, the steps taken `t`.

    Example:
        >>> import jax.numpy as jnp
        >>> state = PolicyGradientState(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
        ...                             jnp.array(0))
        >>> int(state.count)
        0
    """

    params: Any
    previous: Any
    direction: jax.Array
    count: jax.Array


def decaying_step_size(initial: float, offset: float = 2.0) -> Callable:
    """The schedule `γ_t = initial · offset / (t + offset)` (a `1/t` decay, `γ_0 = initial`).

    Args:
        initial: `γ_0 > 0`.
        offset: `> 0`; larger keeps the step near `γ_0` for longer.

    Returns a function `count -> γ_t` (an optax-style schedule).

    Example:
        >>> schedule = decaying_step_size(0.5)
        >>> float(schedule(0)), float(schedule(2))
        (0.5, 0.25)
    """
    _check_positive("decaying_step_size", "initial", initial)
    _check_positive("decaying_step_size", "offset", offset)

    def schedule(count):
        return initial * offset / (jnp.asarray(count, jnp.float32) + offset)

    return schedule


def _rate(owner: str, name: str, value, count, dtype):
    out = value(count) if callable(value) else value
    return jnp.asarray(out, dtype)


def _check_step_size(owner: str, step_size) -> None:
    if not callable(step_size):
        _check_positive(owner, "step_size", step_size)


def _check_momentum(owner: str, momentum) -> None:
    if momentum is None or callable(momentum):
        return
    _check_positive(owner, "momentum", momentum)
    if float(momentum) > 1.0:
        raise ValueError(f"{owner}.momentum must be in (0, 1], got {momentum!r}.")


def _normalised_move(flat, direction, rate):
    norm = jnp.linalg.norm(direction)
    safe = jnp.where(norm > 0, norm, 1.0)
    return jnp.where(norm > 0, flat - rate * direction / safe, flat)


def _flat_value_and_grad(objective, key, unravel, dtype, args, kwargs):
    def value_and_grad(x):
        value, grads = jax.value_and_grad(
            lambda p: objective(key, p, *args, **kwargs))(unravel(x))
        return value, ravel_pytree(grads)[0].astype(dtype)

    return value_and_grad


class _NormalisedPG(AbstractBackend):
    """Shared `init`/`params` and argument checks of the two normalised methods."""

    step_size: Any = 0.05
    momentum: Any = None

    def __check_init__(self):
        name = type(self).__name__
        _check_step_size(name, self.step_size)
        _check_momentum(name, self.momentum)

    def init(self, key, params, objective, *args, **kwargs) -> PolicyGradientState:
        """`PolicyGradientState(params, params, zeros, 0)`."""
        flat, _ = ravel_pytree(params)
        name = type(self).__name__
        if flat.size == 0:
            raise ValueError(f"{name}: params has no array leaves.")
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            raise TypeError(f"{name}: params must be floating-point arrays, got {flat.dtype}.")
        if not callable(objective):
            raise TypeError(
                f"{name}: the objective must be a px.Expectation, got "
                f"{type(objective).__name__}.")
        return PolicyGradientState(params, params, jnp.zeros_like(flat),
                                   jnp.zeros((), jnp.int32))

    def params(self, state: PolicyGradientState) -> Any:
        """`state.params`."""
        return state.params

    def _eta(self, count, dtype):
        if self.momentum is None:
            return self._default_eta(jnp.asarray(count, dtype))
        return _rate(type(self).__name__, "momentum", self.momentum, count, dtype)


class NormalisedPGIGT(_NormalisedPG):
    """N-PG-IGT: normalised momentum with implicit gradient transport (one trajectory a step).

    Each step draws one unbiased gradient estimate at the extrapolated point
    `θ̃_t = θ_t + (1 - η_t)/η_t (θ_t - θ_{t-1})`, mixes it into the momentum
    `d_t = (1 - η_t) d_{t-1} + η_t ĝ(θ̃_t)` and moves `θ_{t+1} = θ_t - γ_t d_t / ‖d_t‖`
    (Fatkhullin et al., ICML 2023, Algorithm 1; see `ppl_ext/optim/_pg.py`).

    Args:
        step_size: `γ_t`: a float (constant) or a schedule `count -> float`, e.g.
            `decaying_step_size(γ_0)` (`γ_0 · 2 / (t + 2)`).
        momentum: `η_t`: None for the paper's `(2 / (t + 2))^{4/5}`, a float in (0, 1] or a
            schedule.

    `info.value` is the objective estimate at the extrapolated point `θ̃_t` (the one
    trajectory the step samples), not at `θ_t`. Returns `PolicyGradientState` from `init`
    and `(PolicyGradientState, BackendInfo)` from `step`.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, ppl_ext as px
        >>> @px.expectation
        ... def loss(theta):  # E = (theta - 2)^2 + 1
        ...     return (px.sample(dist.Normal(theta, 1.0)) - 2.0) ** 2
        >>> backend = NormalisedPGIGT(step_size=decaying_step_size(0.5))
        >>> result = px.fit(loss, jnp.array(0.0), backend, 300, jax.random.key(0),
        ...                 maximize=False, progress=False)
        >>> bool(abs(result.params - 2.0) < 0.2)
        True
    """

    trajectories_per_step: ClassVar[int] = 1

    @staticmethod
    def _default_eta(count):
        return (2.0 / (count + 2.0)) ** 0.8

    def step(self, key, state: PolicyGradientState, objective, *args, **kwargs):
        """One N-PG-IGT step: gradient at the extrapolated point, momentum, normalised move."""
        flat, unravel = ravel_pytree(state.params)
        previous, _ = ravel_pytree(state.previous)
        dtype = flat.dtype
        eta = self._eta(state.count, dtype)
        extrapolated = flat + (1 - eta) / eta * (flat - previous)
        value, g = _flat_value_and_grad(objective, key, unravel, dtype, args, kwargs)(
            extrapolated)
        direction = (1 - eta) * state.direction + eta * g
        rate = _rate(type(self).__name__, "step_size", self.step_size, state.count, dtype)
        new = _normalised_move(flat, direction, rate)
        new_state = PolicyGradientState(unravel(new), state.params, direction.astype(dtype),
                                        state.count + 1)
        return new_state, BackendInfo(value, jnp.linalg.norm(g))


class NormalisedHARPG(_NormalisedPG):
    """N-HARPG: normalised Hessian-aided recursive policy gradient (two trajectories a step).

    Each step draws an unbiased gradient estimate `ĝ(θ_t)` and an unbiased Hessian-vector
    product `v_t = Ĥ(θ̂_t)(θ_t - θ_{t-1})` at a uniform random point `θ̂_t` of the segment
    `[θ_{t-1}, θ_t]` (the objective's `hvp`, independent keys), updates the recursive
    estimate `d_t = (1 - η_t)(d_{t-1} + v_t) + η_t ĝ(θ_t)` and moves
    `θ_{t+1} = θ_t - γ_t d_t / ‖d_t‖` (Fatkhullin et al., ICML 2023, Algorithm 2; see
    `ppl_ext/optim/_pg.py`).

    The objective must offer `hvp(key, params, *args, v=..., **kwargs)`, as every
    `px.Expectation` does; its programs must use `px.reinforce`/`px.reparam` sites with
    a twice-differentiable pathwise part, otherwise `.hvp` raises `px.SecondOrderError`
    naming what it refuses.

    Args:
        step_size: `γ_t`: a float (constant) or a schedule `count -> float`, e.g.
            `decaying_step_size(γ_0)`.
        momentum: `η_t`: None for `2 / (t + 2)`, a float in (0, 1] or a schedule.

    Returns `PolicyGradientState` from `init` and `(PolicyGradientState, BackendInfo)`
    from `step`; `info.value` is the estimate at `θ_t`.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, ppl_ext as px
        >>> @px.expectation
        ... def loss(theta):  # E = (theta - 2)^2 + 1
        ...     return (px.sample(dist.Normal(theta, 1.0)) - 2.0) ** 2
        >>> backend = NormalisedHARPG(step_size=decaying_step_size(0.5))
        >>> result = px.fit(loss, jnp.array(0.0), backend, 100, jax.random.key(0),
        ...                 maximize=False, progress=False)
        >>> bool(abs(result.params - 2.0) < 0.2)
        True
    """

    trajectories_per_step: ClassVar[int] = 2

    @staticmethod
    def _default_eta(count):
        return 2.0 / (count + 2.0)

    def init(self, key, params, objective, *args, **kwargs) -> PolicyGradientState:
        """`PolicyGradientState(params, params, zeros, 0)`; checks the objective has `hvp`."""
        state = super().init(key, params, objective, *args, **kwargs)
        if not callable(getattr(objective, "hvp", None)):
            raise TypeError(
                "NormalisedHARPG needs an objective with an unbiased Hessian-vector product "
                "method hvp(key, params, *args, v=...) (a px.Expectation), got "
                f"{type(objective).__name__}.")
        return state

    def step(self, key, state: PolicyGradientState, objective, *args, **kwargs):
        """One N-HARPG step: gradient, Hessian-aided correction, normalised move."""
        key_grad, key_hvp, key_point = jax.random.split(key, 3)
        flat, unravel = ravel_pytree(state.params)
        previous, _ = ravel_pytree(state.previous)
        dtype = flat.dtype
        value, g = _flat_value_and_grad(objective, key_grad, unravel, dtype, args, kwargs)(
            flat)
        q = jax.random.uniform(key_point, (), dtype)
        point = q * flat + (1 - q) * previous
        delta = flat - previous
        v = objective.hvp(key_hvp, unravel(point), *args, v=unravel(delta), **kwargs)
        v = ravel_pytree(v)[0].astype(dtype)
        eta = self._eta(state.count, dtype)
        direction = (1 - eta) * (state.direction + v) + eta * g
        rate = _rate(type(self).__name__, "step_size", self.step_size, state.count, dtype)
        new = _normalised_move(flat, direction, rate)
        new_state = PolicyGradientState(unravel(new), state.params, direction.astype(dtype),
                                        state.count + 1)
        return new_state, BackendInfo(value, jnp.linalg.norm(g))
