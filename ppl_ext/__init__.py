"""ppl_ext: unbiased estimators of expectations and their gradients, by program transformation.

`import ppl_ext as px`; write an expectation program with `px.sample`, decorate it with
`px.expectation`, and call `.estimate`, `.grad` or `jax.grad` on it; optimise it with
`px.fit(objective, params, optax.adam(1e-2), num_steps, key, *args)`.
"""

from . import _numpyro_fixes

_numpyro_fixes.apply()  # NumPyro's Bernoulli/Binomial logits gradients at exactly 0

from .adev import (
    ADEVError as ADEVError,
    AbstractContinuationEstimator as AbstractContinuationEstimator,
    AbstractEstimator as AbstractEstimator,
    AbstractLocalEstimator as AbstractLocalEstimator,
    Enum as Enum,
    Expectation as Expectation,
    LeaveOneOut as LeaveOneOut,
    MVD as MVD,
    InvalidParameterError as InvalidParameterError,
    ObjectiveShapeError as ObjectiveShapeError,
    OutsideExpectationError as OutsideExpectationError,
    SecondOrderError as SecondOrderError,
    Reinforce as Reinforce,
    Reparam as Reparam,
    RunningAverage as RunningAverage,
    UnsupportedEstimatorError as UnsupportedEstimatorError,
    UnsupportedPrimitiveError as UnsupportedPrimitiveError,
    enum as enum,
    expectation as expectation,
    mvd as mvd,
    reinforce as reinforce,
    reparam as reparam,
    sample as sample,
)

from ._kernel import AbstractKernel as AbstractKernel
from . import gen as gen, numpyro as numpyro, optim as optim, vi as vi
from .optim import (
    AbstractBackend as AbstractBackend,
    EarlyStopping as EarlyStopping,
    FitResult as FitResult,
    OptaxBackend as OptaxBackend,
    fit as fit,
)

__version__ = "0.1.0"

#: subpackages imported on first use (PEP 562), so `import ppl_ext` does not pay for them
_LAZY_SUBPACKAGES = ("flows", "gfn", "smc")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ppl_ext' has no attribute {name!r}")

__all__ = [
    "flows",
    "gen",
    "gfn",
    "numpyro",
    "optim",
    "smc",
    "vi",
    "AbstractBackend",
    "AbstractKernel",
    "EarlyStopping",
    "FitResult",
    "OptaxBackend",
    "fit",
    "ADEVError",
    "AbstractContinuationEstimator",
    "AbstractEstimator",
    "AbstractLocalEstimator",
    "Enum",
    "Expectation",
    "LeaveOneOut",
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
    "enum",
    "expectation",
    "mvd",
    "reinforce",
    "reparam",
    "sample",
]
