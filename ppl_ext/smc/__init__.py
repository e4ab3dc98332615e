"""Sequential Monte Carlo for state-space models: particle filters and smoothers.

Describe a model by its laws (`StateSpaceModel`), filter a series with `filter` (or a
kernel: `BootstrapFilter`, `GuidedFilter`, `AuxiliaryFilter`, run by `run_filter`, all on
the kernel protocol), and smooth with `genealogy`, `ffbs` or, online for additive
functionals with memory O(N), `paris` (the `Paris` kernel), or with a bias that decays
with sweeps, `ppg` (PaRIS particle Gibbs, the `ParisParticleGibbs` kernel). The
exponential of the filter's `log_likelihood` is an unbiased estimate of the marginal
likelihood; the particle axis can be sharded over devices. `SMC` is a particle filter as a
generative function, usable inside objectives with an unbiased gradient through resampling.
"""

from ._csmc import (
    ConditionalSMC as ConditionalSMC,
    CSMCInfo as CSMCInfo,
    CSMCState as CSMCState,
    particle_gibbs as particle_gibbs,
)
from ._filter import (
    AbstractParticleFilter as AbstractParticleFilter,
    AuxiliaryFilter as AuxiliaryFilter,
    BootstrapFilter as BootstrapFilter,
    FilterResult as FilterResult,
    GuidedFilter as GuidedFilter,
    ParticleFilterInfo as ParticleFilterInfo,
    ParticleFilterState as ParticleFilterState,
    filter as filter,
    run_filter as run_filter,
)
from ._learning import (
    MarkovScoreClimbing as MarkovScoreClimbing,
    MSCInfo as MSCInfo,
    MSCResult as MSCResult,
    MSCState as MSCState,
    TrajectoryFamily as TrajectoryFamily,
    fisher_objective as fisher_objective,
    fisher_score as fisher_score,
    markov_score_climbing as markov_score_climbing,
    mean_field_gaussian as mean_field_gaussian,
)
from ._paris import (
    Paris as Paris,
    ParisInfo as ParisInfo,
    ParisResult as ParisResult,
    ParisState as ParisState,
    paris as paris,
    run_paris as run_paris,
)
from ._ppg import (
    ParisParticleGibbs as ParisParticleGibbs,
    PPGInfo as PPGInfo,
    PPGResult as PPGResult,
    PPGState as PPGState,
    ppg as ppg,
)
from ._resampling import (
    effective_sample_size as effective_sample_size,
    resample as resample,
)
from ._smoothers import ffbs as ffbs, genealogy as genealogy
from ._ssm import StateSpaceModel as StateSpaceModel
from ._variational import SMC as SMC, SMCReturn as SMCReturn

__all__ = [
    "AbstractParticleFilter",
    "AuxiliaryFilter",
    "BootstrapFilter",
    "CSMCInfo",
    "CSMCState",
    "ConditionalSMC",
    "FilterResult",
    "GuidedFilter",
    "MSCInfo",
    "MSCResult",
    "MSCState",
    "MarkovScoreClimbing",
    "ParticleFilterInfo",
    "ParticleFilterState",
    "Paris",
    "ParisInfo",
    "ParisResult",
    "ParisState",
    "ParisParticleGibbs",
    "PPGInfo",
    "PPGResult",
    "PPGState",
    "SMC",
    "SMCReturn",
    "StateSpaceModel",
    "TrajectoryFamily",
    "effective_sample_size",
    "ffbs",
    "filter",
    "fisher_objective",
    "fisher_score",
    "genealogy",
    "markov_score_climbing",
    "mean_field_gaussian",
    "paris",
    "particle_gibbs",
    "ppg",
    "resample",
    "run_filter",
    "run_paris",
]
