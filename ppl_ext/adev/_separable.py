"""Plate factorisation: evaluate a continuation as a sum of per-element terms.

A site whose distribution has a batch axis of `n` independent elements `c_1, ..., c_n`
(a numpyro plate, `.expand`) is often followed by a program that is *additively separable*
in them: `k(c) = Σ_i g_i(c_i) + h`, where `g_i` sees only element `i` (and values that do
not depend on `c`) and `h` does not depend on `c` at all. An ELBO is: each data point's
log-likelihood and log q term depend only on its own latent. Then `E[k(c)] = Σ_i E[g_i(c_i)]
+ h`, so enumeration needs `K` evaluations per element instead of `K^n` joint values, and
every per-element term `g_i(v)` for all `i` comes out of one evaluation of the program with
every element set to `v`.

`separate(jaxpr, consts, args, n)` evaluates a traced continuation (its first argument is
the site's value, batch axis 0 of length `n`) with each value tagged by how it depends on
that value:

- `P` (plain): does not depend on it;
- `L(axis)` (local): entry `i` along `axis` depends only on element `i` (elementwise ops,
  broadcasting, reshapes that keep the axis, gathers indexed by it, matrix products that
  do not contract it, ...);
- `S` (separable): `Σ_i vec[i] + const`, from a `reduce_sum` over the local axis, kept
  through linear operations (`+`, `-`, scaling by a plain value, sums, reshapes);
- `X` (mixed): anything else, e.g. the product of two separable values, or a `reduce_max`
  over the local axis; it records the primitive and source line that mixed the elements.

Values are computed by binding the original primitives (so JAX's derivative rules apply,
custom_jvp rules included); only separable values are kept un-reduced as `vec` (shape
`(n,) + shape`). This is an analysis on the engine of `_analysis.py` (`Separability`) that
evaluates as it goes: an equation whose inputs are all plain is bound as is (whatever it
contains), rules are keyed by primitive objects (`RULES`), and calls whose body sees the
operands' shapes (jit, `eval_jaxpr`/closed_call, `jax.checkpoint`, custom_vmap, composite)
are evaluated body first with the engine's generic call rule, so a plate sum under
`jax.checkpoint` factorises as it does under `jit`. The rules are conservative: a primitive
without a rule gives `X` whenever an input depends on the site, and so does every
primitive with a sub-jaxpr that is not such a call (cond, scan, while, shard_map,
custom_linear_solve, ...); callers fall back to joint evaluation (or refuse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax._src import source_info_util
from jax.extend import core
from jax.extend.core import primitives as _P

from ._analysis import Analysis, Structure, support_check_p, transform_p

P, L, S, X = "P", "L", "S", "X"


@dataclass
class Val:
    """A value with its dependence on the site (see the module docstring)."""

    kind: str
    arr: Any = None  # the value (for S: materialised lazily as vec.sum(0) + const)
    axis: int | None = None  # local axis (kind L)
    vec: Any = None  # per-element terms, shape (n,) + shape (kind S)
    const: Any = None  # the part that does not depend on the site (kind S; None: zero)
    culprit: str | None = None  # what mixed the elements (kind X)

    def array(self):
        if self.arr is None and self.kind == S:
            total = jnp.sum(self.vec, axis=0)
            self.arr = total if self.const is None else total + self.const
        return self.arr


def _where_eqn(eqn) -> str:
    return f"'{eqn.primitive.name}' at {source_info_util.summarize(eqn.source_info)}"


def _bind(eqn, arrays):
    params = eqn.primitive.get_bind_params(eqn.params)
    with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
        outs = eqn.primitive.bind(*arrays, **params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _mixed(eqn, invals, culprit=None):
    """Evaluate normally; the outputs depend on several elements (kind X)."""
    culprit = culprit or next((v.culprit for v in invals if v.kind == X), None)
    culprit = culprit or _where_eqn(eqn)
    return [Val(X, arr=a, culprit=culprit) for a in _bind(eqn, [v.array() for v in invals])]


def _locals(eqn, invals, axes):
    """Evaluate normally; output `j` is local along `axes[j]`."""
    outs = _bind(eqn, [v.array() for v in invals])
    return [Val(L, arr=a, axis=ax) for a, ax in zip(outs, axes, strict=True)]


def _shape(var):
    return tuple(var.aval.shape)


# --------------------------------------------------------------------------------- rules

def _primitives(names: str) -> frozenset:
    """The primitive objects of JAX with these names (`add` -> `add_p`); absent ones are
    skipped (they then have no rule: conservative)."""
    from jax._src.lax import lax as _lax_mod, special as _special_mod

    found = set()
    for name in names.split():
        for module in (_P, _lax_mod, _special_mod):
            prim = getattr(module, f"{name}_p", None)
            if prim is not None:
                found.add(prim)
                break
    return frozenset(found)


_ELEMENTWISE = _primitives("""
add sub mul div rem pow max min neg sign floor ceil round is_finite exp exp2 log log1p
expm1 tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh sqrt rsqrt
cbrt abs integer_pow square erf erfc erf_inv lgamma digamma igamma igammac igamma_grad_a
random_gamma_grad polygamma zeta bessel_i0e bessel_i1e regularized_incomplete_beta eq ne lt
le gt ge and or not xor select_n convert_element_type clamp stop_gradient copy
nextafter population_count shift_left shift_right_logical shift_right_arithmetic real imag
conj reduce_precision
""")

# linear maps of a separable value (with the other operands plain)
_LINEAR_UNARY = _primitives("neg convert_element_type stop_gradient copy reduce_precision")


def _elementwise(eqn, invals, n):
    out_shape = _shape(eqn.outvars[0])
    kinds = {v.kind for v in invals}
    if X in kinds:
        return _mixed(eqn, invals)
    if S in kinds:
        return _linear_elementwise(eqn, invals)
    axes = {v.axis for v in invals if v.kind == L}
    # operands are scalars or of the output's rank (size-1 axes broadcast)
    full = all(v.kind != L or (jnp.ndim(v.arr) == len(out_shape)
                               and jnp.shape(v.arr)[v.axis] == out_shape[v.axis])
               for v in invals)
    if len(axes) == 1 and full:
        return _locals(eqn, invals, [axes.pop()] * len(eqn.outvars))
    return _mixed(eqn, invals)


def _linear_elementwise(eqn, invals):
    """Linear maps of separable values: `S ± S`, `S ± P`, `P ± S`, `S·P`, `P·S`, `S/P`."""
    prim = eqn.primitive
    if any(v.kind == L for v in invals):
        return _mixed(eqn, invals)
    out_shape = _shape(eqn.outvars[0])

    def lift(vec):  # (n,) + () or (n,) + out_shape -> broadcastable against out_shape
        missing = len(out_shape) - (vec.ndim - 1)
        return vec.reshape(vec.shape[:1] + (1,) * missing + vec.shape[1:])

    def result(vec, const):
        vec = jnp.broadcast_to(lift(vec), vec.shape[:1] + out_shape)
        const = None if const is None else jnp.broadcast_to(const, out_shape)
        return [Val(S, vec=vec, const=const)]

    if prim in _LINEAR_UNARY and len(invals) == 1:
        (v,) = invals
        if prim is _P.convert_element_type_p and not jnp.issubdtype(
                eqn.params["new_dtype"], jnp.inexact):
            return _mixed(eqn, invals)
        const = None if v.const is None else _bind(eqn, [v.const])[0]
        return result(_bind(eqn, [v.vec])[0], const)
    if len(invals) != 2:
        return _mixed(eqn, invals)
    a, b = invals
    if prim in (_P.add_p, _P.sub_p):
        sign = 1 if prim is _P.add_p else -1
        if a.kind == S and b.kind == S:
            vec = lift(a.vec) + lift(b.vec) if sign > 0 else lift(a.vec) - lift(b.vec)
            return result(vec, _add(a.const, b.const, sign))
        if a.kind == S:
            return result(a.vec, _add(a.const, b.arr, sign))
        return result(b.vec if sign > 0 else -b.vec, _add(a.arr, b.const, sign))
    if prim is _P.mul_p and {a.kind, b.kind} == {S, P}:
        s_val, p_val = (a, b) if a.kind == S else (b, a)
        return result(lift(s_val.vec) * p_val.arr,
                      None if s_val.const is None else s_val.const * p_val.arr)
    if prim is _P.div_p and a.kind == S and b.kind == P:
        return result(lift(a.vec) / b.arr, None if a.const is None else a.const / b.arr)
    return _mixed(eqn, invals)


def _add(a, b, sign):
    """`a + b` (`a - b` for sign -1) where None is zero."""
    if b is None:
        return a
    if a is None:
        return b if sign > 0 else -b
    return a + b if sign > 0 else a - b


def _map(const, fn):
    return None if const is None else fn(const)


def _reduce(eqn, invals, n):
    (v,) = invals
    axes = tuple(eqn.params["axes"])
    is_sum = eqn.primitive is _P.reduce_sum_p
    if v.kind == L:
        if v.axis not in axes:
            new_axis = v.axis - sum(a < v.axis for a in axes)
            return _locals(eqn, invals, [new_axis] * len(eqn.outvars))
        if not is_sum:
            return _mixed(eqn, invals)
        others = tuple(a for a in axes if a != v.axis)
        vec = jnp.sum(v.arr, axis=others) if others else v.arr
        position = v.axis - sum(a < v.axis for a in others)
        if position:
            vec = jnp.moveaxis(vec, position, 0)
        return [Val(S, vec=vec, const=None)]
    if v.kind == S and is_sum:
        vec = jnp.sum(v.vec, axis=tuple(a + 1 for a in axes))
        return [Val(S, vec=vec, const=_map(v.const, lambda c: jnp.sum(c, axis=axes)))]
    return _mixed(eqn, invals)


def _axis_param(param):
    def rule(eqn, invals, n):
        if any(v.kind in (S, X) for v in invals):
            return _mixed(eqn, invals)
        axes = {v.axis for v in invals if v.kind == L}
        if len(axes) != 1 or eqn.params[param] in axes:
            return _mixed(eqn, invals)
        axis = axes.pop()
        return _locals(eqn, invals, [axis] * len(eqn.outvars))

    return rule


def _mapped_axis(in_shape, out_shape, axis):
    """Where a reshape puts the local axis, or None if it merges or splits it."""
    prefix = math.prod(in_shape[:axis])
    size = in_shape[axis]
    running = 1
    for j, d in enumerate(out_shape):
        if running == prefix and d == size:
            return j
        running *= d
        if running > prefix:
            return None
    return None


def _reshape(eqn, invals, n):
    v = invals[0]
    if any(w.kind != P for w in invals[1:]) or eqn.params.get("dimensions") not in (None,) \
            and eqn.primitive is _P.reshape_p:
        return _mixed(eqn, invals)
    out_shape = _shape(eqn.outvars[0])
    in_shape = _shape(eqn.invars[0])
    if v.kind == L:
        j = _mapped_axis(in_shape, out_shape, v.axis)
        return _mixed(eqn, invals) if j is None else _locals(eqn, invals, [j])
    if v.kind == S:
        vec = v.vec.reshape((v.vec.shape[0],) + out_shape)
        return [Val(S, vec=vec, const=_map(v.const, lambda c: c.reshape(out_shape)))]
    return _mixed(eqn, invals)


def _broadcast_in_dim(eqn, invals, n):
    v = invals[0]
    if any(w.kind != P for w in invals[1:]):
        return _mixed(eqn, invals)
    dims = tuple(eqn.params["broadcast_dimensions"])
    out_shape = _shape(eqn.outvars[0])
    if v.kind == L:
        return _locals(eqn, invals, [dims[v.axis]])
    if v.kind == S:
        vec = lax.broadcast_in_dim(v.vec, (v.vec.shape[0],) + out_shape,
                                   (0,) + tuple(d + 1 for d in dims))
        const = _map(v.const, lambda c: lax.broadcast_in_dim(c, out_shape, dims))
        return [Val(S, vec=vec, const=const)]
    return _mixed(eqn, invals)


def _transpose(eqn, invals, n):
    (v,) = invals
    perm = tuple(eqn.params["permutation"])
    if v.kind == L:
        return _locals(eqn, invals, [perm.index(v.axis)])
    if v.kind == S:
        return [Val(S, vec=jnp.transpose(v.vec, (0,) + tuple(p + 1 for p in perm)),
                    const=_map(v.const, lambda c: jnp.transpose(c, perm)))]
    return _mixed(eqn, invals)


def _slice(eqn, invals, n):
    (v,) = invals
    if v.kind != L:
        return _mixed(eqn, invals)
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"]
    a = v.axis
    if start[a] == 0 and limit[a] == n and (strides is None or strides[a] == 1):
        return _locals(eqn, invals, [a])
    return _mixed(eqn, invals)


def _dynamic_slice(eqn, invals, n):
    v, *starts = invals
    if v.kind != L or any(s.kind != P for s in starts):
        return _mixed(eqn, invals)
    if tuple(eqn.params["slice_sizes"])[v.axis] == n:
        return _locals(eqn, invals, [v.axis])
    return _mixed(eqn, invals)


def _concatenate(eqn, invals, n):
    if any(v.kind in (S, X) for v in invals):
        return _mixed(eqn, invals)
    axes = {v.axis for v in invals if v.kind == L}
    if len(axes) == 1 and eqn.params["dimension"] not in axes:
        return _locals(eqn, invals, [axes.pop()])
    return _mixed(eqn, invals)


def _stack(eqn, invals, n):
    if any(v.kind in (S, X) for v in invals):
        return _mixed(eqn, invals)
    axes = {v.axis for v in invals if v.kind == L}
    if len(axes) != 1:
        return _mixed(eqn, invals)
    axis = axes.pop()
    return _locals(eqn, invals, [axis if axis < eqn.params["axis"] else axis + 1])


def _pad(eqn, invals, n):
    v, pad_value = invals
    if v.kind != L or pad_value.kind != P:
        return _mixed(eqn, invals)
    if tuple(eqn.params["padding_config"][v.axis]) == (0, 0, 0):
        return _locals(eqn, invals, [v.axis])
    return _mixed(eqn, invals)


def _gather(eqn, invals, n):
    operand, indices = invals
    if operand.kind in (S, X) or indices.kind in (S, X):
        return _mixed(eqn, invals)
    dn = eqn.params["dimension_numbers"]
    out_ndim = len(_shape(eqn.outvars[0]))
    batch_out = [d for d in range(out_ndim) if d not in dn.offset_dims]
    index_ndim = len(_shape(eqn.invars[1]))
    indices_batch = list(range(index_ndim - 1))  # the last axis is the index vector
    out_axis = None
    if indices.kind == L:
        if indices.axis == index_ndim - 1:
            return _mixed(eqn, invals)
        out_axis = batch_out[indices_batch.index(indices.axis)]
    if operand.kind == L:
        a = operand.axis
        if a in dn.operand_batching_dims:
            # batched gather: element i reads operand[i] with indices[i]
            position = dn.operand_batching_dims.index(a)
            idx_dim = dn.start_indices_batching_dims[position]
            axis = batch_out[indices_batch.index(idx_dim)]
            if indices.kind == L and indices.axis != idx_dim:
                return _mixed(eqn, invals)
        elif (a in dn.start_index_map or a in dn.collapsed_slice_dims
              or eqn.params["slice_sizes"][a] != n):
            return _mixed(eqn, invals)
        else:
            kept = [d for d in range(len(_shape(eqn.invars[0])))
                    if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
            axis = dn.offset_dims[kept.index(a)]
            if indices.kind == L:
                return _mixed(eqn, invals)
        if out_axis is not None and out_axis != axis:
            return _mixed(eqn, invals)
        out_axis = axis
    return _locals(eqn, invals, [out_axis])


def _dot_general(eqn, invals, n):
    lhs, rhs = invals
    if lhs.kind in (S, X) or rhs.kind in (S, X):
        return _mixed(eqn, invals)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_nd, rhs_nd = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
    lhs_free = [d for d in range(lhs_nd) if d not in lc and d not in lb]
    rhs_free = [d for d in range(rhs_nd) if d not in rc and d not in rb]

    def out_axis(side, axis):
        contract, batch, free = (lc, lb, lhs_free) if side == 0 else (rc, rb, rhs_free)
        if axis in contract:
            return None
        if axis in batch:
            return ("batch", list(batch).index(axis))
        offset = len(lb) + (0 if side == 0 else len(lhs_free))
        return ("free", offset + free.index(axis))

    placed = [out_axis(s, v.axis) for s, v in enumerate(invals) if v.kind == L]
    if any(p is None for p in placed):
        return _mixed(eqn, invals)
    if len(placed) == 2 and not (placed[0] == placed[1] and placed[0][0] == "batch"):
        return _mixed(eqn, invals)
    return _locals(eqn, invals, [placed[0][1]])


def _custom(eqn, invals, n):
    """custom_jvp/custom_vjp: keep the custom rule; tags from the body."""
    if any(v.kind in (S, X) for v in invals):
        return _mixed(eqn, invals)
    body = eqn.params.get("call_jaxpr")
    if body is None:
        return _mixed(eqn, invals)
    tagged = Separability(n).run_closed(body, invals)  # tags only (dead code)
    outs = _bind(eqn, [v.array() for v in invals])
    result = []
    for arr, t in zip(outs, tagged, strict=True):
        if t.kind == L:
            result.append(Val(L, arr=arr, axis=t.axis))
        elif t.kind == P:
            result.append(Val(P, arr=arr))
        else:
            result.append(Val(X, arr=arr, culprit=t.culprit or _where_eqn(eqn)))
    return result


def _support_check(eqn, invals, n):
    """The support-check and transform marks are the identity on operand 0."""
    (out,) = _bind(eqn, [v.array() for v in invals])
    first = invals[0]
    if first.kind == L:
        return [Val(L, arr=out, axis=first.axis)]
    if first.kind == P:
        return [Val(P, arr=out)]
    if first.kind == S:  # the identity: keep the per-element terms
        return [Val(S, vec=first.vec, const=first.const, arr=out)]
    return [Val(X, arr=out, culprit=first.culprit or _where_eqn(eqn))]


RULES = {prim: _elementwise for prim in _ELEMENTWISE}
RULES.update({
    _P.reduce_sum_p: _reduce, _P.reduce_max_p: _reduce, _P.reduce_min_p: _reduce,
    _P.reduce_prod_p: _reduce, _P.reduce_and_p: _reduce, _P.reduce_or_p: _reduce,
    _P.argmax_p: _reduce, _P.argmin_p: _reduce,
    _P.cumsum_p: _axis_param("axis"), _P.cumprod_p: _axis_param("axis"),
    _P.cummax_p: _axis_param("axis"), _P.cummin_p: _axis_param("axis"),
    _P.cumlogsumexp_p: _axis_param("axis"), _P.sort_p: _axis_param("dimension"),
    _P.reshape_p: _reshape, _P.squeeze_p: _reshape,
    _P.broadcast_in_dim_p: _broadcast_in_dim, _P.transpose_p: _transpose,
    _P.slice_p: _slice, _P.dynamic_slice_p: _dynamic_slice,
    _P.concatenate_p: _concatenate, _P.pad_p: _pad, _P.gather_p: _gather,
    _P.dot_general_p: _dot_general,
    _P.custom_jvp_call_p: _custom, _P.custom_vjp_call_p: _custom,
    support_check_p: _support_check, transform_p: _support_check,
})
for _prim in _primitives("split"):
    RULES[_prim] = _axis_param("axis")
for _prim in _primitives("stack"):
    RULES[_prim] = _stack


class Separability(Analysis):
    """Evaluation with tags `P`/`L`/`S`/`X` (see the module docstring); `n` elements."""

    def __init__(self, n: int):
        self.n = n

    def follows(self, structure: Structure) -> bool:
        return structure.kind == "call" and structure.same_shapes

    def literal(self, value):
        return Val(P, arr=value)

    def join(self, a, b):  # pragma: no cover - no branches or loops are followed
        raise NotImplementedError

    def shortcut(self, eqn, ins):
        if all(v.kind == P for v in ins):
            return [Val(P, arr=a) for a in _bind(eqn, [v.arr for v in ins])]
        return None

    def default(self, eqn, ins):
        return _mixed(eqn, ins)

    def opaque(self, eqn, ins):
        return _mixed(eqn, ins)

    def eqn(self, eqn, ins):
        outs = self.shortcut(eqn, ins)
        if outs is not None:
            return outs
        rule = RULES.get(eqn.primitive)
        if rule is not None:
            return rule(eqn, ins, self.n)
        return super().eqn(eqn, ins)


def eval_eqn(eqn, invals: list[Val], n: int) -> list[Val]:
    """The tagged outputs of one equation (for interpreters that walk jaxprs themselves)."""
    return Separability(n).eqn(eqn, invals)


def _eval(jaxpr, consts: list[Val], args: list[Val], n: int) -> list[Val]:
    """The tagged outputs of `jaxpr` from tagged constants and arguments."""
    return Separability(n).run(jaxpr, consts, args)


def separate(closed: core.ClosedJaxpr, value, other_args, n: int) -> list[Val]:
    """Evaluate `closed(value, *other_args)` with `value` local along axis 0 of length `n`.

    Returns the tagged outputs: `P`, `L`, `S` (with `vec` of shape `(n,) + shape` and
    `const`) or `X` (with `culprit`). Every output's value is available as `.array()`.
    """
    args = [Val(L, arr=value, axis=0)] + [Val(P, arr=a) for a in other_args]
    return Separability(n).run_closed(closed, args)
