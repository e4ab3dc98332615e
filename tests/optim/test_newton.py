"""Gradient-regularised Newton (`px.optim.GradientRegularisedNewton`) and its curvatures.

Optima come from numpy / scipy on losses written in numpy; curvature matrices from their
closed-form definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
import scipy.optimize

import ppl_ext as px
from ppl_ext.optim import (
    EmpiricalFisher,
    ExactHessian,
    FiniteDifferenceHessian,
    GaussNewton,
    GradientRegularisedNewton,
    MatrixFreeHessian,
)

ALPHA = 1e-2  # the L2 regularisation of the logistic regression


def fit(objective, params, backend, num_steps, *args, key=0):
    return px.fit(objective, params, backend, num_steps, jax.random.key(key), *args,
                  maximize=False, progress=False, chunk_size=1)


def steps_to(history_params, solution, tolerance):
    for i, p in enumerate(history_params):
        if np.max(np.abs(p - solution)) < tolerance:
            return i
    return None


def trajectory(objective, params, backend, num_steps, *args):
    """Parameters after 0, 1, ..., num_steps steps (a callback records them)."""
    out = [np.asarray(params)]
    px.fit(objective, params, backend, num_steps, jax.random.key(0), *args, maximize=False,
           progress=False, chunk_size=1,
           callbacks=lambda step, state, history: out.append(np.asarray(state.params)))
    return out


# ------------------------------------------------------------------- convex problems


def test_strongly_convex_quadratic_converges_in_a_few_steps():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a = (q * np.logspace(0, 3, 6)) @ q.T  # condition number 1000
    b = rng.normal(size=6)
    solution = np.linalg.solve(a, b)
    with jax.enable_x64(True):
        @px.expectation
        def quadratic(x):
            return 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x

        for curvature in (ExactHessian(), MatrixFreeHessian(num_cg_steps=20, tolerance=1e-12)):
            path = trajectory(quadratic, jnp.zeros(6), GradientRegularisedNewton(curvature), 12)
            reached = steps_to(path, solution, 1e-9)
            assert reached is not None and reached <= 12, (curvature, path[-1] - solution)


def breast_cancer(num_data=120):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data[:num_data]
    x = (x - x.mean(0)) / x.std(0)
    x = np.hstack([x, np.ones((num_data, 1))])  # intercept
    return x, data.target[:num_data].astype(np.float64)


def logistic_numpy(w, x, y):
    z = x @ w
    loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * ALPHA * w @ w
    grad = x.T @ (1.0 / (1.0 + np.exp(-z)) - y) / len(y) + ALPHA * w
    return loss, grad


def logistic_optimum(x, y):
    result = scipy.optimize.minimize(logistic_numpy, np.zeros(x.shape[1]), args=(x, y),
                                     jac=True, method="L-BFGS-B",
                                     options=dict(gtol=1e-12, ftol=1e-15, maxiter=10_000))
    return result.x


def per_sample_logistic(w, x, y):
    z = x @ w
    return jnp.logaddexp(0.0, z) - y * z + 0.5 * ALPHA * w @ w


@px.expectation
def logistic(w, x, y):
    return jnp.mean(per_sample_logistic(w, x, y))


def test_logistic_regression_reaches_the_scipy_optimum_far_faster_than_gradient_descent():
    x, y = breast_cancer()
    solution = logistic_optimum(x, y)
    with jax.enable_x64(True):
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        w0 = jnp.zeros(x.shape[1])
        newton = trajectory(logistic, w0, GradientRegularisedNewton(), 30, xj, yj)
        newton_steps = steps_to(newton, solution, 1e-6)
        assert newton_steps is not None and newton_steps <= 30
        # gradient descent with the 1/L step (L bounds the Hessian) for 20x as many steps
        lipschitz = np.linalg.eigvalsh(x.T @ x / len(y)).max() / 4 + ALPHA
        descent = trajectory(logistic, w0, optax.sgd(1.0 / lipschitz), 20 * newton_steps, xj, yj)
        assert steps_to(descent, solution, 1e-6) is None


def test_logistic_regression_with_gauss_newton_fisher_and_finite_differences():
    """Gauss-Newton (outputs [Xw, w], loss mean log-loss + α/2‖w‖²) is the exact Hessian of
    this model; the empirical Fisher is an approximation, which the adaptive γ absorbs."""
    x, y = breast_cancer(80)
    solution = logistic_optimum(x, y)
    num_data = len(y)
    with jax.enable_x64(True):
        xj, yj = jnp.asarray(x), jnp.asarray(y)

        def model(w, x, y):
            return jnp.concatenate([x @ w, w])

        def loss(z, x, y):
            logits, w = z[:num_data], z[num_data:]
            return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits) + 0.5 * ALPHA * w @ w

        for curvature, num_steps in [(GaussNewton(model, loss), 30),
                                     (EmpiricalFisher(per_sample_logistic), 150),
                                     (FiniteDifferenceHessian(1e-4), 30)]:
            result = fit(logistic, jnp.zeros(x.shape[1]), GradientRegularisedNewton(curvature),
                         num_steps, xj, yj)
            np.testing.assert_allclose(result.params, solution, atol=1e-5,
                                       err_msg=type(curvature).__name__)


def test_nonconvex_rosenbrock_rejects_indefinite_steps_and_converges():
    with jax.enable_x64(True):
        @px.expectation
        def rosenbrock(x):
            return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2

        result = fit(rosenbrock, jnp.array([-1.2, 1.0]), GradientRegularisedNewton(), 100)
        np.testing.assert_allclose(result.params, [1.0, 1.0], atol=1e-6)
        assert np.all(np.diff(result.history.value) <= 1e-12)  # accepted steps decrease f


# ------------------------------------------------------------------ curvature matrices


def test_empirical_fisher_equals_its_definition():
    x, y = breast_cancer(15)
    x = x[:, :4]
    w = np.random.default_rng(1).normal(size=4)
    with jax.enable_x64(True):
        fisher = EmpiricalFisher(per_sample_logistic).matrix(
            jax.random.key(0), jnp.asarray(w), None, jnp.asarray(x), jnp.asarray(y))
    grads = (1.0 / (1.0 + np.exp(-x @ w)) - y)[:, None] * x + ALPHA * w  # (n, d)
    np.testing.assert_allclose(fisher, grads.T @ grads / len(y), rtol=1e-10)


@pytest.mark.parametrize("num_losses", [1, 3])
def test_low_rank_empirical_fisher_solve_equals_a_dense_solve(num_losses):
    # n < d: Sherman-Morrison (n = 1) or Woodbury (n = 3) against numpy's dense solve
    rng = np.random.default_rng(num_losses)
    a, w, g = rng.normal(size=(num_losses, 7)), rng.normal(size=7), rng.normal(size=7)
    rows = np.cos(a * w)  # ℓ_i = Σ_j sin(a_ij w_j) / a_ij, so ∇ℓ_i = cos(a_i ∘ w)
    with jax.enable_x64(True):
        fisher = EmpiricalFisher(lambda w: jnp.sum(jnp.sin(jnp.asarray(a) * w) / a, axis=1))
        solve = fisher.regularised_solver(jax.random.key(0), jnp.asarray(w), None,
                                          jnp.asarray(g))
        for lam in (1e-3, 0.5, 20.0):
            delta, valid = solve(lam)
            dense = np.linalg.solve(rows.T @ rows / num_losses + lam * np.eye(7), -g)
            np.testing.assert_allclose(np.asarray(delta), dense, rtol=1e-9, atol=1e-12)
            assert bool(valid)


def test_rank_one_fisher_newton_solves_equations_with_a_linear_operator():
    # f = ‖A x - b‖⁴ / 4 (A square, invertible: min 0 at A⁻¹ b); the rank-one Fisher term
    # 2 ∇f ∇fᵀ / ‖u‖⁴ = ∇ℓ ∇ℓᵀ with ℓ = 2 sqrt(f / 2) (Semenov, Jaggi and Doikov 2025)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8)) + 4 * np.eye(8)
    b = rng.normal(size=8)
    solution = np.linalg.solve(a, b)

    def f(x):
        return jnp.sum((jnp.asarray(a) @ x - jnp.asarray(b)) ** 2) ** 2 / 4

    with jax.enable_x64(True):
        backend = GradientRegularisedNewton(
            EmpiricalFisher(lambda x: (2 * jnp.sqrt(f(x) / 2))[None]))
        result = fit(px.expectation(f), jnp.zeros(8), backend, 200)
        assert float(f(result.params)) < 1e-10
        np.testing.assert_allclose(np.asarray(result.params), solution, atol=2e-2)


def test_gauss_newton_equals_its_definition_for_tanh_and_softmax_models():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=7)
    w = rng.normal(size=3)
    with jax.enable_x64(True):
        gn = GaussNewton(lambda w, x, y: jnp.tanh(x @ w),
                         lambda z, x, y: 0.5 * jnp.sum((z - y) ** 2))
        matrix = gn.matrix(jax.random.key(0), jnp.asarray(w), None, jnp.asarray(x),
                           jnp.asarray(y))
    slope = 1.0 - np.tanh(x @ w) ** 2  # J = diag(1 - tanh²) X, ∇²L = I
    np.testing.assert_allclose(matrix, x.T @ np.diag(slope**2) @ x, rtol=1e-10)

    # softmax regression: z = X W (n, k), L = Σ_i CE; GN = Σ_i x_i x_iᵀ ⊗ (diag p_i - p_i p_iᵀ)
    weights, labels = rng.normal(size=(3, 4)), rng.integers(0, 4, size=7)
    with jax.enable_x64(True):
        gn = GaussNewton(lambda p, x, labels: x @ p["W"],
                         lambda z, x, labels: -jnp.sum(
                             jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], 1)))
        params = {"W": jnp.asarray(weights)}
        matrix = gn.matrix(jax.random.key(0), params, None, jnp.asarray(x), jnp.asarray(labels))
        product = gn.product(jax.random.key(0), params, None, jnp.asarray(x),
                             jnp.asarray(labels))
        v = rng.normal(size=12)
        np.testing.assert_allclose(product(jnp.asarray(v)), matrix @ v, rtol=1e-10)
    logits = x @ weights
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    blocks = np.einsum("ib,bc->ibc", p, np.eye(4)) - np.einsum("ib,ic->ibc", p, p)
    exact = np.einsum("ia,ie,ibc->abec", x, x, blocks).reshape(12, 12)
    np.testing.assert_allclose(matrix, exact, rtol=1e-10, atol=1e-12)


def test_exact_and_finite_difference_hessians_of_a_pytree_objective():
    with jax.enable_x64(True):
        @px.expectation
        def f(p):
            return jnp.sum(p["a"] ** 3) + p["b"] * jnp.sum(p["a"]) ** 2

        params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
        # flat order (a0, a1, b), s = a0 + a1: ∂²/∂a_i∂a_j = 6 a_i δ_ij + 2b; ∂²/∂a_i∂b = 2s
        exact = np.array([[6 + 1.0, 1.0, 6.0], [1.0, 12 + 1.0, 6.0], [6.0, 6.0, 0.0]])
        key = jax.random.key(0)
        np.testing.assert_allclose(ExactHessian().matrix(key, params, f), exact, rtol=1e-12)
        np.testing.assert_allclose(FiniteDifferenceHessian(1e-5).matrix(key, params, f), exact,
                                   rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------- expectation objectives


@px.expectation
def noisy_quadratic(theta):
    x = px.sample(dist.Normal(theta, 1.0))
    return jnp.sum((x - 3.0) ** 2)


def test_expectation_objective_with_finite_difference_hessian_and_a_schedule():
    schedule = optax.cosine_decay_schedule(1.0, 300, alpha=0.01)
    backend = GradientRegularisedNewton(FiniteDifferenceHessian(), step_size=schedule)
    result = fit(noisy_quadratic, jnp.zeros(2), backend, 300)
    np.testing.assert_allclose(result.params, 3.0, atol=0.15)


def test_exact_hessian_of_an_expectation_with_sample_sites():
    """Refused with the alternatives named, unless the objective brings an unbiased hvp."""
    backend = GradientRegularisedNewton(ExactHessian())
    if hasattr(noisy_quadratic, "hvp"):  # the core's second-order estimates
        result = fit(noisy_quadratic, jnp.zeros(2), GradientRegularisedNewton(
            step_size=optax.cosine_decay_schedule(1.0, 300, alpha=0.01)), 300)
        np.testing.assert_allclose(result.params, 3.0, atol=0.15)
        return
    with pytest.raises(ValueError, match="has sample sites.*FiniteDifferenceHessian"):
        fit(noisy_quadratic, jnp.zeros(2), backend, 2)


def test_user_hvp_callable_is_used():
    calls = []

    def hvp(key, params, v, scale):
        calls.append(1)
        return 2.0 * scale * v

    @px.expectation
    def f(x, scale):
        return scale * jnp.sum((x - 1.0) ** 2)

    result = fit(f, jnp.zeros(3), GradientRegularisedNewton(MatrixFreeHessian(hvp)), 5, 4.0)
    np.testing.assert_allclose(result.params, 1.0, atol=1e-5)
    assert calls


def test_non_adaptive_mode_keeps_gamma():
    @px.expectation
    def f(x):
        return jnp.sum((x - 1.0) ** 2)

    backend = GradientRegularisedNewton(adaptive=False, initial_gamma=10.0)
    result = fit(f, jnp.zeros(2), backend, 20)
    assert float(result.state.gamma) == 10.0
    np.testing.assert_allclose(result.params, 1.0, atol=1e-4)


def test_zero_gradient_with_a_singular_hessian_stays_put_without_nans():
    """At a stationary point λ = ‖g‖/γ is 0 and H = diag(2, 0) is singular: no step, no NaN."""
    @px.expectation
    def f(x):
        return x[0] ** 2

    result = fit(f, jnp.zeros(2), GradientRegularisedNewton(), 3)
    np.testing.assert_array_equal(result.params, 0.0)
    assert np.all(np.isfinite(result.history.value))


# ------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="curvature must be an AbstractCurvature"):
        GradientRegularisedNewton("exact")
    with pytest.raises(ValueError, match="initial_gamma must be finite and positive"):
        GradientRegularisedNewton(initial_gamma=0.0)
    with pytest.raises(ValueError, match="num_search_steps must be at least 1"):
        GradientRegularisedNewton(num_search_steps=0)
    with pytest.raises(ValueError, match="step_size must be finite and positive"):
        GradientRegularisedNewton(step_size=-1.0)
    with pytest.raises(ValueError, match="num_cg_steps must be at least 1"):
        MatrixFreeHessian(num_cg_steps=0)
    with pytest.raises(TypeError, match="hvp must be a callable"):
        MatrixFreeHessian(hvp=3.0)
    with pytest.raises(ValueError, match="spacing must be finite and positive"):
        FiniteDifferenceHessian(0.0)
    with pytest.raises(TypeError, match="per_sample_loss must be a callable"):
        EmpiricalFisher(None)
    with pytest.raises(TypeError, match="GaussNewton.loss must be a callable"):
        GaussNewton(lambda w: w, "mse")
    key, w = jax.random.key(0), jnp.zeros(2)
    with pytest.raises(ValueError, match="non-empty vector"):
        EmpiricalFisher(lambda w: jnp.sum(w)).matrix(key, w, None)
    with pytest.raises(ValueError, match="non-empty vector"):
        EmpiricalFisher(lambda w: jnp.zeros(0)).matrix(key, w, None)
    with pytest.raises(ValueError, match="GaussNewton.loss must return a scalar"):
        GaussNewton(lambda w: w, lambda z: z).matrix(key, w, None)
