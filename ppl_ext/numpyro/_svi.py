"""Loss objects for `numpyro.infer.SVI` built from ppl_ext objectives."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from ..adev import AbstractEstimator, Expectation, expectation
from ..gen import NumPyroModel
from ..gen._protocol import score_function_densities_stopped
from ..gen._numpyro import (
    collect_mutable as _collect_mutable,
    _assess_trace,
    _function_name,
    _sample_site_names,
    _site_log_density,
    check_estimator_names,
)
from ..vi import elbo as _elbo, iwelbo as _iwelbo, vimco as _vimco
from ..vi._constructs import _check_particles

#: numpyro messages that `handlers.seed` must leave to ppl_ext (sample sites draw from the
#: expectation's key; `prng_key` requests are answered by a ppl_ext site).
_NOT_SEEDED = ["sample", "prng_key", "control_flow"]


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def _split_static(args: tuple, kwargs: dict):
    """Split the arguments into array leaves (traced by the objective) and the rest.

    As in NumPyro, where a model sees the Python ints, bools, floats, strings and SVI's
    `static_kwargs` it was given, a leaf that is not an array (`jax.Array`, a tracer
    included, or a numpy array, kept an input so that data is not compiled in as a
    constant) stays a Python constant: the objective receives only the array leaves and
    `rebuild(array_leaves)` puts the constants back.
    """
    leaves, tree = jax.tree.flatten((args, kwargs))
    dynamic = [_is_array(leaf) for leaf in leaves]
    arrays = [leaf for leaf, d in zip(leaves, dynamic) if d]

    def rebuild(values):
        values = iter(values)
        merged = [next(values) if d else leaf for leaf, d in zip(leaves, dynamic)]
        return jax.tree.unflatten(tree, merged)

    return arrays, rebuild


class _Bound:
    """A model or guide called with the array leaves of its arguments only.

    The constants come from `rebuild`; subsampling plates are seeded with `plate_key` (the
    first argument), so every call of one estimate (the K particles of a bound, the model
    and the guide) sees the same minibatch, as NumPyro's RenyiELBO seeds its plates once.
    """

    def __init__(self, fn: Callable, rebuild: Callable, scale: float | None = None):
        self.fn = fn if scale is None else handlers.scale(fn, scale=scale)
        self.rebuild = rebuild
        self.__qualname__ = _function_name(fn).strip("'")

    def __call__(self, plate_key, *arrays):
        args, kwargs = self.rebuild(arrays)
        return handlers.seed(self.fn, plate_key, hide_types=_NOT_SEEDED)(*args, **kwargs)


def _key_data(key) -> jax.Array:
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _trace_sites(param_map, model, guide, args, kwargs):
    """`(sample site names, param and mutable site names, common scale)` of a seeded
    guide-then-model run; the common scale is the one scale of every sample site of both
    when they share one that is a number other than 1 (all of them in one subsampling
    plate: N/m), else None."""
    sites, param_names, scales = set(), set(), set()
    values = dict(param_map)
    for fn in (guide, model):  # the model sees the guide's draws, as in an objective
        seeded = handlers.seed(handlers.substitute(fn, data=values), rng_seed=0)
        trace = handlers.trace(seeded).get_trace(*args, **kwargs)
        sites |= _sample_site_names(trace)
        param_names |= {n for n, s in trace.items() if s["type"] in ("param", "mutable")}
        values.update({n: s["value"] for n, s in trace.items() if s["type"] == "sample"})
        for site in trace.values():
            if site["type"] == "sample":
                scale = 1.0 if site["scale"] is None else site["scale"]
                scales.add(float(scale) if isinstance(scale, (int, float)) else None)
    common = next(iter(scales)) if len(scales) == 1 else None
    if len(scales) > 1:
        return sites, param_names, _MIXED
    return sites, param_names, (common if common not in (None, 1.0) else None)


#: `_trace_sites`' verdict when sample sites carry different scales
_MIXED = "mixed"


class ObjectiveLoss:
    """Turn an objective builder into a loss accepted by `numpyro.infer.SVI`.

    `make_objective(model_gf, guide_gf)` returns an objective (a `px.Expectation` or a
    `px.vi` objective) called as `objective(key, params, *args, **kwargs)` whose value is
    to be *maximised*; the loss is its negative, averaged over `num_samples` independent
    estimates (this averages; a bound's own particles are the objective's
    `num_particles`). Gradients are the transformation's unbiased estimates, so discrete
    latent sites in the guide work (score function by default; `estimators` chooses per
    site, e.g. `{"z": px.enum}`).

    As in NumPyro: arguments that are not arrays (Python ints, bools and floats, SVI's
    `static_kwargs`) stay constants of the program (a plate size or a layer
    width passed as an argument works); each estimate seeds the subsampling plates once,
    so a bound's particles, the guide and the model share one minibatch. A key of `params`
    that no `numpyro.param` site of the model or guide reads is refused by name (it would
    silently get a zero gradient).
    """

    #: Discrete latent sites are handled by the sites' estimators (NumPyro checks this flag).
    can_infer_discrete = True

    def __init__(
        self,
        make_objective: Callable[[NumPyroModel, NumPyroModel], Expectation],
        num_samples: int = 1,
        estimators: Mapping[str, AbstractEstimator] | None = None,
    ):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
        self.make_objective = make_objective
        self.num_samples = num_samples
        self.estimators = dict(estimators or {})
        self._checked: dict = {}  # (model, guide, params keys, statics) -> scale

    def _check_names(self, param_map, model, guide, args, kwargs):
        """Every `estimators` name is a sample site and every params key a param site.

        Returns the common scale of all sample sites (see `_trace_sites`), or None.
        """
        static = [x for x in jax.tree.leaves((args, kwargs)) if not _is_array(x)]
        try:
            cache_key = (model, guide, frozenset(param_map), jax.tree.structure(
                (args, kwargs)), tuple(static))
            if cache_key in self._checked:
                return self._checked[cache_key]
        except TypeError:  # an unhashable model, guide or argument: check every time
            cache_key = None
        sites, param_names, scale = _trace_sites(param_map, model, guide, args, kwargs)
        owners = (f"the guide {_function_name(guide)} or the model "
                  f"{_function_name(model)}")
        if self.estimators:
            check_estimator_names(self.estimators, sites, f"{owners} (sites of either)")
        unknown = sorted(set(param_map) - param_names)
        if unknown:
            raise ValueError(
                f"params has key(s) {unknown} that no numpyro.param site of {owners} reads "
                f"(they would get a zero gradient: a misspelt name?); the param sites are "
                f"{sorted(param_names)}."
            )
        if cache_key is not None:
            self._checked[cache_key] = scale
        return scale

    #: Whether the objective is nonlinear in the log densities (a bound over particles):
    #: then a minibatch scale common to every site is taken out of it (see `loss`).
    _rescale_subsampling = True
    #: Whether sites with different scales are refused (a bound over particles, whose
    #: minibatch estimate is then no bound); a user's objective may be linear: allowed.
    _refuse_mixed_scales = False

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """Negative objective estimate (NumPyro's `ELBO.loss` signature).

        When every sample site of the model and guide is in the same subsampling plates
        (one scale s = N/m for all), a bound that is nonlinear in the log weights is
        computed on the unscaled minibatch log weights and multiplied by s, as NumPyro's
        RenyiELBO does: `s · log (1/K) Σ_k w_k(minibatch)`, whose mean over minibatches is
        a lower bound on the full-data log evidence (all latents are then local; with one
        data point a minibatch it is NumPyro's value). With the scale inside the
        log-sum-exp the minibatch value would exceed the full-data bound. Sites with
        different scales (a global latent with a subsampled plate) are refused by
        `IWELBO` and `VIMCO`, as NumPyro's RenyiELBO refuses them; an `ObjectiveLoss` of a
        user's objective leaves them as they are.
        """
        scale = self._check_names(param_map, model, guide, args, kwargs)
        if scale is _MIXED and self._refuse_mixed_scales:
            raise ValueError(
                f"{type(self).__name__}: the sample sites of the guide "
                f"{_function_name(guide)} and the model {_function_name(model)} carry "
                "different scales (e.g. a global latent beside a subsampled plate). The "
                "bound is nonlinear in the log weights, so its minibatch estimate is then "
                "neither unbiased nor a bound (NumPyro's RenyiELBO refuses this too). Use "
                "px.numpyro.ELBO (unbiased with subsampling), or subsample every site."
            )
        if not self._rescale_subsampling or scale is _MIXED:
            scale = None
        arrays, rebuild = _split_static(args, kwargs)
        unscale = None if scale is None else 1.0 / scale
        objective = self.make_objective(*(
            NumPyroModel(_Bound(fn, rebuild, unscale), self.estimators, check_estimators=False)
            for fn in (model, guide)))
        expectation = getattr(objective, "expectation", objective)
        if isinstance(expectation, Expectation):
            # params keys were checked by name above (a param site whose value a static
            # argument leaves unused is NumPyro-legal); skip the objective's data-flow check
            expectation._required_params = ()

        def estimate(key):
            plate_key, key = jax.random.split(key)
            value = objective(key, param_map, _key_data(plate_key), *arrays)
            return value if scale is None else scale * value

        if self.num_samples == 1:
            return -estimate(rng_key)
        return -jnp.mean(jax.vmap(estimate)(jax.random.split(rng_key, self.num_samples)))

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """NumPyro's interface for models with `numpyro.mutable` state: `{"loss",
        "mutable_state"}`. `px.numpyro.ELBO` carries the state through SVI's state, as
        NumPyro's Trace_ELBO does; other losses refuse a mutable site by name."""
        return self._loss_with_mutable_state(rng_key, param_map, model, guide, args, kwargs)

    def _loss_with_mutable_state(self, rng_key, param_map, model, guide, args, kwargs):
        return {"loss": self.loss(rng_key, param_map, model, guide, *args, **kwargs),
                "mutable_state": None}


def _analytic_kl_elbo(model: NumPyroModel, guide: NumPyroModel) -> Expectation:
    """The ELBO with analytic KL terms where a closed form exists (NumPyro's
    TraceMeanField_ELBO): for each latent site of the model whose guide and model
    distributions have an entry in numpyro's `kl_divergence` registry, the sampled
    `log p(z) - log q(z)` is replaced by `-KL(q || p)` (scaled as the site is), with the
    model's distribution at the guide's draws of the other sites; other sites keep the
    sampled terms. Unbiased for the same ELBO (the KL is the conditional expectation of
    the sampled term given the draws it conditions on), with lower variance.
    """
    from numpyro.distributions import kl_divergence

    @expectation
    def objective(params, *args, **kwargs):
        values, _, _, _, guide_trace = guide._run(params, {}, args, kwargs)
        model_trace = _assess_trace(model, values, params, args, kwargs)
        total = jnp.zeros(())
        analytic = set()
        for name, site in model_trace.items():
            if site["type"] != "sample":
                continue
            q_site = guide_trace.get(name)
            if (not site["is_observed"] and q_site is not None
                    and q_site["type"] == "sample" and not q_site["is_observed"]):
                try:
                    kl = kl_divergence(q_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    scale = q_site["scale"]
                    total = total - jnp.sum(kl if scale is None else scale * kl)
                    analytic.add(name)
                    continue
            total = total + _site_log_density(site)
        for name, site in guide_trace.items():
            if site["type"] == "sample" and name not in analytic:
                total = total - _site_log_density(site)
        return total

    return objective


class ELBO(ObjectiveLoss):
    """`numpyro.infer.SVI` loss: negative ELBO with per-site gradient estimators.

    `num_particles` has NumPyro's meaning: the loss averages `num_particles` independent
    ELBO estimates (the ELBO is linear in them, so this is also the K-particle ELBO).
    `analytic_kl=True` uses closed-form KL terms where numpyro's `kl_divergence` registry
    has one, as TraceMeanField_ELBO does (see `_analytic_kl_elbo`): same mean, lower
    variance. Model sites summed out by enumeration do not combine with it (refused).

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

    #: the ELBO is linear in the log densities: scaled sites are already unbiased
    _rescale_subsampling = False

    def __init__(self, num_particles: int = 1, estimators=None, analytic_kl: bool = False):
        super().__init__(_analytic_kl_elbo if analytic_kl else _elbo, num_particles,
                         estimators)
        self.num_particles = num_particles
        self.analytic_kl = analytic_kl

    def _loss_with_mutable_state(self, rng_key, param_map, model, guide, args, kwargs):
        """`{"loss", "mutable_state"}`, NumPyro's interface for `numpyro.mutable` sites.

        SVI puts the current state among the parameters; the guide and the model run with
        it, and the values of their mutable sites after the run (e.g. updated batch-norm
        statistics) are returned for SVI to keep in its state, as NumPyro's Trace_ELBO
        does. With `num_particles > 1` the state is refused (NumPyro ignores it there);
        mutable state combines with the sampled ELBO only (not `analytic_kl`).
        """
        if self.num_particles != 1 or self.analytic_kl:
            raise NotImplementedError(
                "numpyro.mutable state is carried by px.numpyro.ELBO() with "
                "num_particles=1 and analytic_kl=False only (NumPyro ignores it with "
                "several particles)."
            )
        self._check_names(param_map, model, guide, args, kwargs)
        arrays, rebuild = _split_static(args, kwargs)
        model_gf = NumPyroModel(_Bound(model, rebuild), self.estimators, check_estimators=False)
        guide_gf = NumPyroModel(_Bound(guide, rebuild), self.estimators, check_estimators=False)

        @expectation
        def elbo_and_state(params, *call_args):
            with _collect_mutable() as seen:
                with score_function_densities_stopped():  # linear in log q: as px.vi.ELBO
                    trace = guide_gf.simulate(params, *call_args)
                value = model_gf.assess(trace.choices, params, *call_args) - trace.log_density
                state = {name: get() for name, get in seen.items()}
            return value, state

        plate_key, key = jax.random.split(rng_key)
        value, state = elbo_and_state(key, param_map, _key_data(plate_key), *arrays)
        return {"loss": -value, "mutable_state": jax.lax.stop_gradient(state) or None}



class IWELBO(ObjectiveLoss):
    """`numpyro.infer.SVI` loss: negative importance-weighted ELBO with K particles.

    `num_particles` is K, the particles inside the bound (as in `px.vi.iwelbo` and
    NumPyro's `RenyiELBO(alpha=0, num_particles=K)`); `num_samples` averages independent
    estimates of the bound (it does not tighten it).
    """

    _refuse_mixed_scales = True

    def __init__(self, num_particles: int = 8, num_samples: int = 1, estimators=None):
        _check_particles(num_particles)
        super().__init__(lambda m, g: _iwelbo(m, g, num_particles), num_samples, estimators)
        self.num_particles = num_particles


class VIMCO(ObjectiveLoss):
    """`numpyro.infer.SVI` loss: negative IWELBO(K) with VIMCO's leave-one-out baselines.

    Guide sites default to the score function, so guides with discrete sites train; a
    site whose estimator is overridden to something else (`estimators={"z": px.reparam}`,
    `infer={"estimator": ...}`) is refused by name when traced, since VIMCO's
    leave-one-out baselines are unbiased only for score-function sites; see
    `px.vi.vimco`. `num_particles` is K, inside the bound (at least 2); `num_samples`
    averages independent estimates.

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

    _refuse_mixed_scales = True

    def __init__(self, num_particles: int = 8, num_samples: int = 1):
        _check_particles(num_particles)
        if num_particles < 2:
            raise ValueError(f"VIMCO needs num_particles >= 2 (leave-one-out baselines), "
                             f"got {num_particles}.")
        super().__init__(lambda m, g: _vimco(m, g, num_particles), num_samples)
        self.num_particles = num_particles
