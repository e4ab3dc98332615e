"""Variational objectives, each a short expectation program over generative functions.

Each builder returns a `px.Expectation` called as `objective(key, params, *args, **kw)`;
`params` is passed to both the model and the guide (NumPyro style: one parameter dict).
They are written in the same language as user programs and are meant as examples of
writing your own.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

from ..adev import Expectation, expectation
from ..gen import AbstractGenerativeFunction


def elbo(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction) -> Expectation:
    """Evidence lower bound `E_q[log p(x, z) - log q(z)]`.

    Gradient estimators come from the guide's sites (reparam for reparameterisable
    distributions, score function otherwise, or as chosen per site).

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist, ppl_ext as px
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        >>> objective = px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))
        >>> grad_params, grad_x = objective.grad(jax.random.key(0), {"loc": 0.0}, 1.0)
        >>> grad_params["loc"].shape
        ()

    Reference: Jordan et al. 1999; Kingma & Welling 2014; Ranganath et al. 2014.
    """

    @expectation
    def objective(params, *args, **kwargs):
        trace = guide.simulate(params, *args, **kwargs)
        return model.assess(trace.choices, params, *args, **kwargs) - trace.log_density

    return objective


def iwelbo(
    model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int
) -> Expectation:
    """Importance-weighted bound `E[log (1/K) Σ_k p(x, z_k) / q(z_k)]`, `z_k` iid from q.

    Tighter than the ELBO for `K > 1` and non-decreasing in `K` (Burda et al. 2016). The K
    draws are a `lax.scan`, so each particle's sites use local estimators.

    Reference: Burda, Grosse & Salakhutdinov 2016, "Importance weighted autoencoders".
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}.")

    @expectation
    def objective(params, *args, **kwargs):
        def particle(carry, _):
            trace = guide.simulate(params, *args, **kwargs)
            log_weight = model.assess(trace.choices, params, *args, **kwargs) - trace.log_density
            return carry, log_weight

        _, log_weights = lax.scan(particle, None, length=num_particles)
        return logsumexp(log_weights) - math.log(num_particles)

    return objective


__all__ = ["elbo", "iwelbo"]
