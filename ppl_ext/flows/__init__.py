"""Flows: interpolant paths, flow-matching and interpolant losses, couplings, ODE/SDE
samplers, log densities, and trained flows as generative functions.

A first increment of issue 13 (score and flow models as generative functions). The
pieces are pluggable: a path (`LinearPath`, `TrigonometricPath`, `VPPath`, with a latent
`gamma` for two-sided interpolants), a loss written as a `px.expectation` program
(`velocity_loss`, `drift_loss`, `score_loss`, `denoiser_loss`) over minibatch pairs from a
coupling (`IndependentCoupling`, `ExactOTCoupling`, `EntropicOTCoupling`), trained with
`px.fit`; then `ode_sample` / `sde_sample` (diffrax), `log_density` (exact divergence) and
`hutchinson_log_density`, `FlowModel` (a generative function) and `FlowDistribution` (NumPyro).
"""

from ._couplings import (
    AbstractCoupling as AbstractCoupling,
    AuctionOTCoupling as AuctionOTCoupling,
    EntropicOTCoupling as EntropicOTCoupling,
    ExactOTCoupling as ExactOTCoupling,
    IndependentCoupling as IndependentCoupling,
    auction_assignment as auction_assignment,
    squared_distances as squared_distances,
)
from ._density import (
    hutchinson_log_density as hutchinson_log_density,
    log_density as log_density,
)
from ._fields import MLPField as MLPField, score_from_velocity as score_from_velocity
from ._kinetic import (
    DataSeparation as DataSeparation,
    KineticEnergy as KineticEnergy,
    KineticOptimalPath as KineticOptimalPath,
    conditional_kinetic_energy as conditional_kinetic_energy,
    data_separation as data_separation,
    marginal_kinetic_energy as marginal_kinetic_energy,
    marginal_velocity as marginal_velocity,
)
from ._losses import (
    denoiser_loss as denoiser_loss,
    drift_loss as drift_loss,
    score_loss as score_loss,
    velocity_loss as velocity_loss,
)
from ._model import FlowDistribution as FlowDistribution, FlowModel as FlowModel
from ._paths import (
    AbstractGamma as AbstractGamma,
    AbstractPath as AbstractPath,
    BridgeGamma as BridgeGamma,
    LinearPath as LinearPath,
    ParabolicGamma as ParabolicGamma,
    TrigonometricPath as TrigonometricPath,
    VPPath as VPPath,
    ZeroGamma as ZeroGamma,
)
from ._samplers import ode_sample as ode_sample, sde_sample as sde_sample

__all__ = [
    "AbstractCoupling",
    "AbstractGamma",
    "AbstractPath",
    "AuctionOTCoupling",
    "BridgeGamma",
    "DataSeparation",
    "EntropicOTCoupling",
    "ExactOTCoupling",
    "FlowDistribution",
    "FlowModel",
    "IndependentCoupling",
    "KineticEnergy",
    "KineticOptimalPath",
    "LinearPath",
    "MLPField",
    "ParabolicGamma",
    "TrigonometricPath",
    "VPPath",
    "ZeroGamma",
    "conditional_kinetic_energy",
    "data_separation",
    "auction_assignment",
    "denoiser_loss",
    "drift_loss",
    "hutchinson_log_density",
    "log_density",
    "marginal_kinetic_energy",
    "marginal_velocity",
    "ode_sample",
    "score_from_velocity",
    "score_loss",
    "sde_sample",
    "squared_distances",
    "velocity_loss",
]
