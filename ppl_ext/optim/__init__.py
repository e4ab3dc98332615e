"""Optimisation back-ends and `fit`, the loop that runs any back-end on any objective.

A back-end is a kernel (`init`, `step`) that receives the objective itself
(`AbstractBackend`); `OptaxBackend` wraps any optax `GradientTransformation`, fed by the
transformation's unbiased gradient estimates. `fit` runs one in compiled chunks with a
progress bar, callbacks and early stopping, and returns the parameters, the back-end
state and a history.
"""

from ._backend import (
    AbstractBackend as AbstractBackend,
    BackendInfo as BackendInfo,
    OptaxBackend as OptaxBackend,
    OptaxState as OptaxState,
)
from ._cbo import (
    CBO as CBO,
    ConsensusBasedSampling as ConsensusBasedSampling,
    ConsensusHopping as ConsensusHopping,
    ConsensusState as ConsensusState,
    PolarisedCBO as PolarisedCBO,
)
from ._fit import (
    EarlyStopping as EarlyStopping,
    FitHistory as FitHistory,
    FitResult as FitResult,
    fit as fit,
)
from ._mfac import (
    MFACState as MFACState,
    mfac as mfac,
    mfac_inverse_product as mfac_inverse_product,
)
from ._sns import (
    SinkhornNewtonSparse as SinkhornNewtonSparse,
    SNSOutput as SNSOutput,
    sinkhorn_newton_sparse as sinkhorn_newton_sparse,
)
from ._newton import (
    AbstractCurvature as AbstractCurvature,
    EmpiricalFisher as EmpiricalFisher,
    ExactHessian as ExactHessian,
    FiniteDifferenceHessian as FiniteDifferenceHessian,
    GaussNewton as GaussNewton,
    GradientRegularisedNewton as GradientRegularisedNewton,
    MatrixFreeHessian as MatrixFreeHessian,
    NewtonInfo as NewtonInfo,
    NewtonState as NewtonState,
)
from ._pg import (
    NormalisedHARPG as NormalisedHARPG,
    NormalisedPGIGT as NormalisedPGIGT,
    PolicyGradientState as PolicyGradientState,
    decaying_step_size as decaying_step_size,
)
from ._pg_envs import (
    LinearQuadraticRegulator as LinearQuadraticRegulator,
    TabularMDP as TabularMDP,
)
from ._spectrum import (
    SpectrumResult as SpectrumResult,
    hessian_spectrum as hessian_spectrum,
    hessian_vector_product as hessian_vector_product,
    plot_spectrum as plot_spectrum,
)
from ._zo import (
    QuantizedZerothOrderSGD as QuantizedZerothOrderSGD,
    ZerothOrderRankSGD as ZerothOrderRankSGD,
    ZerothOrderSGD as ZerothOrderSGD,
    ZerothOrderState as ZerothOrderState,
    dequantize as dequantize,
    quantize as quantize,
    rank_by_objective as rank_by_objective,
)

__all__ = [
    "AbstractBackend",
    "BackendInfo",
    "CBO",
    "ConsensusBasedSampling",
    "ConsensusHopping",
    "ConsensusState",
    "EarlyStopping",
    "FitHistory",
    "FitResult",
    "OptaxBackend",
    "OptaxState",
    "QuantizedZerothOrderSGD",
    "PolarisedCBO",
    "ZerothOrderRankSGD",
    "ZerothOrderSGD",
    "ZerothOrderState",
    "SinkhornNewtonSparse",
    "SNSOutput",
    "sinkhorn_newton_sparse",
    "fit",
    "MFACState",
    "mfac",
    "mfac_inverse_product",
    "SpectrumResult",
    "hessian_spectrum",
    "hessian_vector_product",
    "plot_spectrum",
    "AbstractCurvature",
    "EmpiricalFisher",
    "ExactHessian",
    "FiniteDifferenceHessian",
    "GaussNewton",
    "GradientRegularisedNewton",
    "MatrixFreeHessian",
    "NewtonInfo",
    "NewtonState",
    "NormalisedHARPG",
    "NormalisedPGIGT",
    "PolicyGradientState",
    "decaying_step_size",
    "LinearQuadraticRegulator",
    "TabularMDP",
    "dequantize",
    "quantize",
    "rank_by_objective",
]
