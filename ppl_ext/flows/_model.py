"""A flow as a generative function and as a NumPyro distribution."""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from ..adev import reparam, sample
from ..gen import AbstractGenerativeFunction, Trace
from ._density import log_density, standard_normal_log_density
from ._samplers import as_solver, check_num_steps, ode_sample


def _check_dim(dim, who):
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{who}: dim must be an int >= 1, got {dim!r}.")


def _check_point(x, dim, who):
    if jnp.shape(x) != (dim,):
        raise ValueError(f"{who}: a point must have shape ({dim},), got {jnp.shape(x)}.")


class FlowModel(AbstractGenerativeFunction):
    """A trained velocity field as a generative function over one choice `"x"`.

    `simulate(params)` draws `x0 ~ N(0, I)` (a reparameterised `px.sample` site), solves
    the probability-flow ODE `dx/dt = field(params, t, x)` from 0 to 1 with
    `num_steps` fixed steps, and returns `x = x(1)` with

        log q(x) = log N(x0; 0, I) - ∫_0^1 div v(t, x(t)) dt

    (exact divergence, integrated along the same solve). `assess({"x": x}, params)`
    computes the same quantity by solving backwards from `x`. Both are the flow's exact
    density up to the solver's error (fixed steps keep the sampled `x` a smooth function
    of `x0` and the parameters, so pathwise gradients apply; gradients go through
    `diffrax.DirectAdjoint`, which supports the forward-mode differentiation of
    `px.expectation`). Exact divergence costs `dim` Jacobian-vector products: low
    dimension. The density is not conditioned on anything, so there is no `generate`.

    Args:
        field: the velocity `field(params, t, x)` (e.g. `MLPField`).
        dim: the dimension of `x`.
        solver: a diffrax solver or its name (`"tsit5"`, `"heun"`, `"dopri5"`, `"euler"`).
        num_steps: fixed solver steps.

    Example:
        >>> import jax, jax.numpy as jnp, ppl_ext as px
        >>> from ppl_ext.flows import FlowModel
        >>> flow = FlowModel(lambda params, t, x: params["shift"] + 0.0 * x, dim=1)
        >>> @px.expectation
        ... def mean(params):
        ...     return jnp.sum(flow.simulate(params).choices["x"])
        >>> round(float(mean.grad(jax.random.key(0), {"shift": jnp.asarray(2.0)})["shift"]), 4)
        1.0
    """

    field: Callable
    dim: int = eqx.field(static=True)
    solver: str | diffrax.AbstractSolver = eqx.field(default="tsit5", static=True)
    num_steps: int = eqx.field(default=32, static=True)

    def __check_init__(self):
        _check_dim(self.dim, "FlowModel")
        if not callable(self.field):
            raise TypeError("FlowModel: field must be a callable field(params, t, x), got "
                            f"{type(self.field).__name__}.")
        as_solver(self.solver)
        check_num_steps(self.num_steps, "FlowModel", allow_none=False)

    def _velocity(self, params):
        return lambda t, x: self.field(params, t, x)

    def simulate(self, params, *args, **kwargs) -> Trace:
        """Draw `x` through the flow; its log density by the exact divergence."""
        x0 = sample(dist.Normal(0.0, 1.0).expand((self.dim,)).to_event(1), reparam, name="x0")
        velocity = self._velocity(params)

        def augmented(t, state, args):
            y, _ = state
            return velocity(t, y), jnp.trace(jax.jacfwd(lambda u: velocity(t, u))(y))

        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(augmented), as_solver(self.solver), 0.0, 1.0,
            1.0 / self.num_steps, (x0, jnp.zeros((), x0.dtype)),
            max_steps=self.num_steps + 1, adjoint=diffrax.DirectAdjoint())
        x, integral = solution.ys[0][-1], solution.ys[1][-1]
        return Trace({"x": x}, standard_normal_log_density(x0) - integral, x)

    def assess(self, choices, params, *args, **kwargs):
        """`log q(choices["x"])` by the backward probability-flow ODE (exact divergence)."""
        if "x" not in choices:
            raise ValueError(f"FlowModel.assess: choices must hold 'x', got "
                             f"{sorted(choices)}.")
        _check_point(choices["x"], self.dim, "FlowModel.assess")
        return log_density(self._velocity(params), choices["x"], solver=self.solver,
                           num_steps=self.num_steps, adjoint=diffrax.DirectAdjoint())

    def distribution(self, params) -> FlowDistribution:
        """This flow with `params` as a NumPyro distribution (`FlowDistribution`)."""
        return FlowDistribution(self.field, params, self.dim, solver=self.solver,
                                num_steps=self.num_steps)


class FlowDistribution(dist.Distribution):
    """The law of a flow `dx/dt = field(params, t, x)` from `N(0, I)`, as a NumPyro
    distribution over `R^dim`.

    `sample` pushes standard normal draws through the probability-flow ODE;
    `log_prob` is the exact-divergence log density (`log_density`), differentiable in the
    value and in `params`, so the flow can serve as a learned prior in a NumPyro model
    (NUTS included; low dimension). Both carry the solver's error.

    Args:
        field: the velocity `field(params, t, x)`.
        params: its (trained) parameters.
        dim: the dimension.
        solver: a diffrax solver or its name.
        num_steps: fixed solver steps.
        validate_args: NumPyro's argument validation flag.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.flows import FlowDistribution
        >>> shift = FlowDistribution(lambda p, t, x: p + 0.0 * x, jnp.ones(1), dim=1)
        >>> round(float(shift.log_prob(jnp.ones(1))), 4)  # N(1, 1) at its mean
        -0.9189
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    reparametrized_params: list = []

    def __init__(self, field: Callable, params, dim: int, *, solver="tsit5",
                 num_steps: int = 32, validate_args=None):
        _check_dim(dim, "FlowDistribution")
        as_solver(solver)
        check_num_steps(num_steps, "FlowDistribution", allow_none=False)
        self.field, self.params, self.dim = field, params, dim
        self.solver, self.num_steps = solver, num_steps
        super().__init__(batch_shape=(), event_shape=(dim,), validate_args=validate_args)

    def _velocity(self):
        return lambda t, x: self.field(self.params, t, x)

    def sample(self, key, sample_shape=()):
        """Draws of shape `sample_shape + (dim,)`."""
        x0 = jax.random.normal(key, (*sample_shape, self.dim))
        flat = ode_sample(self._velocity(), x0.reshape(-1, self.dim), solver=self.solver,
                          num_steps=self.num_steps)
        return flat.reshape(x0.shape)

    def log_prob(self, value):
        """Exact-divergence log density; `value` of shape `(..., dim)`."""
        value = jnp.asarray(value)
        if value.ndim < 1 or value.shape[-1] != self.dim:
            raise ValueError(f"FlowDistribution.log_prob: value must end in ({self.dim},), "
                             f"got {value.shape}.")
        flat = log_density(self._velocity(), value.reshape(-1, self.dim),
                           solver=self.solver, num_steps=self.num_steps)
        return flat.reshape(value.shape[:-1])

    def tree_flatten(self):
        return (self.params,), (self.field, self.dim, self.solver, self.num_steps)

    @classmethod
    def tree_unflatten(cls, aux_data, params):
        field, dim, solver, num_steps = aux_data
        return cls(field, params[0], dim, solver=solver, num_steps=num_steps)
