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
`(n,) + shape`). The rules are conservative: a primitive without a rule gives `X` whenever
an input depends on the site, and callers fall back to joint evaluation (or refuse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax._src import source_info_util
from jax.extend import core

P, L, S, X = "P", "L", "S", "X"


@dataclass
class Val:
    """A value with its dependence on the site (see the module docstring)."""

    kind: str
    arr: Any = None  # the value (for S: materialised lazily as vec.sum(0) + const)
    axis: int | None = None  # local axis (kind L)
    vec: Any = None  # per-element terms, shape (n,) + shape (kind S)
    const: Any = None  # the part that does not depend on the site (kind S)
    culprit: str | None = None  # what mixed the elements (kind X)

    def array(self):
        if self.arr is None and self.kind == S:
            self.arr = jnp.sum(self.vec, axis=0) + self.const
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

_ELEMENTWISE = frozenset("""
add sub mul div rem pow max min neg sign floor ceil round is_finite exp exp2 log log1p
expm1 tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh sqrt rsqrt
cbrt abs integer_pow square erf erfc erf_inv lgamma digamma igamma igammac igamma_grad_a
random_gamma_grad polygamma zeta bessel_i0e bessel_i1e regularized_incomplete_beta eq ne lt
le gt ge and or not xor select_n convert_element_type clamp stop_gradient copy copy_p
nextafter population_count shift_left shift_right_logical shift_right_arithmetic real imag
conj reduce_precision
""".split())

# linear maps of a separable value (with the other operands plain)
_LINEAR_UNARY = frozenset({"neg", "convert_element_type", "stop_gradient", "copy", "copy_p",
                           "reduce_precision"})


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
    name = eqn.primitive.name
    if any(v.kind == L for v in invals):
        return _mixed(eqn, invals)
    out_shape = _shape(eqn.outvars[0])

    def lift(vec):  # (n,) + () or (n,) + out_shape -> broadcastable against out_shape
        missing = len(out_shape) - (vec.ndim - 1)
        return vec.reshape(vec.shape[:1] + (1,) * missing + vec.shape[1:])

    def result(vec, const):
        vec = jnp.broadcast_to(lift(vec), vec.shape[:1] + out_shape)
        return [Val(S, vec=vec, const=jnp.broadcast_to(const, out_shape))]

    if name in _LINEAR_UNARY and len(invals) == 1:
        (v,) = invals
        if name == "convert_element_type" and not jnp.issubdtype(
                eqn.params["new_dtype"], jnp.inexact):
            return _mixed(eqn, invals)
        return result(_bind(eqn, [v.vec])[0], _bind(eqn, [v.const])[0])
    if len(invals) != 2:
        return _mixed(eqn, invals)
    a, b = invals
    if name in ("add", "sub"):
        sign = 1 if name == "add" else -1
        if a.kind == S and b.kind == S:
            vec = lift(a.vec) + lift(b.vec) if sign > 0 else lift(a.vec) - lift(b.vec)
            return result(vec, a.const + b.const if sign > 0 else a.const - b.const)
        if a.kind == S:
            return result(a.vec, a.const + b.arr if sign > 0 else a.const - b.arr)
        return result(b.vec if sign > 0 else -b.vec,
                      a.arr + b.const if sign > 0 else a.arr - b.const)
    if name == "mul" and {a.kind, b.kind} == {S, P}:
        s_val, p_val = (a, b) if a.kind == S else (b, a)
        return result(lift(s_val.vec) * p_val.arr, s_val.const * p_val.arr)
    if name == "div" and a.kind == S and b.kind == P:
        return result(lift(a.vec) / b.arr, a.const / b.arr)
    return _mixed(eqn, invals)


def _reduce(eqn, invals, n):
    (v,) = invals
    axes = tuple(eqn.params["axes"])
    name = eqn.primitive.name
    if v.kind == L:
        if v.axis not in axes:
            new_axis = v.axis - sum(a < v.axis for a in axes)
            return _locals(eqn, invals, [new_axis] * len(eqn.outvars))
        if name != "reduce_sum":
            return _mixed(eqn, invals)
        others = tuple(a for a in axes if a != v.axis)
        vec = jnp.sum(v.arr, axis=others) if others else v.arr
        vec = jnp.moveaxis(vec, v.axis - sum(a < v.axis for a in others), 0)
        out_shape = _shape(eqn.outvars[0])
        return [Val(S, vec=vec, const=jnp.zeros(out_shape, vec.dtype))]
    if v.kind == S and name == "reduce_sum":
        vec = jnp.sum(v.vec, axis=tuple(a + 1 for a in axes))
        return [Val(S, vec=vec, const=jnp.sum(v.const, axis=axes))]
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
            and eqn.primitive.name == "reshape":
        return _mixed(eqn, invals)
    out_shape = _shape(eqn.outvars[0])
    in_shape = _shape(eqn.invars[0])
    if v.kind == L:
        j = _mapped_axis(in_shape, out_shape, v.axis)
        return _mixed(eqn, invals) if j is None else _locals(eqn, invals, [j])
    if v.kind == S:
        vec = v.vec.reshape((v.vec.shape[0],) + out_shape)
        return [Val(S, vec=vec, const=v.const.reshape(out_shape))]
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
        const = lax.broadcast_in_dim(v.const, out_shape, dims)
        return [Val(S, vec=vec, const=const)]
    return _mixed(eqn, invals)


def _transpose(eqn, invals, n):
    (v,) = invals
    perm = tuple(eqn.params["permutation"])
    if v.kind == L:
        return _locals(eqn, invals, [perm.index(v.axis)])
    if v.kind == S:
        return [Val(S, vec=jnp.transpose(v.vec, (0,) + tuple(p + 1 for p in perm)),
                    const=jnp.transpose(v.const, perm))]
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


def _sub_jaxpr(eqn):
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        value = eqn.params.get(name)
        if isinstance(value, core.ClosedJaxpr):
            return value.jaxpr, list(value.consts)
        if isinstance(value, core.Jaxpr):
            return value, []
    return None


def _call(eqn, invals, n):
    """jit / closed_call / remat: evaluate the body with tagged values."""
    jaxpr, consts = _sub_jaxpr(eqn)
    return _eval(jaxpr, [Val(P, arr=c) for c in consts], invals, n)


def _custom(eqn, invals, n):
    """custom_jvp/custom_vjp: keep the custom rule; tags from the body."""
    if any(v.kind in (S, X) for v in invals):
        return _mixed(eqn, invals)
    sub = _sub_jaxpr(eqn)
    if sub is None:
        return _mixed(eqn, invals)
    jaxpr, consts = sub
    tagged = _eval(jaxpr, [Val(P, arr=c) for c in consts], invals, n)  # tags only (dead code)
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


RULES = {name: _elementwise for name in _ELEMENTWISE}
RULES.update({
    "reduce_sum": _reduce, "reduce_max": _reduce, "reduce_min": _reduce,
    "reduce_prod": _reduce, "reduce_and": _reduce, "reduce_or": _reduce,
    "argmax": _reduce, "argmin": _reduce,
    "cumsum": _axis_param("axis"), "cumprod": _axis_param("axis"),
    "cummax": _axis_param("axis"), "cummin": _axis_param("axis"),
    "cumlogsumexp": _axis_param("axis"), "sort": _axis_param("dimension"),
    "split": _axis_param("axis"),
    "reshape": _reshape, "squeeze": _reshape, "expand_dims": _reshape,
    "broadcast_in_dim": _broadcast_in_dim, "transpose": _transpose,
    "slice": _slice, "dynamic_slice": _dynamic_slice, "concatenate": _concatenate,
    "stack": _stack,
    "pad": _pad, "gather": _gather, "dot_general": _dot_general,
    "jit": _call, "pjit": _call, "closed_call": _call, "checkpoint": _call, "remat": _call,
    "custom_jvp_call": _custom, "custom_vjp_call": _custom,
})


def _eval(jaxpr, consts: list[Val], args: list[Val], n: int) -> list[Val]:
    env: dict[Any, Val] = {}
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val

    def read(atom):
        if isinstance(atom, core.Literal):
            return Val(P, arr=atom.val)
        return env[atom]

    for eqn in jaxpr.eqns:
        invals = [read(a) for a in eqn.invars]
        if all(v.kind == P for v in invals):
            outs = [Val(P, arr=a) for a in _bind(eqn, [v.arr for v in invals])]
        else:
            rule = RULES.get(eqn.primitive.name)
            outs = rule(eqn, invals, n) if rule is not None else _mixed(eqn, invals)
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(a) for a in jaxpr.outvars]


def separate(closed: core.ClosedJaxpr, value, other_args, n: int) -> list[Val]:
    """Evaluate `closed(value, *other_args)` with `value` local along axis 0 of length `n`.

    Returns the tagged outputs: `P`, `L`, `S` (with `vec` of shape `(n,) + shape` and
    `const`) or `X` (with `culprit`). Every output's value is available as `.array()`.
    """
    args = [Val(L, arr=value, axis=0)] + [Val(P, arr=a) for a in other_args]
    return _eval(closed.jaxpr, [Val(P, arr=c) for c in closed.consts], args, n)
