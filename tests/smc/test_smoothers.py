"""Smoothers (genealogy tracing, FFBS) against the RTS smoother (NumPy, `kalman.py`).

As in `test_filter.py`, the checks use exact identities of the unnormalised estimates:
`E[(Ẑ/Z) Σ_i W_T^i φ(path^i)] = E[φ(x_{0:T-1}) | y]` for genealogy tracing (any unbiased
resampling), and `E[(Ẑ/Z) mean_m φ(trajectory^m)] = E[φ | y]` for FFBS with multinomial
resampling (the backward-sampled path has the smoothing law under the particle-Gibbs
extended target, Andrieu, Doucet and Holenstein 2010, Whiteley 2010), over 10^4
independent runs, k = K_SE = 4. Each is checked centred, as `E[(Ẑ/Z)(φ̂ - E[φ | y])] = 0`
(a control variate: `E[Ẑ/Z] = 1`), which removes the spread of `Ẑ/Z` times `E[φ | y]`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext.smc as smc
from models import ssm
from tests.helpers import assert_unbiased, many
from tests.smc.kalman import kalman, lg1_matrices

NUM_TIMES = 5
LG1 = ssm.linear_gaussian_1d
PARAMS = {**ssm.LINEAR_GAUSSIAN_1D_PARAMS, "sigma_y": jnp.asarray(0.5)}
_, YS = ssm.generate_data(LG1, PARAMS, NUM_TIMES, seed=3)
TRUTH = kalman(lg1_matrices(PARAMS), YS)
SMOOTHED = TRUTH["smoothed_means"][:, 0]
#: E[Σ_t x_t x_{t+1} | y], the additive functional of the issue
CROSS_SUM = float(np.sum(TRUTH["smoothed_cross"][:, 0, 0]
                         + TRUTH["smoothed_means"][:-1, 0] * TRUTH["smoothed_means"][1:, 0]))


def additive(paths):
    """`Σ_t x_t x_{t+1}` of `(..., T)` paths."""
    return jnp.sum(paths[..., :-1] * paths[..., 1:], axis=-1)


def log_bound(params, t, inputs):
    """`max f = 1 / (sqrt(2π) σ_X)` for the Gaussian transition."""
    return -0.5 * math.log(2 * math.pi) - jnp.log(params["sigma_x"])


@pytest.mark.parametrize("hybrid", [False, True], ids=["exact", "hybrid"])
def test_ffbs_smoothed_moments_are_unbiased(hybrid):
    extra = dict(log_transition_bound=log_bound, num_proposals=2) if hybrid else {}

    def run(key):
        key_filter, key_back = jax.random.split(key)
        result = smc.filter(key_filter, LG1, PARAMS, YS, num_particles=32,
                            resampling="multinomial")
        ratio = jnp.exp(result.log_likelihood - TRUTH["log_likelihoods"][-1])
        paths = smc.ffbs(key_back, LG1, PARAMS, result, num_samples=32, **extra)
        return ratio * (paths.mean(0) - SMOOTHED), ratio * (additive(paths).mean() - CROSS_SUM)

    means, cross = many(run, seed=31 + hybrid)
    what = "hybrid FFBS" if hybrid else "FFBS"
    assert_unbiased(means, 0.0, what=f"{what}: smoothed means")
    assert_unbiased(cross, 0.0, what=f"{what}: Σ x_t x_{{t+1}}")


def test_genealogy_smoothed_moments_are_unbiased():
    def run(key):
        result = smc.filter(key, LG1, PARAMS, YS, num_particles=32, ess_threshold=0.5)
        ratio = jnp.exp(result.log_likelihood - TRUTH["log_likelihoods"][-1])
        paths, log_weights = smc.genealogy(result)
        weights = jnp.exp(log_weights)
        return (ratio * (weights @ paths - SMOOTHED),
                ratio * (weights @ additive(paths) - CROSS_SUM))

    means, cross = many(run, seed=32)
    assert_unbiased(means, 0.0, what="genealogy: smoothed means")
    assert_unbiased(cross, 0.0, what="genealogy: Σ x_t x_{t+1}")


def test_genealogy_paths_follow_the_ancestors():
    result = smc.filter(jax.random.key(0), LG1, PARAMS, YS, num_particles=8)
    paths, log_weights = smc.genealogy(result)
    particles, ancestors = np.asarray(result.particles), np.asarray(result.ancestors)
    np.testing.assert_array_equal(paths[:, -1], particles[-1])
    np.testing.assert_array_equal(log_weights, result.log_weights[-1])
    for i in range(8):
        index = i
        for t in range(NUM_TIMES - 1, -1, -1):
            assert paths[i, t] == particles[t, index]
            index = ancestors[t, index]


def test_ffbs_on_a_multivariate_model_and_one_time_step():
    params = ssm.linear_gaussian_params(3, 2)
    _, ys = ssm.generate_data(ssm.linear_gaussian, params, 6, seed=1)
    result = smc.filter(jax.random.key(0), ssm.linear_gaussian, params, ys, num_particles=32)
    assert smc.ffbs(jax.random.key(1), ssm.linear_gaussian, params, result, 5).shape == (5, 6, 3)
    single = smc.filter(jax.random.key(0), LG1, PARAMS, YS[:1], num_particles=8)
    draws = smc.ffbs(jax.random.key(1), LG1, PARAMS, single, 3)
    assert draws.shape == (3, 1)
    assert set(np.asarray(draws[:, 0]).tolist()) <= set(np.asarray(single.particles[0]).tolist())


def test_smoothers_need_stored_particles():
    result = smc.filter(jax.random.key(0), LG1, PARAMS, YS, num_particles=8,
                        store_particles=False)
    with pytest.raises(ValueError, match="store_particles=True"):
        smc.ffbs(jax.random.key(1), LG1, PARAMS, result, 4)
    with pytest.raises(ValueError, match="store_particles=True"):
        smc.genealogy(result)
    full = smc.filter(jax.random.key(0), LG1, PARAMS, YS, num_particles=8)
    with pytest.raises(ValueError, match="num_samples"):
        smc.ffbs(jax.random.key(1), LG1, PARAMS, full, 0)
    with pytest.raises(ValueError, match="time steps"):
        smc.ffbs(jax.random.key(1), LG1, PARAMS, full, 4, inputs=jnp.zeros(2))
