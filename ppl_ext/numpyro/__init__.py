"""NumPyro integration: SVI loss objects built from ppl_ext objectives, arviz conversion.

`to_inference_data` (which imports arviz, about a second) is loaded on first use (PEP 562
module `__getattr__`), so `import ppl_ext` does not pay for it.
"""

from typing import TYPE_CHECKING

from ._svi import (
    ELBO as ELBO,
    IWELBO as IWELBO,
    VIMCO as VIMCO,
    ObjectiveLoss as ObjectiveLoss,
)

if TYPE_CHECKING:  # for type checkers and the API docs; loaded lazily below
    from ._arviz import to_inference_data as to_inference_data

#: Public names defined in submodules loaded on first access, by submodule.
_LAZY = {"to_inference_data": "._arviz"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ELBO", "IWELBO", "ObjectiveLoss", "VIMCO", "to_inference_data"]
