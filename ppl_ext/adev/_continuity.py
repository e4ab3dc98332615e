"""Static check that reparameterised draws only reach continuous computations.

The pathwise (reparameterisation) gradient of `E[k(x)]` is unbiased when `k` is continuous
in `x`; a step in `k` (a comparison that selects a branch, `floor`, a cast to an integer, a
payload reordered by a sort on `x`, a log density that is `-inf` outside an interval that
`x` crosses) contributes a boundary term that the pathwise estimator silently misses. This
module finds such steps in the traced program before any estimate is computed.

`check_continuity(jaxpr)` is an analysis on the engine of `_analysis.py`
(`Continuity`). Each variable gets a `CVal`:

- `taint`: None (does not depend on a reparameterised draw), a `Path` (a floating value
  that depends on one, continuously so far) or a `Step` (a boolean or integer value
  computed from a path or a step: it jumps as the draw moves);
- `facts`: what the value satisfies in real arithmetic (`_signs.EXACT`: finite, positive,
  in `[0, 1]`, ...). A draw lies in the interior of its site's support (its boundary has
  probability 0), and values that no draw moves are taken to be finite, as every rule
  here does (`x * p` is continuous in `x` only for a finite `p`);
- `canon`: a key that equal values share (a value, its numpy-style broadcasts, and the
  value of a point mass `Delta(v)`, which is `v`);
- `moves`: whether the value may change with the program's inputs (what it is
  differentiated by: its floating parameters and arguments, not concrete constants closed
  over) when every draw's noise is held fixed. A pathwise draw `g(φ, ε)` moves when its
  law does; another estimator's draw does not (its estimator accounts for its law);
  everything else moves when an operand does.

A jump only biases the pathwise gradient where it moves: a step computed from values
that do not move (`x > 0`, `floor(x)` for a draw `x` from a law without parameters, such
as `Normal(0, 1)`) switches at a place that stays fixed as the parameters change, and the
draw's pathwise derivative is zero, so nothing is missed. Such steps are accepted. A step
that moves is still a violation: `x > theta` (the place moves with `theta`), or `x > 0`
for `x ~ Normal(theta, 1)`.

A floating result computed from a step, a step primitive (`floor`, `ceil`, `round`,
`sign`, `rem`, `nextafter`, `atan2`, `reduce_precision`) applied to a path, a branch,
select or loop predicate on a path or a step, a payload sorted by a path key (`lax.sort`
with `num_keys`, `argsort`), or a primitive whose inside the analysis does not see
(`custom_linear_solve`, `select_and_scatter`, `pure_callback`, ...) that receives a path
or a step, is a violation: `UnsupportedEstimatorError` naming the site, the primitive, the
source line and the way out (another estimator, or `px.Reparam(allow_discontinuous=True)`).
Such a primitive with sample sites inside is refused by name (`UnsupportedPrimitiveError`).
Calls (jit, checkpoint, custom_jvp/custom_vjp bodies, shard_map bodies, ...), branches,
loops (to a fixpoint over the carries), variadic reductions (an argmax written with
`lax.reduce` compares inside its computation) and scatter updates follow the engine's
generic rules, so the code inside them is judged like any other.

Comparisons that are constant where the draws live are not steps: `x == x`, `x != x`
(`isnan`), a comparison whose outcome the facts decide (`p > 0` for a positive `p`), and
`x == c` for the draw `x` of a continuous site and a `c` that no reparameterised draw moves
(such a draw has no atoms); `where(x == c, c, x)` is `x`. A point mass `Delta(v)` draws
nothing: its value carries `v`'s taint, so `log(value == v)` in its density is constant and
a discontinuity downstream is reported for the draws that `v` depends on.

Library code is not trusted wholesale. Only functions whose case splits are numerical
safeguards of a continuous function are (`_TRUSTED_FUNCTIONS`, each with its reason):
logsumexp and softmax (a max shift that cancels exactly), jax.nn activations written with
`where` that are continuous at the switch (elu, leaky_relu, hard_tanh, ...), piecewise
approximations of one function (`log_ndtr`, `ndtr`, `ndtri`, `betaln`), ppl_ext's
Bernoulli log density, and two numpyro log densities whose split is continuous
(AsymmetricLaplace, Beta). A step made inside such a function is forgiven only inside it
(the enclosing equations' frames count too: a jit body's own frames stop at the traced
function); a step made elsewhere stays a step when it passes through one. `xlogy(x, y)` and
`xlog1py(x, y)` (Gamma, Beta, Dirichlet densities) switch at `x = 0`, which is continuous
where `log y` is finite: they are continuous when the facts prove `y > 0` (`y > -1`) or
`y` is not moved by any draw (parameters and data are taken to be valid, like finite).
Everything else, numpyro's log densities and `jax.scipy.stats` included, is analysed like
user code: `jax.scipy.stats.uniform.logpdf(x, 0, theta)` is `-inf` outside `[0, theta]`
and is refused for a draw `x` that can leave it.

numpyro's support checks (`validate_args`: `log_prob` is `-inf` where `support(value)`
fails) and transforms are marked while an expectation is traced (`_numpyro_fixes.py`:
`_analysis.support_check_p` records the checked constraint, `_analysis.transform_p` a
transform's domain and codomain). A support mask is accepted as constant when the checked
value provably satisfies the constraint where the draws live: the value is a site's own
draw (possibly broadcast; event constraints such as the simplex need the draw itself) or a
transform's output whose input lies in its domain, and that support or codomain lies
inside the constraint; or the value's facts prove the constraint (a `real` check of
`log(x)` for a positive draw `x`, a `positive` check of `exp(x)`). Otherwise it is a step:
a model density evaluated at a draw that can leave its support (`Exponential(1).log_prob(z)`
for `z ~ Normal`) is refused. JAX caches traces of jitted functions: a function first
traced outside an expectation keeps its unmarked checks, which are then refused
(conservatively).

The check is conservative: `jnp.where(x > 0, x, 0.0)` is continuous but flagged; such a
site can opt out with `px.Reparam(allow_discontinuous=True)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.extend.core import primitives as P
from jax._src import source_info_util
from numpyro.distributions import constraints

from ._analysis import (Analysis, carries_code, has_sites, sub_jaxprs, support_check_p,
                        transform_p)
from ._errors import UnsupportedEstimatorError, UnsupportedPrimitiveError
from ._signs import EXACT, FIN, NONE, POS, UNIT, OUNIT, dtype_facts

# ----------------------------------------------------------------------------- domain


class Path(NamedTuple):
    """A floating value that depends continuously (so far) on the draw of `site`."""

    site: str


class Step(NamedTuple):
    """A value that jumps as the draw of `site` moves: made by `primitive` at `where`.

    `trusted` holds the `(file suffix, function)` of the trusted library functions the
    step was made in (it is forgiven inside them only).
    """

    site: str
    primitive: str
    where: str
    trusted: frozenset = frozenset()


class CVal(NamedTuple):
    taint: Any  # None, Path or Step
    facts: frozenset  # exact facts (see the module docstring)
    canon: Any  # a hashable key shared by equal values, or None
    moves: bool = False  # may change with the inputs, every draw's noise held fixed


CLEAN = CVal(None, FIN, None)


def _is_float(var) -> bool:
    dtype = getattr(getattr(var, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _shape(var) -> tuple:
    return tuple(getattr(getattr(var, "aval", None), "shape", ()))


def _where(eqn) -> str:
    return source_info_util.summarize(eqn.source_info)


def _violation(site: str, what: str) -> UnsupportedEstimatorError:
    return UnsupportedEstimatorError(
        f"{site} is reparameterised, but the program is discontinuous in its value: {what}. "
        "The pathwise gradient would miss the jump and be biased. Use estimator="
        "px.reinforce or px.mvd for this site (px.enum if it is discrete), or "
        "px.Reparam(allow_discontinuous=True) if the program is continuous where the "
        "branch switches (e.g. jnp.where(x > 0, x, 0.0))."
    )


# ----------------------------------------------------------------- trusted functions

#: Library functions whose case splits are safeguards of a continuous function, with why:
_TRUSTED_FUNCTIONS: dict[str, frozenset[str]] = {
    # logsumexp(a) = log(sum(exp(a - s))) + s for the stop_gradient'ed shift
    # s = max(a) (0 if not finite): the shift cancels exactly, and `sign`/`abs` of a sum
    # of exponentials only matter for negative weights `b` (the result is then NaN).
    "jax/_src/ops/special.py": frozenset({"logsumexp"}),
    # continuous activations written with `where`: elu(x) = x or alpha*expm1(x) (both 0
    # at 0), leaky_relu (x or slope*x), hard_tanh (clip to [-1, 1]), sparse_plus (0,
    # (x+1)^2/4, x: equal at -1 and 1), sparse_sigmoid, celu/selu (via elu), relu6,
    # hard_sigmoid/hard_silu (relu6), softmax/log_softmax (a stop_gradient'ed max shift
    # that cancels), standardize, logmeanexp (logsumexp).
    "jax/_src/nn/functions.py": frozenset({
        "elu", "leaky_relu", "hard_tanh", "sparse_plus", "sparse_sigmoid", "celu", "selu",
        "relu6", "hard_sigmoid", "hard_silu", "hard_swish", "softmax", "_softmax",
        "log_softmax", "_log_softmax", "standardize", "logmeanexp", "logsumexp"}),
    # piecewise approximations of the normal cdf, its log and its inverse: the pieces
    # approximate one continuous function and meet to within float rounding.
    "jax/_src/scipy/special.py": frozenset({"log_ndtr", "ndtr", "ndtri", "_ndtri",
                                            "_log_ndtr_lower"}),
    # betaln: a small-b and a large-b evaluation of one continuous function (switch at
    # b = 8), and algdiv's two orders of the same sum.
    "jax/_src/third_party/scipy/betaln.py": frozenset({"betaln", "algdiv"}),
    # ppl_ext's Bernoulli log density: `where(isfinite(x), softplus(x) - x y, limit)`
    # picks, at x = ±inf only, the limit of the finite formula (continuous in the extended
    # reals; a value that is finite never switches).
    "ppl_ext/_numpyro_fixes.py": frozenset({"binary_cross_entropy_with_logits"}),
    # numpyro log densities with a case split that is continuous at the switch:
    # AsymmetricLaplace: -|z| / (left or right scale by the sign of z): 0 at z = 0 both ways.
    # Beta: the Dirichlet density of (x, 1 - x), whose simplex check holds for every x in
    # [0, 1] (to rounding), with x in {0, 1} masked by 0.5 for NaN-free gradients (the
    # boundary has probability 0); Beta's own support check is made outside it.
    "numpyro/distributions/continuous.py": frozenset({"AsymmetricLaplace.log_prob",
                                                       "Beta.log_prob"}),
}


def _frame_keys(eqn) -> frozenset:
    """The trusted library functions on the traceback of `eqn` (its own frames only)."""
    traceback = eqn.source_info.traceback
    if traceback is None:
        return frozenset()
    keys = set()
    for frame in traceback.frames:
        name = frame.file_name.replace("\\", "/")
        for suffix, functions in _TRUSTED_FUNCTIONS.items():
            if name.endswith(suffix) and frame.function_name in functions:
                keys.add((suffix, frame.function_name))
    return frozenset(keys)


# ------------------------------------------------------------------ constraint specs


class _Leaf:
    """A placeholder for a flattened operand of a sample site (its position)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _ref(value, operands: list | None):
    """A hashable reference to a constraint bound: a constant, a site leaf or an operand."""
    if isinstance(value, _Leaf):
        return ("leaf", value.index)
    if isinstance(value, (bool, int, float)) and not isinstance(value, jax.core.Tracer):
        return ("const", float(value))
    if isinstance(value, (np.ndarray, np.generic)) and np.size(value) >= 1:
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.number) and np.all(array == array.flat[0]):
            return ("const", float(array.flat[0]))
    if operands is None:
        return ("unknown",)
    operands.append(value)
    return ("arg", len(operands) - 1)


def constraint_spec(constraint, operands: list | None = None):
    """A hashable description of a numpyro constraint, with references for its bounds.

    Array-valued bounds are appended to `operands` (when given) and referenced by
    position; `_Leaf` placeholders (a site's flattened operands) by leaf index.
    """
    c = constraints
    try:
        if isinstance(constraint, c._IndependentConstraint):
            return ("independent", int(constraint.reinterpreted_batch_ndims),
                    constraint_spec(constraint.base_constraint, operands))
        if isinstance(constraint, c._Real):
            return ("real",)
        if isinstance(constraint, c._OpenInterval):
            return ("open", _ref(constraint.lower_bound, operands),
                    _ref(constraint.upper_bound, operands))
        if isinstance(constraint, c._Interval):
            return ("interval", _ref(constraint.lower_bound, operands),
                    _ref(constraint.upper_bound, operands))
        if isinstance(constraint, c._GreaterThanEq):
            return ("ge", _ref(constraint.lower_bound, operands))
        if isinstance(constraint, c._GreaterThan):
            return ("gt", _ref(constraint.lower_bound, operands))
        if isinstance(constraint, c._LessThanEq):
            return ("le", _ref(constraint.upper_bound, operands))
        if isinstance(constraint, c._LessThan):
            return ("lt", _ref(constraint.upper_bound, operands))
        if isinstance(constraint, c._SingletonConstraint) and not constraint.is_discrete:
            return ("singleton", type(constraint).__name__)
    except Exception:  # noqa: BLE001 - an odd constraint: unknown
        pass
    return ("unknown",)


def mark_support(mask, value, constraint, owner: str = "a distribution"):
    """`mask` (numpyro's `support(value)`), marked with the checked constraint for the
    continuity check. Called while an expectation is traced (`_numpyro_fixes.py`)."""
    operands: list = []
    spec = constraint_spec(constraint, operands)
    return support_check_p.bind(mask, value, *operands, spec=spec, owner=str(owner))


def mark_transform(y, x, domain, codomain):
    """`y = T(x)` marked with `T`'s domain and codomain for the continuity check (also
    `x = T^{-1}(y)` with the two swapped). Called while an expectation is traced."""
    operands: list = []
    spec_in = constraint_spec(domain, operands)
    spec_out = constraint_spec(codomain, operands)
    if spec_out == ("unknown",):
        return y
    return transform_p.bind(y, x, *operands, spec_in=spec_in, spec_out=spec_out)


_ELEMENTWISE = frozenset({"real", "gt", "ge", "lt", "le", "interval", "open"})


def _strip(spec):
    while spec[0] == "independent":
        spec = spec[2]
    return spec


def _support_facts(spec) -> frozenset:
    """Exact facts of a draw from a continuous distribution with support `spec` (the
    interior of the support: the boundary has probability 0)."""
    spec = _strip(spec)
    kind = spec[0]
    if kind == "real" or kind in ("lt", "le"):
        return FIN
    if kind in ("gt", "ge"):
        lo = spec[1]
        return POS | FIN if lo[0] == "const" and lo[1] >= 0 else FIN
    if kind in ("interval", "open"):
        lo, hi = spec[1], spec[2]
        facts = FIN
        if lo[0] == "const" and lo[1] >= 0:
            facts = facts | POS
            if hi[0] == "const" and hi[1] <= 1:
                facts = facts | OUNIT
        return facts
    if kind == "singleton":
        name = spec[1]
        if name == "_Simplex":
            return UNIT | POS
        if name in ("_PositiveOrderedVector",):
            return POS | FIN
        if name in ("_OrderedVector", "_LowerCholesky", "_CorrCholesky", "_CorrMatrix",
                    "_PositiveDefinite", "_PositiveSemiDefinite", "_ScaledUnitLowerCholesky",
                    "_SoftplusLowerCholesky", "_Sphere", "_L1Ball", "_Circular",
                    "_UnitInterval", "_RealVector", "_RealMatrix", "_ZeroSum",
                    "_PositiveDefiniteCirculantVector"):
            return FIN
    return NONE


def _proven_by_facts(spec, facts: frozenset) -> bool:
    """Whether every element with `facts` satisfies the (elementwise) constraint."""
    spec = _strip(spec)
    kind = spec[0]
    if kind == "real":
        return "fin" in facts
    if kind in ("gt", "ge"):
        lo = spec[1]
        if lo[0] != "const":
            return False
        if lo[1] < 0 or (lo[1] == 0 and kind == "ge"):
            return "nonneg" in facts
        return lo[1] == 0 and "pos" in facts
    if kind in ("interval", "open"):
        lo, hi = spec[1], spec[2]
        if lo[0] != "const" or hi[0] != "const":
            return False
        if kind == "interval" and lo[1] <= 0 and hi[1] >= 1:
            return "unit" in facts
        if kind == "open" and lo[1] <= 0 and hi[1] >= 1:
            return "ounit" in facts or ("unit" in facts and lo[1] < 0 and hi[1] > 1)
    return False


def _le(a, b) -> bool:
    """Whether bound reference `a` is provably <= bound reference `b` (resolved refs)."""
    if a[0] == "const" and b[0] == "const":
        return a[1] <= b[1]
    return a == b and a[0] == "canon" and a[1] is not None


def _within(site_spec, checked) -> bool:
    """Whether the interior of a support `site_spec` lies inside `checked` (resolved)."""
    s, c = _strip(site_spec), _strip(checked)
    if c[0] == "real":
        return "fin" in _support_facts(s)
    if s == c and s[0] != "unknown":
        return True
    lower = {"gt": 1, "ge": 1, "interval": 1, "open": 1}
    upper = {"lt": 1, "le": 1, "interval": 2, "open": 2}
    if c[0] not in lower and c[0] not in upper:
        return False
    if c[0] in lower and (s[0] not in lower or not _le(c[lower[c[0]]], s[lower[s[0]]])):
        return False
    if c[0] in upper and (s[0] not in upper or not _le(s[upper[s[0]]], c[upper[c[0]]])):
        return False
    return True


def _resolve(spec, ref_to):
    """Replace the references of a spec by resolved ones (`ref_to(ref)`)."""
    if isinstance(spec, tuple) and spec and spec[0] in ("leaf", "arg"):
        return ref_to(spec)
    if isinstance(spec, tuple):
        return tuple(_resolve(x, ref_to) for x in spec)
    return spec


# ------------------------------------------------------------------------ sites


@functools.lru_cache(maxsize=1024)
def _site_shape(tree):
    """`(support spec with leaf refs, Delta v leaf index or None, transformed point mass)`
    of a sample site, from its flattened distribution."""
    import numpyro.distributions as dist

    try:
        leaves = [_Leaf(i) for i in range(tree.num_leaves)]
        distribution, _ = jax.tree.unflatten(tree, leaves)
    except Exception:  # noqa: BLE001
        return ("unknown",), None, False
    try:
        spec = constraint_spec(distribution.support)
    except Exception:  # noqa: BLE001 - a support computed from the parameters
        spec = ("unknown",)
    d, transformed = distribution, False
    while isinstance(d, dist.Distribution):
        if isinstance(d, dist.Delta):
            v = d.__dict__.get("v")
            if transformed or not isinstance(v, _Leaf):
                return spec, None, True
            return spec, v.index, False
        if isinstance(d, dist.TransformedDistribution):
            transformed = True
        elif not isinstance(d, (dist.Independent, dist.ExpandedDistribution,
                                dist.MaskedDistribution)):
            return spec, None, False
        d = getattr(d, "base_dist", None)
    return spec, None, False


def _np_broadcast(in_shape: tuple, out_shape: tuple, dims) -> bool:
    """Whether a broadcast_in_dim is numpy-style (right-aligned, size-1 axes expanded)."""
    dims = tuple(int(d) for d in dims)
    k = len(in_shape)
    if dims != tuple(range(len(out_shape) - k, len(out_shape))):
        return False
    return all(i == 1 or i == out_shape[d] for i, d in zip(in_shape, dims, strict=True))


def _bcast(canon, out_shape):
    if canon is None:
        return None
    if isinstance(canon, tuple) and canon and canon[0] == "bcast":
        canon = canon[1]
    return ("bcast", canon, tuple(out_shape))


def _root(canon):
    if isinstance(canon, tuple) and canon and canon[0] == "bcast":
        return canon[1]
    return canon


# --------------------------------------------------------------------------- analysis

_STEP_PRIMITIVES = frozenset({P.floor_p, P.ceil_p, P.round_p, P.sign_p, P.rem_p,
                              P.nextafter_p, P.atan2_p, P.reduce_precision_p})
_COMPARISONS = frozenset({P.eq_p, P.ne_p, P.lt_p, P.le_p, P.gt_p, P.ge_p})


_FLIP = {P.lt_p: P.gt_p, P.le_p: P.ge_p, P.gt_p: P.lt_p, P.ge_p: P.le_p,
         P.eq_p: P.eq_p, P.ne_p: P.ne_p}


def _decided(prim, a: CVal, b: CVal) -> bool:
    """Whether the facts of one side decide its comparison with a constant (the other side),
    e.g. `p > 0` for a positive `p` (in real arithmetic, for every draw)."""
    if b.taint is None and isinstance(b.canon, tuple) and b.canon[0] == "const":
        x, c = a.facts, b.canon[1]
    elif a.taint is None and isinstance(a.canon, tuple) and a.canon[0] == "const":
        x, c, prim = b.facts, a.canon[1], _FLIP[prim]
    else:
        return False
    # what the facts say about x: x >= lo (x > lo if strict) and x <= hi (x < hi if strict)
    lo, lo_strict, hi, hi_strict = -np.inf, False, np.inf, False
    if "fin" in x:
        lo_strict = hi_strict = True
    if "nonneg" in x:
        lo, lo_strict = 0.0, "pos" in x
    if "unit" in x:
        hi, hi_strict = 1.0, "ounit" in x
    above = c < lo or (c == lo and lo_strict)  # x > c always
    at_least = c <= lo  # x >= c always
    below = c > hi or (c == hi and hi_strict)  # x < c always
    at_most = c >= hi  # x <= c always
    if prim in (P.gt_p, P.le_p):
        return above or at_most
    if prim in (P.ge_p, P.lt_p):
        return at_least or below
    return above or below  # eq, ne: x != c always


class Continuity(Analysis):
    """The continuity analysis of one program (see the module docstring)."""

    def __init__(self):
        self.sites: dict[Any, Any] = {}  # draw canon -> resolved support spec
        self._stack: list = []  # the equations whose sub-jaxprs are being analysed
        self._frame_cache: dict[int, frozenset] = {}

    def eqn(self, eqn, ins):
        if eqn.primitive in self.rules or not carries_code(eqn):
            outs = super().eqn(eqn, ins)
        else:
            self._stack.append(eqn)
            try:
                outs = super().eqn(eqn, ins)
            finally:
                self._stack.pop()
        if eqn.primitive in _OWN_MOVES or not any(c.moves for c in ins):
            return outs
        return [o if o.moves else o._replace(moves=True) for o in outs]

    def _keys(self, eqn) -> frozenset:
        """The trusted functions `eqn` runs in: its own frames and those of the equations
        whose bodies enclose it (a jit body's frames stop at the traced function, and a
        cached body keeps the frames of its first trace)."""
        keys = set()
        for e in (*self._stack, eqn):
            found = self._frame_cache.get(id(e))
            if found is None:
                found = self._frame_cache[id(e)] = _frame_keys(e)
            keys |= found
        return frozenset(keys)

    # -- domain

    def literal(self, value):
        canon = None
        try:
            array = np.asarray(value)
            if array.size >= 1 and np.issubdtype(array.dtype, np.number) and \
                    np.all(array == array.flat[0]):
                canon = ("const", float(array.flat[0]))
        except Exception:  # noqa: BLE001
            pass
        return CVal(None, EXACT.literal(value), canon)

    def join(self, a, b):
        taint = a.taint
        if isinstance(b.taint, Step) or taint is None:
            taint = b.taint if not isinstance(taint, Step) else taint
        return CVal(taint, a.facts & b.facts, a.canon if a.canon == b.canon else None,
                    a.moves or b.moves)

    def same(self, a, b):
        return (type(a.taint) is type(b.taint) and a.facts == b.facts
                and a.canon == b.canon and a.moves == b.moves)

    # -- violations (forgiven inside the trusted function a step was made in)

    def _raise(self, eqn, taint, what, moves: bool = True):
        """Raise a violation, unless forgiven: a step made in a trusted function (see
        `_TRUSTED_FUNCTIONS`) used in that function, or a step made at `eqn` (a path
        `taint`) inside a trusted function; or a jump that stays where it is (`moves`
        false: the values that jump do not change with the inputs, every draw's noise
        held fixed, so the jump is at a fixed place and the pathwise derivative, zero
        through such draws, misses nothing)."""
        if not moves:
            return
        if isinstance(taint, Step):
            if taint.trusted & self._keys(eqn):
                return
        elif self._keys(eqn):
            return
        raise _violation(taint.site, what)

    def _feeds(self, step: Step, eqn) -> str:
        return (f"'{step.primitive}' at {step.where} feeds '{eqn.primitive.name}' at "
                f"{_where(eqn)}")

    def _step(self, site, primitive, eqn) -> Step:
        return Step(site, primitive, _where(eqn), self._keys(eqn))

    def guard(self, eqn, value, what: str):
        """A branch/select/loop predicate must not depend on a draw."""
        taint = value.taint
        if taint is None or not value.moves:
            return
        via = (f"'{taint.primitive}' at {taint.where}" if isinstance(taint, Step)
               else f"'{eqn.primitive.name}' at {_where(eqn)}")
        self._raise(eqn, taint, f"{what} depends on it through {via}")

    def branch_index(self, eqn, index):
        self.guard(eqn, index, "a lax.cond/switch (or jnp.where on a traced branch)")

    def loop_predicate(self, eqn, predicate):
        self.guard(eqn, predicate, "a while_loop condition")

    # -- generic rules

    def _facts(self, eqn, ins, taints):
        facts = EXACT.rule(eqn, [c.facts for c in ins])
        return [f | FIN if t is None and _is_float(v) else f
                for f, t, v in zip(facts, taints, eqn.outvars, strict=True)]

    def _outs(self, eqn, ins, taints, canons=None):
        facts = self._facts(eqn, ins, taints)
        if canons is None:
            canons = [v if t is not None else None for v, t in zip(eqn.outvars, taints)]
        return [CVal(t, f, c) for t, f, c in zip(taints, facts, canons, strict=True)]

    def default(self, eqn, ins):
        step = next((c.taint for c in ins if isinstance(c.taint, Step)), None)
        path = next((c.taint for c in ins if isinstance(c.taint, Path)), None)
        if step is None and path is None:
            return self._outs(eqn, ins, [None] * len(eqn.outvars))
        prim = eqn.primitive
        if prim in _COMPARISONS and len(ins) == 2 and self._constant_comparison(prim, *ins):
            return self._outs(eqn, ins, [None])
        if prim in (P.eq_p, P.ne_p) and len(ins) == 2:
            outs = self._equality(eqn, ins)
            if outs is not None:
                return outs
        step_moves = any(c.moves for c in ins if isinstance(c.taint, Step))
        any_moves = any(c.moves for c in ins)  # where a step primitive jumps
        taints = []
        for var in eqn.outvars:
            if _is_float(var):
                if step is not None:
                    self._raise(eqn, step, self._feeds(step, eqn), step_moves)
                    taints.append(path or Path(step.site))
                    continue
                if prim in _STEP_PRIMITIVES:
                    self._raise(eqn, path, f"'{prim.name}' at {_where(eqn)}", any_moves)
                taints.append(path)
            elif step is not None:
                taints.append(step)
            else:
                taints.append(self._step(path.site, prim.name, eqn))
        return self._outs(eqn, ins, taints)

    def _constant_comparison(self, prim, a: CVal, b: CVal) -> bool:
        """`x == x`, `x != x` (isnan), `x < x`, ...: constant. `x == c` for a draw `x` of a
        continuous site and a `c` that no reparameterised draw moves: constant (false)
        with probability 1, as such a draw has no atoms (a point mass is not a site's own
        draw here: its value is its parameter's, see `_sample`)."""
        if a.canon is not None and _root(a.canon) == _root(b.canon):
            return True
        if _decided(prim, a, b):
            return True
        if prim in (P.eq_p, P.ne_p):
            for x, c in ((a, b), (b, a)):
                if c.taint is None and _root(x.canon) in self.sites:
                    return True
        return False

    def _equality(self, eqn, ins):
        """`x == c` / `x != c` for a constant `c`: a step that remembers `(x, c)`, so that
        `where(x == c, c, x)` (which is `x`) is recognised (`_select_n`)."""
        a, b = ins
        if isinstance(b.canon, tuple) and b.canon[0] == "const" and b.taint is None:
            x, c = a, b.canon[1]
        elif isinstance(a.canon, tuple) and a.canon[0] == "const" and a.taint is None:
            x, c = b, a.canon[1]
        else:
            return None
        if not isinstance(x.taint, Path) or x.canon is None:
            return None
        taint = self._step(x.taint.site, eqn.primitive.name, eqn)
        kind = "eq" if eqn.primitive is P.eq_p else "ne"
        return self._outs(eqn, ins, [taint], [(kind, _root(x.canon), c)])

    def opaque(self, eqn, ins):
        tainted = next((c.taint for c in ins if isinstance(c.taint, Step)), None) or \
            next((c.taint for c in ins if c.taint is not None), None)
        if any(has_sites(sub) for sub in sub_jaxprs(eqn.params)):
            raise UnsupportedPrimitiveError(
                f"ppl_ext cannot analyse the primitive '{eqn.primitive.name}' because it "
                f"has sample sites inside it (at {_where(eqn)}). Move the px.sample calls "
                "out of it, or write it with jit, cond/switch, scan, fori_loop or "
                "while_loop.")
        if tainted is None:
            return self._outs(eqn, ins, [None] * len(eqn.outvars))
        what = (f"'{eqn.primitive.name}' at {_where(eqn)}, a primitive whose inside "
                "ppl_ext does not analyse (it counts as a step)")
        if isinstance(tainted, Step):
            what = f"{self._feeds(tainted, eqn)}, a primitive whose inside ppl_ext does " \
                   "not analyse"
        taints = []
        for var in eqn.outvars:
            if _is_float(var):
                self._raise(eqn, tainted, what, any(c.moves for c in ins))
                taints.append(Path(tainted.site))
            else:
                taints.append(self._step(tainted.site, eqn.primitive.name, eqn))
        return [CVal(t, dtype_facts(getattr(v.aval, "dtype", None)), None)
                for t, v in zip(taints, eqn.outvars, strict=True)]

    def scatter_indices(self, eqn, outs, indices):
        if isinstance(indices.taint, Step):
            self._raise(eqn, indices.taint, self._feeds(indices.taint, eqn), indices.moves)
        return outs

    # -- special rules

    def _select_n(self, eqn, ins):
        cases = ins[1:]
        pred = ins[0].canon
        if len(cases) == 2 and isinstance(pred, tuple) and pred[0] in ("eq", "ne"):
            # where(x == c, c, x) and where(x != c, x, c) are x
            x_case, c_case = (cases[0], cases[1]) if pred[0] == "eq" else (cases[1], cases[0])
            if c_case.taint is None and c_case.canon == ("const", pred[2]) and \
                    x_case.canon is not None and _root(x_case.canon) == pred[1]:
                return [x_case]
        self.guard(eqn, ins[0], "a select (jnp.where)")
        out = cases[0]
        for c in cases[1:]:
            out = self.join(out, c)
        facts = EXACT.rule(eqn, [CLEAN.facts] + [c.facts for c in cases])[0]
        taint = out.taint
        if isinstance(taint, Step) and _is_float(eqn.outvars[0]):
            self._raise(eqn, taint, self._feeds(taint, eqn),
                        any(c.moves for c in cases if isinstance(c.taint, Step)))
            taint = Path(taint.site)
        canon = out.canon if all(c.canon == cases[0].canon for c in cases) else None
        if taint is not None and canon is None:
            canon = eqn.outvars[0]
        if taint is None:
            facts = facts | FIN if _is_float(eqn.outvars[0]) else facts
        return [CVal(taint, facts, canon)]

    def _convert(self, eqn, ins):
        (x,) = ins
        if x.taint is None and isinstance(x.canon, tuple) and x.canon[0] == "const" and \
                _is_float(eqn.outvars[0]):
            return [self.default(eqn, ins)[0]._replace(canon=x.canon)]
        if isinstance(x.taint, Path) and not _is_float(eqn.outvars[0]):
            self._raise(eqn, x.taint, f"a cast to {eqn.params['new_dtype']} at {_where(eqn)}",
                        x.moves)
        outs = self.default(eqn, ins)
        if x.taint is not None and getattr(eqn.invars[0].aval, "dtype", None) == \
                eqn.params["new_dtype"]:
            outs = [outs[0]._replace(canon=x.canon)]  # a weak-type change: the same value
        return outs

    def _same_value(self, eqn, ins):
        outs = self.default(eqn, ins)
        if ins[0].taint is not None:
            outs = [o._replace(canon=ins[0].canon) for o in outs]
        return outs

    def _broadcast_in_dim(self, eqn, ins):
        outs = self.default(eqn, ins)
        x = ins[0]
        if x.taint is None and isinstance(x.canon, tuple) and x.canon[0] == "const":
            return [outs[0]._replace(canon=x.canon)]
        if x.taint is not None and x.canon is not None and _np_broadcast(
                _shape(eqn.invars[0]), _shape(eqn.outvars[0]),
                eqn.params["broadcast_dimensions"]):
            out_shape = _shape(eqn.outvars[0])
            canon = x.canon if out_shape == _shape(eqn.invars[0]) else _bcast(x.canon, out_shape)
            outs = [outs[0]._replace(canon=canon)]
        return outs

    def _sort(self, eqn, ins):
        num_keys = eqn.params.get("num_keys", 1)
        keys = ins[:num_keys]
        key_taint = next((c.taint for c in keys if isinstance(c.taint, Step)), None) or \
            next((c.taint for c in keys if c.taint is not None), None)
        if key_taint is None:
            return self.default(eqn, ins)
        outs = []
        facts = EXACT.rule(eqn, [c.facts for c in ins])
        for i, (var, c) in enumerate(zip(eqn.outvars, ins, strict=True)):
            if i == 0:  # the sorted first key: a continuous function of it
                outs.append(CVal(c.taint, facts[0], var if c.taint is not None else None))
                continue
            # every other output is permuted by the order of the keys, which jumps
            if _is_float(var):
                self._raise(eqn, key_taint, f"'sort' at {_where(eqn)} orders operand {i} "
                            "by a key that depends on it (a payload of lax.sort / argsort "
                            "reorders as the draw moves)", any(c.moves for c in keys))
                outs.append(CVal(Path(key_taint.site), facts[i], var))
            else:
                taint = key_taint if isinstance(key_taint, Step) else \
                    self._step(key_taint.site, "sort", eqn)
                outs.append(CVal(taint, facts[i], var))
        return outs

    def _sample(self, eqn, ins):
        params = eqn.params
        label = params["label"]
        step = next((c.taint for c in ins if isinstance(c.taint, Step)), None)
        if step is not None:
            self._raise(eqn, step, f"'{step.primitive}' at {step.where} sets the "
                        f"parameters of {label}",
                        any(c.moves for c in ins if isinstance(c.taint, Step)))
        # A pathwise draw `g(φ, ε)` changes with the inputs (its noise held fixed) when its
        # law does; another estimator's draw carries no derivative, and the estimator's
        # own terms account for its law.
        moves = bool(params["pathwise"]) and any(c.moves for c in ins)
        spec, delta_leaf, transformed_point = _site_shape(params["tree"])
        out_var = eqn.outvars[0]
        if delta_leaf is not None or transformed_point:
            # a point mass: its value is a function of its parameters, no new randomness
            if delta_leaf is not None:
                v = ins[delta_leaf]
                v_shape, out_shape = _shape(eqn.invars[delta_leaf]), _shape(out_var)
                if v.taint is None:
                    return [CVal(None, v.facts | FIN, None, moves)]
                if v_shape == out_shape:
                    canon = v.canon
                elif len(v_shape) <= len(out_shape) and _np_broadcast(
                        v_shape, out_shape, range(len(out_shape) - len(v_shape),
                                                  len(out_shape))):
                    canon = _bcast(v.canon, out_shape)
                else:
                    canon = None
                return [CVal(v.taint, v.facts, canon, moves)]
            taint = next((c.taint for c in ins if c.taint is not None), None)
            return [CVal(taint, _support_facts(spec) if taint else FIN, None, moves)]
        facts = _support_facts(spec)

        def resolve(ref):
            atom = eqn.invars[ref[1]]
            if isinstance(atom, core.Literal):
                return self.literal(atom.val).canon or ("unknown",)
            return ("canon", ins[ref[1]].canon if ins[ref[1]].canon is not None else atom)

        self.sites[out_var] = _resolve(spec, resolve)
        taint = Path(label) if params["continuity"] else None
        return [CVal(taint, facts, out_var, moves)]

    def _custom_jvp(self, eqn, ins):
        """jax's `xlogy(x, y)` / `xlog1py(x, y)` (Gamma, Beta, Dirichlet densities): `x log y`
        with `0 log y = 0` made explicit by a split on `x != 0`. Both sides agree where
        `log y` (`log1p y`) is finite, so the split is continuous when `y` is a positive
        finite (greater than -1) value for every draw, or does not depend on any draw (a
        parameter or data: the analysis takes those to be valid, as it takes them to be
        finite everywhere). Otherwise the body is analysed like any call."""
        from ._signs import _jax_function

        body = eqn.params["call_jaxpr"]
        if len(ins) == 2 and len(eqn.outvars) == 1 and not any(
                isinstance(c.taint, Step) for c in ins):
            x, y = ins
            for name, ok in (("xlogy", {"pos", "fin"}), ("xlog1py", {"gtm1", "fin"})):
                if _jax_function(body, (name,), ("scipy/special.py",)) and (
                        y.taint is None or ok <= y.facts):
                    taint = x.taint or y.taint
                    facts = FIN if "fin" in x.facts else NONE
                    return [CVal(taint, facts, eqn.outvars[0] if taint else None)]
        outs = self.call_body(eqn, ins)
        special = EXACT.rule(eqn, [c.facts for c in ins])  # logaddexp (softplus) facts
        return [o._replace(facts=o.facts | f) for o, f in zip(outs, special, strict=True)]

    def call_body(self, eqn, ins):
        self._stack.append(eqn)
        try:
            return self.follow(eqn, ins)
        finally:
            self._stack.pop()

    def _nested(self, eqn, ins):
        return self.run(eqn.params["jaxpr"], [], ins)

    def _support_check(self, eqn, ins):
        mask, value = ins[0], ins[1]
        if mask.taint is None:
            return [mask]
        if not isinstance(value.taint, Path):
            return [mask]  # a step, or a mask that depends on the draws through the bounds

        resolve = self._resolver(eqn, ins)
        checked = _resolve(eqn.params["spec"], resolve)
        if self._accepted(checked, value, eqn):
            return [CVal(None, mask.facts, None)]
        what = (f"the support check of {eqn.params.get('owner', 'a distribution')} "
                f"({_spec_text(eqn.params['spec'])}) that numpyro's validate_args adds to "
                "log_prob (-inf outside the support), on a value that can leave that support")
        step = Step(value.taint.site, what, _user_where(eqn, self._stack), self._keys(eqn))
        return [CVal(step, mask.facts, None)]

    def _resolver(self, eqn, ins):
        """Resolve a constraint spec's references to the equation's bound operands."""

        def resolve(ref):
            atom = eqn.invars[2 + ref[1]]
            if isinstance(atom, core.Literal):
                return self.literal(atom.val).canon or ("unknown",)
            c = ins[2 + ref[1]]
            return ("canon", c.canon if c.canon is not None else atom)

        return resolve

    def _transform(self, eqn, ins):
        y, x = ins[0], ins[1]
        if y.taint is None or not isinstance(x.taint, (Path, type(None))):
            return [y]
        out = y if y.canon is not None else y._replace(canon=eqn.outvars[0])

        resolve = self._resolver(eqn, ins)
        spec_in = _resolve(eqn.params["spec_in"], resolve)
        if x.taint is not None and self._accepted(spec_in, x, eqn):
            out = out._replace(canon=eqn.outvars[0],
                               facts=out.facts | _support_facts(eqn.params["spec_out"]))
            self.sites[eqn.outvars[0]] = _resolve(eqn.params["spec_out"], resolve)
        return [out]

    def _accepted(self, checked, value: CVal, eqn) -> bool:
        base = _strip(checked)
        if base[0] == "real":
            # the mask flips only where the value is ±inf or NaN, where the log density and
            # so the estimate are not finite anyway: no finite estimate is biased by it
            # (the NaN-agnostic rule of the run-time checks of pathwise sites)
            return True
        if base[0] in _ELEMENTWISE and _proven_by_facts(base, value.facts):
            return True
        root = _root(value.canon)
        site = self.sites.get(root)
        if site is None:
            return False
        if base[0] not in _ELEMENTWISE:
            # an event constraint (simplex, ...): the value must be the draw itself, or the
            # draw broadcast over leading axes only
            if value.canon != root:
                shape = value.canon[2]
                if tuple(shape[len(shape) - len(_shape(root)):]) != _shape(root):
                    return False
        return _within(site, checked)


_PACKAGE_DIR = __file__.replace("\\", "/").rsplit("/ppl_ext/", 1)[0] + "/ppl_ext/"


def _library(name: str) -> bool:
    return (name.startswith(_PACKAGE_DIR) or "/jax/" in name or "/jaxlib/" in name
            or "/numpyro/" in name or "/equinox/" in name)


def _user_where(eqn, enclosing=()) -> str:
    """`file:line (function)` of the innermost frame outside ppl_ext, jax, numpyro and
    equinox, looking at `eqn` and then at the equations whose bodies enclose it."""
    for e in (eqn, *reversed(enclosing)):
        traceback = e.source_info.traceback
        for frame in traceback.frames if traceback is not None else ():
            if not _library(frame.file_name.replace("\\", "/")):
                return f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
    return _where(eqn)


def _spec_text(spec) -> str:
    base = _strip(spec)
    if base[0] == "singleton":
        return base[1].lstrip("_").lower()
    if base[0] == "real":
        return "real"

    def ref(r):
        return f"{r[1]:g}" if r[0] == "const" else "a traced bound"

    kinds = {"gt": "> {0}", "ge": ">= {0}", "lt": "< {0}", "le": "<= {0}",
             "interval": "in [{0}, {1}]", "open": "in ({0}, {1})"}
    if base[0] in kinds:
        return "value " + kinds[base[0]].format(*[ref(r) for r in base[1:]])
    return "an unknown constraint"


Continuity.rules = {
    P.select_n_p: Continuity._select_n,
    P.convert_element_type_p: Continuity._convert,
    P.broadcast_in_dim_p: Continuity._broadcast_in_dim,
    P.sort_p: Continuity._sort,
    P.copy_p: Continuity._same_value,
    support_check_p: Continuity._support_check,
    transform_p: Continuity._transform,
    P.custom_jvp_call_p: Continuity._custom_jvp,
}
if hasattr(P, "stop_gradient_p"):
    Continuity.rules[P.stop_gradient_p] = Continuity._same_value


#: primitives whose rules decide `CVal.moves` themselves (see `Continuity.eqn`)
_OWN_MOVES: set = set()


def _register_sites():
    from ._primitives import nested_p, sample_p

    _OWN_MOVES.add(sample_p)
    Continuity.rules[sample_p] = Continuity._sample
    Continuity.rules[nested_p] = Continuity._nested


# --------------------------------------------------------------------------- entry


def check_continuity(jaxpr: core.Jaxpr, fixed: Sequence[bool] = ()) -> None:
    """Raise if a pathwise site's value reaches a discontinuity that affects the outputs.

    `jaxpr` must be free of dead code (`pe.dce_jaxpr`), so that only values that reach the
    outputs are judged. Its floating inputs (constants, then arguments) are what the
    program may be differentiated by, except those marked in `fixed` (one flag per input,
    constants first; e.g. concrete arrays closed over when it was traced).
    """
    if not _has_pathwise(jaxpr):
        return
    if not _REGISTERED:
        _register()
    analysis = Continuity()
    variables = jaxpr.constvars + jaxpr.invars
    fixed = list(fixed) + [False] * (len(variables) - len(fixed))
    inputs = [CVal(None, FIN | dtype_facts(getattr(v.aval, "dtype", None)), None,
                   _is_float(v) and not f) for v, f in zip(variables, fixed)]
    analysis.run(jaxpr, inputs[:len(jaxpr.constvars)], inputs[len(jaxpr.constvars):])


_REGISTERED = False


def _register():
    global _REGISTERED
    _register_sites()
    _REGISTERED = True


def _has_pathwise(jaxpr: core.Jaxpr) -> bool:
    return _first_pathwise(jaxpr) is not None


@functools.lru_cache(maxsize=4096)
def _first_pathwise(jaxpr: core.Jaxpr) -> str | None:
    """The label of the first pathwise site in `jaxpr` (recursively), or None."""
    from ._primitives import sample_p

    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p and eqn.params["continuity"]:
            return eqn.params["label"]
        for sub in sub_jaxprs(eqn.params):
            found = _first_pathwise(sub)
            if found is not None:
                return found
    return None
