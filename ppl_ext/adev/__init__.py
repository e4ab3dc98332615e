"""The program transformation: sample sites, gradient estimators and `expectation`."""

from ._errors import (
    ADEVError as ADEVError,
    InvalidParameterError as InvalidParameterError,
    ObjectiveShapeError as ObjectiveShapeError,
    OutsideExpectationError as OutsideExpectationError,
    SecondOrderError as SecondOrderError,
    UnsupportedEstimatorError as UnsupportedEstimatorError,
    UnsupportedPrimitiveError as UnsupportedPrimitiveError,
)
from ._estimators import (
    MAX_ENUMERATION_SIZE as MAX_ENUMERATION_SIZE,
    AbstractContinuationEstimator as AbstractContinuationEstimator,
    AbstractEstimator as AbstractEstimator,
    AbstractLocalEstimator as AbstractLocalEstimator,
    Enum as Enum,
    LeaveOneOut as LeaveOneOut,
    MVD as MVD,
    Reinforce as Reinforce,
    Reparam as Reparam,
    RunningAverage as RunningAverage,
    default_estimator as default_estimator,
    enum as enum,
    mvd as mvd,
    reinforce as reinforce,
    reparam as reparam,
)
from ._expectation import Expectation as Expectation, expectation as expectation
from ._primitives import sample as sample

__all__ = [
    "ADEVError",
    "AbstractContinuationEstimator",
    "AbstractEstimator",
    "AbstractLocalEstimator",
    "Enum",
    "Expectation",
    "LeaveOneOut",
    "MAX_ENUMERATION_SIZE",
    "InvalidParameterError",
    "MVD",
    "ObjectiveShapeError",
    "OutsideExpectationError",
    "Reinforce",
    "Reparam",
    "RunningAverage",
    "SecondOrderError",
    "UnsupportedEstimatorError",
    "UnsupportedPrimitiveError",
    "default_estimator",
    "enum",
    "expectation",
    "mvd",
    "reinforce",
    "reparam",
    "sample",
]
