"""Dependency-graph Rao-Blackwellisation of top-level score-function sites.

A score-function site `s` contributes `(y - b) · d log q(x_s)` to the tangent, `y` the
program's final value. Any part `R_s` of `y` that is a function of values that do not
depend on `x_s` (the parameters, earlier sites, later sites whose laws do not depend on
`x_s`) has `E[R_s · d log q(x_s)] = 0` (marginalise the sites downstream of `s` out; the
remaining joint factorises with `q(x_s | its parents)`, and the score of a law has mean
zero), so `(y - R_s - b) · d log q(x_s)` is unbiased too, with lower variance when `R_s`
is the sum of the additive terms of `y` that do not depend on `x_s`. NumPyro's
`TraceGraph_ELBO` does the same with the cost terms downstream of each site.

This module decides it on the traced (top-level) jaxpr, with the analysis engine
(`_analysis.py`):

- **Taint** (`_Taint`): the set of top-level sample sites every variable depends on. A
  sample site's output depends on its parameter operands and on itself; every other
  primitive's outputs depend on all its operands; a call (jit, closed_call, checkpoint,
  custom_jvp/custom_vjp bodies) is followed into its body and a scan's body is iterated
  to a fixpoint (the engine's structural rules); every other body-carrying construct
  (cond, while, nested expectations, unknown primitives) is opaque: each output depends
  on every operand (so a cond's outputs depend on its predicate).
- **Linear region** (`Plan`): from each output backwards through top-level equations
  that are (multi)linear in some operands: add, sub, neg, mul (bilinear), div (in the
  numerator, by a divisor that depends on no site), reduce_sum, broadcasts, reshapes,
  transposes, float-to-float conversions, concatenation. The operands where the region
  stops are its *leaves*; an operand in a non-linear position (a divisor) must depend on
  no site, or the equation's output is a leaf itself.
- **Remainder**: `R_s` is the region re-evaluated with every leaf that depends on `s`
  replaced by zeros. Being multilinear, this is exactly the sum of the product terms of
  `y` that do not involve a leaf depending on `s`.

Soundness does not rest on the algebra: `R_s` is computed only from literals, leaves
whose taint excludes `s` and divisors whose taint is empty, so it is a function of values
that do not depend on `x_s`, whatever the region's equations are; the algebra only
decides how much variance is removed. A site whose every leaf depends on it gets `R_s`
= the region at zeros (constant offsets only); the whole value when there is no region.

What is left to the whole-value multiplier `sg(y)` (today's rule): sites inside bodies
(loops, conds, calls, nested expectations: they run in other scopes), sites with a
baseline (a baseline `b` is documented as a baseline for the whole value `y`), and every
site scored before a continuation estimator or a plate group takes over the rest of the
program (the interpreter then has no top-level values to form `R_s` from).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.extend.core import primitives as _prims

from ._analysis import Analysis
from ._primitives import sample_p

#: Largest (number of sites) x (region equations) re-evaluated at the end of a program:
#: each site's `R_s` re-evaluates the linear region, so the work (and compile time) grows
#: as their product. Beyond it the program keeps the whole-value multiplier (unbiased,
#: more variance): 100 score-function sites summed in a 100-term objective would
#: otherwise triple the compile time and cost 20% run time (benchmarks/bench_adev.py).
MAX_WORK = 4_000


class _Taint(Analysis):
    """Which top-level sample sites (by equation index) each variable depends on."""

    structural = frozenset({"call", "scan"})
    height = 64

    def __init__(self, seeds: dict[int, int]):
        self.seeds = seeds  # {id(top-level sample eqn): its equation index}

    def literal(self, value):
        return frozenset()

    def join(self, a, b):
        return a | b

    def _all(self, eqn, ins):
        union = frozenset().union(*ins) if ins else frozenset()
        return [union] * len(eqn.outvars)

    def shortcut(self, eqn, ins):
        if eqn.primitive is sample_p:
            union = frozenset().union(*ins) if ins else frozenset()
            index = self.seeds.get(id(eqn))
            return [union | {index}] if index is not None else [union]
        return None

    def default(self, eqn, ins):
        return self._all(eqn, ins)

    def opaque(self, eqn, ins):
        return self._all(eqn, ins)


def _float(aval) -> bool:
    return jnp.issubdtype(getattr(aval, "dtype", jnp.int32), jnp.inexact)


def _linear_positions(eqn) -> tuple[int, ...] | None:
    """The operand positions in which `eqn` is linear, or None (not a region equation)."""
    p = eqn.primitive
    n = len(eqn.invars)
    if not all(_float(v.aval) for v in eqn.outvars):
        return None
    if p in _ALL_LINEAR:
        return tuple(range(n))
    if p in _UNARY_LINEAR:
        return (0,) if n == 1 else None
    if p is _prims.div_p and n == 2:
        return (0,)
    if p is _prims.convert_element_type_p and n == 1 and _float(eqn.invars[0].aval):
        return (0,)
    return None


_ALL_LINEAR = {_prims.add_p, _prims.sub_p, _prims.mul_p, _prims.concatenate_p}
_UNARY_LINEAR = {_prims.neg_p, _prims.reduce_sum_p, _prims.broadcast_in_dim_p,
                 _prims.reshape_p, _prims.squeeze_p, _prims.transpose_p, _prims.copy_p}
try:
    from jax._src.ad_util import add_jaxvals_p

    _ALL_LINEAR.add(add_jaxvals_p)
except ImportError:  # pragma: no cover
    pass
try:
    _UNARY_LINEAR.add(_prims.expand_dims_p)  # pragma: no cover - absent in most versions
except AttributeError:
    pass


class Plan(NamedTuple):
    """How the end of a top-level program forms each site's remainder `R_s`."""

    sites: frozenset[int]  # equation indexes of top-level sample sites that may be scored
    record: tuple[Any, ...]  # top-level variables whose values the remainders read
    region: tuple[Any, ...]  # the region's equations, in program order
    outvars: tuple[Any, ...]  # the program's outputs (variables or literals)
    zeroed: dict[int, frozenset]  # per site: the recorded leaves that depend on it

    def remainders(self, values: list[Any], sites) -> dict[int, list[Any]]:
        """`{site: [R_s per output]}` from the recorded values (stop-gradiented)."""
        base = {var: lax.stop_gradient(val)
                for var, val in zip(self.record, values, strict=True)}
        cache: dict[frozenset, list[Any]] = {}
        result = {}
        for site in sites:
            zero = self.zeroed[site]
            if zero not in cache:
                env = dict(base)
                for var in zero:
                    env[var] = jnp.zeros_like(env[var])
                for eqn in self.region:
                    ins = [a.val if isinstance(a, core.Literal) else env[a]
                           for a in eqn.invars]
                    params = eqn.primitive.get_bind_params(eqn.params)
                    outs = eqn.primitive.bind(*ins, **params)
                    if not eqn.primitive.multiple_results:
                        outs = [outs]
                    env.update(zip(eqn.outvars, outs, strict=True))
                cache[zero] = [a.val if isinstance(a, core.Literal) else env[a]
                               for a in self.outvars]
            result[site] = cache[zero]
        return result


@functools.lru_cache(maxsize=2048)
def plan(jaxpr: core.Jaxpr) -> Plan | None:
    """The Rao-Blackwellisation plan of a top-level program, or None (whole value)."""
    seeds = {id(eqn): i for i, eqn in enumerate(jaxpr.eqns)
             if eqn.primitive is sample_p and not eqn.params["continuation"]
             and not eqn.params["pathwise"]}  # the local score-function candidates
    if not seeds:
        return None
    taint = _Taint(seeds)
    env = taint.env(jaxpr, [frozenset()] * len(jaxpr.constvars),
                    [frozenset()] * len(jaxpr.invars))

    def taint_of(atom):
        return frozenset() if isinstance(atom, core.Literal) else env[atom]

    producer = {}
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            producer[var] = eqn
    region_eqns: set[int] = set()
    leaves: set = set()
    fixed: set = set()
    stack = [v for v in jaxpr.outvars if not isinstance(v, core.Literal)]
    seen: set = set()
    while stack:
        var = stack.pop()
        if var in seen:
            continue
        seen.add(var)
        eqn = producer.get(var)
        positions = None if eqn is None else _linear_positions(eqn)
        if positions is not None and any(
                taint_of(a) for i, a in enumerate(eqn.invars) if i not in positions):
            positions = None  # a non-linear operand depends on a site: a leaf
        if positions is None:
            leaves.add(var)
            continue
        region_eqns.add(id(eqn))
        for i, atom in enumerate(eqn.invars):
            if isinstance(atom, core.Literal):
                continue
            if i in positions:
                stack.append(atom)
            else:
                fixed.add(atom)
    region = tuple(e for e in jaxpr.eqns if id(e) in region_eqns)
    if len(seeds) * max(len(region), 1) > MAX_WORK:
        return None
    record = tuple(sorted(leaves | fixed, key=lambda v: _order(jaxpr, v)))
    zeroed = {i: frozenset(v for v in leaves if i in env[v]) for i in seeds.values()}
    # a site no leaf depends on has R_s = y: its score multiplies 0 (the output does not
    # depend on its draw at all); such a site is scored with 0 by the interpreter
    return Plan(frozenset(seeds.values()), record, region, tuple(jaxpr.outvars), zeroed)


def _order(jaxpr, var) -> tuple[int, int]:
    # deterministic order of recorded variables (by first definition)
    table = _definition_order(jaxpr)
    return table.get(var, (len(jaxpr.eqns) + 1, 0))


@functools.lru_cache(maxsize=256)
def _definition_order(jaxpr) -> dict:
    table = {}
    for i, var in enumerate([*jaxpr.constvars, *jaxpr.invars]):
        table[var] = (-1, i)
    for i, eqn in enumerate(jaxpr.eqns):
        for j, var in enumerate(eqn.outvars):
            table[var] = (i, j)
    return table

