"""NumPyro model and guide functions as generative functions."""

from __future__ import annotations

import contextlib
import contextvars
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

from ..adev import AbstractEstimator, default_estimator, enum, reinforce
from ..adev._primitives import _point_mass, sample as _sample
from ._protocol import (
    score_function_densities_are_stopped,
    AbstractConditionable,
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


#: The `numpyro.mutable` messages seen while collecting (`collect_mutable`), else None.
_MUTABLE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("px_mutable",
                                                                       default=None)


@contextlib.contextmanager
def collect_mutable():
    """Allow `numpyro.mutable` sites in the runs inside the block and collect them.

    Yields a dict from site names to a function returning the site's value at the end of
    the run (the value is a dict the model updates in place, e.g. batch-norm statistics).
    `px.numpyro.ELBO.loss_with_mutable_state` returns these values to SVI, which carries
    them from step to step, as NumPyro does. Outside such a block a mutable site is
    refused (nothing would carry its new value).
    """
    seen: dict = {}
    token = _MUTABLE.set(seen)
    try:
        yield seen
    finally:
        _MUTABLE.reset(token)


def _refuse_mutable(msg) -> None:
    if msg["type"] != "mutable":
        return
    seen = _MUTABLE.get()
    if seen is not None:
        seen[msg["name"]] = lambda: msg["value"]
        return
    raise NotImplementedError(
        f"site {msg['name']!r} is numpyro.mutable state (e.g. batch-norm statistics), "
        "which only px.numpyro.ELBO carries from step to step (through SVI's state, with "
        "num_particles=1, as NumPyro's Trace_ELBO does); other ppl_ext losses and "
        "objectives have nowhere to put its new value. Use px.numpyro.ELBO(), or keep "
        "such state outside the model."
    )


def _draw_subsample(msg) -> Array:
    """Draw a subsampling plate's indices as a ppl_ext site named after the plate.

    A plate seeded by a `numpyro.handlers.seed` inside the function (the `px.numpyro`
    losses seed the plates once per estimate, so that the particles of a bound share one
    minibatch, as NumPyro does) draws its indices from that key instead. Either way the
    law has no parameters: no gradient contribution.
    """
    size, subsample_size = msg["args"]
    if msg["kwargs"].get("rng_key") is not None:
        return numpyro.primitives._subsample_fn(size, subsample_size, msg["kwargs"]["rng_key"])
    return _sample(_Subsample(size, subsample_size), reinforce, name=msg["name"],
                   _plates=False)


class _KeyBits(dist.Distribution):
    """A fresh raw PRNG key (`uint32[2]`): answers `numpyro.prng_key()` inside a program.

    Its law has no parameters, so the site adds nothing to a gradient; what the key draws
    (a site hidden by `handlers.block`) is differentiated pathwise, as in NumPyro.
    """

    arg_constraints: dict = {}
    support = constraints.real  # never scored; only drawn

    def __init__(self):
        super().__init__(batch_shape=(), event_shape=(2,))

    def sample(self, key, sample_shape=()):
        return jax.random.bits(key, sample_shape + (2,), jnp.uint32)

    def log_prob(self, value):
        return jnp.zeros(jnp.shape(value)[:-1])


def _answer_prng_key(msg) -> None:
    """Give a `numpyro.prng_key()` request (e.g. from `handlers.block`) a fresh key."""
    if msg["type"] == "prng_key" and msg["value"] is None and msg["kwargs"]["rng_key"] is None:
        msg["kwargs"]["rng_key"] = _sample(_KeyBits(), reinforce, name="numpyro.prng_key",
                                           _plates=False)


class _DrawWithEstimators(numpyro.primitives.Messenger):
    """Replace latent `numpyro.sample` draws by `px.sample` sites (after plates broadcast)."""

    def __init__(self, fn, constraints, estimators, default=None):
        self.constraints = constraints
        self.estimators = estimators
        self.default = default
        self.drawn: dict[str, Array] = {}
        #: drawn sites whose estimator is not pathwise (their value carries no tangent)
        self.score_sites: set[str] = set()
        #: latent sites whose value a handler inside the function fixed (`substitute`)
        self.given: dict[str, Array] = {}
        super().__init__(fn)

    def process_message(self, msg):
        _refuse_mutable(msg)
        _answer_prng_key(msg)
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
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        if msg["value"] is not None:
            # fixed inside the function (numpyro's substitute): a choice like a drawn one,
            # scored by the density of the site, as in NumPyro's guide traces
            if msg["name"] not in self.constraints:
                self.given[msg["name"]] = msg["value"]
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
        base, transforms = _flow_parts(msg["fn"])
        effective = default_estimator(base) if estimator is None else estimator
        if not effective.pathwise and not _point_mass(base):
            self.score_sites.add(name)
        if not transforms:
            return _sample(msg["fn"], estimator, name=name, _plates=False)
        # a normalising flow: draw the base, push it through the transforms and keep their
        # intermediates for the log density (as numpyro does: BNAF has no inverse, and
        # the transforms close over their networks' parameters)
        value = _sample(base, estimator, name=name, _plates=False)
        intermediates = []
        for transform in transforms:
            new_value, transform_intermediates = transform.call_with_intermediates(value)
            intermediates.append([value, transform_intermediates])
            value = new_value
        msg["intermediates"] = intermediates
        return value


def _flow_parts(fn):
    """`(base, transforms)` of a TransformedDistribution with a normalising-flow transform
    (numpyro.distributions.flows); `(fn, [])` for any other distribution."""
    from numpyro.distributions import flows

    if isinstance(fn, dist.TransformedDistribution) and any(
            type(t).__module__ == flows.__name__ for t in fn.transforms):
        return fn.base_dist, list(fn.transforms)
    return fn, []


class _RequireValues(numpyro.primitives.Messenger):
    """Refuse a latent `numpyro.sample` site that has no value (inside `assess`); draw the
    indices of a subsampling plate that has none."""

    def __init__(self, fn, owner: str):
        self.owner = owner
        super().__init__(fn)

    def process_message(self, msg):
        _refuse_mutable(msg)
        _answer_prng_key(msg)
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
    """`log p(data)` with the model's enumerated sites without values summed out.

    As numpyro's TraceEnum_ELBO does (funsor's tensor variable elimination): the factors
    are grouped into the components that share enumerated sites; a group's *unscaled*
    factors are summed over its enumerated values and plates, and the result is multiplied
    by the group's common scale (a subsampling plate's N/m, a `handlers.scale`):
    `s · log Σ_c Π p`, not `log Σ_c Π p^s`. Groups whose sites have different scales (an
    enumerated site outside a subsampled plate) are refused, as TraceEnum_ELBO does. The
    enumerated sites' own factors are their unmasked densities (the measure summed over),
    so a masked-out element, whose other factors are masked, contributes `log 1 = 0`.
    """
    try:
        import funsor
        import funsor.optimizer
        from numpyro.contrib.funsor import enum
        from numpyro.contrib.funsor.enum_messenger import trace as packed_trace
        from numpyro.contrib.funsor.infer_util import plate_to_enum_plate
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
    with plate_to_enum_plate():
        model_trace = packed_trace(model).get_trace(*args, **kwargs)
    sites = {name: site for name, site in model_trace.items() if site["type"] == "sample"}
    enumerated = {name for name, site in sites.items()
                  if not site["is_observed"]
                  and (site.get("infer") or {}).get("enumerate") == "parallel"}
    total = jnp.zeros(())
    factors = {}  # name -> unscaled funsor factor, for the sites touching enumerated ones
    for name, site in sites.items():
        law = _unmasked(site["fn"]) if name in enumerated else site["fn"]
        if site["intermediates"]:
            log_prob = law.log_prob(site["value"], site["intermediates"])
        else:
            log_prob = law.log_prob(site["value"])
        dim_to_name = site["infer"]["dim_to_name"]
        if all(d == 1 for d in jnp.shape(log_prob)) and not dim_to_name:
            log_prob = jnp.squeeze(log_prob)
        factor = funsor.to_funsor(log_prob, output=funsor.Real, dim_to_name=dim_to_name)
        if name in enumerated or set(factor.inputs) & enumerated:
            factors[name] = factor
        else:  # an ordinary term: its scaled log density
            scale = site["scale"]
            total = total + jnp.sum(log_prob if scale is None else scale * log_prob)
    for group, summed in _enumeration_groups(factors, enumerated):
        group_factors = [factors[name] for name in group]
        plates = frozenset().union(*(f.inputs for f in group_factors)) - enumerated
        with funsor.interpretations.lazy:
            lazy = funsor.sum_product.sum_product(
                funsor.ops.logaddexp, funsor.ops.add, group_factors,
                eliminate=summed | plates, plates=plates)
        value = funsor.optimizer.apply_optimizer(lazy)
        scale = _common_scale(group, summed, sites, owner)
        value = jnp.asarray(value.data)
        total = total + (value if scale is None else scale * value)
    return total


def _unmasked(law):
    """The distribution under numpyro masks (an enumerated site's measure is normalised)."""
    while isinstance(law, dist.MaskedDistribution):
        law = law.base_dist
    return law


def _enumeration_groups(factors, enumerated):
    """Connected components of the factors linked by the enumerated sites they share:
    `[(site names, enumerated names)]`."""
    parent = {name: name for name in factors}

    def find(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name, factor in factors.items():
        for var in (set(factor.inputs) & enumerated) | ({name} & enumerated):
            if var in parent:
                parent[find(var)] = find(name)
    groups: dict = {}
    for name in factors:
        groups.setdefault(find(name), []).append(name)
    return [(members, frozenset(members) & enumerated) for members in groups.values()]


def _common_scale(group, summed, sites, owner):
    """The one scale of a group of sites summed over together (refused if they differ)."""
    scales = {name: sites[name]["scale"] for name in group}
    concrete = {}
    for name, scale in scales.items():
        if scale is None:
            concrete[name] = 1.0
        elif isinstance(scale, (int, float)) or (
                not isinstance(scale, jax.core.Tracer) and jnp.ndim(scale) == 0):
            concrete[name] = float(scale)
        else:
            concrete[name] = scale
    first = next(iter(concrete.values()))
    if all(isinstance(s, float) for s in concrete.values()):
        if len(set(concrete.values())) == 1:
            return None if first == 1.0 else first
    elif all(s is first for s in concrete.values()) and jnp.ndim(first) == 0:
        return first  # one traced scalar scale (e.g. an annealing factor) for all
    # different scales: name the plates of the scaled sites the enumerated ones are outside
    scaled = sorted(name for name, s in concrete.items() if not (isinstance(s, float)
                                                                 and s == 1.0))
    plates = sorted({f.name for name in scaled for f in sites[name]["cond_indep_stack"]}
                    - {f.name for name in summed for f in sites[name]["cond_indep_stack"]})
    raise ValueError(
        f"assess of {owner}: the enumerated site(s) {sorted(summed)} are summed out "
        f"together with sites of different scales ({ {n: concrete[n] for n in group} }). "
        "The exact sum log Σ Π p can only be scaled as a whole (s · log Σ Π p, as "
        "TraceEnum_ELBO does), so its sites must share one scale. An enumerated site "
        f"outside a subsampling plate (here {plates or 'a scale handler'}, whose sites "
        "are scaled N/m) has no unbiased minibatch estimate; NumPyro's TraceEnum_ELBO "
        "refuses it too. Put the site inside the subsampled plate, sample it in the "
        "guide, or do not subsample."
    )


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


def _log_joint(model_trace, skip=frozenset(), stopped=frozenset()) -> Array:
    """Sum of the (scaled, masked) log densities of a trace's sample sites not in `skip`.

    What `numpyro.infer.util.log_density` computes, from a trace already recorded.
    """
    total = jnp.zeros(())
    for name, site in model_trace.items():
        if site["type"] == "sample" and name not in skip:
            term = _site_log_density(site)
            if name in stopped:  # see `score_function_densities_stopped`
                term = jax.lax.stop_gradient(term)
            total = total + term
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


class NumPyroModel(AbstractConditionable):
    """A NumPyro model or guide function as a generative function.

    `numpyro.sample` latent sites become `px.sample` sites (default estimator per
    distribution; choose per site with `infer={"estimator": px.enum}` in the model, or with
    the `estimators` mapping from site names to estimators; `default_estimator` replaces
    the per-distribution default for the remaining sites; a guide site that numpyro's
    `config_enumerate` marks `infer={"enumerate": "parallel"}` defaults to `px.enum`, the
    exact sum TraceEnum_ELBO does with guide-side enumeration). Observed sites, plates,
    masks, scales and `numpyro.deterministic` keep their NumPyro meaning: densities come
    from `numpyro.infer.util.log_density` (a scaled site counts with its scaled log density
    everywhere, `generate`'s weight included; see `AbstractGenerativeFunction`).
    Parameters (`numpyro.param` sites) are passed as a dict, the first argument of every
    method. A latent site whose value a handler inside the function fixes
    (`handlers.substitute`) is a choice, scored by its density, as in NumPyro's traces; a
    site hidden by `handlers.block` draws from a fresh key (`numpyro.prng_key()` is
    answered by a site whose law has no parameters); a normalising-flow site (the
    IAF/BNAF autoguides) draws its base and keeps the transforms' intermediates for its
    density, as numpyro does. A subsampling plate
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
        values = {**dict(constraints), **handler.given, **handler.drawn}
        stopped = handler.score_sites if score_function_densities_are_stopped() else ()
        return (values, handler.drawn, _log_joint(traced.trace, stopped=frozenset(stopped)),
                retval, traced.trace)

    def simulate(self, params: Mapping[str, Any] | None, *args, **kwargs) -> Trace:
        """Draw every latent site; `log_density` is the joint log density of the run."""
        values, _, log_p, retval, _ = self._run(params, {}, args, kwargs)
        return Trace(values, log_p, retval)

    def assess(self, choices, params: Mapping[str, Any] | None, *args, **kwargs) -> Array:
        """Joint log density of `choices` and the observed sites.

        Model sites marked `infer={"enumerate": "parallel"}` (numpyro's `config_enumerate`)
        that are not in `choices` are summed out exactly, with funsor, as numpyro's
        TraceEnum_ELBO does: the result is the log density with them marginalised. A
        group of factors summed together is scaled as a whole (`s · log Σ Π p` for a
        subsampling plate's `s = N/m`), and refused when its sites have different scales
        (an enumerated site outside a subsampled plate); masked-out elements add nothing.
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


def _assess_trace(gen_fn: NumPyroModel, choices, params, args, kwargs):
    """The numpyro trace of `gen_fn.assess(choices, params, *args)` (every latent site
    given; enumerated model sites are refused with `ValueError`): the sites' distributions,
    for objectives that use more than the summed log density (analytic KL terms)."""
    data = {**dict(params or {}), **dict(choices)}
    owner = _function_name(gen_fn.fn)
    fn = _RequireValues(handlers.substitute(gen_fn.fn, data=data), owner)
    try:
        return handlers.trace(fn).get_trace(*args, **kwargs)
    except _Enumerated as exc:
        raise ValueError(
            f"{owner}: site {exc.args[0]!r} is enumerated in the model (summed out), which "
            "analytic KL terms do not combine with; use px.numpyro.ELBO() without "
            "analytic_kl (it sums the site out exactly)."
        ) from None
