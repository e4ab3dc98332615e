"""PaRIS against the RTS smoother, and its backward draws against their exact law.

As in `test_smoothers.py`: with multinomial resampling, given all the particles the
PaRIS statistic averages to the FFBS(m) smoother, so `E[(Ẑ/Z)(Σ_i W^i τ^i - E[S | y])] = 0`
exactly for any `Ñ` (10^4 runs, k = K_SE = 4). The accept-reject backward draws with
exact fallback are checked draw by draw against the backward kernel's probabilities.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext.smc as smc
from models import ssm
from ppl_ext.smc._backward import backward_indices
from tests.helpers import assert_unbiased, many
from tests.smc.kalman import kalman, lg1_matrices

NUM_TIMES = 5
LG1 = ssm.linear_gaussian_1d
PARAMS = {**ssm.LINEAR_GAUSSIAN_1D_PARAMS, "sigma_y": jnp.asarray(0.5)}
_, YS = ssm.generate_data(LG1, PARAMS, NUM_TIMES, seed=3)
TRUTH = kalman(lg1_matrices(PARAMS), YS)
MEANS, COVS, CROSS = (TRUTH["smoothed_means"][:, 0], TRUTH["smoothed_covs"][:, 0, 0],
                      TRUTH["smoothed_cross"][:, 0, 0])
#: E[Σ_t x_t | y] and E[Σ_t x_{t-1} x_t | y]
EXACT = np.array([MEANS.sum(), np.sum(CROSS + MEANS[:-1] * MEANS[1:])])


def additive(x_prev, x, t, inputs):
    return jnp.stack([x, x_prev * x])


def initial_additive(x, inputs):
    return jnp.stack([x, jnp.zeros_like(x)])


def log_bound(params, t, inputs):
    """`max f = 1 / (sqrt(2π) σ_X)` for the Gaussian transition."""
    return -0.5 * math.log(2 * math.pi) - jnp.log(params["sigma_x"])


@pytest.mark.parametrize("bounded", [False, True], ids=["exact", "accept-reject"])
def test_paris_additive_functionals_are_unbiased(bounded):
    extra = dict(log_transition_bound=log_bound, num_proposals=2) if bounded else {}

    def run(key):
        result = smc.paris(key, LG1, PARAMS, YS, additive, initial_additive=initial_additive,
                           num_particles=32, resampling="multinomial", **extra)
        ratio = jnp.exp(result.log_likelihood - TRUTH["log_likelihoods"][-1])
        return ratio * (result.estimate - EXACT), result.acceptance_rate

    centred, acceptance = many(run, seed=41)
    assert_unbiased(centred, np.zeros(2), what=f"PaRIS ({'bounded' if bounded else 'exact'})")
    if bounded:
        assert 0.2 < float(np.mean(acceptance[:, 1:])) < 1.0
    else:
        assert np.all(acceptance == 1.0)


def test_paris_converges_on_a_long_series_and_matches_online_estimates():
    """N = 2000, T = 50, accept-reject draws: every smoothed mean close to RTS's.

    `h_t(x_{t-1}, x_t) = x_t e_t` (a one-hot vector over time) makes the additive
    functional the vector of all the smoothed means. A sanity check (no statistical
    budget used): the Monte-Carlo error of each is about 0.03 here.
    """
    num_times = 50
    _, ys = ssm.generate_data(LG1, PARAMS, num_times, seed=9)
    truth = kalman(lg1_matrices(PARAMS), ys)
    one_hot = lambda t, x: jax.nn.one_hot(t, num_times, dtype=x.dtype) * x
    result = smc.paris(jax.random.key(0), LG1, PARAMS, ys, lambda xp, x, t, u: one_hot(t, x),
                       initial_additive=lambda x, u: one_hot(0, x), num_particles=2000,
                       log_transition_bound=log_bound)
    assert result.estimate.shape == (num_times,)
    assert np.max(np.abs(np.asarray(result.estimate) - truth["smoothed_means"][:, 0])) < 0.15
    # the online estimate after step t holds the filtering mean of x_t in coordinate t
    online = np.diagonal(np.asarray(result.estimates))
    assert np.max(np.abs(online - truth["filtered_means"][:, 0])) < 0.15
    np.testing.assert_array_equal(result.estimates[-1], result.estimate)
    assert 0.5 < float(np.mean(result.acceptance_rate)) <= 1.0


def test_paris_memory_does_not_grow_with_the_series():
    def temp_bytes(num_times):
        ys = jnp.zeros(num_times)
        kernel = smc.Paris(smc.BootstrapFilter(LG1, 256), additive)
        run = jax.jit(lambda key, ys: smc.run_paris(key, kernel, PARAMS, ys).estimate)
        return run.lower(jax.random.key(0), ys).compile().memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(20), temp_bytes(2000)
    assert long < short + 2000 * 64  # per-step outputs only, not 2000 × 256 particles


def _draw_frequencies(previous, log_weights, current, configs, seed):
    """Per `num_proposals` in `configs` (None: exact draws), over `NUM_ESTIMATES` keys: the
    frequencies of the 4 backward indices drawn per current particle, and the acceptance."""
    t = jnp.asarray(1, jnp.int32)

    def counts(key):
        out = []
        for k, num_proposals in zip(jax.random.split(key, len(configs)), configs):
            bound = None if num_proposals is None else log_bound(PARAMS, t, None)
            indices, acceptance = backward_indices(k, LG1, PARAMS, previous, log_weights,
                                                   current, t, None, 4, bound,
                                                   num_proposals or 1)
            out.append((jax.nn.one_hot(indices, previous.shape[0]).mean(1), acceptance))
        return out

    return many(counts, seed=seed)


def _backward_kernel(previous, weights, current):
    """The exact law of J given x_t: `W^j f(x_t | x^j) / Σ`, (current, previous), NumPy."""
    rho, sx = float(PARAMS["rho"]), float(PARAMS["sigma_x"])
    log_f = -0.5 * ((np.asarray(current)[:, None] - rho * np.asarray(previous)[None]) / sx) ** 2
    probs = np.asarray(weights)[None] * np.exp(log_f)
    return probs / probs.sum(1, keepdims=True)


def test_backward_draws_have_the_exact_law():
    """P(J = j | x_t^i) = W_{t-1}^j f(x_t^i | x_{t-1}^j) / Σ, for every i and j.

    Exact draws, and accept-reject with 1 and 3 rounds (with 12 draws the exact fallback
    works in chunks of 8: one round often leaves more than 8 draws to it, two chunks,
    and three rounds fewer, one chunk: both paths run).
    """
    previous = jnp.array([-1.0, -0.3, 0.0, 0.4, 1.1, 2.0])
    log_weights = jnp.log(jnp.array([0.1, 0.25, 0.05, 0.2, 0.3, 0.1]))
    current = jnp.array([0.2, -1.5, 1.8])
    configs = [None, 1, 3]
    draws = _draw_frequencies(previous, log_weights, current, configs, seed=42)
    probs = _backward_kernel(previous, np.exp(np.asarray(log_weights)), current)
    for num_proposals, (frequencies, acceptance) in zip(configs, draws):
        assert_unbiased(frequencies, probs, what=f"backward draws ({num_proposals} rounds)")
    acceptance_one, acceptance_three = np.asarray(draws[1][1]), np.asarray(draws[2][1])
    assert np.mean(acceptance_one < 4 / 12) > 0.01  # > 8 of 12 draws failed: two chunks
    assert 0.0 < np.mean(acceptance_three < 1.0)  # some failed: the fallback ran


def test_blocked_exact_draws_have_the_exact_law():
    """The two-level inverse CDF (blocks of 8 columns) over 37 particles: 5 blocks, the
    last padded, one block and a few particles (the last one too) of weight 0, which are
    never drawn; exact draws, the exact fallback after one accept-reject round, and six
    rounds (the later ones in iterations of up to three, the last one cut short)."""
    rng = np.random.default_rng(7)
    previous = jnp.asarray(rng.normal(0.0, 1.5, 37), jnp.float32)
    weights = rng.uniform(0.2, 1.0, 37)
    weights[[3, 16, 17, 18, 19, 20, 21, 22, 23, 30, 36]] = 0.0  # block 2 (16-23) is empty
    log_weights = jnp.log(jnp.asarray(weights / weights.sum(), jnp.float32))
    current = jnp.array([0.2, -1.5, 2.5])
    configs = [None, 1, 6]
    draws = _draw_frequencies(previous, log_weights, current, configs, seed=11)
    probs = _backward_kernel(previous, weights, current)
    for num_proposals, (frequencies, _) in zip(configs, draws):
        frequencies = np.asarray(frequencies)
        assert np.all(frequencies[:, :, weights == 0] == 0)
        assert_unbiased(frequencies[:, :, weights > 0], probs[:, weights > 0],
                        what=f"blocked backward draws ({num_proposals} rounds)")


def test_backward_draws_with_many_particles_have_the_exact_law():
    """The large-N paths: 3,000 previous particles (the proposals' index search, above
    `_COUNT_MAX`) and 2 × 2,048 draws a call (the pending draws' small second buffer,
    from `_SMALL_BUFFER_MIN_DRAWS`). The per-particle means of `x_{t-1}^J` and its square
    over the draws, for accept-reject with 6 rounds, against the exact backward kernel."""
    from ppl_ext.smc import _backward

    num_prev, num_samples = 3000, 2048
    assert num_prev > _backward._COUNT_MAX
    assert 2 * num_samples >= _backward._SMALL_BUFFER_MIN_DRAWS
    rng = np.random.default_rng(3)
    previous = rng.normal(0.0, 1.5, num_prev)
    weights = rng.uniform(0.1, 1.0, num_prev)
    log_weights = jnp.log(jnp.asarray(weights / weights.sum(), jnp.float32))
    current = jnp.array([0.2, -1.5])
    t = jnp.asarray(1, jnp.int32)
    previous_jnp = jnp.asarray(previous, jnp.float32)

    def moments(key):
        indices, _ = backward_indices(key, LG1, PARAMS, previous_jnp, log_weights, current, t,
                                      None, num_samples, log_bound(PARAMS, t, None), 6)
        x = previous_jnp[indices]  # (2, num_samples)
        return jnp.stack([x.mean(1), (x**2).mean(1)], axis=1)  # (2, 2)

    draws = many(moments, num=400, seed=5)
    probs = _backward_kernel(previous, weights, current)
    exact = np.stack([probs @ previous, probs @ previous**2], axis=1)
    assert_unbiased(draws, exact, what="backward draws, N = 3000, 2 x 2048 draws")


def test_paris_bad_inputs():
    with pytest.raises(ValueError, match="at least 1"):
        smc.Paris(smc.BootstrapFilter(LG1, 8), additive, num_backward_samples=0)
    with pytest.raises(TypeError, match="particle filter"):
        smc.Paris(LG1, additive)
    with pytest.raises(ValueError, match="did you mean 'auxiliary'"):
        smc.paris(jax.random.key(0), LG1, PARAMS, YS, additive, method="auxilary")
    with pytest.raises(ValueError, match="empty"):
        smc.paris(jax.random.key(0), LG1, PARAMS, jnp.zeros(0), additive)
