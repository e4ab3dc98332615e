"""Generative functions: the simulate / assess / generate protocol and adapters.

The genjax adapters (`GenJAXModel`, `to_genjax_distribution`) are loaded on first use
(PEP 562 module `__getattr__`), so `import ppl_ext` does not pay for them.
"""

from typing import TYPE_CHECKING

from ._numpyro import NumPyroModel as NumPyroModel
from ._protocol import (
    AbstractConditionable as AbstractConditionable,
    AbstractGenerativeFunction as AbstractGenerativeFunction,
    Trace as Trace,
)

if TYPE_CHECKING:  # for type checkers and the API docs; loaded lazily below
    from ._genjax import (
        GenJAXModel as GenJAXModel,
        to_genjax_distribution as to_genjax_distribution,
    )

#: Public names defined in submodules loaded on first access, by submodule.
_LAZY = {"GenJAXModel": "._genjax", "to_genjax_distribution": "._genjax"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AbstractConditionable",
    "AbstractGenerativeFunction",
    "GenJAXModel",
    "NumPyroModel",
    "Trace",
    "to_genjax_distribution",
]
