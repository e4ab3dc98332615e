"""Objective language constructs (marginal, normalize) and the objective library."""

from ._constructs import (
    Marginal as Marginal,
    Normalize as Normalize,
    marginal as marginal,
    normalize as normalize,
)
from ._objectives import (
    elbo as elbo,
    forward_kl as forward_kl,
    iwelbo as iwelbo,
    renyi as renyi,
    symmetric_kl as symmetric_kl,
    wake_p as wake_p,
    wake_q as wake_q,
)

__all__ = [
    "Marginal",
    "Normalize",
    "elbo",
    "forward_kl",
    "iwelbo",
    "marginal",
    "normalize",
    "renyi",
    "symmetric_kl",
    "wake_p",
    "wake_q",
]
