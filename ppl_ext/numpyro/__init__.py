"""NumPyro integration: SVI loss objects built from ppl_ext objectives, arviz conversion."""

from ._arviz import to_inference_data as to_inference_data
from ._svi import ELBO as ELBO, IWELBO as IWELBO, ObjectiveLoss as ObjectiveLoss

__all__ = ["ELBO", "IWELBO", "ObjectiveLoss", "to_inference_data"]
