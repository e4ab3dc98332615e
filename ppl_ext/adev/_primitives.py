"""The `sample` primitive and the nested-expectation primitive.

`px.sample` binds `sample_p` so that sample sites survive tracing into a jaxpr (also inside
`scan`, `cond`, `while_loop` and nested `jit`). The site's distribution and estimator are
flattened into the primitive's operands (so traced parameters and baselines flow through)
and their tree structure is a static parameter, as are the estimator's class-level flags
(`continuation`, `pathwise`) and `continuity` (whether the continuity check judges the
site: `AbstractEstimator.checks_continuity`). Only the interpreter in `_interpreter.py`
gives the primitive a meaning; binding it anywhere else is an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
import numpyro.primitives as numpyro_primitives
from jax.interpreters import batching, mlir
from jax.extend import core

from ._errors import (
    OutsideExpectationError,
    UnsupportedEstimatorError,
    UnsupportedPrimitiveError,
)
from ._estimators import AbstractEstimator, default_estimator, reparam

_TRACING = contextvars.ContextVar("ppl_ext_tracing_expectation", default=0)


@contextlib.contextmanager
def tracing_expectation():
    """Mark the dynamic extent in which a program is traced for an expectation."""
    token = _TRACING.set(_TRACING.get() + 1)
    try:
        yield
    finally:
        _TRACING.reset(token)


def inside_expectation() -> bool:
    """Whether we are tracing the body of an expectation program."""
    return _TRACING.get() > 0


def _outside(name: str):
    def rule(*args, **params):
        raise OutsideExpectationError(
            f"{params.get('label', name)} was evaluated outside an expectation. px.sample "
            "and nested expectations only have a meaning inside a function transformed "
            "by px.expectation; call that function as f(key, *args)."
        )

    return rule


sample_p = core.Primitive("ppl_ext_sample")
sample_p.def_abstract_eval(lambda *leaves, out_aval, **_: out_aval)
sample_p.def_impl(_outside("px.sample"))
mlir.register_lowering(sample_p, _outside("px.sample"))


def _vmapped_sites_error(label: str, why: str) -> UnsupportedPrimitiveError:
    return UnsupportedPrimitiveError(
        f"{label} is inside jax.vmap within the expectation program, and {why}. Draw "
        "vectorised independent values with a batch-shaped distribution instead "
        "(`d.expand((n,))` or a numpyro plate), or vmap the whole expectation from outside."
    )


def _batch_sample(axis_data, vals, dims, *, tree, label, name=None, **params):
    """`jax.vmap` of a site: one independent draw per mapped element, as a plate would.

    The vmapped site becomes one batch-shaped site whose new leading batch axis is the
    mapped axis: `d.expand((size,) + d.batch_shape)` when the distribution does not depend
    on the mapped values, otherwise the distribution rebuilt from the batched parameters
    (numpyro's `promote_batch_shape`). Each element then gets its own draw (never one
    draw repeated), and the estimator treats the elements as a plate's.
    """
    size = axis_data.size
    distribution, estimator = jax.tree.unflatten(tree, vals)
    num_dist = len(jax.tree.leaves(distribution))
    if any(d is not None for d in dims[num_dist:]):
        raise _vmapped_sites_error(label, "its estimator's state (a baseline) is batched")
    if all(d is None for d in dims[:num_dist]):
        batched = distribution.expand((size,) + tuple(distribution.batch_shape))
    else:
        from numpyro.distributions.batch_util import promote_batch_shape

        leaves, dist_tree = jax.tree.flatten(distribution)
        leaves = [
            jnp.broadcast_to(x, (size,) + jnp.shape(x)) if d is None else jnp.moveaxis(x, d, 0)
            for x, d in zip(leaves, dims[:num_dist])
        ]
        try:
            batched = promote_batch_shape(jax.tree.unflatten(dist_tree, leaves))
        except Exception as error:  # noqa: BLE001 - any failure: refuse by name
            raise _vmapped_sites_error(
                label, f"its {type(distribution).__name__} parameters are batched, which "
                f"numpyro cannot re-batch ({type(error).__name__}: {error})") from None
        if tuple(batched.batch_shape[:1]) != (size,):
            raise _vmapped_sites_error(
                label, f"its batched {type(distribution).__name__} has batch shape "
                f"{batched.batch_shape}, not one led by the mapped axis ({size})")
    return _bind_site(batched, estimator, label, name), 0


def _batch_nested(axis_data, vals, dims, *, jaxpr, label):
    """`jax.vmap` of a nested expectation: one independent estimate per mapped element."""
    size = axis_data.size

    def body(_, *args):
        return jax.core.eval_jaxpr(jaxpr, [], *args)

    with tracing_expectation():
        closed = jax.make_jaxpr(
            jax.vmap(body, in_axes=(0, *dims), out_axes=0, axis_size=size)
        )(jnp.arange(size), *vals)
    from jax._src.interpreters import partial_eval as pe

    batched = pe.convert_constvars_jaxpr(closed.jaxpr)
    outs = nested_p.bind(*closed.consts, jnp.arange(size), *vals, jaxpr=batched, label=label)
    return outs, [0] * len(outs)


def _refuse_jvp(primals, tangents, **params):
    raise UnsupportedPrimitiveError(
        f"{params['label']} is differentiated inside the expectation program (jax.grad or "
        "jax.jvp inside the program). Differentiate the expectation from outside: "
        "jax.grad(f, argnums=1)(key, theta) or f.grad(key, theta)."
    )


batching.fancy_primitive_batchers[sample_p] = _batch_sample
jax.interpreters.ad.primitive_jvps[sample_p] = _refuse_jvp


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_location() -> str:
    """`file:line (function)` of the innermost caller outside ppl_ext, jax and numpyro."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_PACKAGE_DIR) or f"{os.sep}jax{os.sep}" in name
                or f"{os.sep}numpyro{os.sep}" in name):
            return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "unknown location"


def _site_label(name: str | None, distribution, estimator) -> str:
    where = _user_location()
    named = f" {name!r}" if name is not None else ""
    return (
        f"sample site{named} ({type(distribution).__name__}, estimator "
        f"{type(estimator).__name__}, at {where})"
    )


def sample(
    distribution: dist.Distribution,
    estimator: AbstractEstimator | None = None,
    *,
    name: str | None = None,
    _plates: bool = True,
) -> jax.Array:
    """Draw a random choice inside an expectation program.

    **Arguments:**

    - `distribution`: a numpyro distribution; a batch-shaped one is one site drawing
      independent values (use `.expand((n,))` or an enclosing `numpyro.plate` for
      vectorised iid draws). If it was built with `validate_args=True` (or numpyro's
      validation is enabled), its parameters are also checked at run time, so invalid
      traced parameters raise an error naming the site instead of giving NaN.
    - `estimator`: how this site's gradient is estimated: `px.reparam`, `px.reinforce`,
      `px.Reinforce(baseline=b)`, `px.enum`, `px.mvd` or `px.LeaveOneOut(n)`. The default is
      `px.reparam` if the distribution has `rsample`, else `px.reinforce`. A `Delta` site
      (as autoguides emit) has no randomness and is always pathwise, whatever is chosen.
      Score-function estimators refuse a support that moves with the program's inputs
      (`Uniform(0, theta)`, such a bound under a transform, wrapper or mixture, an
      `AffineTransform(0, theta)` of a bounded base): their gradient would miss the
      boundary term; and a point mass with a traced location inside the distribution's
      tree. A `Reinforce` baseline may be a scalar or, for a plate-batched site, an array
      of shape `(n,)` (one per element; a scalar is refused there).
    - `name`: optional, used in error messages.

    **Returns:** the drawn value, shaped `distribution.shape()`. Its randomness comes from
    the key of the enclosing expectation: each site and each loop iteration gets its own.

    Example:
        >>> import jax, ppl_ext as px, numpyro.distributions as dist
        >>> @px.expectation
        ... def f(theta):
        ...     return px.sample(dist.Normal(theta, 1.0)) ** 2
        >>> float(f.grad(jax.random.key(0), 0.0)) == float(f.grad(jax.random.key(0), 0.0))
        True
    """
    if not isinstance(distribution, dist.Distribution):
        raise TypeError(
            f"px.sample expects a numpyro distribution, got {type(distribution).__name__}."
        )
    if estimator is None:
        estimator = default_estimator(distribution)
    if not isinstance(estimator, AbstractEstimator):
        raise TypeError(
            f"estimator= must be a ppl_ext estimator (px.reparam, px.reinforce, px.enum, "
            f"px.mvd, px.Reinforce(...), px.LeaveOneOut(n)), got {estimator!r}."
        )
    if _point_mass(distribution) and not estimator.pathwise:
        # No randomness to estimate: the value is a function of earlier draws and the
        # parameters, and only the pathwise derivative passes its dependence on them on
        # (a score function would silently drop it).
        estimator = reparam
    label = _site_label(name, distribution, estimator)
    if _plates:
        distribution = _apply_plates(distribution, label)
    return _bind_site(distribution, estimator, label, name)


def _bind_site(
    distribution: dist.Distribution, estimator: AbstractEstimator, label: str,
    name: str | None = None,
):
    """Bind `sample_p` for a checked site: everything the interpreter needs is a parameter."""
    estimator.check(distribution, label)
    leaves, tree = jax.tree.flatten((distribution, estimator))
    shape = jax.eval_shape(distribution.sample, jax.random.key(0))
    out_aval = jax.core.ShapedArray(shape.shape, shape.dtype)
    return sample_p.bind(
        *leaves,
        tree=tree,
        out_aval=out_aval,
        continuation=estimator.continuation,
        pathwise=bool(estimator.pathwise),
        continuity=estimator.checks_continuity(),
        checks=_runtime_checks(distribution, leaves),
        label=label,
        name=name,
    )


class ById:
    """A hashable handle on an object, compared by identity (for primitive parameters).

    numpyro's constraints define `__eq__` without `__hash__`, so they cannot be primitive
    parameters themselves; the handle carries one explicitly, with no registry.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, ById) and other.value is self.value

    def __repr__(self):
        return f"ById({self.value!r})"


class Check(NamedTuple):
    """A run-time check of one traced parameter of a site (numpyro `validate_args`).

    `index` is the parameter's position among the site's flattened operands, or -1 when
    the parameter is not itself an operand (it is then read from the distribution, `depth`
    `base_dist` steps down); `name` is the parameter's name and `constraint` a `ById`.
    """

    index: int
    name: str
    depth: int
    constraint: ById


def _point_mass(distribution) -> bool:
    """Whether `distribution` is a `Delta`, possibly wrapped (expanded, independent, masked,
    transformed: a function of a point mass is one)."""
    while isinstance(distribution, dist.Distribution):
        if isinstance(distribution, dist.Delta):
            return True
        distribution = getattr(distribution, "base_dist", None)
    return False


#: Constraints that only say "finite": a NaN/inf parameter is already NaN upstream.
_FINITENESS = (constraints.real, constraints.real_vector, constraints.real_matrix)


def _runtime_checks(distribution: dist.Distribution, leaves, depth: int = 0) -> tuple:
    """The `Check`s of traced parameters to verify at run time.

    numpyro checks concrete parameters when the distribution is built (if its
    `validate_args` is on) and skips traced ones; ppl_ext checks those at run time, unless
    the program guarantees them (`_signs.py`). Only constraints beyond finiteness count.
    """
    checks = []
    base = getattr(distribution, "base_dist", None)  # Expanded, Independent, Masked, ...
    if isinstance(base, dist.Distribution):
        checks += _runtime_checks(base, leaves, depth + 1)
    if not distribution._validate_args:
        return tuple(checks)
    for name, constraint in distribution.arg_constraints.items():
        if any(constraint is c for c in _FINITENESS) or constraints.is_dependent(constraint):
            continue
        value = distribution.__dict__.get(name)
        if not isinstance(value, jax.core.Tracer):
            continue
        index = next((i for i, leaf in enumerate(leaves) if leaf is value), -1)
        checks.append(Check(index, name, depth, ById(constraint)))
    return tuple(checks)


def _apply_plates(distribution: dist.Distribution, label: str) -> dist.Distribution:
    """Broadcast the site over enclosing `numpyro.plate`s, as `numpyro.sample` would."""
    plates = [h for h in numpyro_primitives._PYRO_STACK if isinstance(h, numpyro.plate)]
    if not plates:
        return distribution
    msg = {"type": "sample", "name": label, "fn": distribution, "args": (), "kwargs": {},
           "value": None, "scale": None, "cond_indep_stack": [], "infer": {}}
    for handler in reversed(plates):
        handler.process_message(msg)
    if msg["scale"] is not None and msg["scale"] != 1.0:
        raise UnsupportedEstimatorError(
            f"{label} is inside a subsampled numpyro.plate; px.sample does not rescale. "
            "Use a plate without subsample_size and scale the objective yourself."
        )
    return msg["fn"]


def _nested_abstract(*args, jaxpr, **_):
    return [v.aval for v in jaxpr.outvars]


nested_p = core.Primitive("ppl_ext_expectation")
nested_p.multiple_results = True
nested_p.def_abstract_eval(_nested_abstract)
nested_p.def_impl(_outside("nested expectation"))
mlir.register_lowering(nested_p, _outside("nested expectation"))


batching.fancy_primitive_batchers[nested_p] = _batch_nested
jax.interpreters.ad.primitive_jvps[nested_p] = _refuse_jvp


def bind_nested(jaxpr: Any, args: list[Any], label: str) -> list[Any]:
    """Bind a nested expectation (its jaxpr takes constants first, then arguments)."""
    return nested_p.bind(*args, jaxpr=jaxpr, label=label)
