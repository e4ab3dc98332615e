"""Plate groups: plate-batched enum, mvd and reinforce sites evaluated per element together.

`_separable.py` decides whether the rest of a program is a sum of per-element terms in one
site's elements. Evaluating that on the *interpreted* continuation would mean analysing
the code that the estimators of later sites generate (weighted sums, gathers of
alternatives, score terms), which its rules do not know; two plate-batched sites then did
not compose (joint enumeration, or a refusal blaming ppl_ext's own code) and every failure
re-traced the rest of the program.

Here the rest of the *user's* program is evaluated once with tags (the `_separable`
rules, equation by equation, on the user's equations), starting at the first
plate-batched `px.enum`, `px.mvd` or (Rao-Blackwellised) `px.reinforce` site (the
*leader*). Later sites are handled by rules that know their meaning, never by analysing
the code their estimators generate:

- a *member* of the group is a site whose leading batch axis is the same plate of `n`
  elements and whose per-element log density depends on the group's elements per element
  (or not at all):
  - `px.enum` members whose element values are constants (Bernoulli, Categorical) are
    *planned* before the evaluation starts, from the equations (`_plan`), and enumerated
    together with the leader in one flat vmap over all joint values of their elements
    (each member's value set in every element); inside it each member's value is given,
    its per-element probabilities multiply a per-element weight `w_i`, and at the end of
    the program the per-element terms are multiplied by `w_i` and added up over the
    joint values (`_flat_run`). Members beyond `MAX_FLAT_SIZE` joint values, or with
    supports that depend on traced values, get a vmap of their own (`_enumerate`);
  - `px.mvd` members: the rest of the program at the draw and at its perturbations, each
    perturbation changing one entry in every element (`_mvd`);
  - `px.reinforce` members: the rest of the program at the draw; element `i`'s score
    multiplies element `i`'s term only, minus its per-element baseline (`_reinforce`);
- a site whose parameters do not depend on the group and that is not on the plate: drawn
  by its (local) estimator as usual, its score terms accumulate as usual;
  - a `px.reinforce` one on another plate (no baseline, at most `MAX_OTHER_PLATE`
    elements): scored per element of its own plate against an independent reference
    draw of each element (`_reinforce_other_plate`; `m + 1` evaluations);
  - a `px.enum` one on another plate of `m` elements, where the rest of the program is a
    sum of terms per element of *that* plate (`_additive_rest`, on the user's equations),
    is summed over per element: `m·V + 1` evaluations of the rest with tags, each changing
    one of its elements (`_enumerate_other_plate`);
  - any other `px.enum` one (a scalar site, or one on another plate with few enough
    joint values) is summed over jointly inside the group, each value's rest of the
    program evaluated with tags in one vmap and its later score terms folded into that
    value's per-element terms (`_enumerate_plain`);
  - a `px.mvd` one: the rest of the program at the draw and at each perturbed entry
    (`_mvd_plain`, as `MVD.run`);
- a reparameterised site whose parameters depend on the group per element: its draw is
  tagged by evaluating the sampler with tags.

Anything else (another continuation estimator outside the group, a score-function site
whose law mixes the group's elements, sites inside control flow, a value that mixes
elements) stops the group evaluation, and the leader falls back to its own estimator
(`Enum.run`: joint enumeration, refused beyond its size limit with the group's reason;
`MVD.run`: one evaluation per perturbed entry; or `Reinforce.local`: the score of the
whole objective). Nothing re-analyses the code that estimators generate.

For `m` enum members with `K_j` values per element the rest of the program runs `Π_j K_j`
times in one vmap and is traced once: trace time is linear in the number of sites. Sites
on other plates multiply that count by `m_k·V_k + 1` each (their evaluations are nested). The
result is exact: `E[k] = Σ_i Σ_{u_1..u_m} Π_j q_{j,i}(u_j | ...) g_i(u_1..u_m) + h`.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from . import _separable as sep
from ._errors import UnsupportedEstimatorError
from ._estimators import (
    Enum,
    MVD,
    Reinforce,
    Reparam,
    _element_log_density,
    _element_mass,
    _element_values,
    _factorisable,
    _law,
    _mvd_terms,
    _support_values,
    _univariate_base,
    _weighted_sum,
    first_invalid,
    mvd_alternatives,
)
from ._laws import mass as _mass
from ._primitives import nested_p, sample_p

P, L, S, X = sep.P, sep.L, sep.S, sep.X


class NotSeparable(Exception):
    """The group evaluation does not apply; the message says why."""


def _open_group(distribution, resume):
    """`(n, env, frame)` for a group that starts at this site, or `NotSeparable`."""
    if not _factorisable(distribution):
        raise NotSeparable("the site has no plate axis")
    if not _reaches_finish(resume):
        raise NotSeparable("the rest of the program is not available here")
    _VERDICTS.clear()
    n = distribution.batch_shape[0]
    env = {var: sep.Val(P, arr=val) for var, val in resume.env.items()}
    return n, env, _Frame(resume.jaxpr, resume.index, resume.scope, resume.cont)


def _group(frame, n, build, acc, first=None):
    """Run the group that `build(flat) -> rest` sets up, and finish the whole program.

    A site on a plate of the same size whose law does not depend on the group joins it
    with its elements paired with the group's (cheap: its values are enumerated with the
    group's); where that fails (`Σ_i f(a_i) · Σ_j g(b_j)` mixes the paired elements) the
    group is evaluated once more with such sites handled as sites on another plate.
    `first`: `(key, element values, probabilities)` of a leader that is the flat
    enumeration's first member.
    """

    def start():
        flat = _Flat()
        if first is not None:
            flat.add(first[0], first[1])
            flat.weights = first[2]
        return flat

    flat = _plan(start(), frame, n)
    try:
        return _close_group(flat, build(flat), acc)
    except NotSeparable:
        if not flat.used_plain:
            raise
    flat = start()  # no plan: a planned site would join whatever its law
    flat.plain_members = False
    return _close_group(flat, build(flat), acc)


def _joins(flat, dist_tags) -> bool:
    """Whether a site whose law is plain for the group may join it (see `_group`)."""
    if all(v.kind == P for v in dist_tags):
        if not flat.plain_members:
            return False
        flat.used_plain = True
    return True


def _close_group(flat, rest, acc):
    """Run the group (`rest` under the flat enumeration) and finish the whole program."""
    from ._interpreter import add_acc, finish

    outs, score, baseline, invalid = _flat_run(flat, rest)
    acc = add_acc(acc, score, baseline)
    return finish([v.array() for v in outs],
                  acc._replace(invalid=_merge_invalid(acc.invalid, invalid)))


def enumerate_group(distribution, resume, acc, dtype, site: str):
    """Exact per-element enumeration of the group that starts at this site.

    Returns `(outputs, invalid)` of the whole program (surrogates in surrogate mode, with
    `acc` applied), or raises `NotSeparable`.
    """
    n, env, frame = _open_group(distribution, resume)
    values = _element_values(distribution, site, dtype)  # (V,) + shape[1:]
    if not isinstance(values, np.ndarray):
        return _group(frame, n, lambda flat: lambda: _enumerate(
            distribution, frame, env, dtype, site, n, flat, None), acc)
    leader = (id(frame.jaxpr), frame.index)
    # the site's probabilities do not depend on the rest: computed once, outside
    alternatives = np.broadcast_to(values[:, None], (values.shape[0], n) + values.shape[1:])
    weights = _element_mass(_law(distribution, site), alternatives, n)  # (V, n)

    def build(flat):  # the site is the flat enumeration's first member
        def rest():
            value = flat.value(flat.position[leader], n)
            flat.visited.add(leader)
            weight = flat.values[-1]  # (n,), unclamped
            env2 = dict(env)
            _write(env2, frame.eqn, [sep.Val(L, arr=value, axis=0)])
            return _run(frame, env2, n, flat, weight)

        return rest

    return _group(frame, n, build, acc, first=(leader, values, weights))


class _Frame:
    """Where the tagged evaluation resumes: after equation `index` of `jaxpr`."""

    __slots__ = ("jaxpr", "index", "scope", "cont")

    def __init__(self, jaxpr, index, scope, cont):
        self.jaxpr, self.index, self.scope, self.cont = jaxpr, index, scope, cont

    @property
    def eqn(self):
        return self.jaxpr.eqns[self.index]


def _reaches_finish(resume) -> bool:
    from ._interpreter import Resume, finish

    cont = resume
    while isinstance(cont, Resume):
        cont = cont.cont
    return cont is finish


def _enumerate(distribution, frame, env, dtype, site, n, flat, weight):
    """Enumerate one member by a vmap of its own (a member the flat plan does not hold).

    `env` holds the tagged values of `frame`'s scope before the member's equation; `weight`
    the flat members' per-element weights so far (None: 1). Returns the program's outputs
    (`P` or `S` values, combined over the member's values), the score, baseline and
    invalid accumulators of the rest of the program, and the flat weights (see `_run`).
    """
    values = _element_values(distribution, site, dtype)  # (V,) + shape[1:]
    alternatives = jnp.broadcast_to(values[:, None], (values.shape[0], n) + values.shape[1:])
    weights = _element_mass(_law(distribution, site), alternatives, n)  # (V, n), unclamped
    tags, leaves, score, baseline, invalid, later = _evaluate(frame, env, alternatives, n,
                                                               flat, weight)
    if later is not None:  # Σ_u q_u(value) · (flat weights after u), per element
        later = jnp.sum(jax.lax.stop_gradient(weights).astype(later.dtype) * later, axis=0)
    outs = []
    for kind, leaf in zip(tags, leaves, strict=True):
        if kind == P:
            outs.append(sep.Val(P, arr=leaf[0]))
        else:  # S: per-element terms (V, n) + shape; const (V,) + shape, the same for all V
            vec, const = leaf
            outs.append(sep.Val(S, vec=_per_element_sum(weights, vec), const=_first(const)))

    return outs, _first(score), _first(baseline), _first_invalid(invalid), later


def _enumerate_plain(distribution, frame, env, dtype, site, n, flat, weight):
    """Enumerate a `px.enum` site that is not a member (no plate axis, another plate, or
    parameters that do not depend on the group): `Σ_v q(v) k(v)` inside the group.

    Its law does not depend on the group's elements, so every value `v` is plain (the same
    in every element) and the rest of the program, evaluated with tags for each `v` in one
    vmap, stays a sum of per-element terms; so does the weighted sum over `v`. The sites
    scored after it are scored per value: each value's own score and baseline terms are
    folded into its outputs first (`y + sg(y)·A - B`, split into per-element terms `vec_i +
    sg(vec_i)·A` and `const + sg(const)·A - B`: `sg(y)·A` is linear in the terms), so the
    score of a later site multiplies only the terms of its own value's branch, as in
    `Enum.run`'s `vmap` over the interpreted continuation. Returns the outputs, the first
    invalid id and the flat weights (see `_run`); the caller's accumulators are unchanged.
    """
    law = _law(distribution, site)
    try:
        values = _support_values(law, site, dtype)  # (V,) + shape
    except UnsupportedEstimatorError as error:
        raise NotSeparable(f"{site} cannot be enumerated inside the group: {error}") from None
    size = values.shape[0]
    weights = jax.vmap(lambda v: _mass(law, v))(values).reshape(size, -1).prod(-1)  # (V,)
    tags: list = []

    leaves, invalid, later = jax.vmap(_folded_rest(frame, env, n, flat, weight, tags))(values)
    if later is not None:
        later = _weighted_sum(jax.lax.stop_gradient(weights), later, 1)
    outs = _map_outs(tags, leaves, lambda leaf: _weighted_sum(weights, leaf, 1))
    return outs, _first_invalid(invalid), later


def _map_outs(tags, leaves, f):
    """The outputs of the rest of the program with `f` applied to each leaf: to `arr` for a
    `P` leaf, to `vec` and (when present) `const` for an `S` leaf `(vec, const)`."""
    outs = []
    for kind, leaf in zip(tags, leaves, strict=True):
        if kind == P:
            outs.append(sep.Val(P, arr=f(leaf)))
        else:
            vec, const = leaf
            outs.append(sep.Val(S, vec=f(vec), const=None if const is None else f(const)))
    return outs


def _folded_rest(frame, env, n, flat, weight, tags):
    """`value -> (leaves, invalid, later)`: the tagged rest of the program with the site's
    value plain, each later site's score and baseline terms folded into the outputs.

    `y + sg(y)·A - B` is split into per-element terms `vec_i + sg(vec_i)·A` and `const +
    sg(const)·A - B` (`sg(y)·A` is linear in the terms), so that a weighted sum over the
    site's values multiplies each later score by the terms of its own value's branch, as
    in `Enum.run`'s `vmap` over the interpreted continuation. `tags` receives the output
    kinds (`P` or `S`); a leaf is `arr` (`P`) or `(vec, const)` (`S`).
    """

    def evaluate(value):
        env2 = dict(env)
        _write(env2, frame.eqn, [sep.Val(P, arr=value)])
        outs, score, baseline, invalid, later = _run(frame, env2, n, flat, weight)
        tags[:] = [v.kind for v in outs]
        leaves = []
        for v in outs:
            if v.kind == S:
                vec, const = v.vec, v.const
                if score is not None:
                    vec = vec + jax.lax.stop_gradient(vec) * score.astype(vec.dtype)
                    if const is not None:
                        const = const + jax.lax.stop_gradient(const) * score.astype(const.dtype)
                if baseline is not None:
                    base = baseline.astype(vec.dtype)
                    const = -base if const is None else const - base
                leaves.append((vec, const))
            else:
                arr = v.arr
                if score is not None:
                    arr = arr + jax.lax.stop_gradient(arr) * score.astype(arr.dtype)
                if baseline is not None:
                    arr = arr - baseline.astype(arr.dtype)
                leaves.append(arr)
        return leaves, invalid, later

    return evaluate


def _enumerate_other_plate(distribution, frame, env, dtype, site, n, flat, weight):
    """Enumerate a `px.enum` site on *another* plate of `m` elements, per element.

    The site's law does not depend on the group (its values are plain for the group's
    tags) and the rest of the program is a sum of per-element terms in the site's own
    elements, `y(b) = Σ_j g_j(b_j) + c` (checked first on the user's equations by
    `_additive_rest`). Then, from a base value `b⁰` (each element's most probable value)
    and the values `b⁰ ⊕_j v` that change element `j` only,

        E[y] = y(b⁰) + Σ_j Σ_v q_j(v) · (y(b⁰ ⊕_j v) - y(b⁰)),

    exactly (each difference is `g_j(v) - g_j(b⁰_j)`, and `Σ_v q_j(v) = 1`): `m·V + 1`
    evaluations of the rest of the program, tagged for the group, in one vmap, instead
    of the `V^m` joint values `_enumerate_plain` would sum over. The combination is linear,
    so the group's per-element terms stay per element; later score terms are folded into
    each evaluation first (`_folded_rest`). The gradient in `q` is that of the exact sum.
    """
    m = distribution.batch_shape[0]
    law = _law(distribution, site)
    values = jnp.asarray(_element_values(distribution, site, dtype))  # (V,) + shape[1:]
    size = values.shape[0]
    trailing = values.shape[1:]
    q = _element_mass(law, jnp.broadcast_to(values[:, None], (size, m) + trailing), m)
    base = values[jnp.argmax(jax.lax.stop_gradient(q), axis=0)]  # (m,) + shape[1:]
    change = jnp.eye(m, dtype=bool).reshape((1, m, m) + (1,) * len(trailing))
    alternatives = jnp.where(change, values[:, None, None], base[None, None])
    alternatives = jnp.concatenate(
        [alternatives.reshape((size * m, m) + trailing), base[None]], axis=0)
    coefficients = q.reshape(size * m)  # alternative (v, j): q_j(v)
    tags: list = []
    leaves, invalid, later = jax.vmap(_folded_rest(frame, env, n, flat, weight, tags))(
        alternatives)

    def combine(leaf):  # leaf[-1] + Σ_a c_a (leaf[a] - leaf[-1])
        return leaf[-1] + _weighted_sum(coefficients, leaf[:-1] - leaf[-1:], 1)

    outs = _map_outs(tags, leaves, combine)
    return outs, _first_invalid(invalid), None if later is None else later[-1]


def _mvd_plain(distribution, frame, env, key, dtype, site, n, flat, weight):
    """MVD of a site that is not a member (no plate axis, another plate, or parameters
    that do not depend on the group), inside the group, as `MVD.run` does it outside.

    The rest of the program is evaluated with tags at the draw `x` and at each of its
    perturbations (one entry changed at a time, whatever the rest of the program does with
    them: the weak derivative of entry `j`'s law needs no separability), in one vmap; the
    corrections `Σ_m φ̇_m c_m (k(x⁺_m) - k(x⁻_m))` are linear in the outputs, so the
    group's per-element terms stay per element. Later score terms are folded into each
    evaluation first (`_folded_rest`), with the same downstream randomness.
    """
    key_x, key_mvd = jax.random.split(key)
    x = jax.lax.stop_gradient(distribution.sample(key_x)).astype(dtype)
    shape = distribution.shape()
    terms = []
    stacked = x[None]
    if frame.scope.surrogate:
        x_flat = x.reshape(-1)
        terms = _mvd_terms(_univariate_base(_law(distribution, site)), shape, x_flat, key_mvd)
        alternatives = [x_flat[None]]
        for term in terms:
            rows = np.arange(term.element.size)
            for values in (term.plus, term.minus):
                if values is not None:
                    alternatives.append(jnp.tile(x_flat, (term.element.size, 1))
                                        .at[rows, term.element].set(values.astype(dtype)))
        stacked = jnp.concatenate(alternatives, 0).reshape((-1,) + shape)
    tags: list = []
    leaves, invalid, later = jax.vmap(_folded_rest(frame, env, n, flat, weight, tags))(stacked)

    def corrected(leaf):  # leaf[0] + Σ_m φ̇_m c_m (sg(leaf⁺_m) - sg(leaf⁻_m))
        frozen = jax.lax.stop_gradient(leaf)
        out, offset = leaf[0], 1
        for term in terms:
            size = term.element.size
            plus = frozen[offset:offset + size]
            offset += size
            if term.minus is not None:
                minus = frozen[offset:offset + size]
                offset += size
            else:
                minus = frozen[:1]
            coeff = (term.param - jax.lax.stop_gradient(term.param)) * jax.lax.stop_gradient(
                term.weight)
            coeff = coeff.reshape((size,) + (1,) * out.ndim).astype(out.dtype)
            out = out + jnp.sum(coeff * (plus - minus), axis=0)
        return out

    outs = _map_outs(tags, leaves, corrected)
    return outs, _first_invalid(invalid), None if later is None else later[0]


#: Largest other plate whose `px.reinforce` site is scored per element inside a group
#: (`m + 1` evaluations of the rest of the program); beyond it, the score of the whole site.
MAX_OTHER_PLATE = 1024


def _reinforce_other_plate(distribution, frame, env, key, dtype, site, n, flat, weight):
    """A `px.reinforce` site on another plate of `m` elements (its law free of the group,
    no baseline), scored per element of its own plate inside the group (surrogate mode).

    With a second, independent draw `x'` and `x ⊕_j x'_j` (the draw with element `j`
    replaced by `x'_j`), element `j`'s score multiplies `y(x) - y(x ⊕_j x'_j)`:

        y(x) + Σ_j (log q_j(x_j) - sg) · sg(y(x) - y(x ⊕_j x'_j)).

    `y(x ⊕_j x'_j)` does not depend on `x_j`, so each reference term has zero mean and the
    estimate is unbiased for any `y`; where `y = Σ_j g_j(x_j) + c` (an ELBO over the
    plate's data points) the difference is `g_j(x_j) - g_j(x'_j)`: element `j`'s score
    multiplies its own term only, as per element in a group. `m + 1` evaluations of the
    rest of the program with tags, in one vmap (the combination is linear, so the group's
    per-element terms stay per element); later score terms are folded into each first.
    """
    m = distribution.batch_shape[0]
    x = jax.lax.stop_gradient(distribution.sample(key)).astype(dtype)  # as `local` draws
    reference = jax.lax.stop_gradient(
        distribution.sample(jax.random.fold_in(key, 1))).astype(dtype)
    change = jnp.eye(m, dtype=bool).reshape((m, m) + (1,) * (x.ndim - 1))
    stacked = jnp.concatenate([x[None], jnp.where(change, reference[None], x[None])], axis=0)
    log_q = _element_log_density(_law(distribution, site), x[None], m)[0]  # (m,)
    scores = log_q - jax.lax.stop_gradient(log_q)
    tags: list = []
    leaves, invalid, later = jax.vmap(_folded_rest(frame, env, n, flat, weight, tags))(stacked)

    def scored(leaf):  # leaf[0] + Σ_j s_j sg(leaf[0] - leaf[1 + j])
        diff = jax.lax.stop_gradient(leaf[:1] - leaf[1:])  # (m,) + shape
        s = scores.reshape((m,) + (1,) * (diff.ndim - 1)).astype(diff.dtype)
        return leaf[0] + jnp.sum(s * diff, axis=0)

    outs = _map_outs(tags, leaves, scored)
    return outs, _first_invalid(invalid), None if later is None else later[0]


def _additive_rest(frame, env, m) -> bool:
    """Whether the rest of the program after `frame`'s site (on a plate of `m` elements) is
    a sum of per-element terms in that site's elements, `Σ_j g_j(b_j) + c`.

    Decided on the user's equations with the `_separable` tags for the site's plate (every
    value computed before the site is plain for them): a later site must have a law that
    does not depend on the site (its value is then plain), a call holding sites is
    followed into, any other equation holding sites must have plain operands, and every
    output of the program must be plain or separable. Evaluated on abstract values.
    """
    from ._interpreter import RULES, Resume, _call_rule, _closed

    key = ("additive", id(frame.jaxpr), frame.index, m)
    if key in _VERDICTS:
        return _VERDICTS[key]
    # everything the walk reads, abstracted: the frames' environments along the chain
    chain, arrays = [], []
    cont = frame
    envs = [env]
    while isinstance(cont, (_Frame, _Call, Resume)):
        if cont is not frame:
            envs.append(cont.env)
        chain.append(cont)
        cont = cont.cont
    layouts = []
    for e in envs:
        names = list(e)
        layouts.append(names)
        arrays.append([v.array() if isinstance(v, sep.Val) else v for v in e.values()])

    def run(jaxpr, start, env, slot_map):
        for i in range(start + 1, len(jaxpr.eqns)):
            eqn = jaxpr.eqns[i]
            invals = [_read(env, a) for a in eqn.invars]
            if i not in slot_map:
                _write(env, eqn, sep.eval_eqn(eqn, invals, m))
                continue
            if eqn.primitive is not sample_p:
                if RULES.get(eqn.primitive) is _call_rule:
                    body, consts = _closed(eqn.params["call_jaxpr" if "call_jaxpr" in
                                                       eqn.params else "jaxpr"])
                    env_b = {var: sep.Val(P, arr=c) for var, c in zip(body.constvars, consts,
                                                                      strict=True)}
                    env_b.update(zip(body.invars, invals, strict=True))
                    _write(env, eqn, run(body, -1, env_b, _slots_of(body)))
                    continue
            if any(v.kind != P for v in invals):
                raise NotSeparable("a later site or control flow depends on the site")
            _write(env, eqn, [sep.Val(P, arr=jnp.zeros(v.aval.shape, v.aval.dtype))
                              for v in eqn.outvars])
        return [_read(env, a) for a in jaxpr.outvars]

    def check(arrays):
        envs = [{var: sep.Val(P, arr=a) for var, a in zip(names, arrs, strict=True)}
                for names, arrs in zip(layouts, arrays, strict=True)]
        site = frame.eqn.outvars[0].aval
        _write(envs[0], frame.eqn, [sep.Val(L, arr=jnp.zeros(site.shape, site.dtype),
                                            axis=0)])
        outs = run(frame.jaxpr, frame.index, envs[0], frame.scope.slots)
        for link, e in zip(chain[:-1], envs[1:], strict=True):
            target = link.cont
            _write(e, target.jaxpr.eqns[target.index], outs)
            outs = run(target.jaxpr, target.index, e, target.scope.slots)
        if any(v.kind not in (P, S) for v in outs):
            raise NotSeparable("the output is not a sum over the site's elements")
        return jnp.zeros(())

    def spec(x):
        x = x if hasattr(x, "dtype") else jnp.asarray(x)
        return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype)

    try:
        jax.eval_shape(check, jax.tree.map(spec, arrays))
        verdict = True
    except NotSeparable:
        verdict = False
    _VERDICTS[key] = verdict
    return verdict


def mvd_group(distribution, resume, acc, key, dtype, site: str):
    """Per-element MVD of a plate-batched site, composed with the group's later sites.

    Returns `(outputs, invalid)` of the whole program, or raises `NotSeparable`.
    """
    n, env, frame = _open_group(distribution, resume)
    key_x, key_mvd = jax.random.split(key)
    x = jax.lax.stop_gradient(distribution.sample(key_x)).astype(dtype)
    return _group(frame, n, lambda flat: lambda: _mvd(
        distribution, frame, env, x, key_mvd, site, n, flat, None), acc)


def _mvd(distribution, frame, env, x, key, site, n, flat, weight):
    """One MVD member: the tagged rest of the program at `x` and at its perturbations.

    Element `i`'s entries are perturbed in every element at once (one evaluation per entry
    position and sign); the per-element differences `g_i(x⁺) - g_i(x⁻)`, weighted by the
    weak-derivative constants, become element `i`'s tangent correction.
    """
    surrogate = frame.scope.surrogate
    shape = distribution.shape()
    dtype = x.dtype
    if surrogate:
        terms = _mvd_terms(_univariate_base(_law(distribution, site)), shape, x.reshape(-1), key)
        perturbed = mvd_alternatives(x, terms, shape, dtype)
        if perturbed is None:
            raise NotSeparable("the weak derivative's entries are not laid out per element")
        stacked, layout = perturbed
    else:
        terms, layout, stacked = [], [], x[None]
    tags, leaves, score, baseline, invalid, later = _evaluate(frame, env, stacked, n, flat,
                                                               weight)
    outs = []
    for kind, leaf in zip(tags, leaves, strict=True):
        if kind == P:  # does not depend on the group: no correction
            outs.append(sep.Val(P, arr=leaf[0]))
            continue
        vec, const = leaf  # (A, n) + shape, (A,) + shape
        frozen = jax.lax.stop_gradient(vec)
        out = vec[0]
        for term, (element_index, (plus_rows, minus_rows)) in zip(terms, layout):
            plus = frozen[plus_rows, element_index]  # (M,) + shape
            minus = (frozen[minus_rows, element_index] if minus_rows is not None
                     else frozen[0, element_index])
            coeff = (term.param - jax.lax.stop_gradient(term.param)) * jax.lax.stop_gradient(
                term.weight)
            coeff = coeff.reshape(coeff.shape + (1,) * (out.ndim - 1)).astype(out.dtype)
            out = out + jax.ops.segment_sum(coeff * (plus - minus), element_index,
                                            num_segments=n)
        outs.append(sep.Val(S, vec=out, const=_first(const)))

    return outs, _first(score), _first(baseline), _first_invalid(invalid), _first(later)


def reinforce_group(estimator, distribution, resume, acc, key, dtype, site: str):
    """Per-element Rao-Blackwellised score of a plate-batched `px.reinforce` site.

    The rest of the user's program is evaluated with the site's draw tagged per element;
    where its outputs are sums of per-element terms `g_i`, element `i`'s score multiplies
    only `g_i` (minus its baseline `b_i`). Later group members (enum, mvd, reinforce sites
    on the same plate) are handled inside that evaluation. Returns `(outputs, invalid)`
    of the whole program (surrogates, with `acc` applied), or raises `NotSeparable`.
    """
    if not estimator.rao_blackwellise:
        raise NotSeparable("the site is not Rao-Blackwellised per element")
    n, env, frame = _open_group(distribution, resume)
    x = jax.lax.stop_gradient(distribution.sample(key)).astype(dtype)  # as `local` draws
    return _group(frame, n, lambda flat: lambda: _reinforce(
        estimator, distribution, frame, env, x, site, n, flat, None), acc)


def _reinforce(estimator, distribution, frame, env, x, site, n, flat, weight):
    """One reinforce member: the tagged rest of the program at the draw `x`.

    Per-element terms `g_i` become `g_i + (sg(g_i) - b_i) · (log q_i(x_i) - sg)` (surrogate
    mode): element `i`'s score multiplies its own term only. Plain outputs do not depend
    on the draw and get no score term. Under flat members (whose weights `w_i` the terms
    already carry), the baseline is weighted alike: `(sg(w_i g_i) - sg(w_i) b_i)`.
    """
    env = dict(env)
    _write(env, frame.eqn, [sep.Val(L, arr=x, axis=0)])
    outs, score, baseline, invalid, weight = _run(frame, env, n, flat, weight)
    if not frame.scope.surrogate:
        return outs, score, baseline, invalid, weight
    b = estimator._baseline_value()
    if b is not None and jnp.ndim(b) == 0:
        raise UnsupportedEstimatorError(_scalar_baseline_message(site, n))
    log_q = _element_log_density(_law(distribution, site), x[None], n)[0]  # (n,)
    s = log_q - jax.lax.stop_gradient(log_q)
    scored = []
    for v in outs:
        if v.kind == P:
            scored.append(v)
            continue
        vec = v.vec  # (n,) + shape
        tail = (1,) * (vec.ndim - 1)
        centred = jax.lax.stop_gradient(vec)
        if b is not None:
            b_i = jnp.asarray(b).astype(vec.dtype)
            if weight is not None:
                b_i = b_i * weight.astype(vec.dtype)
            centred = centred - jax.lax.stop_gradient(b_i).reshape((n,) + tail)
        scored.append(sep.Val(S, vec=vec + centred * s.reshape((n,) + tail).astype(vec.dtype),
                              const=v.const))
    return scored, score, baseline, invalid, weight


def _scalar_baseline_message(site, n):
    return (
        f"{site}: a scalar Reinforce baseline on a site that is Rao-Blackwellised "
        f"per element (its {n} elements' terms are added up by the rest of the "
        "program, and element i's score multiplies only its own term g_i). A "
        "scalar is a baseline for the whole objective, and neither b/n nor the "
        "other elements' mean is a safe baseline for g_i (each can multiply the "
        "gradient variance when the elements' terms differ in scale). Pass a "
        f"per-element baseline of shape ({n},), no baseline, or "
        "px.Reinforce(baseline=b, rao_blackwellise=False) to score the whole "
        "objective against the scalar."
    )


def _first(accumulator):
    """One alternative's accumulator (or plain part): the sites scored after a member do
    not depend on the group's values (their laws are plain), so every alternative has the
    same. None (statically zero) stays None."""
    return None if accumulator is None else accumulator[0]


def _evaluate(frame, env, alternatives, n, flat, weight):
    """The tagged rest of the program for each alternative value of `frame`'s site.

    Vectorised over the leading axis of `alternatives`: returns the output kinds (`P` or
    `S`), their arrays (`arr`, or `(vec, const)` for `S`), the accumulators and the flat
    weights, each with that leading axis.
    """
    tags: list = []

    def evaluate(alternative):
        env2 = dict(env)
        _write(env2, frame.eqn, [sep.Val(L, arr=alternative, axis=0)])
        outs, score, baseline, invalid, later = _run(frame, env2, n, flat, weight)
        tags[:] = [v.kind for v in outs]
        leaves = [(v.vec, v.const) if v.kind == S else v.arr for v in outs]
        return leaves, score, baseline, invalid, later

    leaves, score, baseline, invalid, later = jax.vmap(evaluate)(alternatives)
    return tags, leaves, score, baseline, invalid, later


#: Most joint values of the group's enum members enumerated in one flat vmap; members
#: beyond it get a vmap of their own (nested).
MAX_FLAT_SIZE = 1024


class _Flat:
    """The group's `px.enum` members enumerated together in one flat vmap.

    Planned from the program's equations before the evaluation starts (`_plan`): every
    later `px.enum` site on the plate whose element values are constants (Bernoulli,
    Categorical) gets a position; the vmap runs over all joint values of the members
    (each member's value set in every element), and inside it each member's value is
    given and its per-element probabilities multiply the flat weight (`_run`). A member
    evaluated with a nested vmap per member instead would trace and compile the rest of
    the program under as many levels of batching as there are members.
    """

    def __init__(self):
        self.position: dict = {}  # (id(jaxpr), equation index) -> member position
        self.tables: list = []  # per member: its element values, (V_j,) + shape[1:]
        self.values = None  # inside the vmap: per member, its element value shape[1:]
        self.weights = None  # the first member's probabilities (V_0, n), if known outside
        self.visited: set = set()
        # whether a site on a plate of the group's size whose law does not depend on the
        # group may join it, its elements paired with the group's (`_joins`); the first
        # attempt allows it, a retry after a failure that used it does not
        self.plain_members = True
        self.used_plain = False

    def add(self, key, table):
        self.position[key] = len(self.tables)
        self.tables.append(table)

    def value(self, position, n):
        """Inside the vmap: member `position`'s value in every element, `(n,) + shape[1:]`."""
        value = self.values[position]
        return jnp.broadcast_to(value[None], (n,) + jnp.shape(value))

    def size(self) -> int:
        return math.prod(t.shape[0] for t in self.tables)

    def joint(self) -> list:
        """Per member, its element value in each joint alternative: `(A,) + shape[1:]`
        (constants; broadcast to the elements inside the vmap, which keeps XLA from
        folding large constants)."""
        counts = [t.shape[0] for t in self.tables]
        combos = np.array(list(itertools.product(*map(range, counts))), np.int32)
        joint = [t[combos[:, j]] for j, t in enumerate(self.tables)]
        if self.weights is not None:  # member 0 varies slowest: each row repeated
            repeats = len(combos) // counts[0]
            joint.append(self.weights if repeats == 1 else
                         jnp.repeat(self.weights, repeats, axis=0))
        return joint


def _element_mass_of(law, value, n):
    """Per-element probabilities `(n,)` of one value `(n,) + shape[1:]` (`_laws.mass`)."""
    q = _mass(law, value)  # batch_shape
    return q if q.shape == (n,) else q.reshape(n, -1).prod(-1)




def _plan(flat, frame, n):
    """Add the `px.enum` sites after `frame` on the same plate of `n` elements to `flat`.

    Read from the equations (the distribution's structure and shapes, no evaluation):
    whether a planned site really is a member is checked when it is reached.
    """
    from ._interpreter import Resume

    while True:
        for i in range(frame.index + 1, len(frame.jaxpr.eqns)):
            eqn = frame.jaxpr.eqns[i]
            if eqn.primitive is not sample_p:
                continue
            table = _enum_table(eqn, n)
            if table is None:
                continue
            if flat.size() * table.shape[0] > MAX_FLAT_SIZE:
                return flat
            flat.add((id(frame.jaxpr), i), table)
        cont = frame.cont
        if not isinstance(cont, Resume):
            return flat
        frame = _Frame(cont.jaxpr, cont.index, cont.scope, cont.cont)


def _enum_table(eqn, n):
    """The element values of a `px.enum` site on the plate, if they are constants."""
    try:
        distribution, estimator = jax.tree.unflatten(eqn.params["tree"],
                                                     [v.aval for v in eqn.invars])
        if not isinstance(estimator, Enum) or not _factorisable(distribution) or (
                distribution.batch_shape[0] != n):
            return None
        values = _element_values(distribution, eqn.params["label"],
                                 eqn.params["out_aval"].dtype)
    except Exception:  # noqa: BLE001 - not planned: the site gets a vmap of its own
        return None
    return values if isinstance(values, np.ndarray) else None


def _flat_run(flat, rest):
    """`rest()` (an evaluation of the rest of the program, `(outs, score, baseline,
    invalid, weight)`) for every joint value of the flat members, summed over them."""
    if not flat.tables:
        return rest()[:4]
    tags: list = []

    def evaluate(values):
        flat.values = values
        try:
            outs, score, baseline, invalid, _ = rest()
        finally:
            flat.values = None
        tags[:] = [v.kind for v in outs]
        leaves = [(v.vec, v.const) if v.kind == S else v.arr for v in outs]
        return leaves, score, baseline, invalid

    leaves, score, baseline, invalid = jax.vmap(evaluate)(flat.joint())
    if len(flat.visited) != len(flat.tables):  # pragma: no cover - every site is reached
        raise NotSeparable("a planned member of the group was not reached")
    outs = []
    for kind, leaf in zip(tags, leaves, strict=True):
        if kind == P:
            outs.append(sep.Val(P, arr=leaf[0]))
        else:  # the terms carry their weights (`_run`): add them up
            vec, const = leaf
            outs.append(sep.Val(S, vec=jnp.sum(vec, axis=0), const=_first(const)))
    return outs, _first(score), _first(baseline), _first_invalid(invalid)


def _weigh(weight, vec):
    """`w_i · vec[i, ...]` with `0 · (±inf or nan)` = 0 and only `ẇ · v` where `w = 0`."""
    lax = jax.lax
    w = weight.astype(vec.dtype)
    if vec.ndim > 1:
        w = lax.broadcast_in_dim(w, vec.shape, (0,))
    positive = lax.gt(w, lax.full_like(w, 0))
    safe = lax.select(lax.bitwise_or(positive, lax.is_finite(vec)), vec, lax.full_like(vec, 0))
    return lax.mul(w, lax.select(positive, safe, lax.stop_gradient(safe)))


def _per_element_sum(weights, vec):
    """`Σ_u w[u, i] · vec[u, i, ...]` over the values `u`, with `0 · (±inf or nan)` = 0."""
    w = weights.reshape(weights.shape + (1,) * (vec.ndim - 2)).astype(vec.dtype)
    positive = jnp.broadcast_to(w > 0, vec.shape)
    safe = jax.lax.select(positive | jnp.isfinite(vec), vec, jnp.zeros_like(vec))
    # a value of probability 0 still passes on ẇ·v (the derivative of a zero weight), and
    # only that: its own tangent (times 0) is left out, as it may be infinite there
    return jnp.sum(w * jax.lax.select(positive, safe, jax.lax.stop_gradient(safe)), axis=0)


def _run(frame, env, n, flat, weight):
    """Evaluate the rest of the program with tags, from `frame` with tagged `env`.

    `weight` is the product of the flat members' per-element weights so far (None: 1);
    later flat members multiply theirs in, and at the end of the program every
    per-element term is multiplied by the product (`_weigh`). Returns `(outputs, score,
    baseline, invalid, weight)`; outputs are `P` or `S` values (anything else raises
    `NotSeparable`).
    """
    from ._interpreter import Acc, Resume

    acc = Acc(None, None, None)  # nothing accumulated yet (None: statically zero / -1)
    while True:
        result = _run_frame(frame, env, acc, n, flat, weight)
        if isinstance(result, _Done):
            return tuple(result)
        if isinstance(result, _Descend):  # into a call's body, tagged
            frame, env, acc, weight = result
            continue
        outs, acc, weight = result
        if isinstance(frame.cont, _Call):  # the end of a call's body: back to its caller
            cont = frame.cont
            env = dict(cont.env)
            _write(env, cont.eqn, outs)
            frame = _Frame(cont.jaxpr, cont.index, cont.scope, cont.cont)
            continue
        if not isinstance(frame.cont, Resume):  # the end of the whole program
            for v in outs:
                if v.kind not in (P, S):
                    raise NotSeparable(
                        v.culprit or "the program's output keeps the elements apart")
            if weight is not None:
                outs = [sep.Val(S, vec=_weigh(weight, v.vec), const=v.const) if v.kind == S
                        else v for v in outs]
            return outs, acc.score, acc.baseline, acc.invalid, weight
        cont = frame.cont
        env = {var: sep.Val(P, arr=val) for var, val in cont.env.items()}
        _write(env, cont.eqn, outs)
        frame = _Frame(cont.jaxpr, cont.index, cont.scope, cont.cont)


def _add_acc(acc, score, baseline):
    """`add_acc` where None is a statically zero accumulator."""

    def add(total, term):
        if term is None:
            return total
        return term if total is None else total + term.astype(total.dtype)

    return acc._replace(score=add(acc.score, score), baseline=add(acc.baseline, baseline))


def _merge_invalid(first, second):
    """`merge_invalid` where None is statically -1 (no invalid site)."""
    from ._interpreter import merge_invalid

    if first is None or second is None:
        return second if first is None else first
    return merge_invalid(first, second)


def _first_invalid(invalid):
    return None if invalid is None else first_invalid(invalid)


class _Call:
    """The continuation of a call's body in the tagged evaluation: the caller's frame at
    the call equation `index` of `jaxpr`, with its tagged `env`."""

    __slots__ = ("jaxpr", "index", "env", "scope", "cont")

    def __init__(self, jaxpr, index, env, scope, cont):
        self.jaxpr, self.index, self.env, self.scope, self.cont = jaxpr, index, env, scope, cont

    @property
    def eqn(self):
        return self.jaxpr.eqns[self.index]


class _Descend(tuple):
    """`(frame, env, acc, weight)`: continue the evaluation in a call's body."""


def _with_sites(frame, i, eqn, invals, env, acc, n, weight):
    """An equation other than a site that holds sites: a call (jit, closed_call,
    checkpoint) is followed into its body with tags (`_Descend`); any other (cond, scan,
    while, a nested expectation) whose operands are plain and that holds no continuation
    estimator runs as the interpreter runs it outside a group, and gives plain values
    (`(outs, acc)`). Anything else raises `NotSeparable`."""
    from ._analysis import first_continuation_site, sub_jaxprs
    from ._interpreter import RULES, Acc, Scope, _call_rule, _closed

    scope = frame.scope
    key = scope.keys[scope.slots[i]]
    rule = RULES.get(eqn.primitive)
    if rule is _call_rule:  # the interpreter interprets the body inline: so do we
        body, consts = _closed(eqn.params["call_jaxpr" if "call_jaxpr" in eqn.params
                                          else "jaxpr"])
        slots = _slots_of(body)
        keys = None if not slots else (key[None] if len(slots) == 1
                                       else jax.random.split(key, len(slots)))
        where = scope.where + (f"{eqn.primitive.name} {eqn.params.get('name', '')}".strip(),)
        inner = Scope(keys, slots, scope.surrogate, where, body, scope.messages)
        env_b = {var: sep.Val(P, arr=c) for var, c in zip(body.constvars, consts,
                                                          strict=True)}
        env_b.update(zip(body.invars, invals, strict=True))
        cont = _Call(frame.jaxpr, i, env, scope, frame.cont)
        return _Descend((_Frame(body, -1, inner, cont), env_b, acc, weight))
    if rule is not None and all(v.kind == P for v in invals) and not any(
            first_continuation_site(j) is not None for j in sub_jaxprs(eqn.params)):
        surrogate = scope.surrogate
        zero = jnp.zeros((), jnp.result_type(float))
        full = Acc(None if not surrogate else (zero if acc.score is None else acc.score),
                   None if not surrogate else (zero if acc.baseline is None
                                               else acc.baseline),
                   jnp.int32(-1) if acc.invalid is None else acc.invalid)
        result = rule(eqn, [v.arr for v in invals], key, full, scope, None)
        outs = result.outs if eqn.primitive.multiple_results or isinstance(
            result.outs, (list, tuple)) else [result.outs]
        return [sep.Val(P, arr=o) for o in outs], result.acc
    what = "a nested expectation" if eqn.primitive is nested_p else (
        f"'{eqn.primitive.name}' with sample sites inside")
    raise NotSeparable(f"{what} follows the site")


def _slots_of(jaxpr):
    from ._analysis import slots

    return slots(jaxpr)


class _Done(tuple):
    """A member finished the program: `(outs, score, baseline, invalid, weight)`."""


def _write(env, eqn, outs):
    for var, val in zip(eqn.outvars, outs, strict=True):
        env[var] = val


def _read(env, atom):
    if isinstance(atom, core.Literal):
        return sep.Val(P, arr=atom.val)
    return env[atom]


def _run_frame(frame, env, acc, n, flat, weight):
    """Run one scope from `frame.index + 1` with tagged values: `(outs, acc, weight)` or
    `_Done`."""
    scope = frame.scope
    eqns = frame.jaxpr.eqns
    for i in range(frame.index + 1, len(eqns)):
        eqn = eqns[i]
        invals = [_read(env, a) for a in eqn.invars]
        slot = scope.slots.get(i)
        if slot is None:
            _write(env, eqn, sep.eval_eqn(eqn, invals, n))
            continue
        if eqn.primitive is not sample_p:
            result = _with_sites(frame, i, eqn, invals, env, acc, n, weight)
            if isinstance(result, _Descend):
                return result
            outs, acc = result
            _write(env, eqn, outs)
            continue
        params = eqn.params
        distribution, estimator = jax.tree.unflatten(params["tree"],
                                                     [v.array() for v in invals])
        invalid = _check(eqn, invals, distribution, scope)
        acc = acc._replace(invalid=_merge_invalid(acc.invalid, invalid))
        num_dist = len(jax.tree.leaves(distribution))
        dist_tags = invals[:num_dist]
        if any(v.kind != P for v in invals[num_dist:]):
            raise NotSeparable(f"the estimator state of {params['label']} depends on the site")
        dtype = params["out_aval"].dtype
        key = scope.keys[slot]
        position = flat.position.get((id(frame.jaxpr), i))
        if position is not None:  # a member of the flat enumeration: its value is given
            if not (isinstance(estimator, Enum) and _joins(flat, dist_tags) and _member(
                    distribution, dist_tags, n, dtype=dtype)):
                raise NotSeparable(f"the law of {params['label']} mixes the elements")
            value = flat.value(position, n)
            flat.visited.add((id(frame.jaxpr), i))
            mass = _element_mass_of(_law(distribution, params["label"]), value, n)
            weight = mass if weight is None else weight * mass.astype(weight.dtype)
            _write(env, eqn, [sep.Val(L, arr=value, axis=0)])
            continue
        if isinstance(estimator, Enum) and _joins(flat, dist_tags) and _member(
                distribution, dist_tags, n, dtype=dtype):
            outs, score, baseline, inner, later = _enumerate(
                distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, dtype,
                params["label"], n, flat, weight)
            acc = _add_acc(acc, score, baseline)
            return _Done((outs, acc.score, acc.baseline, _merge_invalid(acc.invalid, inner),
                          later))
        if isinstance(estimator, MVD) and _factorisable(distribution) and (
                distribution.batch_shape[0] == n):
            key_x, key_mvd = jax.random.split(key)
            x = jax.lax.stop_gradient(distribution.sample(key_x)).astype(dtype)
            if _joins(flat, dist_tags) and _member(distribution, dist_tags, n, x):
                outs, score, baseline, inner, later = _mvd(
                    distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, x, key_mvd,
                    params["label"], n, flat, weight)
                acc = _add_acc(acc, score, baseline)
                return _Done((outs, acc.score, acc.baseline, _merge_invalid(acc.invalid, inner),
                              later))
        if isinstance(estimator, Reinforce) and estimator.rao_blackwellise and (
                _factorisable(distribution) and distribution.batch_shape[0] == n):
            x = jax.lax.stop_gradient(distribution.sample(key)).astype(dtype)
            if _joins(flat, dist_tags) and _member(distribution, dist_tags, n, x):
                outs, score, baseline, inner, later = _reinforce(
                    estimator, distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env,
                    x, params["label"], n, flat, weight)
                acc = _add_acc(acc, score, baseline)
                return _Done((outs, acc.score, acc.baseline, _merge_invalid(acc.invalid, inner),
                              later))
        if all(v.kind == P for v in dist_tags):
            if isinstance(estimator, Enum) and _factorisable(distribution) and (
                    _additive_rest(_Frame(frame.jaxpr, i, scope, frame.cont), env,
                                   distribution.batch_shape[0])):
                # on another plate, the rest additive in its elements: per element
                outs, inner, later = _enumerate_other_plate(
                    distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, dtype,
                    params["label"], n, flat, weight)
                return _Done((outs, acc.score, acc.baseline, _merge_invalid(acc.invalid, inner),
                              later))
            if isinstance(estimator, Enum):  # not a member: summed over, plain values
                outs, inner, later = _enumerate_plain(
                    distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, dtype,
                    params["label"], n, flat, weight)
                return _Done((outs, acc.score, acc.baseline, _merge_invalid(acc.invalid, inner),
                              later))
            if isinstance(estimator, MVD):  # not a member: one entry perturbed at a time
                outs, inner, later = _mvd_plain(
                    distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, key, dtype,
                    params["label"], n, flat, weight)
                return _Done((outs, acc.score, acc.baseline, _merge_invalid(acc.invalid, inner),
                              later))
            if (isinstance(estimator, Reinforce) and estimator.rao_blackwellise
                    and estimator._baseline_value() is None and _factorisable(distribution)
                    and distribution.batch_shape[0] <= MAX_OTHER_PLATE and scope.surrogate):
                outs, inner, later = _reinforce_other_plate(
                    distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, key, dtype,
                    params["label"], n, flat, weight)
                return _Done((outs, acc.score, acc.baseline, _merge_invalid(acc.invalid, inner),
                              later))
            if estimator.continuation:
                raise NotSeparable(f"{params['label']} uses a continuation estimator")
            x, score, baseline_term = estimator.local(key, distribution, scope.surrogate)
            acc = _add_acc(acc, score, baseline_term)
            _write(env, eqn, [sep.Val(P, arr=jnp.asarray(x).astype(dtype))])
            continue
        if isinstance(estimator, Reparam):
            treedef = jax.tree.structure(distribution)
            x = _tagged_call(
                lambda leaves: jax.tree.unflatten(treedef, leaves).rsample(key).astype(dtype),
                dist_tags, n)
            _write(env, eqn, [x])
            continue
        raise NotSeparable(f"the law of {params['label']} depends on the site")
    return [_read(env, a) for a in frame.jaxpr.outvars], acc, weight


def _member(distribution, dist_tags, n, value=None, dtype=None) -> bool:
    """A site on the same plate whose element `i` depends on the group's element `i` only.

    Checked on the per-element log density of `value` (an element value broadcast to every
    element, by default the first of the support) as a function of the tagged parameters.
    """
    if not _factorisable(distribution) or distribution.batch_shape[0] != n:
        return False
    if all(v.kind == P for v in dist_tags):
        return True
    if any(v.kind not in (P, L) for v in dist_tags):
        return False
    treedef = jax.tree.structure(distribution)
    key = _verdict_key(treedef, dist_tags, value, n)
    if key is not None and key in _VERDICTS:
        return _VERDICTS[key]
    if value is None:
        if dtype is None:
            dtype = jax.eval_shape(distribution.sample, jax.random.key(0)).dtype
        values = _element_values(distribution, "a group member", dtype)
        value = jnp.broadcast_to(values[0], (n,) + values.shape[1:])
    verdict: list[bool] = []

    def abstract(leaves, value):
        # the verdict depends on shapes and tags only: decide it on abstract values, out
        # of the enclosing vmaps (binding under them costs a batching pass per level)
        def element_log_density(leaves):
            law = _law(jax.tree.unflatten(treedef, leaves), "a group member")
            return _element_log_density(law, value[None], n)[0]

        tagged = [sep.Val(v.kind, arr=leaf, axis=v.axis) for v, leaf in zip(dist_tags, leaves)]
        try:
            out = _tagged_call(element_log_density, tagged, n)
            verdict.append(out.kind == P or (out.kind == L and out.axis == 0))
        except NotSeparable:
            verdict.append(False)
        return jnp.zeros(())

    def spec(x):
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    jax.eval_shape(abstract, [spec(v.array()) for v in dist_tags], spec(value))
    if key is not None:
        _VERDICTS[key] = verdict[0]
    return verdict[0]


#: Membership verdicts of the current group evaluation (`_member` is a function of the
#: distribution's structure, the tags and the shapes only: sites with the same structure
#: share it). Emptied when a group evaluation starts.
_VERDICTS: dict = {}


def _verdict_key(treedef, dist_tags, value, n):
    """A hashable key of everything `_member`'s verdict depends on (None if unhashable)."""
    def aval(x):
        return (tuple(jnp.shape(x)), jnp.result_type(x))

    key = (treedef, tuple((v.kind, v.axis) + aval(v.array()) for v in dist_tags),
           None if value is None else aval(value), n)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _tagged_call(fn, tagged_args, n):
    """Evaluate `fn(list of arrays)` with tags; its single output's tagged value."""
    closed = jax.make_jaxpr(fn)([v.array() for v in tagged_args])
    (out,) = sep._eval(closed.jaxpr, [sep.Val(P, arr=c) for c in closed.consts],
                       list(tagged_args), n)
    if out.kind == X:
        raise NotSeparable(out.culprit or "the elements are mixed")
    return out


def _check(eqn, invals, distribution, scope):
    """The site's open parameter checks on the tagged values' arrays (None if none)."""
    from ._interpreter import _invalid_text, _open_checks, _parameter, message_id

    checks = _open_checks(scope.jaxpr, eqn)
    if not checks:
        return None
    invalid = jnp.int32(-1)
    for check in reversed(checks):
        value = (invals[check.index].array() if check.index >= 0
                 else _parameter(distribution, check))
        text = _invalid_text(eqn.params["label"], distribution, check)
        ok = jnp.all(check.constraint.value(value))
        invalid = jnp.where(ok, invalid, message_id(scope.messages, text))
    return invalid
