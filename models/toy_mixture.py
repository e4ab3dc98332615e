"""NumPyro's discrete-enumeration toy mixture (examples/toy_mixture_model_discrete_enumeration.py).

`A -> B -> C` with Bernoulli links: `A` and `C` observed in a plate of `num_obs`, `B`
enumerated (`config_enumerate`), Beta priors on the link probabilities and a Beta guide on
them. `num_obs` is a positional Python int, as in the example. Used by the parity tests
(`tests/numpyro/test_parity.py`) and the workflow benchmark.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.funsor import config_enumerate
from numpyro.distributions import constraints
from numpyro.ops.indexing import Vindex

#: The prior's Beta parameters, also the guide's initial values.
PRIOR = {"A": jnp.array([1.0, 10.0]), "B": jnp.array([[10.0, 1.0], [1.0, 10.0]]),
         "C": jnp.array([[10.0, 1.0], [1.0, 10.0]])}


@config_enumerate
def model(prior, obs, num_obs):
    """The example's model, as written (`prior` is unused by it)."""
    p_A = numpyro.sample("p_A", dist.Beta(1, 1))
    p_B = numpyro.sample("p_B", dist.Beta(jnp.ones(2), jnp.ones(2)).to_event(1))
    p_C = numpyro.sample("p_C", dist.Beta(jnp.ones(2), jnp.ones(2)).to_event(1))
    with numpyro.plate("data_plate", num_obs):
        A = numpyro.sample("A", dist.Bernoulli(p_A), obs=obs["A"])
        B = numpyro.sample("B", dist.Bernoulli(Vindex(p_B)[A]),
                           infer={"enumerate": "parallel"})
        numpyro.sample("C", dist.Bernoulli(Vindex(p_C)[B]), obs=obs["C"])


def guide(prior, obs, num_obs):
    """Beta factors on `p_A`, `p_B`, `p_C`, initialised at `prior`."""
    a = numpyro.param("a", prior["A"], constraint=constraints.positive)
    numpyro.sample("p_A", dist.Beta(a[0], a[1]))
    b = numpyro.param("b", prior["B"], constraint=constraints.positive)
    numpyro.sample("p_B", dist.Beta(b[:, 0], b[:, 1]).to_event(1))
    c = numpyro.param("c", prior["C"], constraint=constraints.positive)
    numpyro.sample("p_C", dist.Beta(c[:, 0], c[:, 1]).to_event(1))


def generate_data(num_obs: int, p_a: float = 0.3, p_b: tuple[float, float] = (0.2, 0.8),
                  p_c: tuple[float, float] = (0.3, 0.9), seed: int = 0):
    """`(PRIOR, obs)`: `A ~ Bernoulli(p_a)`, `B ~ Bernoulli(p_b[A])`, `C ~ Bernoulli(p_c[B])`,
    drawn with NumPy from `seed`; `obs` holds `A` and `C` (int32)."""
    rng = np.random.default_rng(seed)
    a = (rng.random(num_obs) < p_a).astype(np.int32)
    b = (rng.random(num_obs) < np.where(a == 1, p_b[1], p_b[0])).astype(np.int32)
    c = (rng.random(num_obs) < np.where(b == 1, p_c[1], p_c[0])).astype(np.int32)
    return PRIOR, {"A": jnp.asarray(a), "C": jnp.asarray(c)}
