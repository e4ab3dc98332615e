"""PaRIS particle Gibbs against Kalman smoothing, and a conjugate particle-Gibbs chain.

Ground truth is computed without ppl_ext: the RTS smoother of `kalman.py` for
`E[Σ_t x_t | y]` and `E[Σ_t x_{t-1} x_t | y]`, Kalman backward sampling (written below in
NumPy) for exact draws of the smoothing law, and 1-D quadrature of prior × Kalman marginal
likelihood for a parameter's posterior mean. Means of 10^4 independent estimates (or of
independent chains' means) must lie within K_SE = 4 standard errors of the exact values.

- Few particles (N = 8), where PaRIS's self-normalisation bias is many standard errors:
  PPG's roll-out estimate matches the RTS values, and PaRIS at the same N is shown off.
- One sweep from an exact smoothing draw (N = 4) keeps the law (the new reference's
  moments) and its estimate is unbiased; the same sweep from a fixed trajectory is not.
- Gibbs on (x, σ_Y²) with an inverse-gamma prior: conditional-SMC moves of x and
  exact conjugate draws of σ_Y²; the chains' mean of σ_Y² matches the exact posterior mean.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext.smc as smc
from models import ssm
from ppl_ext.adev._errors import UnsupportedEstimatorError
from tests.helpers import NUM_ESTIMATES, assert_unbiased, many, mean_and_se
from tests.smc.kalman import kalman, lg1_matrices

K_SE = 4
LG1 = ssm.linear_gaussian_1d
PARAMS = {**ssm.LINEAR_GAUSSIAN_1D_PARAMS, "sigma_y": jnp.asarray(1.0)}
NUM_TIMES = 6
_, YS = ssm.generate_data(LG1, PARAMS, NUM_TIMES, seed=5)


def exact_functionals(params, ys):
    """`(E[Σ_t x_t | y], E[Σ_t x_{t-1} x_t | y])` from the RTS smoother (float64)."""
    truth = kalman(lg1_matrices(params), ys)
    means, cross = truth["smoothed_means"][:, 0], truth["smoothed_cross"][:, 0, 0]
    return np.array([means.sum(), np.sum(cross + means[:-1] * means[1:])])


EXACT = exact_functionals(PARAMS, YS)


def additive(x_prev, x, t, inputs):
    return jnp.stack([x, x_prev * x])


def initial_additive(x, inputs):
    return jnp.stack([x, jnp.zeros_like(x)])


def kalman_backward_samples(params, ys, num_samples, seed):
    """Exact draws of `p(x_{0:T-1} | y)`: Kalman filter, then backward sampling (NumPy)."""
    rho, sx = float(params["rho"]), float(params["sigma_x"])
    truth = kalman(lg1_matrices(params), ys)
    means, variances = truth["filtered_means"][:, 0], truth["filtered_covs"][:, 0, 0]
    rng = np.random.default_rng(seed)
    num_times = len(ys)
    paths = np.zeros((num_samples, num_times))
    paths[:, -1] = means[-1] + np.sqrt(variances[-1]) * rng.standard_normal(num_samples)
    for t in range(num_times - 2, -1, -1):
        # x_t | x_{t+1}, y_{0:t}: condition N(m_t, P_t) on x_{t+1} = ρ x_t + σ_X ε
        gain = variances[t] * rho / (rho**2 * variances[t] + sx**2)
        mean = means[t] + gain * (paths[:, t + 1] - rho * means[t])
        variance = variances[t] - gain * rho * variances[t]
        paths[:, t] = mean + np.sqrt(variance) * rng.standard_normal(num_samples)
    return paths


def test_kalman_backward_samples_have_the_rts_moments():
    """The test's own exact sampler against the RTS smoother (so a bug in it shows)."""
    paths = kalman_backward_samples(PARAMS, YS, 200_000, seed=0)
    truth = kalman(lg1_matrices(PARAMS), YS)
    np.testing.assert_allclose(paths.mean(0), truth["smoothed_means"][:, 0], atol=0.02)
    np.testing.assert_allclose(paths.var(0), truth["smoothed_covs"][:, 0, 0], rtol=0.02)
    centred = paths - paths.mean(0)
    cross = np.mean(centred[:, :-1] * centred[:, 1:], 0)
    np.testing.assert_allclose(cross, truth["smoothed_cross"][:, 0, 0], atol=0.02)


def test_ppg_is_unbiased_where_paris_is_not():
    """N = 8 particles, 10 sweeps, 3 of burn-in: PPG within K_SE of RTS; PaRIS far off."""
    num_particles = 8

    def run_ppg(key):
        return smc.ppg(key, LG1, PARAMS, YS, additive, initial_additive=initial_additive,
                       num_particles=num_particles, num_sweeps=10, num_burnin=3).estimate

    def run_paris(key):
        return smc.paris(key, LG1, PARAMS, YS, additive, initial_additive=initial_additive,
                         num_particles=num_particles).estimate

    estimates = np.asarray(many(run_ppg, seed=21), np.float64)
    assert_unbiased(estimates, EXACT, k=K_SE, what="PPG roll-out estimate")
    paris_estimates = np.asarray(many(run_paris, seed=22), np.float64)
    mean, se = mean_and_se(paris_estimates)
    # the same comparison would fail for PaRIS: its O(1/N) bias is many standard errors
    assert np.all(np.abs(mean - EXACT) > 3 * K_SE * se), (mean, EXACT, se)


def test_one_sweep_from_the_smoothing_law_keeps_it_and_is_unbiased():
    """N = 4: the new reference has the exact moments, and the sweep's estimate is unbiased.

    From a fixed trajectory (the smoothed means, not a draw of the law) the same sweep's
    estimate is biased: the unbiasedness comes from the reference's law.
    """
    kernel = smc.ParisParticleGibbs(LG1, additive, initial_additive, num_particles=4)
    starts = jnp.asarray(kalman_backward_samples(PARAMS, YS, NUM_ESTIMATES, seed=7),
                         jnp.float32)

    def sweep(key, start):
        state, info = kernel.step(key, smc.PPGState(start), PARAMS, YS)
        return state.trajectory, info.estimate

    keys = jax.random.split(jax.random.key(31), NUM_ESTIMATES)
    sweeps = jax.jit(jax.vmap(sweep))
    paths, estimates = sweeps(keys, starts)
    paths = np.asarray(paths, np.float64)
    truth = kalman(lg1_matrices(PARAMS), YS)
    means, variances = truth["smoothed_means"][:, 0], truth["smoothed_covs"][:, 0, 0]
    assert_unbiased(paths, means, k=K_SE, what="new reference, E[x_t]")
    assert_unbiased(paths**2, variances + means**2, k=K_SE, what="new reference, E[x_t²]")
    assert_unbiased(np.asarray(estimates, np.float64), EXACT, k=K_SE,
                    what="one sweep's estimate from the smoothing law")

    fixed = jnp.broadcast_to(jnp.asarray(means, jnp.float32), starts.shape)
    _, biased = sweeps(keys, fixed)
    mean, se = mean_and_se(np.asarray(biased, np.float64))
    assert np.any(np.abs(mean - EXACT) > 2 * K_SE * se), (mean, EXACT, se)


def test_ppg_shapes_pytrees_and_a_single_time_step():
    # a pytree functional, and accept-reject backward draws (f <= 1/sqrt(2π))
    result = smc.ppg(jax.random.key(0), LG1, PARAMS, YS,
                     lambda xp, x, t, u: {"sum": x, "cross": xp * x},
                     num_particles=5, num_sweeps=3, num_burnin=1,
                     log_transition_bound=lambda p, t, u: -0.5 * jnp.log(2 * jnp.pi),
                     num_proposals=2)
    assert result.estimates["sum"].shape == (3,) and result.estimate["cross"].shape == ()
    np.testing.assert_allclose(result.estimate["sum"], np.mean(result.estimates["sum"][1:]),
                               rtol=1e-6)
    assert result.trajectory.shape == (NUM_TIMES,)
    assert result.log_likelihood.shape == (3,) and result.fraction_changed.shape == (3,)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(result))
    # T = 1: h_0 only, the weighted mean of x_0 given y_0
    one = smc.ppg(jax.random.key(1), LG1, PARAMS, YS[:1], additive,
                  initial_additive=initial_additive, num_particles=4, num_sweeps=2,
                  num_burnin=0)
    assert one.estimate.shape == (2,) and one.trajectory.shape == (1,)
    assert float(one.estimate[1]) == 0.0


def test_ppg_bad_inputs():
    key = jax.random.key(0)
    common = dict(num_particles=4)
    with pytest.raises(ValueError, match=r"num_burnin \(5\) must be below num_sweeps \(5\)"):
        smc.ppg(key, LG1, PARAMS, YS, additive, num_sweeps=5, num_burnin=5, **common)
    with pytest.raises(ValueError, match="num_particles must be at least 2"):
        smc.ppg(key, LG1, PARAMS, YS, additive, num_particles=1)
    with pytest.raises(ValueError, match="num_sweeps must be at least 1"):
        smc.ppg(key, LG1, PARAMS, YS, additive, num_sweeps=0, num_burnin=0, **common)
    with pytest.raises(ValueError, match="num_burnin must be at least 0"):
        smc.ppg(key, LG1, PARAMS, YS, additive, num_burnin=-1, **common)
    with pytest.raises(TypeError, match="num_sweeps must be an int"):
        smc.ppg(key, LG1, PARAMS, YS, additive, num_sweeps=2.0, **common)
    with pytest.raises(ValueError, match="num_backward_samples must be at least 1"):
        smc.ppg(key, LG1, PARAMS, YS, additive, num_backward_samples=0, **common)
    with pytest.raises(ValueError, match=r"one time step of the observations has shape \(2,\)"):
        smc.ppg(key, LG1, PARAMS, jnp.zeros((NUM_TIMES, 2)), additive, num_sweeps=2,
                num_burnin=0, **common)
    with pytest.raises(ValueError, match="empty"):
        smc.ppg(key, LG1, PARAMS, jnp.zeros(0), additive, **common)
    with pytest.raises(ValueError, match="initial_trajectory's leaves need a leading time"):
        smc.ppg(key, LG1, PARAMS, YS, additive, initial_trajectory=jnp.zeros(3), **common)
    with pytest.raises(ValueError, match="inputs have 3 time steps"):
        smc.ppg(key, LG1, PARAMS, YS, additive, inputs=jnp.zeros(3), **common)
    with pytest.raises(TypeError, match="additive must be a callable"):
        smc.ParisParticleGibbs(LG1, None)
    with pytest.raises(TypeError, match="model must be a px.smc.StateSpaceModel"):
        smc.ParisParticleGibbs("lg1", additive)
    kernel = smc.ParisParticleGibbs(LG1, additive, num_particles=4)
    with pytest.raises(ValueError, match="reference trajectory's leaves"):
        kernel.step(key, smc.PPGState(jnp.zeros(NUM_TIMES + 1)), PARAMS, YS)


def test_ppg_refuses_derivatives():
    def estimate(rho):  # from a given reference: the sweeps' own refusal
        params = {**PARAMS, "rho": rho}
        return smc.ppg(jax.random.key(0), LG1, params, YS, additive, num_particles=4,
                       num_sweeps=2, num_burnin=0, initial_trajectory=YS).estimate[0]

    with pytest.raises(UnsupportedEstimatorError, match="ParisParticleGibbs.step"):
        jax.grad(estimate)(jnp.asarray(0.9))


# --------------------------------------------------- Gibbs on (x, σ_Y²), conjugate prior

PRIOR_SHAPE, PRIOR_SCALE = 3.0, 2.0  # σ_Y² ~ InverseGamma(3, 2): prior mean 1
GIBBS_TIMES = 20
_, GIBBS_YS = ssm.generate_data(LG1, PARAMS, GIBBS_TIMES, seed=12)


def exact_posterior_mean_of_variance(ys):
    """`E[σ_Y² | y]` by quadrature of InverseGamma prior × Kalman likelihood (NumPy)."""
    log_v = np.linspace(np.log(1e-3), np.log(50.0), 801)
    v = np.exp(log_v)
    log_prior = (PRIOR_SHAPE * np.log(PRIOR_SCALE) - math.lgamma(PRIOR_SHAPE)
                 - (PRIOR_SHAPE + 1) * log_v - PRIOR_SCALE / v)
    log_likelihood = np.array([kalman(lg1_matrices({**PARAMS, "sigma_y": np.sqrt(s)}), ys)[
        "log_likelihoods"][-1] for s in v])
    log_density = log_prior + log_likelihood + log_v  # dv = v d(log v)
    weights = np.exp(log_density - log_density.max())
    return np.trapezoid(weights * v, log_v) / np.trapezoid(weights, log_v)


def test_gibbs_with_conjugate_variance_matches_quadrature():
    """Independent chains: x by conditional SMC (ancestor sampling),
    `σ_Y² | x, y ~ InverseGamma(a + T/2, b + Σ_t (y_t - x_t)²/2)` exactly; each chain's
    mean after burn-in, and the standard error from the spread over the independent
    chains (no autocorrelation estimate needed)."""
    num_chains, num_steps, burn_in = 128, 150, 30
    kernel = smc.ConditionalSMC(LG1, num_particles=10, sampling="ancestor")
    ys = jnp.asarray(GIBBS_YS)

    def chain(key):
        key_init, key_steps = jax.random.split(key)
        state = kernel.init(key_init, PARAMS, ys)

        def body(carry, step_key):
            state, variance = carry
            key_x, key_v = jax.random.split(step_key)
            params = {**PARAMS, "sigma_y": jnp.sqrt(variance)}
            state, _ = kernel.step(key_x, state, params, ys)
            residual = jnp.sum((ys - state.trajectory) ** 2)
            shape = PRIOR_SHAPE + GIBBS_TIMES / 2
            rate = PRIOR_SCALE + residual / 2
            variance = rate / jax.random.gamma(key_v, shape)
            return (state, variance), variance

        _, variances = jax.lax.scan(body, (state, jnp.asarray(1.0)),
                                    jax.random.split(key_steps, num_steps))
        return jnp.mean(variances[burn_in:])

    chain_means = np.asarray(many(chain, num=num_chains, seed=61),
                             np.float64)
    exact = exact_posterior_mean_of_variance(np.asarray(GIBBS_YS, np.float64))
    assert_unbiased(chain_means, exact, k=K_SE, what="posterior mean of σ_Y²")
