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
from ._fit import (
    EarlyStopping as EarlyStopping,
    FitHistory as FitHistory,
    FitResult as FitResult,
    fit as fit,
)

__all__ = [
    "AbstractBackend",
    "BackendInfo",
    "EarlyStopping",
    "FitHistory",
    "FitResult",
    "OptaxBackend",
    "OptaxState",
    "fit",
]
