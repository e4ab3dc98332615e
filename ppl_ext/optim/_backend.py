"""Optimisation back-ends: the kernel protocol specialised to minimising an expectation.

A back-end receives the objective itself (a `px.Expectation`), not just its gradient, so
that methods needing more than one gradient at the current point (values only, other
evaluation points, several keys) fit the same protocol. `px.fit` always hands a back-end
an objective to MINIMISE: when the user maximises (the default, for ELBOs) it passes the
negated program.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import optax

from .._kernel import AbstractKernel, Info, State


class BackendInfo(NamedTuple):
    """Per-step diagnostics every back-end reports (its `Info` may be this or extend it).

    Attributes:
        value: the estimate of the objective the back-end minimises, at the parameters
            the step started from (a scalar array).
        grad_norm: the global L2 norm of the gradient estimate used by the step (a scalar
            array; NaN for back-ends that use no gradient).

    Example:
        >>> import jax.numpy as jnp
        >>> info = BackendInfo(value=jnp.array(1.0), grad_norm=jnp.array(jnp.nan))
        >>> float(info.value)
        1.0
    """

    value: jax.Array
    grad_norm: jax.Array


class AbstractBackend(AbstractKernel):
    """A method that minimises an expectation `objective(key, params, *args)` step by step.

    The kernel protocol with the objective as an argument:

    - `init(key, params, objective, *args, **kwargs) -> State`; `key` seeds a random
      initial state (a particle cloud around `params`); back-ends that need none ignore it;
    - `step(key, state, objective, *args, **kwargs) -> (State, Info)`, where `Info` has
      the attributes `value` and `grad_norm` of `BackendInfo` (scalar arrays), which
      `px.fit` records;
    - `params(state) -> params`: the current parameters (same tree as the initial ones).

    `objective` is a `px.Expectation` to minimise; `objective(key, params, *args)` is an
    unbiased estimate of it, `jax.value_and_grad` of that gives an unbiased gradient
    estimate, and a back-end may evaluate it at any point and with any keys it derives
    from `key`. `*args, **kwargs` are the objective's extra arguments (data), passed on
    unchanged. `step` runs inside `jit` and `lax` loops: it must be pure and return a
    state of the same structure, shapes and dtypes.

    The parameters live in the state, and `params(state)` reads them, rather than a fixed
    field name, so that a state may hold them in any form (a particle cloud whose current
    estimate is its consensus point, a flattened vector).

    A copyable skeleton, a value-only random search (keep the proposal when its estimate
    is lower):

        >>> from typing import NamedTuple
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist
        >>> import ppl_ext as px
        >>> from ppl_ext.optim import AbstractBackend, BackendInfo, fit
        >>> class SearchState(NamedTuple):
        ...     params: jax.Array
        >>> class RandomSearch(AbstractBackend):
        ...     step_size: float
        ...
        ...     def init(self, key, params, objective, *args, **kwargs):
        ...         return SearchState(params)
        ...
        ...     def step(self, key, state, objective, *args, **kwargs):
        ...         key_move, key_value = jax.random.split(key)
        ...         noise = jax.random.normal(key_move, jnp.shape(state.params))
        ...         proposal = state.params + self.step_size * noise
        ...         # both points with the same key: common random numbers
        ...         current = objective(key_value, state.params, *args, **kwargs)
        ...         candidate = objective(key_value, proposal, *args, **kwargs)
        ...         params = jnp.where(candidate < current, proposal, state.params)
        ...         return SearchState(params), BackendInfo(current, jnp.array(jnp.nan))
        ...
        ...     def params(self, state):
        ...         return state.params
        >>> @px.expectation
        ... def objective(theta):
        ...     x = px.sample(dist.Normal(theta, 1.0))
        ...     return -((x - 3.0) ** 2)
        >>> result = fit(objective, jnp.array(0.0), RandomSearch(0.3), 300,
        ...              jax.random.key(0), progress=False)
        >>> bool(abs(result.params - 3.0) < 0.5)
        True

    Instantiating a class that leaves a method abstract raises `TypeError`.
    """

    @abc.abstractmethod
    def init(self, key: Any, params: Any, objective: Any, *args: Any, **kwargs: Any) -> State:
        """The initial state for minimising `objective` from `params`; `key` seeds it."""

    @abc.abstractmethod
    def step(
        self, key: Any, state: State, objective: Any, *args: Any, **kwargs: Any
    ) -> tuple[State, Info]:
        """One step on `objective`; returns `(new_state, info)`, `info` as `BackendInfo`."""

    @abc.abstractmethod
    def params(self, state: State) -> Any:
        """The current parameters held by `state` (same tree as the initial ones)."""


class OptaxState(NamedTuple):
    """State of `OptaxBackend`: the parameters and the optax transformation's state.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"theta": jnp.array(0.0)}
        >>> state = OptaxState(params, optax.sgd(0.1).init(params))
        >>> float(state.params["theta"])
        0.0
    """

    params: Any
    opt_state: optax.OptState


class OptaxBackend(AbstractBackend):
    """Any optax `GradientTransformation` fed by the transformation's gradient estimates.

    Each step draws one unbiased estimate `(v, g)` of the objective and its gradient at
    the current parameters θ, as `jax.value_and_grad(lambda p: objective(key, p, *args))`
    (ppl_ext makes that gradient unbiased), and applies `u, s = update(g, s, θ)`,
    `θ ← θ + u`. The objective is minimised (optax's convention; `px.fit` negates a
    maximised objective before handing it over). A `GradientTransformationExtraArgs`
    (e.g. `optax.lbfgs`, `optax.contrib.reduce_on_plateau`) also receives `value=v`,
    `grad=g` and `value_fn=lambda p: objective(key, p, *args)` (the same key: common
    random numbers for line searches).

    Args:
        transformation: an `optax.GradientTransformation`, e.g. `optax.adam(1e-3)`.

    Returns `OptaxState(params, opt_state)` from `init` and `(OptaxState, BackendInfo)`
    from `step`, with the gradient estimate's global L2 norm as `grad_norm`.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, optax
        >>> import ppl_ext as px
        >>> @px.expectation
        ... def loss(theta):
        ...     x = px.sample(dist.Normal(theta, 1.0))
        ...     return (x - 3.0) ** 2
        >>> backend = OptaxBackend(optax.sgd(0.1))
        >>> state = backend.init(jax.random.key(1), jnp.array(0.0), loss)
        >>> state, info = backend.step(jax.random.key(0), state, loss)
        >>> bool(state.params > 0.0), info.value.shape
        (True, ())
    """

    transformation: optax.GradientTransformation

    def __check_init__(self):
        if not isinstance(self.transformation, optax.GradientTransformation):
            raise TypeError(
                "OptaxBackend wraps an optax.GradientTransformation (e.g. optax.adam(1e-3)), "
                f"got {type(self.transformation).__name__}."
            )

    def init(self, key, params, objective, *args, **kwargs) -> OptaxState:
        """`OptaxState(params, transformation.init(params))`."""
        return OptaxState(params, self.transformation.init(params))

    def step(self, key, state: OptaxState, objective, *args, **kwargs):
        """One optax update from an unbiased `(value, gradient)` estimate at `state.params`."""

        def value_fn(params):
            return objective(key, params, *args, **kwargs)

        value, grads = jax.value_and_grad(value_fn)(state.params)
        if isinstance(self.transformation, optax.GradientTransformationExtraArgs):
            updates, opt_state = self.transformation.update(
                grads, state.opt_state, state.params, value=value, grad=grads,
                value_fn=value_fn)
        else:
            updates, opt_state = self.transformation.update(grads, state.opt_state,
                                                            state.params)
        params = optax.apply_updates(state.params, updates)
        return OptaxState(params, opt_state), BackendInfo(value, optax.tree.norm(grads))

    def params(self, state: OptaxState) -> Any:
        """`state.params`."""
        return state.params
