"""Objectives check what they require of the guide's sites when traced (`_requirements.py`).

VIMCO's leave-one-out baselines need score-function guide sites; DReG needs
reparameterised ones. A per-site estimator choice overrides an objective's defaults, so
each objective traces the guide's `simulate`, lists its sites with their estimator kinds
and refuses a site that does not qualify, naming it. Accepted configurations are checked
against exact gradients computed without ppl_ext (enumeration, Gauss-Hermite quadrature);
means of 20000 estimates within K_SE = 4 standard errors (conftest).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax import lax
from numpyro import handlers
from numpyro.contrib.control_flow import scan as numpyro_scan

import ppl_ext as px
from tests.helpers import (
    assert_unbiased, coin_guide, coin_model, exact_coin_iwelbo, many,
)

NUM = 20_000
X = 1.3


def gaussian_model(x):
    z = numpyro.sample("z", dist.Normal(numpyro.param("prior_loc", 0.0), 1.0))
    numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gaussian_guide(x):
    loc = numpyro.param("loc", 0.0)
    numpyro.sample("z", dist.Normal(loc, jnp.exp(numpyro.param("log_scale", 0.0))))


def gaussian_guide_reparam_by_infer(x):
    loc = numpyro.param("loc", 0.0)
    numpyro.sample("z", dist.Normal(loc, jnp.exp(numpyro.param("log_scale", 0.0))),
                   infer={"estimator": px.reparam})


GAUSS_PARAMS = {"loc": jnp.asarray(0.2), "log_scale": jnp.asarray(-0.3),
                "prior_loc": jnp.asarray(0.1)}
M = px.gen.NumPyroModel(gaussian_model)


# ----------------------------------------------------------------------------- the listing


class ThreeScopes(px.gen.AbstractGenerativeFunction):
    """Sites at top level, in a nested jit, a cond branch and a scan body."""

    def simulate(self, params, x):
        a = px.sample(dist.Normal(params["loc"], 1.0), px.reparam, name="a")
        b = jax.jit(lambda m: px.sample(dist.Bernoulli(logits=m), px.reinforce, name="b"))(
            params["loc"])
        c = lax.cond(x > 0, lambda: px.sample(dist.Normal(0.0, 1.0), px.reparam, name="c"),
                     lambda: jnp.zeros(()))

        def step(carry, _):
            s = px.sample(dist.Normal(carry, 1.0), px.reinforce, name="s")
            return s, s

        _, s = lax.scan(step, a, length=2)
        d = px.sample(dist.Delta(2.0 * a), name="d")
        e = px.sample(dist.Bernoulli(logits=lax.stop_gradient(params["loc"])), px.enum,
                      name="e")
        choices = {"a": a, "b": b, "c": c, "s": s, "d": d, "e": e}
        return px.gen.Trace(choices, jnp.zeros(()), None)

    def assess(self, choices, params, x):
        raise NotImplementedError("only its sites are listed here")


def test_simulate_sites_lists_kinds_dependences_and_scopes():
    from ppl_ext.vi._requirements import (
        CONTINUATION, DIRECT, PATHWISE, SCORE_FUNCTION, THROUGH_PATHWISE, simulate_sites,
    )

    sites = simulate_sites(ThreeScopes(), {"loc": jnp.asarray(0.3)}, jnp.asarray(1.0))
    listing = {s.name: (s.kind, s.law, s.point_mass, s.where[-1] if s.where else None)
               for s in sites}
    assert listing == {
        "a": (PATHWISE, DIRECT, False, None),
        "b": (SCORE_FUNCTION, DIRECT, False, "jit <lambda>"),
        "c": (PATHWISE, 0, False, "lax.cond/switch branch 1"),
        # the first step's law depends on `a`, a pathwise draw; later steps on `s`, which
        # carries no derivative (score function)
        "s": (SCORE_FUNCTION, THROUGH_PATHWISE, False, "lax.scan body"),
        "d": (PATHWISE, THROUGH_PATHWISE, True, None),
        "e": (CONTINUATION, 0, False, None),  # stop_gradient: no dependence
    }
    assert all(s.label.startswith(f"sample site '{s.name}'") for s in sites)


def test_simulate_sites_of_a_numpyro_guide_with_scan_plate_and_observed_terms():
    from ppl_ext.vi._requirements import (
        CONTINUATION, DIRECT, PATHWISE, SCORE_FUNCTION, THROUGH_PATHWISE, simulate_sites,
    )

    def guide(x):
        loc = numpyro.param("loc", 0.0)
        z = numpyro.sample("z", dist.Normal(loc, 1.0))

        def step(carry, _):
            y = numpyro.sample("y", dist.Bernoulli(logits=carry), infer={"estimator": px.mvd})
            return carry, y

        numpyro_scan(step, z, None, length=2)
        with numpyro.plate("data", 10, subsample_size=3):
            numpyro.sample("w", dist.Normal(0.0, 1.0))
        numpyro.sample("o", dist.Normal(0.0, 1.0), obs=x)  # depends on the argument x
        numpyro.factor("f", 1.5)  # a constant

    sites = simulate_sites(px.gen.NumPyroModel(guide), {"loc": jnp.asarray(0.3)}, X)
    listing = [(s.name, s.kind, s.law, s.where) for s in sites]
    assert listing[:4] == [
        ("z", PATHWISE, DIRECT, ()),
        ("y", CONTINUATION, THROUGH_PATHWISE, ("lax.scan body",)),
        ("data", SCORE_FUNCTION, 0, ()),  # the subsample indices: a law without parameters
        ("w", PATHWISE, 0, ()),
    ]
    observed = [(s.kind, s.law) for s in sites[4:]]
    assert observed == [("observed", DIRECT), ("observed", 0)]
    assert "'o'" in sites[4].label and "'f'" in sites[5].label


# ----------------------------------------------------------------------------------- VIMCO


@pytest.mark.parametrize("how", ["estimators", "infer"])
def test_vimco_refuses_a_reparameterised_guide_site_naming_it(how):
    # Before: accepted, and the baselines multiplied a derivative of log q with a nonzero
    # mean (a biased gradient).
    if how == "estimators":
        guide = px.gen.NumPyroModel(gaussian_guide, {"z": px.reparam})
    else:
        guide = px.gen.NumPyroModel(gaussian_guide_reparam_by_infer)
    objective = px.vi.vimco(M, guide, 3)
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"px\.vi\.vimco: the guide's sample site 'z' \(Normal, estimator "
                             r"Reparam.*Remove the site's estimator override"):
        objective.grad(jax.random.key(0), GAUSS_PARAMS, X)


def test_vimco_refuses_a_guide_site_with_its_own_baseline():
    # Unbiased (the baseline does not depend on the draw) but not VIMCO: the two baselines
    # would add up.
    own_baseline = px.gen.NumPyroModel(coin_guide, {"c": px.Reinforce(baseline=1.0)})
    with pytest.raises(px.UnsupportedEstimatorError, match=r"site 'c'.*its own baseline"):
        px.vi.vimco(px.gen.NumPyroModel(coin_model), own_baseline, 2).grad(
            jax.random.key(0), {"logit": jnp.asarray(0.4)}, 0.5)


def shifted_coin_model(x):
    c = numpyro.sample("c", dist.Bernoulli(probs=0.3))
    m = numpyro.sample("m", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(2.0 * c - 1.0 + m, 1.0), obs=x)


def point_mass_guide(x):
    coin_guide(x)
    numpyro.sample("m", dist.Delta(numpyro.param("b", 0.0)))  # placed by a parameter


def exact_shifted_coin_iwelbo(params, x, k):
    """IWELBO(k) of `shifted_coin_model`/`point_mass_guide`: a sum over the 2^k coins."""
    import itertools

    total = 0.0
    b = params["b"]
    for cs in itertools.product([0.0, 1.0], repeat=k):
        cs = jnp.array(cs)
        log_q = dist.Bernoulli(logits=params["logit"]).log_prob(cs)
        log_p = (dist.Bernoulli(probs=0.3).log_prob(cs) + dist.Normal(0.0, 1.0).log_prob(b)
                 + dist.Normal(2 * cs - 1 + b, 1.0).log_prob(x))
        total += jnp.exp(jnp.sum(log_q)) * (jax.scipy.special.logsumexp(log_p - log_q)
                                             - math.log(k))
    return total


def test_vimco_refuses_a_point_mass_with_a_parametric_weight_and_accepts_a_constant_one():
    # A point mass with a constant weight has a log q without derivative: the baselines are
    # unaffected and the bound carries the pathwise derivative of its value (accepted, and
    # unbiased). With a weight (log_density) that depends on the parameters, the baselines
    # multiply its derivative (before: accepted, biased).
    params = {"logit": jnp.asarray(0.4), "b": jnp.asarray(0.3)}

    def weighted_point_mass(x):
        coin_guide(x)
        b = numpyro.param("b", 0.0)
        numpyro.sample("m", dist.Delta(b, log_density=b))

    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"site 'm'.*point mass whose log_density depends"):
        px.vi.vimco(px.gen.NumPyroModel(shifted_coin_model),
                    px.gen.NumPyroModel(weighted_point_mass), 2).grad(
            jax.random.key(0), params, 0.5)

    objective = px.vi.vimco(px.gen.NumPyroModel(shifted_coin_model),
                            px.gen.NumPyroModel(point_mass_guide), 3)
    values, grads = many(lambda key: objective.value_and_grad(key, params, 0.5), num=NUM)
    exact_value, exact_grads = jax.value_and_grad(exact_shifted_coin_iwelbo)(params, 0.5, 3)
    assert_unbiased(values, exact_value, what="vimco value")
    for name in params:
        assert_unbiased(grads[name], exact_grads[name], what=f"vimco d/d{name}")


class ScoreFunctionCoinGuide(px.gen.AbstractGenerativeFunction):
    """`coin_guide` written directly: a generative function without `default_estimator`."""

    def simulate(self, params, x):
        d = dist.Bernoulli(logits=params["logit"])
        c = px.sample(d, px.reinforce, name="c")
        return px.gen.Trace({"c": c}, d.log_prob(c), None)

    def assess(self, choices, params, x):
        return dist.Bernoulli(logits=params["logit"]).log_prob(choices["c"])


def test_vimco_accepts_any_generative_function_whose_sites_qualify():
    # Before: refused with a TypeError unless the guide had a `default_estimator` to set.
    params = {"logit": jnp.asarray(0.4)}
    objective = px.vi.vimco(px.gen.NumPyroModel(coin_model), ScoreFunctionCoinGuide(), 3)
    values, grads = many(lambda key: objective.value_and_grad(key, params, 0.5), num=NUM)
    assert_unbiased(values, exact_coin_iwelbo(params, 0.5, 3))
    assert_unbiased(grads["logit"], jax.grad(exact_coin_iwelbo)(params, 0.5, 3)["logit"])


# ------------------------------------------------------------------------------------ DReG


def test_dreg_refuses_score_function_sites_at_two_particles():
    # Before: accepted, dropping the score term's share `-Σ w̃_k ∂ log q(c_k)` (biased for
    # K >= 2; exact at K = 1, where w̃ = 1 and the score averages to zero).
    coin = px.vi.iwelbo_dreg(px.gen.NumPyroModel(coin_model), px.gen.NumPyroModel(coin_guide), 2)
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"px\.vi\.iwelbo_dreg: the guide's sample site 'c' .*estimator "
                             r"Reinforce.*DReG has no term for its score"):
        coin.grad(jax.random.key(0), {}, {"logit": jnp.asarray(0.4)}, 0.5)
    overridden = px.gen.NumPyroModel(gaussian_guide, {"z": px.reinforce})
    with pytest.raises(px.UnsupportedEstimatorError, match=r"site 'z' .*Reinforce"):
        px.vi.iwelbo_dreg(M, overridden, 2).grad(
            jax.random.key(0), {"prior_loc": GAUSS_PARAMS["prior_loc"]},
            {"loc": GAUSS_PARAMS["loc"], "log_scale": GAUSS_PARAMS["log_scale"]}, X)


def test_dreg_refuses_a_point_mass_placed_by_the_parameters():
    # Before: accepted, and the gradient was 1/K of the exact one (AutoDelta-like guide).
    def delta_guide(x):
        numpyro.sample("z", dist.Delta(numpyro.param("loc", 0.0)))

    objective = px.vi.iwelbo_dreg(M, px.gen.NumPyroModel(delta_guide), 2)
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"site 'z' .*point mass whose value or weight depends directly"):
        objective.grad(jax.random.key(0), {"prior_loc": jnp.asarray(0.1)},
                       {"loc": jnp.asarray(0.2)}, X)


def amortised_guide(x):
    """`u ~ N(loc + a x, e^log_scale)` and `z = u` as a point mass (as autoguides unpack)."""
    loc = numpyro.param("loc", 0.0) + numpyro.param("a", 0.0) * x
    u = numpyro.sample("u", dist.Normal(loc, jnp.exp(numpyro.param("log_scale", 0.0))))
    numpyro.sample("z", dist.Delta(u))


def exact_gaussian_iwelbo2(params, x):
    """IWELBO(2) of `gaussian_model`/`amortised_guide` by Gauss-Hermite quadrature over the
    two standard normal draws (converged to float32 precision at 32 nodes)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(32)
    weights = jnp.asarray(weights / weights.sum())
    mu = params["loc"] + params["a"] * x
    s = jnp.exp(params["log_scale"])
    z = mu + s * jnp.asarray(nodes)

    def log_normal(v, m, sd):
        return -0.5 * math.log(2 * math.pi) - jnp.log(sd) - 0.5 * ((v - m) / sd) ** 2

    log_w = (log_normal(z, params["prior_loc"], 1.0) + log_normal(x, z, 1.0)
             - log_normal(z, mu, s))
    pairs = jnp.logaddexp(log_w[:, None], log_w[None, :]) - math.log(2.0)
    return jnp.sum(weights[:, None] * weights[None, :] * pairs)


def test_dreg_is_unbiased_with_a_point_mass_of_a_reparameterised_draw_and_for_the_data():
    # Accepted: `z` is a function of the pathwise draw `u`. The gradient w.r.t. the data
    # `x` (before: biased, its direct part was counted with weights w̃ + w̃²) is checked too.
    guide_params = {"loc": jnp.asarray(0.2), "log_scale": jnp.asarray(-0.3),
                    "a": jnp.asarray(0.4)}
    model_params = {"prior_loc": jnp.asarray(0.1)}
    objective = px.vi.iwelbo_dreg(M, px.gen.NumPyroModel(amortised_guide), 2)
    x = jnp.asarray(X)
    values, grads = many(lambda key: objective.value_and_grad(key, model_params, guide_params,
                                                              x, argnums=(1, 2, 3)), num=NUM)
    exact_value, (exact_params, exact_x) = jax.value_and_grad(
        exact_gaussian_iwelbo2, argnums=(0, 1))({**model_params, **guide_params}, x)
    assert_unbiased(values, exact_value, what="dreg value")
    assert_unbiased(grads[0]["prior_loc"], exact_params["prior_loc"], what="dreg d/dprior_loc")
    for name in guide_params:
        assert_unbiased(grads[1][name], exact_params[name], what=f"dreg d/d{name}")
    assert_unbiased(grads[2], exact_x, what="dreg d/dx")


# ------------------------------------------------------------------- estimated, observed


def test_vimco_and_dreg_refuse_estimated_and_observed_guide_densities():
    def joint(x=None):
        u = numpyro.sample("u", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        numpyro.sample("z", dist.Normal(u, 0.5))

    def reverse(kept, x=None):
        numpyro.sample("u", dist.Normal(0.7 * kept["z"], 0.8))

    marginal = px.vi.marginal(px.gen.NumPyroModel(joint), ["z"], px.gen.NumPyroModel(reverse), 2)
    params = {"loc": jnp.asarray(0.2), "prior_loc": jnp.asarray(0.1)}
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"px\.vi\.vimco: the guide.s log density \(a Marginal.*"
                             r"not the exact density"):
        px.vi.vimco(M, marginal, 2).grad(jax.random.key(0), params, X)
    with pytest.raises(px.UnsupportedEstimatorError, match=r"iwelbo_dreg.*Marginal"):
        px.vi.iwelbo_dreg(M, marginal, 2).grad(jax.random.key(0), {}, params, X)

    def factor_guide(x):
        gaussian_guide(x)
        numpyro.factor("tilt", numpyro.param("loc", 0.0) ** 2)

    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"observed site 'tilt'.*depends on the parameters"):
        px.vi.vimco(M, px.gen.NumPyroModel(factor_guide), 2).grad(
            jax.random.key(0), GAUSS_PARAMS, X)


# ------------------------------------------------------------------- generate, scaled sites

N, SUBSAMPLE = 1000, 50
DATA = jnp.asarray(np.random.default_rng(0).normal(0.5, 1.2, N), jnp.float32)


def minibatch_model(data):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", N, subsample_size=SUBSAMPLE) as idx:
        z = numpyro.sample("z", dist.Normal(mu, 1e-3))  # drawn: scaled by N / SUBSAMPLE
        numpyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])


def scaled_model(data):
    minibatch_model(data)
    with handlers.scale(scale=3.0):
        numpyro.sample("s", dist.Normal(0.0, 1e-4).expand([100_000]).to_event(1))  # drawn


def test_generate_weight_subtracts_the_scaled_density_of_scaled_drawn_sites():
    # The weight is log p(all) - log p(drawn | rest) with scaled densities on both sides:
    # the drawn `z` and `s` cancel exactly, leaving the scaled density of the constrained
    # `mu` and of the observed minibatch. Subtracting the unscaled density of the drawn
    # sites would leave (N/m - 1) Σ log p(z_i | mu) + 2 log p(s) in it. (Before, the
    # weight was the difference of two sums of order 1e6, off by up to 0.1 in float32.)
    model = px.gen.NumPyroModel(scaled_model)
    mu = 0.4

    def program(key):
        def run():
            trace, weight = model.generate({"mu": jnp.asarray(mu)}, {}, DATA)
            indices = trace.choices["n"].astype(jnp.float32)  # an expectation returns floats
            return weight, trace.log_density, indices, trace.choices["z"], trace.choices["s"]

        return px.expectation(run)(key)

    weights, log_densities, indices, zs, ss = many(program, num=4)
    data = np.asarray(DATA, np.float64)

    def log_normal(v, m, sd):
        return -0.5 * math.log(2 * math.pi) - math.log(sd) - 0.5 * ((v - m) / sd) ** 2

    scale = N / SUBSAMPLE
    for weight, log_density, idx, z, s in zip(weights, log_densities, indices, zs, ss):
        idx = np.asarray(idx).astype(np.int64)
        z, s = np.asarray(z, np.float64), np.asarray(s, np.float64)
        by_hand = log_normal(mu, 0.0, 1.0) + scale * np.sum(log_normal(data[idx], z, 1.0))
        drawn = (scale * np.sum(log_normal(z, mu, 1e-3))
                 + 3.0 * np.sum(log_normal(s, 0.0, 1e-4)))
        np.testing.assert_allclose(float(weight), by_hand, rtol=0, atol=1e-3)
        np.testing.assert_allclose(float(log_density), by_hand + drawn, rtol=1e-5)

    # ... so that the weight is unbiased for the full-data log likelihood given mu
    minibatch = px.gen.NumPyroModel(minibatch_model)
    weights = many(lambda key: px.expectation(lambda: minibatch.generate(
        {"mu": jnp.asarray(mu)}, {}, DATA)[1])(key), num=NUM)
    full = log_normal(mu, 0.0, 1.0) + np.sum(
        -0.5 * math.log(2 * math.pi) - 0.5 * ((data - mu) ** 2 + 1e-6))
    assert_unbiased(weights, full, what="generate weight")
