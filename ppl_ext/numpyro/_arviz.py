"""Conversion of posterior samples (e.g. from `numpyro.infer.Predictive`) to arviz."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _with_chains(samples: Mapping, num_chains: int, group: str) -> dict:
    out = {}
    for name, value in samples.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % num_chains:
            raise ValueError(
                f"{group}[{name!r}] has shape {value.shape}; its leading (sample) axis must "
                f"split into num_chains={num_chains} chains."
            )
        out[name] = value.reshape((num_chains, value.shape[0] // num_chains) + value.shape[1:])
    return out


def to_inference_data(
    posterior: Mapping,
    *,
    posterior_predictive: Mapping | None = None,
    observed_data: Mapping | None = None,
    num_chains: int = 1,
):
    """Samples with a leading sample axis → an arviz `DataTree` (chains × draws).

    Use it on the output of `numpyro.infer.Predictive(guide, params=..., num_samples=n)`
    (posterior) and of `Predictive(model, ...)` (posterior predictive), then
    `arviz.summary(...)`, `arviz.plot_posterior(...)` and friends.

    Example:
        >>> import numpy as np, ppl_ext as px
        >>> data = px.numpyro.to_inference_data({"mu": np.zeros(100)})
        >>> tuple(data.posterior["mu"].shape)
        (1, 100)
    """
    import arviz  # about a second: only when used

    if not posterior:
        raise ValueError("to_inference_data needs at least one posterior variable.")
    groups = {"posterior": _with_chains(posterior, num_chains, "posterior")}
    if posterior_predictive:
        groups["posterior_predictive"] = _with_chains(
            posterior_predictive, num_chains, "posterior_predictive")
    if observed_data:
        groups["observed_data"] = {k: np.asarray(v) for k, v in observed_data.items()}
    return arviz.from_dict(groups)
