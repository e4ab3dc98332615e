"""One engine for the static analyses of traced programs (jaxprs).

ppl_ext judges a traced expectation program before running it: whether reparameterised
draws reach a discontinuity (`_continuity.py`), which parameter constraints the program
guarantees (`_signs.py`), whether the rest of a program is a sum of per-element terms of a
plate (`_separable.py`), and where the sample sites are (the site predicates below, used by
the interpreter). Each is an abstract interpretation of the jaxpr: a value of the
analysis' own domain per variable, computed equation by equation. This module is the part
they share, in the style of JAX's own rule tables (`jax.experimental.jet`'s
`jet_rules`, `jax._src.interpreters.ad.primitive_jvps`) and oryx's `propagate`:

- `Analysis`: a subclass gives a domain (`literal`, `const`, `join`, `same`) and a rule
  table `rules: {primitive: rule(analysis, eqn, ins) -> outs}` keyed by primitive
  *objects* (never by name strings: names change between JAX versions, e.g. checkpoint is
  `remat2`, closed_call is `eval_jaxpr`); `default(eqn, ins)` covers primitives without a
  rule and without a sub-jaxpr, `opaque(eqn, ins)` primitives that carry a sub-jaxpr the
  analysis does not go into. `run(jaxpr, consts, args)` is the engine.
- `STRUCTURE`: how the primitives that carry sub-jaxprs use them, keyed by primitive
  object: `call` (the body is applied once to the operands: jit, eval_jaxpr/closed_call,
  checkpoint/remat, custom_jvp_call/custom_vjp_call bodies, custom_vmap, composite,
  shard_map), `branch` (cond/switch: one branch runs, the results are joined), `scan` and
  `while` (fixpoints over the carries), `fold` (reduce / reduce_window: the computation is
  applied repeatedly to an accumulator), `scatter` (the update computation of
  scatter-add, `.at[].apply`, ...). The engine applies these generic rules for an analysis
  whose `follows(structure)` says so (`follow(eqn, ins)` applies one explicitly), with
  hooks for what the analysis checks on the way (`branch_index`, `loop_predicate`,
  `scatter_indices`). Every other primitive that carries a jaxpr
  (custom_linear_solve, select_and_scatter, pallas, run_state, ...) has no structure and
  goes to the analysis' `opaque`, which must answer conservatively, and so does a
  primitive that runs a Python callable (`pure_callback`); `carries_code` detects them
  generically, so a primitive that JAX adds later is covered too.
- `sub_jaxprs`, `closed`: the one sub-jaxpr helper (a jaxpr in a parameter, a tuple or a
  named tuple of them, with or without attached constants).
- site predicates `has_sites`, `first_continuation_site`, `slots` (which equations consume
  randomness).
- `support_check_p`: an identity on a boolean mask that records which constraint the mask
  checks and on which value (numpyro's `validate_args` support checks, marked while an
  expectation is traced, see `_numpyro_fixes.py`); `transform_p`: an identity on the
  output `y` of a numpyro transform applied to `x` that records the transform's domain and
  codomain (`y = T(x)` lies in the codomain when `x` lies in the domain; for `T`'s inverse
  the other way round). They compute nothing; the continuity check reads them
  (`_continuity.py`), and the other analyses treat them as the identity on their first
  operand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
from jax.extend import core
from jax.extend.core import primitives as _prims
from jax._src.interpreters import batching
from jax._src.interpreters import ad
from jax.interpreters import mlir

# ------------------------------------------------------------------------- sub-jaxprs


def sub_jaxprs(params: dict[str, Any]) -> Iterator[core.Jaxpr]:
    """Every jaxpr in an equation's parameters (also inside tuples, lists, named tuples)."""
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, core.Jaxpr):
                yield item
            elif isinstance(item, core.ClosedJaxpr):  # an alias of Jaxpr in jax >= 0.11
                yield item.jaxpr


def closed(value) -> tuple[core.Jaxpr, list[Any]]:
    """`(jaxpr, consts)`: its constant inputs come first and take `consts`."""
    consts = list(getattr(value, "consts", ()) or ())
    jaxpr = value.jaxpr if hasattr(value, "jaxpr") else value
    return jaxpr, consts


def carries_jaxpr(eqn) -> bool:
    """Whether an equation has a sub-jaxpr in its parameters."""
    return next(sub_jaxprs(eqn.params), None) is not None


def carries_code(eqn) -> bool:
    """Whether an equation runs code that is not a primitive of the jaxpr: a sub-jaxpr, or a
    Python callable in its parameters (`pure_callback`, `io_callback`, ...). Analyses
    cannot see inside such code unless a rule or a `Structure` says how it is used."""
    if carries_jaxpr(eqn):
        return True
    return any(callable(v) and not isinstance(v, type) for v in eqn.params.values())


# ------------------------------------------------------------------- site predicates


@functools.cache
def _site_primitives():
    from ._primitives import nested_p, sample_p  # late: _primitives imports the estimators

    return sample_p, nested_p


@functools.lru_cache(maxsize=8192)
def has_sites(jaxpr: core.Jaxpr) -> bool:
    """Whether `jaxpr` draws randomness (sample sites or nested expectations), recursively."""
    return any(eqn_has_sites(eqn) for eqn in jaxpr.eqns)


def eqn_has_sites(eqn) -> bool:
    """Whether one equation draws randomness (it is a site, or has sites inside)."""
    if eqn.primitive in _site_primitives():
        return True
    return any(has_sites(j) for j in sub_jaxprs(eqn.params))


@functools.lru_cache(maxsize=8192)
def first_continuation_site(jaxpr: core.Jaxpr) -> str | None:
    """Label of the first continuation-estimator site in `jaxpr` (nested expectations too)."""
    sample_p, _ = _site_primitives()
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p and eqn.params["continuation"]:
            return eqn.params["label"]
        for sub in sub_jaxprs(eqn.params):
            found = first_continuation_site(sub)
            if found is not None:
                return found
    return None


@functools.lru_cache(maxsize=8192)
def slots(jaxpr: core.Jaxpr) -> dict[int, int]:
    """`{equation index: key slot}` for the equations of `jaxpr` that consume randomness."""
    result: dict[int, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn_has_sites(eqn):
            result[i] = len(result)
    return result


_slots = slots  # the interpreter's historical names
_sub_jaxprs = sub_jaxprs
_eqn_has_sites = eqn_has_sites


# -------------------------------------------------------------------------- structure


class Structure(NamedTuple):
    """How a primitive uses its sub-jaxpr(s) (see the module docstring)."""

    kind: str  # "call", "branch", "scan", "while", "fold", "scatter"
    param: str | None = None  # the parameter holding the body (call, fold, scatter)
    same_shapes: bool = True  # call: the body sees the operands' shapes (not per shard)


STRUCTURE: dict[Any, Structure] = {}


def _register_structure():
    call = [
        (_prims.jit_p, "jaxpr"),
        (_prims.closed_call_p, "call_jaxpr"),  # eval_jaxpr (also call_p) in jax >= 0.11
        (_prims.call_p, "call_jaxpr"),
        (_prims.remat_p, "jaxpr"),  # jax.checkpoint ("remat2")
        (_prims.custom_jvp_call_p, "call_jaxpr"),
        (_prims.custom_vjp_call_p, "call_jaxpr"),
    ]
    for prim, param in call:
        STRUCTURE[prim] = Structure("call", param)
    try:  # private locations: absent ones are simply not followed (conservative)
        from jax._src.custom_batching import custom_vmap_p

        STRUCTURE[custom_vmap_p] = Structure("call", "call")
    except ImportError:  # pragma: no cover
        pass
    try:
        from jax._src.lax.lax import composite_p

        STRUCTURE[composite_p] = Structure("call", "call_jaxpr")
    except ImportError:  # pragma: no cover
        pass
    try:
        from jax._src.shard_map import shard_map_p

        # the body sees one shard of each operand; elementwise analyses may follow it
        STRUCTURE[shard_map_p] = Structure("call", "jaxpr", same_shapes=False)
    except ImportError:  # pragma: no cover
        pass
    STRUCTURE[_prims.cond_p] = Structure("branch")
    STRUCTURE[_prims.scan_p] = Structure("scan", "jaxpr")
    STRUCTURE[_prims.while_p] = Structure("while")
    STRUCTURE[_prims.reduce_p] = Structure("fold", "jaxpr")
    STRUCTURE[_prims.reduce_window_p] = Structure("fold", "jaxpr")
    for prim in (_prims.scatter_p, _prims.scatter_add_p, _prims.scatter_mul_p,
                 _prims.scatter_min_p, _prims.scatter_max_p):
        STRUCTURE[prim] = Structure("scatter", "update_jaxpr")
    try:
        from jax._src.lax.slicing import scatter_sub_p

        STRUCTURE[scatter_sub_p] = Structure("scatter", "update_jaxpr")
    except ImportError:  # pragma: no cover
        pass


_register_structure()


def _num_leaves(tree) -> int:
    try:
        return len(tree)  # a jax FlatTree: its number of leaves
    except TypeError:
        return len(jax.tree.leaves(tree, is_leaf=lambda x: x is None))


def scan_layout(eqn) -> tuple[int, int] | None:
    """`(num_consts, num_carry)` of a scan equation, or None if its parameters are unknown."""
    params = eqn.params
    if "ft_in" in params:
        elts = params["ft_in"].elts
        counts = [_num_leaves(e) for e in elts]
        if len(counts) != 3 or sum(counts) != len(eqn.invars):
            return None
        return counts[0], counts[1]
    if "num_consts" in params and "num_carry" in params:
        return params["num_consts"], params["num_carry"]
    return None


# ----------------------------------------------------------------------------- engine


class NoFixpoint(Exception):
    """A loop's abstract carries did not converge within the analysis' bound."""


class Analysis:
    """An abstract interpretation of jaxprs (see the module docstring).

    Subclasses define the domain and `rules`; the engine (`run`, `eqn`) and the generic
    structural rules are shared. Values are whatever the subclass uses, one per variable.
    """

    #: {primitive object: rule(analysis, eqn, ins) -> list of outs}
    rules: dict[Any, Callable[..., list[Any]]] = {}
    #: which structures the engine follows for this analysis
    structural: frozenset[str] = frozenset({"call", "branch", "scan", "while", "fold",
                                            "scatter"})
    #: a bound on how often one abstract value can grow (its lattice height): a loop's
    #: fixpoint may take `height * (number of carries + 1)` rounds (more: `opaque`)
    height: int = 16

    # -- domain (subclasses override)

    def literal(self, value) -> Any:
        """The abstract value of a literal (a concrete constant)."""
        raise NotImplementedError

    def const(self, value) -> Any:
        """The abstract value of a closed jaxpr's constant."""
        return self.literal(value)

    def join(self, a, b) -> Any:
        """The least value above both (for branches and loop carries)."""
        raise NotImplementedError

    def same(self, a, b) -> bool:
        """Whether two values are equal (fixpoint convergence)."""
        return a == b

    def default(self, eqn, ins: list[Any]) -> list[Any]:
        """A primitive without a rule and without a sub-jaxpr."""
        raise NotImplementedError

    def opaque(self, eqn, ins: list[Any]) -> list[Any]:
        """A primitive with a sub-jaxpr that this analysis does not go into: conservative."""
        raise NotImplementedError

    def follows(self, structure: Structure) -> bool:
        return structure.kind in self.structural

    # -- hooks of the structural rules (defaults do nothing)

    def branch_index(self, eqn, index) -> None:
        """Called with the value of a cond's branch index."""

    def loop_predicate(self, eqn, predicate) -> None:
        """Called with the value of a while loop's predicate (at the fixpoint)."""

    def scatter_indices(self, eqn, outs: list[Any], indices) -> list[Any]:
        """Combine a scatter's folded outputs with its indices' value."""
        return outs

    def shortcut(self, eqn, ins: list[Any]) -> list[Any] | None:
        """Outputs without dispatching (e.g. evaluate directly), or None."""
        return None

    # -- engine

    def read(self, env: dict, atom) -> Any:
        if isinstance(atom, core.Literal):
            return self.literal(atom.val)
        return env[atom]

    def run(self, jaxpr: core.Jaxpr, consts: list[Any], args: list[Any]) -> list[Any]:
        """The abstract outputs of `jaxpr` from those of its constants and inputs."""
        env = self.env(jaxpr, consts, args)
        return [self.read(env, a) for a in jaxpr.outvars]

    def env(self, jaxpr: core.Jaxpr, consts: list[Any], args: list[Any]) -> dict:
        """`{var: value}` for every variable of `jaxpr`."""
        env: dict = {}
        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val in zip(jaxpr.invars, args, strict=True):
            env[var] = val
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [self.read(env, a) for a in eqn.invars])
            for var, val in zip(eqn.outvars, outs, strict=True):
                env[var] = val
        return env

    def eqn(self, eqn, ins: list[Any]) -> list[Any]:
        """Dispatch one equation: shortcut, rule, structure, opaque or default."""
        outs = self.shortcut(eqn, ins)
        if outs is not None:
            return outs
        rule = self.rules.get(eqn.primitive)
        if rule is not None:
            return rule(self, eqn, ins)
        structure = STRUCTURE.get(eqn.primitive)
        if structure is not None and self.follows(structure):
            return self.follow(eqn, ins)
        if carries_code(eqn):
            return self.opaque(eqn, ins)
        return self.default(eqn, ins)

    def follow(self, eqn, ins: list[Any]) -> list[Any]:
        """The engine's generic rule for `eqn`'s structure, whether or not this analysis
        `follows` it (for rules that special-case some calls only); `opaque` if none."""
        structure = STRUCTURE.get(eqn.primitive)
        outs = None
        if structure is not None:
            try:
                outs = _STRUCTURAL[structure.kind](self, eqn, ins, structure)
            except NoFixpoint:
                outs = None
        return outs if outs is not None else self.opaque(eqn, ins)

    def run_closed(self, value, args: list[Any]) -> list[Any]:
        """Run a (possibly closed) sub-jaxpr on abstract arguments."""
        jaxpr, consts = closed(value)
        return self.run(jaxpr, [self.const(c) for c in consts], args)

    def fixpoint(self, step: Callable[[list[Any]], list[Any]], init: list[Any]) -> list[Any]:
        """The least `c >= init` with `join(c, step(c)) == c` (raises NoFixpoint)."""
        carry = list(init)
        for _ in range(self.height * (len(carry) + 1)):
            new = [self.join(c, n) for c, n in zip(carry, step(carry), strict=True)]
            if all(self.same(a, b) for a, b in zip(new, carry, strict=True)):
                return carry
            carry = new
        raise NoFixpoint


# ------------------------------------------------------------------ structural rules


def _call(analysis: Analysis, eqn, ins, structure: Structure):
    body = eqn.params.get(structure.param)
    if body is None:
        return None
    jaxpr, consts = closed(body)
    if len(jaxpr.invars) != len(ins) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return analysis.run(jaxpr, [analysis.const(c) for c in consts], ins)


def _branch(analysis: Analysis, eqn, ins, structure: Structure):
    index, *ops = ins
    analysis.branch_index(eqn, index)
    outs = None
    for branch in eqn.params["branches"]:
        jaxpr, consts = closed(branch)
        if len(jaxpr.invars) != len(ops):
            return None
        result = analysis.run(jaxpr, [analysis.const(c) for c in consts], ops)
        outs = result if outs is None else [analysis.join(a, b) for a, b in
                                            zip(outs, result, strict=True)]
    return outs


def _scan(analysis: Analysis, eqn, ins, structure: Structure):
    layout = scan_layout(eqn)
    if layout is None:
        return None
    num_consts, num_carry = layout
    jaxpr, body_consts = closed(eqn.params["jaxpr"])
    body_consts = [analysis.const(c) for c in body_consts]
    consts, init, xs = ins[:num_consts], ins[num_consts:num_consts + num_carry], \
        ins[num_consts + num_carry:]

    def step(carry):
        return analysis.run(jaxpr, body_consts, consts + carry + xs)[:num_carry]

    carry = analysis.fixpoint(step, init)
    outs = analysis.run(jaxpr, body_consts, consts + carry + xs)
    return carry + outs[num_carry:]


def _while(analysis: Analysis, eqn, ins, structure: Structure):
    params = eqn.params
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, init = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
    body, body_closed = closed(params["body_jaxpr"])
    cond, cond_closed = closed(params["cond_jaxpr"])
    body_closed = [analysis.const(c) for c in body_closed]
    cond_closed = [analysis.const(c) for c in cond_closed]

    def step(carry):
        return analysis.run(body, body_closed, body_consts + carry)

    carry = analysis.fixpoint(step, init)
    predicate = analysis.run(cond, cond_closed, cond_consts + carry)[0]
    analysis.loop_predicate(eqn, predicate)
    return carry


def _fold(analysis: Analysis, eqn, ins, structure: Structure):
    """reduce / reduce_window: `acc = body(acc, x)` from the initial values, elementwise."""
    body = eqn.params.get(structure.param)
    if body is None or len(ins) % 2:
        return None
    n = len(ins) // 2
    operands, inits = ins[:n], ins[n:]
    jaxpr, consts = closed(body)
    if len(jaxpr.invars) != 2 * n or len(jaxpr.outvars) != n:
        return None
    consts = [analysis.const(c) for c in consts]
    # an accumulator also starts from operand elements (windows, tree reductions)
    start = [analysis.join(i, o) for i, o in zip(inits, operands, strict=True)]
    return analysis.fixpoint(lambda acc: analysis.run(jaxpr, consts, acc + operands), start)


def _scatter(analysis: Analysis, eqn, ins, structure: Structure):
    """scatter family: `out = update(operand, updates)` at the indexed places, repeatedly."""
    if len(ins) != 3:
        return None
    operand, indices, updates = ins
    body = eqn.params.get(structure.param)
    if body is None:  # plain scatter: an element is the operand's or an update
        outs = [analysis.join(operand, updates)]
    else:
        jaxpr, consts = closed(body)
        if len(jaxpr.invars) != 2 or len(jaxpr.outvars) != 1:
            return None
        consts = [analysis.const(c) for c in consts]
        outs = analysis.fixpoint(lambda acc: analysis.run(jaxpr, consts, [acc[0], updates]),
                                 [operand])
    return analysis.scatter_indices(eqn, outs, indices)


_STRUCTURAL = {
    "call": _call,
    "branch": _branch,
    "scan": _scan,
    "while": _while,
    "fold": _fold,
    "scatter": _scatter,
}


# -------------------------------------------------------------- the support-check mark

support_check_p = core.Primitive("ppl_ext_support_check")
"""`support_check_p.bind(mask, value, *bounds, spec=..., owner=...)` is `mask`.

`spec` (hashable) describes the checked constraint (`_continuity.constraint_spec`),
`owner` names the distribution whose support it is (for messages); `value` is the checked
value and `bounds` the constraint's array-valued bounds, operands so that the continuity
check can see which variables they are.
"""


def _support_check_impl(mask, *rest, **params):
    return mask


support_check_p.def_impl(_support_check_impl)
support_check_p.def_abstract_eval(lambda mask, *rest, **params: mask)
mlir.register_lowering(
    support_check_p, mlir.lower_fun(_support_check_impl, multiple_results=False))


def _support_check_batch(args, dims, **params):
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True)
                if d is not None)
    moved = [batching.bdim_at_front(x, d, size) for x, d in zip(args, dims, strict=True)]
    return support_check_p.bind(*moved, **params), 0


ad.defjvp_zero(support_check_p)  # a boolean: no tangent
batching.primitive_batchers[support_check_p] = _support_check_batch


transform_p = core.Primitive("ppl_ext_transform")
"""`transform_p.bind(y, x, *bounds, spec_in=..., spec_out=...)` is `y`: `y` is a transform
of `x`, and lies in `spec_out` whenever `x` lies in `spec_in` (constraint specs as for
`support_check_p`, whose array-valued bounds are the operands `bounds`)."""


def _transform_impl(y, *rest, **params):
    return y


transform_p.def_impl(_transform_impl)
transform_p.def_abstract_eval(lambda y, *rest, **params: y)
mlir.register_lowering(transform_p, mlir.lower_fun(_transform_impl, multiple_results=False))


def _transform_jvp(primals, tangents, **params):
    from jax._src.ad_util import Zero, instantiate

    out = transform_p.bind(*primals, **params)
    y_dot = tangents[0]
    if type(y_dot) is Zero:
        return out, y_dot
    return out, instantiate(y_dot)  # the identity in y; the other operands only annotate


def _transform_batch(args, dims, **params):
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    moved = [batching.bdim_at_front(x, d, size) for x, d in zip(args, dims, strict=True)]
    return transform_p.bind(*moved, **params), 0


ad.primitive_jvps[transform_p] = _transform_jvp
batching.primitive_batchers[transform_p] = _transform_batch
