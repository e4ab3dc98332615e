"""NumPyro parity (issue 10): workflows that run with NumPyro's losses run unchanged with a
ppl_ext loss and give NumPyro's answer (its loss on the same model and guide, or an exact
value)."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate
from numpyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO

import ppl_ext as px
from models import toy_mixture
from tests.helpers import assert_same_mean, assert_unbiased, many


def value_and_grad_draws(loss, params, model, guide, *args, num=10_000, **kwargs):
    """Independent (loss, gradient) draws of an SVI loss at `params`."""
    return many(lambda k: jax.value_and_grad(
        lambda p: loss.loss(k, p, model, guide, *args, **kwargs))(params), num=num)


def assert_same_loss_and_grad(ours, theirs, what):
    assert_same_mean(ours[0], theirs[0], what=f"{what}: loss")
    for name in theirs[1]:
        assert_same_mean(ours[1][name], theirs[1][name], what=f"{what}: d/d{name}")


# ------------------------------------------------------------ 1. static (non-array) arguments


def width_model(x, hidden_dim=2, use_bias=True):
    w = numpyro.param("w", jnp.full(hidden_dim, 0.1))  # shaped by a static argument
    z = numpyro.sample("z", dist.Normal(jnp.sum(w) if use_bias else 0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def width_guide(x, hidden_dim=2, use_bias=True):
    loc = numpyro.param("loc", jnp.zeros(hidden_dim))
    numpyro.sample("z", dist.Delta(jnp.sum(loc)))


def test_svi_static_kwargs_stay_python_values():
    """`SVI(model, guide, optim, loss, hidden_dim=3)`: NumPyro closes over its static
    kwargs; a point-mass guide makes the loss deterministic, so the whole training run
    equals Trace_ELBO's step for step."""
    x = jnp.array([0.5, 1.5, 1.0])
    runs = {}
    for name, loss in [("ppl_ext", px.numpyro.ELBO()), ("numpyro", Trace_ELBO())]:
        svi = SVI(width_model, width_guide, numpyro.optim.Adam(0.1), loss, hidden_dim=3,
                  use_bias=True)
        runs[name] = svi.run(jax.random.key(0), 20, x, progress_bar=False)
    np.testing.assert_allclose(runs["ppl_ext"].losses, runs["numpyro"].losses, rtol=1e-5)
    assert runs["ppl_ext"].params["loc"].shape == (3,)
    # a Python int passed positionally (a plate size, a layer width) is static too
    loss = px.numpyro.ELBO().loss(jax.random.key(0), runs["numpyro"].params, width_model,
                                  width_guide, x, 3, False)
    theirs = Trace_ELBO().loss(jax.random.key(0), runs["numpyro"].params, width_model,
                               width_guide, x, 3, False)
    np.testing.assert_allclose(loss, theirs, rtol=1e-6)


# numpyro's examples/toy_mixture_model_discrete_enumeration.py, as written
toy_mixture_model, toy_mixture_guide = toy_mixture.model, toy_mixture.guide


def toy_mixture_data(num_obs):
    return toy_mixture.generate_data(num_obs, p_a=0.1, p_b=(0.1, 0.9), p_c=(0.1, 0.9))


def test_toy_mixture_example_with_the_plate_size_as_an_argument():
    """The plate size `num_obs` is a positional Python int; the loss has TraceEnum_ELBO's
    distribution (B summed out exactly by both), and SVI trains as in the example."""
    prior, obs = toy_mixture_data(40)
    params = {"a": prior["A"], "b": prior["B"], "c": prior["C"]}
    ours = many(lambda k: px.numpyro.ELBO().loss(k, params, toy_mixture_model,
                                                 toy_mixture_guide, prior, obs, 40))
    theirs = many(lambda k: TraceEnum_ELBO().loss(k, params, toy_mixture_model,
                                                  toy_mixture_guide, prior, obs, 40))
    assert_same_mean(ours, theirs, what="toy mixture loss")
    svi = SVI(toy_mixture_model, toy_mixture_guide, numpyro.optim.Adam(0.01),
              loss=px.numpyro.ELBO())
    result = svi.run(jax.random.key(0), 50, prior, obs, 40, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


# ------------------------------------------------------- 2. substituted and 9. blocked sites


def chain_model(x):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(a, 1.0))
    numpyro.sample("x", dist.Normal(b, 1.0), obs=x)


def chain_guide(x):
    numpyro.sample("a", dist.Normal(numpyro.param("la", 0.2), 1.0))
    numpyro.sample("b", dist.Normal(numpyro.param("lb", -0.1), 0.8))


CHAIN_PARAMS = {"la": jnp.asarray(0.2), "lb": jnp.asarray(-0.1)}


def test_guide_site_fixed_by_substitute_is_a_choice():
    """A guide site fixed with `handlers.substitute` is still the guide's choice (scored by
    its density, replayed into the model), as in NumPyro's Trace_ELBO."""
    guide = handlers.substitute(chain_guide, data={"a": 0.3})
    ours = value_and_grad_draws(px.numpyro.ELBO(), CHAIN_PARAMS, chain_model, guide, 1.0)
    theirs = value_and_grad_draws(Trace_ELBO(), CHAIN_PARAMS, chain_model, guide, 1.0)
    assert_same_loss_and_grad(ours, theirs, "substituted guide site")


def blocked_guide(x):
    numpyro.sample("a", dist.Normal(numpyro.param("la", 0.2), 1.0))
    with handlers.block():
        u = numpyro.sample("u", dist.Normal(0.0, 0.5))  # hidden: no key from the stack
    numpyro.sample("b", dist.Normal(numpyro.param("lb", -0.1) + u, 0.8))


def test_guide_site_inside_block_gets_a_key():
    """A site hidden by `handlers.block()` asks for `numpyro.prng_key()`; it gets a fresh
    key per estimate, is not a choice (not scored), and the loss and gradient have
    Trace_ELBO's distribution."""
    ours = value_and_grad_draws(px.numpyro.ELBO(), CHAIN_PARAMS, chain_model, blocked_guide,
                                1.0)
    theirs = value_and_grad_draws(Trace_ELBO(), CHAIN_PARAMS, chain_model, blocked_guide,
                                  1.0)
    assert_same_loss_and_grad(ours, theirs, "blocked guide site")


# ------------------------------------------------------------------ 8. flow autoguides


@pytest.mark.parametrize("autoguide", ["AutoIAFNormal", "AutoBNAFNormal"])
def test_flow_autoguides_match_trace_elbo(autoguide):
    from numpyro.infer import autoguide as ag

    options = ({"num_flows": 1, "hidden_dims": [4]} if autoguide == "AutoIAFNormal"
               else {"num_flows": 1, "hidden_factors": [2]})
    guide = getattr(ag, autoguide)(chain_model, **options)
    svi = SVI(chain_model, guide, numpyro.optim.Adam(0.01), px.numpyro.ELBO())
    params = svi.get_params(svi.init(jax.random.key(0), 1.0))
    ours = value_and_grad_draws(px.numpyro.ELBO(), params, chain_model, guide, 1.0,
                                num=4000)
    theirs = value_and_grad_draws(Trace_ELBO(), params, chain_model, guide, 1.0, num=4000)
    assert_same_mean(ours[0], theirs[0], what=f"{autoguide}: loss")
    for path, leaf in jax.tree_util.tree_leaves_with_path(ours[1]):
        other = functools.reduce(lambda tree, entry: tree[getattr(entry, "key", getattr(
            entry, "idx", None))], path, theirs[1])
        assert_same_mean(leaf, other, what=f"{autoguide}: d/d{jax.tree_util.keystr(path)}")
    result = svi.run(jax.random.key(1), 200, 1.0, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


# -------------------------------------------- 3, 4, 5. scales and masks on enumerated sites

MIX_X = jnp.asarray(np.concatenate([np.random.default_rng(1).normal(-2.0, 1.0, 6),
                                    np.random.default_rng(2).normal(2.0, 1.0, 6)]))


@config_enumerate
def mixture(x, subsample_size=None, mask=None):
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
    locs = numpyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        with handlers.mask(mask=True if mask is None else mask[idx]):
            c = numpyro.sample("c", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(locs[c], 1.0), obs=x[idx])


def mixture_globals_guide(x, subsample_size=None, mask=None):  # point masses for w, locs
    numpyro.sample("w", dist.Delta(jnp.array([0.4, 0.6]), event_dim=1))
    numpyro.sample("locs", dist.Delta(numpyro.param("locs_loc", jnp.array([-1.0, 1.5])),
                                      event_dim=1))


def exact_mixture_elbo(locs, x, mask):
    """log p(w, locs) + Σ_i mask_i log Σ_c w_c N(x_i; locs_c, 1) at w = (0.4, 0.6)."""
    w = jnp.array([0.4, 0.6])
    log_prior = (dist.Dirichlet(jnp.ones(2)).log_prob(w)
                 + jnp.sum(dist.Normal(0.0, 5.0).log_prob(locs)))
    log_lik = logsumexp(jnp.log(w) + dist.Normal(locs, 1.0).log_prob(x[:, None]), axis=1)
    return log_prior + jnp.sum(jnp.where(mask, log_lik, 0.0))


def test_minibatch_scale_multiplies_the_enumerated_sum():
    """A subsampling plate scales the enumerated mixture as N/m · Σ_i log Σ_c p (what
    TraceEnum_ELBO does), not log Σ_c Π p^(N/m): the minibatch loss is unbiased for the
    exact full-data value and has TraceEnum_ELBO's distribution."""
    params = {"locs_loc": jnp.array([-1.0, 1.5])}
    exact = -exact_mixture_elbo(params["locs_loc"], MIX_X, jnp.ones(12, bool))
    full = px.numpyro.ELBO().loss(jax.random.key(0), params, mixture, mixture_globals_guide,
                                  MIX_X)
    np.testing.assert_allclose(full, exact, rtol=1e-5)
    loss = px.numpyro.ELBO()
    ours = many(lambda k: loss.loss(k, params, mixture, mixture_globals_guide, MIX_X, 4))
    assert_unbiased(ours, exact, what="ELBO minibatch loss")
    # a bound over particles with a global site beside the subsampled plate: refused
    with pytest.raises(ValueError, match="different scales"):
        px.numpyro.IWELBO(num_particles=3).loss(jax.random.key(0), params, mixture,
                                                mixture_globals_guide, MIX_X, 4)
    theirs = many(lambda k: TraceEnum_ELBO().loss(k, params, mixture, mixture_globals_guide,
                                                  MIX_X, 4))
    assert_unbiased(theirs, exact, what="TraceEnum_ELBO minibatch loss")


def test_masked_enumerated_elements_add_nothing():
    """Masked-out elements of an enumerated site (and of its observation) contribute 0 to
    the log density, not log K (the sum over K values of a masked factor 1)."""
    params = {"locs_loc": jnp.array([-1.0, 1.5])}
    mask = jnp.arange(12) % 3 != 0
    exact = -exact_mixture_elbo(params["locs_loc"], MIX_X, mask)
    ours = px.numpyro.ELBO().loss(jax.random.key(0), params, mixture, mixture_globals_guide,
                                  MIX_X, None, mask)
    np.testing.assert_allclose(ours, exact, rtol=1e-5)
    grad = jax.grad(lambda p: px.numpyro.ELBO().loss(
        jax.random.key(0), p, mixture, mixture_globals_guide, MIX_X, None, mask))(params)
    exact_grad = jax.grad(lambda l: -exact_mixture_elbo(l, MIX_X, mask))(params["locs_loc"])
    np.testing.assert_allclose(grad["locs_loc"], exact_grad, rtol=1e-4)


@config_enumerate
def global_switch_model(x, subsample_size):
    c = numpyro.sample("c", dist.Bernoulli(0.3))  # outside the subsampled plate
    with numpyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        numpyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x[idx])


def test_enumerated_site_outside_a_subsampled_plate_is_refused_by_name():
    """log Σ_c p(c) Π_i p(x_i | c) is not a sum over the plate: no minibatch estimate of
    it is unbiased. NumPyro's TraceEnum_ELBO refuses it; so does ppl_ext, naming the site
    and the plate."""
    empty_guide = lambda x, subsample_size: None  # noqa: E731
    with pytest.raises(ValueError, match="share a common scale"):
        TraceEnum_ELBO().loss(jax.random.key(0), {}, global_switch_model, empty_guide,
                              MIX_X, 4)
    with pytest.raises(ValueError, match=r"'c'.*subsampl.*'data'"):
        px.numpyro.ELBO().loss(jax.random.key(0), {}, global_switch_model, empty_guide,
                               MIX_X, 4)
    # without subsampling it is an ordinary exact sum
    value = px.numpyro.ELBO().loss(jax.random.key(0), {}, global_switch_model, empty_guide,
                                   MIX_X, None)
    exact = -logsumexp(jnp.log(jnp.array([0.7, 0.3])) + jnp.array(
        [jnp.sum(dist.Normal(m, 1.0).log_prob(MIX_X)) for m in (-1.0, 1.0)]))
    np.testing.assert_allclose(value, exact, rtol=1e-5)


# ------------------------------------------- 6. one minibatch for all particles of a bound

COIN_X = jnp.array([0.3, -1.2])


def local_coins_model(x, subsample_size=None):
    with numpyro.plate("data", 2, subsample_size=subsample_size) as idx:
        c = numpyro.sample("c", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x[idx])


def local_coins_guide(x, subsample_size=None):
    logits = numpyro.param("logits", jnp.array([0.4, -0.8]))
    with numpyro.plate("data", 2, subsample_size=subsample_size) as idx:
        numpyro.sample("c", dist.Bernoulli(logits=logits[idx]))


def global_coin_model(x, subsample_size=None):  # only the model has the plate
    c = numpyro.sample("c", dist.Bernoulli(0.3))
    with numpyro.plate("data", 2, subsample_size=subsample_size) as idx:
        numpyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x[idx])


def global_coin_guide(x, subsample_size=None):
    numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("logits", jnp.array(0.4))))


def exact_shared_minibatch_bound(local, params, alpha, num_particles):
    """E_i E_{c_1..K ~ q} [1/(1-α) log 1/K Σ_k w_k^(1-α)] with one minibatch {i} (of 2,
    scale 2) for all K particles: a sum over i and over the 2^K coin values. `local`:
    every site is in the plate, the bound is 2 · (the bound of the unscaled weights), as
    NumPyro's RenyiELBO computes it; otherwise the weights are the scaled ones."""
    total = 0.0
    for i in range(2):
        logit = params["logits"][i] if local else params["logits"]
        for cs in itertools.product([0.0, 1.0], repeat=num_particles):
            cs = jnp.array(cs)
            log_q = dist.Bernoulli(logits=logit).log_prob(cs)
            log_prior = dist.Bernoulli(0.3).log_prob(cs)
            log_lik = dist.Normal(2.0 * cs - 1.0, 1.0).log_prob(COIN_X[i])
            log_w = (log_prior + log_lik - log_q) if local else (
                log_prior + 2.0 * log_lik - log_q)
            bound = (logsumexp((1.0 - alpha) * log_w) - math.log(num_particles)) / (1 - alpha)
            bound = 2.0 * bound if local else bound
            total = total + 0.5 * jnp.exp(jnp.sum(log_q)) * bound
    return total


@pytest.mark.parametrize("local", [True, False], ids=["guide and model plate",
                                                     "model plate only"])
@pytest.mark.parametrize("alpha", [0.0, 0.5], ids=["IWELBO", "Renyi"])
def test_bound_particles_share_one_minibatch(local, alpha):
    """A bound's K particles are scored on one minibatch per estimate (NumPyro seeds the
    plates once): the loss and its gradient are unbiased for the exact shared-minibatch
    value. (A fresh minibatch per particle puts the log-sum-exp over different data
    points, a larger value.) When every site is in the plate, the scale N/m multiplies the
    bound of the unscaled weights, as in NumPyro's RenyiELBO (same loss in distribution):
    with it inside the log-sum-exp the minibatch value exceeded the full-data bound."""
    model, guide = (functools.partial(f, subsample_size=1) for f in (
        (local_coins_model, local_coins_guide) if local
        else (global_coin_model, global_coin_guide)))
    params = {"logits": jnp.array([0.4, -0.8]) if local else jnp.asarray(0.4)}
    loss = (px.numpyro.IWELBO(num_particles=3) if alpha == 0.0 else
            px.numpyro.ObjectiveLoss(lambda m, g: px.vi.renyi(m, g, alpha, 3)))
    if not local and alpha == 0.0:
        # a global latent beside a subsampled plate: the library bounds refuse (so does
        # NumPyro's RenyiELBO); a user's ObjectiveLoss gets the shared-minibatch value
        with pytest.raises(ValueError, match="different scales"):
            loss.loss(jax.random.key(0), params, model, guide, COIN_X)
        loss = px.numpyro.ObjectiveLoss(lambda m, g: px.vi.iwelbo(m, g, 3))
    values, grads = value_and_grad_draws(loss, params, model, guide, COIN_X)
    exact, exact_grad = jax.value_and_grad(
        lambda p: -exact_shared_minibatch_bound(local, p, alpha, 3))(params)
    assert_unbiased(values, exact, what="loss")
    assert_unbiased(grads["logits"], exact_grad["logits"], what="gradient")
    if local:
        from numpyro.infer import RenyiELBO

        theirs = many(lambda k: RenyiELBO(alpha=alpha, num_particles=3).loss(
            k, params, model, guide, COIN_X))
        assert_same_mean(values, theirs, what="loss vs NumPyro's RenyiELBO")


# --------------------------------------------------------------- vocabulary, checked input


def test_num_particles_is_k_inside_the_bound_and_num_samples_averages():
    """`IWELBO(num_particles=K)` and `VIMCO(num_particles=K)` are the K-particle bound
    (as `px.vi.iwelbo(m, g, K)` and NumPyro's `RenyiELBO(num_particles=K)`); `num_samples`
    averages independent estimates of it (same mean, a quarter of the variance)."""
    from tests.helpers import coin_guide, coin_model, exact_coin_iwelbo

    params = {"logit": jnp.asarray(0.3)}
    exact = -exact_coin_iwelbo(params, 0.5, 3)
    for loss in (px.numpyro.IWELBO(num_particles=3), px.numpyro.VIMCO(num_particles=3)):
        values = many(lambda k: loss.loss(k, params, coin_model, coin_guide, 0.5))
        assert_unbiased(values, exact, what=type(loss).__name__)
    averaged = many(lambda k: px.numpyro.IWELBO(num_particles=3, num_samples=4).loss(
        k, params, coin_model, coin_guide, 0.5))
    assert_unbiased(averaged, exact, what="IWELBO num_samples=4")
    assert 0.15 < np.var(averaged) / np.var(values) < 0.35


def test_unknown_params_key_is_refused_by_name():
    """A misspelt key of `params` (no numpyro.param site reads it) would silently get a
    zero gradient; it is refused, naming it and the known names."""
    params = {"la": jnp.asarray(0.2), "lb": jnp.asarray(-0.1), "lc": jnp.asarray(1.0)}
    with pytest.raises(ValueError, match=r"\['lc'\].*param sites are \['la', 'lb'\]"):
        px.numpyro.ELBO().loss(jax.random.key(0), params, chain_model, chain_guide, 1.0)
    with pytest.raises(ValueError, match=r"\['lc'\]"):
        px.numpyro.IWELBO(num_particles=2).loss(jax.random.key(0), params, chain_model,
                                                chain_guide, 1.0)


def test_autosemidais_with_a_local_guide():
    """AutoSemiDAIS draws its local guide's initial point inside `handlers.block()` (the
    setting of numpyro's test_autosemidais_local_only): the loss has Trace_ELBO's
    distribution, and SVI runs."""
    from numpyro.infer.autoguide import AutoNormal, AutoSemiDAIS

    data = jnp.linspace(0, 1, 10)

    def model():
        with numpyro.plate("N", 10, subsample_size=5, dim=-1):
            batch = numpyro.subsample(data, event_dim=0)
            numpyro.sample("x", dist.Normal(batch, 1))

    local_guide = AutoNormal(model, create_plates=lambda: numpyro.plate(
        "N", 10, subsample_size=5, dim=-1))
    guide = AutoSemiDAIS(model, model, None, local_guide=local_guide, K=2)
    # numpyro's support check of the momentum's Normal after the leapfrog steps is a "real"
    # check (it flips only at ±inf/NaN): accepted by the continuity check, no opt-out
    loss = px.numpyro.ELBO()
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), loss)
    params = svi.get_params(svi.init(jax.random.key(0)))
    ours = many(lambda k: loss.loss(k, params, model, guide), num=4000)
    theirs = many(lambda k: Trace_ELBO().loss(k, params, model, guide), num=4000)
    assert_same_mean(ours, theirs, what="AutoSemiDAIS loss")
    result = svi.run(jax.random.key(1), 10, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


# ------------------------------------------------------------------- analytic KL terms


def test_analytic_kl_has_the_sampled_elbos_mean_and_lower_variance():
    """`ELBO(analytic_kl=True)` (TraceMeanField_ELBO's closed-form KL terms, with the
    model's law of b at the guide's draw of a) has the sampled ELBO's mean, value and
    gradient, and TraceMeanField_ELBO's mean; its variance is lower."""
    from numpyro.infer import TraceMeanField_ELBO

    loss = px.numpyro.ELBO(analytic_kl=True)
    analytic = value_and_grad_draws(loss, CHAIN_PARAMS, chain_model, chain_guide, 1.0)
    sampled = value_and_grad_draws(px.numpyro.ELBO(), CHAIN_PARAMS, chain_model,
                                   chain_guide, 1.0)
    theirs = value_and_grad_draws(TraceMeanField_ELBO(), CHAIN_PARAMS, chain_model,
                                  chain_guide, 1.0)
    assert_same_loss_and_grad(analytic, sampled, "analytic vs sampled KL")
    assert_same_loss_and_grad(analytic, theirs, "analytic KL vs TraceMeanField_ELBO")
    assert np.var(analytic[0]) < 0.8 * np.var(sampled[0])
    # a site without a closed form (a LogNormal guide for a Gamma prior) keeps the sampled
    # terms; an observed site is unchanged
    def gamma_model(x):
        s = numpyro.sample("s", dist.Gamma(2.0, 2.0))
        numpyro.sample("x", dist.Normal(0.0, s), obs=x)

    def lognormal_guide(x):
        numpyro.sample("s", dist.LogNormal(numpyro.param("m", 0.1), 0.5))

    params = {"m": jnp.asarray(0.1)}
    ours = many(lambda k: loss.loss(k, params, gamma_model, lognormal_guide, 1.0))
    sampled = many(lambda k: px.numpyro.ELBO().loss(k, params, gamma_model, lognormal_guide,
                                                    1.0), seed=1)
    assert_same_mean(ours, sampled, what="no closed form: sampled terms")


# ------------------------------------------------------------------ numpyro.mutable state


def test_mutable_state_is_carried_through_svi_state_as_numpyro_does():
    """`numpyro.mutable` sites (batch-norm-like running statistics): SVI keeps their new
    values in its state step after step; with a point-mass guide the whole run (losses and
    final state) equals Trace_ELBO's."""
    from numpyro.primitives import mutable

    def stats_model(x):
        stats = mutable("stats", {"count": jnp.zeros(()), "mean": jnp.zeros(())})
        stats["count"] = stats["count"] + 1.0
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        stats["mean"] = 0.9 * stats["mean"] + 0.1 * (jnp.mean(x) + z)
        with numpyro.plate("d", x.shape[0]):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def point_guide(x):
        numpyro.sample("z", dist.Delta(numpyro.param("loc", 0.1)))

    x = jnp.array([0.5, 1.5, 1.0])
    runs = {}
    for name, loss in [("ppl_ext", px.numpyro.ELBO()), ("numpyro", Trace_ELBO())]:
        svi = SVI(stats_model, point_guide, numpyro.optim.Adam(0.1), loss)
        runs[name] = svi.run(jax.random.key(0), 10, x, progress_bar=False)
    np.testing.assert_allclose(runs["ppl_ext"].losses, runs["numpyro"].losses, rtol=1e-5)
    ours, theirs = (runs[n].state.mutable_state["stats"] for n in ("ppl_ext", "numpyro"))
    assert float(ours["count"]) == float(theirs["count"]) == 11.0  # init + 10 steps
    np.testing.assert_allclose(ours["mean"], theirs["mean"], rtol=1e-5)
