"""What an objective requires of a generative function's sample sites, checked when traced.

Some objectives are unbiased only for some gradient estimators at the guide's sites:
VIMCO's leave-one-out baselines multiply the derivative of the guide's log density, whose
mean is zero only for score-function sites; DReG replaces the guide's score term by a
pathwise one, which exists only for reparameterised sites. A site's estimator is chosen
per site (`NumPyroModel(..., estimators=...)`, numpyro's `infer={"estimator": ...}`), so
such an objective cannot rely on its own defaults. It states a `SiteRequirement` and calls
`check_sites` inside its program: that traces the generative function's `simulate` with the
program's arguments (`simulate_sites`), lists its sites with their estimator kinds (inside
scans, conds, while loops, nested jits and nested expectations too) and refuses a site
that does not qualify with a `px.UnsupportedEstimatorError` naming it and the way out.

What a site's law depends on is read off the traced program: a value depends on the
inputs of the call (parameters and arguments: everything the objective can be
differentiated by) *directly* when it is computed from them, and *through a pathwise draw*
when it is computed from the value of a reparameterised site whose law depends on them.
The value of a score-function or continuation site carries no derivative (its gradient is
its score), and `stop_gradient` and integer values carry none either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.extend import core

from ..adev import UnsupportedEstimatorError
from ..adev._primitives import nested_p, sample_p, tracing_expectation
from ..gen import AbstractGenerativeFunction
from ..gen._protocol import recording_density_terms

#: Site kinds (`Site.kind`).
# (read off the estimator's class-level flags, `px.AbstractEstimator`)
SCORE_FUNCTION = "score function"  # local, `score_function` (px.Reinforce): no derivative
PATHWISE = "pathwise"  # `pathwise` (px.Reparam, every point mass): the value carries it
CONTINUATION = "continuation"  # px.enum, px.mvd, px.LeaveOneOut: evaluate the rest
LOCAL = "local"  # another local estimator: neither pathwise nor a score function
OBSERVED = "observed"  # an observed site / factor: a density term that is not a draw
ESTIMATE = "estimate"  # the log density is an estimate (marginal, normalize)

#: Dependence bits (`Site.law`, `Site.weight`).
DIRECT = 1  # computed from the inputs of the call
THROUGH_PATHWISE = 2  # computed from a pathwise draw whose law depends on the inputs

_TRANSPARENT = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)


class Site(NamedTuple):
    """One sample site (or density term) of a traced `simulate`.

    - `label`: the site's label (name, distribution, estimator, user code location);
    - `name`: the site's name when it has one (`None` otherwise);
    - `estimator`: the estimator's class name (`""` for density terms);
    - `kind`: `"score function"`, `"pathwise"`, `"continuation"`, `"local"` (another
      local estimator), `"observed"` (an observed site or factor) or `"estimate"` (an
      estimated log density);
    - `baseline`: a score-function site that carries its own baseline;
    - `point_mass`: the law is a `Delta` (possibly wrapped): no randomness, pathwise;
    - `law`: what the law's parameters depend on: 0, or a combination of `DIRECT` and
      `THROUGH_PATHWISE` (see the module docstring);
    - `weight`: the same for the log density's value at the drawn point, which for a
      point mass is only its `log_density` (its value does not enter it); `law` otherwise;
    - `where`: the enclosing scopes (`"lax.scan body"`, ...), outermost first.
    """

    label: str
    name: str | None
    estimator: str
    kind: str
    baseline: bool
    point_mass: bool
    law: int
    weight: int
    where: tuple[str, ...]

    @property
    def parametric(self) -> bool:
        """Whether the law depends on the inputs of the call (directly or not)."""
        return self.law != 0


# ------------------------------------------------------------------------------- tracing


def simulate_sites(gen_fn: AbstractGenerativeFunction, *args, **kwargs) -> tuple[Site, ...]:
    """Trace `gen_fn.simulate(*args, **kwargs)` and list its sites (see `Site`).

    Call it where the objective calls `simulate`, with the same arguments (inside an
    expectation program they are tracers; concrete values work too). Nothing is run: the
    call is traced to a jaxpr. Array and number leaves of the arguments, and values of an
    enclosing trace that `gen_fn` closes over, are the inputs; floating ones can carry a
    derivative. Density terms that `simulate` reports (`report_density_term`: observed
    sites, factors, estimated densities) are listed as sites of kind `"observed"` or
    `"estimate"`.
    """
    leaves, tree = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if _is_value(leaf)]

    with tracing_expectation(), recording_density_terms() as terms:

        def run(*values):
            full = list(leaves)
            for i, value in zip(dynamic, values):
                full[i] = value
            a, k = jax.tree.unflatten(tree, full)
            gen_fn.simulate(*a, **k)
            # the reported terms' values are outputs, so their dependence is read off
            return [jnp.asarray(term.log_density) for term in terms]

        closed = jax.make_jaxpr(run)(*[leaves[i] for i in dynamic])
    sites: list[Site] = []
    const_deps = [DIRECT if isinstance(c, jax.core.Tracer) else 0 for c in closed.consts]
    in_deps = [DIRECT] * len(closed.jaxpr.invars)
    term_deps = _walk(closed.jaxpr, in_deps, const_deps, (), sites)
    for term, dep in zip(terms, term_deps, strict=True):
        sites.append(Site(term.label, None, "", term.kind, False, False, dep, dep, ()))
    if _estimated_density(gen_fn) and not any(term.kind == ESTIMATE for term in terms):
        sites.insert(0, Site(
            f"log density (a {type(gen_fn).__name__}'s `simulate` returns the log of an "
            "unbiased estimate, a proper weight)", None, "", ESTIMATE, False, False, DIRECT,
            DIRECT, ()))
    return tuple(sites)


def _estimated_density(gen_fn) -> bool:
    # The constructs do not report their estimated density themselves (yet).
    from ._constructs import Marginal, Normalize

    return isinstance(gen_fn, (Marginal, Normalize))


def _is_value(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex))


def _inexact(var) -> bool:
    aval = getattr(var, "aval", None)
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _union(deps) -> int:
    out = 0
    for d in deps:
        out |= d
    return out


def _sub_jaxprs(params) -> list[tuple[core.Jaxpr, list[int]]]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                found.append((item.jaxpr, [DIRECT if isinstance(c, jax.core.Tracer) else 0
                                           for c in item.consts]))
            elif isinstance(item, core.Jaxpr):
                found.append((item, [DIRECT] * len(item.constvars)))
    return found


def _walk(jaxpr: core.Jaxpr, in_deps, const_deps, where, sites: list[Site]) -> list[int]:
    """Dependence bits of `jaxpr`'s outputs; appends its sites to `sites`."""
    env: dict[Any, int] = {}

    def read(atom) -> int:
        return 0 if isinstance(atom, core.Literal) else env.get(atom, 0)

    def write(var, dep: int) -> None:
        env[var] = dep if _inexact(var) else 0

    for var, dep in zip(jaxpr.constvars, const_deps, strict=True):
        write(var, dep)
    for var, dep in zip(jaxpr.invars, in_deps, strict=True):
        write(var, dep)
    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        name = eqn.primitive.name
        if eqn.primitive is sample_p:
            outs = [_site(eqn, ins, where, sites)]
        elif name == "stop_gradient":
            outs = [0] * len(eqn.outvars)
        elif name == "scan":
            outs = _scan(eqn, ins, where, sites)
        elif name == "cond":
            outs = _cond(eqn, ins, where, sites)
        elif name == "while":
            outs = _while(eqn, ins, where, sites)
        else:
            outs = _call(eqn, ins, where, sites)
        for var, dep in zip(eqn.outvars, outs, strict=True):
            write(var, dep)
    return [read(v) for v in jaxpr.outvars]


def _fixpoint(body, consts, carry, xs, num_carry, where, sites, const_deps):
    """Walk a loop body until its carry's dependences are stable, then list its sites."""
    for _ in range(2 * len(carry) + 2):
        outs = _walk(body, [*consts, *carry, *xs], const_deps, where, [])
        new = [c | o for c, o in zip(carry, outs[:num_carry])]
        if new == carry:
            break
        carry = new
    return _walk(body, [*consts, *carry, *xs], const_deps, where, sites), carry


def _scan(eqn, ins, where, sites):
    closed = eqn.params["jaxpr"]
    ft_in = eqn.params["ft_in"]
    num_consts, num_carry = len(ft_in.elts[0]), len(ft_in.elts[1])
    consts, carry, xs = ins[:num_consts], ins[num_consts:num_consts + num_carry], \
        ins[num_consts + num_carry:]
    const_deps = [DIRECT if isinstance(c, jax.core.Tracer) else 0 for c in closed.consts]
    outs, carry = _fixpoint(closed.jaxpr, consts, list(carry), xs, num_carry,
                            where + ("lax.scan body",), sites, const_deps)
    return [*carry, *outs[num_carry:]]


def _while(eqn, ins, where, sites):
    params = eqn.params
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
    body = params["body_jaxpr"]
    const_deps = [DIRECT if isinstance(c, jax.core.Tracer) else 0 for c in body.consts]
    _, carry = _fixpoint(body.jaxpr, body_consts, list(carry), [], len(carry),
                         where + ("lax.while_loop body",), sites, const_deps)
    cond = params["cond_jaxpr"]
    _walk(cond.jaxpr, [*cond_consts, *carry],
          [DIRECT if isinstance(c, jax.core.Tracer) else 0 for c in cond.consts],
          where + ("lax.while_loop condition",), sites)
    return carry


def _cond(eqn, ins, where, sites):
    ops = ins[1:]
    outs = [0] * len(eqn.outvars)
    for i, branch in enumerate(eqn.params["branches"]):
        const_deps = [DIRECT if isinstance(c, jax.core.Tracer) else 0 for c in branch.consts]
        branch_outs = _walk(branch.jaxpr, ops, const_deps,
                            where + (f"lax.cond/switch branch {i}",), sites)
        outs = [a | b for a, b in zip(outs, branch_outs)]
    return outs


def _call(eqn, ins, where, sites):
    """Any other primitive: a call-like one maps its operands to its body's inputs;
    otherwise every output depends on every operand (and on the body's outputs)."""
    subs = _sub_jaxprs(eqn.params)
    if not subs:
        return [_union(ins)] * len(eqn.outvars)
    if eqn.primitive is nested_p:
        scope = str(eqn.params.get("label", "nested expectation"))
    else:
        scope = f"{eqn.primitive.name} {eqn.params.get('name', '')}".strip()
    precise = None
    body_outs = 0
    for jaxpr, const_deps in subs:
        if len(jaxpr.invars) == len(ins):
            outs = _walk(jaxpr, ins, const_deps, where + (scope,), sites)
            if precise is None and len(subs) == 1 and len(outs) == len(eqn.outvars):
                precise = outs
        else:
            outs = _walk(jaxpr, [_union(ins)] * len(jaxpr.invars), const_deps,
                         where + (scope,), sites)
        body_outs |= _union(outs)
    if precise is not None:
        return precise
    return [_union(ins) | body_outs] * len(eqn.outvars)




def _site(eqn, ins, where, sites: list[Site]) -> int:
    """Record the site of a `sample_p` equation; return its value's dependence."""
    params = eqn.params
    tree = params["tree"]
    dist_tree, est_tree = jax.tree_util.treedef_children(tree)
    num_dist = dist_tree.num_leaves
    try:  # operand indices as leaves: which operand is which parameter
        distribution, estimator = jax.tree.unflatten(tree, list(range(tree.num_leaves)))
    except Exception:  # noqa: BLE001 - a distribution that cannot be rebuilt that way
        distribution, estimator = None, jax.tree.unflatten(
            est_tree, list(range(num_dist, tree.num_leaves)))
    law = _union(ins[:num_dist])
    if distribution is None:
        point_mass, weight_leaves = _treedef_has_delta(dist_tree), None
    else:
        point_mass, weight_leaves = _point_mass(distribution)
    weight = law if weight_leaves is None else _union(ins[i] for i in weight_leaves)
    if point_mass or estimator.pathwise:
        kind = PATHWISE
    elif estimator.continuation:
        kind = CONTINUATION
    elif estimator.score_function:
        kind = SCORE_FUNCTION
    else:
        kind = LOCAL
    baseline = kind == SCORE_FUNCTION and getattr(estimator, "baseline", None) is not None
    label = params["label"]
    sites.append(Site(label, params.get("name"),
                      type(estimator).__name__, kind, baseline, point_mass, law, weight, where))
    if law == 0:
        return 0
    if point_mass:
        return law  # its value is its parameter
    if not estimator.pathwise:
        return 0  # its value is stop_gradient'ed: the estimator's terms carry the law's
    return THROUGH_PATHWISE


def _point_mass(distribution) -> tuple[bool, list[int] | None]:
    """Whether the law (operand indices as leaves) is a point mass, and then the operands
    its log density's value depends on (None when unknown: all of them)."""
    leaves: list[int] = []
    d = distribution
    while isinstance(d, _TRANSPARENT):
        if isinstance(d, dist.MaskedDistribution) and isinstance(d._mask, int):
            leaves.append(d._mask)
        d = d.base_dist
    if isinstance(d, dist.Delta):
        if isinstance(d.log_density, int):
            leaves.append(d.log_density)
        return True, leaves
    # a point mass under another wrapper (e.g. transformed): its log density is unknown
    return _contains_delta(distribution), None


def _treedef_has_delta(treedef) -> bool:
    data = treedef.node_data()
    if data is not None and isinstance(data[0], type) and issubclass(data[0], dist.Delta):
        return True
    return any(_treedef_has_delta(c) for c in jax.tree_util.treedef_children(treedef))


def _contains_delta(distribution) -> bool:
    while isinstance(distribution, dist.Distribution):
        if isinstance(distribution, dist.Delta):
            return True
        distribution = getattr(distribution, "base_dist", None)
    return False


# --------------------------------------------------------------------------- requirements


class SiteRequirement(NamedTuple):
    """What an objective requires of the sites of one of its generative functions.

    - `objective`: the objective's name (`"px.vi.vimco"`), for messages;
    - `role`: the generative function's role in it (`"guide"`);
    - `refuse`: a function of a `Site` that returns why the site does not qualify (a
      sentence completing "site ... ") or None when it does;
    - `why`: what the objective assumes, for messages;
    - `way_out`: what to do instead, for messages.
    """

    objective: str
    role: str
    refuse: Callable[[Site], str | None]
    why: str
    way_out: str


def check_sites(requirement: SiteRequirement, gen_fn: AbstractGenerativeFunction,
                *args, **kwargs) -> tuple[Site, ...]:
    """Refuse the first site of `gen_fn.simulate(*args, **kwargs)` that `requirement`
    refuses, with a `px.UnsupportedEstimatorError` naming it; return the sites."""
    sites = simulate_sites(gen_fn, *args, **kwargs)
    for site in sorted(sites, key=lambda site: site.kind != ESTIMATE):  # the whole first
        reason = requirement.refuse(site)
        if reason is not None:
            where = f" (inside {' > '.join(site.where)})" if site.where else ""
            raise UnsupportedEstimatorError(
                f"{requirement.objective}: the {requirement.role}'s {site.label}{where} "
                f"{reason}. {requirement.why} {requirement.way_out}"
            )
    return sites


def _depends(bits: int) -> str:
    if bits & DIRECT:
        return "the parameters or arguments"
    return "a reparameterised draw whose law depends on the parameters or arguments"


def _refuse_density_term(site: Site) -> str | None:
    if site.kind == ESTIMATE:
        return "is not the exact density of the draws"
    if site.kind == OBSERVED and site.law:
        return ("is a term of the log density that is not a draw, and it depends on "
                "the parameters or arguments")
    return None


def score_function_site(site: Site) -> str | None:
    """VIMCO's requirement (the leave-one-out baselines multiply `d log q`).

    A site qualifies when the derivative of its log density at the drawn value has mean
    zero given the other draws, and its value carries no derivative: a score-function
    site without a baseline of its own (VIMCO supplies it), a site whose law does not
    depend on the inputs (its log density has no derivative), or a point mass whose
    weight (`log_density`) does not depend on them (its log density has no derivative;
    its value's derivative is the pathwise one, which the bound carries).
    """
    term = _refuse_density_term(site)
    if term is not None or site.kind in (OBSERVED, ESTIMATE):
        return term
    if not site.parametric:
        return None
    if site.kind == SCORE_FUNCTION:
        if site.baseline:
            return ("carries its own baseline, and VIMCO supplies a leave-one-out baseline "
                    "per particle (the sum of both is not VIMCO's estimator)")
        return None
    if site.point_mass:
        if site.weight == 0:
            return None
        return (f"is a point mass whose log_density depends on {_depends(site.weight)}, "
                "so the derivative of the guide's log density does not average to zero")
    return (f"uses the {site.kind} estimator {site.estimator} and its law depends on "
            f"{_depends(site.law)}, so the derivative of the guide's log density does not "
            "average to zero")


def pathwise_site(site: Site) -> str | None:
    """DReG's requirement (every guide score term replaced by a pathwise one).

    A site qualifies when it is reparameterised with a density (not a point mass), when
    its law does not depend on the inputs (no score term), or when it is a point mass
    whose law depends on the inputs only through reparameterised draws (a deterministic
    function of them, such as an autoguide's unpacked latent).
    """
    term = _refuse_density_term(site)
    if term is not None or site.kind in (OBSERVED, ESTIMATE):
        return term
    if not site.parametric:
        return None
    if site.point_mass:
        if site.law & DIRECT:
            return ("is a point mass whose value or weight depends directly on the "
                    "parameters or arguments: it has no reparameterised density")
        return None
    if site.kind == PATHWISE:
        return None
    return (f"uses the {site.kind} estimator {site.estimator} and its law depends on "
            f"{_depends(site.law)}: DReG has no term for its score")
