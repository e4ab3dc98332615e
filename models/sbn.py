"""A one-layer sigmoid belief net on binarised digits: Bernoulli latents, Bernoulli pixels.

Model: `h ~ Bernoulli(logits = prior_logits)` (`num_latent` units per image) and
`x | h ~ Bernoulli(logits = W h + b)`. Guide: `q(h | x) = Bernoulli(logits = encoder(x))`
with a linear encoder. The latent site `"h"` is discrete, so gradients need a
score-function estimator: `px.numpyro.ELBO()` (REINFORCE by default),
`px.numpyro.ELBO(estimators={"h": px.LeaveOneOut(4)})`, or numpyro's `TraceGraph_ELBO`.
All parameters are `numpyro.param` sites (initial values drawn from the `make_sbn` key).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI

import ppl_ext as px

from . import digits

#: Default number of latent Bernoulli units.
NUM_LATENT = 8

#: A tiny two-layer net small enough to enumerate (`z1` 2 bits -> `z2` 2 bits -> `x` 3 bits),
#: shared by the graph Rao-Blackwellisation tests and the TraceGraph_ELBO benchmark: the
#: observed bits, the model's weights, and guide weights for `q(z2 | x) q(z1 | z2)`.
TINY_X = jnp.array([1.0, 0.0, 1.0])
TINY_MODEL = {
    "b1": jnp.array([0.2, -0.4]),
    "W2": jnp.array([[1.0, -1.5], [0.5, 2.0]]),
    "b2": jnp.array([-0.3, 0.1]),
    "W3": jnp.array([[2.0, -1.0], [-0.5, 1.5], [1.0, 1.0]]),
    "b3": jnp.array([0.0, -0.5, 0.3]),
}
TINY_GUIDE = {
    "A": jnp.array([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.2]]),
    "c2": jnp.array([0.1, -0.1]),
    "B": jnp.array([[0.5, -0.5], [0.2, 0.4]]),
    "c1": jnp.array([-0.2, 0.3]),
}

Model = Callable[[jax.Array], None]


def make_sbn(key: jax.Array, num_latent: int = NUM_LATENT,
             init_scale: float = 0.1) -> tuple[Model, Model]:
    """Build the sigmoid belief net's NumPyro model and guide.

    Both are called as `fn(x)` with binary images `x` of shape `(batch, 64)`, inside a
    `numpyro.plate("batch", ...)`; the latent site `"h"` has shape `(batch, num_latent)`
    (event dimension 1). Model parameters: `"prior_logits"`, `"W"` (64 x num_latent), `"b"`;
    guide parameters: `"enc_W"` (num_latent x 64), `"enc_b"`. Weights start as
    `init_scale` times standard normals drawn from `key`. Returns `(model, guide)`.
    """
    num_pixels = digits.NUM_FEATURES
    key_w, key_e = jax.random.split(key)
    w0 = init_scale * jax.random.normal(key_w, (num_pixels, num_latent))
    enc_w0 = init_scale * jax.random.normal(key_e, (num_latent, num_pixels))

    def model(x):
        """Generative model p(h) p(x | h); `x` of shape `(batch, 64)` is observed."""
        prior_logits = numpyro.param("prior_logits", jnp.zeros(num_latent))
        w = numpyro.param("W", w0)
        b = numpyro.param("b", jnp.zeros(num_pixels))
        with numpyro.plate("batch", x.shape[0]):
            h = numpyro.sample("h", dist.Bernoulli(logits=prior_logits).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=h @ w.T + b).to_event(1), obs=x)

    def guide(x):
        """Mean-field Bernoulli guide q(h | x) with a linear encoder."""
        enc_w = numpyro.param("enc_W", enc_w0)
        enc_b = numpyro.param("enc_b", jnp.zeros(num_latent))
        with numpyro.plate("batch", x.shape[0]):
            numpyro.sample("h", dist.Bernoulli(logits=x @ enc_w.T + enc_b).to_event(1))

    return model, guide


def train_sbn(
    num_steps: int,
    batch_size: int,
    loss: Any = None,
    key: jax.Array | None = None,
    progress: bool = False,
    *,
    sbn: tuple[Model, Model] | None = None,
    num_latent: int = NUM_LATENT,
    learning_rate: float = 1e-2,
    x_train: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Fit the sigmoid belief net with `numpyro.infer.SVI` on random minibatches.

    `loss` is any SVI loss (default `px.numpyro.ELBO()`, score function for `"h"`); `key`
    seeds the initialisation (unless `sbn=(model, guide)` is given), SVI and the
    minibatches; `x_train` defaults to the binarised training split of
    `digits.load_split()`. Prints the running loss ten times when `progress` is true.

    Returns `(params, losses)`: the parameter dict and a float32 array of the `num_steps`
    losses (negative ELBO estimates summed over each minibatch).
    """
    loss = px.numpyro.ELBO() if loss is None else loss
    key = jax.random.key(0) if key is None else key
    key_net, key_fit = jax.random.split(key)
    model, guide = make_sbn(key_net, num_latent) if sbn is None else sbn
    x = digits.load_split()[0] if x_train is None else x_train
    svi = SVI(model, guide, numpyro.optim.Adam(learning_rate), loss=loss)
    return digits.fit_svi(svi, x, num_steps, batch_size, key_fit, progress)
