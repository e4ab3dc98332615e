"""Sign facts about the values of a jaxpr, to skip run-time parameter checks that cannot fail.

A site whose distribution validates its arguments gets a run-time check of the parameters
that are traced (numpyro checks only concrete ones). When the program itself guarantees a
constraint, e.g. `scale = softplus(h) + 1e-3` is positive, the check is dead weight: and a
check that can raise is compiled as a host callback, which slows the whole step on CPU.
`facts(jaxpr)` walks the equations once and records, per variable, which of these hold for
every element, in floating point (so `exp(x)` is only non-negative: it underflows to 0):

- `"nonneg"`: `>= 0`;
- `"pos"`: `> 0` (implies `"nonneg"`);
- `"unit"`: in `[0, 1]` (implies `"nonneg"`).

Anything not covered by a rule gets no facts, so a check is skipped only when it provably
holds. Inputs have no facts.
"""

from __future__ import annotations

import functools

import numpy as np
from jax.extend import core
from numpyro.distributions import constraints

NONE: frozenset = frozenset()
NONNEG = frozenset({"nonneg"})
POS = frozenset({"pos", "nonneg"})
UNIT = frozenset({"unit", "nonneg"})


def _literal(value) -> frozenset:
    try:
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.number) or array.size == 0:
            return NONE
        if not np.all(np.isfinite(array)):
            return NONE
    except Exception:  # noqa: BLE001 - a tracer or an odd constant: no facts
        return NONE
    result = set()
    if np.all(array > 0):
        result |= POS
    if np.all(array >= 0):
        result |= NONNEG
    if np.all((array >= 0) & (array <= 1)):
        result |= UNIT
    return frozenset(result)


def _common(*fs):
    out = fs[0]
    for f in fs[1:]:
        out = out & f
    return out


_PRESERVE = frozenset("""
convert_element_type broadcast_in_dim reshape squeeze expand_dims transpose slice
dynamic_slice copy copy_p stop_gradient reduce_max reduce_min cummax cummin
reduce_precision real
""".split())


def _rule(eqn, ins: list[frozenset]) -> list[frozenset]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if name in ("jit", "pjit", "closed_call", "checkpoint", "remat", "custom_jvp_call",
                "custom_vjp_call"):
        sub = None
        for key in ("jaxpr", "call_jaxpr"):
            value = eqn.params.get(key)
            if isinstance(value, core.ClosedJaxpr):
                sub, consts = value.jaxpr, value.consts
                break
            if isinstance(value, core.Jaxpr):
                sub, consts = value, []
                break
        if sub is None:
            return [NONE] * n_out
        if _function_name(sub) == "logaddexp" and n_out == 1:
            # log(e^a + e^b) >= max(a, b); the body's nan/inf branch hides that
            return [NONNEG if any("nonneg" in f for f in ins) else NONE]
        const_facts = [_literal(c) for c in consts]
        return _run(sub, const_facts, ins)
    if name in _PRESERVE:
        return [ins[0]] * n_out
    if name in ("concatenate", "select_n"):
        cases = ins[1:] if name == "select_n" else ins
        return [_common(*cases)]
    if name in ("gather", "dynamic_slice", "pad"):
        return [ins[0] if name != "pad" else _common(ins[0], ins[1])]
    if name in ("exp", "exp2"):
        return [NONNEG]
    if name == "logistic":
        return [UNIT]
    if name == "abs":
        return [NONNEG | (ins[0] & POS)]
    if name == "square":  # a tiny positive value squares to 0
        return [NONNEG]
    if name == "integer_pow":
        if eqn.params["y"] % 2 == 0:
            return [NONNEG]
        return [ins[0] & NONNEG]
    if name == "sqrt":
        return [ins[0] & POS if "nonneg" in ins[0] else NONE]
    if name in ("log1p",):
        return [NONNEG if "nonneg" in ins[0] else NONE]
    if name in ("reduce_sum", "cumsum"):
        return [ins[0] & POS if "pos" in ins[0] else ins[0] & NONNEG]
    a, b = (ins + [NONE, NONE])[:2]
    if name == "add":
        if ("pos" in a and "nonneg" in b) or ("pos" in b and "nonneg" in a):
            return [POS]
        return [NONNEG if "nonneg" in a and "nonneg" in b else NONE]
    if name == "mul":
        if "unit" in a and "unit" in b:
            return [UNIT]
        return [NONNEG if "nonneg" in a and "nonneg" in b else NONE]
    if name == "div":
        return [NONNEG if "nonneg" in a and "pos" in b else NONE]
    if name == "max":
        if "pos" in a or "pos" in b:
            return [POS]
        return [NONNEG if "nonneg" in a or "nonneg" in b else NONE]
    if name == "min":
        result = a & b
        if ("unit" in a and "nonneg" in b) or ("unit" in b and "nonneg" in a):
            result = result | UNIT
        return [result]
    if name == "sub":
        one = getattr(eqn.invars[0], "val", None)
        if one is not None and np.all(np.asarray(one) == 1) and "unit" in b:
            return [UNIT]
        return [NONE]
    return [NONE] * n_out


def _function_name(jaxpr) -> str:
    debug = getattr(jaxpr, "debug_info", None)
    return str(getattr(debug, "func_name", "")).split(" ")[0]


def _env(jaxpr: core.Jaxpr, const_facts, in_facts) -> dict:
    """`{var: facts}` for every variable of `jaxpr`, from the facts of its inputs."""
    env: dict = dict(zip(jaxpr.constvars, const_facts))
    env.update(zip(jaxpr.invars, in_facts))
    for eqn in jaxpr.eqns:
        outs = _rule(eqn, [_read(env, a) for a in eqn.invars])
        env.update(zip(eqn.outvars, outs))
    return env


def _read(env: dict, atom) -> frozenset:
    if isinstance(atom, core.Literal):
        return _literal(atom.val)
    return env.get(atom, NONE)


def _run(jaxpr: core.Jaxpr, const_facts, in_facts) -> list[frozenset]:
    env = _env(jaxpr, const_facts, in_facts)
    return [_read(env, a) for a in jaxpr.outvars]


@functools.lru_cache(maxsize=1024)
def facts(jaxpr: core.Jaxpr) -> dict:
    """`{var: facts}` for every variable of `jaxpr` (inputs and constants have none)."""
    return _env(jaxpr, [NONE] * len(jaxpr.constvars), [NONE] * len(jaxpr.invars))


def fact_of(jaxpr: core.Jaxpr, atom) -> frozenset:
    """The facts of one input of an equation of `jaxpr` (a variable or a literal)."""
    if isinstance(atom, core.Literal):
        return _literal(atom.val)
    return facts(jaxpr).get(atom, NONE)


def proves(fact: frozenset, constraint) -> bool:
    """Whether `fact` guarantees `constraint` for every element."""
    if constraint is constraints.positive:
        return "pos" in fact
    if constraint is constraints.nonnegative:
        return "nonneg" in fact
    if constraint is constraints.unit_interval:
        return "unit" in fact
    return False
