"""M-FAC (`px.optim.mfac`): the preconditioned vector is the dense damped-Fisher solve."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import ppl_ext as px
from ppl_ext.optim import MFACState, mfac, mfac_inverse_product


def dense_solve(window: np.ndarray, vector: np.ndarray, damping: float) -> np.ndarray:
    """`(λ I + GᵀG/m)⁻¹ v` in numpy float64, `G` the (m, d) window (zero rows unfilled)."""
    num_gradients, dim = window.shape
    fisher = damping * np.eye(dim) + window.T @ window / num_gradients
    return np.linalg.solve(fisher, vector)


@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_every_update_is_the_dense_solve_while_filling_and_after_wrapping(damping):
    num_gradients, dim, num_steps = 4, 7, 11  # fills in 4 steps, wraps twice
    rng = np.random.default_rng(0)
    gradients = rng.normal(size=(num_steps, dim))
    with jax.enable_x64(True):
        transformation = mfac(num_gradients=num_gradients, damping=damping)
        state = transformation.init(jnp.zeros(dim))
        update = jax.jit(transformation.update)
        window = np.zeros((num_gradients, dim))
        for t in range(num_steps):
            window[t % num_gradients] = gradients[t]  # the ring buffer, written out
            out, state = update(jnp.asarray(gradients[t]), state)
            np.testing.assert_allclose(out, dense_solve(window, gradients[t], damping),
                                       rtol=1e-9, atol=1e-9, err_msg=f"step {t}")
            # and any vector, with the same window
            v = rng.normal(size=dim)
            np.testing.assert_allclose(mfac_inverse_product(state, jnp.asarray(v), damping),
                                       dense_solve(window, v, damping), rtol=1e-9, atol=1e-9)
        assert int(state.count) == num_steps
        np.testing.assert_allclose(state.gram, window @ window.T, rtol=1e-12, atol=1e-12)


def scan_directions(transformation, gradients, state=None):
    """Every update's output over the rows of `gradients`, in one compiled `lax.scan`."""
    def step(state, g):
        out, state = transformation.update(g, state)
        return state, out

    state = transformation.init(gradients[0]) if state is None else state
    return jax.jit(lambda s, gs: jax.lax.scan(step, s, gs))(state, gradients)


@pytest.mark.parametrize("num_gradients, dim", [(32, 48), (128, 96), (512, 520)])
def test_sliding_window_matches_the_dense_woodbury_oracle_to_1e_8(num_gradients, dim):
    """The O(m²) sliding Cholesky (rank-one update out, triangular solve in, a fresh
    factorisation when the window wraps) against numpy's dense float64 solve, at steps
    while filling, right after wrapping and between wraps; gradients with scales spread
    over two orders of magnitude (a Gram matrix far from diagonal)."""
    m = num_gradients
    # the largest window starts full (a state written out with numpy's Cholesky factor, to
    # save m compiled steps) and slides for 40 steps; the others fill, wrap and wrap again
    prefilled = m if m >= 512 else 0
    num_steps = 2 * m + 5 if not prefilled else m + 40
    rng = np.random.default_rng(m)
    scales = np.logspace(0, -2, dim)
    gradients = rng.normal(size=(num_steps, dim)) * scales + 0.3 * rng.normal(size=dim)
    damping = 1e-2
    with jax.enable_x64(True):
        start = None
        if prefilled:
            window = gradients[:m]  # count m: ring order is age order
            start = MFACState(jnp.asarray(window), jnp.asarray(window @ window.T),
                              jnp.array(m, jnp.int32), jnp.asarray(np.linalg.cholesky(
                                  window @ window.T + m * damping * np.eye(m))))
        state, outs = scan_directions(mfac(num_gradients=m, damping=damping),
                                      jnp.asarray(gradients[prefilled:]), start)
        outs = np.concatenate([np.full((prefilled, dim), np.nan), np.asarray(outs)])
        assert int(state.count) == num_steps
        checked = {m // 2, m - 1, m, m + 1, m + m // 2, 2 * m - 2, num_steps - 1}
        for t in sorted(t for t in checked if prefilled <= t < num_steps):
            window = np.zeros((m, dim))
            for i in range(t + 1):
                window[i % m] = gradients[i]
            expected = dense_solve(window, gradients[t], damping)
            np.testing.assert_allclose(outs[t], expected, rtol=1e-8,
                                       atol=1e-8 * np.abs(expected).max(), err_msg=f"step {t}")
        # the kept factor is the Cholesky factor of m λ I + G Gᵀ in age order
        order = (int(state.count) + np.arange(m)) % m
        window = np.asarray(state.gradients)[order]
        np.testing.assert_allclose(np.asarray(state.factor) @ np.asarray(state.factor).T,
                                   window @ window.T + m * damping * np.eye(m), rtol=1e-10,
                                   atol=1e-10 * np.abs(window @ window.T).max())


def test_float32_does_not_drift_over_a_long_run():
    """2,000 float32 updates (250 wraps of a window of 8): the last outputs still match
    the float64 dense solve as closely as a fresh float32 solve would."""
    m, dim, num_steps, damping = 8, 20, 2000, 0.1
    rng = np.random.default_rng(5)
    gradients = rng.normal(size=(num_steps, dim)) * np.logspace(0, -1, dim)
    _, outs = scan_directions(mfac(num_gradients=m, damping=damping),
                              jnp.asarray(gradients, jnp.float32))
    for t in (num_steps - 5, num_steps - 1):
        window = np.zeros((m, dim))
        for i in range(t - m + 1, t + 1):
            window[i % m] = gradients[i]
        np.testing.assert_allclose(outs[t], dense_solve(window, gradients[t], damping),
                                   rtol=2e-3, atol=2e-3)


def test_window_larger_than_dimension_and_single_gradient():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        for num_gradients, dim in [(6, 3), (1, 5)]:
            transformation = mfac(num_gradients=num_gradients, damping=0.1)
            state = transformation.init(jnp.zeros(dim))
            update = jax.jit(transformation.update)
            window = np.zeros((num_gradients, dim))
            for t in range(2 * num_gradients + 1):
                g = rng.normal(size=dim)
                window[t % num_gradients] = g
                out, state = update(jnp.asarray(g), state)
                np.testing.assert_allclose(out, dense_solve(window, g, 0.1), rtol=1e-9)


def test_pytree_parameters_are_flattened_in_order():
    params = {"a": jnp.zeros((2, 2)), "b": {"c": jnp.zeros(3)}}
    grads = [jax.tree.map(lambda x, s=s: jax.random.normal(jax.random.key(s), x.shape), params)
             for s in range(3)]
    with jax.enable_x64(True):
        grads = jax.tree.map(lambda x: x.astype(jnp.float64), grads)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        transformation = mfac(num_gradients=2, damping=0.5)
        state = transformation.init(params)
        update = jax.jit(transformation.update)
        window = np.zeros((2, 7))
        for t, g in enumerate(grads):
            flat = np.asarray(jax.flatten_util.ravel_pytree(g)[0])
            window[t % 2] = flat
            out, state = update(g, state, params)
            assert jax.tree.structure(out) == jax.tree.structure(params)
            np.testing.assert_allclose(jax.flatten_util.ravel_pytree(out)[0],
                                       dense_solve(window, flat, 0.5), rtol=1e-9)


def test_float32_matches_the_dense_solve_loosely():
    rng = np.random.default_rng(2)
    transformation = mfac(num_gradients=8, damping=0.1)
    state = transformation.init(jnp.zeros(20))
    window = np.zeros((8, 20))
    for t in range(12):
        g = rng.normal(size=20).astype(np.float32)
        window[t % 8] = g
        out, state = jax.jit(transformation.update)(jnp.asarray(g), state)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, dense_solve(window, g.astype(np.float64), 0.1),
                                   rtol=2e-3, atol=2e-3)


def test_fit_on_minibatch_least_squares_reaches_the_least_squares_solution():
    """Minibatch least squares: the empirical Fisher is proportional to the Hessian at the
    optimum (Gaussian residuals), so M-FAC takes Newton-like steps on an ill-conditioned
    design; the optimum of the expectation is numpy's least-squares solution."""
    rng = np.random.default_rng(3)
    num_data, scales = 200, np.array([1.0, 10.0, 0.3])
    features = rng.normal(size=(num_data, 3)) * scales
    targets = features @ np.array([1.0, -0.5, 2.0]) + rng.normal(size=num_data)
    solution = np.linalg.lstsq(features, targets, rcond=None)[0]
    x, y = jnp.asarray(features, jnp.float32), jnp.asarray(targets, jnp.float32)

    @px.expectation
    def loss(params):
        i = px.sample(dist.DiscreteUniform(0, num_data - 1).expand((4,)))
        return jnp.mean((y[i] - x[i] @ params["w"]) ** 2)

    schedule = optax.cosine_decay_schedule(0.3, 1500, alpha=0.01)
    optimiser = optax.chain(mfac(num_gradients=16, damping=1e-3),
                            optax.scale_by_learning_rate(schedule))
    result = px.fit(loss, {"w": jnp.zeros(3)}, px.optim.OptaxBackend(optimiser), 1500,
                    jax.random.key(0), maximize=False, progress=False)
    # the flat direction (scale 0.3) is where plain SGD lags; tolerance: a few final-step
    # noise scales (lr 0.003 times a Newton-scaled unit-variance residual)
    np.testing.assert_allclose(result.params["w"], solution, atol=0.05)
    sgd = px.fit(loss, {"w": jnp.zeros(3)}, optax.sgd(optax.cosine_decay_schedule(
        0.004, 1500, alpha=0.01)), 1500, jax.random.key(0), maximize=False, progress=False)
    assert abs(float(sgd.params["w"][2]) - solution[2]) > 0.2


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_gradients must be at least 1"):
        mfac(num_gradients=0)
    with pytest.raises(TypeError, match="num_gradients must be an int"):
        mfac(num_gradients=2.5)
    with pytest.raises(ValueError, match="damping must be finite and positive"):
        mfac(damping=0.0)
    with pytest.raises(ValueError, match="damping must be finite and positive"):
        mfac(damping=-1.0)
    transformation = mfac(num_gradients=2)
    state = transformation.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="initialised for 3"):
        transformation.update(jnp.zeros(4), state)
    with pytest.raises(ValueError, match="no array leaves"):
        transformation.init({})
    with pytest.raises(ValueError, match="vector has shape"):
        mfac_inverse_product(MFACState(jnp.zeros((2, 3)), jnp.zeros((2, 2)), jnp.array(0)),
                             jnp.zeros(4), 1.0)
