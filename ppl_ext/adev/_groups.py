"""Plate groups: several plate-batched `px.enum` sites enumerated per element together.

`_separable.py` decides whether the rest of a program is a sum of per-element terms in one
site's elements. Evaluating that on the *interpreted* continuation would mean analysing
the code that the estimators of later sites generate (weighted sums, gathers of
alternatives), which its rules do not know; two plate-batched `px.enum` sites then did not
compose (joint enumeration, or a refusal blaming ppl_ext's own code) and every failure
re-traced the rest of the program.

Here the rest of the *user's* program is evaluated once with tags (the `_separable`
rules, equation by equation, on the user's equations). Later sites are handled by rules
that know their meaning, not by analysing the code their estimators generate:

- a *member* of the group (a `px.enum` site whose leading batch axis is the same plate of
  `n` elements and whose per-element log density depends on the group's elements per
  element): the rest of the program is evaluated for each of its element values `u`, with
  every element set to `u` (vectorised), and the per-element terms are combined with its
  per-element probabilities `q_i(u)`, all inside the enclosing evaluation;
- a site whose parameters do not depend on the group: drawn by its (local) estimator as
  usual, its score terms accumulate as usual;
- a reparameterised site whose parameters depend on the group per element: its draw is
  tagged by evaluating the sampler with tags.

Anything else (a continuation estimator outside the group, a score-function site whose
law depends on the group, sites inside control flow, a value that mixes elements) stops
the group evaluation, and the site falls back to its own estimator (`Enum.run`).

For a group of `m` sites with `K_j` values per element the rest of the program runs
`Π_j K_j` times (vectorised) and is traced once: trace time is linear in the number of
sites. The result is exact: `E[k] = Σ_i Σ_{u_1..u_m} Π_j q_{j,i}(u_j | ...) g_i(u_1..u_m) + h`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core

from . import _separable as sep
from ._estimators import (
    Enum,
    MVD,
    Reparam,
    _element_log_density,
    _element_mass,
    _element_values,
    _factorisable,
    _law,
    _mvd_terms,
    _univariate_base,
    first_invalid,
    mvd_alternatives,
)
from ._primitives import nested_p, sample_p

P, L, S, X = sep.P, sep.L, sep.S, sep.X


class NotSeparable(Exception):
    """The group evaluation does not apply; the message says why."""


def enumerate_group(distribution, resume, acc, dtype, site: str):
    """Exact per-element enumeration of the group that starts at this site.

    Returns `(outputs, invalid)` of the whole program (surrogates in surrogate mode, with
    `acc` applied), or raises `NotSeparable`.
    """
    from ._interpreter import add_acc, finish, merge_invalid

    if not _factorisable(distribution):
        raise NotSeparable("the site has no plate axis")
    if not _reaches_finish(resume):
        raise NotSeparable("the rest of the program is not available here")
    n = distribution.batch_shape[0]
    env = {var: sep.Val(P, arr=val) for var, val in resume.env.items()}
    frame = _Frame(resume.jaxpr, resume.index, resume.scope, resume.cont)
    outs, score, baseline, invalid = _enumerate(distribution, frame, env, dtype, site, n)
    acc = add_acc(acc, score, baseline)
    return finish([v.array() for v in outs],
                  acc._replace(invalid=merge_invalid(acc.invalid, invalid)))


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


def _enumerate(distribution, frame, env, dtype, site, n):
    """Enumerate one member: the tagged rest of the program for each element value.

    `env` holds the tagged values of `frame`'s scope before the member's equation.
    Returns the program's outputs (`P` or `S` values, combined over the member's values)
    and the score, baseline and invalid accumulators of the rest of the program.
    """
    values = _element_values(distribution, site, dtype)  # (V,) + shape[1:]
    alternatives = jnp.broadcast_to(values[:, None], (values.shape[0], n) + values.shape[1:])
    weights = _element_mass(_law(distribution, site), alternatives, n)  # (V, n), unclamped
    tags, leaves, score, baseline, invalid = _evaluate(frame, env, alternatives, n)
    outs = []
    for kind, leaf in zip(tags, leaves, strict=True):
        if kind == P:
            outs.append(sep.Val(P, arr=leaf[0]))
        else:  # S: per-element terms (V, n) + shape; const (V,) + shape, the same for all V
            vec, const = leaf
            outs.append(sep.Val(S, vec=_per_element_sum(weights, vec), const=const[0]))

    return outs, _first(score), _first(baseline), first_invalid(invalid)


def mvd_group(distribution, resume, acc, key, dtype, site: str):
    """Per-element MVD of a plate-batched site, composed with the group's later sites.

    Returns `(outputs, invalid)` of the whole program, or raises `NotSeparable`.
    """
    from ._interpreter import add_acc, finish, merge_invalid

    if not _factorisable(distribution):
        raise NotSeparable("the site has no plate axis")
    if not _reaches_finish(resume):
        raise NotSeparable("the rest of the program is not available here")
    n = distribution.batch_shape[0]
    env = {var: sep.Val(P, arr=val) for var, val in resume.env.items()}
    frame = _Frame(resume.jaxpr, resume.index, resume.scope, resume.cont)
    key_x, key_mvd = jax.random.split(key)
    x = jax.lax.stop_gradient(distribution.sample(key_x)).astype(dtype)
    outs, score, baseline, invalid = _mvd(distribution, frame, env, x, key_mvd, site, n)
    acc = add_acc(acc, score, baseline)
    return finish([v.array() for v in outs],
                  acc._replace(invalid=merge_invalid(acc.invalid, invalid)))


def _mvd(distribution, frame, env, x, key, site, n):
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
    tags, leaves, score, baseline, invalid = _evaluate(frame, env, stacked, n)
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
        outs.append(sep.Val(S, vec=out, const=const[0]))

    return outs, _first(score), _first(baseline), first_invalid(invalid)


def _first(accumulator):
    """One alternative's accumulator: the sites scored after a member do not depend on the
    group's values (their laws are plain), so every alternative has the same."""
    return None if accumulator is None else accumulator[0]


def _evaluate(frame, env, alternatives, n):
    """The tagged rest of the program for each alternative value of `frame`'s site.

    Vectorised over the leading axis of `alternatives`: returns the output kinds (`P` or
    `S`), their arrays (`arr`, or `(vec, const)` for `S`) and the accumulators, each with
    that leading axis.
    """
    tags: list = []

    def evaluate(alternative):
        env2 = dict(env)
        _write(env2, frame.eqn, [sep.Val(L, arr=alternative, axis=0)])
        outs, score, baseline, invalid = _run(frame, env2, n)
        tags[:] = [v.kind for v in outs]
        leaves = [(v.vec, v.const) if v.kind == S else v.arr for v in outs]
        return leaves, score, baseline, invalid

    leaves, score, baseline, invalid = jax.vmap(evaluate)(alternatives)
    return tags, leaves, score, baseline, invalid


def _per_element_sum(weights, vec):
    """`Σ_u w[u, i] · vec[u, i, ...]` over the values `u`, with `0 · (±inf or nan)` = 0."""
    w = weights.reshape(weights.shape + (1,) * (vec.ndim - 2)).astype(vec.dtype)
    positive = w > 0
    safe = jnp.where(positive | jnp.isfinite(vec), vec, 0)
    # a value of probability 0 still passes on ẇ·v (the derivative of a zero weight)
    return jnp.sum(jnp.where(positive, w * safe, w * jax.lax.stop_gradient(safe)), axis=0)


def _run(frame, env, n):
    """Evaluate the rest of the program with tags, from `frame` with tagged `env`.

    Returns `(outputs, score, baseline, invalid)`; outputs are `P` or `S` values
    (anything else raises `NotSeparable`).
    """
    from ._interpreter import Resume, zero_acc

    acc = zero_acc(frame.scope.surrogate)
    while True:
        result = _run_frame(frame, env, acc, n)
        if isinstance(result, _Done):
            return result.outs, result.score, result.baseline, result.invalid
        outs, acc = result
        if not isinstance(frame.cont, Resume):  # the end of the whole program
            for v in outs:
                if v.kind not in (P, S):
                    raise NotSeparable(
                        v.culprit or "the program's output keeps the elements apart")
            return outs, acc.score, acc.baseline, acc.invalid
        cont = frame.cont
        env = {var: sep.Val(P, arr=val) for var, val in cont.env.items()}
        _write(env, cont.eqn, outs)
        frame = _Frame(cont.jaxpr, cont.index, cont.scope, cont.cont)


class _Done(tuple):
    """A member's enumeration finished the program: `(outs, score, baseline, invalid)`."""

    outs = property(lambda self: self[0])
    score = property(lambda self: self[1])
    baseline = property(lambda self: self[2])
    invalid = property(lambda self: self[3])


def _write(env, eqn, outs):
    for var, val in zip(eqn.outvars, outs, strict=True):
        env[var] = val


def _read(env, atom):
    if isinstance(atom, core.Literal):
        return sep.Val(P, arr=atom.val)
    return env[atom]


def _run_frame(frame, env, acc, n):
    """Run one scope from `frame.index + 1` with tagged values: `(outs, acc)` or `_Done`."""
    from ._interpreter import add_acc, merge_invalid

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
            what = "a nested expectation" if eqn.primitive is nested_p else (
                f"'{eqn.primitive.name}' with sample sites inside")
            raise NotSeparable(f"{what} follows the site")
        params = eqn.params
        distribution, estimator = jax.tree.unflatten(params["tree"],
                                                     [v.array() for v in invals])
        invalid = _check(eqn, invals, distribution, scope)
        if invalid is not None:
            acc = acc._replace(invalid=merge_invalid(acc.invalid, invalid))
        num_dist = len(jax.tree.leaves(distribution))
        dist_tags = invals[:num_dist]
        if any(v.kind != P for v in invals[num_dist:]):
            raise NotSeparable(f"the estimator state of {params['label']} depends on the site")
        dtype = params["out_aval"].dtype
        key = scope.keys[slot]
        if isinstance(estimator, Enum) and _member(distribution, dist_tags, n):
            outs, score, baseline, inner = _enumerate(
                distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, dtype,
                params["label"], n)
            acc = add_acc(acc, score, baseline)
            return _Done((outs, acc.score, acc.baseline, merge_invalid(acc.invalid, inner)))
        if isinstance(estimator, MVD) and _factorisable(distribution) and (
                distribution.batch_shape[0] == n):
            key_x, key_mvd = jax.random.split(key)
            x = jax.lax.stop_gradient(distribution.sample(key_x)).astype(dtype)
            if _member(distribution, dist_tags, n, x):
                outs, score, baseline, inner = _mvd(
                    distribution, _Frame(frame.jaxpr, i, scope, frame.cont), env, x, key_mvd,
                    params["label"], n)
                acc = add_acc(acc, score, baseline)
                return _Done((outs, acc.score, acc.baseline, merge_invalid(acc.invalid, inner)))
        if all(v.kind == P for v in dist_tags):
            if estimator.continuation:
                raise NotSeparable(f"{params['label']} uses a continuation estimator")
            x, score, baseline_term = estimator.local(key, distribution, scope.surrogate)
            acc = add_acc(acc, score, baseline_term)
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
    return [_read(env, a) for a in frame.jaxpr.outvars], acc


def _member(distribution, dist_tags, n, value=None) -> bool:
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
    if value is None:
        dtype = jax.eval_shape(distribution.sample, jax.random.key(0)).dtype
        values = _element_values(distribution, "a group member", dtype)
        value = jnp.broadcast_to(values[0], (n,) + values.shape[1:])
    treedef = jax.tree.structure(distribution)
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
    return verdict[0]


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
