"""Reusable example models for ppl_ext (not part of the installed package).

Each submodule holds one model written as NumPyro model and guide functions, with its data
and a small training helper:

- `models.digits`: scikit-learn's bundled 8x8 digits, scaled to [0, 1] and binarised.
- `models.vae`: a variational autoencoder with equinox MLPs (Gaussian latents).
- `models.sbn`: a sigmoid belief net (Bernoulli latents) for score-function estimators.
- `models.mixture`: a Gaussian mixture with discrete assignments (enumeration).
- `models.toy_mixture`: NumPyro's discrete-enumeration toy mixture example.
- `models.regression`: hierarchical linear regression on generated data.
- `models.ssm`: state-space models for `px.smc` (linear-Gaussian, stochastic volatility,
  Poisson counts) with parameters and a data simulator.

They are imported as `from models import vae` from the repository root.
"""

from . import digits, mixture, regression, sbn, ssm, toy_mixture, vae

__all__ = ["digits", "mixture", "regression", "sbn", "ssm", "toy_mixture", "vae"]
