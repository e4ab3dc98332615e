"""Sign facts about the values of a jaxpr, to skip run-time parameter checks that cannot fail.

A site whose distribution validates its arguments gets a run-time check of the parameters
that are traced (numpyro checks only concrete ones). When the program itself guarantees a
constraint, e.g. `scale = softplus(h) + 1e-3` is positive, the check is dead weight: and a
check that can raise is compiled as a host callback, which slows the whole step on CPU.
A fact that is wrong lets an invalid parameter through silently, so every rule here must
hold for every input (the tests in `tests/adev/test_analysis.py` try to break them).

`facts(jaxpr)` is an analysis on the engine of `_analysis.py` (`Signs`): it records, per
variable, which of these hold for every element, in floating point:

- `"num"`: not NaN;
- `"fin"`: finite (implies `"num"`);
- `"nonneg"`: `>= 0` (implies `"num"`);
- `"pos"`: `> 0`, possibly `+inf` (implies `"nonneg"`; `+inf` passes numpyro's `positive`);
- `"unit"`: in `[0, 1]` (implies `"nonneg"` and `"fin"`);
- `"gtm1"`: `> -1` (implied by `"nonneg"`; where `log1p` is finite).

Two readings of NaN. `facts(jaxpr)` uses `CHECKS`: facts about the elements that are *not
NaN* (`"num"` is then vacuous). The run-time checks of a reparameterised site use it: a
NaN parameter makes its draw NaN, and so the estimate NaN (never a finite wrong value), as
in NumPyro, which checks no traced parameter; this keeps host callbacks out of ordinary
training steps (an MLP's output could be NaN only through overflow or a NaN weight). The
checks of every other site use `strict_facts`, since their draws can hide a NaN (a
Bernoulli with NaN probabilities draws 0).
`strict_facts(jaxpr)` tracks NaN: the program's inputs are assumed not NaN, inputs may be
infinite, and NaN that the program itself creates (`0 * inf`, `inf - inf`, `inf / inf`, a
max with such a value) needs its operands to rule it out. In both readings a finite
invalid value is never proven valid. Floating point is taken literally: `exp(x)` and a
product of positives may underflow to 0 (only `"nonneg"`), a sum of positives may
overflow to `+inf` (still `"pos"`), a narrowing cast (f32 to f16/bf16, f64 to f32) or
`reduce_precision` may underflow to 0 or overflow, a max/min/sum over an empty axis is
`-inf`/`+inf`/0, a gather in `fill` mode yields its fill value (NaN by default) for an
out-of-range index, a cast to an integer truncates, and `-0.0` passes `>= 0` but has
`1 / -0.0 = rsqrt(-0.0) = -inf`. Integer arithmetic wraps around
(`abs(INT_MIN) < 0`, `k * k` overflows), so only dtype facts (`"nonneg"` for unsigned,
`"unit"` for booleans) and structural rules (reshape, select, min/max, ...) hold for
integers. Anything not covered by a rule gets only the facts of its dtype, so a check is
skipped only when it provably holds. Calls, branches, loops and reductions with a
computation follow the engine's generic rules; a primitive whose sub-jaxpr the engine does
not know gives no facts.

With `exact=True` (`EXACT = Signs(exact=True)`) the same rules are read in real arithmetic
instead, with `"fin"` meaning "a finite real number" and the extra fact `"ounit"` (in the
open interval `(0, 1)`): there `exp(x)` of a finite `x` is positive and finite, `log` of a
positive finite number is finite, and a total function (sums, products, `exp`, `sin`,
reshapes, ...) of finite values is finite. The continuity check uses this
(`EXACT.rule(eqn, facts)`) to decide that a support check (numpyro's `validate_args`
masks) or a comparison with a constant is constant where the program's draws live.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core
from jax.extend.core import primitives as P
from numpyro.distributions import constraints

from ._analysis import Analysis, support_check_p, transform_p

NONE: frozenset = frozenset()
NUM = frozenset({"num"})
FIN = frozenset({"fin", "num"})
NONNEG = frozenset({"nonneg", "num"})
POS = frozenset({"pos", "nonneg", "num"})
UNIT = frozenset({"unit", "nonneg", "fin", "num"})
OUNIT = frozenset({"ounit", "unit", "pos", "nonneg", "fin", "num"})  # exact mode only


def _literal(value) -> frozenset:
    """Facts of a concrete value (every element)."""
    try:
        array = np.asarray(value)
        if array.dtype == np.bool_:
            return UNIT
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            return NONE
    except Exception:  # noqa: BLE001 - a tracer or an odd constant: no facts
        return NONE
    if array.size == 0:
        return UNIT | POS | {"gtm1"}  # vacuous: no element to violate anything
    result = set()
    if not np.any(np.isnan(array)):
        result.add("num")
        if np.all(np.isfinite(array)):
            result.add("fin")
        if np.all(array >= 0):
            result.add("nonneg")
        if np.all(array > 0):
            result.add("pos")
        if np.all((array >= 0) & (array <= 1)):
            result.add("unit")
        if np.all((array > 0) & (array < 1)):
            result.add("ounit")
        if np.all(array > -1):
            result.add("gtm1")
    return frozenset(result)


def _dtype_of(var):
    return getattr(getattr(var, "aval", None), "dtype", None)


def _is_float(dtype) -> bool:
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def dtype_facts(dtype) -> frozenset:
    """What a dtype alone guarantees."""
    if dtype is None:
        return NONE
    if dtype == jnp.bool_:
        return UNIT
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        return NONNEG | FIN
    if jnp.issubdtype(dtype, jnp.integer):
        return FIN
    return NONE


def _common(*fs):
    out = fs[0]
    for f in fs[1:]:
        out = out & f
    return out


def _closure(f) -> frozenset:
    """Add the facts implied by others."""
    f = set(f)
    if "ounit" in f:
        f |= {"unit", "pos"}
    if "unit" in f:
        f |= {"nonneg", "fin"}
    if "pos" in f:
        f.add("nonneg")
    if "nonneg" in f:
        f.add("gtm1")
    if "nonneg" in f or "fin" in f or "gtm1" in f:
        f.add("num")
    return frozenset(f)


# ---------------------------------------------------------------------------- rules
# A rule is rule(an, eqn, ins) -> list of facts; `an.exact` selects real arithmetic.


def _preserve(an, eqn, ins):
    return [ins[0]] * len(eqn.outvars)


def _neg(an, eqn, ins):
    (a,) = ins
    out = a & FIN
    if "ounit" in a:  # -x in (-1, 0)
        out = out | {"gtm1", "num"}
    return [out]


def _add(an, eqn, ins):
    a, b = ins
    out = set()
    if "num" in a and "num" in b and ("fin" in a or "fin" in b
                                      or ("nonneg" in a and "nonneg" in b)):
        out.add("num")
        if "nonneg" in a and "nonneg" in b:
            out.add("nonneg")
            if "pos" in a or "pos" in b:
                out.add("pos")
        if an.exact and "fin" in a and "fin" in b:
            out.add("fin")
    return [_closure(out)]


def _is_one(atom) -> bool:
    value = getattr(atom, "val", None)
    if value is None:
        return False
    try:
        return bool(np.all(np.asarray(value) == 1))
    except Exception:  # noqa: BLE001
        return False


def _sub(an, eqn, ins):
    a, b = ins
    out = set()
    if "num" in a and "num" in b and ("fin" in a or "fin" in b):
        out.add("num")
        if an.exact and "fin" in a and "fin" in b:
            out.add("fin")
    if _is_one(eqn.invars[0]) and "unit" in b:  # 1 - u, u in [0, 1], is exact in [0, 1]
        out |= {"unit"}
        if an.exact and "ounit" in b:
            out.add("ounit")
    return [_closure(out)]


def _no_nan_product(a, b) -> bool:
    # 0 * inf is NaN: rule out a zero on one side or an infinity on the other
    return ("num" in a and "num" in b and ("fin" in a or "pos" in b)
            and ("fin" in b or "pos" in a))


def _mul(an, eqn, ins):
    a, b = ins
    out = set()
    if an.exact:
        if "fin" in a and "fin" in b:
            out.add("fin")
            if "nonneg" in a and "nonneg" in b:
                out.add("nonneg")
            if "pos" in a and "pos" in b:
                out.add("pos")  # no underflow in real arithmetic
            if "ounit" in a and "ounit" in b:
                out.add("ounit")
    elif _no_nan_product(a, b):
        out.add("num")
        if "nonneg" in a and "nonneg" in b:
            out.add("nonneg")  # pos * pos may underflow to 0
    if "unit" in a and "unit" in b:
        out.add("unit")
    return [_closure(out)]


def _div(an, eqn, ins):
    a, b = ins
    out = set()
    if an.exact:
        if "fin" in a and "fin" in b and "pos" in b:
            out.add("fin")
            if "nonneg" in a:
                out.add("nonneg")
            if "pos" in a:
                out.add("pos")
    elif "num" in a and "pos" in b and ("fin" in a or "fin" in b):  # no 0/0, no inf/inf
        out.add("num")
        if "nonneg" in a:
            out.add("nonneg")  # pos / pos may underflow to 0
    return [_closure(out)]


def _max(an, eqn, ins):
    a, b = ins
    if "num" not in a or "num" not in b:  # max propagates NaN
        return [NONE]
    out = {"num"}
    if "nonneg" in a or "nonneg" in b:
        out.add("nonneg")
    if "pos" in a or "pos" in b:
        out.add("pos")
    if "unit" in a and "unit" in b:
        out.add("unit")
    if "fin" in a and "fin" in b:
        out.add("fin")
    if "ounit" in a and "ounit" in b:
        out.add("ounit")
    return [_closure(out)]


def _min(an, eqn, ins):
    a, b = ins
    if "num" not in a or "num" not in b:  # min propagates NaN
        return [NONE]
    out = set(a & b)
    if ("unit" in a and "nonneg" in b) or ("unit" in b and "nonneg" in a):
        out.add("unit")
    if ("ounit" in a and "pos" in b) or ("ounit" in b and "pos" in a):
        out.add("ounit")
    return [_closure(out)]


def _clamp(an, eqn, ins):
    lo, x, hi = ins  # clamp(lo, x, hi) = min(max(x, lo), hi)
    (m,) = _max(an, eqn, [x, lo])
    return _min(an, eqn, [m, hi])


def _select_n(an, eqn, ins):
    return [_common(*ins[1:])]


def _exp(an, eqn, ins):
    (a,) = ins
    if an.exact:
        return [POS | FIN if "fin" in a else NONE]
    return [NONNEG if "num" in a else NONE]  # exp(-inf) = 0, underflow


def _expm1(an, eqn, ins):
    (a,) = ins
    if an.exact:
        return [_closure({"fin"} | ({"pos"} if "pos" in a else set())
                         | ({"nonneg"} if "nonneg" in a else set()))
                if "fin" in a else NONE]
    return [NONNEG if "nonneg" in a else NONE]


def _pow(an, eqn, ins):
    a, b = ins
    if an.exact and "pos" in a and "fin" in a and "fin" in b:
        return [POS | FIN]  # a positive real to a real power
    return [NONE]  # floats: pow(-0.0, -1) = -inf, pow(0, y) underflows, ...


def _log(an, eqn, ins):
    (a,) = ins
    if an.exact and "pos" in a and "fin" in a:
        return [FIN]
    return [NONE]


def _log1p(an, eqn, ins):
    (a,) = ins
    if "nonneg" in a:
        return [NONNEG | FIN if an.exact and "fin" in a else NONNEG]
    if an.exact and "gtm1" in a and "fin" in a:
        return [FIN]
    return [NONE]


def _logistic(an, eqn, ins):
    (a,) = ins
    if an.exact:
        return [OUNIT if "fin" in a else NONE]
    return [UNIT if "num" in a else NONE]


def _bounded(an, eqn, ins):
    """tanh, sin, cos, erf, atan: finite for finite (float: for non-NaN tanh/erf/atan)."""
    (a,) = ins
    if "fin" in a:
        return [FIN]
    if not an.exact and "num" in a and eqn.primitive in (P.tanh_p, P.erf_p, P.atan_p):
        return [FIN]
    return [NONE]


def _abs(an, eqn, ins):
    (a,) = ins
    if "num" not in a:
        return [NONE]
    return [_closure({"nonneg"} | (a & {"pos", "fin", "unit", "ounit"}))]


def _square(an, eqn, ins):
    (a,) = ins
    if "num" not in a:
        return [NONE]
    out = {"nonneg"} | (a & {"unit", "ounit"})
    if an.exact:
        out |= a & {"fin", "pos"}
    return [_closure(out)]


def _integer_pow(an, eqn, ins):
    (a,) = ins
    y = eqn.params["y"]
    if "num" not in a:
        return [NONE]
    if y == 0:
        return [POS | FIN]
    out = set()
    if y % 2 == 0 or (y > 0 and "nonneg" in a) or "pos" in a:
        out.add("nonneg")  # (-0.0) ** -1 = -inf: an odd negative power needs x > 0
    if y > 0:
        out |= a & {"unit", "ounit"}
        if an.exact:
            out |= a & {"fin"}
            if "pos" in a:
                out.add("pos")
    elif an.exact and "pos" in a and "fin" in a:
        out |= {"pos", "fin"}
    return [_closure(out)]


def _sqrt(an, eqn, ins):
    (a,) = ins
    if "nonneg" not in a:
        return [NONE]  # sqrt of a negative is NaN
    # sqrt of a positive float never underflows (it moves towards 1)
    return [_closure({"nonneg"} | (a & {"pos", "unit", "fin", "ounit"}))]


def _rsqrt(an, eqn, ins):
    (a,) = ins
    if "pos" not in a:
        return [NONE]  # rsqrt(-0.0) = -inf
    if an.exact:
        return [POS | FIN if "fin" in a else NONNEG]
    return [POS if "fin" in a else NONNEG]  # rsqrt(tiny) is finite, rsqrt(inf) = 0


def _nonempty(eqn, axes) -> bool:
    shape = eqn.invars[0].aval.shape
    return all(shape[a] > 0 for a in axes)


def _reduce_sum(an, eqn, ins):
    (a,) = ins
    out = set()
    if "nonneg" in a:
        out.add("nonneg")  # a sum of non-negatives is never NaN (+inf at worst)
        if "pos" in a and _nonempty(eqn, eqn.params["axes"]):
            out.add("pos")  # an empty sum is 0
    if an.exact and "fin" in a:
        out.add("fin")
    return [_closure(out)]


def _reduce_extremum(an, eqn, ins):
    # the max (min) of an empty axis is -inf (+inf); otherwise it is one of the elements
    if _nonempty(eqn, eqn.params["axes"]):
        return [ins[0]]
    return [NONE]


def _cumsum(an, eqn, ins):
    (a,) = ins
    out = set()
    if "nonneg" in a:
        out |= a & {"nonneg", "pos"}  # every prefix is non-empty
    if an.exact and "fin" in a:
        out.add("fin")
    return [_closure(out)]


def _float_range(dtype):
    info = jnp.finfo(dtype)
    return float(info.max), float(info.smallest_subnormal)


def _convert(an, eqn, ins):
    (a,) = ins
    old, new = _dtype_of(eqn.invars[0]), eqn.params["new_dtype"]
    base = dtype_facts(new)
    if old is None:
        return [base]
    if an.exact:
        if _is_float(new) and (_is_float(old) or dtype_facts(old)):
            return [a]  # real arithmetic: a change of representation
        return [base]
    if old == jnp.bool_:
        return [UNIT if _is_float(new) or jnp.issubdtype(new, jnp.integer) else base]
    if _is_float(old) and _is_float(new):
        old_max, old_tiny = _float_range(old)
        new_max, new_tiny = _float_range(new)
        facts = set(a)
        if new_tiny > old_tiny and "pos" in facts:
            facts.discard("pos")  # a tiny positive value underflows to 0
        if new_max < old_max:
            facts.discard("fin")  # a large value overflows to inf
        # rounding keeps signs and [0, 1] (0 and 1 are representable)
        return [_closure(facts)]
    if jnp.issubdtype(old, jnp.integer) and _is_float(new):
        facts = set(a & {"nonneg", "pos", "unit", "num"})  # an integer >= 1 stays >= 1
        if float(jnp.iinfo(old).max) <= _float_range(new)[0] and \
                float(jnp.iinfo(old).min) >= -_float_range(new)[0]:
            facts |= a & {"fin"}
        return [_closure(facts) | base]
    if jnp.issubdtype(old, jnp.integer) and jnp.issubdtype(new, jnp.integer):
        oi, ni = jnp.iinfo(old), jnp.iinfo(new)
        if ni.min <= oi.min and ni.max >= oi.max:  # widening: values unchanged
            return [a | base]
        return [base]
    return [base]  # float to integer truncates (0.5 -> 0) and is undefined for inf


def _reduce_precision(an, eqn, ins):
    (a,) = ins
    if an.exact:
        return [a]
    return [_closure(a - {"pos", "fin", "ounit"})]  # underflow to 0, overflow to inf


def _gather(an, eqn, ins):
    operand = ins[0]
    mode = eqn.params.get("mode")
    if mode in (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS):
        return [operand]  # every element is one of the operand's (indices are clamped)
    if mode == lax.GatherScatterMode.FILL_OR_DROP:
        fill = eqn.params.get("fill_value")
        dtype = _dtype_of(eqn.outvars[0])
        if fill is None:
            if _is_float(dtype):
                return [NONE]  # the default fill is NaN
            return [dtype_facts(dtype)]
        return [operand & _literal(fill)]
    return [dtype_facts(_dtype_of(eqn.outvars[0]))]


def _dynamic_update_slice(an, eqn, ins):
    return [ins[0] & ins[1]]


def _concatenate(an, eqn, ins):
    return [_common(*ins)]


def _pad(an, eqn, ins):
    return [ins[0] & ins[1]]


def _sort(an, eqn, ins):
    return list(ins)  # each output is a permutation of its operand


def _dot_general(an, eqn, ins):
    a, b = ins[:2]
    out = set()
    if an.exact and "fin" in a and "fin" in b:
        out.add("fin")
        if "nonneg" in a and "nonneg" in b:
            out.add("nonneg")
    elif not an.exact and "nonneg" in a and "nonneg" in b and "fin" in a and "fin" in b:
        out.add("nonneg")  # products are finite, so no 0 * inf; sums of nonneg
    return [_closure(out)]


def _logaddexp(an, eqn, ins):
    """jax's `logaddexp` (softplus is `logaddexp(x, 0)`): `log(e^a + e^b) >= max(a, b)`.

    Its body's `isnan` branch (taken only for `a = b = ±inf`, giving `a + b`) hides this
    from the generic rules; NaN only comes from a NaN operand.
    """
    a, b = ins
    if "num" not in a or "num" not in b:
        return [NONE]
    out = {"num"}
    if "nonneg" in a or "nonneg" in b:
        out.add("nonneg")
    if "pos" in a or "pos" in b:
        out.add("pos")
    if an.exact and "fin" in a and "fin" in b:
        out.add("fin")
    return [_closure(out)]


def _nan_fill(eqn) -> bool:
    """A gather that fills out-of-range elements with a non-finite value."""
    if eqn.primitive is not P.gather_p or eqn.params.get("mode") != \
            lax.GatherScatterMode.FILL_OR_DROP:
        return False
    fill = eqn.params.get("fill_value")
    return fill is None or "fin" not in _literal(fill)


def _jax_function(jaxpr, names: tuple[str, ...], files: tuple[str, ...]) -> bool:
    """Whether `jaxpr` was traced from one of jax's own functions `names` in `files`."""
    info = str(getattr(getattr(jaxpr, "debug_info", None), "func_src_info", "") or "")
    name, _, where = info.partition(" at ")
    where = where.replace("\\", "/")
    return name in names and any(f"/jax/_src/{f}" in where for f in files)


def _is_logaddexp(eqn) -> bool:
    return len(eqn.invars) == 2 and len(eqn.outvars) == 1 and _jax_function(
        eqn.params["call_jaxpr"], ("logaddexp",), ("lax/other.py", "numpy/ufuncs.py"))


def _custom_jvp(an, eqn, ins):
    if _is_logaddexp(eqn):
        return _logaddexp(an, eqn, ins)
    return an.follow(eqn, ins)


def _all_float(eqn) -> bool:
    return all(_is_float(_dtype_of(v)) for v in eqn.outvars)


RULES: dict = {}
for _p in (P.broadcast_in_dim_p, P.reshape_p, P.squeeze_p, P.transpose_p, P.slice_p,
           P.dynamic_slice_p, P.copy_p, P.rev_p, P.cummax_p, P.cummin_p):
    RULES[_p] = _preserve
if hasattr(P, "stop_gradient_p"):
    RULES[P.stop_gradient_p] = _preserve
try:  # primitives that jax.extend does not export
    from jax._src.lax import lax as _lax_mod

    for _name in ("split_p", "unstack_p", "tile_p"):
        if hasattr(_lax_mod, _name):
            RULES[getattr(_lax_mod, _name)] = _preserve
    if hasattr(_lax_mod, "stack_p"):
        RULES[_lax_mod.stack_p] = lambda an, eqn, ins: [_common(*ins)]
except ImportError:  # pragma: no cover
    pass
RULES.update({
    P.neg_p: _neg, P.add_p: _add, P.sub_p: _sub, P.mul_p: _mul, P.div_p: _div,
    P.max_p: _max, P.min_p: _min, P.clamp_p: _clamp, P.select_n_p: _select_n,
    P.pow_p: _pow, P.exp_p: _exp, P.exp2_p: _exp, P.expm1_p: _expm1, P.log_p: _log,
    P.log1p_p: _log1p,
    P.logistic_p: _logistic, P.tanh_p: _bounded, P.sin_p: _bounded, P.cos_p: _bounded,
    P.erf_p: _bounded, P.atan_p: _bounded, P.abs_p: _abs, P.square_p: _square,
    P.integer_pow_p: _integer_pow, P.sqrt_p: _sqrt, P.rsqrt_p: _rsqrt,
    P.reduce_sum_p: _reduce_sum, P.reduce_max_p: _reduce_extremum,
    P.reduce_min_p: _reduce_extremum, P.cumsum_p: _cumsum,
    P.convert_element_type_p: _convert, P.reduce_precision_p: _reduce_precision,
    P.gather_p: _gather, P.dynamic_update_slice_p: _dynamic_update_slice,
    P.concatenate_p: _concatenate, P.pad_p: _pad, P.sort_p: _sort,
    P.dot_general_p: _dot_general, P.custom_jvp_call_p: _custom_jvp,
})
#: arithmetic rules that only hold for floating-point outputs (integers wrap around)
_FLOAT_ONLY = frozenset({P.neg_p, P.add_p, P.sub_p, P.mul_p, P.div_p, P.abs_p,
                         P.square_p, P.integer_pow_p, P.reduce_sum_p, P.cumsum_p,
                         P.dot_general_p, P.exp_p, P.exp2_p, P.expm1_p, P.log_p,
                         P.log1p_p, P.sqrt_p, P.rsqrt_p, P.logistic_p})


#: primitives that map finite real inputs to finite real outputs (in real arithmetic)
_TOTAL = frozenset(p for p in (
    P.add_p, P.sub_p, P.mul_p, P.neg_p, P.exp_p, P.exp2_p, P.expm1_p, P.sin_p, P.cos_p,
    P.tanh_p, P.logistic_p, P.abs_p, P.max_p, P.min_p, P.select_n_p, P.clamp_p,
    P.square_p, P.erf_p, P.erfc_p, P.atan_p, P.sinh_p, P.cosh_p, P.asinh_p, P.sign_p,
    P.floor_p, P.ceil_p, P.round_p, P.broadcast_in_dim_p, P.reshape_p, P.squeeze_p,
    P.transpose_p, P.slice_p, P.dynamic_slice_p, P.dynamic_update_slice_p, P.rev_p,
    P.concatenate_p, P.pad_p, P.gather_p, P.reduce_sum_p, P.reduce_max_p, P.reduce_min_p,
    P.reduce_prod_p, P.cumsum_p, P.cumprod_p, P.cummax_p, P.cummin_p, P.cumlogsumexp_p,
    P.dot_general_p, P.sort_p, P.copy_p, P.convert_element_type_p, P.reduce_precision_p,
    P.real_p, P.iota_p, P.argmax_p, P.argmin_p,
    getattr(P, "stop_gradient_p", None)) if p is not None)
# (gather: only its operand's elements; a `fill` gather with a NaN fill is no longer
# finite, which the `_gather` rule's own facts already say for floats: handled below)


def _support_check_rule(an, eqn, ins):
    return [ins[0]]  # an identity on the mask (see `_analysis.support_check_p`)


RULES[support_check_p] = _support_check_rule
RULES[transform_p] = _support_check_rule  # the identity on its first operand too


class Signs(Analysis):
    """The sign-facts analysis (floating point, or real arithmetic with `exact=True`)."""

    rules = RULES

    def __init__(self, exact: bool = False, nan_agnostic: bool = False):
        self.exact = exact
        self.nan_agnostic = nan_agnostic

    def literal(self, value):
        facts = _literal(value)
        return facts if self.exact else facts - {"ounit"}

    def join(self, a, b):
        return a & b

    def default(self, eqn, ins):
        return [dtype_facts(_dtype_of(v)) for v in eqn.outvars]

    def opaque(self, eqn, ins):
        return self.default(eqn, ins)

    def eqn(self, eqn, ins):
        if eqn.primitive in _FLOAT_ONLY and not _all_float(eqn):
            return self._finish(eqn, ins, self.default(eqn, ins))
        return self._finish(eqn, ins, super().eqn(eqn, ins))

    def rule(self, eqn, ins):
        """The facts of a primitive's outputs without following sub-jaxprs (for analyses
        that follow them themselves): its rule, or the facts of the output dtypes."""
        rule = self.rules.get(eqn.primitive)
        if (rule is None or (eqn.primitive is P.custom_jvp_call_p and not _is_logaddexp(eqn))
                or (eqn.primitive in _FLOAT_ONLY and not _all_float(eqn))):
            outs = self.default(eqn, ins)
        else:
            outs = rule(self, eqn, ins)
        return self._finish(eqn, ins, outs)

    def _finish(self, eqn, ins, outs):
        """Add what the output dtypes guarantee and, in real arithmetic, finiteness of
        total functions of finite values."""
        if self.exact and eqn.primitive in _TOTAL and not _nan_fill(eqn) and all(
                "fin" in f for f, a in zip(ins, eqn.invars, strict=True)
                if _is_float(_dtype_of(a))):
            outs = [f | FIN if _is_float(_dtype_of(v)) else f
                    for f, v in zip(outs, eqn.outvars, strict=True)]
        outs = [f | dtype_facts(_dtype_of(v)) for f, v in zip(outs, eqn.outvars, strict=True)]
        if self.nan_agnostic:  # facts about the elements that are not NaN
            outs = [f | NUM if _is_float(_dtype_of(v)) else f
                    for f, v in zip(outs, eqn.outvars, strict=True)]
        return outs

    def input(self, var) -> frozenset:
        """Facts of an input: not NaN (the assumption), and what its dtype guarantees."""
        return NUM | dtype_facts(_dtype_of(var))  # (for CHECKS: vacuous, NaN-agnostic)


_FLOAT = Signs(exact=False)
EXACT = Signs(exact=True)
#: What the run-time parameter checks use: facts about the elements that are not NaN.
CHECKS = Signs(nan_agnostic=True)


def _is_program(jaxpr) -> bool:
    """Whether `jaxpr` is a whole expectation program (traced by `_expectation._trace`)."""
    info = str(getattr(getattr(jaxpr, "debug_info", None), "func_src_info", "") or "")
    return info.startswith("flat_fn at ") and "ppl_ext/adev/_expectation.py" in \
        info.replace("\\", "/")


@functools.lru_cache(maxsize=1024)
def facts(jaxpr: core.Jaxpr) -> dict:
    """`{var: facts}` for every variable of `jaxpr`, for the run-time parameter checks.

    These are facts about the elements that are not NaN (`CHECKS`): a check that could
    only fail on a NaN is not compiled, so a NaN parameter, whether an input or made by the
    program (`inf - inf`), gives a NaN estimate, as in NumPyro (which checks no traced
    parameter), never a finite wrong one. A finite invalid value (a fill value, a value
    that underflows to 0 in a narrowing cast, an integer that wraps around) is never
    proven valid. Inputs of the whole program and of sub-jaxprs analysed on their own have
    the facts of their dtypes.
    """
    entry = [CHECKS.input(v) for v in jaxpr.constvars], [CHECKS.input(v) for v in jaxpr.invars]
    return CHECKS.env(jaxpr, *entry)


@functools.lru_cache(maxsize=1024)
def strict_facts(jaxpr: core.Jaxpr) -> dict:
    """`{var: facts}` in floating point with NaN tracked (`"num"` is a real fact here).

    The inputs of a whole program are assumed not NaN; the inputs of a sub-jaxpr (a loop
    body, a branch, a jit body analysed on its own) have only their dtype's facts, since
    the enclosing program may have computed a NaN (`inf - inf`) that it passes in.
    """
    program = _is_program(jaxpr)

    def entry(var):
        return _FLOAT.input(var) if program else dtype_facts(_dtype_of(var))

    return _FLOAT.env(jaxpr, [entry(v) for v in jaxpr.constvars],
                      [entry(v) for v in jaxpr.invars])


def fact_of(jaxpr: core.Jaxpr, atom, strict: bool = False) -> frozenset:
    """The facts of one input of an equation of `jaxpr` (a variable or a literal).

    `strict=False` reads facts about the elements that are not NaN (`facts`), for a site
    whose draw carries a NaN parameter into the estimate (a reparameterised draw is a
    continuous function of its parameters); `strict=True` tracks NaN (`strict_facts`), for
    sites whose draw can hide one (a Bernoulli with NaN probabilities draws 0).
    """
    if isinstance(atom, core.Literal):
        return _FLOAT.literal(atom.val)
    return (strict_facts(jaxpr) if strict else facts(jaxpr)).get(atom, NONE)


def proves(fact: frozenset, constraint) -> bool:
    """Whether `fact` guarantees `constraint` for every element (numpyro's own check)."""
    if constraint is constraints.positive or constraint is constraints.softplus_positive:
        return "pos" in fact
    if constraint is constraints.nonnegative:
        return "nonneg" in fact
    if constraint is constraints.unit_interval:
        return "unit" in fact
    return False
