"""Common tests over the GFlowNet objective registry (`registry.GFN_OBJECTIVES`).

Each objective is a `px.Expectation` over trajectories of an enumerable environment with a
`TabularPolicy` (uniform backward policy). At the balanced flows, constructed by hand in
`tests/gfn/test_objectives_more.py` (no ppl_ext evaluation code), every residual is zero:
the value is 0 for every draw and so is the gradient; perturbed, it is positive. The
objectives run under `jit` and `vmap` over keys, and a jitted call does not retrace for
new keys or parameter values.
"""

import jax
import jax.numpy as jnp
import pytest

import ppl_ext as px
from tests.conformance.registry import GFN_OBJECTIVES, GfnObjectiveCase
from tests.gfn.test_objectives_more import balanced_params

CASES = pytest.mark.parametrize("case", GFN_OBJECTIVES, ids=lambda c: c.name)


def _setup(case: GfnObjectiveCase):
    env = case.env()
    policy = px.gfn.TabularPolicy(env)
    objective = case.build(policy)
    temperature = _temperature(case)
    params = balanced_params(env, temperature, case.forward_looking)
    return objective, params


def _temperature(case):
    return 2.0 if "forward_looking_detailed_balance" in case.name else 1.0


@CASES
def test_zero_at_balanced_flows_under_jit_and_vmap_without_retracing(case: GfnObjectiveCase):
    objective, params = _setup(case)
    assert isinstance(objective, px.Expectation)
    traces = []

    def values_and_grads(keys, params):
        traces.append(1)
        return jax.vmap(objective.value_and_grad, in_axes=(0, None))(keys, params)

    compiled = jax.jit(values_and_grads)
    values, grads = compiled(jax.random.split(jax.random.key(0), 4), params)
    assert values.shape == (4,)
    assert float(jnp.max(values)) < 1e-8, values
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-3
    noise = 0.3 * jax.random.normal(jax.random.key(1), params["forward"].shape)
    perturbed = dict(params, forward=params["forward"] + noise)
    values, _ = compiled(jax.random.split(jax.random.key(2), 4), perturbed)
    assert float(jnp.min(values)) > 1e-4 and bool(jnp.all(jnp.isfinite(values)))
    assert len(traces) == 1  # new keys and parameter values: no retrace
