"""NumPyro integration: SVI loss objects built from ppl_ext objectives, arviz conversion."""

from ._arviz import to_inference_data as to_inference_data
from ._svi import (
    ELBO as ELBO,
    IWELBO as IWELBO,
    VIMCO as VIMCO,
    ObjectiveLoss as ObjectiveLoss,
)

__all__ = ["ELBO", "IWELBO", "ObjectiveLoss", "VIMCO", "to_inference_data"]
