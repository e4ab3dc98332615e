"""NumPyro integration: SVI loss objects built from ppl_ext objectives."""

from ._svi import ELBO as ELBO, IWELBO as IWELBO, ObjectiveLoss as ObjectiveLoss

__all__ = ["ELBO", "IWELBO", "ObjectiveLoss"]
