"""The transformation under double precision (JAX_ENABLE_X64=1), in a fresh process.

x64 is a process-wide switch fixed at import, so this runs a short script in a subprocess.
Each check compares a mean of 10^4 estimates with the exact value within 4 standard errors
(false-failure budget: tests/conftest.py).
"""

import os
import subprocess
import sys
import textwrap

from tests.helpers import record_comparisons

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import numpyro.distributions as dist
    from jax import lax
    import ppl_ext as px

    assert jax.config.jax_enable_x64

    @px.expectation
    def f(t):
        x = px.sample(dist.Normal(t, 1.0))
        b = px.sample(dist.Bernoulli(logits=t), px.enum)
        c = px.sample(dist.Poisson(jnp.exp(t)), px.mvd)
        s = lax.scan(lambda a, _: (a + px.sample(dist.Normal(t, 1.0), px.reinforce), None),
                     0.0, length=2)[0]
        return (x - 3.0) ** 2 + b + c + s ** 2

    t = jnp.asarray(0.5, jnp.float64)
    value, grad = f.value_and_grad(jax.random.key(0), t)
    assert value.dtype == jnp.float64 and grad.dtype == jnp.float64, (value.dtype, grad.dtype)
    keys = jax.random.split(jax.random.key(1), 10_000)
    values, grads = jax.jit(jax.vmap(f.value_and_grad, (0, None)))(keys, t)
    p = 1 / (1 + np.exp(-0.5))
    exact_value = (0.5 - 3) ** 2 + 1 + p + np.exp(0.5) + 2 + 4 * 0.25
    exact_grad = 2 * (0.5 - 3) + p * (1 - p) + np.exp(0.5) + 8 * 0.5
    for name, xs, exact in [("value", values, exact_value), ("grad", grads, exact_grad)]:
        xs = np.asarray(xs)
        se = xs.std(ddof=1) / np.sqrt(xs.size)
        assert abs(xs.mean() - exact) < 4 * se, (name, xs.mean(), exact, se)
    print("x64 ok")
    """
)


def test_x64_process():
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "x64 ok" in result.stdout, result.stderr[-3000:]
    record_comparisons(2)  # the subprocess's two k-SE comparisons
