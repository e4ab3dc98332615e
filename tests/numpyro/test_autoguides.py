"""Every NumPyro autoguide with `px.numpyro.ELBO` in place of `Trace_ELBO`: the same loss
in distribution (means of 4000 draws within K_SE = 4 combined standard errors), and SVI
runs. Backs the autoguide row of docs/numpyro_parity.md."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer import autoguide as ag

import ppl_ext as px
from tests.helpers import assert_same_mean, many

DATA = jnp.array([0.3, -0.5, 1.2])


def model(x):
    z = numpyro.sample("z", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z.sum(), scale), obs=x)


GUIDES = {
    "AutoNormal": lambda: ag.AutoNormal(model),
    "AutoDiagonalNormal": lambda: ag.AutoDiagonalNormal(model),
    "AutoMultivariateNormal": lambda: ag.AutoMultivariateNormal(model),
    "AutoLowRankMultivariateNormal": lambda: ag.AutoLowRankMultivariateNormal(model, rank=1),
    "AutoLaplaceApproximation": lambda: ag.AutoLaplaceApproximation(model),
    "AutoDelta": lambda: ag.AutoDelta(model),
    "AutoIAFNormal": lambda: ag.AutoIAFNormal(model, num_flows=1, hidden_dims=[4]),
    "AutoBNAFNormal": lambda: ag.AutoBNAFNormal(model, num_flows=1, hidden_factors=[2]),
    "AutoDAIS": lambda: ag.AutoDAIS(model, K=2),
}


@pytest.mark.parametrize("name", list(GUIDES))
def test_autoguide_loss_matches_trace_elbo(name):
    guide = GUIDES[name]()
    loss = px.numpyro.ELBO()
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), loss)
    state = svi.init(jax.random.key(0), DATA)
    params = svi.get_params(state)
    ours = many(lambda k: loss.loss(k, params, model, guide, DATA), num=4000)
    theirs = many(lambda k: Trace_ELBO().loss(k, params, model, guide, DATA), num=4000)
    if name in ("AutoDelta", "AutoLaplaceApproximation"):  # no randomness in the guide
        assert np.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    else:
        assert_same_mean(ours, theirs, what=f"{name} loss")
    result = svi.run(jax.random.key(1), 20, DATA, progress_bar=False)
    assert np.all(np.isfinite(result.losses))
