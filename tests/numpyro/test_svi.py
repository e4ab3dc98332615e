"""ppl_ext losses inside numpyro.infer.SVI: parity with Trace_ELBO, autoguides, discrete latents."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Predictive, Trace_ELBO, TraceGraph_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal
import pytest

import ppl_ext as px
from tests.helpers import (
    assert_same_mean, assert_unbiased, coin_guide, coin_model, exact_coin_iwelbo, many,
    assert_within_se, mean_and_se,
)

DATA = jnp.array([0.5, 1.5, 1.0, 2.0, 0.3])


def model(data):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 0.5))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, sigma), obs=data)


def guide(data):
    loc = numpyro.param("loc", 0.3)
    scale = numpyro.param("scale", 0.5, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))
    numpyro.sample("sigma", dist.LogNormal(numpyro.param("s_loc", 0.1), 0.3))


def test_loss_matches_trace_elbo_in_distribution():
    params = {"loc": jnp.asarray(0.3), "scale": jnp.asarray(0.5), "s_loc": jnp.asarray(0.1)}
    keys = jax.random.split(jax.random.key(0), 10_000)
    ours = jax.jit(jax.vmap(lambda k: px.numpyro.ELBO().loss(k, params, model, guide, DATA)))(keys)
    theirs = jax.jit(jax.vmap(lambda k: Trace_ELBO().loss(k, params, model, guide, DATA)))(keys)
    (m1, s1), (m2, s2) = mean_and_se(ours), mean_and_se(theirs)
    assert_within_se(m1 - m2, np.hypot(s1, s2), what="loss")
    assert abs(np.std(ours) / np.std(theirs) - 1) < 0.1
    g_ours = jax.jit(jax.vmap(lambda k: jax.grad(
        lambda p: px.numpyro.ELBO().loss(k, p, model, guide, DATA))(params)))(keys[:4000])
    g_theirs = jax.jit(jax.vmap(lambda k: jax.grad(
        lambda p: Trace_ELBO().loss(k, p, model, guide, DATA))(params)))(keys[:4000])
    for name in params:
        (a, sa), (b, sb) = mean_and_se(g_ours[name]), mean_and_se(g_theirs[name])
        assert_within_se(a - b, np.hypot(sa, sb), what=name)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDiagonalNormal,
                                       AutoMultivariateNormal, AutoDelta])
def test_svi_run_with_autoguides_and_predictive(autoguide):
    guide = autoguide(model)
    svi = SVI(model, guide, numpyro.optim.Adam(0.05), loss=px.numpyro.ELBO(num_particles=2))
    result = svi.run(jax.random.key(1), 400, DATA, progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    assert np.mean(result.losses[-50:]) < np.mean(result.losses[:50])
    samples = Predictive(model, guide=guide, params=result.params, num_samples=200,
                         return_sites=["mu", "obs"])(
        jax.random.key(2), DATA)
    assert samples["mu"].shape[0] == 200
    assert abs(float(jnp.mean(samples["mu"])) - float(jnp.mean(DATA))) < 0.6


def test_discrete_latent_in_guide_trains_like_tracegraph_elbo():
    def mixture(x):
        c = numpyro.sample("c", dist.Bernoulli(probs=0.5))
        numpyro.sample("x", dist.Normal(4.0 * c - 2.0, 1.0), obs=x)

    def coin_guide(x):
        numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("logit", 0.0)))

    # exact posterior logit: log N(1.5; 2, 1) - log N(1.5; -2, 1) = 6
    results = {}
    for name, loss in [("ppl_ext enum", px.numpyro.ELBO(estimators={"c": px.enum})),
                       ("ppl_ext reinforce", px.numpyro.ELBO(num_particles=4)),
                       ("numpyro TraceGraph", TraceGraph_ELBO(num_particles=4))]:
        svi = SVI(mixture, coin_guide, numpyro.optim.Adam(0.1), loss=loss)
        results[name] = float(svi.run(jax.random.key(0), 600, 1.5, progress_bar=False)
                              .params["logit"])
    assert 5.0 < results["ppl_ext enum"] < 6.5, results
    assert results["ppl_ext reinforce"] > 4.0 and results["numpyro TraceGraph"] > 4.0, results


def test_iwelbo_loss_runs_in_svi():
    svi = SVI(model, guide, numpyro.optim.Adam(0.05), loss=px.numpyro.IWELBO(num_particles=4))
    result = svi.run(jax.random.key(3), 200, DATA, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


def test_posterior_samples_to_arviz_summary():
    import arviz

    guide = AutoNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(0.05), loss=px.numpyro.ELBO())
    result = svi.run(jax.random.key(4), 300, DATA, progress_bar=False)
    posterior = Predictive(guide, params=result.params, num_samples=400)(jax.random.key(5), DATA)
    predictive = Predictive(model, posterior_samples=posterior, return_sites=["obs"])(
        jax.random.key(6), DATA)
    tree = px.numpyro.to_inference_data(posterior, posterior_predictive=predictive,
                                        observed_data={"obs": DATA}, num_chains=2)
    assert tuple(tree.posterior["mu"].shape) == (2, 200)
    summary = arviz.summary(tree, var_names=["mu", "sigma"])
    assert "mu" in str(summary)
    with pytest.raises(ValueError, match="num_chains=3"):
        px.numpyro.to_inference_data(posterior, num_chains=3)


def test_vimco_loss_is_unbiased_for_the_iwelbo_gradient_and_trains():
    loss = px.numpyro.VIMCO(num_particles=3)
    params = {"logit": jnp.asarray(0.3)}
    values, grads = many(lambda key: jax.value_and_grad(
        lambda p: loss.loss(key, p, coin_model, coin_guide, 0.5))(params))
    exact_value, exact_grad = jax.value_and_grad(exact_coin_iwelbo)(params, 0.5, 3)
    assert_unbiased(values, -exact_value)  # k = 4 standard errors
    assert_unbiased(grads["logit"], -exact_grad["logit"])

    # posterior logit at x = 1.5: log(0.3/0.7) + log N(1.5; 1, 1) - log N(1.5; -1, 1) = 2.15
    svi = SVI(coin_model, coin_guide, numpyro.optim.Adam(0.1), loss=loss)
    result = svi.run(jax.random.key(0), 400, 1.5, progress_bar=False)
    assert float(result.params["logit"]) > 1.0


# ------------------------------------------------------------------------------ bad input


def test_estimator_for_an_unknown_site_is_refused():
    svi = SVI(model, guide, numpyro.optim.Adam(0.1),
              loss=px.numpyro.ELBO(estimators={"mu": px.reinforce, "sgima": px.reinforce}))
    with pytest.raises(ValueError, match=r"\['sgima'\].*sites are \['mu', 'obs', 'sigma'\]"):
        svi.run(jax.random.key(0), 2, DATA, progress_bar=False)
    # names of the model's sites are accepted (the model is simulated in some objectives)
    ok = px.numpyro.ELBO(estimators={"mu": px.reinforce, "obs": px.reinforce})
    params = {"loc": jnp.asarray(0.3), "scale": jnp.asarray(0.5), "s_loc": jnp.asarray(0.1)}
    assert np.isfinite(float(ok.loss(jax.random.key(0), params, model, guide, DATA)))


def test_guide_without_a_latent_site_of_the_model_names_it():
    def incomplete_guide(data):
        numpyro.sample("mu", dist.Normal(numpyro.param("loc", 0.3), 1.0))

    svi = SVI(model, incomplete_guide, numpyro.optim.Adam(0.1), loss=px.numpyro.ELBO())
    with pytest.raises(ValueError, match="site 'sigma' has none in `choices`"):
        svi.run(jax.random.key(0), 2, DATA, progress_bar=False)


def test_gen_fn_estimators_must_name_its_sites():
    q = px.gen.NumPyroModel(guide, {"sigma": px.reinforce, "nu": px.enum})
    params = {"loc": 0.3, "scale": 0.5, "s_loc": 0.1}
    f = px.expectation(lambda p: q.simulate(p, DATA).log_density)
    with pytest.raises(ValueError, match=r"\['nu'\], which is not a sample site of 'guide'"):
        f.estimate(jax.random.key(0), params)


def test_estimator_choice_on_an_autoguide_delta_site_keeps_the_gradient():
    # AutoDiagonalNormal samples "_auto_latent" and emits Delta sites "mu", "sigma": asking
    # for the score function at "mu" must not drop the pathwise gradient through it.
    guide_auto = AutoDiagonalNormal(model)
    svi = SVI(model, guide_auto, numpyro.optim.Adam(0.1), loss=px.numpyro.ELBO())
    params = svi.get_params(svi.init(jax.random.key(0), DATA))
    key = jax.random.key(1)
    plain = jax.grad(lambda p: px.numpyro.ELBO().loss(key, p, model, guide_auto, DATA))(params)
    chosen = px.numpyro.ELBO(estimators={"mu": px.reinforce})
    ours = jax.grad(lambda p: chosen.loss(key, p, model, guide_auto, DATA))(params)
    for name in params:
        np.testing.assert_allclose(ours[name], plain[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- subsampling


def loss_and_grad_draws(loss, params, model_fn, guide_fn, *args):
    """Independent (value, gradient) draws of `loss` (an SVI loss) at `params`."""
    return many(lambda k: jax.value_and_grad(
        lambda p: loss.loss(k, p, model_fn, guide_fn, *args))(params))


def assert_matches(ours, reference, trace_elbo_values, what):
    """Loss and gradient draws agree in mean with `reference`'s, the loss with Trace_ELBO's."""
    (v, g), (v_ref, g_ref) = ours, reference
    assert_same_mean(v, v_ref, what=f"{what}: loss")
    assert_same_mean(v, trace_elbo_values, what=f"{what}: loss vs Trace_ELBO")
    for name in g:
        assert_same_mean(g[name], g_ref[name], what=f"{what}: gradient {name}")

SUB_DATA = jnp.asarray(np.random.default_rng(3).normal(1.0, 1.5, 20))


def local_model(data, subsample_size=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", data.shape[0], subsample_size=subsample_size) as idx:
        z = numpyro.sample("z", dist.Normal(mu, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])


def local_guide(data, subsample_size=None):
    numpyro.sample("mu", dist.Normal(numpyro.param("m", 0.2), numpyro.param("s", 0.7)))
    with numpyro.plate("data", data.shape[0], subsample_size=subsample_size) as idx:
        numpyro.sample("z", dist.Normal(numpyro.param("a", 0.1 * jnp.arange(20.0))[idx], 0.8))


def global_guide(data, subsample_size=None):
    numpyro.sample("mu", dist.Normal(numpyro.param("m", 0.2), numpyro.param("s", 0.7)))


def _global_model(data, subsample_size=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", data.shape[0], subsample_size=subsample_size) as idx:
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=data[idx])


@pytest.mark.parametrize("model_fn, guide_fn, params", [
    (local_model, local_guide, {"m": 0.2, "s": 0.7, "a": 0.1 * jnp.arange(20.0)}),
    (_global_model, global_guide, {"m": 0.2, "s": 0.7}),  # only the model subsamples
])
def test_subsampling_plates_give_unbiased_minibatch_elbos(model_fn, guide_fn, params):
    """Minibatches of 5 of 20 points: model and guide share the indices (the guide's are
    replayed into the model), so loss and gradient are unbiased for the full-data ones;
    the loss also has numpyro Trace_ELBO's distribution (k = 4 SE)."""
    params = jax.tree.map(jnp.asarray, params)
    loss = px.numpyro.ELBO()
    # the minibatch size is a Python constant (a traced one cannot size the plate)
    model_5, guide_5 = (functools.partial(f, subsample_size=5) for f in (model_fn, guide_fn))
    minibatch = loss_and_grad_draws(loss, params, model_5, guide_5, SUB_DATA)
    full = loss_and_grad_draws(loss, params, model_fn, guide_fn, SUB_DATA)
    theirs = many(lambda k: Trace_ELBO().loss(k, params, model_5, guide_5, SUB_DATA))
    assert_matches(minibatch, full, theirs, "minibatch vs full data")
    # one draw really is a minibatch: a guide-local gradient is zero off the indices
    if "a" in params:
        assert np.all(np.sum(np.asarray(minibatch[1]["a"]) != 0, axis=1) == 5)


def test_subsampling_in_svi_run_trains():
    import optax

    # a decaying step size: with a constant one the last iterate wanders by about 0.15
    # (minibatch noise), whatever the seed
    svi = SVI(functools.partial(local_model, subsample_size=5),
              functools.partial(local_guide, subsample_size=5),
              optax.adam(optax.exponential_decay(0.05, 1500, 0.05)), loss=px.numpyro.ELBO())
    result = svi.run(jax.random.key(0), 1500, SUB_DATA, progress_bar=False)
    # x_i | mu ~ N(mu, 2): the posterior of mu is N(sum(x) / (N + 2), 2 / (N + 2)), and
    # mean-field VI recovers its mean; 0.15 is half a posterior standard deviation
    # (seeds 0-5 end within 0.05)
    exact = float(jnp.sum(SUB_DATA) / (20 + 2))
    assert abs(float(result.params["m"]) - exact) < 0.15


# ------------------------------------------------------------------------- enumeration


def test_config_enumerate_on_a_guide_site_means_px_enum():
    from numpyro.contrib.funsor import config_enumerate

    params = {"logit": jnp.asarray(0.4)}
    objective = px.vi.elbo(px.gen.NumPyroModel(coin_model),
                           px.gen.NumPyroModel(config_enumerate(coin_guide)))
    values = many(lambda k: objective.estimate(k, params, 0.5), num=8)
    exact = px.vi.elbo(px.gen.NumPyroModel(coin_model),
                       px.gen.NumPyroModel(coin_guide, {"c": px.enum}))
    # enumeration is exact: the same value whatever the key
    np.testing.assert_allclose(values, float(exact.estimate(jax.random.key(0), params, 0.5)),
                               rtol=1e-6)


def test_model_side_enumeration_is_summed_out_exactly():
    def model_enum(x):
        c = numpyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        numpyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)

    # nothing left to guess: the ELBO is log p(x) itself, for every key
    value = px.numpyro.ELBO().loss(jax.random.key(0), {}, model_enum, lambda x: None, 1.3)
    exact = jnp.log(0.7 * jnp.exp(dist.Normal(0.0, 1.0).log_prob(1.3))
                    + 0.3 * jnp.exp(dist.Normal(2.0, 1.0).log_prob(1.3)))
    np.testing.assert_allclose(-value, exact, rtol=1e-6)


def test_mixture_with_enumerated_assignments_matches_trace_enum_elbo():
    """The NumPyro mixture workflow: config_enumerate(model), a guide for the globals only
    (AutoDelta of the model with the assignments hidden): ppl_ext's loss and gradient equal
    TraceEnum_ELBO's (AutoDelta draws nothing, so they agree key for key)."""
    from numpyro import handlers
    from numpyro.contrib.funsor import config_enumerate
    from numpyro.infer import TraceEnum_ELBO

    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-2.0, 1.0, 15), rng.normal(2.0, 1.0, 15)]))

    @config_enumerate
    def mixture(x):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
        locs = numpyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            c = numpyro.sample("c", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)

    globals_guide = AutoDelta(handlers.block(mixture, hide=["c"]))
    svi = SVI(mixture, globals_guide, numpyro.optim.Adam(0.05), px.numpyro.ELBO())
    params = svi.get_params(svi.init(jax.random.key(0), x))
    params["locs_auto_loc"] = jnp.array([-1.0, 0.5])
    key = jax.random.key(1)
    for loss in (px.numpyro.ELBO(), px.numpyro.IWELBO(num_particles=3)):
        ours = jax.value_and_grad(lambda p: loss.loss(key, p, mixture, globals_guide, x))(params)
        theirs = jax.value_and_grad(
            lambda p: TraceEnum_ELBO().loss(key, p, mixture, globals_guide, x))(params)
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
        for name in params:
            np.testing.assert_allclose(ours[1][name], theirs[1][name], rtol=1e-4, atol=1e-4)
    result = svi.run(jax.random.key(0), 400, x, progress_bar=False)
    assert np.allclose(np.sort(np.asarray(result.params["locs_auto_loc"])), [-2.0, 2.0],
                       atol=0.5)


# ----------------------------------------------------------------- numpyro control flow

SERIES = jnp.asarray(np.cumsum(np.random.default_rng(4).normal(0.0, 1.0, 6)))


def walk_model(ys):
    from numpyro.contrib.control_flow import scan

    s = numpyro.sample("s", dist.LogNormal(0.0, 0.5))

    def step(z, y):
        z = numpyro.sample("z", dist.Normal(z, s))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=y)
        return z, None

    scan(step, 0.0, ys)


def scan_guide(ys):
    from numpyro.contrib.control_flow import scan

    numpyro.sample("s", dist.LogNormal(numpyro.param("a", 0.1), 0.3))

    def step(carry, loc):
        numpyro.sample("z", dist.Normal(loc, 0.4))
        return carry, None

    scan(step, 0.0, numpyro.param("locs", jnp.linspace(-1.0, 1.0, 6)))


def vector_guide(ys):  # the same law as scan_guide, without the scan
    numpyro.sample("s", dist.LogNormal(numpyro.param("a", 0.1), 0.3))
    numpyro.sample("z", dist.Normal(numpyro.param("locs", jnp.linspace(-1.0, 1.0, 6)),
                                    0.4).to_event(1))


def test_sites_inside_numpyro_scan_in_guide_and_model():
    """A guide whose sites are drawn inside numpyro's scan gives the same ELBO and gradient
    (in distribution, k = 4 SE) as the equivalent vectorised guide, and the same loss as
    Trace_ELBO; the model's scanned sites are scored from the guide's stacked draws."""
    params = {"a": jnp.asarray(0.1), "locs": jnp.linspace(-1.0, 1.0, 6)}
    loss = px.numpyro.ELBO()
    scanned = loss_and_grad_draws(loss, params, walk_model, scan_guide, SERIES)
    vectorised = loss_and_grad_draws(loss, params, walk_model, vector_guide, SERIES)
    theirs = many(lambda k: Trace_ELBO().loss(k, params, walk_model, scan_guide, SERIES))
    assert_matches(scanned, vectorised, theirs, "scan vs vectorised guide")


def test_guide_missing_a_scanned_model_site_names_it():
    svi = SVI(walk_model, global_guide_s, numpyro.optim.Adam(0.1), loss=px.numpyro.ELBO())
    with pytest.raises(ValueError,
                       match="site 'z', inside a numpyro scan/cond body, has no value"):
        svi.run(jax.random.key(0), 2, SERIES, progress_bar=False)


def global_guide_s(ys):
    numpyro.sample("s", dist.LogNormal(numpyro.param("a", 0.1), 0.3))


def test_mutable_state_outside_elbo_is_refused_clearly():
    from numpyro.primitives import mutable

    def counting_model(x):
        count = mutable("count", {"n": jnp.zeros(())})
        count["n"] = count["n"] + 1
        model(x)

    # px.numpyro.ELBO carries it (tests/numpyro/test_parity.py); a bound has nowhere to
    svi = SVI(counting_model, guide, numpyro.optim.Adam(0.1),
              loss=px.numpyro.IWELBO(num_particles=2))
    with pytest.raises(NotImplementedError, match="'count' is numpyro.mutable state"):
        svi.run(jax.random.key(0), 2, DATA, progress_bar=False)
