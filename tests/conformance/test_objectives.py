"""Common tests over the objective and SVI-loss registries (`registry.OBJECTIVES`, `LOSSES`).

Every objective is evaluated on the conjugate Gaussian model with the guide at the exact
posterior, where closed forms are known: each bound equals `log p(x)` for every draw, the
guide's gradient averages to 0 and the prior's to Fisher's identity (see the registry).
Means of 2·10^4 gradient estimates within K_SE = 4 standard errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import SVI
from numpyro.optim import Adam

import ppl_ext as px
from tests.conformance import registry
from tests.conformance.registry import LOSSES, OBJECTIVES, ObjectiveCase, objective_params, sharded
from tests.helpers import assert_unbiased, many, tree_allclose

NUM = 20_000
CASES = pytest.mark.parametrize("case", OBJECTIVES, ids=lambda c: c.name)


@CASES
def test_is_an_objective_module(case: ObjectiveCase):
    objective = case.build()
    assert isinstance(objective, px.vi.AbstractObjective)
    assert isinstance(objective.expectation, px.Expectation)
    with pytest.raises(TypeError):
        px.vi.AbstractObjective()


@CASES
def test_exact_value_at_the_posterior(case: ObjectiveCase):
    if case.value_at_posterior is None:
        pytest.skip("no constant value at the posterior")
    objective = case.build()
    params = objective_params(case)
    for key in jax.random.split(jax.random.key(0), 3):
        value = case.call(objective, key, params)
        assert np.allclose(value, case.value_at_posterior, atol=1e-4), (case.name, value)


@CASES
def test_gradient_at_the_posterior(case: ObjectiveCase):
    objective = case.build()
    params = objective_params(case)
    grads = many(lambda k: case.grads(objective, k, params), num=NUM)
    exact = {name: 0.0 for name in params}
    exact["prior_loc"] = case.prior_gradient
    for name in params:
        assert_unbiased(grads[name], exact[name], what=f"{case.name} d/d{name}")


@CASES
def test_bound_below_the_log_evidence_away_from_the_posterior(case: ObjectiveCase):
    objective = case.build()
    params = dict(objective_params(case))
    params["loc"] = params["loc"] + 0.7
    values = many(lambda k: case.call(objective, k, params), num=4000)
    mean, se = float(np.mean(values)), float(np.std(values) / np.sqrt(len(values)))
    if case.is_bound:
        assert mean < registry.log_evidence() - 0.01 + 4 * se, (case.name, mean)
    assert np.all(np.isfinite(values))


@CASES
def test_jit_vmap_no_retrace_and_two_devices(case: ObjectiveCase):
    objective = case.build()
    params = objective_params(case)
    keys = jax.random.split(jax.random.key(1), 4)

    def run(keys):
        return jax.vmap(lambda k: case.call(objective, k, params))(keys)

    batched = jax.jit(run)(keys)
    one_by_one = jnp.stack([case.call(objective, k, params) for k in keys])
    # value mode and the surrogate's primal are one estimate (same key, same draws)
    value, _ = objective.value_and_grad(keys[0], *_arguments(case, params),
                                        argnums=objective.params_argnums)
    assert np.allclose(value, one_by_one[0], rtol=1e-5, atol=1e-5)
    assert np.allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)
    assert tree_allclose(sharded(run, keys), batched, rtol=1e-5, atol=1e-5)
    # estimate and value_and_grad are jitted once per shape
    case.grads(objective, keys[0], params)
    size = objective.expectation._grad._cache_size()
    shifted = jax.tree.map(lambda x: x + 0.1, params)
    case.grads(objective, keys[1], shifted)
    assert objective.expectation._grad._cache_size() == size


def _arguments(case, params):
    if case.name == "iwelbo_dreg":
        return ({"prior_loc": params["prior_loc"]},
                {"loc": params["loc"], "log_scale": params["log_scale"]}, registry.X_OBS)
    return params, registry.X_OBS


# ---------------------------------------------------------------------------- SVI losses

LOSS_CASES = pytest.mark.parametrize("case", LOSSES, ids=lambda c: c.name)


@LOSS_CASES
def test_loss_is_minus_the_log_evidence_at_the_posterior(case):
    loss = case.build()
    params = registry.loss_params()
    if not case.exact_per_draw:
        values = many(lambda k: loss.loss(k, params, registry.gaussian_model,
                                          registry.gaussian_guide, registry.X_OBS), num=NUM)
        assert_unbiased(values, -registry.log_evidence(), what=case.name)
        return
    for seed in range(3):
        value = loss.loss(jax.random.key(seed), params, registry.gaussian_model,
                          registry.gaussian_guide, registry.X_OBS)
        assert np.allclose(value, -registry.log_evidence(), atol=1e-4), (case.name, value)


@LOSS_CASES
def test_loss_trains_in_numpyro_svi(case):
    loss = case.build()
    svi = SVI(registry.gaussian_model, registry.gaussian_guide, Adam(0.05), loss)
    result = svi.run(jax.random.key(0), 400, registry.X_OBS, progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    # the guide's mean moves to the posterior mean for the learnt prior location: the
    # maximum-likelihood prior location is x itself, where the posterior mean is x too
    assert abs(float(result.params["loc"]) - float(result.params["prior_loc"]) * 0.5
               - registry.X_OBS * 0.5) < 0.25
    assert result.losses[-50:].mean() < result.losses[:50].mean()
