"""Static check that reparameterised draws only reach continuous computations.

The pathwise (reparameterisation) gradient of `E[k(x)]` is unbiased when `k` is continuous
in `x`; a step in `k` (a comparison that selects a branch, `floor`, a cast to an integer)
contributes a boundary term that the pathwise estimator silently misses. This module finds
such steps in the traced program before any estimate is computed.

Taint analysis over the jaxpr (after dead-code elimination, so unused values are ignored):
- *path*: a floating value that depends on a reparameterised draw;
- *step*: a boolean or integer value computed from a path or step value.
A floating result computed from a step value, a step primitive (`floor`, `sign`, ...)
applied to a path value, or a branch / loop condition on a path or step value is a
violation: `UnsupportedEstimatorError` naming the site, the primitive and the way out.
`custom_jvp`/`custom_vjp` functions (e.g. `jax.nn.relu`) are trusted to be continuous, and
so is code in numpyro's distributions package (its case splits are support checks:
`log_prob` is `-inf` outside the support, which a reparameterised draw from inside the
support never crosses) and in `jax.scipy` / `jax.nn` (numerical safeguards such as the max
shift in `logsumexp`). The trust covers the case splits that such code makes itself: a
step made by the user's code (an `argmax`, a comparison) stays a step when it passes
through library code (`jax.nn.one_hot`, a `log_prob`), so its discontinuity is caught.
Loops are analysed to a fixed point over their carries. The check is conservative:
`jnp.where(x > 0, x, 0.0)` is continuous but flagged; such a site can opt out with
`px.Reparam(allow_discontinuous=True)`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from jax.extend import core
from jax._src import source_info_util

from ._errors import UnsupportedEstimatorError
from ._primitives import nested_p, sample_p

_STEP_PRIMITIVES = frozenset(
    {"floor", "ceil", "round", "sign", "rem", "nextafter", "is_finite", "argmax", "argmin"}
)
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"})
_TRUSTED = frozenset({"custom_jvp_call", "custom_vjp_call"})


class _Path(tuple):
    """(site label,)"""


class _Step(tuple):
    """(site label, primitive name, source[, born in trusted library code])"""

    @property
    def trusted(self) -> bool:
        return len(self) > 3 and bool(self[3])


def _is_float(var) -> bool:
    dtype = getattr(var.aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _violation(site: str, what: str) -> UnsupportedEstimatorError:
    return UnsupportedEstimatorError(
        f"{site} is reparameterised, but the program is discontinuous in its value: {what}. "
        "The pathwise gradient would miss the jump and be biased. Use estimator="
        "px.reinforce or px.mvd for this site (px.enum if it is discrete), or "
        "px.Reparam(allow_discontinuous=True) if the program is continuous where the "
        "branch switches (e.g. jnp.where(x > 0, x, 0.0))."
    )


def _where(eqn) -> str:
    return source_info_util.summarize(eqn.source_info)


# Library code whose case splits are numerical safeguards or support checks, continuous
# where a reparameterised draw can reach them (logsumexp's max shift, log_prob's support).
_TRUSTED_CODE = (
    "/numpyro/distributions/",
    "/jax/_src/scipy/",
    "/jax/_src/nn/",
    "/jax/_src/ops/special.py",
)


def _trusted_code(eqn) -> bool:
    traceback = eqn.source_info.traceback
    if traceback is None:
        return False
    return any(
        part in frame.file_name.replace("\\", "/")
        for frame in traceback.frames
        for part in _TRUSTED_CODE
    )


def check_continuity(jaxpr: core.Jaxpr) -> None:
    """Raise if a pathwise site's value reaches a discontinuity that affects the outputs.

    `jaxpr` must be free of dead code (`pe.dce_jaxpr`), so that only values that reach the
    outputs are judged.
    """
    if _has_pathwise(jaxpr):
        _analyse(jaxpr, [None] * (len(jaxpr.constvars) + len(jaxpr.invars)))


@functools.lru_cache(maxsize=4096)
def _has_pathwise(jaxpr: core.Jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p and eqn.params["pathwise"]:
            return True
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = item.jaxpr if isinstance(item, core.ClosedJaxpr) else item
                if isinstance(sub, core.Jaxpr) and _has_pathwise(sub):
                    return True
    return False


def _jaxpr_of(value) -> core.Jaxpr:
    return value.jaxpr if isinstance(value, core.ClosedJaxpr) else value


def _analyse(jaxpr: core.Jaxpr, in_taints: list[Any]) -> list[Any]:
    env: dict[Any, Any] = {}
    for var, taint in zip(jaxpr.constvars + jaxpr.invars, in_taints, strict=True):
        env[var] = taint

    def read(atom):
        return None if isinstance(atom, core.Literal) else env.get(atom)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _rule(eqn, ins)
        for var, taint in zip(eqn.outvars, outs, strict=True):
            env[var] = taint
    return [read(v) for v in jaxpr.outvars]


def _first(taints, kind=None):
    for t in taints:
        if t is not None and (kind is None or isinstance(t, kind)):
            return t
    return None


def _generic(eqn, ins) -> list[Any]:
    step = _first(ins, _Step)
    path = _first(ins, _Path)
    outs = []
    for var in eqn.outvars:
        if _is_float(var):
            if step is not None:
                raise _violation(step[0], f"'{step[1]}' at {step[2]} feeds '{eqn.primitive.name}' "
                                 f"at {_where(eqn)}")
            if path is not None and eqn.primitive.name in _STEP_PRIMITIVES:
                raise _violation(path[0], f"'{eqn.primitive.name}' at {_where(eqn)}")
            outs.append(path)
        else:
            source = step or path
            outs.append(None if source is None else
                        _Step((source[0], step[1] if step else eqn.primitive.name,
                               step[2] if step else _where(eqn),
                               step.trusted if step else False)))
    return outs


def _branch_guard(taint, eqn, what: str):
    if taint is not None:
        via = f"'{taint[1]}' at {taint[2]}" if isinstance(taint, _Step) else eqn.primitive.name
        raise _violation(taint[0], f"{what} depends on it through {via}")


def _join(a, b):
    if isinstance(a, _Step) or b is None:
        return a if a is not None else b
    if isinstance(b, _Step) or a is None:
        return b
    return a


def _fixpoint(body_fn, carry, num_rounds):
    for _ in range(num_rounds):
        new = body_fn(carry)
        joined = [_join(c, n) for c, n in zip(carry, new, strict=True)]
        if [type(t) for t in joined] == [type(t) for t in carry]:
            return joined
        carry = joined
    return carry


def _untrusted_step(ins) -> bool:
    return any(isinstance(t, _Step) and not t.trusted for t in ins)


def _rule(eqn, ins) -> list[Any]:
    # Trusted library code may split cases on a path value (a step born inside it); a step
    # made by the user's code (e.g. an argmax) stays a step when it passes through library
    # code (e.g. jax.nn.one_hot), so its discontinuity is still caught.
    try:
        outs = _rule_checked(eqn, ins)
    except UnsupportedEstimatorError:
        if _untrusted_step(ins) or not _trusted_code(eqn):
            raise
        path = _first(ins, _Path) or _first(ins, _Step)
        return [None if path is None or not _is_float(v) else _Path((path[0],))
                for v in eqn.outvars]
    if (not _untrusted_step(ins) and any(isinstance(o, _Step) and not o.trusted for o in outs)
            and _trusted_code(eqn)):
        outs = [_Step((*o[:3], True)) if isinstance(o, _Step) else o for o in outs]
    return outs


def _rule_checked(eqn, ins) -> list[Any]:
    name = eqn.primitive.name
    if eqn.primitive is sample_p:
        step = _first(ins, _Step)
        if step is not None:
            raise _violation(step[0], f"'{step[1]}' at {step[2]} sets the parameters of "
                             f"{eqn.params['label']}")
        if eqn.params["pathwise"]:
            return [_Path((eqn.params["label"],))]
        return [None]
    if eqn.primitive is nested_p:
        return _analyse(eqn.params["jaxpr"], ins)
    if name in _CALLS:
        param = "call_jaxpr" if "call_jaxpr" in eqn.params else "jaxpr"
        sub = eqn.params[param]
        return _analyse(_jaxpr_of(sub), [None] * len(_jaxpr_of(sub).constvars) + ins)
    if name in _TRUSTED:
        return _generic_trusted(eqn, ins)
    if name == "cond":
        index, *ops = ins
        _branch_guard(index, eqn, "a lax.cond/switch (or jnp.where on a traced branch)")
        outs = None
        for branch in eqn.params["branches"]:
            b = _analyse(branch.jaxpr, [None] * len(branch.jaxpr.constvars) + ops)
            outs = b if outs is None else [_join(x, y) for x, y in zip(outs, b, strict=True)]
        return outs
    if name == "select_n":
        _branch_guard(ins[0], eqn, "a select (jnp.where)")
        return _generic(eqn, [None] + ins[1:])
    if name == "scan":
        ft_in = eqn.params["ft_in"]
        nc, ncar = len(ft_in.elts[0]), len(ft_in.elts[1])
        body = _jaxpr_of(eqn.params["jaxpr"])
        consts, carry, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
        extra = [None] * len(body.constvars)

        def run(c):
            return _analyse(body, extra + consts + c + xs)[:ncar]

        carry = _fixpoint(run, carry, 2 * ncar + 2)
        return _analyse(body, extra + consts + carry + xs)
    if name == "while":
        cj, bj = eqn.params["cond_jaxpr"], eqn.params["body_jaxpr"]
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        cconsts, bconsts, carry = ins[:nc], ins[nc : nc + nb], ins[nc + nb :]
        carry = _fixpoint(lambda c: _analyse(bj.jaxpr, bconsts + c), carry, 2 * len(carry) + 2)
        pred = _analyse(cj.jaxpr, cconsts + carry)[0]
        _branch_guard(pred, eqn, "a while_loop condition")
        return carry
    if name == "convert_element_type" and ins[0] is not None and isinstance(ins[0], _Path):
        if not _is_float(eqn.outvars[0]):
            raise _violation(ins[0][0], f"a cast to {eqn.params['new_dtype']} at {_where(eqn)}")
    return _generic(eqn, ins)


def _generic_trusted(eqn, ins):
    step = _first(ins, _Step)
    if step is not None:
        return _generic(eqn, ins)
    path = _first(ins, _Path)
    return [path if _is_float(v) else (None if path is None else
            _Step((path[0], eqn.primitive.name, _where(eqn)))) for v in eqn.outvars]
