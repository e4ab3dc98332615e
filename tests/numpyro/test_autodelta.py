"""AutoDelta guides (`dist.Delta(param)` sites) with `px.numpyro.ELBO` in numpyro's SVI.

A point mass draws nothing: its value is its parameter, passed through pathwise whatever
the estimator. So the loss is NumPyro's Trace_ELBO loss exactly (the same value for the
same parameters, key for key, with any number of particles), and SVI finds the MAP, here
in closed form. Branches on the point mass's value (`lax.cond`, `jnp.where`) switch at a
value that no draw moves: no jump is possible, nothing is refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax import lax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta

import ppl_ext as px

DATA = jnp.array([0.5, 1.5, 1.0, 2.0, 0.3, -0.4])
PRIOR_SCALE = 2.0


def model(data):
    """mu ~ N(0, 2), s ~ HalfNormal(1), data ~ N(mu, s)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SCALE))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, s), obs=data)


def model_with_branches(data):
    """The same joint density, written with a cond and a where on the latents."""
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SCALE))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    # both branches compute the same value: the density is unchanged, but the program
    # branches on the point masses' values
    loc = lax.cond(mu > 0, lambda m: m, lambda m: 1.0 * m, mu)
    scale = jnp.where(s > 1.0, s, s * 1.0)
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("obs", dist.Normal(loc, scale), obs=data)


def exact_map(data):
    """argmax of log p(mu, s, data) in (mu, s) (AutoDelta: no Jacobian, no entropy).

    For fixed s, mu = sum(data) / (n + s^2 / 2^2); for that mu, s solves
    s^4 + n s^2 - sum((data - mu)^2) = 0 (from -s - n/s + SS/s^3 = 0). Iterated to the
    fixed point in float64 numpy.
    """
    data = np.asarray(data, np.float64)
    n, mu, s = data.size, 0.0, 1.0
    for _ in range(500):
        mu = data.sum() / (n + s**2 / PRIOR_SCALE**2)
        ss = np.sum((data - mu) ** 2)
        s = np.sqrt((-n + np.sqrt(n**2 + 4.0 * ss)) / 2.0)
    return mu, s


@pytest.mark.parametrize("fn", [model, model_with_branches])
@pytest.mark.parametrize("num_particles", [1, 2])
def test_loss_equals_trace_elbo(fn, num_particles):
    guide = AutoDelta(fn)
    svi = SVI(fn, guide, numpyro.optim.Adam(0.05),
              loss=px.numpyro.ELBO(num_particles=num_particles))
    state = svi.init(jax.random.key(0), DATA)
    params = svi.get_params(state)
    for seed in range(3):
        key = jax.random.key(seed)
        ours = px.numpyro.ELBO(num_particles=num_particles).loss(key, params, fn, guide, DATA)
        theirs = Trace_ELBO(num_particles=num_particles).loss(key, params, fn, guide, DATA)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    # and its gradient, which SVI uses
    g_ours = jax.grad(lambda p: px.numpyro.ELBO(num_particles=num_particles).loss(
        jax.random.key(0), p, fn, guide, DATA))(params)
    g_theirs = jax.grad(lambda p: Trace_ELBO(num_particles=num_particles).loss(
        jax.random.key(0), p, fn, guide, DATA))(params)
    for name in params:
        np.testing.assert_allclose(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", [model, model_with_branches])
@pytest.mark.parametrize("num_particles", [1, 2])
def test_svi_finds_the_map(fn, num_particles):
    guide = AutoDelta(fn)
    svi = SVI(fn, guide, numpyro.optim.Adam(0.02),
              loss=px.numpyro.ELBO(num_particles=num_particles))
    result = svi.run(jax.random.key(1), 3000, DATA, progress_bar=False)
    median = guide.median(result.params)
    mu, s = exact_map(DATA)
    np.testing.assert_allclose(median["mu"], mu, atol=2e-3)
    np.testing.assert_allclose(median["s"], s, atol=2e-3)
    # the final loss is -log p(data, MAP)
    log_joint = (dist.Normal(0.0, PRIOR_SCALE).log_prob(mu) + dist.HalfNormal(1.0).log_prob(s)
                 + jnp.sum(dist.Normal(mu, s).log_prob(DATA)))
    np.testing.assert_allclose(result.losses[-1], -log_joint, rtol=1e-4)


def test_same_trajectory_as_trace_elbo():
    guide = AutoDelta(model_with_branches)
    ours = SVI(model_with_branches, guide, numpyro.optim.Adam(0.05),
               loss=px.numpyro.ELBO()).run(jax.random.key(2), 200, DATA, progress_bar=False)
    theirs = SVI(model_with_branches, guide, numpyro.optim.Adam(0.05),
                 loss=Trace_ELBO()).run(jax.random.key(2), 200, DATA, progress_bar=False)
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=1e-4)
    for name in ours.params:
        np.testing.assert_allclose(ours.params[name], theirs.params[name], rtol=1e-4,
                                   atol=1e-5)
