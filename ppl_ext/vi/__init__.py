"""Objective language constructs (marginal, normalize) and the objective library."""

from ._constructs import (
    Marginal as Marginal,
    Normalize as Normalize,
    marginal as marginal,
    normalize as normalize,
)
from ._objectives import (
    diwhvi as diwhvi,
    elbo as elbo,
    hvi as hvi,
    forward_kl as forward_kl,
    iwelbo as iwelbo,
    iwelbo_dreg as iwelbo_dreg,
    renyi as renyi,
    symmetric_kl as symmetric_kl,
    vimco as vimco,
    wake_p as wake_p,
    wake_q as wake_q,
)
from ._requirements import (
    Site as Site,
    SiteRequirement as SiteRequirement,
    check_sites as check_sites,
    simulate_sites as simulate_sites,
)

__all__ = [
    "Marginal",
    "Normalize",
    "Site",
    "SiteRequirement",
    "check_sites",
    "diwhvi",
    "elbo",
    "hvi",
    "forward_kl",
    "iwelbo",
    "iwelbo_dreg",
    "marginal",
    "normalize",
    "renyi",
    "simulate_sites",
    "symmetric_kl",
    "vimco",
    "wake_p",
    "wake_q",
]
