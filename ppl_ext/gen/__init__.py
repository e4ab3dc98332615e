"""Generative functions: the simulate / assess / generate protocol and adapters."""

from ._numpyro import NumPyroModel as NumPyroModel
from ._protocol import AbstractGenerativeFunction as AbstractGenerativeFunction, Trace as Trace

__all__ = ["AbstractGenerativeFunction", "NumPyroModel", "Trace"]
