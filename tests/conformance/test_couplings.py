"""Common tests over the minibatch-coupling registry (`registry.COUPLINGS`): indices of
shape `(batch,)` and dtype int32, a permutation where promised, jit and vmap over a batch
of minibatches equal to an eager loop, and two host devices equal to one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_ext as px
from tests.conformance.registry import COUPLINGS, CouplingCase, sharded

CASES = pytest.mark.parametrize("case", COUPLINGS, ids=lambda c: c.name)
NUM_MINIBATCHES, SIZE, DIM = 2, 12, 2


def minibatches():
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k0, (NUM_MINIBATCHES, SIZE, DIM))
    x1 = 0.5 * jax.random.normal(k1, (NUM_MINIBATCHES, SIZE, DIM)) + 2.0
    return x0, x1, jax.random.uniform(k2, (NUM_MINIBATCHES, SIZE))


@CASES
def test_coupling_conformance(case: CouplingCase):
    """Eager per minibatch (the reference) = jit(vmap) on one device = the same sharded
    over two devices (three compilations in all, to stay fast)."""
    coupling = case.build()
    assert isinstance(coupling, px.flows.AbstractCoupling)
    x0, x1, uniforms = minibatches()

    def match(x0, x1, uniforms):
        return coupling.match(x0, x1, uniforms if coupling.random else None)

    batched = jax.jit(jax.vmap(match))(x0, x1, uniforms)
    assert batched.shape == (NUM_MINIBATCHES, SIZE) and batched.dtype == jnp.int32
    for k in range(NUM_MINIBATCHES):
        eager = match(x0[k], x1[k], uniforms[k])
        assert eager.shape == (SIZE,) and eager.dtype == jnp.int32, case.name
        indices = np.asarray(batched[k])
        assert indices.min() >= 0 and indices.max() < SIZE, case.name
        if case.permutation:
            assert sorted(indices.tolist()) == list(range(SIZE)), \
                f"{case.name}: not a permutation"
        np.testing.assert_array_equal(indices, eager,
                                      err_msg=f"{case.name}: jit(vmap) != eager loop")
    two = sharded(jax.vmap(match), x0, x1, uniforms)
    np.testing.assert_array_equal(two, batched, err_msg=f"{case.name}: two devices != one")
