"""Particle filters against the Kalman filter (NumPy, `tests/smc/kalman.py`).

Statistical checks (k = K_SE = 4 standard errors, counted by `tests/helpers.py`) use the
unbiasedness of the unnormalised estimates: for any unbiased resampling scheme,
`E[Ẑ_t] = Z_t = p(y_{0:t})` and `E[Ẑ_t Σ_i W_t^i φ(x_t^i)] = Z_t E[φ(x_t) | y_{0:t}]`,
with `Z_t` from the Kalman filter. The self-normalised means themselves carry an O(1/N)
bias, so they are compared through these exact identities, over 10^4 independent runs
(one `jit(vmap)` over keys), with a short series (T = 5) so that `Ẑ/Z` has a moderate
variance.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

import ppl_ext.smc as smc
from models import ssm
from tests.helpers import assert_unbiased, many
from tests.smc.kalman import kalman, lg1_matrices, lg_matrices

NUM_TIMES = 5
LG1 = ssm.linear_gaussian_1d
LG1_PARAMS = ssm.LINEAR_GAUSSIAN_1D_PARAMS
_, LG1_YS = ssm.generate_data(LG1, LG1_PARAMS, NUM_TIMES, seed=3)
LG1_TRUTH = kalman(lg1_matrices(LG1_PARAMS), LG1_YS)
SCHEMES = ["multinomial", "systematic", "stratified", "residual"]


def ratio_and_means(result, truth):
    """`Ẑ_t / Z_t` and `(Ẑ_t / Z_t)(m̂_t - m_t)` for every t: their means are 1 and 0.

    (Centring at the Kalman mean `m_t` is a control variate: it removes the spread of
    `Ẑ_t / Z_t` times `m_t` from the standard error.)
    """
    log_z = jnp.cumsum(result.log_likelihood_increments)
    ratio = jnp.exp(log_z - jnp.asarray(truth["log_likelihoods"], log_z.dtype))
    means = result.filtering_means.reshape(ratio.shape[0], -1)
    return ratio, ratio[:, None] * (means - truth["filtered_means"])


# ------------------------------------------------------------ the ground truth is right


def test_kalman_matches_the_joint_gaussian():
    """The NumPy Kalman/RTS recursions against brute-force conditioning of the joint law."""
    mats = lg_matrices(ssm.linear_gaussian_params(2, 1))
    num_times, d = 4, 2
    # x = (x_0, ..., x_3) is Gaussian: build its covariance by propagating x_t = A x_{t-1} + w
    cov = np.zeros((num_times * d, num_times * d))
    transfer = [np.linalg.matrix_power(mats["A"], t) for t in range(num_times)]
    marg = [mats["P0"]]
    for t in range(1, num_times):
        marg.append(mats["A"] @ marg[-1] @ mats["A"].T + mats["Q"])
    for s in range(num_times):
        for t in range(s, num_times):
            block = transfer[t - s] @ marg[s]
            cov[t * d:(t + 1) * d, s * d:(s + 1) * d] = block
            cov[s * d:(s + 1) * d, t * d:(t + 1) * d] = block.T
    big_h = np.kron(np.eye(num_times), mats["H"])
    y_cov = big_h @ cov @ big_h.T + np.kron(np.eye(num_times), mats["R"])
    ys = np.array([[0.3], [-0.5], [1.2], [0.1]])
    truth = kalman(mats, ys)
    assert np.isclose(truth["log_likelihoods"][-1],
                      stats.multivariate_normal(np.zeros(num_times), y_cov).logpdf(ys[:, 0]))
    gain = cov @ big_h.T @ np.linalg.inv(y_cov)
    post_mean = gain @ ys[:, 0]
    post_cov = cov - gain @ big_h @ cov
    assert np.allclose(truth["smoothed_means"].ravel(), post_mean)
    assert np.allclose(truth["smoothed_covs"][1], post_cov[2:4, 2:4])
    assert np.allclose(truth["smoothed_cross"][1], post_cov[2:4, 4:6])


# ------------------------------------------------------------ unbiased likelihoods


@pytest.mark.parametrize("resampling", SCHEMES)
def test_likelihood_is_unbiased_in_z(resampling):
    def run(key):
        result = smc.filter(key, LG1, LG1_PARAMS, LG1_YS, num_particles=16,
                            resampling=resampling, store_particles=False)
        return *ratio_and_means(result, LG1_TRUTH), result.log_likelihood

    ratio, weighted_means, log_likelihood = many(run, seed=11)
    log_ratio = np.asarray(log_likelihood, np.float64) - LG1_TRUTH["log_likelihoods"][-1]
    assert_unbiased(ratio[:, -1], 1.0, what=f"{resampling}: Ẑ / Z")
    assert_unbiased(weighted_means, 0.0, what=f"{resampling}: Ẑ_t (m̂_t - m_t) / Z_t")
    # log Ẑ is biased low (Jensen): its mean is far below log Z at N = 16
    assert np.mean(log_ratio) < -0.01


@pytest.mark.parametrize("method,ess_threshold", [("bootstrap", 0.5), ("guided", 1.0),
                                                  ("guided", 0.5), ("auxiliary", 0.7)])
def test_adaptive_guided_and_auxiliary_filters_are_unbiased(method, ess_threshold):
    params = LG1_PARAMS
    extra = {}
    if method == "auxiliary":  # look ahead with a deliberately wrong predictive law
        extra["log_auxiliary"] = lambda p, x, t, y, inputs: dist.Normal(
            p["rho"] * x, 1.5).log_prob(y)

    def run(key):
        result = smc.filter(key, LG1, params, LG1_YS, num_particles=8, method=method,
                            ess_threshold=ess_threshold, functional=lambda x: x**2,
                            store_particles=False, **extra)
        ratio, weighted_means = ratio_and_means(result, LG1_TRUTH)
        second = LG1_TRUTH["filtered_means"][:, 0] ** 2 + LG1_TRUTH["filtered_covs"][:, 0, 0]
        return (ratio, weighted_means,
                ratio * (result.filtering_expectations.reshape(-1) - second))

    ratio, weighted_means, weighted_squares = many(run, seed=12)
    what = f"{method}, ess_threshold={ess_threshold}"
    assert_unbiased(ratio[:, -1], 1.0, what=f"{what}: Ẑ / Z")
    assert_unbiased(weighted_means, 0.0, what=f"{what}: means")
    assert_unbiased(weighted_squares, 0.0, what=f"{what}: E[x_t²]")


def test_multivariate_model_is_unbiased():
    params = ssm.linear_gaussian_params(3, 2)
    _, ys = ssm.generate_data(ssm.linear_gaussian, params, NUM_TIMES, seed=4)
    truth = kalman(lg_matrices(params), ys)

    def run(key):
        result = smc.filter(key, ssm.linear_gaussian, params, ys, num_particles=16,
                            store_particles=False)
        return ratio_and_means(result, truth)

    ratio, weighted_means = many(run, seed=14)
    assert_unbiased(ratio[:, -1], 1.0, what="3-D: Ẑ / Z")
    assert_unbiased(weighted_means, 0.0, what="3-D: means")


def test_time_varying_inputs():
    """x_t = ρ x_{t-1} + u_t + σ_X U_t: the Kalman filter with offsets is the truth."""
    model = smc.StateSpaceModel(
        initial=lambda p, u: dist.Normal(0.0, p["sigma_0"]),
        transition=lambda p, x, t, u: dist.Normal(p["rho"] * x + u, p["sigma_x"]),
        observation=lambda p, x, t, u: dist.Normal(x, p["sigma_y"]))
    inputs = jnp.array([0.0, 1.0, -2.0, 0.5, 3.0])
    _, ys = model.sample(jax.random.key(5), LG1_PARAMS, NUM_TIMES, inputs)
    truth = kalman(lg1_matrices(LG1_PARAMS), np.asarray(ys), offsets=np.asarray(inputs))

    def run(key):
        result = smc.filter(key, model, LG1_PARAMS, ys, num_particles=16, inputs=inputs,
                            store_particles=False)
        return ratio_and_means(result, truth)

    ratio, weighted_means = many(run, seed=15)
    assert_unbiased(ratio[:, -1], 1.0, what="inputs: Ẑ / Z")
    assert_unbiased(weighted_means, 0.0, what="inputs: means")


def test_large_n_filter_is_close_to_kalman():
    """A sanity check with many particles and a long series (no statistical budget used)."""
    _, ys = ssm.generate_data(LG1, LG1_PARAMS, 50, seed=6)
    truth = kalman(lg1_matrices(LG1_PARAMS), ys)
    result = smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, num_particles=20_000,
                        method="guided")
    assert abs(float(result.log_likelihood) - truth["log_likelihoods"][-1]) < 0.1
    assert np.max(np.abs(np.asarray(result.filtering_means) - truth["filtered_means"][:, 0])
                  ) < 0.02
    assert result.ancestors.shape == (50, 20_000) and result.particles.shape == (50, 20_000)


# ------------------------------------------------------------ resampling


def test_resampling_is_unbiased():
    """E[#{j : A_j = i}] = M w_i for every scheme, M = N and M > N (one compiled program)."""
    weights = np.array([0.05, 0.13, 0.22, 0.27, 0.33])  # M·w_i is never an integer
    cases = [(scheme, num) for scheme in SCHEMES for num in (5, 7)]

    def counts(key):
        keys = jax.random.split(key, len(cases))
        return [jnp.zeros(5).at[smc.resample(k, jnp.log(jnp.asarray(weights)), num,
                                             scheme)].add(1.0)
                for k, (scheme, num) in zip(keys, cases)]

    draws = many(counts, seed=21)
    for (scheme, num), case_draws in zip(cases, draws):
        case_draws = np.asarray(case_draws)
        assert np.all(case_draws.sum(1) == num)
        assert_unbiased(case_draws, num * weights, what=f"{scheme}, M={num}: E[counts] = M w")
        low, high = np.floor(num * weights), np.ceil(num * weights)
        if scheme == "systematic":  # every count is the floor or the ceiling of M w_i
            assert np.all((case_draws >= low) & (case_draws <= high)), scheme
        if scheme == "residual":  # at least the integer part
            assert np.all(case_draws >= low), scheme


def test_effective_sample_size():
    assert np.isclose(smc.effective_sample_size(jnp.zeros(10)), 10.0)
    assert np.isclose(smc.effective_sample_size(jnp.array([0.0, -jnp.inf, -jnp.inf])), 1.0)
    w = np.array([0.1, 0.2, 0.7])
    assert np.isclose(smc.effective_sample_size(jnp.log(jnp.asarray(w)) + 3.0),
                      1.0 / np.sum(w**2), rtol=1e-5)


def test_ess_adaptive_resampling_follows_the_threshold():
    params = {**LG1_PARAMS, "sigma_y": jnp.asarray(1.0)}
    num_times, num = 20, 64
    _, ys = ssm.generate_data(LG1, params, num_times, seed=7)
    run = lambda threshold: smc.filter(jax.random.key(0), LG1, params, ys,
                                       num_particles=num, ess_threshold=threshold)
    never, half = run(0.0), run(0.5)  # (1.0, every step: test_kernel_steps_equal_...)
    assert not np.any(never.resampled)
    assert np.array_equal(never.ancestors, np.broadcast_to(np.arange(num), (num_times, num)))
    expected = np.asarray(half.ess[:-1]) < 0.5 * num
    assert np.array_equal(np.asarray(half.resampled[1:]), expected)
    assert 0 < expected.sum() < num_times - 1  # the threshold binds at some steps only
    not_resampled = ~np.asarray(half.resampled)
    assert np.all(np.asarray(half.ancestors)[not_resampled] == np.arange(num))


# ------------------------------------------------------------ sharding, kernels


def test_particles_sharded_over_two_devices_equal_one_device():
    devices = jax.devices()
    assert len(devices) >= 2, "tests/conftest.py sets two host devices"
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("particles",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("particles"))
    _, ys = ssm.generate_data(LG1, LG1_PARAMS, 20, seed=8)
    kwargs = dict(num_particles=256, ess_threshold=0.5, functional=jnp.sin)
    one = smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, **kwargs)
    two = smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, sharding=sharding, **kwargs)
    assert len(two.particles.sharding.device_set) == 2
    assert np.array_equal(one.ancestors, two.ancestors)
    assert np.array_equal(one.resampled, two.resampled)
    for a, b in [(one.log_likelihood, two.log_likelihood),
                 (one.filtering_means, two.filtering_means),
                 (one.filtering_expectations, two.filtering_expectations),
                 (one.particles, two.particles)]:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_steps_equal_the_scanned_filter():
    kernel = smc.BootstrapFilter(LG1, num_particles=32, resampling="stratified")
    ys = jnp.asarray(LG1_YS)
    keys = jax.random.split(jax.random.key(3), NUM_TIMES)
    state = jax.jit(kernel.init)(keys[0], LG1_PARAMS, ys[0])
    step = jax.jit(kernel.step)
    for t in range(1, NUM_TIMES):
        state, info = step(keys[t], state, LG1_PARAMS, ys[t])
    result = eqx.filter_jit(smc.run_filter)(jax.random.key(3), kernel, LG1_PARAMS, ys)
    np.testing.assert_allclose(state.log_likelihood, result.log_likelihood, rtol=1e-5)
    np.testing.assert_allclose(state.particles, result.particles[-1], rtol=1e-5)
    np.testing.assert_array_equal(info.ancestors, result.ancestors[-1])
    assert int(state.t) == NUM_TIMES - 1
    # ess_threshold=1.0 (the default) resamples at every step after the first
    assert np.all(result.resampled[1:]) and not result.resampled[0]


def test_filter_does_not_retrace_for_new_arrays():
    traces = []

    def observation(params, x, t, inputs):
        traces.append(1)
        return dist.Normal(x, params["sigma_y"])

    model = smc.StateSpaceModel(LG1.initial, LG1.transition, observation)
    ys = jnp.asarray(LG1_YS)
    smc.filter(jax.random.key(0), model, LG1_PARAMS, ys, num_particles=16)
    count = len(traces)
    params = {k: v + 0.01 for k, v in LG1_PARAMS.items()}
    smc.filter(jax.random.key(1), model, params, ys + 1.0, num_particles=16)
    assert len(traces) == count


# ------------------------------------------------------------ the other models


@pytest.mark.parametrize("name", ["stochastic_volatility", "poisson_count"])
def test_nonlinear_models_filter(name):
    model = getattr(ssm, name)
    params = getattr(ssm, name.upper() + "_PARAMS")
    states, ys = ssm.generate_data(model, params, 100, seed=0)
    again, _ = ssm.generate_data(model, params, 100, seed=0)
    np.testing.assert_array_equal(states, again)
    assert states.shape == ys.shape == (100,)
    result = smc.filter(jax.random.key(0), model, params, ys, num_particles=500)
    assert np.isfinite(result.log_likelihood)
    # the filter tracks the hidden state better than the stationary mean does
    error = np.mean((np.asarray(result.filtering_means) - states) ** 2)
    assert error < np.mean((states - float(params["mu"])) ** 2)


def test_poisson_count_likelihood_against_quadrature():
    """T = 2: p(y_0, y_1) by a 2-D Gauss-Hermite sum, against the mean of Ẑ."""
    params = ssm.POISSON_COUNT_PARAMS
    mu, phi, sigma = (float(params[k]) for k in ("mu", "phi", "sigma"))
    ys = np.array([3, 1])
    nodes, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    s0 = sigma / math.sqrt(1 - phi**2)
    x0 = mu + s0 * nodes
    x1 = mu + phi * (x0[:, None] - mu) + sigma * nodes[None, :]
    like = stats.poisson(np.exp(x0)).pmf(ys[0])[:, None] * stats.poisson(np.exp(x1)).pmf(ys[1])
    exact = np.sum(w[:, None] * w[None, :] * like)
    estimates = many(lambda key: jnp.exp(smc.filter(
        key, ssm.poisson_count, params, jnp.asarray(ys), num_particles=4,
        resampling="multinomial", store_particles=False).log_likelihood), seed=16)
    assert_unbiased(estimates / exact, 1.0, what="Poisson: Ẑ / Z")


# ------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_clear_errors():
    ys = jnp.asarray(LG1_YS)
    with pytest.raises(ValueError, match="empty"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, jnp.zeros(0))
    with pytest.raises(ValueError, match="leading time axis"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, jnp.asarray(1.0))
    with pytest.raises(ValueError, match="at least 1"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, num_particles=0)
    with pytest.raises(TypeError, match="int"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, num_particles=10.0)
    with pytest.raises(ValueError, match="did you mean 'systematic'"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, resampling="sistematic")
    with pytest.raises(ValueError, match="did you mean 'stratified'"):
        smc.BootstrapFilter(LG1, 10, resampling="stratifed")
    with pytest.raises(ValueError, match="did you mean 'guided'"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, method="guidded")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, ess_threshold=1.5)
    with pytest.raises(ValueError, match="inputs have 3 time steps"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, inputs=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, jnp.zeros((NUM_TIMES, 2)))
    no_proposal = smc.StateSpaceModel(LG1.initial, LG1.transition, LG1.observation)
    with pytest.raises(ValueError, match="no proposal"):
        smc.filter(jax.random.key(0), no_proposal, LG1_PARAMS, ys, method="guided")
    with pytest.raises(ValueError, match="needs log_auxiliary"):
        smc.filter(jax.random.key(0), LG1, LG1_PARAMS, ys, method="auxiliary")
    batched = smc.StateSpaceModel(lambda p, u: dist.Normal(jnp.zeros(2), 1.0),
                                  lambda p, x, t, u: dist.Normal(x, 1.0),
                                  lambda p, x, t, u: dist.Normal(x, 1.0))
    with pytest.raises(ValueError, match="to_event"):
        smc.filter(jax.random.key(0), batched, None, jnp.zeros((NUM_TIMES, 2)))
    with pytest.raises(TypeError, match="StateSpaceModel"):
        smc.filter(jax.random.key(0), "model", None, ys)
    with pytest.raises(TypeError, match="callable"):
        smc.StateSpaceModel(1, LG1.transition, LG1.observation)


def test_derivatives_through_the_filter_are_refused():
    """The gradient of a filter's outputs would leave out the resampling score terms
    (silently biased): refused by name, for params, observations and closed-over values;
    values under stop_gradient still compute inside a differentiated program."""
    import numpyro.distributions as dist

    import ppl_ext as px
    import ppl_ext.smc as smc

    model = smc.StateSpaceModel(
        initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        transition=lambda params, x, t, inputs: dist.Normal(params["a"] * x, 1.0),
        observation=lambda params, x, t, inputs: dist.Normal(x, 0.5))
    params = {"a": jnp.asarray(0.8)}
    ys = jnp.linspace(-1.0, 1.0, 6)

    def log_z(p, y):
        return smc.filter(jax.random.key(0), model, p, y, num_particles=16).log_likelihood

    with pytest.raises(px.UnsupportedEstimatorError, match="resampling"):
        jax.grad(log_z)(params, ys)
    with pytest.raises(px.UnsupportedEstimatorError, match="BootstrapFilter"):
        jax.grad(log_z, argnums=1)(params, ys)

    def closed_over(scale):
        m = smc.StateSpaceModel(
            initial=lambda p, inputs: dist.Normal(0.0, scale),
            transition=lambda p, x, t, inputs: dist.Normal(x, 1.0),
            observation=lambda p, x, t, inputs: dist.Normal(x, 0.5))
        return smc.filter(jax.random.key(0), m, {}, ys, num_particles=16).log_likelihood

    with pytest.raises(px.UnsupportedEstimatorError):
        jax.grad(closed_over)(1.0)

    def stopped(a):  # values only: fine
        p = {"a": jax.lax.stop_gradient(a)}
        return a * log_z(p, ys)

    assert np.isfinite(float(jax.grad(stopped)(jnp.asarray(0.8))))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resampling_never_draws_trailing_zero_weights(scheme):
    """Float rounding of the cumulative weights must not hand a draw to a particle of
    weight zero at the end (blackjax's searchsorted schemes clip overflow to the last
    index)."""
    num = 10_000
    log_weights = jnp.concatenate([jax.random.normal(jax.random.key(3), (num - 3,)),
                                   jnp.full(3, -jnp.inf)])
    # float32 weights sum to 1 - 2.4e-7 here: a uniform above 0.9976 used to overflow
    highest = jax.lax.map(lambda k: jnp.max(smc.resample(k, log_weights, num, scheme)),
                          jax.random.split(jax.random.key(4), 4000))
    assert int(jnp.max(highest)) < num - 3
