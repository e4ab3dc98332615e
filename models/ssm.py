"""State-space models for `px.smc`, each a `StateSpaceModel` with example parameters.

- `linear_gaussian_1d`: `x_0 ~ N(0, σ_0²)`, `x_t = ρ x_{t-1} + σ_X U_t`,
  `y_t = x_t + σ_Y V_t` (the `LinearGauss` model of `particles`, same defaults), with the
  locally optimal proposal `p(x_t | x_{t-1}, y_t)` for the guided filter.
- `linear_gaussian`: `x_0 ~ N(m_0, P_0)`, `x_t = A x_{t-1} + N(0, Q)`, `y_t = H x_t + N(0, R)`
  in any dimensions (`linear_gaussian_params(state_dim, observation_dim)`).
- `stochastic_volatility`: `x_0 ~ N(μ, σ²/(1-ρ²))`, `x_t - μ = ρ (x_{t-1} - μ) + σ U_t`,
  `y_t ~ N(0, exp(x_t))` (the `StochVol` model of `particles`, same defaults).
  `stochastic_volatility_unconstrained` is the same model with parameters
  `(mu, atanh_rho, log_sigma)`, valid for every real value (for `px.smc.fisher_objective`).
- `poisson_count`: `x_0 ~ N(μ, σ²/(1-φ²))`, `x_t - μ = φ (x_{t-1} - μ) + σ U_t`,
  `y_t ~ Poisson(exp(x_t))`.

`generate_data(model, params, num_steps, seed)` simulates states and observations from a
fixed key. Used by the tests, benchmarks and tutorials of `px.smc`; import as
`from models import ssm` from the repository root.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ppl_ext.smc import StateSpaceModel

# ------------------------------------------------------------------ linear Gaussian, 1-D

#: particles' `LinearGauss` defaults: ρ = 0.9, σ_X = 1, σ_Y = 0.2, σ_0 = σ_X / sqrt(1 - ρ²)
LINEAR_GAUSSIAN_1D_PARAMS = {
    "rho": jnp.asarray(0.9),
    "sigma_x": jnp.asarray(1.0),
    "sigma_y": jnp.asarray(0.2),
    "sigma_0": jnp.asarray(1.0 / math.sqrt(1.0 - 0.9**2)),
}


def _lg1_initial(params, inputs):
    return dist.Normal(0.0, params["sigma_0"])


def _lg1_transition(params, x, t, inputs):
    return dist.Normal(params["rho"] * x, params["sigma_x"])


def _lg1_observation(params, x, t, inputs):
    return dist.Normal(x, params["sigma_y"])


def _gaussian_update(prior_mean, prior_var, y, obs_var):
    var = 1.0 / (1.0 / prior_var + 1.0 / obs_var)
    return dist.Normal(var * (prior_mean / prior_var + y / obs_var), jnp.sqrt(var))


def _lg1_proposal(params, x, t, y, inputs):
    """`p(x_t | x_{t-1}, y_t)`, the locally optimal proposal."""
    return _gaussian_update(params["rho"] * x, params["sigma_x"] ** 2, y, params["sigma_y"] ** 2)


def _lg1_initial_proposal(params, y, inputs):
    """`p(x_0 | y_0)`."""
    return _gaussian_update(0.0, params["sigma_0"] ** 2, y, params["sigma_y"] ** 2)


linear_gaussian_1d = StateSpaceModel(
    initial=_lg1_initial, transition=_lg1_transition, observation=_lg1_observation,
    proposal=_lg1_proposal, initial_proposal=_lg1_initial_proposal)


# ------------------------------------------------------------------ linear Gaussian, d-D


def linear_gaussian_params(state_dim: int = 2, observation_dim: int = 1) -> dict:
    """Example parameters of `linear_gaussian`: a damped rotation observed through `H`.

    `A` is `0.95` times a rotation by 0.3 radians in each consecutive coordinate pair (a
    lone last coordinate decays by 0.9), `Q = 0.3² I`, `H` the first `observation_dim` rows of
    `[I, ...]` plus `0.5` on the next coordinate, `R = 0.5² I`, `m_0 = 0`, `P_0 = I`.
    """
    a = np.zeros((state_dim, state_dim))
    c, s = 0.95 * math.cos(0.3), 0.95 * math.sin(0.3)
    for i in range(0, state_dim - 1, 2):
        a[i:i + 2, i:i + 2] = [[c, -s], [s, c]]
    if state_dim % 2:
        a[-1, -1] = 0.9
    h = np.zeros((observation_dim, state_dim))
    for i in range(observation_dim):
        h[i, i % state_dim] = 1.0
        h[i, (i + 1) % state_dim] += 0.5
    return {
        "initial_mean": jnp.zeros(state_dim),
        "initial_cov": jnp.eye(state_dim),
        "transition_matrix": jnp.asarray(a, jnp.float32),
        "transition_cov": 0.3**2 * jnp.eye(state_dim),
        "observation_matrix": jnp.asarray(h, jnp.float32),
        "observation_cov": 0.5**2 * jnp.eye(observation_dim),
    }


def _lg_initial(params, inputs):
    return dist.MultivariateNormal(params["initial_mean"], params["initial_cov"])


def _lg_transition(params, x, t, inputs):
    return dist.MultivariateNormal(params["transition_matrix"] @ x, params["transition_cov"])


def _lg_observation(params, x, t, inputs):
    return dist.MultivariateNormal(params["observation_matrix"] @ x, params["observation_cov"])


linear_gaussian = StateSpaceModel(
    initial=_lg_initial, transition=_lg_transition, observation=_lg_observation)


# ------------------------------------------------------------------ stochastic volatility

#: particles' `StochVol` defaults
STOCHASTIC_VOLATILITY_PARAMS = {
    "mu": jnp.asarray(-1.02),
    "rho": jnp.asarray(0.9702),
    "sigma": jnp.asarray(0.178),
}


def _ar1_initial(params, inputs, persistence="rho"):
    return dist.Normal(params["mu"], params["sigma"] / jnp.sqrt(1.0 - params[persistence] ** 2))


def _ar1_transition(params, x, persistence="rho"):
    return dist.Normal(params["mu"] + params[persistence] * (x - params["mu"]), params["sigma"])


stochastic_volatility = StateSpaceModel(
    initial=lambda params, inputs: _ar1_initial(params, inputs),
    transition=lambda params, x, t, inputs: _ar1_transition(params, x),
    observation=lambda params, x, t, inputs: dist.Normal(0.0, jnp.exp(0.5 * x)))


def _sv_constrained(params):
    """`(μ, ρ, σ)` from the unconstrained `(mu, atanh_rho, log_sigma)`."""
    return params["mu"], jnp.tanh(params["atanh_rho"]), jnp.exp(params["log_sigma"])


def _sv_unconstrained_initial(params, inputs):
    mu, rho, sigma = _sv_constrained(params)
    return dist.Normal(mu, sigma / jnp.sqrt(1.0 - rho**2))


def _sv_unconstrained_transition(params, x, t, inputs):
    mu, rho, sigma = _sv_constrained(params)
    return dist.Normal(mu + rho * (x - mu), sigma)


#: `stochastic_volatility` with unconstrained parameters `mu`, `atanh_rho = atanh(ρ)` and
#: `log_sigma = log σ`, so that every real value is valid (for gradient-based learning)
stochastic_volatility_unconstrained = StateSpaceModel(
    initial=_sv_unconstrained_initial, transition=_sv_unconstrained_transition,
    observation=lambda params, x, t, inputs: dist.Normal(0.0, jnp.exp(0.5 * x)))


def stochastic_volatility_to_unconstrained(params: dict) -> dict:
    """`{"mu", "atanh_rho", "log_sigma"}` from `{"mu", "rho", "sigma"}` (with |ρ| < 1, σ > 0)."""
    return {"mu": jnp.asarray(params["mu"]), "atanh_rho": jnp.arctanh(params["rho"]),
            "log_sigma": jnp.log(params["sigma"])}


# ------------------------------------------------------------------ Poisson counts

POISSON_COUNT_PARAMS = {
    "mu": jnp.asarray(1.0),
    "phi": jnp.asarray(0.9),
    "sigma": jnp.asarray(0.3),
}

poisson_count = StateSpaceModel(
    initial=lambda params, inputs: _ar1_initial(params, inputs, "phi"),
    transition=lambda params, x, t, inputs: _ar1_transition(params, x, "phi"),
    observation=lambda params, x, t, inputs: dist.Poisson(jnp.exp(x)))


# ------------------------------------------------------------------ data


def generate_data(model: StateSpaceModel, params: dict, num_steps: int = 100, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Simulate `(states, observations)` of `model` for `num_steps` steps from a fixed key.

    Deterministic for a given `seed` (`jax.random.key(seed)`); returns NumPy arrays with a
    leading time axis.
    """
    states, observations = model.sample(jax.random.key(seed), params, num_steps)
    return np.asarray(states), np.asarray(observations)
