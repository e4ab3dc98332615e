"""Time-dependent vector fields `f(params, t, x)`: velocities, drifts, scores, denoisers.

A field is any callable `field(params, t, x) -> (dim,)` for one point `x (dim,)` and a
scalar time `t`; `params` is a pytree of arrays (what `px.fit` trains). `MLPField` is
the ready-made one; closed-form fields (the exact velocity of a Gaussian target) are
plain functions of the same signature.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._paths import AbstractPath


class MLPField(eqx.Module):
    """A multilayer perceptron `(t, x) ↦ f(t, x)` in `R^dim` (an `equinox.nn.MLP` on
    the concatenation `[x, t]`).

    `init(key)` returns the parameters (the MLP's arrays); `field(params, t, x)`
    evaluates it at one point.

    Args:
        dim: the dimension of `x`.
        hidden_sizes: widths of the hidden layers (at least one).
        activation: the hidden activation (default `jax.nn.silu`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.flows import MLPField
        >>> field = MLPField(2, hidden_sizes=(16,))
        >>> params = field.init(jax.random.key(0))
        >>> field(params, 0.5, jnp.zeros(2)).shape
        (2,)
    """

    dim: int = eqx.field(static=True)
    hidden_sizes: tuple[int, ...] = eqx.field(static=True)
    _skeleton: eqx.nn.MLP

    def __init__(self, dim: int, hidden_sizes: tuple[int, ...] = (64, 64),
                 activation: Callable = jax.nn.silu):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"MLPField: dim must be an int >= 1, got {dim!r}.")
        hidden_sizes = tuple(hidden_sizes)
        if not hidden_sizes or any(not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"MLPField: hidden_sizes must be positive ints, got "
                             f"{hidden_sizes!r}.")
        if len(set(hidden_sizes)) != 1:
            raise ValueError("MLPField: equinox.nn.MLP needs equal hidden widths, got "
                             f"{hidden_sizes!r}.")
        self.dim = dim
        self.hidden_sizes = hidden_sizes
        mlp = eqx.nn.MLP(dim + 1, dim, hidden_sizes[0], len(hidden_sizes),
                         activation=activation, key=jax.random.key(0))
        self._skeleton = eqx.filter(mlp, eqx.is_array, inverse=True)

    def init(self, key: jax.Array):
        """Fresh parameters (equinox's default initialisation) drawn with `key`."""
        mlp = eqx.nn.MLP(self.dim + 1, self.dim, self.hidden_sizes[0],
                         len(self.hidden_sizes), activation=self._skeleton.activation,
                         key=key)
        return eqx.filter(mlp, eqx.is_array)

    def __call__(self, params, t: ArrayLike, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        mlp = eqx.combine(params, self._skeleton)
        inputs = jnp.concatenate([x, jnp.reshape(jnp.asarray(t, x.dtype), (1,))])
        return mlp(inputs)


def score_from_velocity(path: AbstractPath, velocity: Callable) -> Callable:
    """The score `∇ log p_t(x)` implied by the velocity of a one-sided path with
    `x0 ~ N(0, I)` and `gamma = 0`.

    From `x = alpha x0 + beta x1` and `v = alpha' E[x0|x] + beta' E[x1|x]`,
    `E[x0 | x] = (beta v - beta' x) / (alpha' beta - alpha beta')` and the score is
    `-E[x0 | x] / alpha`, singular at `t = 1` where `alpha = 0` (stop an SDE before it).

    Args:
        path: a path with `gamma = 0`.
        velocity: the velocity field `velocity(params, t, x)`.

    Returns:
        The score field `score(params, t, x)`.
    """
    if not path.gamma.is_zero():
        raise ValueError("score_from_velocity needs a one-sided path (gamma = 0); train a "
                         "score with px.flows.score_loss for a path with latent noise.")

    def score(params, t, x):
        alpha, beta = path.alpha(t), path.beta(t)
        alpha_dot, beta_dot = path.alpha_derivative(t), path.beta_derivative(t)
        v = velocity(params, t, x)
        mean_x0 = (beta * v - beta_dot * x) / (alpha_dot * beta - alpha * beta_dot)
        return -mean_x0 / alpha

    return score
