"""ELBO and IWELBO on a conjugate model with known evidence (K_SE = 4, see conftest)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import (
    exact_gaussian_elbo,
    assert_objective_unbiased, assert_unbiased, coin_guide, coin_model, exact_coin_iwelbo, many,
    assert_within_se, mean_and_se,
)

X = 1.3


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", 0.0)
    log_scale = numpyro.param("log_scale", 0.0)
    numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)))


exact_elbo = exact_gaussian_elbo


LOG_EVIDENCE = float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(X))
PARAMS = {"loc": jnp.asarray(0.2), "log_scale": jnp.asarray(-0.3)}
M, Q = px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide)


@pytest.mark.parametrize("estimator", [None, px.reinforce, px.mvd],
                         ids=["default_reparam", "reinforce", "mvd"])
def test_elbo_value_and_gradient_unbiased(estimator):
    q = px.gen.NumPyroModel(guide, {} if estimator is None else {"z": estimator})
    objective = px.vi.elbo(M, q)
    assert_objective_unbiased(objective, PARAMS, exact_elbo, X, what="elbo")


def test_bounds_elbo_below_iwelbo_below_evidence_and_monotone_in_k():
    means = []
    for k in [1, 4, 16]:
        objective = px.vi.iwelbo(M, Q, k)
        mean, se = mean_and_se(many(lambda key: objective(key, PARAMS, X), num=4000))
        means.append((mean, se))
    elbo_mean, elbo_se = mean_and_se(many(lambda key: px.vi.elbo(M, Q)(key, PARAMS, X),
                                          num=4000))
    # IWELBO(1) is the ELBO
    assert_within_se(means[0][0] - elbo_mean, math.hypot(means[0][1], elbo_se))
    assert_within_se(means[0][0] - float(exact_elbo(PARAMS, X)), means[0][1])
    for (lo, lo_se), (hi, hi_se) in zip(means, means[1:]):
        assert hi > lo - 4 * math.hypot(lo_se, hi_se)
    assert means[-1][0] > means[0][0]
    assert means[-1][0] < LOG_EVIDENCE + 4 * means[-1][1]


def test_at_the_exact_posterior_the_elbo_is_the_evidence():
    posterior = {"loc": jnp.asarray(X / 2), "log_scale": jnp.asarray(0.5 * math.log(0.5))}
    values = many(lambda k: px.vi.elbo(M, Q)(k, posterior, X), num=200)
    assert np.allclose(values, LOG_EVIDENCE, atol=1e-4)


def test_discrete_latent_with_enumeration_and_score_function():
    params = {"logit": jnp.asarray(0.4)}
    exact = jax.grad(exact_coin_iwelbo)(params, 0.5, 1)["logit"]  # IWELBO(1) = ELBO
    for estimators in [{}, {"c": px.enum}, {"c": px.LeaveOneOut(4)}]:
        objective = px.vi.elbo(px.gen.NumPyroModel(coin_model),
                               px.gen.NumPyroModel(coin_guide, estimators))
        grads = many(lambda k: objective.grad(k, params, 0.5)["logit"])
        assert_unbiased(grads, exact, what=f"discrete elbo {estimators}")


def test_renyi_interpolates_between_iwelbo_and_elbo_for_the_same_draws():
    key = jax.random.key(5)
    log_w = {alpha: float(px.vi.renyi(M, Q, alpha, 8)(key, PARAMS, X))
             for alpha in [0.0, 0.3, 0.7, 1.0]}
    assert np.isclose(log_w[0.0], float(px.vi.iwelbo(M, Q, 8)(key, PARAMS, X)), rtol=1e-5)
    values = [log_w[a] for a in [0.0, 0.3, 0.7, 1.0]]
    assert all(a >= b - 1e-5 for a, b in zip(values, values[1:]))  # power-mean inequality
    grads = many(lambda k: px.vi.renyi(M, Q, 1.0, 1).grad(k, PARAMS, X)["loc"])
    assert_unbiased(grads, jax.grad(exact_elbo)(PARAMS, X)["loc"])  # alpha = 1, K = 1: ELBO


def test_wake_p_gives_no_gradient_to_the_guide_and_iwelbo_value():
    key = jax.random.key(6)
    value, grads = px.vi.wake_p(M, Q, 4).value_and_grad(key, PARAMS, X)
    assert np.isclose(value, px.vi.iwelbo(M, Q, 4)(key, PARAMS, X), rtol=1e-5)
    assert all(float(g) == 0.0 for g in grads.values())


def test_wake_q_gradient_points_to_the_posterior_moments():
    # With many SIR particles, d/dm E_p[log q(z)] -> (E_p[z] - m) / s^2 for the posterior
    # N(x/2, 1/2); the remaining SIR bias is checked against a tolerance of 0.05.
    s2 = float(jnp.exp(2 * PARAMS["log_scale"]))
    exact = (X / 2 - float(PARAMS["loc"])) / s2
    grads = many(lambda k: px.vi.wake_q(M, Q, 128).grad(k, PARAMS, X)["loc"], num=4000)
    mean, se = mean_and_se(grads)
    assert_within_se(mean - exact, se, atol=0.05, what="wake_q")


def test_symmetric_kl_matches_the_gaussian_closed_form():
    m, s2 = float(PARAMS["loc"]), float(jnp.exp(2 * PARAMS["log_scale"]))
    pm, ps2 = X / 2, 0.5
    kl_qp = 0.5 * (s2 / ps2 + (m - pm) ** 2 / ps2 - 1 + math.log(ps2 / s2))
    kl_pq = 0.5 * (ps2 / s2 + (m - pm) ** 2 / s2 - 1 + math.log(s2 / ps2))
    values = many(lambda k: px.vi.symmetric_kl(M, Q, 128)(k, PARAMS, X), num=4000)
    mean, se = mean_and_se(values)
    assert_within_se(mean + kl_qp + kl_pq, se, atol=0.05, what="symmetric KL")


GUIDE_PARAMS = {"loc": PARAMS["loc"], "log_scale": PARAMS["log_scale"]}


def model_with_param(x):
    z = numpyro.sample("z", dist.Normal(numpyro.param("prior_loc", 0.0), 1.0))
    numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_dreg_and_vimco_are_unbiased_for_the_iwelbo_gradient():
    # All three estimate the same gradient; compare their means pairwise (4 SE combined).
    mp = px.gen.NumPyroModel(model_with_param)
    params = {**GUIDE_PARAMS, "prior_loc": jnp.asarray(0.1)}
    k = 8
    plain = many(lambda key: px.vi.iwelbo(mp, Q, k).grad(key, params, X))
    dreg = many(lambda key: px.vi.iwelbo_dreg(mp, Q, k).grad(
        key, {"prior_loc": params["prior_loc"]}, GUIDE_PARAMS, X, argnums=(1, 2)))
    vimco = many(lambda key: px.vi.vimco(mp, Q, k).grad(key, params, X))
    dreg = {**dreg[1], **dreg[0]}
    for name in params:
        (a, sa), (b, sb), (c, sc) = (mean_and_se(g[name]) for g in (plain, dreg, vimco))
        assert_within_se(a - b, math.hypot(sa, sb), what=f"dreg {name}")
        assert_within_se(a - c, math.hypot(sa, sc), what=f"vimco {name}")
    # DReG's point: lower variance for the guide's gradient at larger K
    assert np.var(np.asarray(dreg["loc"])) < np.var(np.asarray(plain["loc"]))
    # VIMCO's point over plain score function: the leave-one-out baselines reduce variance
    q_score = px.gen.NumPyroModel(guide, default_estimator=px.reinforce)
    score = many(lambda key: px.vi.iwelbo(mp, q_score, k).grad(key, params, X))
    assert np.var(np.asarray(vimco["loc"])) < np.var(np.asarray(score["loc"]))


def test_vimco_with_a_discrete_guide_matches_exact_gradient():
    params = {"logit": jnp.asarray(0.4)}
    objective = px.vi.vimco(px.gen.NumPyroModel(coin_model), px.gen.NumPyroModel(coin_guide), 3)
    values, grads = many(lambda key: objective.value_and_grad(key, params, 0.5))
    assert_unbiased(values, exact_coin_iwelbo(params, 0.5, 3))
    assert_unbiased(grads["logit"], jax.grad(exact_coin_iwelbo)(params, 0.5, 3)["logit"])


@pytest.mark.parametrize("build", [
    lambda m, q: px.vi.elbo(m, q), lambda m, q: px.vi.iwelbo(m, q, 2),
    lambda m, q: px.vi.vimco(m, q, 2), lambda m, q: px.vi.renyi(m, q, 0.5, 2),
    lambda m, q: px.vi.wake_q(m, q, 2), lambda m, q: px.vi.marginal(q, ["z"], m),
    lambda m, q: px.vi.normalize(m, q, 2)])
def test_objectives_refuse_plain_functions(build):
    with pytest.raises(TypeError, match=r"must be a generative function.*px.gen.NumPyroModel"):
        build(model, Q)


def test_numpyro_losses_check_particle_counts():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        px.numpyro.VIMCO(num_particles=1)
    with pytest.raises(ValueError, match="positive int"):
        px.numpyro.IWELBO(num_particles=0)


def test_params_entries_no_site_reads_are_refused_by_name():
    """A misspelt params key would get a zero gradient: every library objective refuses
    entries its program never reads (before: silently ignored)."""
    objective = px.vi.elbo(M, Q)
    good = dict(PARAMS)
    assert np.isfinite(objective(jax.random.key(0), good, X))
    with pytest.raises(ValueError, match=r"\['lco'\] are not read by ELBO"):
        objective.grad(jax.random.key(0), {**good, "lco": jnp.asarray(0.3)}, X)
    with pytest.raises(ValueError, match=r"extra/w"):
        px.vi.iwelbo(M, Q, 2).estimate(jax.random.key(0),
                                       {**good, "extra": {"w": jnp.ones(2)}}, X)
    # a plain expectation program may take inputs it ignores (no refusal there)
    f = px.expectation(lambda params: px.sample(dist.Normal(params["a"], 1.0)))
    assert np.isfinite(f.grad(jax.random.key(0), {"a": 0.1, "unused": 1.0})["a"])
