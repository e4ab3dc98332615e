"""Common tests over the kernel registry (`registry.KERNELS`): the protocol of
`ppl_ext/_kernel.py` under `jit` (no retrace for new values), `vmap` over keys, `scan`
(the state keeps its structure, shapes and dtypes), x64 and two devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conformance.registry import KERNELS, KernelCase, sharded
from tests.helpers import tree_allclose

CASES = pytest.mark.parametrize("case", KERNELS, ids=lambda c: c.name)


def _same_structure(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(
        jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y)
        for x, y in zip(leaves_a, leaves_b))


@CASES
def test_jit_vmap_no_retrace_and_two_devices(case: KernelCase):
    kernel = case.build()
    init = jax.jit(case.init, static_argnums=0)
    state = init(kernel, jax.random.key(0))
    traces = []

    def step(key, state, *args):
        traces.append(1)
        return kernel.step(key, state, *args)

    jitted = jax.jit(step)
    new, info = jitted(jax.random.key(1), state, *case.step_args(0))
    # what lax.scan needs to carry the state: the same structure, shapes and dtypes
    assert _same_structure(new, state), case.name
    assert all(np.all(np.isfinite(np.asarray(leaf, np.float64)))
               for leaf in jax.tree.leaves((new, info))), case.name
    # a second call with new arrays of the same shapes does not retrace
    jitted(jax.random.key(2), new, *case.step_args(1))
    assert len(traces) == 1, f"{case.name}: retraced for new values"

    # vmap over keys equals one call per key, and two devices equal one
    def run(key):
        state = case.init(kernel, key)
        return kernel.step(jax.random.fold_in(key, 1), state, *case.step_args(0))

    keys = jax.random.split(jax.random.key(4), 4)
    batched = jax.jit(jax.vmap(run))(keys)
    for i in range(4):
        state = init(kernel, keys[i])
        one = jitted(jax.random.fold_in(keys[i], 1), state, *case.step_args(0))
        assert tree_allclose(jax.tree.map(lambda a: a[i], batched), one, rtol=1e-4,
                             atol=1e-5), case.name
    two = sharded(jax.vmap(run), keys)
    assert tree_allclose(batched, two, rtol=1e-4, atol=1e-5), case.name


X64_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from tests.conformance.registry import KERNELS
    assert jax.config.jax_enable_x64
    for case in KERNELS:
        kernel = case.build()
        state = jax.jit(case.init, static_argnums=0)(kernel, jax.random.key(0))
        state, info = jax.jit(kernel.step)(jax.random.key(1), state, *case.step_args(0))
        for leaf in jax.tree.leaves((state, info)):
            leaf = jnp.asarray(leaf)
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float64, (case.name, leaf.dtype)
            assert np.all(np.isfinite(np.asarray(leaf, np.float64))), case.name
    print("ok")
    """
)


def test_every_kernel_under_x64():
    env = {**os.environ, "JAX_ENABLE_X64": "1", "XLA_FLAGS": ""}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c",
                             X64_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-4000:])
