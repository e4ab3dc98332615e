"""The jaxpr interpreter that implements ADEV by a surrogate program.

A small engine (`run_jaxpr`) walks the equations of a jaxpr. Equations without sample
sites inside are bound unchanged (so JAX's own JVP and transpose rules, custom_jvp rules
included, apply to them). Equations with sample sites go to a rule in `RULES`, keyed by
primitive; a primitive with sites inside and no rule is an error naming it.

Two modes share the engine:
- value mode (`surrogate=False`) computes the value estimate only;
- surrogate mode computes a value numerically equal to the value estimate whose forward
  tangent is the ADEV tangent estimate (see `_estimators.py` for the convention). The
  custom JVP rule of an expectation is `jax.jvp` of surrogate mode.

Continuation-passing: the engine takes a continuation `cont(outs, acc)` that finishes the
*whole* program from the end of this jaxpr and returns `(outputs, invalid site id)`. Continuation estimators (enum, mvd,
leave-one-out) call `resume`, which runs the rest of the program from the next equation.
Inside loop bodies there is no continuation (`cont=None`); there, rules return the loop
body's outputs and refuse continuation estimators with an error naming the site.

Randomness: each jaxpr scope splits its key once, one key per equation that consumes
randomness (sample sites and sub-programs with sites), in equation order. Loops give each
iteration its own key (`split` for scan, `fold_in` of the counter for while).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jax.extend import core
from jax._src import source_info_util

from ._errors import UnsupportedEstimatorError, UnsupportedPrimitiveError
from ._estimators import MVD, Enum, Reinforce, _factorisable, _law
from ._analysis import eqn_has_sites as _eqn_has_sites  # noqa: F401 - re-exported
from ._analysis import first_continuation_site, has_sites  # noqa: F401 - has_sites re-exported
from ._analysis import slots as _slots
from ._analysis import sub_jaxprs as _sub_jaxprs
from ._primitives import nested_p, sample_p
from ._signs import fact_of, proves

sg = lax.stop_gradient

class Acc(NamedTuple):
    """What a program accumulates besides its values (see `_estimators.py`).

    `score` and `baseline` are the surrogate terms `A` and `B` (None in value mode);
    `invalid` is the id of the first site with invalid parameters, or -1. `sites` holds
    the scores of top-level score-function sites kept apart (`{equation index: score}`,
    or None): `finish` multiplies each by the part of the final value that depends on the
    site's draw (`_graph.py`), and everything else (`apply_acc`) folds them into `A`.
    `terms` is `(plan, values)`, the top-level values that `finish` reads, recorded at
    the end of the top-level program (None before, and where a plate group or a
    continuation estimator finishes the program).
    """

    score: Any
    baseline: Any
    invalid: Any
    sites: Any = None
    terms: Any = None


Cont = Callable[[list[Any], Acc], Any]


class Scope(NamedTuple):
    keys: Any  # (m,) key array, one per randomness-consuming equation; None if m == 0
    slots: dict[int, int]
    surrogate: bool
    where: tuple[str, ...]
    jaxpr: Any  # the jaxpr being run (for the sign facts of its variables)
    messages: list[str]  # the program's run-time error messages; `invalid` indexes it
    graph: Any = None  # the top-level program's `_graph.Plan` (None in every other scope)


class Continue(NamedTuple):
    outs: list[Any]
    acc: Acc


class Final(NamedTuple):
    outs: Any


# ----------------------------------------------------------------------------- analysis


def _closed(value) -> tuple[core.Jaxpr, list[Any]]:
    if isinstance(value, core.ClosedJaxpr):
        return value.jaxpr, list(value.consts)
    return value, []


# ------------------------------------------------------------------------------- engine


def zero_acc(surrogate: bool) -> Acc:
    """Accumulators at the start of a program (or of a continuation)."""
    if not surrogate:
        return Acc(None, None, jnp.int32(-1))
    dtype = jnp.result_type(float)
    return Acc(jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.int32(-1))


def add_acc(acc: Acc, score, baseline_term) -> Acc:
    a, b = acc.score, acc.baseline
    if score is not None:
        a = a + score.astype(a.dtype)
    if baseline_term is not None:
        b = b + baseline_term.astype(b.dtype)
    return acc._replace(score=a, baseline=b)


def add_site(acc: Acc, index: int, score) -> Acc:
    """Keep the score of the top-level site at equation `index` apart (`Acc.sites`)."""
    sites = dict(acc.sites or {})
    sites[index] = score.astype(acc.score.dtype)
    return acc._replace(sites=sites)


def _folded(acc: Acc):
    """`A` with the scores kept apart folded in (each multiplies the whole value)."""
    a = acc.score
    for score in (acc.sites or {}).values():
        a = a + score
    return a


def apply_acc(outs: list[Any], acc: Acc) -> list[Any]:
    """Turn final values `y` into surrogates `y + sg(y)·A - B` (identity in value mode)."""
    outs = list(outs)
    if acc.score is not None:
        a, b = _folded(acc), acc.baseline
        outs = [y + sg(y) * a.astype(y.dtype) - b.astype(y.dtype) for y in outs]
    return outs


def finish(outs: list[Any], acc: Acc) -> tuple[list[Any], Any]:
    """The continuation that ends a whole program: `(surrogate outputs, invalid site id)`.

    With the top-level values recorded (`Acc.terms`), each score kept apart multiplies
    only the part of `y` that depends on its site's draw, `y - R_s` (`_graph.py`):
    `y + sg(y)·A + Σ_s sg(y - R_s)·score_s - B`; otherwise `y + sg(y)·A - B`, the
    kept-apart scores folded into `A`.
    """
    if acc.score is None or not acc.sites or acc.terms is None:
        return apply_acc(outs, acc), acc.invalid
    plan, values = acc.terms
    live = [i for i in acc.sites if plan.zeroed[i]]  # others: y does not depend on them
    rests = plan.remainders(values, live)
    result = []
    for k, y in enumerate(outs):
        out = y + sg(y) * acc.score.astype(y.dtype) - acc.baseline.astype(y.dtype)
        for i in live:
            out = out + sg(y - rests[i][k]) * acc.sites[i].astype(y.dtype)
        result.append(out)
    return result, acc.invalid


def merge_invalid(first, second):
    """The first invalid site id of two (-1 when none), elementwise."""
    return jnp.where(first >= 0, first, second)


def message_id(messages: list[str], text: str) -> int:
    """The index of `text` in the program's message list (appended if new)."""
    if text not in messages:
        messages.append(text)
    return messages.index(text)


def invalid_message(messages: list[str], invalid) -> str | None:
    """The message of a concrete invalid id (None when it is -1)."""
    index = int(invalid)
    return None if index < 0 else messages[index]


def raise_if_invalid(values, invalid, messages: list[str]):
    """Attach an in-graph run-time error naming the first site whose parameters were invalid.

    Used where the check cannot run on the host (under a user's `jit` or `vmap`): JAX then
    reports it wrapped in its runtime error, whose message starts with this one.
    """
    if not messages:
        return values
    index = jnp.clip(invalid, 0, len(messages) - 1)
    return eqx.branched_error_if(values, invalid >= 0, index, list(messages))


def _open_checks(jaxpr: core.Jaxpr, eqn) -> list:
    """The parameter checks of a site that the program does not already guarantee."""
    open_checks = []
    for check in eqn.params["checks"]:
        strict = not eqn.params["pathwise"]  # a draw that can hide a NaN parameter
        if check.index >= 0 and proves(fact_of(jaxpr, eqn.invars[check.index], strict),
                                       check.constraint.value):
            continue
        open_checks.append(check)
    return open_checks


@functools.lru_cache(maxsize=8192)
def has_validated_sites(jaxpr: core.Jaxpr) -> bool:
    """Whether a site in `jaxpr` (nested expectations included) checks its parameters."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p and _open_checks(jaxpr, eqn):
            return True
        if any(has_validated_sites(j) for j in _sub_jaxprs(eqn.params)):
            return True
    return False


def run_jaxpr(
    jaxpr: core.Jaxpr,
    consts: list[Any],
    args: list[Any],
    key: Any,
    acc: Acc,
    surrogate: bool,
    cont: Cont | None,
    where: tuple[str, ...],
    messages: list[str],
    graph: Any = None,
):
    """Interpret `jaxpr`. With `cont`, return `cont`'s result; without, `(outs, acc)`.

    `messages` is the program's list of run-time error messages (parameter checks append
    theirs; the `invalid` accumulator is an index into it). `graph` is the
    Rao-Blackwellisation plan (`_graph.plan`) of a whole program run to `finish`.
    """
    env: dict[Any, Any] = {}
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    slots = _slots(jaxpr)
    keys = scope_keys(key, slots)
    scope = Scope(keys, slots, surrogate, where, jaxpr, messages, graph)
    return _run_from(jaxpr, 0, env, scope, acc, cont)


def scope_keys(key, slots):
    """One key per equation of a scope that consumes randomness (`slots`), or `None`:
    the key itself for one slot (no split), `split` for several. `.hvp` splits keys with
    this too, so it draws what `.estimate` draws."""
    if not slots:
        return None
    if len(slots) == 1:
        return key[None]
    return jax.random.split(key, len(slots))


def _read(env, atom):
    return atom.val if isinstance(atom, core.Literal) else env[atom]


def _write(env, eqn, outs):
    if eqn.primitive.multiple_results:
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    else:
        env[eqn.outvars[0]] = outs[0] if isinstance(outs, (list, tuple)) else outs


def _run_from(jaxpr, start, env, scope: Scope, acc: Acc, cont: Cont | None):
    eqns = jaxpr.eqns
    for i in range(start, len(eqns)):
        eqn = eqns[i]
        invals = [_read(env, v) for v in eqn.invars]
        slot = scope.slots.get(i)
        if slot is None:
            if scope.surrogate and _batched_cond(eqn, invals):
                outs = _select_branches(eqn, invals)
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                with source_info_util.user_context(eqn.source_info.traceback), \
                        eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **params)
            _write(env, eqn, outs)
            continue
        rule = RULES.get(eqn.primitive)
        if rule is None:
            raise UnsupportedPrimitiveError(
                f"ppl_ext cannot transform the primitive '{eqn.primitive.name}' because it "
                f"has sample sites inside it{_where(scope.where)} "
                f"(at {source_info_util.summarize(eqn.source_info)}). Move the px.sample "
                "calls out of it, or write it with jit, cond/switch, scan, fori_loop or "
                "while_loop."
            )
        resume = None if cont is None else Resume(jaxpr, i, env, scope, cont)
        result = rule(eqn, invals, scope.keys[slot], acc, scope, resume)
        if isinstance(result, Final):
            return result.outs
        _write(env, eqn, result.outs)
        acc = result.acc
    outs = [_read(env, v) for v in jaxpr.outvars]
    if cont is None:
        return outs, acc
    if scope.graph is not None and acc.sites:  # the end of the top-level program
        acc = acc._replace(terms=(scope.graph, [env[v] for v in scope.graph.record]))
    return cont(outs, acc)


class Resume:
    """The rest of the whole program after equation `index` of `jaxpr` (a continuation).

    Calling it with the equation's outputs and the accumulators runs the program to its
    end (through `cont`, the continuation of this jaxpr's scope). Its fields let a rule
    see the program itself, not only run it (`_groups.py` evaluates it with tags).
    """

    __slots__ = ("jaxpr", "index", "env", "scope", "cont")

    def __init__(self, jaxpr, index: int, env: dict, scope: Scope, cont: Cont):
        self.jaxpr, self.index, self.env, self.scope, self.cont = jaxpr, index, env, scope, cont

    @property
    def eqn(self):
        return self.jaxpr.eqns[self.index]

    def __call__(self, outs, acc):
        env = dict(self.env)
        _write(env, self.eqn, outs)
        return _run_from(self.jaxpr, self.index + 1, env, self.scope, acc, self.cont)


def _where(where: tuple[str, ...]) -> str:
    return f" (inside {' > '.join(where)})" if where else ""


# -------------------------------------------------------------------------------- rules

RULES: dict[Any, Callable[..., Continue | Final]] = {}


def _sample_rule(eqn, invals, key, acc, scope: Scope, resume):
    params = eqn.params
    distribution, estimator = jax.tree.unflatten(params["tree"], invals)
    dtype = params["out_aval"].dtype
    checks = _open_checks(scope.jaxpr, eqn)
    if checks:
        invalid = jnp.int32(-1)
        for check in reversed(checks):  # the first failing check wins
            value = invals[check.index] if check.index >= 0 else _parameter(distribution, check)
            text = _invalid_text(params["label"], distribution, check)
            ok = jnp.all(check.constraint.value(value))
            invalid = jnp.where(ok, invalid, message_id(scope.messages, text))
        acc = acc._replace(invalid=merge_invalid(acc.invalid, invalid))
    if not estimator.continuation:
        if isinstance(estimator, Reinforce) and isinstance(resume, Resume) and scope.surrogate:
            from ._groups import NotSeparable, reinforce_group

            try:  # per-element scores, evaluated on the user's program with later sites
                return Final(reinforce_group(estimator, distribution, resume, acc, key, dtype,
                                             params["label"]))
            except NotSeparable:
                pass  # the score of the whole objective (`local`)
        elif resume is not None and scope.surrogate:
            fresh = zero_acc(True)
            plate = estimator.run_plate(key, distribution, lambda x: resume([x], fresh),
                                        dtype, params["label"])
            if plate is not None:
                outs, invalid = plate
                return Final((apply_acc(outs, acc), merge_invalid(acc.invalid, invalid)))
        x, score, baseline_term = estimator.local(key, distribution, scope.surrogate)
        x = jnp.asarray(x).astype(dtype)
        if (score is not None and baseline_term is None and estimator.score_function
                and getattr(estimator, "rao_blackwellise", True) and scope.graph is not None and isinstance(resume, Resume)
                and resume.index in scope.graph.sites):
            # a top-level score function without a baseline: scored against the part of
            # the final value that depends on its draw (`finish`, `_graph.py`)
            return Continue([x], add_site(acc, resume.index, score))
        return Continue([x], add_acc(acc, score, baseline_term))
    if resume is None:
        raise UnsupportedEstimatorError(
            f"{params['label']} uses the continuation estimator "
            f"{type(estimator).__name__}{_where(scope.where)}. Continuation estimators "
            "evaluate the rest of the program several times, which a loop body cannot "
            "do. Use px.reinforce (with a baseline) or px.reparam for this site, or write "
            "the loop as a Python for loop (unrolled)."
        )
    if isinstance(estimator, (Enum, MVD)) and isinstance(resume, Resume):
        from ._groups import NotSeparable, enumerate_group, mvd_group

        try:  # plate-batched enum/mvd sites per element, evaluated on the user's program
            if isinstance(estimator, Enum):
                return Final(enumerate_group(distribution, resume, acc, dtype,
                                             params["label"]))
            return Final(mvd_group(distribution, resume, acc, key, dtype, params["label"]))
        except NotSeparable as error:
            # the site's own estimator decides: joint evaluation, or a refusal that says
            # why the elements could not be taken one at a time
            reason = str(error) if _factorisable(_law(distribution, params["label"])) else None
    else:
        reason = None
    fresh = zero_acc(scope.surrogate)
    try:
        outs, invalid = estimator.run(
            key, distribution, lambda x: resume([x], fresh), scope.surrogate, dtype,
            params["label"],
        )
    except UnsupportedEstimatorError as error:
        if reason is None or not str(error).startswith(params["label"]):
            raise  # not about this site (a later site's refusal, raised in its continuation)
        raise UnsupportedEstimatorError(
            f"{error} It cannot be enumerated per element either: {reason.rstrip('.')}."
        ) from None
    return Final((apply_acc(outs, acc), merge_invalid(acc.invalid, invalid)))


def _at_depth(distribution, depth: int):
    for _ in range(depth):
        distribution = distribution.base_dist
    return distribution


def _parameter(distribution, check):
    """The checked parameter of a site when it is not one of its operands.

    Read as an attribute: a lazily computed parameter (numpyro's `lazy_property`, e.g. a
    MultivariateNormal's `covariance_matrix`) is not kept when the site is flattened.
    """
    return getattr(_at_depth(distribution, check.depth), check.name)


def _invalid_text(label: str, distribution, check) -> str:
    owner = type(_at_depth(distribution, check.depth)).__name__
    return (
        f"px.InvalidParameterError: {label}: parameter {check.name!r} of {owner} violates "
        f"its constraint {check.constraint.value} (numpyro's validate_args is on)."
    )


def _call_rule(eqn, invals, key, acc, scope: Scope, resume):
    """Nested jit / closed_call / remat: interpret the body inline."""
    param = "call_jaxpr" if "call_jaxpr" in eqn.params else "jaxpr"
    jaxpr, consts = _closed(eqn.params[param])
    where = scope.where + (f"{eqn.primitive.name} {eqn.params.get('name', '')}".strip(),)
    if resume is not None and first_continuation_site(jaxpr) is not None:
        return Final(
            run_jaxpr(jaxpr, consts, invals, key, acc, scope.surrogate, resume, where,
                      scope.messages)
        )
    outs, acc = run_jaxpr(jaxpr, consts, invals, key, acc, scope.surrogate, None, where,
                          scope.messages)
    return Continue(outs, acc)


def _cond_rule(eqn, invals, key, acc, scope: Scope, resume):
    index, *ops = invals
    branches = eqn.params["branches"]
    where = scope.where + ("lax.cond/switch branch",)
    if resume is not None and any(
        first_continuation_site(b.jaxpr) is not None for b in branches
    ):
        # Each branch finishes the whole program; the selected branch's result is kept.
        finals = [
            run_jaxpr(b.jaxpr, list(b.consts), ops, key, acc, scope.surrogate, resume, where,
                      scope.messages)
            for b in branches
        ]
        which = jnp.clip(index, 0, len(branches) - 1).astype(jnp.int32)
        outs = [lax.select_n(which, *values) for values in zip(*[f[0] for f in finals])]
        return Final((outs, lax.select_n(which, *[f[1] for f in finals])))

    def branch_fn(branch):
        def fn(key, acc, ops):
            return run_jaxpr(
                branch.jaxpr, list(branch.consts), ops, key, acc, scope.surrogate, None, where,
                scope.messages,
            )

        return fn

    if scope.surrogate and _batched_cond(eqn, invals):
        which = _which(index, len(branches))
        results = [branch_fn(b)(key, _taken_only(which, i, acc), _taken_only(which, i, ops))
                   for i, b in enumerate(branches)]
        outs = [lax.select_n(which, *values) for values in zip(*[r[0] for r in results])]
        acc = jax.tree.map(lambda *values: lax.select_n(which, *values),
                           *[r[1] for r in results])
        return Continue(outs, acc)
    outs, acc = lax.switch(index, [branch_fn(b) for b in branches], key, acc, ops)
    return Continue(list(outs), acc)


# A cond whose index differs across the elements of a `jax.vmap` that encloses the
# expectation is evaluated as JAX's own vmap rule for cond evaluates it (every branch,
# then a select), but *before* surrogate mode is differentiated: each branch receives
# its operands where it is taken and their `stop_gradient` elsewhere, so an untaken
# branch passes on no derivative (a NaN in it, `sqrt` of a negative, stays out of the
# gradient, as in JAX), and the tangents never reach JAX's rule, which would wrap them
# in `stop_gradient` too (see `_register_stop_gradient_transpose`).


def _batched_cond(eqn, invals) -> bool:
    """Whether `eqn` is a cond whose index is batched by an enclosing `jax.vmap`."""
    from jax._src.interpreters import ad, batching

    if eqn.primitive is not _COND_P[0]:
        return False
    index = invals[0]
    while isinstance(index, ad.JVPTracer):
        index = index.primal
    return isinstance(index, batching.BatchTracer) and index.batch_dim is not None


def _which(index, num_branches: int):
    return jnp.clip(index, 0, num_branches - 1).astype(jnp.int32)


def _taken_only(which, i: int, values):
    """`values` where branch `i` is taken, their `stop_gradient` elsewhere (floats)."""
    taken = which == i

    def guard(x):
        if jnp.issubdtype(getattr(x, "dtype", jnp.int32), jnp.inexact):
            return jnp.where(taken, x, sg(x))
        return x

    return jax.tree.map(guard, values)


def _select_branches(eqn, invals) -> list:
    """A cond without sample sites and with a batched index: every branch, then a select."""
    index, *ops = invals
    branches = eqn.params["branches"]
    which = _which(index, len(branches))
    results = [jax.core.eval_jaxpr(b.jaxpr, b.consts, *_taken_only(which, i, ops))
               for i, b in enumerate(branches)]
    return [lax.select_n(which, *values) for values in zip(*results)]


_COND_P: list = [None]  # cond_p, set by `_register_by_name`


def _scan_rule(eqn, invals, key, acc, scope: Scope, resume):
    params = eqn.params
    body, body_consts = _closed(params["jaxpr"])
    ft_in = params["ft_in"]
    num_consts, num_carry = len(ft_in.elts[0]), len(ft_in.elts[1])
    consts = invals[:num_consts]
    init = invals[num_consts : num_consts + num_carry]
    xs = invals[num_consts + num_carry :]
    length = params["length"]
    where = scope.where + ("lax.scan body",)

    def step(carry, x):
        acc, c = carry
        k, xv = x
        outs, acc = run_jaxpr(
            body, body_consts, [*consts, *c, *xv], k, acc, scope.surrogate, None, where,
            scope.messages,
        )
        return (acc, outs[:num_carry]), outs[num_carry:]

    keys = jax.random.split(key, length)
    (acc, carry), ys = lax.scan(
        step,
        (acc, init),
        (keys, xs),
        length=length,
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    return Continue([*carry, *ys], acc)


def _while_rule(eqn, invals, key, acc, scope: Scope, resume):
    params = eqn.params
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    if has_sites(cond_jaxpr.jaxpr):
        raise UnsupportedPrimitiveError(
            "px.sample inside the condition of a while_loop is not supported"
            f"{_where(scope.where)}; draw inside the body and carry the value."
        )
    cond_consts, body_consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    where = scope.where + ("lax.while_loop body",)

    def cond_fn(carry):
        _, _, _, c = carry
        return jax.core.eval_jaxpr(cond_jaxpr.jaxpr, cond_jaxpr.consts, *cond_consts, *c)[0]

    def body_fn(carry):
        k, count, acc, c = carry
        outs, acc = run_jaxpr(
            body_jaxpr.jaxpr,
            list(body_jaxpr.consts),
            [*body_consts, *c],
            jax.random.fold_in(k, count),
            acc,
            scope.surrogate,
            None,
            where,
            scope.messages,
        )
        return k, count + 1, acc, outs

    _, _, acc, outs = lax.while_loop(cond_fn, body_fn, (key, jnp.uint32(0), acc, init))
    return Continue(list(outs), acc)


def _function_name(eqn) -> str:
    for value in eqn.params.values():
        jaxpr = value.jaxpr if isinstance(value, core.ClosedJaxpr) else value
        debug = getattr(jaxpr, "debug_info", None)
        if isinstance(jaxpr, core.Jaxpr) and debug is not None:
            return str(getattr(debug, "func_name", "?")).split(" ")[0]
    return str(eqn.params.get("name", "?"))


def _custom_rule(eqn, invals, key, acc, scope: Scope, resume):
    raise UnsupportedPrimitiveError(
        f"px.sample inside the {eqn.primitive.name} function '{_function_name(eqn)}' "
        f"(at {source_info_util.summarize(eqn.source_info)}){_where(scope.where)}: its "
        "hand-written derivative "
        "rule does not know about the random choices, so the gradient would be wrong. Draw "
        "outside the custom_jvp/custom_vjp function and pass the value in."
    )


def _nested_rule(eqn, invals, key, acc, scope: Scope, resume):
    """A nested expectation: its random choices are the enclosing program's.

    The nested program is a sample of an unbiased estimate of its value, and its sites are
    sites of the enclosing program (interpreted inline, like a call): their score terms
    multiply the enclosing program's final value and continuation estimators get the rest
    of the whole program. So value and gradient are unbiased for whatever the enclosing
    program does with the sample, nonlinear uses (`inner(theta) ** 2`, a log) included.
    """
    where = scope.where + (eqn.params["label"],)
    jaxpr = eqn.params["jaxpr"]
    if resume is not None and first_continuation_site(jaxpr) is not None:
        return Final(run_jaxpr(jaxpr, [], invals, key, acc, scope.surrogate, resume, where,
                               scope.messages))
    outs, acc = run_jaxpr(jaxpr, [], invals, key, acc, scope.surrogate, None, where,
                          scope.messages)
    return Continue(list(outs), acc)


RULES[sample_p] = _sample_rule
RULES[nested_p] = _nested_rule


def _register_by_name():
    from jax._src import core as _core
    from jax._src.pjit import jit_p
    from jax._src.lax.control_flow.conditionals import cond_p
    from jax._src.lax.control_flow.loops import scan_p, while_p
    from jax._src.ad_checkpoint import remat_p
    from jax._src.custom_derivatives import custom_jvp_call_p, custom_vjp_call_p

    RULES[jit_p] = _call_rule
    RULES[_core.closed_call_p] = _call_rule
    RULES[remat_p] = _call_rule
    RULES[cond_p] = _cond_rule
    _COND_P[0] = cond_p
    RULES[scan_p] = _scan_rule
    RULES[while_p] = _while_rule
    RULES[custom_jvp_call_p] = _custom_rule
    RULES[custom_vjp_call_p] = _custom_rule


_register_by_name()


def _stop_gradient_transpose(cotangent, operand):
    """`stop_gradient` of a tangent is the identity on it, and so is its transpose."""
    return (cotangent,)


def _register_stop_gradient_transpose():
    """Let `jax.grad` of `jax.vmap` of an expectation through a `lax.cond` on a draw run.

    An expectation is a `jax.custom_jvp` whose rule is `jax.jvp` of surrogate mode, so a
    `cond` in the program is differentiated inside the rule and its tangents become cond
    operands. Under `vmap` with a batched predicate, JAX's cond batching rule turns the
    cond into a select and wraps every operand in `stop_gradient`, the tangents included;
    `jax.grad` then transposes the rule's linear part and finds a `stop_gradient` there,
    which JAX gives no transpose rule (JAX issues #22011, #39219). The interpreter
    evaluates the program's own conds with a batched index itself (`_select_branches`),
    so this is for a cond inside a call without sample sites (a jitted function, a
    library's log density), which JAX batches. As a linear map on tangents
    `stop_gradient` evaluates to the identity (that is what `jax.jvp` computes), so its
    transpose is the identity. The rule is the one lineax registers for the same bug; it
    is added only where JAX has none.
    """
    from jax._src.ad_util import stop_gradient_p
    from jax._src.interpreters import ad

    ad.primitive_transposes.setdefault(stop_gradient_p, _stop_gradient_transpose)


_register_stop_gradient_transpose()
