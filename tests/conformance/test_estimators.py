"""Common tests over the estimator registry (`registry.ESTIMATORS`).

Statistical checks: means of 2·10^4 estimates within K_SE = 4 standard errors of the closed
form in the registry entry (tests/helpers.py; budget in tests/conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext as px

from tests.conformance.registry import ESTIMATORS, EstimatorCase, estimator_program, sharded
from tests.helpers import assert_unbiased, many, tree_allclose

NUM = 20_000
CASES = pytest.mark.parametrize("case", ESTIMATORS, ids=lambda c: c.name)


def _params(case):
    return {"theta": jnp.asarray(case.theta)}


@CASES
def test_unbiased_value_and_gradient(case: EstimatorCase):
    check_unbiased(case)


def check_unbiased(case: EstimatorCase, num: int = NUM):
    """The registry's central identity; also used on deliberately broken entries."""
    f = estimator_program(case)
    values, grads = many(lambda k: f.value_and_grad(k, _params(case)), num=num)
    assert_unbiased(values, case.exact(case.theta), what=f"{case.name} value")
    assert_unbiased(grads["theta"], jax.grad(case.exact)(case.theta),
                    what=f"{case.name} gradient")


@CASES
def test_jit_vmap_and_estimate_equal_surrogate_value(case: EstimatorCase):
    f = estimator_program(case)
    keys = jax.random.split(jax.random.key(1), 4)
    params = _params(case)
    batched = jax.jit(jax.vmap(f.value_and_grad, (0, None)))(keys, params)
    one_by_one = [f.value_and_grad(k, params) for k in keys]
    assert tree_allclose(batched, jax.tree.map(lambda *x: jnp.stack(x), *one_by_one),
                         rtol=1e-5, atol=1e-6)
    # value mode and the surrogate's primal are the same estimate (same key, same draws)
    for key, (value, _) in zip(keys, one_by_one):
        assert np.allclose(f.estimate(key, params), value, rtol=1e-6, atol=1e-6)
        assert np.allclose(f(key, params), value, rtol=1e-6, atol=1e-6)


@CASES
def test_no_retrace_for_new_values_of_the_same_shape(case: EstimatorCase):
    traces = []
    f = estimator_program(case, counter=traces)
    f.grad(jax.random.key(0), _params(case))
    first = len(traces)
    assert first >= 1
    f.grad(jax.random.key(1), {"theta": jnp.asarray(case.theta + 0.1)})
    f.value_and_grad(jax.random.key(2), _params(case))
    after_grad = len(traces)
    f.value_and_grad(jax.random.key(3), {"theta": jnp.asarray(case.theta - 0.1)})
    assert len(traces) == after_grad, f"{case.name}: retraced for a new value"
    f.grad(jax.random.key(4), {"theta": jnp.asarray(case.theta + 0.2)})
    assert len(traces) == after_grad


@CASES
def test_pytree_parameters(case: EstimatorCase):
    flat = estimator_program(case)

    @px.expectation
    def nested(params):
        x = px.sample(case.law(params["outer"]["theta"]), case.estimator)
        return jnp.asarray(case.f(x), jnp.result_type(float)) + 0.0 * params["unused"].sum()

    key = jax.random.key(3)
    params = {"outer": {"theta": jnp.asarray(case.theta)}, "unused": jnp.ones(2)}
    grads = nested.grad(key, params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert np.allclose(grads["outer"]["theta"], flat.grad(key, _params(case))["theta"],
                       rtol=1e-5, atol=1e-6)
    assert np.all(grads["unused"] == 0)


@CASES
def test_two_devices_equal_one(case: EstimatorCase):
    f = estimator_program(case)
    keys = jax.random.split(jax.random.key(5), 8)
    thetas = jnp.linspace(case.theta - 0.2, case.theta + 0.2, 8)

    def run(keys, thetas):
        return jax.vmap(lambda k, t: f.value_and_grad(k, {"theta": t}))(keys, thetas)

    single = jax.jit(run)(keys, thetas)
    two = sharded(run, keys, thetas)
    assert len(two[0].sharding.device_set) == 2
    assert tree_allclose(single, two, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in ESTIMATORS if c.bins], ids=lambda c: c.name)
def test_goodness_of_fit_of_the_derivative_measure(case: EstimatorCase):
    """MVD's auxiliary draws: `d/dθ P(x in bin)` for every bin, against the closed form.

    An indicator test function reads the law of the perturbed draws `x⁺`, `x⁻` directly:
    its gradient estimate averages to `c (P⁺(bin) - P⁻(bin))`, which must equal the
    derivative of the bin's probability.
    """
    import dataclasses

    edges = jnp.asarray(case.bins)

    def indicators(x):
        return jnp.stack([(x > lo) & (x <= hi) for lo, hi in zip(edges[:-1], edges[1:])]
                         ).astype(jnp.result_type(float))

    def probabilities(theta):
        law = case.law(theta)
        if isinstance(law, type(case.law(0.0))) and hasattr(law, "cdf") and not law.is_discrete:
            cdf = law.cdf(edges)
        else:  # integer support: sum the pmf over the integers inside each bin
            support = jnp.arange(0, 64)
            pmf = jnp.exp(law.log_prob(support))
            cdf = jnp.stack([jnp.sum(jnp.where(support <= e, pmf, 0.0)) for e in edges])
        return cdf[1:] - cdf[:-1]

    binned = dataclasses.replace(case, f=indicators)
    f = estimator_program(binned)
    params = _params(case)
    jacobians = many(lambda k: jax.jacfwd(f, argnums=1)(k, params)["theta"], num=NUM)
    assert_unbiased(jacobians, jax.jacfwd(probabilities)(case.theta),
                    what=f"{case.name}: derivative of bin probabilities")
