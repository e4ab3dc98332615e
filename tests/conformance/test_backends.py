"""Common tests over the back-end registry (`registry.BACKENDS`), run through `px.fit`."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.conformance.registry import BACKENDS, BackendCase

CASES = pytest.mark.parametrize("case", BACKENDS, ids=lambda c: c.name)


@px.expectation
def quadratic(params):
    """E[-(x - 3)²] = -(θ - 3)² - 1, x ~ N(θ, 1): maximal at θ = 3."""
    x = px.sample(dist.Normal(params["theta"], 1.0))
    return -((x - 3.0) ** 2)


PARAMS = {"theta": jnp.asarray(0.0)}


@CASES
def test_reaches_the_maximiser(case: BackendCase):
    result = px.fit(quadratic, PARAMS, case.build(), case.num_steps, jax.random.key(0),
                    progress=False)
    assert abs(float(result.params["theta"]) - 3.0) < case.tolerance, case.name
    assert result.history.value.shape == (case.num_steps,)
    assert np.all(np.isfinite(result.history.value))


@CASES
def test_result_does_not_depend_on_chunking(case: BackendCase):
    one = px.fit(quadratic, PARAMS, case.build(), 40, jax.random.key(1), chunk_size=1,
                 progress=False)
    adaptive = px.fit(quadratic, PARAMS, case.build(), 40, jax.random.key(1), progress=False)
    assert np.array_equal(one.params["theta"], adaptive.params["theta"])
    assert np.array_equal(one.history.value, adaptive.history.value)


@CASES
def test_pytree_parameters_and_minimisation(case: BackendCase):
    @px.expectation
    def loss(params):
        x = px.sample(dist.Normal(params["a"]["theta"], 1.0))
        return (x - 3.0) ** 2 + jnp.sum((params["b"] - 1.0) ** 2)

    params = {"a": {"theta": jnp.asarray(0.0)}, "b": jnp.zeros(2)}
    result = px.fit(loss, params, case.build(), case.num_steps, jax.random.key(2),
                    maximize=False, progress=False)
    assert jax.tree.structure(result.params) == jax.tree.structure(params)
    assert abs(float(result.params["a"]["theta"]) - 3.0) < case.tolerance
    assert np.allclose(result.params["b"], 1.0, atol=case.tolerance)
