"""Consensus-based back-ends: global minimisation, the gradient link, several modes, sampling.

The objectives are deterministic (except where stated), so the checks are on fixed seeds
with stated thresholds rather than standard errors; each threshold sits well inside the
margin seen over other seeds, and each check fails for a broken method (a wrong sign, a
missing weight, an unpolarised consensus).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.stats

import ppl_ext as px
from ppl_ext.optim import (
    CBO,
    ConsensusBasedSampling,
    ConsensusHopping,
    ConsensusState,
    PolarisedCBO,
)
from ppl_ext.optim._cbo import QUANTISED_LEVELS
from tests.helpers import assert_unbiased, tree_allclose


def rastrigin(key, x):
    """The standard (unnormalised) Rastrigin function: global minimum 0 at the origin."""
    return 10 * x.size + jnp.sum(x**2 - 10 * jnp.cos(2 * jnp.pi * x))


def run(backend, objective, params, num_steps, key):
    """`init` then `num_steps` steps in a `lax.scan` (vmappable over `key`)."""
    key_init, key_steps = jax.random.split(key)
    state = backend.init(key_init, params, objective)

    def body(state, k):
        return backend.step(k, state, objective)[0], None

    state, _ = jax.lax.scan(body, state, jax.random.split(key_steps, num_steps))
    return state


@pytest.mark.parametrize("increments", ["gaussian", "quantised"])
def test_cbo_finds_the_global_minimiser_of_rastrigin(increments):
    """d = 5, CBXpy's Rastrigin settings (N = 40, anisotropic, α = 30, σ = 10.1, dt = 0.01,
    x0 uniform on [-3, 3]^d), 600 steps; success (best particle within 0.25 of the origin
    in max-norm, CBXpy's criterion) in at least 95 of 100 independent runs."""
    backend = CBO(num_particles=40, alpha=30.0, sigma=10.1, dt=0.01, noise="anisotropic",
                  init_bounds=(-3.0, 3.0), estimate="best", increments=increments)
    keys = jax.random.split(jax.random.key(0), 100)
    states = jax.jit(jax.vmap(lambda k: run(backend, rastrigin, jnp.zeros(5), 600, k)))(keys)
    success = np.max(np.abs(np.asarray(states.best_params)), axis=1) < 0.25
    assert success.sum() >= 95, f"{success.sum()} / 100 runs found the global minimiser"
    # the tracked best is the best evaluated value, and it is Rastrigin at best_params
    values = jax.vmap(lambda x: rastrigin(None, x))(states.best_params)
    assert np.allclose(values, states.best_value, rtol=1e-5, atol=1e-5)


def test_quantised_increments_have_the_moments_of_euler_maruyama():
    """The 256 levels have mean 0, variance 1 and third moment 0 (the weak-order-1
    conditions), each is drawn with probability 1/256, and one CBO step from a fixed cloud
    has Euler-Maruyama's per-coordinate mean `x - λ dt (x - m)` and variance
    `σ² dt (x - m)²` (anisotropic), against those closed forms within K_SE."""
    levels = np.asarray(QUANTISED_LEVELS)
    assert levels.shape == (256,)
    assert abs(levels.mean()) < 1e-15 and abs(np.mean(levels**3)) < 1e-14
    assert abs(np.mean(levels**2) - 1.0) < 1e-14
    backend = CBO(num_particles=8, alpha=2.0, sigma=1.5, dt=0.1, drift_rate=1.0,
                  increments="quantised")
    flat = jax.random.normal(jax.random.key(1), (8, 5))
    values = jnp.sum(flat**2, axis=1)
    moved = jax.jit(jax.vmap(lambda k: backend._move(k, flat, values)[0]))(
        jax.random.split(jax.random.key(2), 20_000))
    consensus = np.asarray(backend._move(jax.random.key(0), flat, values)[1])
    drift = np.asarray(flat) - consensus
    mean = np.asarray(flat) - 0.1 * drift
    xi = (np.asarray(moved) - mean) / (1.5 * np.sqrt(0.1) * drift)
    # every draw is one of the levels; the level counts pass a chi-square test of
    # uniformity at level 1e-4 (255 degrees of freedom)
    index = np.searchsorted((levels[1:] + levels[:-1]) / 2, xi.reshape(-1))  # nearest level
    assert np.allclose(xi.reshape(-1), levels[index], atol=1e-3)
    counts = np.bincount(index, minlength=256)
    expected = index.size / 256
    assert np.sum((counts - expected) ** 2 / expected) < scipy.stats.chi2.ppf(1 - 1e-4, 255)
    assert_unbiased(np.asarray(moved).reshape(20_000, -1), mean.reshape(-1), what="step mean")
    assert_unbiased(((np.asarray(moved) - mean) ** 2).reshape(20_000, -1),
                    (1.5**2 * 0.1 * drift**2).reshape(-1), what="step variance")


def test_drift_follows_minus_the_gradient_at_the_consensus_point():
    """The stochastic-relaxation claim of "Gradient is All You Need?": with σ = 0 the mean
    displacement of the cloud is λ dt (m - x̄), and for a smooth convex f and large α,
    m ≈ argmin_y f(y) + |y - x̄|² / (2τ) (an implicit gradient step), so the mean drift is
    parallel to -∇f(m). Cosine similarity above 0.9 (0.98 at these settings)."""
    scales = jnp.array([1.0, 4.0, 10.0])

    def f(x):
        return 0.5 * jnp.sum(scales * x**2) + 0.25 * jnp.sum(x**4)

    def objective(key, x):
        return f(x)

    backend = CBO(num_particles=20_000, alpha=1000.0, sigma=0.0, dt=0.1, init_scale=0.1)
    state = backend.init(jax.random.key(0), jnp.ones(3), objective)
    new, _ = backend.step(jax.random.key(1), state, objective)
    drift = new.particles.mean(0) - state.particles.mean(0)
    gradient = jax.grad(f)(new.consensus)
    cosine = drift @ -gradient / (jnp.linalg.norm(drift) * jnp.linalg.norm(gradient))
    assert cosine > 0.9, cosine
    # the step is exactly -λ dt (x̄ - m): the drift is towards the consensus point
    expected = backend.drift_rate * backend.dt * (new.consensus - state.particles.mean(0))
    assert np.allclose(drift, expected, atol=1e-5)


def test_consensus_hopping_is_an_implicit_gradient_step():
    """For f(x) = |x|²/2 and samples y ~ N(x, σ²), the consensus point's mean-field value
    is x / (1 + ασ²) (a proximal step with step size ασ²); 20,000 samples, within 2 %."""

    def objective(key, x):
        return 0.5 * jnp.sum(x**2)

    backend = ConsensusHopping(num_particles=20_000, alpha=5.0, sigma=0.2)
    x = jnp.array([1.0, -2.0])
    state = backend.init(jax.random.key(0), x, objective)
    new, _ = backend.step(jax.random.key(1), state, objective)
    expected = x / (1.0 + backend.alpha * backend.sigma**2)
    assert np.allclose(new.consensus, expected, rtol=0.02), (new.consensus, expected)


def test_polarised_cbo_finds_both_minima_of_two_wells():
    """f(x) = (x₁² - 4)² + x₂², minimal at (±2, 0). In each of 12 runs, at least 20 % of
    the particles end within 0.3 of each minimum; plain CBO gathers at one minimum."""

    def two_wells(key, x):
        return (x[0] ** 2 - 4.0) ** 2 + x[1] ** 2

    minima = jnp.array([[-2.0, 0.0], [2.0, 0.0]])

    def fractions(particles):  # (runs, particles, 2) -> (runs, 2)
        distance = jnp.linalg.norm(particles[:, :, None, :] - minima, axis=-1)
        return jnp.mean(distance < 0.3, axis=1)

    keys = jax.random.split(jax.random.key(0), 12)
    polarised = PolarisedCBO(num_particles=100, alpha=10.0, sigma=0.8, dt=0.1,
                             kernel_width=0.5, init_bounds=(-4.0, 4.0))
    states = jax.jit(jax.vmap(lambda k: run(polarised, two_wells, jnp.zeros(2), 400, k)))(keys)
    found = fractions(states.particles)
    assert np.all(found >= 0.2), found
    plain = CBO(num_particles=100, alpha=10.0, sigma=0.8, dt=0.1, init_bounds=(-4.0, 4.0))
    states = jax.jit(jax.vmap(lambda k: run(plain, two_wells, jnp.zeros(2), 400, k)))(keys)
    assert np.all(np.min(fractions(states.particles), axis=1) < 0.2)


def test_consensus_based_sampling_matches_a_gaussian_target():
    """CBS in sampling mode on N(μ, Σ), μ = (1, -1), Σ = [[1, .5], [.5, 2]], through
    `px.fit` on the log density (maximised: the back-end sees -log p). 2,000 particles,
    200 steps; the moments averaged over the last 100 clouds: mean within 0.05, covariance
    entries within 0.1 (finite-N bias and Monte-Carlo error are about 0.02 here)."""
    mean = jnp.array([1.0, -1.0])
    covariance = jnp.array([[1.0, 0.5], [0.5, 2.0]])

    @px.expectation
    def log_density(x):
        return dist.MultivariateNormal(mean, covariance).log_prob(x)

    moments = []

    def record(step, state, history):
        x = np.asarray(state.particles, np.float64)
        if step > 100:
            moments.append((x.mean(0), np.cov(x.T)))

    backend = ConsensusBasedSampling(num_particles=2000, alpha=1.0, dt=0.5, init_scale=3.0)
    px.fit(log_density, jnp.zeros(2), backend, 200, jax.random.key(0), chunk_size=1,
           callbacks=record, progress=False)
    sample_mean = np.mean([m for m, _ in moments], axis=0)
    sample_covariance = np.mean([c for _, c in moments], axis=0)
    assert np.allclose(sample_mean, mean, atol=0.05), sample_mean
    assert np.allclose(sample_covariance, covariance, atol=0.1), sample_covariance


def test_consensus_based_sampling_optimisation_mode_contracts():
    """In optimisation mode the cloud collapses onto the minimiser (0 here)."""

    def objective(key, x):
        return jnp.sum(x**2) + jnp.sum(jnp.abs(x))

    backend = ConsensusBasedSampling(num_particles=100, alpha=30.0, dt=0.5,
                                     mode="optimisation", init_scale=2.0)
    state = run(backend, objective, jnp.ones(3), 200, jax.random.key(0))
    assert np.max(np.abs(state.consensus)) < 0.05
    assert np.max(np.std(np.asarray(state.particles), axis=0)) < 0.05


def test_cloud_sharded_over_two_devices_matches_one_device():
    """The particle axis sharded over the two host devices gives the one-device result.

    Sums across the shards round differently, so results agree to float tolerance; the
    objective is smooth so that rounding differences do not grow (on Rastrigin with large
    noise they do after some tens of steps: the dynamics are chaotic there)."""

    @px.expectation
    def loss(params):
        x = px.sample(dist.Normal(0.0, 0.1))
        return jnp.sum((params["w"] - 1.0) ** 2) + jnp.sum(params["b"] ** 2) * (1.0 + x)

    def particle_sharding(devices):
        mesh = jax.sharding.Mesh(np.array(devices), ("particles",))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("particles"))

    # the reference is "sharded" over one device: a sharded cloud draws its noise with the
    # global threefry layout, an unsharded one with the faster non-partitionable layout
    sharding, single = particle_sharding(jax.devices()[:2]), particle_sharding(jax.devices()[:1])
    params = {"w": jnp.zeros(3), "b": jnp.ones(2)}
    for build in (lambda **kw: CBO(num_particles=64, alpha=30.0, init_scale=2.0, **kw),
                  lambda **kw: CBO(num_particles=64, alpha=30.0, init_scale=2.0,
                                   increments="quantised", **kw),
                  lambda **kw: PolarisedCBO(num_particles=64, kernel_width=1.0, **kw)):
        one = px.fit(loss, params, build(sharding=single), 30, jax.random.key(0),
                     maximize=False, progress=False)
        two = px.fit(loss, params, build(sharding=sharding), 30, jax.random.key(0),
                     maximize=False, progress=False)
        assert len(two.state.particles["w"].sharding.device_set) == 2
        assert tree_allclose(one.params, two.params, rtol=1e-4, atol=1e-5)
        assert tree_allclose(one.state.particles, two.state.particles, rtol=1e-4, atol=1e-5)
        assert np.allclose(one.history.value, two.history.value, rtol=1e-4, atol=1e-5)


def test_pytree_state_and_info():
    params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(())}

    def objective(key, p):
        return jnp.sum((p["a"] - 1.0) ** 2) + p["b"] ** 2

    backend = CBO(num_particles=16)
    state = backend.init(jax.random.key(0), params, objective)
    assert isinstance(state, ConsensusState)
    assert state.particles["a"].shape == (16, 2, 2) and state.particles["b"].shape == (16,)
    assert tree_allclose(backend.params(state), params)  # before any step: the given params
    new, info = jax.jit(lambda s: backend.step(jax.random.key(1), s, objective))(state)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert np.isnan(info.grad_norm) and info.value == objective(None, params)
    assert float(new.best_value) == float(jnp.min(new.values))
    for estimate in ("best", "mean"):
        other = CBO(num_particles=16, estimate=estimate)
        assert jax.tree.structure(other.params(new)) == jax.tree.structure(params)


def test_stable_at_huge_alpha_and_with_nan_values():
    """logsumexp weights: α = 1e8 picks the best particle; NaN estimates get zero weight."""

    def objective(key, x):
        value = jnp.sum(x**2)
        return jnp.where(x[0] > 1.0, jnp.nan, value)

    backend = CBO(num_particles=200, alpha=1e8, init_scale=2.0)
    state = backend.init(jax.random.key(0), jnp.zeros(2), objective)
    new, _ = backend.step(jax.random.key(1), state, objective)
    assert np.all(np.isfinite(new.consensus)) and np.all(np.isfinite(new.particles))
    assert np.allclose(new.consensus, new.best_params)
    assert new.consensus[0] <= 1.0


def test_init_bounds_draws_uniformly_on_the_box():
    backend = CBO(num_particles=1000, init_bounds=(jnp.array([-1.0, 2.0]), 3.0))
    state = backend.init(jax.random.key(0), jnp.zeros(2), None)
    x = np.asarray(state.particles)
    assert x[:, 0].min() >= -1.0 and x[:, 1].min() >= 2.0 and x.max() <= 3.0
    assert x[:, 0].mean() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("cls", [CBO, PolarisedCBO, ConsensusBasedSampling, ConsensusHopping])
def test_bad_settings_are_refused(cls):
    with pytest.raises(ValueError, match="num_particles must be at least 1"):
        cls(num_particles=0)
    with pytest.raises(ValueError, match="num_particles must be at least 1"):
        cls(num_particles=-5)
    with pytest.raises(TypeError, match="num_particles must be an int"):
        cls(num_particles=10.0)
    with pytest.raises(ValueError, match="alpha must be finite and positive"):
        cls(alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be finite and positive"):
        cls(alpha=-1.0)
    with pytest.raises(ValueError, match="estimate must be one of"):
        cls(estimate="median")
    with pytest.raises(ValueError, match="init_bounds needs low < high"):
        cls(init_bounds=(1.0, 1.0))
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        cls(num_samples=0)
    if cls is not ConsensusHopping:
        with pytest.raises(ValueError, match="dt must be finite and positive"):
            cls(dt=0.0)
        with pytest.raises(ValueError, match="dt must be finite and positive"):
            cls(dt=-0.1)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"CBO.noise must be one of 'isotropic', 'anisotropic'"):
        CBO(noise="gaussian")
    with pytest.raises(ValueError, match="PolarisedCBO.noise must be one of"):
        PolarisedCBO(noise="Isotropic")
    with pytest.raises(ValueError, match="CBO.increments must be one of 'gaussian', 'quantised'"):
        CBO(increments="rademacher")
    with pytest.raises(ValueError, match="PolarisedCBO.increments must be one of"):
        PolarisedCBO(increments="normal")
    with pytest.raises(ValueError, match="mode must be one of 'sampling', 'optimisation'"):
        ConsensusBasedSampling(mode="optimization")
    with pytest.raises(ValueError, match="sigma must be finite and non-negative"):
        CBO(sigma=-1.0)
    with pytest.raises(ValueError, match="sigma must be finite and positive"):
        ConsensusHopping(sigma=0.0)
    with pytest.raises(ValueError, match="kernel_width must be finite and positive"):
        PolarisedCBO(kernel_width=0.0)


def test_a_vector_valued_objective_is_refused():
    def objective(key, x):
        return x

    backend = CBO(num_particles=4)
    state = backend.init(jax.random.key(0), jnp.zeros(2), objective)
    with pytest.raises((ValueError, TypeError)):
        backend.step(jax.random.key(1), state, objective)
