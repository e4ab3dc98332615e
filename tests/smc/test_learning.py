"""Learning with SMC against the exact (Kalman) answers of linear-Gaussian models.

- Fisher score: the exact score `∇θ log p_θ(y)` (and `∇y log p_θ(y)`) is `jax.grad` of the
  Kalman log-likelihood written below in plain JAX (float32; its value is cross-checked
  against `kalman.py`'s float64 NumPy recursions). Two checks of the PaRIS estimate:
  (1) exact: with multinomial resampling, `E[(p̂/p)(score estimate - score)] = 0` for any
  N (the PaRIS statistic averages to the FFBS smoother, as in `test_paris.py`), checked
  for the parameters, observations and inputs through `fisher_objective`'s `jax.grad`
  (10^4 runs, N = 32); (2) the plain mean at N = 500 over 200 runs, where the O(T/N)
  self-normalisation bias is below the standard error (see the test).
- Maximum likelihood through `px.fit` with `optax.adam` reaches the Kalman MLE (scipy).
- Markovian score climbing with a mean-field Gaussian reaches the KL(p || q) minimiser:
  the smoothing marginals' means and standard deviations (RTS smoother).
- Bad inputs raise clear errors.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
import scipy.optimize

import ppl_ext as px
import ppl_ext.smc as smc
from models import ssm
from tests.helpers import assert_unbiased, many, mean_and_se
from tests.smc.kalman import kalman, lg1_matrices

K_SE = 4
LG1 = ssm.linear_gaussian_1d
PARAMS = {**ssm.LINEAR_GAUSSIAN_1D_PARAMS, "sigma_y": jnp.asarray(0.5)}


def kalman_log_likelihood(params, ys, offsets=None):
    """`log p_θ(y_{0:T-1})` of `linear_gaussian_1d` by the Kalman filter, in plain JAX
    (with `offsets`: `x_t = ρ x_{t-1} + u_t + σ_X U_t` for `t >= 1`)."""
    rho, sx, sy, s0 = (params[k] for k in ("rho", "sigma_x", "sigma_y", "sigma_0"))
    offsets = jnp.zeros_like(ys) if offsets is None else offsets

    def body(carry, data):
        mean, var, total, first = carry
        y, offset = data
        prior_mean = jnp.where(first, 0.0, rho * mean + offset)
        prior_var = jnp.where(first, s0**2, rho**2 * var + sx**2)
        total = total - 0.5 * (jnp.log(2 * jnp.pi * (prior_var + sy**2))
                               + (y - prior_mean) ** 2 / (prior_var + sy**2))
        gain = prior_var / (prior_var + sy**2)
        return (prior_mean + gain * (y - prior_mean), (1 - gain) * prior_var, total,
                False), None

    zero = jnp.zeros((), jnp.result_type(float))
    (_, _, total, _), _ = jax.lax.scan(body, (zero, zero + 1.0, zero, True), (ys, offsets))
    return total


#: `linear_gaussian_1d` with inputs: `x_t = ρ x_{t-1} + u_t + σ_X U_t`
OFFSET_MODEL = smc.StateSpaceModel(
    initial=lambda p, u: dist.Normal(0.0, p["sigma_0"]),
    transition=lambda p, x, t, u: dist.Normal(p["rho"] * x + u, p["sigma_x"]),
    observation=lambda p, x, t, u: dist.Normal(x, p["sigma_y"]))


def test_kalman_log_likelihood_matches_numpy_recursions():
    _, ys = ssm.generate_data(LG1, PARAMS, 30, seed=2)
    exact = kalman(lg1_matrices(PARAMS), ys)["log_likelihoods"][-1]
    assert abs(float(kalman_log_likelihood(PARAMS, jnp.asarray(ys))) - exact) < 1e-3


def test_fisher_score_is_exactly_unbiased_when_weighted_by_the_likelihood_ratio():
    """`E[(p̂/p)(ŝ - s)] = 0` for the derivatives in the parameters, observations and inputs.

    Multinomial resampling, N = 32, T = 5, the model with inputs `u_t` added to the
    transition's mean: the identity is exact for any N, so few particles make a wrong
    additive term (e.g. the transition's score left out, which sends the `rho` and
    `sigma_x` entries to 0) fail by many standard errors.
    """
    offsets = jnp.array([0.0, 0.5, -0.3, 0.2, 0.4])
    _, ys = OFFSET_MODEL.sample(jax.random.key(3), PARAMS, 5, offsets)
    log_z = float(kalman_log_likelihood(PARAMS, ys, offsets))
    assert abs(log_z - kalman(lg1_matrices(PARAMS), ys, offsets)["log_likelihoods"][-1]) < 1e-3
    exact = jax.grad(kalman_log_likelihood, argnums=(0, 1, 2))(PARAMS, ys, offsets)
    objective = smc.fisher_objective(OFFSET_MODEL, num_particles=32, resampling="multinomial")

    def run(key):
        value, grads = jax.value_and_grad(
            lambda p, y, u: objective(key, p, y, u), argnums=(0, 1, 2))(PARAMS, ys, offsets)
        ratio = jnp.exp(value - log_z)
        return jax.tree.map(lambda g, e: ratio * (g - e), grads, exact)

    centred_params, centred_ys, centred_offsets = many(run, seed=11)
    for name in PARAMS:
        assert_unbiased(centred_params[name], 0.0, k=K_SE, what=f"weighted score d/d{name}")
    assert_unbiased(centred_ys, np.zeros(5), k=K_SE, what="weighted d/dy")
    assert_unbiased(centred_offsets, np.zeros(5), k=K_SE, what="weighted d/du")


def test_fisher_score_mean_matches_the_kalman_score():
    """The plain mean of 200 PaRIS scores (N = 500, T = 10) is within K_SE of the exact one.

    The self-normalised estimate's bias is O(T/N) and its variance O(T/N), so the bias in
    units of the standard error of an R-run mean grows like sqrt(T R / N). A pilot with
    the guided filter at N = 100, T = 50, R = 400 showed at most 3.3 standard errors
    (sigma_x); scaled to N = 500, T = 10, R = 200 that is about 0.5 standard errors, so
    the K_SE = 4 comparison tests the estimator, not its bias. Accept-reject backward
    draws keep the cost O(N) per step.
    """
    _, ys = ssm.generate_data(LG1, PARAMS, 10, seed=4)
    exact = jax.grad(kalman_log_likelihood)(PARAMS, jnp.asarray(ys))

    def bound(params, t, inputs):
        return -0.5 * math.log(2 * math.pi) - jnp.log(params["sigma_x"])

    def run(key):
        score, _ = smc.fisher_score(key, LG1, PARAMS, ys, num_particles=500,
                                    method="guided", log_transition_bound=bound,
                                    num_proposals=4)
        return score

    scores = many(run, num=200, seed=12)
    for name in PARAMS:
        assert_unbiased(scores[name], exact[name], k=K_SE, what=f"score d/d{name}")


def sequential(f, num, seed):
    """`f(key)` over `num` independent keys in one jitted `lax.map` (XLA compiles the
    vmapped conditional filters several times more slowly than one run on CPU)."""
    keys = jax.random.split(jax.random.key(seed), num)
    return jax.jit(lambda keys: jax.lax.map(f, keys))(keys)


def test_ppg_score_matches_the_kalman_score_where_paris_is_biased():
    """PPG's score (N = 8, T = 10, 20 sweeps, 10 burn-in) is within K_SE of the Kalman
    score, for the parameters and (through `fisher_objective`'s `jax.grad`) the
    observations; PaRIS at the same N is biased by many standard errors on `sigma_y`
    (pilot: +3.5 ± 0.3 against PPG's -0.07 ± 0.08, 300 runs), and PPG's bias is below it.

    PPG's bias is that of its reference chain not yet mixed (a sweep from the smoothing
    law is unbiased), which the 10 burn-in sweeps make negligible here (pilot: < 1
    standard error on every entry); PaRIS's is its O(T/N) self-normalisation bias.
    """
    _, ys = ssm.generate_data(LG1, PARAMS, 10, seed=4)
    ys = jnp.asarray(ys)
    exact, exact_ys = jax.grad(kalman_log_likelihood, argnums=(0, 1))(PARAMS, ys)
    objective = smc.fisher_objective(LG1, num_particles=8, smoother="ppg", num_sweeps=20,
                                     num_burnin=10)

    def run_ppg(key):
        return jax.grad(lambda p, y: objective(key, p, y), argnums=(0, 1))(PARAMS, ys)

    def run_paris(key):
        return smc.fisher_score(key, LG1, PARAMS, ys, num_particles=8)[0]

    ppg_scores, ppg_ys = sequential(run_ppg, 200, seed=13)
    paris_scores = sequential(run_paris, 200, seed=14)
    for name in PARAMS:
        assert_unbiased(ppg_scores[name], exact[name], k=K_SE, what=f"PPG score d/d{name}")
    assert_unbiased(ppg_ys, exact_ys, k=K_SE, what="PPG d/dy")
    (ppg_mean, ppg_se), (paris_mean, paris_se) = (
        mean_and_se(scores["sigma_y"]) for scores in (ppg_scores, paris_scores))
    paris_bias, ppg_bias = abs(paris_mean - exact["sigma_y"]), abs(ppg_mean - exact["sigma_y"])
    assert paris_bias > K_SE * paris_se, (paris_bias, paris_se)  # PaRIS's bias is shown
    assert paris_bias - ppg_bias > K_SE * math.hypot(paris_se, ppg_se), (paris_bias, ppg_bias)


# ---------------------------------------------------------------- maximum likelihood

SIGMA_0 = 1.0


def _gaussian_update(mean, var, y, obs_var):
    post_var = 1.0 / (1.0 / var + 1.0 / obs_var)
    return dist.Normal(post_var * (mean / var + y / obs_var), jnp.sqrt(post_var))


#: the 1-D linear-Gaussian model with unconstrained parameters (rho, log σ_X, log σ_Y)
LOG_MODEL = smc.StateSpaceModel(
    initial=lambda p, u: dist.Normal(0.0, SIGMA_0),
    transition=lambda p, x, t, u: dist.Normal(p["rho"] * x, jnp.exp(p["log_sigma_x"])),
    observation=lambda p, x, t, u: dist.Normal(x, jnp.exp(p["log_sigma_y"])),
    proposal=lambda p, x, t, y, u: _gaussian_update(
        p["rho"] * x, jnp.exp(2 * p["log_sigma_x"]), y, jnp.exp(2 * p["log_sigma_y"])),
    initial_proposal=lambda p, y, u: _gaussian_update(
        0.0, SIGMA_0**2, y, jnp.exp(2 * p["log_sigma_y"])))
NAMES = ("rho", "log_sigma_x", "log_sigma_y")


def _negative_log_likelihood(vector, ys):
    rho, log_sx, log_sy = vector
    matrices = {"m0": np.zeros(1), "P0": np.array([[SIGMA_0**2]]), "A": np.array([[rho]]),
                "Q": np.array([[math.exp(2 * log_sx)]]), "H": np.array([[1.0]]),
                "R": np.array([[math.exp(2 * log_sy)]])}
    return -kalman(matrices, ys)["log_likelihoods"][-1]


@functools.cache
def kalman_mle():
    """Data (T = 100), the exact MLE (scipy on the Kalman likelihood) and its standard
    errors (from the likelihood's Hessian by finite differences)."""
    true = {"rho": 0.9, "log_sigma_x": math.log(0.5), "log_sigma_y": math.log(0.5)}
    _, ys = LOG_MODEL.sample(jax.random.key(2), {k: jnp.asarray(v) for k, v in true.items()},
                             100)
    ys = np.asarray(ys, np.float64)
    optimum = scipy.optimize.minimize(_negative_log_likelihood, np.array([0.5, 0.0, 0.0]),
                                      args=(ys,), method="Nelder-Mead",
                                      options=dict(xatol=1e-7, fatol=1e-9, maxiter=4000))
    mle = optimum.x
    step = 1e-3
    hessian = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            e_i, e_j = np.eye(3)[i] * step, np.eye(3)[j] * step
            hessian[i, j] = (_negative_log_likelihood(mle + e_i + e_j, ys)
                             - _negative_log_likelihood(mle + e_i - e_j, ys)
                             - _negative_log_likelihood(mle - e_i + e_j, ys)
                             + _negative_log_likelihood(mle - e_i - e_j, ys)) / (4 * step**2)
    standard_errors = np.sqrt(np.diag(np.linalg.inv(hessian)))
    return ys, mle, standard_errors


def test_maximum_likelihood_through_fit_reaches_the_kalman_mle():
    """Adam on `fisher_objective` (N = 200, T = 100) ends near the exact MLE (scipy on the
    Kalman likelihood).

    Tolerance: a quarter of the MLE's own standard error (from the Kalman likelihood's
    Hessian), i.e. the fit's error is small next to the statistical uncertainty. The run's
    noise is far below it (the last 50 iterates, under a decayed step size, move by less
    than 0.01), and so is the fixed point's shift by the O(T/N) score bias (about 0.01 in a
    pilot at T/N = 2); starting values are far from the MLE (by several standard errors).
    """
    ys, mle, standard_errors = kalman_mle()
    objective = smc.fisher_objective(LOG_MODEL, num_particles=200, method="guided")
    initial = {"rho": jnp.asarray(0.3), "log_sigma_x": jnp.asarray(0.0),
               "log_sigma_y": jnp.asarray(0.0)}
    num_steps = 300
    iterates = []
    result = px.fit(objective, initial,
                    optax.adam(optax.cosine_decay_schedule(0.05, num_steps, alpha=0.02)),
                    num_steps, jax.random.key(0), jnp.asarray(ys, jnp.float32),
                    progress=False, chunk_size=50,
                    callbacks=lambda step, state, history: iterates.append(
                        jax.device_get(state.params)))
    fitted = np.array([float(result.params[k]) for k in NAMES])
    assert np.all(np.abs(np.asarray([initial[k] for k in NAMES]) - mle) > 2 * standard_errors)
    assert np.all(np.abs(fitted - mle) < 0.25 * standard_errors), (fitted, mle,
                                                                   standard_errors)
    last = np.array([[float(it[k]) for k in NAMES] for it in iterates[-2:]])
    assert np.all(np.abs(last[1] - last[0]) < 0.01)
    # the recorded objective is log p̂ (maximised): it rose
    values = result.history.value
    assert np.mean(values[-50:]) > np.mean(values[:50])


# ------------------------------------------------------------ Markov score climbing


def _msc_matches_rts_moments(num_steps, **options):
    """Markov score climbing of a mean-field Gaussian (T = 20, N = 20, start mean 0 and
    scale 3) against the RTS smoothing moments (its KL(p || q) minimiser): the Polyak
    average is within 0.25 posterior standard deviations on every mean and 15% on every
    standard deviation. Returns the result for further checks."""
    num_times = 20
    _, ys = ssm.generate_data(LG1, PARAMS, num_times, seed=1)
    truth = kalman(lg1_matrices(PARAMS), ys)
    means = truth["smoothed_means"][:, 0]
    sds = np.sqrt(truth["smoothed_covs"][:, 0, 0])
    family, params = smc.mean_field_gaussian(num_times, scale=3.0)
    assert np.all(3.0 / sds > 5)  # the start is far off on every scale
    result = smc.markov_score_climbing(
        jax.random.key(0), LG1, PARAMS, family, params, ys,
        optax.adam(optax.cosine_decay_schedule(0.05, num_steps, alpha=0.01)),
        num_steps=num_steps, num_particles=20, progress=False, **options)
    fitted = result.averaged_params
    loc_error = np.abs(np.asarray(fitted["loc"]) - means) / sds
    scale_ratio = np.exp(np.asarray(fitted["log_scale"])) / sds
    assert np.max(loc_error) < 0.25, loc_error
    assert np.max(np.abs(scale_ratio - 1)) < 0.15, scale_ratio
    return result


def test_markov_score_climbing_reaches_the_smoothing_marginals():
    """A mean-field Gaussian fitted by MSC matches the smoothing marginals (T = 20).

    The KL(p || q) minimiser over mean-field Gaussians matches each marginal's mean and
    variance (moment matching), computed by the RTS smoother. Tolerance: 0.25 posterior
    standard deviations on the means and 15% on the standard deviations, for the
    Polyak average over the last half of 4000 steps (pilot runs err by at most 0.08
    standard deviations and 10%); the starting family (mean 0, scale 3) is off by more
    than 1 standard deviation at most times and by a factor > 5 on every scale.
    """
    num_steps = 4000
    result = _msc_matches_rts_moments(num_steps)
    assert result.log_density.shape == (num_steps,)
    assert np.mean(result.log_density[-500:]) > np.mean(result.log_density[:100])
    assert float(np.mean(result.fraction_changed[-500:])) > 0.5


def test_markov_score_climbing_with_a_ppg_kernel_reaches_the_smoothing_marginals():
    """The PPG move (`markov_kernel="ppg"`: a PaRIS-particle-Gibbs sweep, the gradient its
    PaRIS estimate of `E[∇λ log q_λ | y]`) reaches the same KL(p || q) minimiser as the
    conditional-SMC test above (RTS moments, same data, tolerances and start), with 1000
    steps of N = 20 (pilot: 0.07 standard deviations and 4% at most; the conditional-SMC
    move at the same 1000 steps erred by 0.14 and 10%).
    """
    result = _msc_matches_rts_moments(1000, markov_kernel="ppg")
    assert np.mean(result.log_density[-200:]) > np.mean(result.log_density[:50])
    assert float(np.mean(result.fraction_changed[-200:])) > 0.5


def test_markov_score_climbing_with_model_learning_reaches_the_kalman_mle():
    """The joint variant (θ by `∇θ log p_θ(x_k, y)` along the chain) ends near the MLE.

    Same data, MLE and tolerance (a quarter of the MLE's standard error) as the `px.fit`
    test; the Polyak average of θ over the last half of 4000 steps is compared (a pilot
    erred by at most 0.003, a 50th of a standard error). Starting values are more than
    2 standard errors away.
    """
    ys, mle, standard_errors = kalman_mle()
    family, params = smc.mean_field_gaussian(len(ys), loc=jnp.asarray(ys, jnp.float32))
    initial = {"rho": jnp.asarray(0.5), "log_sigma_x": jnp.asarray(0.0),
               "log_sigma_y": jnp.asarray(0.0)}
    assert np.all(np.abs(np.asarray([initial[k] for k in NAMES]) - mle) > 2 * standard_errors)
    num_steps = 4000
    result = smc.markov_score_climbing(
        jax.random.key(0), LOG_MODEL, initial, family, params, jnp.asarray(ys, jnp.float32),
        optax.adam(optax.cosine_decay_schedule(0.05, num_steps, alpha=0.01)),
        num_steps=num_steps, num_particles=20, progress=False,
        model_optimizer=optax.adam(optax.cosine_decay_schedule(0.01, num_steps, alpha=0.01)))
    fitted = np.array([float(result.averaged_model_params[k]) for k in NAMES])
    assert np.all(np.abs(fitted - mle) < 0.25 * standard_errors), (fitted, mle)
    kernel = smc.MarkovScoreClimbing(LOG_MODEL, family, optax.sgd(0.1), 4,
                                     model_optimizer=optax.sgd(0.01))
    with pytest.raises(ValueError, match="pass model_params=None"):
        kernel.step(jax.random.key(0), result.state, initial, jnp.asarray(ys, jnp.float32))


def test_markov_score_climbing_kernel_is_jittable_and_keeps_its_state_shape():
    _, ys = ssm.generate_data(LG1, PARAMS, 6, seed=1)
    family, params = smc.mean_field_gaussian(6)
    kernel = smc.MarkovScoreClimbing(LG1, family, optax.sgd(1e-2), num_particles=8)
    state = kernel.init(jax.random.key(0), params, PARAMS, ys)
    new, info = jax.jit(kernel.step)(jax.random.key(1), state, PARAMS, ys)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert info.ess.shape == (6,)


def test_markov_score_climbing_ppg_kernel_with_model_learning_keeps_its_state():
    """The PPG move with a `model_optimizer` (θ's gradient the sweep's PaRIS estimate of
    Fisher's identity): jitted steps keep the state's structure, shapes and dtypes, and
    move both parameter sets by finite amounts."""
    theta = {"rho": jnp.asarray(0.5), "log_sigma_x": jnp.asarray(0.0),
             "log_sigma_y": jnp.asarray(0.0)}
    _, ys = LOG_MODEL.sample(jax.random.key(5), theta, 6)
    family, params = smc.mean_field_gaussian(6)
    kernel = smc.MarkovScoreClimbing(LOG_MODEL, family, optax.sgd(1e-2), 8,
                                     model_optimizer=optax.sgd(1e-2), markov_kernel="ppg",
                                     num_backward_samples=3)
    state = kernel.init(jax.random.key(0), params, theta, ys)
    step = jax.jit(lambda key, state: kernel.step(key, state, None, ys))
    new, info = step(jax.random.key(1), state)
    new, info = step(jax.random.key(2), new)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.all(np.isfinite(np.asarray(a, np.float64)))
    for name in NAMES:
        assert float(new.model_params[name]) != float(theta[name])
    assert np.any(np.asarray(new.params["loc"]) != np.asarray(params["loc"]))
    assert info.ess.shape == (6,) and np.isfinite(float(info.grad_norm))


def test_trajectory_family_log_density_is_the_sum_of_its_laws():
    family, params = smc.mean_field_gaussian(4, loc=jnp.arange(4.0), scale=2.0)
    x = jnp.array([0.5, -1.0, 2.0, 3.5])
    exact = sum(dist.Normal(float(t), 2.0).log_prob(x[t]) for t in range(4))
    assert abs(float(family.log_density(params, x)) - float(exact)) < 1e-5
    family2, params2 = smc.mean_field_gaussian(3, state_shape=(2,))
    draw = family2.sample(jax.random.key(0), params2, 3)
    assert draw.shape == (3, 2) and family2.log_density(params2, draw).shape == ()


# ---------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    _, ys = ssm.generate_data(LG1, PARAMS, 5, seed=0)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="empty"):
        smc.fisher_score(key, LG1, PARAMS, jnp.zeros((0,)))
    with pytest.raises(ValueError, match="num_particles must be at least 2"):
        smc.fisher_score(key, LG1, PARAMS, ys, num_particles=1)
    with pytest.raises(ValueError, match="num_particles must be at least 2"):
        smc.fisher_objective(LG1, num_particles=1)
    with pytest.raises(ValueError, match="fail on params"):
        smc.fisher_score(key, LG1, {"rho": 0.9}, ys, num_particles=10)
    with pytest.raises(ValueError, match="shape"):
        smc.fisher_score(key, LG1, PARAMS, jnp.zeros((5, 3)), num_particles=10)
    with pytest.raises(ValueError, match="inputs have 3 time steps"):
        smc.fisher_score(key, LG1, PARAMS, ys, num_particles=10, inputs=jnp.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        smc.fisher_score(key, LG1, {**PARAMS, "rho": jnp.asarray(1)}, ys, num_particles=10)
    with pytest.raises(ValueError, match="unknown method 'guidde'"):
        smc.fisher_objective(LG1, method="guidde")
    with pytest.raises(TypeError, match="StateSpaceModel"):
        smc.fisher_objective("model")
    objective = smc.fisher_objective(LG1, num_particles=10)
    with pytest.raises(ValueError, match="fail on params"):
        objective(key, {"rho": jnp.asarray(0.9)}, ys)

    family, params = smc.mean_field_gaussian(5)
    with pytest.raises(ValueError, match="num_particles must be at least 2"):
        smc.MarkovScoreClimbing(LG1, family, optax.sgd(0.1), num_particles=1)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        smc.MarkovScoreClimbing(LG1, family, 0.1)
    with pytest.raises(TypeError, match="TrajectoryFamily"):
        smc.MarkovScoreClimbing(LG1, lambda p: None, optax.sgd(0.1))
    msc = dict(num_steps=2, num_particles=4, progress=False)
    with pytest.raises(ValueError, match="empty"):
        smc.markov_score_climbing(key, LG1, PARAMS, family, params, jnp.zeros((0,)),
                                  optax.sgd(0.1), **msc)
    with pytest.raises(ValueError, match="fail on params"):
        smc.markov_score_climbing(key, LG1, {"rho": 0.9}, family, params, ys,
                                  optax.sgd(0.1), **msc)
    with pytest.raises(ValueError, match="family's laws fail on params"):
        smc.markov_score_climbing(key, LG1, PARAMS, family, {"mean": jnp.zeros(5)}, ys,
                                  optax.sgd(0.1), **msc)
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        smc.markov_score_climbing(key, LG1, PARAMS, family, params, ys, optax.sgd(0.1),
                                  num_steps=0, progress=False)
    with pytest.raises(ValueError, match="markov_kernel must be one of 'csmc', 'ppg', got 'pg'"):
        smc.markov_score_climbing(key, LG1, PARAMS, family, params, ys, optax.sgd(0.1),
                                  markov_kernel="pg", **msc)
    with pytest.raises(ValueError, match="num_backward_samples must be at least 1"):
        smc.MarkovScoreClimbing(LG1, family, optax.sgd(0.1), 4, markov_kernel="ppg",
                                num_backward_samples=0)
    with pytest.raises(ValueError, match="scale must be positive"):
        smc.mean_field_gaussian(5, scale=-1.0)
    with pytest.raises(ValueError, match="family describes 4 time steps"):
        smc.markov_score_climbing(key, LG1, PARAMS, smc.mean_field_gaussian(4)[0],
                                  smc.mean_field_gaussian(4)[1], ys, optax.sgd(0.1), **msc)
    with pytest.raises(ValueError, match="leading axis must be the family's 5"):
        smc.markov_score_climbing(key, LG1, PARAMS, family, smc.mean_field_gaussian(4)[1],
                                  ys, optax.sgd(0.1), **msc)
    with pytest.raises(ValueError, match="smoother must be one of 'paris', 'ppg', got 'pgg'"):
        smc.fisher_score(key, LG1, PARAMS, ys, smoother="pgg")
    with pytest.raises(ValueError, match="smoother must be one of"):
        smc.fisher_objective(LG1, smoother="PaRIS")
    with pytest.raises(ValueError, match="num_sweeps must be at least 1, got 0"):
        smc.fisher_score(key, LG1, PARAMS, ys, smoother="ppg", num_sweeps=0)
    with pytest.raises(ValueError, match=r"num_burnin \(3\) must be below num_sweeps \(3\)"):
        smc.fisher_objective(LG1, smoother="ppg", num_sweeps=3, num_burnin=3)
    with pytest.raises(TypeError, match="num_sweeps must be an int"):
        smc.fisher_score(key, LG1, PARAMS, ys, smoother="ppg", num_sweeps=2.5)
    with pytest.warns(UserWarning, match=r"do not read params\['sigmax'\]"):
        smc.fisher_score(key, LG1, {**PARAMS, "sigmax": jnp.asarray(1.0)}, ys,
                         num_particles=10)
