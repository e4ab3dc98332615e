"""The public API: calling conventions, jit/vmap/grad composition, randomness, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import ppl_ext as px
from tests.helpers import assert_unbiased, many, tree_allclose


@px.expectation
def quadratic(theta):
    x = px.sample(dist.Normal(theta, 1.0))
    b = px.sample(dist.Bernoulli(logits=theta), estimator=px.enum)
    return (x - 3.0) ** 2 + b


def test_issue_example(key):
    theta = jnp.asarray(0.7)
    est = quadratic.estimate(key, theta)
    grad = quadratic.grad(key, theta)
    value, grad2 = quadratic.value_and_grad(key, theta)
    assert est.shape == grad.shape == ()
    assert np.allclose(est, value) and np.allclose(grad, grad2)
    assert np.allclose(quadratic(key, theta), est)
    assert np.allclose(jax.grad(quadratic, argnums=1)(key, theta), grad, rtol=1e-5)


def test_same_key_same_estimate_and_different_keys_differ(key):
    a = quadratic.estimate(key, 0.1)
    b = quadratic.estimate(key, 0.1)
    c = quadratic.estimate(jax.random.key(1), 0.1)
    assert a == b and a != c


def test_raw_uint32_key_accepted():
    assert np.allclose(
        quadratic.estimate(jax.random.PRNGKey(0), 0.1),
        quadratic.estimate(jax.random.wrap_key_data(jax.random.PRNGKey(0)), 0.1),
    )


def test_sites_and_iterations_get_independent_keys(key):
    @px.expectation
    def draws(theta):
        a = px.sample(dist.Normal(theta, 1.0))
        b = px.sample(dist.Normal(theta, 1.0))
        cs = lax.scan(lambda c, _: (c, px.sample(dist.Normal(theta, 1.0))), 0.0,
                      length=4)[1]
        return jnp.concatenate([jnp.stack([a, b]), cs])

    values = np.asarray(many(lambda k: draws(k, 0.0), num=4000))
    assert len(np.unique(values[0])) == 6
    corr = np.corrcoef(values.T)
    off_diagonal = corr[~np.eye(6, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < 0.07  # 4.4 SE of a correlation with n = 4000


def test_jit_vmap_compose(key):
    keys = jax.random.split(key, 8)
    thetas = jnp.linspace(-1, 1, 8)
    by_vmap = jax.vmap(quadratic.grad)(keys, thetas)
    one_by_one = jnp.stack([quadratic.grad(k, t) for k, t in zip(keys, thetas)])
    assert np.allclose(by_vmap, one_by_one, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(jax.vmap(jax.grad(quadratic, argnums=1), (0, None)))(keys, 0.2)
    assert np.allclose(jitted, jax.vmap(quadratic.grad, (0, None))(keys, 0.2), rtol=1e-5)


def test_pytree_parameters_and_several_arguments(key):
    @px.expectation
    def f(params, shift):
        x = px.sample(dist.Normal(params["loc"], jnp.exp(params["log_scale"])))
        return jnp.sum((x - shift) ** 2)

    params = {"loc": jnp.zeros(3), "log_scale": jnp.zeros(3)}
    g_params, g_shift = f.grad(key, params, 1.0, argnums=(1, 2))
    assert jax.tree.structure(g_params) == jax.tree.structure(params)
    assert g_shift.shape == ()
    # E = sum((loc - shift)^2 + exp(2 log_scale)): check the mean gradient
    grads = many(lambda k: f.grad(k, params, 1.0))
    assert_unbiased(grads["loc"], -2.0 * np.ones(3))
    assert_unbiased(grads["log_scale"], 2.0 * np.ones(3))


def test_argnums_follows_jax_grad(key):
    @px.expectation
    def f(params, shift, data):
        x = px.sample(dist.Normal(params["loc"], 1.0))
        return (x - shift) ** 2 + data

    params = {"loc": jnp.asarray(0.3)}
    args = (params, jnp.asarray(1.0), jnp.asarray(2.0))
    # the default differentiates the argument after the key only, as jax.grad(f, 1) does
    default = f.grad(key, *args)
    assert jax.tree.structure(default) == jax.tree.structure(params)
    assert tree_allclose(default, jax.grad(f, argnums=1)(key, *args))
    for argnums in (2, 3, (1, 3), (3, 1)):
        mine = f.grad(key, *args, argnums=argnums)
        assert tree_allclose(mine, jax.grad(f, argnums=argnums)(key, *args))
        value, grads = f.value_and_grad(key, *args, argnums=argnums)
        assert tree_allclose(grads, mine) and np.allclose(value, f.estimate(key, *args))
    # an integer argument that is not differentiated does not get in the way
    g = px.expectation(lambda t, n: px.sample(dist.Normal(t, 1.0)) * n)
    assert np.isfinite(g.grad(key, 0.5, 3))
    for bad, error, match in [(0, ValueError, "PRNG key"), (4, ValueError, "positions 1 to 3"),
                              ((1, 1), ValueError, "repeats"), (1.0, TypeError, "int")]:
        with pytest.raises(error, match=match):
            f.grad(key, *args, argnums=bad)


def test_python_ints_bools_and_strings_are_static_arguments(key):
    """Non-array arguments stay Python values (a size, a flag, a mode), as with
    jax.jit(static_argnums): they may decide shapes and Python control flow."""
    traces = []

    @px.expectation
    def f(theta, size, square=True, mode="sum"):
        traces.append(1)
        x = px.sample(dist.Normal(theta, 1.0).expand([size]))
        y = x**2 if square else x
        return jnp.sum(y) if mode == "sum" else jnp.mean(y)

    # E[sum x^2] = size (theta^2 + 1); E[mean x] = theta
    grads = many(lambda k: f.grad(k, 0.5, 3))
    assert_unbiased(grads, 3 * 2 * 0.5)
    values = many(lambda k: f.estimate(k, 0.5, 4, square=False, mode="mean"))
    assert_unbiased(values, 0.5)
    assert np.allclose(jax.grad(f, argnums=1)(key, 0.5, 3), f.grad(key, 0.5, 3), rtol=1e-5)
    assert np.allclose(jax.jit(lambda t: f(key, t, 3))(0.5), f.estimate(key, 0.5, 3))
    count = len(traces)
    f.grad(key, 0.7, 3)  # a new float: no new trace; a new size: one new trace
    assert len(traces) == count
    f.grad(key, 0.7, 5)
    assert len(traces) > count


def test_closure_over_traced_values_is_differentiated(key):
    def outer(theta):
        @px.expectation
        def f():
            return px.sample(dist.Normal(theta, 1.0), px.reinforce) ** 2
        return f(key)

    assert np.isfinite(jax.grad(outer)(0.5))
    grads = many(lambda k: jax.grad(lambda t: px.expectation(
        lambda: px.sample(dist.Normal(t, 1.0), px.reinforce) ** 2)(k))(0.5))
    assert_unbiased(grads, 1.0)


def test_pytree_outputs(key):
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, 1.0), px.reinforce)
        return {"first": x, "second": x**2}

    out = many(lambda k: f(k, 0.5))
    assert_unbiased(out["first"], 0.5)
    assert_unbiased(out["second"], 1.25)
    jac = many(lambda k: jax.jacrev(f, argnums=1)(k, 0.5))
    assert_unbiased(jac["second"], 1.0)


def test_expectation_inside_user_jit_and_scan(key):
    @jax.jit
    def loss(key, theta):
        return quadratic(key, theta) * 2.0

    assert np.allclose(jax.grad(loss, argnums=1)(key, 0.3), 2 * quadratic.grad(key, 0.3),
                       rtol=1e-5)

    def body(theta, key):
        return theta - 0.1 * quadratic.grad(key, theta), theta

    final, _ = jax.jit(lambda th: lax.scan(body, th, jax.random.split(key, 50)))(0.0)
    assert 2.0 < float(final) < 4.0  # minimiser of (theta - 3)^2 + sigmoid(theta) ~ 2.9


def test_sharded_particle_axis_matches_single_device(key):
    devices = jax.devices()
    assert len(devices) >= 2, "conftest sets two host devices"
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("particles",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("particles"))
    keys = jax.random.split(key, 64)
    thetas = jnp.linspace(-1, 1, 64)
    fn = jax.jit(jax.vmap(quadratic.value_and_grad))
    single = fn(keys, thetas)
    sharded = fn(jax.device_put(keys, sharding), jax.device_put(thetas, sharding))
    assert len(sharded[1].sharding.device_set) == 2
    assert tree_allclose(single, sharded, rtol=1e-5, atol=1e-6)


def test_multi_sample_estimate_over_sharded_axis(key):
    """A batch-shaped site whose particle axis is sharded: same estimate as one device."""
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, 1.0).expand((64,)), px.reinforce)
        return jnp.mean(jnp.sin(x))

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("particles",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    theta = jax.device_put(jnp.asarray(0.4), replicated)
    assert tree_allclose(f.value_and_grad(key, 0.4), f.value_and_grad(key, theta))


def test_no_retrace_for_same_shapes(key):
    traces = []

    @px.expectation
    def f(theta):
        traces.append(1)
        return px.sample(dist.Normal(theta, 1.0)) ** 2

    for i in range(3):
        f.grad(jax.random.key(i), jnp.asarray(float(i)))
    assert len(traces) == 1


def test_running_average_baseline(key):
    @px.expectation
    def f(theta, baseline):
        x = px.sample(dist.Normal(theta, 1.0), px.Reinforce(baseline=baseline))
        return (x - 2.0) ** 2

    state = px.RunningAverage(jnp.asarray(0.0), decay=0.5)
    for i in range(5):
        value, _ = f.value_and_grad(jax.random.key(i), 0.0, state)
        state = state.update(value)
    assert 1.0 < float(state.value) < 10.0
    grads = many(lambda k: f.grad(k, 0.0, state))
    assert_unbiased(grads, -4.0)


def test_numpyro_plates_batch_sites(key):
    import numpyro

    @px.expectation
    def f(theta):
        with numpyro.plate("rows", 2, dim=-2), numpyro.plate("cols", 3):
            x = px.sample(dist.Normal(theta, 1.0), px.reinforce)
        assert x.shape == (2, 3)
        return jnp.sum(x**2)

    grads = many(lambda k: f.grad(k, 0.5))
    assert_unbiased(grads, 6 * 2 * 0.5)


def test_eager_call_is_compiled_once_and_equals_estimate():
    calls = []

    @px.expectation
    def f(theta):
        calls.append(1)  # runs when traced
        return (px.sample(dist.Normal(theta, 1.0)) - 1.0) ** 2

    key = jax.random.key(3)
    first = f(key, 0.5)
    traced = len(calls)
    for _ in range(3):
        assert float(f(key, 0.5)) == float(first)
    assert len(calls) == traced  # no re-tracing for repeated eager calls
    assert float(f.estimate(key, 0.5)) == float(first)
