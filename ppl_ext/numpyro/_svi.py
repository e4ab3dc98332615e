"""Loss objects for `numpyro.infer.SVI` built from ppl_ext objectives."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from numpyro import handlers

from ..adev import AbstractEstimator, Expectation
from ..gen import NumPyroModel
from ..gen._numpyro import _function_name, _sample_site_names, check_estimator_names
from ..vi import elbo as _elbo, iwelbo as _iwelbo, vimco as _vimco
from ..vi._constructs import _check_particles


class ObjectiveLoss:
    """Turn an objective builder into a loss accepted by `numpyro.infer.SVI`.

    `make_objective(model_gf, guide_gf)` returns a `px.Expectation` called as
    `objective(key, params, *args, **kwargs)` whose value is to be *maximised*; the loss is
    its negative, averaged over `num_particles` independent estimates. Gradients are the
    transformation's unbiased estimates, so discrete latent sites in the guide work
    (score function by default; `estimators` chooses per site, e.g. `{"z": px.enum}`).
    """

    #: Discrete latent sites are handled by the sites' estimators (NumPyro checks this flag).
    can_infer_discrete = True

    def __init__(
        self,
        make_objective: Callable[[NumPyroModel, NumPyroModel], Expectation],
        num_particles: int = 1,
        estimators: Mapping[str, AbstractEstimator] | None = None,
    ):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}.")
        self.make_objective = make_objective
        self.num_particles = num_particles
        self.estimators = dict(estimators or {})
        self._checked: set = set()  # (model, guide) pairs whose site names were checked

    def _check_site_names(self, param_map, model, guide, args, kwargs):
        """Every name in `estimators` is a sample site of the guide or of the model."""
        if not self.estimators or (model, guide) in self._checked:
            return
        sites = set()
        values = dict(param_map)
        for fn in (guide, model):  # the model sees the guide's draws, as in an objective
            seeded = handlers.seed(handlers.substitute(fn, data=values), rng_seed=0)
            trace = handlers.trace(seeded).get_trace(*args, **kwargs)
            sites |= _sample_site_names(trace)
            values.update({n: s["value"] for n, s in trace.items() if s["type"] == "sample"})
        check_estimator_names(self.estimators, sites,
                              f"the guide {_function_name(guide)} or the model "
                              f"{_function_name(model)} (sites of either)")
        self._checked.add((model, guide))

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """Negative objective estimate (NumPyro's `ELBO.loss` signature)."""
        self._check_site_names(param_map, model, guide, args, kwargs)
        objective = self.make_objective(
            NumPyroModel(model, self.estimators, check_estimators=False),
            NumPyroModel(guide, self.estimators, check_estimators=False),
        )
        if self.num_particles == 1:
            return -objective(rng_key, param_map, *args, **kwargs)
        keys = jax.random.split(rng_key, self.num_particles)
        values = jax.vmap(lambda k: objective(k, param_map, *args, **kwargs))(keys)
        return -jnp.mean(values)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """NumPyro's interface for models with mutable state (none is kept here)."""
        return {"loss": self.loss(rng_key, param_map, model, guide, *args, **kwargs),
                "mutable_state": None}


class ELBO(ObjectiveLoss):
    """`numpyro.infer.SVI` loss: negative ELBO with per-site gradient estimators.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist, ppl_ext as px
        >>> from numpyro.infer import SVI
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        >>> svi = SVI(model, guide, numpyro.optim.Adam(0.1), loss=px.numpyro.ELBO())
        >>> result = svi.run(jax.random.key(0), 300, 2.0, progress_bar=False)
        >>> abs(float(result.params["loc"]) - 1.0) < 0.2
        True
    """

    def __init__(self, num_particles: int = 1, estimators=None):
        super().__init__(_elbo, num_particles, estimators)


class IWELBO(ObjectiveLoss):
    """`numpyro.infer.SVI` loss: negative importance-weighted ELBO with K particles.

    `num_inner` is K, the particles inside the bound; `num_particles` averages independent
    estimates of the bound (it does not tighten it).
    """

    def __init__(self, num_inner: int = 8, num_particles: int = 1, estimators=None):
        _check_particles(num_inner)
        super().__init__(lambda m, g: _iwelbo(m, g, num_inner), num_particles, estimators)


class VIMCO(ObjectiveLoss):
    """`numpyro.infer.SVI` loss: negative IWELBO(K) with VIMCO's leave-one-out baselines.

    Guide sites default to the score function, so guides with discrete sites train; a
    site whose estimator is overridden to something else (`estimators={"z": px.reparam}`,
    `infer={"estimator": ...}`) is refused by name when traced, since VIMCO's
    leave-one-out baselines are unbiased only for score-function sites; see
    `px.vi.vimco`. `num_inner` is K (at least 2).

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist, ppl_ext as px
        >>> from numpyro.infer import SVI
        >>> def model():
        ...     z = numpyro.sample("z", dist.Bernoulli(0.5))
        ...     numpyro.sample("x", dist.Normal(2.0 * z, 0.5), obs=2.0)
        >>> def guide():
        ...     numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("logit", 0.1)))
        >>> svi = SVI(model, guide, numpyro.optim.Adam(0.1), loss=px.numpyro.VIMCO(4))
        >>> result = svi.run(jax.random.key(0), 300, progress_bar=False)
        >>> float(result.params["logit"]) > 1.0  # moves towards the posterior logit 8
        True
    """

    def __init__(self, num_inner: int = 8, num_particles: int = 1):
        _check_particles(num_inner)
        if num_inner < 2:
            raise ValueError(f"VIMCO needs num_inner >= 2 (leave-one-out baselines), got "
                             f"{num_inner}.")
        super().__init__(lambda m, g: _vimco(m, g, num_inner), num_particles)
