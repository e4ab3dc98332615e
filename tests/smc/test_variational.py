"""`px.smc.SMC`: a particle filter as a generative function, checked against Kalman.

Exact references are computed without ppl_ext (tests/smc/kalman.py, float64 NumPy): the
marginal likelihood p(y) and, by central differences of it, its derivative in the
transition coefficient. The key identity: `E[Ẑ] = p(y)` for every proposal, so the exact
gradient of `E[Ẑ]` with respect to the proposal's parameters is 0 — what an unbiased
resampling gradient must reproduce and a dropped score term does not. K_SE = 4.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from ppl_ext.smc import SMC, StateSpaceModel
from tests.helpers import K_SE, assert_unbiased, many
from tests.smc.kalman import kalman

SIGMA_X, SIGMA_Y, SIGMA_0 = 1.0, 0.5, 1.0
OBSERVATIONS = jnp.array([0.4, -0.6, 1.1])
NUM_PARTICLES = 3


def _proposal(p, x, t, y, u):
    return dist.Normal(p["a"] * p["rho"] * x + p["b"] * y, p["s"])


def _initial_proposal(p, y, u):
    return dist.Normal(p["b0"] * y, p["s0"])


MODEL = StateSpaceModel(
    initial=lambda p, u: dist.Normal(0.0, SIGMA_0),
    transition=lambda p, x, t, u: dist.Normal(p["rho"] * x, SIGMA_X),
    observation=lambda p, x, t, u: dist.Normal(x, SIGMA_Y),
    proposal=_proposal, initial_proposal=_initial_proposal)
# a deliberately poor proposal (weights vary a lot, so resampling matters)
PARAMS = {"rho": jnp.asarray(0.7), "a": jnp.asarray(0.5), "b": jnp.asarray(0.3),
          "s": jnp.asarray(1.3), "b0": jnp.asarray(0.2), "s0": jnp.asarray(1.2)}
PROPOSAL_PARAMS = ("a", "b", "s", "b0", "s0")


def _kalman(rho, observations=OBSERVATIONS):
    matrices = {"m0": np.zeros(1), "P0": np.array([[SIGMA_0**2]]), "A": np.array([[rho]]),
                "Q": np.array([[SIGMA_X**2]]), "H": np.array([[1.0]]),
                "R": np.array([[SIGMA_Y**2]])}
    return kalman(matrices, np.asarray(observations, np.float64).reshape(-1, 1))


def _log_evidence(rho):
    return float(_kalman(rho)["log_likelihoods"][-1])  # cumulative


def test_evidence_is_unbiased_in_z():
    smc = SMC(MODEL, NUM_PARTICLES)
    f = px.expectation(lambda p, y: smc.simulate(p, y).retval.log_evidence)
    log_z = _log_evidence(0.7)
    ratios = many(lambda k: jnp.exp(f.estimate(k, PARAMS, OBSERVATIONS) - log_z), num=40_000)
    assert_unbiased(ratios, 1.0, what="E[Z_hat] / p(y)")


def _evidence_ratio_grads(resampling_gradient, num, seed=0):
    smc = SMC(MODEL, NUM_PARTICLES, resampling_gradient)
    log_z = _log_evidence(0.7)

    @px.expectation
    def ratio(p, y):  # E[Z_hat] / p_0(y): its gradient is grad p(y) / p_0(y)
        return jnp.exp(smc.simulate(p, y).retval.log_evidence - log_z)

    return many(lambda k: ratio.grad(k, PARAMS, OBSERVATIONS), num=num, seed=seed)


def test_the_gradient_through_resampling_is_unbiased():
    grads = _evidence_ratio_grads("score", 60_000)
    # d/d rho of p(y) / p(y) = d log p(y) / d rho, by central differences of Kalman
    h = 1e-5
    exact_rho = (_log_evidence(0.7 + h) - _log_evidence(0.7 - h)) / (2 * h)
    assert abs(exact_rho) > 0.1  # the test is not about a zero only
    assert_unbiased(grads["rho"], exact_rho, what="d/d rho of E[Z_hat]")
    for name in PROPOSAL_PARAMS:  # E[Z_hat] = p(y) does not depend on the proposal
        assert_unbiased(grads[name], 0.0, what=f"d/d {name} of E[Z_hat]")


def test_dropping_the_resampling_terms_is_biased():
    # the documented FIVO-style option: its proposal gradient of E[Z_hat] is not 0
    grads = _evidence_ratio_grads("none", 60_000)
    deviations = []
    for name in PROPOSAL_PARAMS:
        g = np.asarray(grads[name], np.float64)
        deviations.append(abs(g.mean()) / (g.std() / math.sqrt(g.size)))
    assert max(deviations) > 3 * K_SE, deviations


def test_selected_trajectory_is_properly_weighted():
    # E[Z_hat h(x)] = p(y) E[h(x) | y]: the returned trajectory weighted by Z_hat / p(y)
    smc = SMC(MODEL, NUM_PARTICLES)
    log_z = _log_evidence(0.7)
    smoothed = _kalman(0.7)["smoothed_means"][:, 0]

    @px.expectation
    def weighted(p, y):
        retval = smc.simulate(p, y).retval
        return jnp.exp(retval.log_evidence - log_z) * retval.trajectory

    draws = many(lambda k: weighted.estimate(k, PARAMS, OBSERVATIONS), num=60_000)
    assert_unbiased(draws, smoothed, what="E[Z_hat x_t] / p(y) = E[x_t | y]")


def test_log_density_is_log_joint_minus_log_evidence_and_assess_with_one_particle():
    smc = SMC(MODEL, NUM_PARTICLES)
    trace = px.expectation(lambda p, y: smc.simulate(p, y)).estimate(jax.random.key(3), PARAMS,
                                                                    OBSERVATIONS)
    assert np.isclose(trace.log_density, trace.retval.log_joint - trace.retval.log_evidence,
                      atol=1e-5)
    x = trace.choices["x"]
    # with one particle there is no resampling: Z_hat_x = p(x, y) / q(x) and assess = log q(x)
    single = SMC(MODEL, 1)
    assessed = px.expectation(lambda p, y: single.assess({"x": x}, p, y)).estimate(
        jax.random.key(4), PARAMS, OBSERVATIONS)
    log_q = _initial_proposal(PARAMS, OBSERVATIONS[0], None).log_prob(x[0])
    for t in range(1, 3):
        log_q += _proposal(PARAMS, x[t - 1], t, OBSERVATIONS[t], None).log_prob(x[t])
    assert np.isclose(assessed, log_q, atol=1e-4)


def test_bootstrap_filter_without_a_proposal():
    bootstrap = StateSpaceModel(MODEL.initial, MODEL.transition, MODEL.observation)
    smc = SMC(bootstrap, 4)
    f = px.expectation(lambda p, y: smc.simulate(p, y).retval.log_evidence)
    ratios = many(lambda k: jnp.exp(f.estimate(k, {"rho": jnp.asarray(0.7)}, OBSERVATIONS)
                                    - _log_evidence(0.7)), num=40_000)
    assert_unbiased(ratios, 1.0, what="bootstrap E[Z_hat] / p(y)")


def test_bad_input():
    with pytest.raises(ValueError, match="num_particles"):
        SMC(MODEL, 0)
    with pytest.raises(ValueError, match="resampling_gradient"):
        SMC(MODEL, 4, "scores")
    with pytest.raises(TypeError, match="StateSpaceModel"):
        SMC(lambda x: x, 4)
    smc = SMC(MODEL, 4)
    run = px.expectation(lambda p, y: smc.simulate(p, y).retval.log_evidence)
    with pytest.raises(ValueError, match="empty"):
        run.estimate(jax.random.key(0), PARAMS, jnp.zeros((0,)))
    assess = px.expectation(lambda p, x, y: smc.assess({"x": x}, p, y))
    with pytest.raises(ValueError, match="time steps"):
        assess.estimate(jax.random.key(0), PARAMS, jnp.zeros(2), OBSERVATIONS)
    with pytest.raises(ValueError, match="choices"):
        smc.assess({"z": jnp.zeros(3)}, PARAMS, OBSERVATIONS)
