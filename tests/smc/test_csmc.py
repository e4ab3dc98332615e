"""Conditional SMC (particle Gibbs) against the exact smoothing law of a linear-Gaussian model.

The smoothing law `p(x_{0:T-1} | y)` of the 1-D linear-Gaussian model is a Gaussian whose
mean and covariance are computed here in NumPy (float64) by conditioning the prior joint
Gaussian of `x_{0:T-1}` on `y = x + noise`, and cross-checked against the RTS smoother of
`kalman.py`. Invariance: 10^4 independent chains start from exact draws of that law and
make one (and two) kernel updates; the means of `x_t` and `x_t²` must stay within
K_SE = 4 standard errors of the exact moments, for every `t`, with `T = 5` and `N = 5`
particles (few particles, so that a wrong kernel shows). Convergence: 10^4 chains from
the all-zeros trajectory (N = 20) reach the same moments after 40 updates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext.smc as smc
from models import ssm
from ppl_ext.adev._errors import UnsupportedEstimatorError
from tests.helpers import NUM_ESTIMATES, assert_unbiased, many
from tests.smc.kalman import kalman, lg1_matrices

NUM_TIMES = 5
NUM_PARTICLES = 5
CONVERGENCE_PARTICLES = 20
LG1 = ssm.linear_gaussian_1d
PARAMS = {**ssm.LINEAR_GAUSSIAN_1D_PARAMS, "sigma_y": jnp.asarray(0.5)}
_, YS = ssm.generate_data(LG1, PARAMS, NUM_TIMES, seed=3)


def exact_smoothing(params, ys):
    """Mean and covariance of `p(x_{0:T-1} | y)` by Gaussian conditioning (float64)."""
    rho, sx, sy, s0 = (float(params[k]) for k in ("rho", "sigma_x", "sigma_y", "sigma_0"))
    num = len(ys)
    # x = L u with u ~ N(0, I): x_0 = s0 u_0, x_t = rho x_{t-1} + sx u_t
    lower = np.zeros((num, num))
    for t in range(num):
        for s in range(t + 1):
            lower[t, s] = rho ** (t - s) * (s0 if s == 0 else sx)
    prior = lower @ lower.T
    cov = np.linalg.inv(np.linalg.inv(prior) + np.eye(num) / sy**2)
    mean = cov @ np.asarray(ys, np.float64) / sy**2
    return mean, cov


MEAN, COV = exact_smoothing(PARAMS, YS)
SECOND = np.diag(COV) + MEAN**2


def test_exact_smoothing_law_matches_rts():
    truth = kalman(lg1_matrices(PARAMS), YS)
    np.testing.assert_allclose(MEAN, truth["smoothed_means"][:, 0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.diag(COV), truth["smoothed_covs"][:, 0, 0], rtol=1e-10)
    np.testing.assert_allclose(np.diag(COV, 1), truth["smoothed_cross"][:, 0, 0], rtol=1e-10)


def moments(paths):
    return jnp.concatenate([paths, paths**2], axis=-1)


EXACT_MOMENTS = np.concatenate([MEAN, SECOND])


@pytest.mark.parametrize("sampling", ["ancestor", "backward"])
def test_smoothing_law_is_invariant(sampling):
    kernel = smc.ConditionalSMC(LG1, NUM_PARTICLES, sampling=sampling)
    rng = np.random.default_rng(11 + (sampling == "backward"))
    starts = jnp.asarray(rng.multivariate_normal(MEAN, COV, size=NUM_ESTIMATES),
                         jnp.float32)

    def one(key, start):
        key_1, key_2 = jax.random.split(key)
        state, info = kernel.step(key_1, smc.CSMCState(start), PARAMS, YS)
        first = state.trajectory
        state, _ = kernel.step(key_2, state, PARAMS, YS)
        return first, state.trajectory, info

    keys = jax.random.split(jax.random.key(5), NUM_ESTIMATES)
    first, second, info = jax.jit(jax.vmap(one))(keys, starts)
    assert_unbiased(moments(first), EXACT_MOMENTS, what=f"{sampling}: one update")
    assert_unbiased(moments(second), EXACT_MOMENTS, what=f"{sampling}: two updates")
    fraction = np.asarray(info.fraction_changed)
    assert np.all((fraction >= 0) & (fraction <= 1)) and fraction.mean() > 0.3
    assert info.ess.shape == (NUM_ESTIMATES, NUM_TIMES)
    assert np.all(np.isfinite(np.asarray(info.log_likelihood)))


@pytest.mark.parametrize("sampling", ["ancestor", "backward"])
def test_chains_from_zeros_reach_the_smoothing_law(sampling):
    # y_0 lies far out in the prior of x_0 (y_0 = -6.4, prior sd 2.3): with bootstrap moves
    # x_0 mixes slowly (with N = 5 the mean of x_0 is still 0.5 off after 30 updates), so
    # the chains use N = 20 particles (error about 2e-3 after 40 updates, measured decay)
    kernel = smc.ConditionalSMC(LG1, CONVERGENCE_PARTICLES, sampling=sampling)
    num_steps = 40

    def chain(key):
        def body(state, step_key):
            state, _ = kernel.step(step_key, state, PARAMS, YS)
            return state, None

        start = smc.CSMCState(jnp.zeros(NUM_TIMES))
        state, _ = jax.lax.scan(body, start, jax.random.split(key, num_steps))
        return moments(state.trajectory)

    samples = many(chain, seed=21 + (sampling == "backward"))
    assert_unbiased(samples, EXACT_MOMENTS, what=f"{sampling}: after {num_steps} updates")


def test_particle_gibbs_is_the_kernel_chain():
    """`particle_gibbs` = `init` then `num_steps` kernel updates, keeping the last ones."""
    key = jax.random.key(41)
    paths = smc.particle_gibbs(key, LG1, PARAMS, YS, num_particles=NUM_PARTICLES,
                               num_steps=4, sampling="backward", burn_in=1)
    kernel = smc.ConditionalSMC(LG1, NUM_PARTICLES, sampling="backward")
    key_init, key_steps = jax.random.split(key)
    state = jax.jit(kernel.init)(key_init, PARAMS, YS)
    step = jax.jit(kernel.step)
    expected = []
    for step_key in jax.random.split(key_steps, 4):
        state, info = step(step_key, state, PARAMS, YS)
        expected.append(state.trajectory)
    assert info.fraction_changed.shape == () and info.ess.shape == (NUM_TIMES,)
    assert paths.shape == (3, NUM_TIMES)
    np.testing.assert_allclose(paths, jnp.stack(expected[1:]), rtol=1e-5, atol=1e-6)


def test_a_single_time_step():
    for sampling in ("ancestor", "backward"):
        paths = smc.particle_gibbs(jax.random.key(2), LG1, PARAMS, YS[:1], num_particles=4,
                                   num_steps=2, sampling=sampling)
        assert paths.shape == (2, 1) and np.all(np.isfinite(np.asarray(paths)))


def test_inputs_reach_the_laws():
    import numpyro.distributions as dist

    model = smc.StateSpaceModel(
        initial=lambda params, inputs: dist.Normal(inputs, 0.1),
        transition=lambda params, x, t, inputs: dist.Normal(x + inputs, 0.1),
        observation=lambda params, x, t, inputs: dist.Normal(x, 1.0))
    inputs = jnp.asarray([10.0, 5.0, -20.0, 3.0])  # the drift dominates the observations
    expected = jnp.cumsum(inputs)
    for sampling in ("ancestor", "backward"):
        paths = smc.particle_gibbs(jax.random.key(0), model, None, jnp.zeros(4),
                                   num_particles=8, num_steps=3, sampling=sampling,
                                   inputs=inputs)
        assert paths.shape == (3, 4)
        np.testing.assert_allclose(paths, jnp.broadcast_to(expected, (3, 4)), atol=1.0)
    with pytest.raises(ValueError, match="inputs have 3 time steps"):
        smc.particle_gibbs(jax.random.key(0), model, None, jnp.zeros(4), inputs=inputs[:3])


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        smc.ConditionalSMC(LG1, 1)
    with pytest.raises(TypeError, match="num_particles must be an int"):
        smc.ConditionalSMC(LG1, 4.0)
    with pytest.raises(ValueError, match="did you mean 'backward'"):
        smc.ConditionalSMC(LG1, 4, sampling="backwards")
    with pytest.raises(ValueError, match="did you mean 'ancestor'"):
        smc.particle_gibbs(jax.random.key(0), LG1, PARAMS, YS, sampling="ancestors")
    with pytest.raises(ValueError, match="did you mean 'multinomial'"):
        smc.ConditionalSMC(LG1, 4, resampling="multinomal")
    with pytest.raises(ValueError, match="not supported"):
        smc.ConditionalSMC(LG1, 4, resampling="systematic")
    with pytest.raises(TypeError, match="StateSpaceModel"):
        smc.ConditionalSMC(lambda x: x, 4)
    with pytest.raises(ValueError, match="burn_in"):
        smc.particle_gibbs(jax.random.key(0), LG1, PARAMS, YS, num_steps=5, burn_in=5)
    with pytest.raises(ValueError, match="num_steps"):
        smc.particle_gibbs(jax.random.key(0), LG1, PARAMS, YS, num_steps=0)
    kernel = smc.ConditionalSMC(LG1, 4)
    with pytest.raises(ValueError, match="leading time axis of length 5"):
        kernel.step(jax.random.key(0), smc.CSMCState(jnp.zeros(3)), PARAMS, YS)


def test_derivatives_are_refused():
    kernel = smc.ConditionalSMC(LG1, 4)
    state = smc.CSMCState(jnp.asarray(MEAN, jnp.float32))

    def through_step(rho):
        new, info = kernel.step(jax.random.key(0), state, {**PARAMS, "rho": rho}, YS)
        return jnp.sum(new.trajectory) + info.log_likelihood

    with pytest.raises(UnsupportedEstimatorError, match="ConditionalSMC.step"):
        jax.grad(through_step)(jnp.asarray(0.9))

    def through_gibbs(rho):
        paths = smc.particle_gibbs(jax.random.key(0), LG1, {**PARAMS, "rho": rho}, YS,
                                   num_particles=4, num_steps=2)
        return jnp.sum(paths)

    with pytest.raises(UnsupportedEstimatorError):
        jax.grad(through_gibbs)(jnp.asarray(0.9))
