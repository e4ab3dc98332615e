"""Generative functions: the simulate / assess / generate protocol and adapters."""

from ._genjax import GenJAXModel as GenJAXModel, to_genjax_distribution as to_genjax_distribution
from ._numpyro import NumPyroModel as NumPyroModel
from ._protocol import AbstractGenerativeFunction as AbstractGenerativeFunction, Trace as Trace

__all__ = [
    "AbstractGenerativeFunction",
    "GenJAXModel",
    "NumPyroModel",
    "Trace",
    "to_genjax_distribution",
]
