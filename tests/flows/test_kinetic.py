"""Kinetic energy of Gaussian paths and kinetic-optimal paths (`ppl_ext/flows/_kinetic.py`).

References written without ppl_ext: the single-point closed forms `|x1|² + d` (Cond-OT)
and `(π²/8)(|x1|² + d)` (cosine), and `tests/flows/exact.py`'s Gauss–Legendre ×
Gauss–Hermite integral of the exact 1-D mixture velocity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext as px
from tests.flows import exact
from tests.helpers import K_SE, assert_within_se

#: a small 2-D data set (six points)
DATA_2D = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 1.5], [0.5, -1.0], [-1.0, -1.0],
                    [1.5, 1.5]], np.float32)
#: VPPath's KE diverges at t = 1 (alpha ~ sqrt(1 - t)): integrate it to 1 - 1e-3 (a
#: lower bound on its KE)
VP_INTERVAL = (0.0, 1.0 - 1e-3)


@pytest.mark.parametrize("dim", [1, 3])
def test_single_point_closed_forms(dim):
    """Cond-OT: |x1|² + d; cosine: (π²/8)(|x1|² + d), to 1e-6 (float64)."""
    x1 = np.array([1.0, -2.0, 0.5])[:dim]
    exact_linear = float(x1 @ x1) + dim
    with jax.enable_x64(True):
        linear = px.flows.conditional_kinetic_energy(px.flows.LinearPath(), jnp.asarray(x1))
        cosine = px.flows.conditional_kinetic_energy(px.flows.TrigonometricPath(),
                                                     jnp.asarray(x1))
        assert linear.dtype == jnp.float64
    assert abs(float(linear) - exact_linear) <= 1e-6
    assert abs(float(cosine) - np.pi**2 / 8 * exact_linear) <= 1e-6


def test_single_point_marginal_estimate_and_ko_is_cond_ot():
    """One data point: the marginal MC estimate matches |x1|² + d, λ ≡ 1 and the KO path
    is Cond-OT (alpha = 1 - t, beta = t)."""
    x1 = np.array([[1.0, -2.0]], np.float32)
    exact_linear = float(np.sum(x1**2)) + 2
    energy = px.flows.marginal_kinetic_energy(jax.random.key(0), px.flows.LinearPath(), x1,
                                              num_samples=2000, num_times=16)
    assert_within_se(float(energy.estimate) - exact_linear, float(energy.standard_error),
                     atol=1e-4, what="single-point marginal KE")
    path = px.flows.KineticOptimalPath.from_data(jax.random.key(1), x1, num_samples=8,
                                                 num_grid=65)
    np.testing.assert_allclose(path.separation.values, 1.0)
    t = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(jax.vmap(path.alpha)(t), 1.0 - t, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(path.beta)(t), t, atol=1e-5)
    np.testing.assert_allclose(float(path.kinetic_energy()), exact_linear, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "trigonometric"])
def test_marginal_ke_matches_quadrature_on_a_1d_mixture(name):
    """The Monte-Carlo marginal KE of the exact field on `exact.DATA` (three points in
    1-D) matches an independent Gauss–Legendre × Gauss–Hermite quadrature."""
    coefficients = {"linear": exact.linear, "trigonometric": exact.trigonometric}[name]
    reference = exact.mixture_field_square(
        lambda t, x: exact.mixture_velocity(t, x, coefficients), coefficients)
    energy = px.flows.marginal_kinetic_energy(jax.random.key(2), name, exact.DATA,
                                              num_samples=2000, num_times=64)
    assert_within_se(float(energy.estimate) - reference, float(energy.standard_error),
                     atol=2e-3, what=f"{name} marginal KE")
    # the reduced (data-separation) form gives the same number, up to lambda's MC error
    separation = px.flows.DataSeparation.from_data(jax.random.key(3), exact.DATA,
                                                   num_samples=4000, num_grid=513)
    np.testing.assert_allclose(float(separation.kinetic_energy(name)), reference, rtol=0.02)


def test_ko_path_has_the_lowest_marginal_ke():
    """On a 2-D data set: KE(KO) < KE(Cond-OT), KE(cosine), KE(VP), each by more than
    K_SE standard errors of the field-based Monte-Carlo estimates."""
    key_path, key_energy = jax.random.split(jax.random.key(4))
    ko = px.flows.KineticOptimalPath.from_data(key_path, DATA_2D, num_samples=256,
                                               num_grid=513)
    paths = {"cond-ot": (px.flows.LinearPath(), (0.0, 1.0)),
             "cosine": (px.flows.TrigonometricPath(), (0.0, 1.0)),
             "vp": (px.flows.VPPath(), VP_INTERVAL), "ko": (ko, (0.0, 1.0))}
    energies = {name: px.flows.marginal_kinetic_energy(key_energy, path, DATA_2D,
                                                       num_samples=256, num_times=48,
                                                       time_interval=interval)
                for name, (path, interval) in paths.items()}
    reduced = {name: float(ko.separation.kinetic_energy(path, time_interval=interval))
               for name, (path, interval) in paths.items()}
    ko_energy = energies["ko"]
    for name in ("cond-ot", "cosine", "vp"):
        gap = float(energies[name].estimate - ko_energy.estimate)
        se = float(energies[name].standard_error + ko_energy.standard_error)
        assert gap > K_SE * se, (name, gap, se)
        assert reduced[name] > reduced["ko"], (name, reduced)
    # the KO path's energy in the reduced form is the closed form of the geodesic
    np.testing.assert_allclose(reduced["ko"], float(ko.kinetic_energy()), rtol=2e-3)
    # and the field-based estimate agrees with it (lambda's own MC error: 5%)
    np.testing.assert_allclose(float(ko_energy.estimate), reduced["ko"], rtol=0.05)


def _normalised_data(key, num_data, dim):
    x = jax.random.normal(key, (num_data, dim))
    return np.sqrt(dim) * x / jnp.linalg.norm(x, axis=1, keepdims=True)


def test_gap_to_cond_ot_shrinks_with_dimension():
    """n fixed, d growing (n / sqrt(d) → 0): lambda → 1 (its mean deficit over the angle
    grid shrinks; lambda(0) = |mean|²/M stays put) and the relative KE gap between
    Cond-OT and KO shrinks (normalised data, |x1|² = d)."""
    num_data = 4
    gaps, deficits = [], []
    for i, dim in enumerate([2, 16, 128]):
        data = _normalised_data(jax.random.key(10 + i), num_data, dim)
        separation = px.flows.DataSeparation.from_data(jax.random.key(20 + i), data,
                                                       num_samples=64, num_grid=129)
        cond_ot = float(separation.kinetic_energy(px.flows.LinearPath()))
        optimal = float(separation.optimal_kinetic_energy())
        assert optimal <= cond_ot <= 2 * dim + 1e-3
        gaps.append((cond_ot - optimal) / cond_ot)
        deficits.append(float(jnp.mean(1.0 - separation.values)))
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert all(a > b for a, b in zip(deficits, deficits[1:])), deficits
    assert gaps[-1] < 0.25 * gaps[0], gaps


def test_ko_path_marginal_field_transports_noise_to_its_marginals():
    """The KO path works where other paths do (a loss takes it; the path protocol is
    checked by tests/conformance/test_paths.py), and its exact marginal field under `ode_sample` carries N(0, I) to the law of
    `alpha(t) x0 + beta(t) x1` (sample mean vs `beta(t) · mean(data)` within K_SE SE)."""
    data = DATA_2D[:3]
    ko = px.flows.KineticOptimalPath.from_data(jax.random.key(5), data, num_samples=64,
                                               num_grid=257)
    assert isinstance(px.flows.velocity_loss(lambda params, t, x: x, ko), px.Expectation)
    field = px.flows.marginal_velocity(ko, data)
    t1, num_samples = 0.9, 400
    x0 = jax.random.normal(jax.random.key(7), (num_samples, 2))
    x1 = px.flows.ode_sample(lambda t, x: field(None, t, x), x0, t1=t1, solver="heun",
                             num_steps=32)
    mean, se = x1.mean(0), x1.std(0, ddof=1) / np.sqrt(num_samples)
    assert_within_se(mean - float(ko.beta(t1)) * data.mean(0), se, what="ODE push-forward")


def test_errors():
    with pytest.raises(ValueError, match="data"):
        px.flows.DataSeparation.from_data(jax.random.key(0), jnp.ones(3))
    with pytest.raises(ValueError, match="all zero"):
        px.flows.DataSeparation.from_data(jax.random.key(0), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="num_grid"):
        px.flows.DataSeparation.from_data(jax.random.key(0), DATA_2D, num_grid=2)
    with pytest.raises(ValueError, match="num_samples"):
        px.flows.marginal_kinetic_energy(jax.random.key(0), "linear", DATA_2D,
                                         num_samples=1)
    with pytest.raises(ValueError, match="time_interval"):
        px.flows.conditional_kinetic_energy("linear", jnp.ones(2), time_interval=(0.5, 0.2))
    with pytest.raises(ValueError, match="x1"):
        px.flows.conditional_kinetic_energy("linear", jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="gamma"):
        px.flows.marginal_velocity(px.flows.LinearPath(px.flows.BridgeGamma()), DATA_2D)
    with pytest.raises(ValueError, match="snr"):
        px.flows.data_separation(jax.random.key(0), DATA_2D, jnp.array([-1.0]))
    with pytest.raises(TypeError, match="DataSeparation"):
        px.flows.KineticOptimalPath(DATA_2D)
