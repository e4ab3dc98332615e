"""Refuse derivatives through SMC: the gradient of a particle filter's outputs would drop
the score terms of its resampling steps (and of its non-reparameterised draws), which is
silently biased.

`refuse_derivatives(tree, where)` is the identity on values; differentiating any float
leaf that depends on the input being differentiated (parameters, observations, anything a
law closes over) raises `UnsupportedEstimatorError` naming `where` and the way out. The
unbiased gradient through resampling (score terms on the ancestor indices) comes with SMC
as a generative function; until then, derivatives are refused rather than wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..adev._errors import UnsupportedEstimatorError


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _identity(x, where: str):
    return x


@_identity.defjvp
def _identity_jvp(where, primals, tangents):
    raise UnsupportedEstimatorError(
        f"{where}: differentiating through a particle filter or smoother is not supported: "
        "the derivative of its outputs leaves out the score terms of the resampling steps "
        "(the ancestor indices) and of draws that are not reparameterised, so it would be "
        "silently biased (FIVO-style). Wrap what you pass in jax.lax.stop_gradient to "
        "compute values inside a differentiated program, or use the Fisher-identity score "
        "from a smoother's additive functional (px.smc.paris with the gradient of the log "
        "densities as the functional)."
    )


def refuse_derivatives(tree, where: str):
    """`tree` unchanged; a derivative through any of its float leaves raises (see above)."""

    def guard(leaf):
        if isinstance(leaf, jax.Array | jnp.ndarray) and jnp.issubdtype(leaf.dtype,
                                                                     jnp.inexact):
            return _identity(leaf, where)
        return leaf

    return jax.tree.map(guard, tree)
