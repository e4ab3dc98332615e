"""Zeroth-order back-ends: an unbiased gradient of the smoothed objective, ranking-only descent."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import ppl_ext as px
from ppl_ext.optim import ZerothOrderRankSGD, ZerothOrderSGD, ZerothOrderState, rank_by_objective
from tests.helpers import K_SE, assert_same_mean, assert_unbiased, many, mean_and_se

FREQUENCIES = jnp.array([1.0, 2.0, 3.0])
SLOPES = jnp.array([0.3, -0.2, 0.1])
NOISE_SCALE = 0.3


@px.expectation
def wavy(x):
    """E_z[Σ_i cos(ω_i x_i + z_i)] + exp(c·x), z_i ~ N(0, 0.3²): noise that depends on x."""
    z = px.sample(dist.Normal(jnp.zeros(3), NOISE_SCALE))
    return jnp.sum(jnp.cos(FREQUENCIES * x + z)) + jnp.exp(SLOPES @ x)


def smoothed_gradient(x, mu):
    """∇ E_u f(x + μu), u ~ N(0, I), in closed form: E cos(a + b) = cos(a) e^{-Var b / 2},
    E exp(c·(x + μu)) = exp(c·x + μ²|c|²/2)."""
    damping = jnp.exp(-(FREQUENCIES**2 * mu**2 + NOISE_SCALE**2) / 2)
    return (-FREQUENCIES * jnp.sin(FREQUENCIES * x) * damping
            + SLOPES * jnp.exp(SLOPES @ x + mu**2 * SLOPES @ SLOPES / 2))


def test_two_point_estimate_is_unbiased_for_the_smoothed_gradient():
    """10^4 estimates (2 directions each) within K_SE standard errors of ∇f_μ, per
    coordinate; at μ = 0.5 ∇f_μ differs from ∇f by many standard errors (the test can fail)."""
    mu = 0.5
    x = jnp.array([0.4, -0.3, 0.7])
    backend = ZerothOrderSGD(smoothing=mu, num_directions=2)
    estimates = many(lambda key: backend.estimate_gradient(key, x, wavy))
    exact = smoothed_gradient(x, mu)
    assert_unbiased(estimates, exact, what="two-point estimate")
    mean, se = mean_and_se(estimates)
    unsmoothed = smoothed_gradient(x, 0.0)
    assert np.max(np.abs(mean - unsmoothed) / se) > 3 * K_SE


def test_agrees_with_optax_perturbations_on_a_nonsmooth_function():
    """f(x) = Σ max(x, 0): ∇f_μ(x)_i = Φ(x_i / μ). The two-point estimates and
    `optax.perturbations.make_perturbed_fun`'s (Gaussian noise, same μ; 8 evaluations for
    ours, 8 plus a baseline for optax's) estimate the same gradient: both unbiased, and
    equal means."""
    from jax.scipy.stats import norm

    mu = 0.3
    x = jnp.array([-0.2, 0.05, 0.4])

    def relu_sum(x):
        return jnp.sum(jnp.maximum(x, 0.0))

    backend = ZerothOrderSGD(smoothing=mu, num_directions=4)
    ours = many(lambda key: backend.estimate_gradient(key, x, lambda k, p: relu_sum(p)))
    perturbed = optax.perturbations.make_perturbed_fun(
        relu_sum, num_samples=8, sigma=mu, noise=optax.perturbations.Normal())
    theirs = many(lambda key: jax.grad(perturbed, argnums=1)(key, x), seed=1)
    exact = norm.cdf(x / mu)
    assert_unbiased(ours, exact, what="two-point")
    assert_unbiased(theirs, exact, what="optax.perturbations")
    assert_same_mean(ours, theirs, what="two-point vs optax.perturbations")


def test_pytree_gradient_estimate_and_step():
    params = {"a": jnp.ones((2,)), "b": jnp.asarray(0.5)}

    def objective(key, p):
        return jnp.sum(p["a"] ** 2) + 3.0 * p["b"]

    backend = ZerothOrderSGD(optax.adam(0.1), smoothing=1e-2, num_directions=2000)
    grads = backend.estimate_gradient(jax.random.key(0), params, objective)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # 2,000 directions: the estimate is within about 3 standard errors of the gradient
    assert np.allclose(grads["a"], 2.0, atol=0.5) and abs(float(grads["b"]) - 3.0) < 0.7
    state = backend.init(jax.random.key(1), params, objective)
    assert isinstance(state, ZerothOrderState)
    new, info = jax.jit(lambda s: backend.step(jax.random.key(2), s, objective))(state)
    # info.value: the mean of the 2q evaluations, an estimate of the smoothed objective
    # f_mu(x) = f(x) + mu² tr(H) / 2 = f(x) + 2 mu² (noise about 5e-6 at 2,000 directions)
    smoothed = float(objective(None, params)) + 2 * 1e-2**2
    assert float(info.value) == pytest.approx(smoothed, abs=3e-5)
    assert np.isfinite(info.grad_norm) and info.grad_norm > 0
    assert float(new.params["b"]) < 0.5


def linear_directions(backend, slope, num):
    def one(key):
        return backend.estimate_direction(key, jnp.zeros(slope.shape), lambda k, x: slope @ x)

    return many(one, num=num)


def test_rank_direction_points_along_the_gradient():
    """For a linear f(x) = a·x the mean rank direction is parallel to a (cosine > 0.99 from
    10^4 estimates), for a full ranking and for a top-k ranking."""
    slope = jnp.array([1.0, -2.0, 0.5, 0.0, 3.0])
    for num_ranked in (None, 2):
        backend = ZerothOrderRankSGD(smoothing=0.1, num_candidates=6, num_ranked=num_ranked)
        mean = np.asarray(linear_directions(backend, slope, 10_000)).mean(0)
        cosine = mean @ slope / (np.linalg.norm(mean) * np.linalg.norm(slope))
        assert cosine > 0.99, (num_ranked, cosine)


def test_rank_direction_is_the_comparison_graph_sum():
    """g = Σ_{(a,b) ∈ E} (ξ_b - ξ_a) / |E| for the graph of a top-k ranking, checked
    against an explicit sum over the pairs."""
    m, k, mu = 5, 3, 0.2
    x = jnp.array([0.5, -1.0])
    seen = []
    order = np.array([3, 0, 4, 1, 2])

    def oracle(key, candidates):
        seen.append(np.asarray(candidates))
        return jnp.asarray(order)

    backend = ZerothOrderRankSGD(smoothing=mu, num_candidates=m, num_ranked=k,
                                 ranking_oracle=oracle)
    direction = backend.estimate_direction(jax.random.key(0), x, None)
    xi = (seen[0] - np.asarray(x)) / mu
    edges = [(order[i], order[j]) for i, j in itertools.combinations(range(m), 2) if i < k]
    expected = sum(xi[b] - xi[a] for a, b in edges) / len(edges)
    assert len(edges) == k * (k - 1) // 2 + k * (m - k)
    assert np.allclose(direction, expected, atol=1e-5)


def test_rank_sgd_converges_on_a_quadratic_from_rankings_alone():
    """d = 10, f(x) = Σ_i s_i (x_i - 1)², rankings from the default oracle; 1,000 steps of
    10 candidates with a cosine-decayed step: within 0.05 of the minimiser."""
    scales = jnp.linspace(0.5, 2.0, 10)

    @px.expectation
    def loss(x):
        return jnp.sum(scales * (x - 1.0) ** 2)

    backend = ZerothOrderRankSGD(optax.cosine_decay_schedule(0.2, 1000, 0.005),
                                 smoothing=0.05, num_candidates=10)
    result = px.fit(loss, jnp.zeros(10), backend, 1000, jax.random.key(0), maximize=False,
                    progress=False)
    assert np.max(np.abs(result.params - 1.0)) < 0.05
    assert np.all(np.isnan(result.history.grad_norm))


def test_a_host_oracle_through_pure_callback_gives_the_same_steps():
    """A ranking computed on the host (where a person at a prompt would answer) through
    `jax.pure_callback` gives the same run as the same ranking computed in JAX."""
    target = jnp.array([1.0, -1.0, 2.0])

    def judge(key, candidates):
        return jnp.argsort(jnp.sum((candidates - target) ** 2, axis=1)).astype(jnp.int32)

    def host(candidates):
        distances = np.sum((np.asarray(candidates) - np.asarray(target)) ** 2, axis=1)
        return np.argsort(distances, kind="stable").astype(np.int32)

    def host_judge(key, candidates):
        shape = jax.ShapeDtypeStruct((candidates.shape[0],), jnp.int32)
        return jax.pure_callback(host, shape, candidates)

    results = []
    for oracle in (judge, host_judge):
        backend = ZerothOrderRankSGD(0.05, num_candidates=4, ranking_oracle=oracle,
                                     report_value=False)
        results.append(_run(backend, jnp.zeros(3), 50))
    assert np.allclose(results[0], results[1])
    assert np.linalg.norm(results[0] - target) < np.linalg.norm(target)


def _run(backend, params, num_steps):
    state = backend.init(jax.random.key(0), params, None)
    step = jax.jit(lambda k, s: backend.step(k, s, None))
    for i in range(num_steps):
        state, info = step(jax.random.key(i), state)
        assert np.isnan(info.value)
    return np.asarray(backend.params(state))


def test_rank_by_objective_uses_common_random_numbers():
    @px.expectation
    def noisy(x):
        return jnp.sum(x**2) + px.sample(dist.Normal(0.0, 10.0))

    oracle = rank_by_objective(noisy)
    candidates = jnp.array([[3.0], [0.1], [-1.0], [2.0]])
    for seed in range(5):  # the shared noise never changes the order
        assert oracle(jax.random.key(seed), candidates).tolist() == [1, 2, 3, 0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="smoothing must be finite and positive"):
        ZerothOrderSGD(smoothing=0.0)
    with pytest.raises(ValueError, match="num_directions must be at least 1"):
        ZerothOrderSGD(num_directions=0)
    with pytest.raises(TypeError, match="num_directions must be an int"):
        ZerothOrderSGD(num_directions=2.0)
    with pytest.raises(ValueError, match="step size"):
        ZerothOrderSGD(-0.1)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        ZerothOrderSGD("adam")
    with pytest.raises(ValueError, match="num_candidates must be at least 2"):
        ZerothOrderRankSGD(num_candidates=1)
    with pytest.raises(ValueError, match="num_ranked .* at most num_candidates"):
        ZerothOrderRankSGD(num_candidates=4, num_ranked=5)
    with pytest.raises(ValueError, match="num_ranked must be at least 1"):
        ZerothOrderRankSGD(num_ranked=0)
    with pytest.raises(TypeError, match="ranking_oracle must be None or a callable"):
        ZerothOrderRankSGD(ranking_oracle="human")
    backend = ZerothOrderRankSGD(num_candidates=4,
                                 ranking_oracle=lambda key, c: jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="must return 4 integer indices"):
        backend.estimate_direction(jax.random.key(0), jnp.zeros(2), None)


# ------------------------------------------------------------------------------ QZO


def test_quantize_round_trip_and_errors():
    from ppl_ext.optim import dequantize, quantize

    w = {"a": jax.random.normal(jax.random.key(0), (4, 16)), "b": jnp.zeros((2, 3))}
    codes, scales = quantize(w, num_bits=4)
    assert codes["a"].dtype == jnp.int8 and int(jnp.max(jnp.abs(codes["a"]))) <= 7
    assert scales["a"].shape == (4, 1)
    back = dequantize(codes, scales)
    assert bool(jnp.all(jnp.abs(back["a"] - w["a"]) <= scales["a"] / 2 + 1e-6))
    np.testing.assert_array_equal(back["b"], 0.0)  # an all-zero group stays exact
    with pytest.raises(ValueError, match="num_bits"):
        quantize(w, num_bits=1)
    with pytest.raises(TypeError, match="floating"):
        quantize(jnp.arange(3), num_bits=4)


def test_qzo_clips_every_directional_derivative():
    """On F(s) = a Σ s one direction gives d = a Σz: unclipped g = a (Σz) z, so
    Σ g = a (Σz)^2 and |z| = |g| / (a |Σz|); clipped, g' = clip(d, -C, C) z, parallel to g
    with |g'| = min(C, |d|) |z| = C |z| here (|d| is far above C)."""
    from ppl_ext.optim import QuantizedZerothOrderSGD

    a, clip = 1e4, 2.0

    @px.expectation
    def steep(s):
        return a * jnp.sum(s)

    scales, key = jnp.ones(6), jax.random.key(4)
    free = np.asarray(QuantizedZerothOrderSGD(1e-3, smoothing=1e-2, clip=None)
                      .estimate_gradient(key, scales, steep), np.float64)
    clipped = np.asarray(QuantizedZerothOrderSGD(1e-3, smoothing=1e-2, clip=clip)
                         .estimate_gradient(key, scales, steep), np.float64)
    d = a * np.sqrt(free.sum() / a)  # |d| = a |Σz|
    z_norm = np.linalg.norm(free) / d
    assert d > 10 * clip
    np.testing.assert_allclose(np.linalg.norm(clipped), clip * z_norm, rtol=1e-3)
    cosine = abs(free @ clipped) / (np.linalg.norm(free) * np.linalg.norm(clipped))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


def test_qzo_fits_scales_and_keeps_them_non_negative():
    """4-bit weights whose scales start 30% too small: QZO through px.fit brings the
    least-squares loss below 5% of its start; scales pulled below zero stop at 0 (each
    step's noisy update may leave a coordinate slightly above it)."""
    from ppl_ext.optim import QuantizedZerothOrderSGD, dequantize, quantize

    w_true = jax.random.normal(jax.random.key(0), (3, 8))
    codes, scales = quantize(w_true, num_bits=4)
    x = jax.random.normal(jax.random.key(1), (64, 8))

    @px.expectation
    def loss(s):
        return jnp.mean((x @ dequantize(codes, s).T - x @ w_true.T) ** 2)

    start = 0.7 * scales
    result = px.fit(loss, start, QuantizedZerothOrderSGD(0.002, smoothing=1e-3, clip=5.0),
                    600, jax.random.key(2), maximize=False, progress=False)
    key = jax.random.key(3)
    assert float(loss(key, result.params)) < 0.05 * float(loss(key, start))

    @px.expectation
    def pull_negative(s):
        return jnp.sum((s + 1.0) ** 2)  # minimised at s = -1, outside the scales' range

    result = px.fit(pull_negative, jnp.ones(3), QuantizedZerothOrderSGD(
        0.05, smoothing=1e-3, clip=None), 200, jax.random.key(5), maximize=False,
        progress=False)
    params = np.asarray(result.params)
    assert np.all(params >= 0.0) and np.all(params < 0.1), params  # at the bound, not below


def test_qzo_bad_settings():
    from ppl_ext.optim import QuantizedZerothOrderSGD

    with pytest.raises(ValueError, match="clip"):
        QuantizedZerothOrderSGD(clip=0.0)
    with pytest.raises(ValueError, match="num_directions"):
        QuantizedZerothOrderSGD(num_directions=0)


# ---------------------------------------------------------------------------------------
# ZO-RankSGD with the ranking line search: issue 15's query comparison and Rosenbrock


def _exact_values(backend, objective, exact, x0, num_steps, seed=0, final=False):
    """Run `num_steps` steps in one `lax.scan`; the exact objective after each step (and the
    final parameters with `final=True`)."""
    state = backend.init(jax.random.key(0), x0, objective)

    def body(state, key):
        state, _ = backend.step(key, state, objective)
        return state, exact(backend.params(state))

    keys = jax.random.split(jax.random.key(seed), num_steps)
    state, values = jax.jit(lambda s: jax.lax.scan(body, s, keys))(state)
    values = np.asarray(values)
    return (values, np.asarray(backend.params(state))) if final else values


def _steps_to(values, target):
    reached = np.flatnonzero(values <= target)
    assert reached.size, f"never reached {target} (last value {values[-1]})"
    return int(reached[0]) + 1


def test_rank_sgd_needs_at_most_1_5x_the_queries_of_zo_sgd_on_a_d100_quadratic():
    """d = 100, f(x) = |x - 1|², from 0 to f ≤ 1e-4 f(0). ZO-SGD: two-point estimates along
    one direction (2 queries a step) at its best constant step 1 / (L (d + 2)) (L = 2: the
    step minimising the expected next value). ZO-RankSGD: rankings only, 10 candidates and
    a 3-point ranking line search (13 queries a step, no schedule to tune). Rank-based
    queries at most 1.5x the value-based ones (here about 0.6-1x)."""
    d = 100

    def exact(x):
        return jnp.sum((x - 1.0) ** 2)

    quadratic = px.expectation(exact)
    target = 1e-4 * d
    zo = ZerothOrderSGD(1.0 / (2 * (d + 2)), smoothing=1e-3, num_directions=1)
    rank = ZerothOrderRankSGD(0.1, smoothing=1e-3, num_candidates=10, num_step_sizes=3,
                              report_value=False)
    zo_queries = 2 * _steps_to(_exact_values(zo, quadratic, exact, jnp.zeros(d), 1400), target)
    rank_queries = 13 * _steps_to(_exact_values(rank, quadratic, exact, jnp.zeros(d), 250),
                                  target)
    assert rank_queries <= 1.5 * zo_queries, (rank_queries, zo_queries)


def test_rank_sgd_converges_on_rosenbrock_from_rankings_alone():
    """The 2-D Rosenbrock function from (-1.2, 1) (its classic start, f = 24.2): a judge that
    only orders candidates by f, the step length from the ranking line search. Down the
    curved valley: after 500 steps f < 0.05, after 1,500 f < 0.01 and within 0.2 of the
    minimiser (1, 1) in every coordinate (the valley floor is slow for every first-order
    method; bench_zo.py runs longer and in d = 10 and 100)."""

    def rosenbrock(x):
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    def judge(key, candidates):
        return jnp.argsort(jax.vmap(rosenbrock)(candidates))

    backend = ZerothOrderRankSGD(1e-3, smoothing=1e-3, num_candidates=10, num_step_sizes=3,
                                 ranking_oracle=judge, report_value=False)
    values, final = _exact_values(backend, None, rosenbrock, jnp.array([-1.2, 1.0]), 1500,
                                  final=True)
    assert values[499] < 0.05 and values[-1] < 0.01, (values[499], values[-1])
    assert np.max(np.abs(final - 1.0)) < 0.2, final


def test_rank_line_search_settings_are_checked():
    with pytest.raises(ValueError, match="num_step_sizes"):
        ZerothOrderRankSGD(0.1, num_step_sizes=1)
    with pytest.raises(TypeError, match="initial step size"):
        ZerothOrderRankSGD(optax.adam(0.1), num_step_sizes=3)
    backend = ZerothOrderRankSGD(0.1, num_candidates=4, num_step_sizes=3, report_value=False,
                                 ranking_oracle=lambda key, c: jnp.arange(4))
    state = backend.init(jax.random.key(0), jnp.zeros(2), None)
    with pytest.raises(ValueError, match="must return 3 integer indices"):
        backend.step(jax.random.key(1), state, None)
