"""GenJAX interop: genjax generative functions as ppl_ext models, and back.

genjax (1.0.x) is an optional dependency: it is imported when one of these adapters is
first used, never when `ppl_ext` is imported.

- `GenJAXModel(gen_fn)`: a genjax generative function (a `@genjax.gen` function) as a
  ppl_ext generative function, usable as the model *or* the guide of ppl_ext objectives.
  Inside an expectation its random choices become `px.sample` sites (each genjax
  distribution is mapped to the numpyro distribution with the same law, so the
  per-distribution default estimator and per-address `estimators` apply).
- `to_genjax_distribution(gen_fn)`: a ppl_ext generative function (e.g. a `NumPyroModel`)
  as a genjax `Distribution`, usable with `@` inside `@genjax.gen` code.

Addresses: genjax choice maps are nested dicts (`{"sub": {"z": ...}}` for a call
`sub() @ "sub"`); on the ppl_ext side the choices are a flat dict and nesting is written
with "/" (`{"sub/z": ...}`). Both spellings are accepted where choices are passed in.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array
from numpyro import handlers

from ..adev import AbstractEstimator
from ..adev._primitives import sample as _sample
from ._numpyro import NumPyroModel
from ._protocol import AbstractConditionable, AbstractGenerativeFunction, Trace

#: Separator of nested genjax addresses in ppl_ext choice names.
SEP = "/"


def _genjax():
    """Import genjax (optional dependency); silence its import-time deprecation warnings."""
    try:
        with _quiet():  # tensorflow_probability touches deprecated jax names on import
            import genjax
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ppl_ext's genjax adapters need genjax: pip install 'genjax==1.0.14'."
        ) from error
    return genjax


# ---------------------------------------------------------------------------------------
# Choice-map helpers


def _nest(choices: Mapping[str, Any] | None) -> dict[str, Any]:
    """Flat ppl_ext choices (`"a/b"` names) to a nested genjax choice map."""
    out: dict[str, Any] = {}
    for name, value in dict(choices or {}).items():
        path = name.split(SEP) if isinstance(name, str) else [name]
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"choice {name!r}: {part!r} is both a value and a prefix.")
            node = child
        leaf = path[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **_nest(value)}
        else:
            node[leaf] = dict(_nest(value)) if isinstance(value, Mapping) else value
    return out


def _flatten(choices: Any, prefix: str) -> dict[str, Any]:
    """A (possibly nested) choice value at `prefix` to flat ppl_ext choices."""
    if isinstance(choices, Mapping):
        out: dict[str, Any] = {}
        for name, value in choices.items():
            out.update(_flatten(value, f"{prefix}{SEP}{name}" if prefix else str(name)))
        return out
    return {prefix: choices}


# ---------------------------------------------------------------------------------------
# genjax distributions -> numpyro distributions (same law), for px.sample sites


def _bernoulli(logits=None, probs=None):
    return dist.Bernoulli(probs=probs, logits=logits)


def _geometric(logits=None, probs=None):
    return dist.Geometric(probs=probs, logits=logits)


def _binomial(total_count, logits=None, probs=None):
    # tfp takes (and samples) floats; numpyro counts are integers
    total_count = jnp.asarray(total_count).astype(jnp.result_type(int))
    return dist.Binomial(total_count, probs=probs, logits=logits)


def _gamma(concentration, rate=None, log_rate=None):
    if (rate is None) == (log_rate is None):
        raise TypeError("exactly one of rate, log_rate")
    return dist.Gamma(concentration, rate if log_rate is None else jnp.exp(log_rate))


def _poisson(rate=None, log_rate=None):
    if (rate is None) == (log_rate is None):
        raise TypeError("exactly one of rate, log_rate")
    return dist.Poisson(rate if log_rate is None else jnp.exp(log_rate))


_BUILDERS: dict[str, Callable[..., dist.Distribution]] = {
    # genjax name: numpyro constructor taking the tfp constructor's arguments
    "bernoulli": _bernoulli,
    "flip": lambda p: dist.Bernoulli(probs=p),
    "beta": lambda concentration1, concentration0: dist.Beta(concentration1, concentration0),
    "categorical": lambda logits: dist.Categorical(logits=logits),
    "geometric": _geometric,
    "normal": lambda loc, scale: dist.Normal(loc, scale),
    "uniform": lambda low=0.0, high=1.0: dist.Uniform(low, high),
    "exponential": lambda rate: dist.Exponential(rate),
    "poisson": _poisson,
    "multivariate_normal": lambda loc, covariance_matrix: dist.MultivariateNormal(
        loc, covariance_matrix=covariance_matrix
    ),
    "dirichlet": lambda concentration: dist.Dirichlet(concentration),
    "binomial": _binomial,
    "gamma": _gamma,
    "log_normal": lambda loc, scale: dist.LogNormal(loc, scale),
    "student_t": lambda df, loc, scale: dist.StudentT(df, loc, scale),
    "laplace": lambda loc, scale: dist.Laplace(loc, scale),
    "half_normal": lambda scale: dist.HalfNormal(scale),
    "inverse_gamma": lambda concentration, scale: dist.InverseGamma(concentration, scale),
    "weibull": lambda concentration, scale: dist.Weibull(scale, concentration),
    "cauchy": lambda loc, scale: dist.Cauchy(loc, scale),
    "chi2": lambda df: dist.Chi2(df),
}

_BUILDER_TABLE: dict[Any, Callable[..., dist.Distribution]] | None = None


def _builder_table() -> dict[Any, Callable[..., dist.Distribution]]:
    """genjax built-in distributions, keyed by their (static) logpdf function."""
    global _BUILDER_TABLE
    if _BUILDER_TABLE is None:
        genjax = _genjax()
        _BUILDER_TABLE = {
            getattr(genjax.distributions, name)._logpdf.value: build
            for name, build in _BUILDERS.items()
        }
    return _BUILDER_TABLE


class _quiet(warnings.catch_warnings):
    """Around genjax's own samplers: tensorflow_probability's jax substrate calls
    deprecated jax APIs (e.g. `np.shape(None)` in `Bernoulli` sampling) and asks for
    float64 without x64 (e.g. `StudentT`, `Poisson` sampling)."""

    def __enter__(self):
        out = super().__enter__()
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Explicitly requested dtype float64", UserWarning)
        return out


def _genjax_sample_shape(gen_fn, args, kwargs) -> jax.ShapeDtypeStruct:
    genjax = _genjax()
    with _quiet():
        return jax.eval_shape(
            lambda key: genjax.seed(gen_fn.sample)(key, *args, **kwargs), jax.random.key(0)
        )


class _GenJAXSite(dist.Distribution):
    """A genjax distribution as a numpyro one: genjax's sampler and logpdf (no rsample).

    Used for genjax distributions without a numpyro counterpart; their sites get the
    score-function estimator by default.
    """

    pytree_data_fields = ("genjax_dist", "args", "kwargs")
    # numpyro's default (`reparametrized_params == arg_constraints`, both empty) says True;
    # genjax's sampler may not be differentiable (discrete, or not reparameterised).
    has_rsample = False

    def __init__(self, genjax_dist, args, kwargs, out):
        self.genjax_dist, self.args, self.kwargs = genjax_dist, tuple(args), dict(kwargs)
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise NotImplementedError(
                f"genjax distribution {_gf_name(genjax_dist)} returns a "
                f"{type(out).__name__}; px.sample sites hold one array."
            )
        super().__init__(batch_shape=(), event_shape=out.shape)

    def _draw(self, key):
        with _quiet():
            return _genjax().seed(self.genjax_dist.sample)(key, *self.args, **self.kwargs)

    def sample(self, key, sample_shape=()):
        if not sample_shape:
            return self._draw(key)
        keys = jax.random.split(key, math.prod(sample_shape))
        draws = jax.vmap(self._draw)(keys)
        return draws.reshape(tuple(sample_shape) + draws.shape[1:])

    def log_prob(self, value):
        extra = jnp.ndim(value) - len(self.event_shape)
        logpdf = lambda v: self.genjax_dist.logpdf(v, *self.args, **self.kwargs)  # noqa: E731
        if extra <= 0:
            return logpdf(value)
        flat = jnp.reshape(value, (-1,) + self.event_shape)
        return jax.vmap(logpdf)(flat).reshape(jnp.shape(value)[:extra])


def _gf_name(gen_fn) -> str:
    name = getattr(getattr(gen_fn, "name", None), "value", None)
    return f"{type(gen_fn).__name__} {name!r}" if name else type(gen_fn).__name__


def _numpyro_distribution(gen_fn, args, kwargs) -> tuple[dist.Distribution, Any]:
    """The numpyro distribution with the law of `gen_fn(*args, **kwargs)` and genjax's
    value shape/dtype (values drawn from it are cast to that dtype)."""
    expected = _genjax_sample_shape(gen_fn, args, kwargs)
    build = _builder_table().get(gen_fn._logpdf.value)
    if build is not None:
        try:
            inspect.signature(build).bind(*args, **kwargs)
        except TypeError:
            build = None
    if build is not None:
        d = build(*args, **kwargs)
        if d.shape() == expected.shape:
            return d, expected
    return _GenJAXSite(gen_fn, args, kwargs, expected), expected


def _vmap_in_axes(vm, args, kwargs) -> tuple | None:
    """`vm.in_axes` as one entry per argument, for a Vmap of a genjax distribution."""
    genjax = _genjax()
    if kwargs or not isinstance(vm.gen_fn, genjax.Distribution) or vm.axis_name.value:
        return None
    in_axes = vm.in_axes.value
    if in_axes is None or isinstance(in_axes, int):
        in_axes = (in_axes,) * len(args)
    in_axes = tuple(in_axes)
    return in_axes if len(in_axes) == len(args) else None


def _assess(gen_fn, value, args, kwargs):
    """genjax `assess` (log density summed, return value) of one call.

    A Vmap of a distribution is assessed with `jax.vmap` of its logpdf: genjax 1.0.14's
    `Vmap.assess` fails for an integer `in_axes` (e.g. `normal.vmap()`).
    """
    genjax = _genjax()
    if isinstance(gen_fn, genjax.Vmap):
        in_axes = _vmap_in_axes(gen_fn, args, kwargs)
        if in_axes is not None:
            log_p = jax.vmap(gen_fn.gen_fn.logpdf, in_axes=(0, *in_axes))(value, *args)
            return jnp.sum(log_p), value
    log_p, retval = gen_fn.assess(value, *args, **kwargs)
    return jnp.sum(log_p), retval


def _vmapped_numpyro_distribution(vm, args, kwargs):
    """`Vmap(distribution)` as one batch-shaped numpyro site, or None if not possible."""
    in_axes = _vmap_in_axes(vm, args, kwargs)
    if in_axes is None:
        return None
    inner = vm.gen_fn
    build = _builder_table().get(inner._logpdf.value)
    if build is None:
        return None
    n = vm.axis_size.value
    moved = []
    for arg, axis in zip(args, in_axes):
        if axis is None:
            moved.append(arg)
            continue
        if not isinstance(axis, int) or not hasattr(arg, "shape"):
            return None
        moved.append(jnp.moveaxis(jnp.asarray(arg), axis, 0))
        n = jnp.shape(arg)[axis]
    if n is None:
        return None
    try:
        inspect.signature(build).bind(*moved)
    except TypeError:
        return None
    one = _genjax_sample_shape(
        inner, [a if ax is None else a[0] for a, ax in zip(moved, in_axes)], {}
    )
    d = build(*moved)
    if d.batch_shape == ():
        d = d.expand((n,))
    if d.batch_shape[:1] != (n,) or d.shape() != (n,) + one.shape:
        return None
    return d, jax.ShapeDtypeStruct((n,) + one.shape, one.dtype)


# ---------------------------------------------------------------------------------------
# Running a genjax @gen function with ppl_ext sample sites


class _PplExtLogpdf:
    """logpdf of a ppl_ext generative function wrapped as a genjax distribution."""

    def __init__(self, gen_fn, site, params_arg):
        self.gen_fn, self.site, self.params_arg = gen_fn, site, params_arg

    def split(self, args):
        return (args[0], args[1:]) if self.params_arg else (None, args)

    def __call__(self, value, *args, **kwargs):
        params, args = self.split(args)
        choices = {self.site: value} if self.site is not None else dict(value)
        return self.gen_fn.assess(choices, params, *args, **kwargs)


class _Run:
    """A genjax handler: runs a `@gen` function body, drawing with `px.sample`.

    Mode "assess" needs every choice in `constraints`; modes "simulate"/"generate" draw the
    unconstrained ones as ppl_ext sample sites.
    """

    def __init__(self, model: GenJAXModel, constraints, mode: str, prefix: str = ""):
        self.model, self.constraints, self.mode, self.prefix = model, constraints, mode, prefix
        self.drawn: dict[str, Array] = {}
        self.log_p = jnp.zeros(())
        self.log_drawn = jnp.zeros(())
        self.visited: set[str] = set()

    def run(self, gen_fn, args, kwargs):
        genjax = _genjax()
        genjax.core.handler_stack.append(self)
        try:
            retval = gen_fn.source.value(*args, **kwargs)
        finally:
            genjax.core.handler_stack.pop()
        return retval

    def _add(self, log_p, drawn=False):
        log_p = jnp.sum(log_p)
        self.log_p = self.log_p + log_p
        if drawn:
            self.log_drawn = self.log_drawn + log_p

    def __call__(self, addr, gen_fn, args, kwargs=None):
        genjax = _genjax()
        kwargs = kwargs or {}
        name = f"{self.prefix}{addr}"
        if addr in self.visited:
            raise ValueError(f"genjax address {name!r} is used twice.")
        self.visited.add(addr)
        constrained = addr in self.constraints
        value = genjax.core.get_choices(self.constraints[addr]) if constrained else None

        if isinstance(gen_fn, genjax.Fn):
            sub = value if constrained else {}
            if not isinstance(sub, Mapping):
                raise ValueError(f"{name!r} is a generative function call; its choices must "
                                 f"be a dict (or '{name}{SEP}...' names).")
            child = _Run(self.model, sub, self.mode, f"{name}{SEP}")
            retval = child.run(gen_fn, args, kwargs)
            self.drawn.update(child.drawn)
            self.log_p = self.log_p + child.log_p
            self.log_drawn = self.log_drawn + child.log_drawn
            return retval

        if constrained:
            log_p, retval = _assess(gen_fn, value, args, kwargs)
            self._add(log_p)
            return retval
        if self.mode == "assess":
            raise ValueError(
                f"assess needs every random choice of the genjax model; {name!r} is "
                "missing. Use generate to draw the others."
            )

        if isinstance(gen_fn, genjax.Distribution):
            logpdf = gen_fn._logpdf.value
            if isinstance(logpdf, _PplExtLogpdf):  # a ppl_ext function inside genjax
                params, inner_args = logpdf.split(args)
                trace = logpdf.gen_fn.simulate(params, *inner_args, **kwargs)
                value = trace.choices
                if logpdf.site is not None:
                    if set(value) != {logpdf.site}:
                        raise ValueError(
                            f"{name!r}: to_genjax_distribution(site={logpdf.site!r}) needs "
                            f"{logpdf.site!r} to be the only random choice, got {set(value)}."
                        )
                    value = value[logpdf.site]
                self.drawn.update(_flatten(value, name))
                self._add(trace.log_density, drawn=True)
                return value
            d, expected = _numpyro_distribution(gen_fn, args, kwargs)
        else:
            found = None
            if isinstance(gen_fn, genjax.Vmap):
                found = _vmapped_numpyro_distribution(gen_fn, args, kwargs)
            if found is None:
                raise NotImplementedError(
                    f"GenJAXModel cannot draw {name!r} ({_gf_name(gen_fn)}) inside a ppl_ext "
                    "expectation: only @gen functions, genjax distributions and Vmap/repeat "
                    "of a built-in genjax distribution become px.sample sites. Such a "
                    "model can still be assessed (e.g. be the model p of px.vi.elbo), or "
                    "constrain this address."
                )
            d, expected = found

        estimator = self.model.estimators.get(name, self.model.default_estimator)
        value = _sample(d, estimator, name=name, _plates=False)
        value = value.astype(expected.dtype) if value.dtype != expected.dtype else value
        log_p, retval = _assess(gen_fn, value, args, kwargs)
        self.drawn[name] = value
        self._add(log_p, drawn=True)
        return retval


# ---------------------------------------------------------------------------------------
# GenJAXModel


class GenJAXModel(AbstractConditionable):
    """A genjax generative function (`@genjax.gen`) as a ppl_ext generative function.

    Use it as the model or the guide of a ppl_ext objective, like `NumPyroModel`:

    - `assess(choices, params, *args)` is genjax's joint log density of `choices` and the
      `observations`;
    - `simulate(params, *args)` / `generate(constraints, params, *args)` run the `@gen`
      function body with every genjax distribution draw turned into a `px.sample` site
      (the numpyro distribution with the same law, so `normal` is reparameterised and
      `flip`/`categorical` use the score function by default; `estimators` maps
      addresses to estimators, `default_estimator` replaces the per-distribution default).
      Nested `@gen` calls are followed; `Vmap`/`repeat` of a built-in distribution
      becomes one batch-shaped site; other genjax combinators (`Scan`, `Cond`, vmapped
      `@gen` functions) can only be assessed or constrained;
    - `Trace.log_density` and the densities of drawn sites are genjax's own `logpdf`.

    **Arguments:**

    - `gen_fn`: the genjax generative function.
    - `observations`: observed choices added to every call (a dict, or a function of the
      call's `*args, **kwargs` returning one, e.g. `lambda x: {"x": x}`). genjax has no
      `obs=`: observations are constraints on addresses.
    - `params_arg`: if True, the ppl_ext `params` are passed to `gen_fn` as its first
      argument (for models with learnable parameters); by default they are ignored (the
      objective's `params` are those of the guide).
    - `estimators`, `default_estimator`: as for `NumPyroModel` (keys are flat names).

    Choices are a flat dict; nested addresses are written `"sub/z"` (nested dicts are also
    accepted as input). Example::

        @genjax.gen
        def model(x):
            z = genjax.normal(0.0, 1.0) @ "z"
            genjax.normal(z, 1.0) @ "x"

        p = px.gen.GenJAXModel(model, observations=lambda x: {"x": x})
        objective = px.vi.elbo(p, px.gen.NumPyroModel(guide))
        objective.grad(key, params, 1.3)
    """

    gen_fn: Any
    observations: Any = None
    params_arg: bool = eqx.field(static=True, default=False)
    estimators: Mapping[str, AbstractEstimator] = eqx.field(static=True, default_factory=dict)
    default_estimator: AbstractEstimator | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        genjax = _genjax()
        if not isinstance(self.gen_fn, genjax.GFI):
            raise TypeError(
                "GenJAXModel wraps a genjax generative function (@genjax.gen), got "
                f"{type(self.gen_fn).__name__}."
            )

    def _args(self, params, args):
        return (params, *args) if self.params_arg else args

    def _observed(self, args, kwargs) -> dict[str, Any]:
        obs = self.observations
        if callable(obs):
            obs = obs(*args, **kwargs)
        return _nest(obs)

    def _constraints(self, choices, args, kwargs) -> dict[str, Any]:
        observed = self._observed(args, kwargs)
        return _merge(observed, _nest(choices))

    def _run(self, constraints, mode, params, args, kwargs):
        genjax = _genjax()
        if not isinstance(self.gen_fn, genjax.Fn):
            raise NotImplementedError(
                f"GenJAXModel can {mode} only @genjax.gen functions inside a ppl_ext "
                f"expectation, not a {_gf_name(self.gen_fn)}; it can still be assessed."
            )
        run = _Run(self, constraints, mode)
        retval = run.run(self.gen_fn, self._args(params, args), kwargs)
        return run, retval

    def simulate(self, params: Mapping[str, Any] | None, *args, **kwargs) -> Trace:
        """Draw every unobserved choice; `log_density` is the joint log density of the run."""
        constraints = self._observed(args, kwargs)
        run, retval = self._run(constraints, "simulate", params, args, kwargs)
        return Trace(run.drawn, run.log_p, retval)

    def assess(self, choices, params: Mapping[str, Any] | None, *args, **kwargs) -> Array:
        """Joint log density of `choices` and the observations (genjax's `assess`)."""
        constraints = self._constraints(choices, args, kwargs)
        genjax = _genjax()
        gargs = self._args(params, args)
        if isinstance(self.gen_fn, genjax.Fn):
            run, _ = self._run(constraints, "assess", params, args, kwargs)
            return run.log_p
        log_p, _ = self.gen_fn.assess(constraints, *gargs, **kwargs)
        return jnp.sum(log_p)

    def generate(self, constraints, params: Mapping[str, Any] | None, *args, **kwargs):
        """Draw the choices not in `constraints` (or observed) from their prior.

        The weight is `log p(all choices) - log p(drawn choices | ...)`, the log density
        of the constrained and observed choices given the drawn ones.
        """
        merged = self._constraints(constraints, args, kwargs)
        run, retval = self._run(merged, "generate", params, args, kwargs)
        values = {**_flatten(_nest(constraints), ""), **run.drawn}
        return Trace(values, run.log_p, retval), run.log_p - run.log_drawn


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Merge nested choice maps, `b` taking precedence."""
    out = dict(a)
    for name, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(name), Mapping):
            out[name] = _merge(out[name], value)
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------
# ppl_ext generative functions as genjax distributions


def _draw_numpyro(gen_fn: NumPyroModel, key, params, args, kwargs) -> dict[str, Array]:
    fn = handlers.substitute(gen_fn.fn, data=dict(params or {}))
    trace = handlers.trace(handlers.seed(fn, rng_seed=key)).get_trace(*args, **kwargs)
    return {
        name: site["value"]
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def _keyful_sampler(logpdf: _PplExtLogpdf):
    gen_fn, site = logpdf.gen_fn, logpdf.site

    def one(key, args, kwargs):
        params, args = logpdf.split(args)
        choices = _draw_numpyro(gen_fn, key, params, args, kwargs)
        return choices if site is None else choices[site]

    def sampler(key, *args, sample_shape=(), **kwargs):
        if not sample_shape:
            return one(key, args, kwargs)
        keys = jax.random.split(key, math.prod(sample_shape))
        draws = jax.vmap(lambda k: one(k, args, kwargs))(keys)
        return jax.tree.map(lambda v: v.reshape(tuple(sample_shape) + v.shape[1:]), draws)

    return sampler


def to_genjax_distribution(
    gen_fn: AbstractGenerativeFunction,
    *,
    site: str | None = None,
    params_arg: bool = False,
    name: str | None = None,
):
    """A ppl_ext generative function as a genjax `Distribution` (for `@` in `@gen` code).

    The distribution's value is the dict of `gen_fn`'s random choices, or the value of
    the choice `site` if given (then `gen_fn` must have no other random choice). Its arguments are `gen_fn`'s arguments (`params` is
    None), or `(params, *args)` with `params_arg=True`. Its `logpdf` is
    `gen_fn.assess(choices, params, *args)`, so a NumPyro model with observed sites gives
    an unnormalised density (the joint); use models without observations.

    Sampling (genjax `simulate`, under `genjax.seed`) runs the NumPyro model with
    `numpyro.handlers.seed` on genjax's key; it is available for `NumPyroModel` only
    (other ppl_ext generative functions draw through `px.sample` inside an expectation,
    so they can be assessed/constrained in genjax but not simulated). Inside a
    `GenJAXModel` run within a ppl_ext expectation the wrapped function is simulated
    with its own `px.sample` sites and estimators.

    Example::

        def prior():
            numpyro.sample("z", dist.Normal(0.0, 1.0))

        z_dist = px.gen.to_genjax_distribution(px.gen.NumPyroModel(prior), site="z")

        @genjax.gen
        def model():
            z = z_dist() @ "z"
            return genjax.normal(z, 1.0) @ "x"
    """
    genjax = _genjax()
    if not isinstance(gen_fn, AbstractGenerativeFunction):
        raise TypeError(
            "to_genjax_distribution expects a ppl_ext generative function "
            f"(e.g. px.gen.NumPyroModel), got {type(gen_fn).__name__}."
        )
    logpdf = _PplExtLogpdf(gen_fn, site, params_arg)
    label = name or getattr(getattr(gen_fn, "fn", None), "__name__", type(gen_fn).__name__)
    if isinstance(gen_fn, NumPyroModel):
        sampler = genjax.pjax.wrap_sampler(_keyful_sampler(logpdf), name=label)
    else:

        def sampler(*args, **kwargs):
            raise NotImplementedError(
                f"genjax cannot simulate the ppl_ext {type(gen_fn).__name__} {label!r}: "
                "only NumPyroModel can be sampled outside a ppl_ext expectation (its "
                "other sites are px.sample sites). Constrain it (assess/generate), or use "
                "it inside a GenJAXModel within a ppl_ext objective."
            )

    return genjax.Distribution(genjax.const(sampler), genjax.const(logpdf), genjax.const(label))
