"""N-PG-IGT, N-HARPG and the two policy-gradient problems (ppl_ext/optim/_pg*.py).

Exact values are computed here without ppl_ext: the Riccati gain by iterating the
discounted Riccati recursion (not scipy's solver), the Lyapunov value by rolling the state
covariance forward, the MDP optimum by enumerating the deterministic policies, and the
truncated objectives by covariance / state-distribution recursions (differentiated by
jax.grad for the exact gradients).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext as px
from ppl_ext.optim import (
    LinearQuadraticRegulator, NormalisedHARPG, NormalisedPGIGT, TabularMDP,
    decaying_step_size)
from tests.helpers import K_SE, assert_unbiased

# ----------------------------------------------------------------------- exact optima


def riccati_by_iteration(lqr, num_iterations=2000):
    a = np.asarray(lqr.transition, np.float64)
    b = np.asarray(lqr.control, np.float64)
    q = np.asarray(lqr.state_cost, np.float64)
    r = np.asarray(lqr.control_cost, np.float64)
    gamma = float(lqr.discount)
    p = np.zeros_like(q)
    for _ in range(num_iterations):
        gain = gamma * np.linalg.solve(r + gamma * b.T @ p @ b, b.T @ p @ a)
        closed = a - b @ gain
        p = q + gain.T @ r @ gain + gamma * closed.T @ p @ closed
    return p, gain


def lqr_truncated_value(lqr, gain, num_time_steps, xp=jnp):
    """E[-Σ_{t<T} γ^t (xᵀQx + uᵀRu)] by rolling the state covariance forward."""
    a, b, q, r = lqr.transition, lqr.control, lqr.state_cost, lqr.control_cost
    sigma, gamma = lqr.policy_scale, lqr.discount
    cov = xp.diag(lqr.initial_scale**2)
    total = 0.0
    for t in range(num_time_steps):
        cost = xp.trace((q + gain.T @ r @ gain) @ cov) + sigma**2 * xp.trace(r)
        total = total - gamma**t * cost
        closed = a - b @ gain
        cov = closed @ cov @ closed.T + sigma**2 * b @ b.T
    return total


def mdp_truncated_value(mdp, logits, num_time_steps):
    """Σ_{t<T} γ^t d_tᵀ r_π with d_{t+1} = d_tᵀ P_π (jnp)."""
    policy = jax.nn.softmax(logits, axis=-1)
    p_pi = jnp.einsum("sa,sat->st", policy, mdp.transition)
    r_pi = jnp.sum(policy * mdp.reward, -1)
    d, total = mdp.initial, 0.0
    for t in range(num_time_steps):
        total = total + mdp.discount**t * d @ r_pi
        d = d @ p_pi
    return total


def test_lqr_optimum_is_the_riccati_gain():
    lqr = LinearQuadraticRegulator(
        jnp.array([[1.0, 0.2], [0.0, 0.9]]), jnp.array([[0.0], [0.3]]), jnp.eye(2),
        jnp.array([[0.5]]), jnp.array([1.0, 0.5]), discount=0.8)
    _, gain = riccati_by_iteration(lqr)
    np.testing.assert_allclose(lqr.optimal_gain(), gain, rtol=1e-6, atol=1e-8)
    # the closed-form value (Lyapunov) equals a long covariance roll-out ...
    long = float(lqr_truncated_value(
        jax.tree.map(lambda x: np.asarray(x, np.float64), lqr), gain, 400, xp=np))
    np.testing.assert_allclose(lqr.optimal_value(), long, rtol=1e-5)
    value = jax.jit(lambda g: lqr.value(g))
    np.testing.assert_allclose(float(value(jnp.asarray(gain, jnp.float32))), long, rtol=1e-4)
    # ... and the optimum is a minimum of the cost over gains (perturbations lose)
    for direction in ([1.0, 0.0], [0.0, 1.0]):
        for eps in (0.05, -0.05):
            moved = jnp.asarray(gain + eps * np.array([direction]), jnp.float32)
            assert float(value(moved)) < lqr.optimal_value()
    # an unstable gain has value -inf
    assert float(value(jnp.array([[-20.0, -20.0]]))) == -np.inf


def test_mdp_optimum_is_the_best_deterministic_policy():
    mdp = TabularMDP.random(3)
    p = np.asarray(mdp.transition, np.float64)
    r = np.asarray(mdp.reward, np.float64)
    rho = np.asarray(mdp.initial, np.float64)
    num_states, num_actions = r.shape
    best = -np.inf
    value = jax.jit(lambda theta: mdp.value(theta))
    for actions in itertools.product(range(num_actions), repeat=num_states):
        idx = np.arange(num_states), np.array(actions)
        v = np.linalg.solve(np.eye(num_states) - mdp.discount * p[idx], r[idx])
        best = max(best, rho @ v)
        # the softmax value of (almost) this deterministic policy agrees
        logits = np.full((num_states, num_actions), -30.0)
        logits[idx] = 0.0
        np.testing.assert_allclose(float(value(jnp.asarray(logits))), rho @ v, rtol=1e-4)
    np.testing.assert_allclose(mdp.optimal_value(), best, rtol=1e-10)


# --------------------------------------------------------- unbiased value and gradient


NUM_PG_ESTIMATES = 20_000


def many_sequential(f, num=NUM_PG_ESTIMATES, seed=0):
    """`f(key)` over `num` independent keys in one jitted `lax.map` (one compile of the
    unbatched program: batching the trajectory programs costs more compile time than the
    20 000 sequential runs take)."""
    keys = jax.random.split(jax.random.key(seed), num)
    return jax.jit(lambda ks: jax.lax.map(f, ks))(keys)


def test_lqr_objective_value_and_gradient_unbiased():
    lqr = LinearQuadraticRegulator.small(num_time_steps=2)
    objective = lqr.objective()
    gain = jnp.array([[0.3]])
    values, grads = many_sequential(lambda k: objective.value_and_grad(k, gain))
    assert_unbiased(values, lqr_truncated_value(lqr, gain, 2), k=K_SE, what="LQR value")
    exact = jax.grad(lambda g: lqr_truncated_value(lqr, g, 2))(gain)
    assert_unbiased(grads, exact, k=K_SE, what="LQR gradient")


def test_mdp_objective_value_and_gradient_unbiased():
    """(`.hvp`'s unbiasedness on score sites is tests/adev/test_hvp.py's.)"""
    mdp = TabularMDP.random(3, num_time_steps=2)
    objective = mdp.objective()
    logits = jnp.array([[0.5, -0.5], [0.0, 1.0], [-1.0, 0.2]])

    def exact(theta):
        return mdp_truncated_value(mdp, theta, 2)

    values, grads = many_sequential(lambda k: objective.value_and_grad(k, logits))
    assert_unbiased(values, exact(logits), k=K_SE, what="MDP value")
    assert_unbiased(grads, jax.grad(exact)(logits), k=K_SE, what="MDP gradient")


# --------------------------------------------------------------------- the back-ends


def relative_gap(env, params):
    return (env.optimal_value() - float(env.value(params))) / abs(env.optimal_value())


def test_pgigt_improves_the_lqr():
    lqr = LinearQuadraticRegulator.small(num_time_steps=3)
    start = lqr.initial_gain()
    backend = NormalisedPGIGT(step_size=decaying_step_size(0.05, 50.0))
    result = px.fit(lqr.objective(), start, backend, 200, jax.random.key(0), progress=False)
    before, after = relative_gap(lqr, start), relative_gap(lqr, result.params)
    assert after < 0.25 * before, (before, after)


def test_harpg_improves_the_mdp():
    """On the one-step truncation (3 score sites: its `.hvp` compiles in seconds), whose
    exact optimum is the greedy policy: `J_1(θ) = Σ_s ρ_s Σ_a π_θ(a|s) r(s, a)`.

    (On the LQR, N-HARPG's score-function Hessian-vector products are so noisy that its
    recursive direction wanders: see benchmarks/RESULTS.md, bench_pg.py.)"""
    mdp = TabularMDP.random(3, num_time_steps=1)
    reward, rho = np.asarray(mdp.reward, np.float64), np.asarray(mdp.initial, np.float64)
    optimum = rho @ reward.max(1)

    def gap(logits):
        value = float(mdp_truncated_value(mdp, logits, 1))
        return (optimum - value) / abs(optimum)

    start = mdp.initial_logits()
    result = px.fit(mdp.objective(), start, NormalisedHARPG(step_size=decaying_step_size(
        0.2, 50.0)), 300, jax.random.key(1), progress=False)
    before, after = gap(start), gap(result.params)
    assert after < 0.5 * before, (before, after)


def test_first_harpg_step_is_a_normalised_gradient_step():
    """With η_0 = 1 and θ_{-1} = θ_0 the first direction is the gradient estimate."""

    @px.expectation
    def loss(theta):
        return jnp.sum((theta - 1.0) ** 2)

    for backend in (NormalisedHARPG(step_size=0.1), NormalisedPGIGT(step_size=0.1)):
        state = backend.init(jax.random.key(0), jnp.zeros(2), loss)
        state, info = backend.step(jax.random.key(1), state, loss)
        np.testing.assert_allclose(state.params, 0.1 / np.sqrt(2.0), rtol=1e-6)
        np.testing.assert_allclose(info.grad_norm, 2 * np.sqrt(2.0), rtol=1e-6)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [NormalisedHARPG, NormalisedPGIGT])
def test_bad_arguments(cls):
    with pytest.raises(ValueError, match="step_size"):
        cls(step_size=-1.0)
    with pytest.raises(TypeError, match="step_size"):
        cls(step_size="big")
    with pytest.raises(ValueError, match="momentum"):
        cls(momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        cls(momentum=0.0)
    with pytest.raises(ValueError, match="params"):
        cls().init(jax.random.key(0), {}, lambda key, p: 0.0)
    with pytest.raises(ValueError, match="initial"):
        decaying_step_size(0.0)


def test_harpg_needs_an_hvp():
    with pytest.raises(TypeError, match="hvp"):
        NormalisedHARPG().init(jax.random.key(0), jnp.zeros(2), lambda key, p: jnp.sum(p))


def test_bad_environments():
    with pytest.raises(ValueError, match="control"):
        LinearQuadraticRegulator(jnp.eye(2), jnp.ones((3, 1)), jnp.eye(2), jnp.eye(1),
                                 jnp.ones(2))
    with pytest.raises(ValueError, match="control_cost"):
        LinearQuadraticRegulator(jnp.eye(1), jnp.ones((1, 1)), jnp.eye(1), -jnp.eye(1),
                                 jnp.ones(1))
    with pytest.raises(ValueError, match="discount"):
        LinearQuadraticRegulator(jnp.eye(1), jnp.ones((1, 1)), jnp.eye(1), jnp.eye(1),
                                 jnp.ones(1), discount=1.0)
    with pytest.raises(ValueError, match="num_time_steps"):
        LinearQuadraticRegulator.small(num_time_steps=0)
    mdp = TabularMDP.random(0)
    with pytest.raises(ValueError, match="transition"):
        TabularMDP(mdp.transition * 2, mdp.reward, mdp.initial)
    with pytest.raises(ValueError, match="reward"):
        TabularMDP(mdp.transition, mdp.reward[:, :1], mdp.initial)
    with pytest.raises(ValueError, match="initial"):
        TabularMDP(mdp.transition, mdp.reward, mdp.initial * 3)
