"""Objective language constructs (marginal, normalize) and the objective library."""

from ._constructs import (
    Marginal as Marginal,
    Normalize as Normalize,
    marginal as marginal,
    normalize as normalize,
)
from ._objectives import elbo as elbo, iwelbo as iwelbo

__all__ = ["Marginal", "Normalize", "elbo", "iwelbo", "marginal", "normalize"]
