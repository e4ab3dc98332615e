"""A variational autoencoder on binarised digits, as NumPyro model and guide functions.

Latents `z ~ Normal(0, I)` of dimension `latent_dim`; pixels `x | z ~ Bernoulli(logits =
decoder(z))`; guide `q(z | x) = Normal(mu(x), sigma(x))` from an encoder. Encoder and
decoder are equinox MLPs registered with `numpyro.contrib.module.eqx_module`, so their
weights are NumPyro parameters (`"encoder$params"`, `"decoder$params"`) that
`numpyro.infer.SVI` optimises with any loss, e.g. `px.numpyro.ELBO()` or `Trace_ELBO()`.

Example::

    from models import vae
    import ppl_ext as px
    params, losses = vae.train_vae(2000, 64, px.numpyro.ELBO(), jax.random.key(0))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI

import ppl_ext as px

from . import digits

#: Default latent dimension and hidden width.
LATENT_DIM = 4
HIDDEN = 64

Model = Callable[[jax.Array], None]


def make_vae(key: jax.Array, latent_dim: int = LATENT_DIM,
             hidden: int = HIDDEN) -> tuple[Model, Model]:
    """Build the VAE's NumPyro model and guide, with MLPs initialised from `key`.

    Both are called as `fn(x)` with a batch `x` of binary images of shape `(batch, 64)`;
    the batch is a `numpyro.plate("batch", ...)` and the latent site is `"z"` (shape
    `(batch, latent_dim)`, event dimension 1). Returns `(model, guide)`.
    """
    key_enc, key_dec = jax.random.split(key)
    num_pixels = digits.NUM_FEATURES
    encoder = eqx.nn.MLP(num_pixels, 2 * latent_dim, hidden, depth=1,
                         activation=jax.nn.tanh, key=key_enc)
    decoder = eqx.nn.MLP(latent_dim, num_pixels, hidden, depth=1,
                         activation=jax.nn.tanh, key=key_dec)

    def model(x):
        """VAE generative model p(z) p(x | z); `x` of shape `(batch, 64)` is observed."""
        net = eqx_module("decoder", decoder)
        with numpyro.plate("batch", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([latent_dim]).to_event(1))
            logits = jax.vmap(net)(z)
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        """Amortised Gaussian guide q(z | x) from the encoder MLP."""
        net = eqx_module("encoder", encoder)
        with numpyro.plate("batch", x.shape[0]):
            out = jax.vmap(net)(x)
            loc, raw_scale = out[:, :latent_dim], out[:, latent_dim:]
            scale = jax.nn.softplus(raw_scale) + 1e-3
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def train_vae(
    num_steps: int,
    batch_size: int,
    loss: Any = None,
    key: jax.Array | None = None,
    progress: bool = False,
    *,
    vae: tuple[Model, Model] | None = None,
    latent_dim: int = LATENT_DIM,
    hidden: int = HIDDEN,
    learning_rate: float = 3e-3,
    x_train: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Fit the VAE with `numpyro.infer.SVI` on random minibatches of binarised digits.

    `loss` is any SVI loss (default `px.numpyro.ELBO()`); `key` seeds the network
    initialisation (unless `vae=(model, guide)` is given), SVI and the minibatches (drawn
    without replacement within a step); `x_train` defaults to the training split of
    `digits.load_split()`. With `num_steps=0` it returns the initial parameters. Prints the
    running loss ten times when `progress` is true.

    Returns `(params, losses)`: the constrained parameter dict (as from
    `SVI.get_params`) and a float32 array of the `num_steps` losses (negative ELBO
    estimates summed over each minibatch).
    """
    loss = px.numpyro.ELBO() if loss is None else loss
    key = jax.random.key(0) if key is None else key
    key_net, key_fit = jax.random.split(key)
    if vae is None:
        vae = make_vae(key_net, latent_dim, hidden)
    x = digits.load_split()[0] if x_train is None else x_train
    svi = SVI(vae[0], vae[1], numpyro.optim.Adam(learning_rate), loss=loss)
    return digits.fit_svi(svi, x, num_steps, batch_size, key_fit, progress)


@functools.lru_cache(maxsize=16)
def _elbo_estimates(model, guide, num_samples):
    objective = px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))

    @jax.jit
    def estimates(params, x, key):
        keys = jax.random.split(key, num_samples)
        return jax.vmap(lambda k: objective(k, params, x))(keys)

    return estimates


def estimate_elbo(
    params: dict[str, Any],
    vae: tuple[Model, Model],
    x: np.ndarray,
    key: jax.Array,
    num_samples: int = 10,
) -> float:
    """Monte-Carlo ELBO of `x` under the VAE with `params`, per data point.

    Averages `num_samples` independent estimates of `px.vi.elbo` over the whole batch `x`
    and divides by `len(x)`. Returns a Python float (higher is better).
    """
    model, guide = vae
    x = jnp.asarray(x)
    values = _elbo_estimates(model, guide, num_samples)(params, x, key)
    return float(jnp.mean(values)) / x.shape[0]


def reconstruct(params: dict[str, Any], vae: tuple[Model, Model], x: np.ndarray,
                key: jax.Array) -> jax.Array:
    """Encode `x`, draw one `z` per image from the guide and decode it.

    Returns pixel probabilities of shape `x.shape` (float32 in `(0, 1)`).
    """
    model, guide = vae
    x = jnp.asarray(x)
    guide_trace = numpyro.handlers.trace(
        numpyro.handlers.seed(numpyro.handlers.substitute(guide, data=params), key)
    ).get_trace(x)
    z = guide_trace["z"]["value"]
    model_trace = numpyro.handlers.trace(
        numpyro.handlers.substitute(model, data={**params, "z": z})
    ).get_trace(x)
    return model_trace["x"]["fn"].base_dist.probs
