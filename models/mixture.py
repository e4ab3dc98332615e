"""A one-dimensional Gaussian mixture with discrete assignments, as NumPyro functions.

Model: `weights ~ Dirichlet(1)`, `locs_k ~ Normal(0, 10)`, `scale ~ LogNormal(0, 1)`, and per
data point `z_i ~ Categorical(weights)` (marked `infer={"enumerate": "parallel"}`),
`x_i ~ Normal(locs[z_i], scale)`.

Two guides:

- `continuous_guide`: the global sites only, for numpyro's `TraceEnum_ELBO` (which needs
  the optional `funsor` package) to sum the assignments out of `model` exactly; or with
  `marginal_model`, where they are summed out analytically, under any ELBO.
- `assignment_guide`: the global sites plus `z_i ~ Categorical(logits = a_k x_i² + b_k x_i +
  c_k)` (a family that contains the exact conditional `p(z_i | x_i, locs, scale, weights)`),
  for ppl_ext's losses, e.g. `px.numpyro.ELBO(estimators={"z": px.enum})`. The ELBO is a
  sum of per-point terms, so `px.enum` enumerates the plate-batched site point by point
  (`K` evaluations in all, not `K ** n`) and trains on the whole data set or on
  minibatches (`num_data` scales the local terms to the full data set).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import SVI

#: Parameters used by `generate_data`.
TRUE_LOCS = (-4.0, 0.0, 4.0)
TRUE_WEIGHTS = (0.3, 0.4, 0.3)
TRUE_SCALE = 0.7
NUM_COMPONENTS = 3


def generate_data(num_data: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw data from the mixture with `TRUE_LOCS`, `TRUE_WEIGHTS`, `TRUE_SCALE`.

    Deterministic for a given `seed` (numpy's `default_rng`). Returns `(x, z)`: float32
    observations of shape `(num_data,)` and their int32 component labels.
    """
    rng = np.random.default_rng(seed)
    z = rng.choice(len(TRUE_WEIGHTS), size=num_data, p=np.asarray(TRUE_WEIGHTS))
    x = np.asarray(TRUE_LOCS)[z] + TRUE_SCALE * rng.standard_normal(num_data)
    return x.astype(np.float32), z.astype(np.int32)


def _local_scale(x, num_data):
    return 1.0 if num_data is None else num_data / x.shape[0]


def _global_prior(num_components):
    """The mixture weights, component locations and shared scale (global sites)."""
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(num_components)))
    with numpyro.plate("components", num_components):
        locs = numpyro.sample("locs", dist.Normal(0.0, 10.0))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    return weights, locs, scale


def model(x, num_data: int | None = None, num_components: int = NUM_COMPONENTS):
    """Mixture model over observations `x` of shape `(n,)`; returns nothing.

    `num_data` (default `n`) scales the per-point terms by `num_data / n` when `x` is a
    minibatch. The assignment site `"z"` is marked for parallel enumeration, which
    `TraceEnum_ELBO` uses and ppl_ext ignores.
    """
    weights, locs, scale = _global_prior(num_components)
    with handlers.scale(scale=_local_scale(x, num_data)):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights),
                               infer={"enumerate": "parallel"})
            numpyro.sample("x", dist.Normal(locs[z], scale), obs=x)


def marginal_model(x, num_data: int | None = None, num_components: int = NUM_COMPONENTS):
    """The same mixture with the assignments summed out analytically; returns nothing.

    `x_i ~ MixtureSameFamily(Categorical(weights), Normal(locs, scale))`, with no `"z"` site:
    pairs with `continuous_guide` under any ELBO (`Trace_ELBO`, `px.numpyro.ELBO()`),
    without funsor, and has the same marginal likelihood as `model`.
    """
    weights, locs, scale = _global_prior(num_components)
    with handlers.scale(scale=_local_scale(x, num_data)):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.MixtureSameFamily(dist.Categorical(weights),
                                                       dist.Normal(locs, scale)), obs=x)


def _global_guide(num_components):
    init_locs = jnp.linspace(-1.0, 1.0, num_components)
    conc = numpyro.param("weights_conc", jnp.full(num_components, 10.0),
                         constraint=dist.constraints.positive)
    numpyro.sample("weights", dist.Dirichlet(conc))
    loc = numpyro.param("locs_loc", init_locs)
    loc_scale = numpyro.param("locs_scale", jnp.full(num_components, 0.5),
                              constraint=dist.constraints.positive)
    with numpyro.plate("components", num_components):
        numpyro.sample("locs", dist.Normal(loc, loc_scale))
    scale_loc = numpyro.param("scale_loc", 0.0)
    scale_scale = numpyro.param("scale_scale", 0.2, constraint=dist.constraints.positive)
    numpyro.sample("scale", dist.LogNormal(scale_loc, scale_scale))


def continuous_guide(x, num_data: int | None = None, num_components: int = NUM_COMPONENTS):
    """Guide over the global sites only (`weights`, `locs`, `scale`); returns nothing.

    For numpyro's `TraceEnum_ELBO` (the model's `"z"` is enumerated). Locations start at
    `linspace(-1, 1, K)` to break the label symmetry.
    """
    _global_guide(num_components)


def assignment_guide(x, num_data: int | None = None, num_components: int = NUM_COMPONENTS):
    """Guide over the global sites and the assignments `"z"`; returns nothing.

    `q(z_i | x_i) = Categorical(logits = a x_i² + b x_i + c)` with parameters `"assign_a"`,
    `"assign_b"`, `"assign_c"` of shape `(K,)`; for ppl_ext losses with an estimator for
    `"z"` such as `px.enum` (on small minibatches), `px.reinforce` or `px.LeaveOneOut`.
    """
    _global_guide(num_components)
    a = numpyro.param("assign_a", jnp.zeros(num_components))
    b = numpyro.param("assign_b", jnp.zeros(num_components))
    c = numpyro.param("assign_c", jnp.zeros(num_components))
    logits = a * x[:, None] ** 2 + b * x[:, None] + c
    with handlers.scale(scale=_local_scale(x, num_data)):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Categorical(logits=logits))


def train(
    guide,
    loss,
    num_steps: int,
    key: jax.Array,
    batch_size: int | None = None,
    learning_rate: float = 0.05,
    x: np.ndarray | None = None,
    *,
    model=model,
    init_params: dict | None = None,
):
    """Fit `model` (or `marginal_model`) with `guide` and the SVI `loss`.

    `x` defaults to `generate_data()[0]`. With `batch_size`, each step uses that many
    distinct points and passes `num_data = len(x)` so that the objective is scaled to the
    full data set. Larger learning rates (0.1 with minibatches of 6) can collapse the
    components onto the data mean, a local optimum; from the default initial locations
    (-1, 0, 1) most seeds also stop at a local optimum with two components at about ±2.7.
    `init_params` (e.g. `{"locs_loc": quantiles of x}`) starts elsewhere. Returns `(params, losses)`: the parameter dict and the float32 numpy
    array of the `num_steps` losses.
    """
    x = jnp.asarray(generate_data()[0] if x is None else x)
    n = x.shape[0]
    svi = SVI(model, guide, numpyro.optim.Adam(learning_rate), loss=loss)
    key_init, key_batch = jax.random.split(key)
    b = n if batch_size is None else batch_size
    num_data = None if batch_size is None else n
    state = svi.init(key_init, x[:b], num_data, init_params=init_params)

    @jax.jit
    def step(state, step_key):
        batch = x if batch_size is None else x[
            jax.random.choice(step_key, n, (b,), replace=False)]
        return svi.update(state, batch, num_data)

    losses = np.zeros(num_steps, dtype=np.float32)
    for i, step_key in enumerate(jax.random.split(key_batch, num_steps)):
        state, losses[i] = step(state, step_key)
    return svi.get_params(state), losses
