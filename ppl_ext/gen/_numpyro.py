"""NumPyro model and guide functions as generative functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from jaxtyping import Array
from numpyro import handlers
from numpyro.infer.util import log_density

from ..adev import AbstractEstimator, enum, reinforce
from ..adev._primitives import sample as _sample
from ._protocol import (
    AbstractGenerativeFunction,
    DensityTerm,
    Trace,
    density_terms_recorded,
    report_density_term,
)


class _Subsample(dist.Distribution):
    """Indices of a plate's minibatch: `subsample_size` of `size`, without replacement.

    Its law does not depend on any parameter, so the site it is drawn at adds nothing to a
    gradient; numpyro's own sampler draws the indices.
    """

    arg_constraints: dict = {}
    pytree_aux_fields = ("size", "subsample_size")

    def __init__(self, size: int, subsample_size: int):
        self.size, self.subsample_size = int(size), int(subsample_size)
        super().__init__(batch_shape=(), event_shape=(self.subsample_size,))

    @property
    def support(self):
        return constraints.integer_interval(0, self.size - 1)

    def sample(self, key, sample_shape=()):
        if sample_shape:
            raise ValueError("subsample indices are drawn one set at a time")
        return numpyro.primitives._subsample_fn(self.size, self.subsample_size, key)

    def log_prob(self, value):  # uniform over ordered draws without replacement
        return -(gammaln(self.size + 1.0) - gammaln(self.size - self.subsample_size + 1.0)) \
            * jnp.ones(jnp.shape(value)[:-1])


def _refuse_mutable(msg) -> None:
    if msg["type"] == "mutable":
        raise NotImplementedError(
            f"site {msg['name']!r} is numpyro.mutable state (e.g. batch-norm statistics), "
            "which ppl_ext's generative functions and SVI losses do not carry from step to "
            "step. Keep such state outside the model, or train this model with numpyro's "
            "Trace_ELBO."
        )


def _draw_subsample(msg) -> Array:
    """Draw a subsampling plate's indices as a ppl_ext site named after the plate."""
    size, subsample_size = msg["args"]
    return _sample(_Subsample(size, subsample_size), reinforce, name=msg["name"],
                   _plates=False)


class _DrawWithEstimators(numpyro.primitives.Messenger):
    """Replace latent `numpyro.sample` draws by `px.sample` sites (after plates broadcast)."""

    def __init__(self, fn, constraints, estimators, default=None):
        self.constraints = constraints
        self.estimators = estimators
        self.default = default
        self.drawn: dict[str, Array] = {}
        super().__init__(fn)

    def process_message(self, msg):
        _refuse_mutable(msg)
        if msg["type"] == "control_flow":
            # numpyro's scan/cond run their bodies under these handlers: given values
            # (sliced per step by numpyro), then fresh px.sample draws
            stack = msg["kwargs"]["substitute_stack"]
            if self.constraints:
                stack.append(("substitute", dict(self.constraints)))
            stack.append(("substitute", self._draw_in_body))
            return
        if msg["type"] == "plate" and msg["value"] is None:  # a subsampling plate
            name = msg["name"]
            value = self.constraints[name] if name in self.constraints else _draw_subsample(msg)
            msg["value"] = value
            if name not in self.constraints:
                self.drawn[name] = value
            return
        if (msg["type"] == "sample" and msg.get("_control_flow_done") and not msg["is_observed"]
                and msg["name"] not in self.constraints):
            # drawn in a scan/cond body by `_draw_in_body`; numpyro re-emits it stacked
            self.drawn[msg["name"]] = msg["value"]
            return
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if name in self.constraints:
            msg["value"] = self.constraints[name]
            msg["is_observed"] = False
            return
        msg["value"] = self.draw(msg)
        self.drawn[name] = msg["value"]

    def _draw_in_body(self, msg):
        """substitute_fn for a control-flow body: a draw for a latent site without value."""
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return None
        return self.draw(msg)

    def draw(self, msg) -> Array:
        """A `px.sample` site for the latent `numpyro.sample` message `msg`."""
        name = msg["name"]
        if msg["kwargs"].get("sample_shape"):
            raise ValueError(
                f"site {name!r} uses sample_shape; write it with a numpyro.plate or "
                "`.expand` so that ppl_ext sees one batch-shaped site."
            )
        infer = msg.get("infer") or {}
        default = self.default
        if infer.get("enumerate") == "parallel" and default is None:
            default = enum  # numpyro's config_enumerate on a guide site: sum over it
        estimator = self.estimators.get(name, infer.get("estimator", default))
        return _sample(msg["fn"], estimator, name=name, _plates=False)


class _RequireValues(numpyro.primitives.Messenger):
    """Refuse a latent `numpyro.sample` site that has no value (inside `assess`); draw the
    indices of a subsampling plate that has none."""

    def __init__(self, fn, owner: str):
        self.owner = owner
        super().__init__(fn)

    def process_message(self, msg):
        _refuse_mutable(msg)
        if msg["type"] == "control_flow":
            msg["kwargs"]["substitute_stack"].append(("substitute", self._check_in_body))
            return
        if msg["type"] == "plate" and msg["value"] is None:
            msg["value"] = _draw_subsample(msg)
            return
        self._check(msg)

    def _check_in_body(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None:
            raise ValueError(
                f"assess of {self.owner}: site {msg['name']!r}, inside a numpyro scan/cond "
                "body, has no value in `choices`. ppl_ext sums out enumerated model sites "
                "outside control flow only (not the Markov chains of an HMM: use numpyro's "
                "TraceEnum_ELBO there), so give the site a value from the guide."
            )
        return None

    def _check(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None:
            if (msg.get("infer") or {}).get("enumerate") == "parallel":
                raise _Enumerated(msg["name"])
            raise ValueError(
                f"assess of {self.owner} needs a value for every latent site, and site "
                f"{msg['name']!r} has none in `choices` (in an objective: the guide does not "
                "sample it, or names it differently). Give its value, or use generate to "
                "draw the sites without one."
            )


class _Enumerated(Exception):
    """A model site marked for enumeration has no value: marginalise it (`assess`)."""


class _KeepGivenValues(numpyro.primitives.Messenger):
    """Unmark enumeration at sites that already have a value (from `choices`)."""

    def process_message(self, msg):
        infer = msg.get("infer") or {}
        if msg["type"] == "sample" and msg["value"] is not None and infer.get("enumerate"):
            msg["infer"] = {**infer, "enumerate": None}


def _marginal_log_density(fn, data, args, kwargs, owner: str) -> Array:
    """`log p(data)` with the model's enumerated sites without values summed out (funsor,
    as numpyro's TraceEnum_ELBO does)."""
    try:
        from numpyro.contrib.funsor import enum, log_density as enum_log_density
    except ImportError as exc:  # funsor is a dependency; this guards a broken install
        raise ImportError(
            f"assess of {owner} sums out the model's enumerated sites with funsor: "
            "pip install funsor"
        ) from exc
    substituted = handlers.substitute(fn, data=data)

    def log_probs(*a, **k):  # the log-density shapes give the plate nesting
        seeded = handlers.seed(substituted, rng_seed=0)
        trace = handlers.trace(seeded).get_trace(*a, **k)
        return [site["fn"].log_prob(site["value"]) for site in trace.values()
                if site["type"] == "sample"]

    nesting = max([len(s.shape) for s in jax.eval_shape(log_probs, *args, **kwargs)],
                  default=0)
    model = _RequireValues(enum(_KeepGivenValues(substituted),
                                first_available_dim=-nesting - 1), owner)
    log_p, _ = enum_log_density(model, args, kwargs, {})
    return jnp.asarray(log_p)


def _function_name(fn) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return repr(name) if name else repr(fn)


def _sample_site_names(model_trace) -> set[str]:
    return {name for name, site in model_trace.items() if site["type"] == "sample"}


def check_estimator_names(estimators, sites: set[str], owner: str) -> None:
    """Refuse per-site estimators for names that are not sample sites (likely a typo)."""
    unknown = sorted(set(estimators) - sites)
    if unknown:
        raise ValueError(
            f"`estimators` names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not "
            f"a sample site of {owner}; its sample sites are {sorted(sites)}."
        )


def _site_log_density(site) -> Array:
    """A recorded sample site's summed log density, times its scale if it has one."""
    if site["intermediates"]:
        log_prob = site["fn"].log_prob(site["value"], site["intermediates"])
    else:
        log_prob = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _log_joint(model_trace, skip=frozenset()) -> Array:
    """Sum of the (scaled, masked) log densities of a trace's sample sites not in `skip`.

    What `numpyro.infer.util.log_density` computes, from a trace already recorded.
    """
    total = jnp.zeros(())
    for name, site in model_trace.items():
        if site["type"] == "sample" and name not in skip:
            total = total + _site_log_density(site)
    return total


def _report_observed(model_trace, owner: str) -> None:
    """Report observed sites and factors: terms of `log_density` that are not draws."""
    if not density_terms_recorded():
        return
    for name, site in model_trace.items():
        if site["type"] == "sample" and site["is_observed"]:
            report_density_term(DensityTerm(
                f"observed site {name!r} of {owner} (obs= or numpyro.factor: its log "
                "density is a term of the log density, but it is not a draw)",
                "observed",
                _site_log_density(site),
            ))


class NumPyroModel(AbstractGenerativeFunction):
    """A NumPyro model or guide function as a generative function.

    `numpyro.sample` latent sites become `px.sample` sites (default estimator per
    distribution; choose per site with `infer={"estimator": px.enum}` in the model, or with
    the `estimators` mapping from site names to estimators; `default_estimator` replaces
    the per-distribution default for the remaining sites; a guide site that numpyro's
    `config_enumerate` marks `infer={"enumerate": "parallel"}` defaults to `px.enum`, the
    exact sum TraceEnum_ELBO does with guide-side enumeration). Observed sites, plates,
    masks, scales and `numpyro.deterministic` keep their NumPyro meaning: densities come
    from `numpyro.infer.util.log_density` (a scaled site counts with its scaled log density
    everywhere, `generate`'s weight included; see `AbstractGenerativeFunction`). Parameters (`numpyro.param` sites) are passed as
    a dict, the first argument of every method. A subsampling plate
    (`subsample_size=m`) draws its indices at a site named after the plate (a law without
    parameters: no gradient contribution) and records them among the choices, so that a
    model assessed on a guide's choices scores the same minibatch; `assess` draws the
    indices of a subsampling plate not in `choices`.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist, ppl_ext as px
        >>> def guide(data):
        ...     loc = numpyro.param("loc", 0.0)
        ...     numpyro.sample("z", dist.Normal(loc, 1.0))
        >>> q = px.gen.NumPyroModel(guide)
        >>> f = px.expectation(lambda params: q.simulate(params, None).choices["z"])
        >>> float(f.grad(jax.random.key(0), {"loc": 0.5})["loc"])
        1.0
    """

    fn: Callable = eqx.field(static=True)
    # pytrees: an estimator may hold arrays (a traced or learned baseline)
    estimators: Mapping[str, AbstractEstimator] = eqx.field(default_factory=dict)
    default_estimator: AbstractEstimator | None = None
    #: Refuse `estimators` entries that name no sample site of the function (off where one
    #: mapping serves a model and its guide: `px.numpyro` losses check the union instead).
    check_estimators: bool = eqx.field(default=True, static=True)

    def _run(self, params, constraints, args, kwargs):
        # One run of the function: the densities come from the trace of the run that drew
        # the values (running it again for `log_density` would double the work that XLA
        # cannot deduplicate in the backward pass).
        fn = handlers.substitute(self.fn, data=dict(params or {}))
        handler = _DrawWithEstimators(fn, dict(constraints), dict(self.estimators),
                                      self.default_estimator)
        traced = handlers.trace(handler)
        retval = traced(*args, **kwargs)
        if self.check_estimators and self.estimators:
            check_estimator_names(self.estimators, _sample_site_names(traced.trace),
                                  _function_name(self.fn))
        _report_observed(traced.trace, _function_name(self.fn))
        values = {**dict(constraints), **handler.drawn}
        return values, handler.drawn, _log_joint(traced.trace), retval, traced.trace

    def simulate(self, params: Mapping[str, Any] | None, *args, **kwargs) -> Trace:
        """Draw every latent site; `log_density` is the joint log density of the run."""
        values, _, log_p, retval, _ = self._run(params, {}, args, kwargs)
        return Trace(values, log_p, retval)

    def assess(self, choices, params: Mapping[str, Any] | None, *args, **kwargs) -> Array:
        """Joint log density of `choices` and the observed sites.

        Model sites marked `infer={"enumerate": "parallel"}` (numpyro's `config_enumerate`)
        that are not in `choices` are summed out exactly, with funsor, as numpyro's
        TraceEnum_ELBO does: the result is the log density with them marginalised.
        """
        data = {**dict(params or {}), **dict(choices)}
        owner = _function_name(self.fn)
        try:
            fn = _RequireValues(handlers.substitute(self.fn, data=data), owner)
            log_p, _ = log_density(fn, args, kwargs, {})
        except _Enumerated:
            return _marginal_log_density(self.fn, data, args, kwargs, owner)
        return jnp.asarray(log_p)

    def generate(self, constraints, params: Mapping[str, Any] | None, *args, **kwargs):
        """Draw the latent sites not in `constraints` from their prior (given the others).

        The weight is `log p(all choices) - log p(drawn choices | the others)` with scaled
        site densities (see `AbstractGenerativeFunction`): a site under numpyro's `scale`
        handler or in a subsampling plate counts as `scale · log p_site` on both sides, so
        the drawn sites cancel and the weight is the scaled log density of the
        constrained and observed sites. It is computed as that sum, exactly (not as a
        difference of two large sums).
        """
        values, drawn, log_p, retval, model_trace = self._run(params, constraints, args, kwargs)
        weight = _log_joint(model_trace, skip=frozenset(drawn))
        return Trace(values, log_p, retval), weight
