"""Hessian spectrum by Lanczos / stochastic Lanczos quadrature (`px.optim.hessian_spectrum`).

Exact values come from numpy (`eigvalsh`, traces of explicit matrices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext as px
from ppl_ext.optim import hessian_spectrum, hessian_vector_product, plot_spectrum
from tests.helpers import assert_unbiased

K_SE = 4


def matrix_with_spectrum(eigenvalues, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues)) @ q.T


def bulk_and_outliers(dim=50, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([0.1 * rng.normal(size=dim - 3), [4.0, 9.0, 25.0]])


def test_top_ritz_values_match_the_top_eigenvalues():
    with jax.enable_x64(True):
        matrix = matrix_with_spectrum(bulk_and_outliers())
        exact = np.sort(np.linalg.eigvalsh(matrix))[::-1][:3]
        result = hessian_spectrum(jax.random.key(0), lambda v: jnp.asarray(matrix) @ v,
                                  jnp.zeros(50), num_lanczos_steps=20, num_probes=3)
        np.testing.assert_allclose(result.top_eigenvalues(3), exact, rtol=1e-8)
        # interlacing: no Ritz value above the largest eigenvalue
        assert float(jnp.max(result.ritz_values)) <= exact[0] * (1 + 1e-12)


def test_full_length_run_recovers_every_eigenvalue_once():
    """d steps with full reorthogonalisation give T similar to H: all eigenvalues, no
    spurious copies (plain Lanczos in floating point duplicates converged ones)."""
    with jax.enable_x64(True):
        eigenvalues = bulk_and_outliers(40, seed=1)
        matrix = matrix_with_spectrum(eigenvalues, seed=1)
        result = hessian_spectrum(jax.random.key(1), lambda v: jnp.asarray(matrix) @ v,
                                  jnp.zeros(40), num_lanczos_steps=40, num_probes=2)
        for row in np.asarray(result.ritz_values):
            np.testing.assert_allclose(row, np.sort(np.linalg.eigvalsh(matrix)), atol=1e-9)


def test_low_rank_matrix_breakdown_restarts_and_keeps_weights():
    """Rank 3: the Krylov space is invariant after 3 steps; the run restarts (zero
    coupling) and the quadrature weights of the first block still sum to one."""
    with jax.enable_x64(True):
        eigenvalues = np.array([1.0, 2.0, 3.0] + [0.0] * 17)
        matrix = matrix_with_spectrum(eigenvalues, seed=2)
        result = hessian_spectrum(jax.random.key(2), lambda v: jnp.asarray(matrix) @ v,
                                  jnp.zeros(20), num_lanczos_steps=8, num_probes=4)
        assert np.all(np.isfinite(result.ritz_values))
        np.testing.assert_allclose(result.ritz_weights.sum(-1), 1.0, atol=1e-12)
        np.testing.assert_allclose(result.top_eigenvalues(3), [3.0, 2.0, 1.0], atol=1e-9)
        assert np.all(np.asarray(result.moments(2)) > 0)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_slq_moments_are_unbiased_for_degree_below_twice_the_steps(probes):
    """With s = 2 steps, Σ τ² θ^p = uᵀ H^p u exactly for p ≤ 3, so the probe mean is
    Hutchinson-unbiased for tr(H^p)/d; compared with numpy's traces within K_SE SEs."""
    with jax.enable_x64(True):
        eigenvalues = bulk_and_outliers(12, seed=3)
        matrix = matrix_with_spectrum(eigenvalues, seed=3)
        result = hessian_spectrum(jax.random.key(3), lambda v: jnp.asarray(matrix) @ v,
                                  jnp.zeros(12), num_lanczos_steps=2, num_probes=10_000,
                                  probes=probes)
        for power in (1, 2, 3):
            exact = np.trace(np.linalg.matrix_power(matrix, power)) / 12
            assert_unbiased(np.asarray(result.moments(power)), exact, k=K_SE,
                            what=f"tr(H^{power})/d, {probes}")


def test_density_integrates_to_one_and_has_the_estimated_mean():
    with jax.enable_x64(True):
        matrix = matrix_with_spectrum(bulk_and_outliers(30, seed=4), seed=4)
        result = hessian_spectrum(jax.random.key(4), lambda v: jnp.asarray(matrix) @ v,
                                  jnp.zeros(30), num_lanczos_steps=10, num_probes=5)
        grid = np.linspace(-5.0, 35.0, 40_001)
        density = np.asarray(result.density(jnp.asarray(grid), 0.05))
        step = grid[1] - grid[0]
        np.testing.assert_allclose(density.sum() * step, 1.0, atol=1e-6)
        np.testing.assert_allclose((grid * density).sum() * step,
                                   float(result.moments(1).mean()), atol=1e-6)


def test_hessian_vector_product_on_a_pytree_matches_the_dense_hessian():
    """f(p) = ½ zᵀ A z + Σ z³/3 with z the flattened tree: Hessian A + diag(2z)."""
    with jax.enable_x64(True):
        a = matrix_with_spectrum(np.arange(1.0, 6.0), seed=5)
        params = {"u": jnp.array([0.1, -0.2]), "w": {"v": jnp.array([0.3, 0.0, 0.5])}}
        z = np.array([0.1, -0.2, 0.3, 0.0, 0.5])

        def f(p):
            flat = jnp.concatenate([p["u"], p["w"]["v"]])
            return 0.5 * flat @ jnp.asarray(a) @ flat + jnp.sum(flat**3) / 3

        exact = np.linalg.eigvalsh(a + np.diag(2 * z))
        result = hessian_spectrum(jax.random.key(5), hessian_vector_product(f, params), params,
                                  num_lanczos_steps=5, num_probes=1)
        np.testing.assert_allclose(result.ritz_values[0], exact, atol=1e-9)


def test_deterministic_expectation_is_accepted_and_random_one_refused():
    import numpyro.distributions as dist

    @px.expectation
    def smooth(x):
        return jnp.sum(x**4)

    @px.expectation
    def noisy(x):
        return jnp.sum((px.sample(dist.Normal(x, 1.0)) - 1.0) ** 2)

    x = jnp.array([1.0, 2.0])
    np.testing.assert_allclose(hessian_vector_product(smooth, x)(jnp.ones(2)), 12 * x**2)
    with pytest.raises(ValueError, match="has sample sites"):
        hessian_vector_product(noisy, x)


def test_bad_inputs_raise():
    hvp = lambda v: 2.0 * v  # noqa: E731
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_lanczos_steps must be at least 1"):
        hessian_spectrum(key, hvp, jnp.zeros(3), num_lanczos_steps=0)
    with pytest.raises(ValueError, match="num_probes must be at least 1"):
        hessian_spectrum(key, hvp, jnp.zeros(3), num_lanczos_steps=2, num_probes=0)
    with pytest.raises(ValueError, match=r"exceeds the number of parameters d = 3"):
        hessian_spectrum(key, hvp, jnp.zeros(3), num_lanczos_steps=4)
    with pytest.raises(ValueError, match="probes must be one of"):
        hessian_spectrum(key, hvp, jnp.zeros(3), num_lanczos_steps=2, probes="rademacer")
    with pytest.raises(ValueError, match="hvp\\(v\\) must return a tree like params"):
        hessian_spectrum(key, lambda v: jnp.zeros(4), jnp.zeros(3), num_lanczos_steps=2)
    with pytest.raises(TypeError, match="hvp must be a callable"):
        hessian_spectrum(key, jnp.eye(3), jnp.zeros(3), num_lanczos_steps=2)
    with pytest.raises(ValueError, match="no array leaves"):
        hessian_spectrum(key, hvp, {}, num_lanczos_steps=1)
    result = hessian_spectrum(key, hvp, jnp.zeros(3), num_lanczos_steps=2, num_probes=2)
    with pytest.raises(ValueError, match="num_eigenvalues \\(3\\) exceeds"):
        result.top_eigenvalues(3)
    with pytest.raises(ValueError, match="width must be finite and positive"):
        result.density(jnp.zeros(3), 0.0)


def test_plot_spectrum_draws_a_line():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    result = hessian_spectrum(jax.random.key(0), lambda v: jnp.arange(1.0, 6.0) * v,
                              jnp.zeros(5), num_lanczos_steps=5, num_probes=2)
    ax = plot_spectrum(result, label="diag(1..5)")
    assert len(ax.get_lines()) == 1
    import matplotlib.pyplot as plt

    plt.close(ax.figure)
