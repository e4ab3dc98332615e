"""`.hvp` over the estimator registry (`registry.ESTIMATORS`).

Every entry's program either is refused with `px.SecondOrderError` (estimators whose
second-order estimator is not proved: continuation estimators) or gives Hessian-vector
product estimates whose mean over NUM keys lies within K_SE standard errors of the
second derivative of the entry's closed form `exact` (jax.hessian of it, no ppl_ext).
`px.reparam` and `px.reinforce` entries must not be refused.
"""

import jax
import jax.numpy as jnp
import pytest

import ppl_ext as px

from tests.conformance.registry import ESTIMATORS, EstimatorCase, estimator_program
from tests.helpers import assert_unbiased

K_SE = 4
NUM = 20_000
V = 1.5
CASES = pytest.mark.parametrize("case", ESTIMATORS, ids=lambda c: c.name)


def _supported(estimator) -> bool:
    """Estimators `.hvp` must accept on these programs (smooth, scalar baselines)."""
    return isinstance(estimator, (px.Reparam, px.Reinforce))


@CASES
def test_hvp_refused_or_unbiased(case: EstimatorCase):
    f = estimator_program(case)
    params = {"theta": jnp.asarray(case.theta)}
    v = {"theta": jnp.asarray(V)}
    try:
        f.hvp(jax.random.key(0), params, v=v)
    except px.SecondOrderError as error:
        assert not _supported(case.estimator), f"{case.name} refused: {error}"
        assert type(case.estimator).__name__ in str(error)
        return
    keys = jax.random.split(jax.random.key(7), NUM)
    out = jax.vmap(lambda k: f.hvp(k, params, v=v))(keys)
    exact = jax.hessian(case.exact)(jnp.asarray(case.theta)) * V
    assert_unbiased(out["theta"], exact, k=K_SE, what=f"{case.name} hvp")
