"""Hierarchical linear regression with group intercepts, on data generated in code.

Model: `mu_alpha ~ Normal(0, 5)` (global intercept), `sigma_alpha ~ HalfNormal(2)`,
`alpha_g ~ Normal(mu_alpha, sigma_alpha)` for each group, `beta ~ Normal(0, 5)`,
`sigma ~ HalfNormal(2)`, and `y_i ~ Normal(alpha[group_i] + beta x_i, sigma)`. All latent
sites are continuous, so NumPyro autoguides (`AutoNormal`, `AutoDiagonalNormal`, ...)
work with `px.numpyro.ELBO()` and `Trace_ELBO()` alike.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

#: Parameters used by `generate_data`.
TRUE_MU_ALPHA = 2.0
TRUE_SIGMA_ALPHA = 0.5
TRUE_BETA = -1.5
TRUE_SIGMA = 0.5
NUM_GROUPS = 5


def generate_data(num_groups: int = NUM_GROUPS, per_group: int = 20,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Draw a data set from the model with the `TRUE_*` parameters (numpy, fixed `seed`).

    Returns a dict with `"x"` (float32, `(n,)`, standard normal covariate), `"group"`
    (int32 group index, `(n,)`), `"y"` (float32 response, `(n,)`) and `"alpha"` (the drawn
    group intercepts, `(num_groups,)`), with `n = num_groups * per_group`.
    """
    rng = np.random.default_rng(seed)
    alpha = TRUE_MU_ALPHA + TRUE_SIGMA_ALPHA * rng.standard_normal(num_groups)
    group = np.repeat(np.arange(num_groups), per_group)
    x = rng.standard_normal(group.shape[0])
    y = alpha[group] + TRUE_BETA * x + TRUE_SIGMA * rng.standard_normal(group.shape[0])
    return {"x": x.astype(np.float32), "group": group.astype(np.int32),
            "y": y.astype(np.float32), "alpha": alpha.astype(np.float32)}


def model(x, group, num_groups: int = NUM_GROUPS, y=None):
    """Hierarchical regression of `y` on `x` with one intercept per `group`; returns nothing.

    Latent sites: `"mu_alpha"`, `"sigma_alpha"`, `"alpha"` (shape `(num_groups,)`, in the
    `"groups"` plate), `"beta"`, `"sigma"`; `"y"` is observed when given (else sampled, for
    `numpyro.infer.Predictive`).
    """
    mu_alpha = numpyro.sample("mu_alpha", dist.Normal(0.0, 5.0))
    sigma_alpha = numpyro.sample("sigma_alpha", dist.HalfNormal(2.0))
    with numpyro.plate("groups", num_groups):
        alpha = numpyro.sample("alpha", dist.Normal(mu_alpha, sigma_alpha))
    beta = numpyro.sample("beta", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("data", jnp.shape(x)[0]):
        numpyro.sample("y", dist.Normal(alpha[group] + beta * x, sigma), obs=y)
