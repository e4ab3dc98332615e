"""Exceptions raised by the program transformation."""

from __future__ import annotations


class ADEVError(Exception):
    """Base class: the transformation refused a program instead of estimating it wrongly."""


class UnsupportedPrimitiveError(ADEVError, NotImplementedError):
    """A primitive with sample sites inside it has no transformation rule."""


class UnsupportedEstimatorError(ADEVError, ValueError):
    """An estimator was chosen for a distribution (or a place) it cannot handle."""


class OutsideExpectationError(ADEVError, RuntimeError):
    """`px.sample` ran outside a function transformed by `px.expectation`."""


class ObjectiveShapeError(ADEVError, TypeError):
    """The objective returned something other than floating-point values of the needed shape."""


class SecondOrderError(ADEVError, NotImplementedError):
    """A second derivative of an estimate was requested; the estimators are first order."""


class InvalidParameterError(ADEVError, ValueError):
    """A site's parameters violated their constraints at run time (numpyro validate_args).

    Raised by `f(key, ...)`, `f.estimate`, `f.grad`, `f.value_and_grad` and an eager
    `jax.grad(f)`, with a one-line message naming the site, the parameter and its
    constraint. Under a user's own `jax.jit` or `jax.vmap` the check runs inside the
    compiled program, and JAX reports it wrapped in its runtime error, whose message
    starts with `px.InvalidParameterError:` and this one.
    """
