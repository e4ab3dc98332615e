"""Unbiased Hessian-vector products of expectation programs (`Expectation.hvp`).

**The estimator.** For a program whose random choices are reparameterised sites
(`x = T(ε, θ)`, `ε` from a law without parameters) and score-function sites (`x ~ p_θ(·)`,
drawn without derivative), let `y(θ)` be its value on one draw of the noise and `L(θ)` the
sum of the score sites' log densities `log p_θ(x)` at their (stopped) draws. The
magic-box (DiCE) surrogate, with `sg` = `jax.lax.stop_gradient`,

    S(θ) = y(θ) · exp(L(θ) - sg(L(θ))) + Σ_i sg(b_i) · (1 - exp(L_i(θ) - sg(L_i(θ)))),

equals `y` in value, and `∇S = ∇y + y ∇L - Σ_i b_i ∇L_i` (the first-order score-function
estimator with baselines `b_i`) and

    ∇²S = ∇²y + ∇y ∇Lᵀ + ∇L ∇yᵀ + y (∇²L + ∇L ∇Lᵀ) - Σ_i b_i (∇²L_i + ∇L_i ∇L_iᵀ),

whose mean is `∇² E[y]`: `∇² ∫ p_θ(x) y(x, θ) dx` differentiated twice under the integral
gives the first four terms (Foerster et al. 2018, "DiCE: the infinitely differentiable
Monte Carlo estimator"), and each baseline term has mean `-b_i ∇² ∫ p_θ(x_i | ·) dx_i = 0`
because `b_i` is computed before site `i` is drawn and carries no derivative (Mao et al.
2019, "A baseline for any order gradient estimation in stochastic computation graphs").
`.hvp` returns the forward-over-reverse product `∇²S · v` (`jax.jvp` of `jax.grad`), one
gradient's cost times a small constant.

**Provisos, checked before anything runs** (`check_second_order`). Differentiating twice
under the integral and along the reparameterisation paths needs more than the first-order
estimator does: the pathwise part must be twice continuously differentiable (C²) in `θ`
and in every reparameterised draw that moves with `θ`, with no kink or jump that moves.
`E_{x~N(θ,1)}|x|` has pathwise second derivative 0 almost everywhere but true second
derivative `2φ(θ)`; a kink is invisible to a pathwise gradient of the gradient. So every
operation whose operands depend on the differentiated argument or on a reparameterised
draw that depends on it (a *moving* value, tracked through `stop_gradient` too, since a
stopped value still moves) must be in an allowlist of C² primitives (`_SMOOTH`);
`sqrt`, `rsqrt`, `cbrt` and `pow` are allowed where the sign analysis
(`_signs.Signs(exact=True)`) proves their base positive in real arithmetic, the
program's inputs and draws being finite reals (`sqrt(x²)` is `|x|`);
`select_n`/`jnp.where`, `cond` indices and `while` predicates must not move (`isfinite`
of a value proven finite does not). Library functions that are C^∞ but written with a
cancelling shift (`logsumexp`, `softmax`, `log_softmax`) or with a branch for infinite
inputs (ppl_ext's Bernoulli log density) and the custom-JVP functions `logaddexp`,
`xlogy`, `xlog1py` of JAX are trusted by name. numpyro's support masks (`validate_args`)
are left to the first-order continuity check, which refuses them unless they are
constant where the draws live. The log density of every score site and the sampler of
every reparameterised site are traced and checked the same way (numpyro's
`clamp_probs` is a clip and is refused there). Everything else that moves is
refused with `SecondOrderError` naming the primitive, the source line and the site or
argument it moves with: `abs`, `max`/`min`/`relu`, `clamp`/`clip`, `sign`, `floor`,
`round`, integer and boolean casts, `sort`, `argmax`, `reduce_max`, custom JVP/VJP
functions, implicit reparameterisation (Gamma, Beta, Dirichlet samplers), and so on.

Estimators: `px.reparam` and `px.reinforce` (`px.Reinforce` with a scalar or
`RunningAverage` baseline) only. `px.enum`, `px.mvd`, `px.LeaveOneOut`, per-element
baselines, user-defined estimators, nested expectations and sample sites inside
`lax.cond`, `lax.while_loop` (JAX has no reverse mode for it) or custom-derivative
functions are refused by name (their second-order correctness is not proved here).
Sites inside `jax.jit` calls and `jax.checkpoint` are interpreted inline, and sites in
`lax.scan` bodies are interpreted in a scan (each iteration its own key, the log
densities carried). Batch-shaped sites (`numpyro.plate`, `.expand`, `jax.vmap` inside
the program) are single sites whose log density sums over their elements. The
first-order analyses still run (a program refused by `.grad` is refused by `.hvp`).
Where every score site is a top-level `px.reinforce` site without a baseline, the
surrogate is causal (`_causal_surrogate`): each additive term of the value carries the
magic boxes of the score sites it depends on only, as `.grad`'s dependency-graph
Rao-Blackwellisation (`_graph.py`) does at first order; measured on a 12-step LQR
policy-gradient objective, the standard deviation of an HVP entry falls from 1,900 to
1,060. Elsewhere (sites in calls or scans, baselines) the whole value multiplies every
score: unbiased, with more variance; no per-element (plate) Rao-Blackwellisation is made.
Run-time parameter checks (`validate_args`) are not made: invalid parameters give NaN.
Differentiating an `.hvp` estimate (a third derivative) raises `SecondOrderError`.
Poles (`1/x`, `log x` at a point a draw reaches with positive density) make the
estimator non-integrable, as they make the first-order one; they are not checked.

**Why a separate interpreter.** The first-order surrogate mode (`_interpreter.py`) builds
`y + sg(y) A - B`, whose second derivative misses `∇y ∇Aᵀ + y ∇A ∇Aᵀ`, and its
variance-reduction machinery (dependency-graph and per-element Rao-Blackwellisation,
continuation estimators, plate groups) was proved at first order only. Reusing it would
mean auditing every one of those paths at second order; a small interpreter that knows
only the two estimators whose magic-box form is proved keeps the sound part small and
leaves the first-order path untouched. It splits keys exactly as the first-order
interpreter does, so `.hvp` and `.estimate` with one key see the same draws.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax._src import source_info_util

from ._analysis import closed as _closed
from ._analysis import eqn_has_sites, slots as _slots, support_check_p, transform_p
from ._errors import ObjectiveShapeError, SecondOrderError
from ._estimators import Reinforce, RunningAverage, Reparam, _law
from ._interpreter import scope_keys
from ._laws import log_density
from ._primitives import nested_p, sample_p
from ._signs import FIN, Signs, dtype_facts

sg = lax.stop_gradient

#: Primitives that are C^∞ in their floating operands wherever they are defined (a pole of
#: `div`/`log` is not a kink; see the module docstring), and structural ones (linear).
_SMOOTH = frozenset({
    "add", "add_any", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "sinh", "cosh", "asinh", "atan", "square",
    "integer_pow", "dot_general", "reduce_sum", "reduce_prod", "cumsum", "cumprod",
    "cumlogsumexp", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose",
    "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad", "gather",
    "scatter-add", "scatter_add", "rev", "copy", "copy_p", "lgamma", "digamma", "erf",
    "erf_inv", "split", "sharding_constraint", "cholesky", "triangular_solve", "iota",
    "mesh_cast", "reduce_and", "reduce_or", "stack", "scatter", "erfc", "atanh",
    "polygamma", "optimization_barrier",
})
# Not here, on purpose: `asin`, `acos`, `acosh` (a square-root branch point at ±1 or 1:
# `asin(1 - x²)` has a kink at x = 0), `bessel_i0e`/`bessel_i1e` (`exp(-|x|)` inside).
#: C^∞ where their base is positive (`sqrt(x²) = |x|` has a kink at 0).
_POSITIVE_BASE = frozenset({"sqrt", "rsqrt", "cbrt", "pow"})
#: Comparisons and boolean operations: a boolean carries no derivative; it moves (and is
#: then refused where it selects, or is cast to a number) when an operand moves.
_BOOLEAN = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "is_finite", "and", "or", "not",
                      "xor"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2",
                    "checkpoint"})
#: custom-JVP functions of JAX that are C^∞ with a correct derivative rule, trusted by
#: name and file (a user's function of the same name is not); tests/adev/test_hvp.py
#: checks their second derivatives against closed forms.
_TRUSTED_CUSTOM_JVP = {"logaddexp": "jax/_src/lax/other.py",
                       "xlogy": "jax/_src/scipy/special.py",
                       "xlog1py": "jax/_src/scipy/special.py"}
#: Library functions that are C^∞ but written with a stop_gradient'ed shift that cancels
#: exactly (a max, 0 where it is not finite): `(file suffix, function name)`.
_TRUSTED_FUNCTIONS = {
    "jax/_src/ops/special.py": frozenset({"logsumexp"}),
    "jax/_src/nn/functions.py": frozenset({"softmax", "_softmax", "log_softmax",
                                           "_log_softmax", "logsumexp", "logmeanexp"}),
    # softplus(x) - x y for finite x; its other branch (the limits at x = ±inf, built
    # with a cast of `x > 0`) is selected by `isfinite(x)`, judged on its own
    "ppl_ext/_numpyro_fixes.py": frozenset({"binary_cross_entropy_with_logits"}),
}

#: Primitives that may hold sample sites for `.hvp` (`_run` interprets their bodies).
_SITE_CONTAINERS = _CALLS | {"scan"}
#: Primitives whose insides are judged (`_structured_taint`).
_STRUCTURED = _CALLS | {"custom_jvp_call", "custom_vjp_call", "cond", "scan", "while"}

# A taint is the frozenset of names of what a value moves with (empty: it does not
# move): the differentiated argument and reparameterised sites' labels.
_NONE: frozenset = frozenset()
_UNCHECKED = " (allow_discontinuous=True)"


def _union(taints: Iterable[frozenset]) -> frozenset:
    out: frozenset = _NONE
    for t in taints:
        out = out | t
    return out


def _trusted_frame(eqn) -> bool:
    traceback = eqn.source_info.traceback
    if traceback is None:
        return False
    for frame in traceback.frames:
        name = frame.file_name.replace("\\", "/")
        for suffix, functions in _TRUSTED_FUNCTIONS.items():
            if name.endswith(suffix) and frame.function_name in functions:
                return True
    return False


def _where(eqn) -> str:
    return source_info_util.summarize(eqn.source_info) or "an unknown line"


def _moves(taint: frozenset) -> str:
    return ", ".join(sorted(taint))


def _refuse(eqn, what: str, taint: frozenset, context: str) -> SecondOrderError:
    return SecondOrderError(
        f".hvp refused the program: {what} (primitive '{eqn.primitive.name}' at "
        f"{_where(eqn)}{context}) is applied to a value that moves with {_moves(taint)}. "
        "It is not twice continuously differentiable there, so the pathwise second "
        "derivative would miss its kink or jump and the Hessian-vector product would be "
        "biased. Replace it by a smooth function (softplus for relu, logsumexp for max, "
        "sqrt(x**2 + c) for abs), or draw the sites it depends on with px.reinforce."
    )


def _live(jaxpr) -> list[bool]:
    """Which equations' outputs reach the jaxpr's outputs (dead code is not judged)."""
    live = {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    keep = [False] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        if any(v in live for v in eqn.outvars) or eqn.effects:
            keep[i] = True
            live.update(v for v in eqn.invars if isinstance(v, core.Var))
    return keep


class _RealFacts(Signs):
    """`_signs.EXACT` (real arithmetic) where a draw is a finite real number."""

    def shortcut(self, eqn, ins):
        if eqn.primitive is sample_p:
            return [FIN | dtype_facts(v.aval.dtype) for v in eqn.outvars]
        return None


_REAL = _RealFacts(exact=True)


def _facts(jaxpr, in_facts: list | None) -> dict:
    """Sign facts in real arithmetic (draws are finite reals); `in_facts` are those of
    the inputs as the caller knows them (None: only their dtypes')."""
    if in_facts is None:
        in_facts = [None] * len(jaxpr.invars)
    try:
        return _REAL.env(jaxpr, [_REAL.input(v) for v in jaxpr.constvars],
                         [_REAL.input(v) if f is None else f | dtype_facts(v.aval.dtype)
                          for v, f in zip(jaxpr.invars, in_facts, strict=True)])
    except Exception:  # noqa: BLE001 - no facts: nothing is then proven
        return {}


def _atom_facts(facts: dict, atom) -> frozenset:
    if isinstance(atom, core.Literal):
        return _REAL.literal(atom.val)
    return facts.get(atom, frozenset())


def _finite_inputs(jaxpr) -> list:
    """The whole program's inputs are finite real numbers (parameters and data)."""
    return [FIN if jnp.issubdtype(v.aval.dtype, jnp.inexact) else None
            for v in jaxpr.invars]


def _positive(facts: dict, atom) -> bool:
    if isinstance(atom, core.Literal):
        try:
            return bool(jnp.all(jnp.asarray(atom.val) > 0))
        except Exception:  # noqa: BLE001
            return False
    return "pos" in facts.get(atom, ())


def _analyse(jaxpr, consts_taint: list, in_taint: list, context: str,
             in_facts: list | None = None) -> list[frozenset]:
    """Check `jaxpr` for second-order soundness; return the taints of its outputs.

    `in_facts`: sign facts of the inputs in real arithmetic, where the caller knows them.
    """
    env: dict = {}
    for var, t in zip(jaxpr.constvars, consts_taint, strict=True):
        env[var] = t
    for var, t in zip(jaxpr.invars, in_taint, strict=True):
        env[var] = t
    facts: dict | None = None
    live = _live(jaxpr)
    producer: dict = {}

    def facts_of():
        nonlocal facts
        if facts is None:
            facts = _facts(jaxpr, in_facts)
        return facts

    def read(atom):
        return _NONE if isinstance(atom, core.Literal) else env.get(atom, _NONE)

    for eqn, keep in zip(jaxpr.eqns, live, strict=True):
        ins = [read(a) for a in eqn.invars]
        if not keep:
            outs = [_NONE] * len(eqn.outvars)
        elif eqn.primitive is sample_p:
            outs = [_site_taint(eqn, ins, context, facts_of)]
        elif eqn.primitive is nested_p:
            raise SecondOrderError(
                f".hvp refused the program: {eqn.params['label']} (at {_where(eqn)}"
                f"{context}) is a nested expectation; its second-order estimator is not "
                "proved. Inline the nested program (call its function directly) instead."
            )
        elif eqn_has_sites(eqn) and eqn.primitive.name not in _SITE_CONTAINERS:
            raise SecondOrderError(
                f".hvp refused the program: sample sites inside the primitive "
                f"'{eqn.primitive.name}' (at {_where(eqn)}{context}) are not supported by "
                ".hvp (supported: sites at the top level and inside jax.jit, "
                "jax.checkpoint and lax.scan). Unroll the loop or branch with Python "
                "control flow, or write the loop with lax.scan."
            )
        else:
            pred = eqn.invars[0] if eqn.invars else None
            guarded = (eqn.primitive.name == "select_n" and isinstance(pred, core.Var)
                       and producer.get(pred) == "is_finite" and _trusted_frame(eqn))
            outs = _eqn_taint(eqn, ins, context, facts_of, guarded)
        for var, t in zip(eqn.outvars, outs, strict=True):
            env[var] = t
            producer[var] = eqn.primitive.name

    return [read(v) for v in jaxpr.outvars]


def _eqn_taint(eqn, ins, context, facts, guarded: bool = False) -> list[frozenset]:
    """The taints of `eqn`'s outputs, or `SecondOrderError` if it is not C² where it
    moves. `guarded`: a select inside a trusted function whose predicate is an
    `is_finite` made there (logsumexp's guard of its shift, which cancels)."""
    name = eqn.primitive.name
    moving = _union(ins)
    if not moving:
        return [_NONE] * len(eqn.outvars)
    if name == "stop_gradient":  # a stopped value still moves (its jumps are real)
        return [moving]
    if name == "is_finite" and "fin" in _atom_facts(facts(), eqn.invars[0]):
        return [_NONE]  # a finite real number stays finite: constant True
    if eqn.primitive is support_check_p:
        # numpyro's support mask of a log density's value (`_numpyro_fixes.py`): the
        # first-order continuity check, run after this one, refuses it unless it is
        # constant where the draws live, except for draws of sites that opted out
        unchecked = sorted(n for n in moving if n.endswith(_UNCHECKED))
        if unchecked:
            raise _refuse(eqn, "a support check of a log density (numpyro's "
                          "validate_args) on a value of a site with "
                          "allow_discontinuous=True, which the continuity check skips",
                          frozenset(unchecked), context)
        return [_NONE]
    if eqn.primitive is transform_p:  # `y`, marked as a transform of `x`: an identity
        return [moving]
    if name in _SMOOTH or name in _BOOLEAN:
        return [moving] * len(eqn.outvars)
    if name in _STRUCTURED:
        return _structured_taint(eqn, ins, context, moving, facts)
    if name == "select_n" and guarded:
        return [_union(ins[1:])]
    if name not in ("select_n", "sign") and _trusted_frame(eqn):
        # (the sign of logsumexp's sum, returned with `return_sign=True` or used to
        # mask negative sums, is a step where weights `b` make the sum cross zero)
        return [moving] * len(eqn.outvars)
    if name in _POSITIVE_BASE:
        base = eqn.invars[0]
        if _positive(facts(), base):
            return [moving]
        raise SecondOrderError(
            f".hvp refused the program: '{name}' (at {_where(eqn)}{context}) of a value "
            f"that moves with {_moves(moving)} and is not proven positive: at 0 it is "
            "not twice differentiable (sqrt(x**2) is |x|), so the Hessian-vector product "
            "could be biased. Keep its argument positive visibly, e.g. sqrt(x**2 + c) "
            "with c > 0, exp(...) or softplus(...) + c."
        )
    if name == "abs" and _positive(facts(), eqn.invars[0]):
        return [moving]
    if name == "convert_element_type":
        new = eqn.params["new_dtype"]
        old = eqn.invars[0].aval.dtype
        if jnp.issubdtype(new, jnp.inexact) and jnp.issubdtype(old, jnp.inexact):
            return [moving]
        if new == jnp.bool_ and old == jnp.bool_:
            return [moving]
        raise _refuse(eqn, f"a cast from {old} to {jnp.dtype(new).name}", moving, context)
    if name == "select_n":
        if ins[0]:
            raise _refuse(eqn, "a select (jnp.where / lax.select) whose predicate moves",
                          ins[0], context)
        return [_union(ins[1:])]
    raise _refuse(eqn, f"'{name}'", moving, context)


def _structured_taint(eqn, ins, context, moving, facts) -> list[frozenset]:
    """Calls, custom-JVP functions, branches and loops: judge their insides."""
    name = eqn.primitive.name
    if name in _CALLS:
        body, consts = _closed(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
        called = eqn.params.get("name", name)
        return _analyse(body, [_NONE] * len(consts), ins,
                        f"{context}, inside '{called}' called at {_where(eqn)}",
                        [_atom_facts(facts(), a) for a in eqn.invars])
    if name == "custom_jvp_call":
        fn, source = _custom_name(eqn)
        trusted = _TRUSTED_CUSTOM_JVP.get(fn)
        if trusted is not None and source.replace("\\", "/").endswith(trusted):
            return [moving] * len(eqn.outvars)
        raise _refuse(eqn, f"the custom_jvp function '{fn}' (its hand-written derivative "
                      "rule is not verified at second order)", moving, context)
    if name == "cond":
        if ins[0]:
            raise _refuse(eqn, "a lax.cond/switch whose branch index moves", ins[0],
                          context)
        outs = [_NONE] * len(eqn.outvars)
        for branch in eqn.params["branches"]:
            b_outs = _analyse(branch.jaxpr, [_NONE] * len(branch.consts), ins[1:], context)
            outs = [a | b for a, b in zip(outs, b_outs, strict=True)]
        return outs
    if name == "scan":
        return _scan_taint(eqn, ins, context)
    if name == "while":
        return _while_taint(eqn, ins, context)
    # custom_vjp_call and anything else
    raise _refuse(eqn, f"'{name}'", moving, context)


def _custom_name(eqn) -> tuple[str, str]:
    """`(function name, source file)` of a custom_jvp_call's function."""
    body = eqn.params.get("call_jaxpr")
    debug = getattr(getattr(body, "jaxpr", body), "debug_info", None)
    info = str(getattr(debug, "func_src_info", "") or "")
    name, _, where = info.partition(" at ")
    return (name or str(getattr(debug, "func_name", "?")).split(" ")[0],
            where.rsplit(":", 1)[0])


def _scan_taint(eqn, ins, context):
    params = eqn.params
    body, consts = _closed(params["jaxpr"])
    ft_in = params["ft_in"]  # (consts, carry, xs) flat trees, as the interpreter reads
    num_consts, num_carry = len(ft_in.elts[0]), len(ft_in.elts[1])
    consts_t = ins[:num_consts]
    carry = list(ins[num_consts:num_consts + num_carry])
    xs = ins[num_consts + num_carry:]
    while True:
        outs = _analyse(body, [_NONE] * len(consts), [*consts_t, *carry, *xs], context)
        new = [a | b for a, b in zip(carry, outs[:num_carry], strict=True)]
        if new == carry:
            return [*carry, *outs[num_carry:]]
        carry = new


def _while_taint(eqn, ins, context):
    params = eqn.params
    cond_j, body_j = params["cond_jaxpr"], params["body_jaxpr"]
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], list(ins[nc + nb:])
    while True:
        outs = _analyse(body_j.jaxpr, [_NONE] * len(body_j.consts), [*body_consts, *carry],
                        context)
        new = [a | b for a, b in zip(carry, outs, strict=True)]
        if new == carry:
            break
        carry = new
    (pred,) = _analyse(cond_j.jaxpr, [_NONE] * len(cond_j.consts), [*cond_consts, *carry],
                       context)
    if pred:
        raise _refuse(eqn, "a lax.while_loop whose condition moves (its number of "
                      "iterations jumps)", pred, context)
    return carry


def _site_taint(eqn, ins, context, facts) -> frozenset:
    """Check one sample site; return the taint of its draw."""
    leaf_facts = [_atom_facts(facts(), a) for a in eqn.invars]
    label = eqn.params["label"]
    tree = eqn.params["tree"]
    avals = [a.aval for a in eqn.invars]
    literals = {i: a.val for i, a in enumerate(eqn.invars) if isinstance(a, core.Literal)}
    dummy = [literals.get(i, jnp.zeros(a.shape, a.dtype)) for i, a in enumerate(avals)]
    distribution, estimator = jax.tree.unflatten(tree, dummy)
    estimator_type = type(estimator)
    num_dist = len(jax.tree.leaves(distribution))
    dist_taint = _union(ins[:num_dist])

    def rebuild(*leaves):
        leaves = [literals.get(i, leaf) for i, leaf in enumerate(leaves)]
        return jax.tree.unflatten(tree, leaves)

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    where = f"{context} in {label}"
    if estimator_type is Reparam:
        if not dist_taint:
            return _NONE

        def draw(*leaves):
            return rebuild(*leaves)[0].rsample(jax.random.key(0))

        closed = jax.make_jaxpr(draw)(*specs)
        _analyse(closed.jaxpr, [_NONE] * len(closed.consts), list(ins),
                 f"{where}, its reparameterised sampler", leaf_facts)
        if estimator.allow_discontinuous:
            return dist_taint | {label + _UNCHECKED}
        return dist_taint | {label}
    if estimator_type is Reinforce:
        baseline = estimator.baseline
        if isinstance(baseline, RunningAverage):
            baseline = baseline.value
        if baseline is not None and jnp.ndim(baseline) != 0:
            raise SecondOrderError(
                f".hvp refused {label}: a per-element Reinforce baseline (shape "
                f"{jnp.shape(baseline)}) is not supported at second order. Use a scalar "
                "baseline or none."
            )
        if not dist_taint:
            return _NONE
        out = eqn.params["out_aval"]
        value = jax.ShapeDtypeStruct(out.shape, out.dtype)

        def log_q(value, *leaves):
            law = _law(rebuild(*leaves)[0], label)
            return jnp.sum(log_density(law, value))

        closed = jax.make_jaxpr(log_q)(value, *specs)
        _analyse(closed.jaxpr, [_NONE] * len(closed.consts), [_NONE, *ins],
                 f"{where}, its log density", [FIN, *leaf_facts])
        return _NONE
    raise SecondOrderError(
        f".hvp refused {label}: its estimator {estimator_type.__name__} has no proved "
        "second-order estimator (.hvp supports px.reparam and px.reinforce, with a "
        "scalar baseline or none). Use one of those for this site."
    )


def check_second_order(jaxpr, moving: list[bool], label: str) -> None:
    """Raise `SecondOrderError` unless `jaxpr` is second-order sound (module docstring).

    `moving[i]` says whether input `i` is (part of) the differentiated argument.
    """
    taint = [frozenset({label}) if m else _NONE for m in moving]
    _analyse(jaxpr, [], taint, "", _finite_inputs(jaxpr))


# ------------------------------------------------------------------------- interpreter


def _run(jaxpr, consts, args, key, acc, record=None):
    """Evaluate `jaxpr` with reparameterised and stopped score draws.

    `acc = (L, B)`: the sum of score sites' log densities and the baseline terms.
    Keys are split by `_interpreter.scope_keys`, as `run_jaxpr` splits them (same draws
    as `.estimate`).
    With `record` (a dict), each top-level score site's log density goes there by
    equation index, and the environment is returned too.
    """
    env: dict = {}
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    slots = _slots(jaxpr)
    keys = scope_keys(key, slots)

    def read(atom):
        return atom.val if isinstance(atom, core.Literal) else env[atom]

    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(a) for a in eqn.invars]
        slot = slots.get(i)
        if slot is None:
            params = eqn.primitive.get_bind_params(eqn.params)
            with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        elif eqn.primitive is sample_p:
            x, acc, log_q = _site(eqn, invals, keys[slot], acc)
            if record is not None and log_q is not None:
                record[i] = log_q
            outs = [x]
        elif eqn.primitive.name in _CALLS:
            body, body_consts = _closed(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
            outs, acc = _run(body, body_consts, invals, keys[slot], acc)
        elif eqn.primitive.name == "scan":
            outs, acc = _run_scan(eqn, invals, keys[slot], acc)
        else:  # pragma: no cover - refused by check_second_order
            raise SecondOrderError(f".hvp cannot interpret '{eqn.primitive.name}'.")
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    if record is not None:
        return [read(v) for v in jaxpr.outvars], acc, env
    return [read(v) for v in jaxpr.outvars], acc


def _run_scan(eqn, invals, key, acc):
    """A scan with sites: each iteration its own key (`split`, as the first-order
    interpreter's scan rule), the accumulators carried."""
    params = eqn.params
    body, body_consts = _closed(params["jaxpr"])
    ft_in = params["ft_in"]
    num_consts, num_carry = len(ft_in.elts[0]), len(ft_in.elts[1])
    consts = invals[:num_consts]
    init = invals[num_consts:num_consts + num_carry]
    xs = invals[num_consts + num_carry:]

    def step(carry, x):
        acc, c = carry
        k, xv = x
        outs, acc = _run(body, body_consts, [*consts, *c, *xv], k, acc)
        return (acc, outs[:num_carry]), outs[num_carry:]

    keys = jax.random.split(key, params["length"])
    (acc, carry), ys = lax.scan(step, (acc, list(init)), (keys, list(xs)),
                                length=params["length"], reverse=params["reverse"],
                                unroll=params["unroll"])
    return [*carry, *ys], acc


def _site(eqn, invals, key, acc):
    distribution, estimator = jax.tree.unflatten(eqn.params["tree"], invals)
    dtype = eqn.params["out_aval"].dtype
    log_weight, baseline_terms = acc
    if isinstance(estimator, Reparam):
        return jnp.asarray(distribution.rsample(key)).astype(dtype), acc, None
    # Reinforce (check_second_order refused everything else)
    x = sg(jnp.asarray(distribution.sample(key)).astype(dtype))
    log_q = jnp.sum(log_density(_law(distribution, eqn.params["label"]), x))
    log_q = log_q.astype(log_weight.dtype)
    b = estimator.baseline
    if isinstance(b, RunningAverage):
        b = b.value
    if b is not None:
        magic = jnp.exp(log_q - sg(log_q))
        baseline_terms = baseline_terms + sg(jnp.asarray(b, log_weight.dtype)) * (1 - magic)
    return x, (log_weight + log_q, baseline_terms), log_q


def surrogate(jaxpr, inputs, key, moving=None):
    """The magic-box surrogate `S` of a scalar program (module docstring).

    With `moving` (which inputs are the differentiated argument) and a program whose
    score sites are all at the top level without baselines, the causal surrogate
    (`_causal_surrogate`); otherwise the whole value multiplies every score.
    """
    dtype = jnp.result_type(float)
    zero = jnp.zeros((), dtype)
    causal = None if moving is None else _causal_plan(jaxpr, tuple(moving))
    if causal is not None:
        return _causal_surrogate(jaxpr, inputs, key, causal)
    outs, (log_weight, baseline_terms) = _run(jaxpr, [], inputs, key, (zero, zero))
    y = outs[0]
    magic = jnp.exp(log_weight - sg(log_weight)).astype(y.dtype)
    return y * magic + baseline_terms.astype(y.dtype)


#: Largest (number of score-site pairs + sites) x (linear-region equations) the causal
#: surrogate re-evaluates; beyond it the whole value multiplies every score (unbiased).
MAX_CAUSAL_WORK = 40_000


def _causal_plan(jaxpr, moving: tuple):
    """`(graph plan, scored sites)` for the causal surrogate, or None.

    It applies when every score site of the program is a top-level `px.reinforce` site
    without a baseline (sites inside calls or scans, and baselines, keep the whole-value
    surrogate) and the dependency-graph plan (`_graph.plan`) exists. Scored sites are
    those whose log density moves with the differentiated argument (a site whose law
    does not move has a magic box of derivative 0: it is left out).
    """
    from . import _graph

    pathwise: set = {v for v, m in zip(jaxpr.invars, moving, strict=True) if m}
    scored = []
    for i, eqn in enumerate(jaxpr.eqns):
        ins_move = any(isinstance(a, core.Var) and a in pathwise for a in eqn.invars)
        if eqn.primitive is sample_p:
            dummy = [a.val if isinstance(a, core.Literal) else jnp.zeros(a.aval.shape,
                                                                          a.aval.dtype)
                     for a in eqn.invars]
            estimator = jax.tree.unflatten(eqn.params["tree"], dummy)[1]
            if isinstance(estimator, Reinforce):
                if estimator.baseline is not None:
                    return None
                if ins_move:
                    scored.append(i)
            elif ins_move:  # a reparameterised draw moves with its parameters
                pathwise.update(eqn.outvars)
            continue
        if eqn_has_sites(eqn):
            return None  # sites in a call or scan: not top-level
        if ins_move:
            pathwise.update(eqn.outvars)
    plan = _graph.plan(jaxpr)
    if plan is None or not scored or any(i not in plan.sites for i in scored):
        return None
    num = len(scored)
    if (num + num * (num - 1) // 2) * max(len(plan.region), 1) > MAX_CAUSAL_WORK:
        return None
    return plan, tuple(scored)


def _causal_surrogate(jaxpr, inputs, key, causal):
    """The causal (dependency-graph) magic-box surrogate, to second order.

    With `y = Σ_k c_k` the program's value as a sum of products of the linear region's
    leaves (`_graph.plan`), each term depending on a set `W_k` of score sites, the causal
    surrogate `Σ_k c_k Π_{i∈W_k} □_i` (`□_i = exp(L_i - sg(L_i)) = 1 + δ_i`) has first and
    second derivatives whose means are those of `E[y]` (Foerster et al. 2018, section 4:
    each cost term carries the magic boxes of the sites it depends on). Expanded in the
    `δ_i` (value 0), terms with three or more `δ`s have zero first and second derivatives,
    so it equals, to second order,

        S = y + Σ_i δ_i G_i + Σ_{i<j} δ_i δ_j G_ij,

    with `G_i = y - F({i})` (the terms that depend on site `i`) and `G_ij = y - F({i}) -
    F({j}) + F({i, j})` (those that depend on both), `F(Z)` the region re-evaluated with
    every leaf that depends on a site in `Z` set to zero (the terms that depend on none
    of them; with their pathwise derivatives, unlike the first-order remainders). Its
    difference from the whole-value surrogate `y Π_i □_i` is `Σ_i δ_i F({i}) + Σ_{i<j}
    δ_i δ_j (F({i}) + F({j}) - F({i, j}))`; `F({i})` is a function of values that are not
    descendants of site `i`, so each term has mean-zero first and second derivatives
    (`E[∇L_i | non-descendants of i] = 0`, and of `∇²L_i + ∇L_i ∇L_iᵀ` too). Soundness rests
    on that, not on the region's algebra, as for the first-order remainders.
    """
    plan, scored = causal
    dtype = jnp.result_type(float)
    zero = jnp.zeros((), dtype)
    log_q: dict = {}
    outs, _, env = _run(jaxpr, [], inputs, key, (zero, zero), record=log_q)
    y = outs[0]
    base = {var: env[var] for var in plan.record}
    cache: dict = {}

    def region(zero_vars: frozenset):
        if zero_vars not in cache:
            values = dict(base)
            for var in zero_vars:
                values[var] = jnp.zeros_like(values[var])
            for eqn in plan.region:
                ins = [a.val if isinstance(a, core.Literal) else values[a] for a in eqn.invars]
                params = eqn.primitive.get_bind_params(eqn.params)
                result = eqn.primitive.bind(*ins, **params)
                values.update(zip(eqn.outvars, result if eqn.primitive.multiple_results
                                  else [result], strict=True))
            out = plan.outvars[0]
            cache[zero_vars] = out.val if isinstance(out, core.Literal) else values[out]
        return jnp.asarray(cache[zero_vars]).astype(y.dtype)

    delta = {i: (jnp.exp(log_q[i] - sg(log_q[i])) - 1).astype(y.dtype) for i in scored}
    single = {i: region(plan.zeroed[i]) for i in scored}
    total = y
    for a, i in enumerate(scored):
        total = total + delta[i] * (y - single[i])
        for j in scored[a + 1:]:
            both = y - single[i] - single[j] + region(plan.zeroed[i] | plan.zeroed[j])
            total = total + delta[i] * delta[j] * both
    return total


# ------------------------------------------------------------------------------- entry


def _check_tangent(params, v, argnums: int):
    """Validate the differentiated argument and the direction `v`; return `v` cast."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f".hvp: the argument at argnums={argnums} has no array leaves.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) or isinstance(leaf, bool):
            raise TypeError(
                f".hvp differentiates the argument at argnums={argnums}, whose leaves must "
                f"be floating-point arrays; got {jnp.result_type(leaf)}."
            )
    p_tree, v_tree = jax.tree.structure(params), jax.tree.structure(v)
    if p_tree != v_tree:
        raise ValueError(
            f".hvp: v must be a pytree like the differentiated argument (argnums="
            f"{argnums}): expected structure {p_tree}, got {v_tree}."
        )
    out = []
    for p, t in zip(leaves, jax.tree.leaves(v), strict=True):
        if jnp.shape(p) != jnp.shape(t):
            raise ValueError(
                f".hvp: v has a leaf of shape {jnp.shape(t)} where the differentiated "
                f"argument (argnums={argnums}) has shape {jnp.shape(p)}."
            )
        if not jnp.issubdtype(jnp.result_type(t), jnp.number):
            raise TypeError(f".hvp: v must hold numbers, got {jnp.result_type(t)}.")
        out.append(jnp.asarray(t, jnp.result_type(p)))
    return jax.tree.unflatten(v_tree, out)


@jax.custom_jvp
def _not_differentiated(x):
    """Identity; differentiating it (a derivative of an `.hvp` estimate) is an error."""
    return x


@_not_differentiated.defjvp
def _not_differentiated_jvp(primals, tangents):
    raise SecondOrderError(
        "a derivative of an .hvp estimate was requested (a third derivative, e.g. "
        "jax.grad of a function that calls f.hvp). .hvp estimates second derivatives "
        "only; its derivative is not checked to be an unbiased estimate."
    )


def _guard(tree):
    """Refuse outer differentiation of the estimate through its floating inputs."""
    return jax.tree.map(
        lambda x: _not_differentiated(x) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        else x, tree)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _hvp_jit(expectation, argnums: int, spec, key, arrays, v):
    from ._expectation import _join_static, _trace

    arrays, v = _guard((arrays, v))
    args, kwargs = _join_static(spec, arrays)
    position = argnums - 1
    params = args[position]
    rest_before, rest_after = args[:position], args[position + 1:]
    fn = expectation.fn

    def program(p):
        return fn(*rest_before, p, *rest_after, **kwargs)

    # the second-order check first (its errors name the primitive as a second-order
    # problem), then the first-order analyses, as `.grad` makes them
    jaxpr, inputs, out_tree = _trace(program, (params,), {}, check=False)
    name = getattr(fn, "__name__", repr(fn))
    if out_tree.num_leaves != 1 or jaxpr.outvars[0].aval.shape != ():
        raise ObjectiveShapeError(
            f".hvp needs a scalar objective, but {name} returns "
            f"{[v.aval.shape for v in jaxpr.outvars]}. Reduce it (e.g. jnp.sum)."
        )
    p_leaves = jax.tree.leaves(params)
    positions = [next((j for j, leaf in enumerate(p_leaves) if x is leaf), None)
                 for x in inputs]
    check_second_order(jaxpr, [pos is not None for pos in positions],
                       f"the differentiated argument (argnums={argnums})")
    _trace(program, (params,), {}, check=True)

    def objective(p):
        leaves = jax.tree.leaves(p)
        ins = [x if pos is None else leaves[pos] for x, pos in zip(inputs, positions)]
        return surrogate(jaxpr, ins, key, [pos is not None for pos in positions])

    return jax.jvp(jax.grad(objective), (params,), (v,))[1]


def hvp(expectation, key, args: tuple, kwargs: dict, v, argnums: int):
    """Unbiased estimate of `∇² E[P(*args)] · v` w.r.t. the argument `argnums`."""
    from ._expectation import _as_key, _check_argnums, _split_static

    if isinstance(argnums, (tuple, list)):
        raise TypeError(".hvp differentiates one argument: argnums must be an int.")
    argnums = _check_argnums(argnums, len(args))
    key = _as_key(key)
    v = _check_tangent(args[argnums - 1], v, argnums)
    params = args[argnums - 1]
    # the differentiated argument's leaves must be traced even if they are Python floats
    args = (*args[:argnums - 1], jax.tree.map(jnp.asarray, params), *args[argnums:])
    spec, arrays = _split_static(args, kwargs)
    return _hvp_jit(expectation, argnums, spec, key, arrays, v)

