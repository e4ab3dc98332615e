"""The jaxpr-analysis engine (`ppl_ext/adev/_engine().py`) and the analyses on it.

- every primitive that carries a jaxpr (or runs Python code) is followed by a generic rule
  or handled conservatively by each analysis: continuity (a step or a refusal naming it),
  sign facts (no facts), plate separability (mixed);
- the site predicates behave as the interpreter's;
- sign facts are sound on adversarial inputs (NaN made by the program, overflow,
  underflow, empty axes, fill values, integer wrap-around): a fact that is wrong skips a
  parameter check and lets an invalid parameter through silently;
- plate separability follows calls by primitive object (`jax.checkpoint` is `remat2`,
  closed_call is `eval_jaxpr` in JAX 0.11).
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax
from jax.extend import core
from jax.sharding import PartitionSpec

import ppl_ext as px
from ppl_ext.adev import _expectation, _interpreter, _primitives, _separable, _signs


def _engine():
    from ppl_ext.adev import _analysis  # imported where needed (tests below also run on
    return _analysis  # code without the engine, to show they fail there)

KEY = jax.random.key(0)


def _closed_call(op, x):
    closed = jax.make_jaxpr(op)(x)  # its constants are attached to it
    return core.primitives.closed_call_p.bind(x, call_jaxpr=closed)[0]


def _custom_jvp(op):
    @jax.custom_jvp
    def f(x):
        return op(x)

    f.defjvp(lambda p, t: (f(p[0]), t[0]))
    return f


def _custom_vjp(op):
    @jax.custom_vjp
    def f(x):
        return op(x)

    f.defvjp(lambda x: (f(x), None), lambda _, g: (g,))
    return f


def _custom_vmap(op):
    @jax.custom_batching.custom_vmap
    def f(x):
        return op(x)

    f.def_vmap(lambda size, batched, x: (op(x), batched[0]))
    return f


def _shard_map(devices):
    def build(op, x, k):
        mesh = jax.make_mesh((devices,), ("i",), devices=jax.devices()[:devices])
        return jax.shard_map(op, mesh=mesh, in_specs=PartitionSpec(),
                             out_specs=PartitionSpec())(x)

    return build


def _reduce(op, x, k):
    total = lax.reduce((x, x), (0.0, 0.0), lambda a, b: (a[0] + b[0], a[1] + op(b[1])), (0,))
    return jnp.broadcast_to(total[1], x.shape)


def _reduce_window(op, x, k):
    return lax.reduce_window((x, x), (0.0, 0.0), lambda a, b: (a[0] + b[0], a[1] + op(b[1])),
                             (1,), (1,), "VALID")[1]


#: programs that put `op` inside one primitive that carries a jaxpr (or Python code);
#: `k` is a traced integer (1) so that control flow is not resolved while tracing
BUILDERS = {
    "jit": lambda op, x, k: jax.jit(op)(x),
    "checkpoint": lambda op, x, k: jax.checkpoint(op)(x),
    "closed_call": lambda op, x, k: _closed_call(op, x),
    "cond": lambda op, x, k: lax.cond(k > 0, op, op, x),
    "switch": lambda op, x, k: lax.switch(k, [op, op, op], x),
    "scan": lambda op, x, k: lax.scan(lambda c, xi: (c, op(xi)), 0.0, x)[1],
    "map": lambda op, x, k: lax.map(op, x),
    "fori_loop": lambda op, x, k: lax.fori_loop(0, k, lambda i, v: op(v), x),
    "while_loop": lambda op, x, k: lax.while_loop(
        lambda c: c[0] < k, lambda c: (c[0] + 1, op(c[1])), (0, x))[1],
    "custom_jvp": lambda op, x, k: _custom_jvp(op)(x),
    "custom_vjp": lambda op, x, k: _custom_vjp(op)(x),
    "custom_vmap": lambda op, x, k: _custom_vmap(op)(x),
    "composite": lambda op, x, k: lax.composite(op, name="ppl.test")(x),
    "shard_map_1": _shard_map(1),
    "shard_map_2": _shard_map(2),
    "reduce": _reduce,
    "reduce_window": _reduce_window,
    "scatter_apply": lambda op, x, k: x.at[0].apply(op),
    "custom_linear_solve": lambda op, x, k: lax.custom_linear_solve(
        lambda v: v, x, lambda mv, b: op(b)),
    "pure_callback": lambda op, x, k: jax.pure_callback(
        lambda v: np.asarray(op(v)), jax.ShapeDtypeStruct(x.shape, x.dtype), x),
}
#: primitives whose bodies no analysis goes into (conservative everywhere)
OPAQUE = {"custom_linear_solve", "pure_callback"}
#: calls that the evaluating separability analysis follows (the body sees the shapes)
SEPARABLE_CALLS = {"jit", "checkpoint", "closed_call", "custom_jvp", "custom_vjp",
                   "custom_vmap", "composite"}


def _code_primitives(jaxpr) -> set:
    found = set()
    for eqn in jaxpr.eqns:
        if _engine().carries_code(eqn):
            found.add(eqn.primitive)
        for sub in _engine().sub_jaxprs(eqn.params):
            found |= _code_primitives(sub)
    return found


def _top_code_primitive(name):
    x, k = jnp.ones(4), jnp.int32(1)
    jaxpr = jax.make_jaxpr(lambda x, k: BUILDERS[name](jnp.sin, x, k))(x, k).jaxpr
    found = [e.primitive for e in jaxpr.eqns if _engine().carries_code(e)]
    assert found, f"{name}: no primitive with a jaxpr or code was traced"
    return found[0]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_primitive_with_a_body_has_a_rule_or_is_opaque(name):
    prim = _top_code_primitive(name)
    assert not isinstance(prim, str)
    if name in OPAQUE:
        assert prim not in _engine().STRUCTURE, prim
    else:
        assert prim in _engine().STRUCTURE, f"{name}: {prim} has no structure"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_continuity_follows_the_body_or_refuses_by_name(name):
    prim = _top_code_primitive(name)

    def program(op):
        def fn(t, k):
            x = px.sample(dist.Normal(t, 1.0).expand((4,)), name="x")
            return jnp.sum(BUILDERS[name](op, x, k))

        return px.expectation(fn)

    # a step inside the body is refused, by the step or by the primitive's name
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=f"'x'.*discontinuous.*('floor'|'{prim.name}')"):
        program(jnp.floor).estimate(KEY, 0.3, jnp.int32(1))
    if name in OPAQUE:  # a body that is not analysed counts as a step
        with pytest.raises(px.UnsupportedEstimatorError, match=f"'{prim.name}'.*not analyse"):
            program(jnp.sin).estimate(KEY, 0.3, jnp.int32(1))
    else:
        assert np.isfinite(float(program(jnp.sin).estimate(KEY, 0.3, jnp.int32(1))))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sign_facts_follow_the_body_or_give_none(name):
    def fn(h, k):
        return BUILDERS[name](lambda v: v + 0.0, jax.nn.softplus(h) + 1.0, k)

    jaxpr, _, _ = _expectation._trace(fn, (jnp.zeros(4), jnp.int32(1)), {}, check=False)
    facts = _signs.fact_of(jaxpr, jaxpr.outvars[0])
    if name in OPAQUE:
        assert "nonneg" not in facts and "pos" not in facts, facts
    else:
        assert "nonneg" in facts, (name, facts)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_separability_follows_calls_or_gives_mixed(name):
    prim = _top_code_primitive(name)
    n = 4
    value, k = jnp.arange(4.0), jnp.int32(1)
    closed = jax.make_jaxpr(lambda c, k: jnp.sum(BUILDERS[name](jnp.sin, c, k)))(value, k)
    (out,) = _separable.separate(closed, value, [k], n)
    expected = jnp.sum(BUILDERS[name](jnp.sin, value, k))
    np.testing.assert_allclose(out.array(), expected, rtol=1e-6)
    if name in SEPARABLE_CALLS:
        assert out.kind == _separable.S, (name, out)
        np.testing.assert_allclose(out.vec, jnp.sin(value), rtol=1e-6)
    else:
        assert out.kind == _separable.X, (name, out)
        assert prim.name in out.culprit or name in ("reduce", "reduce_window"), out.culprit


def test_structure_is_keyed_by_primitive_objects_whose_names_changed():
    registry = {p for p in gc.get_objects() if isinstance(p, core.Primitive)}
    names = {p.name for p in _engine().STRUCTURE}
    assert all(p in registry for p in _engine().STRUCTURE)
    # jax.checkpoint binds `remat2` and closed_call is `eval_jaxpr` in JAX 0.11
    assert core.primitives.remat_p in _engine().STRUCTURE and "remat2" in names
    assert core.primitives.closed_call_p in _engine().STRUCTURE and "eval_jaxpr" in names


# ------------------------------------------------------------------ site predicates


def _site_programs():
    def site(t):
        return px.sample(dist.Normal(t, 1.0))

    def enum_site(t):
        return px.sample(dist.Bernoulli(logits=t), px.enum) * 1.0

    inner = px.expectation(lambda s: site(s) ** 2)
    return {
        "none": lambda t: t * 2.0,
        "top": lambda t: site(t) + enum_site(t),
        "jit": lambda t: jax.jit(lambda s: enum_site(s) + site(s))(t),
        "scan": lambda t: lax.scan(lambda c, _: (c + site(t), None), 0.0, length=2)[0],
        "cond": lambda t: lax.cond(t > 0, lambda: enum_site(t), lambda: 0.0),
        "nested": lambda t: inner(t) + t,
        "checkpoint": lambda t: jax.checkpoint(lambda s: site(s) * enum_site(s))(t),
    }


@pytest.mark.parametrize("name", list(_site_programs()))
def test_site_predicates_agree_with_the_interpreter(name):
    fn = _site_programs()[name]
    jaxpr, _, _ = _expectation._trace(fn, (0.3,), {}, check=False)
    assert _engine().has_sites(jaxpr) == _interpreter.has_sites(jaxpr)
    assert _engine().first_continuation_site(jaxpr) == \
        _interpreter.first_continuation_site(jaxpr)
    assert _engine().slots(jaxpr) == _interpreter._slots(jaxpr)
    assert _engine()._slots is _engine().slots
    for eqn in jaxpr.eqns:
        assert list(_engine().sub_jaxprs(eqn.params)) == \
            list(_interpreter._sub_jaxprs(eqn.params))
    assert _engine().has_sites(jaxpr) == (name != "none")


# ---------------------------------------------------------------------- sign facts

HOLDS = {
    "num": lambda v: ~np.isnan(v),
    "fin": np.isfinite,
    "nonneg": lambda v: v >= 0,
    "pos": lambda v: v > 0,
    "unit": lambda v: (v >= 0) & (v <= 1),
}

ADVERSARIAL = np.array([-np.inf, -200.0, -1.0, -1e-30, 0.0, 1e-30, 0.5, 200.0, np.inf],
                       np.float32)


def softplus1(h):
    return jax.nn.softplus(h) + 1.0


@jax.custom_jvp
def logaddexp(a, b):  # not jax's: a user function that happens to be named so
    return a - b - 5.0


logaddexp.defjvp(lambda p, t: (logaddexp(*p), t[0] - t[1]))

FACT_PROGRAMS = {  # each a program of one float array h; facts claimed must hold
    "gather fill": lambda h: jnp.take(softplus1(h), jnp.array([0, 50]), mode="fill",
                                      fill_value=-1.0),
    "gather fill default (NaN)": lambda h: jnp.take(softplus1(h), jnp.array([50]),
                                                    mode="fill"),
    "at get fill": lambda h: softplus1(h).at[jnp.array([60])].get(mode="fill",
                                                                  fill_value=-2.0),
    "cast to float16": lambda h: (softplus1(h) * 0.0 + 1e-30).astype(jnp.float16),
    "cast to bfloat16": lambda h: (jax.nn.softplus(h) + 1e-42).astype(jnp.bfloat16),
    "cast to int": lambda h: (jax.nn.softplus(h) + 0.5).astype(jnp.int32).astype(
        jnp.float32),
    "reduce_precision": lambda h: lax.reduce_precision(jnp.maximum(h, 1e-30), 5, 2),
    "max over an empty axis": lambda h: jnp.max(softplus1(h)[:0], initial=-1.0),
    "sum over an empty axis": lambda h: jnp.sum(softplus1(h)[:0]),
    "min over an empty axis": lambda h: jnp.min(jax.nn.sigmoid(h)[:0], initial=2.0),
    "inf - inf under max": lambda h: jnp.maximum(jnp.exp(h) - jnp.exp(h), 1e-3),
    "0 * inf under min": lambda h: jnp.minimum(jax.nn.sigmoid(h), jnp.exp(h) * jnp.exp(-h)),
    "inf / inf": lambda h: jnp.exp(h) / softplus1(h),
    "user function named logaddexp": lambda h: logaddexp(h, 0.0) + 1e-3,
    "negative zero to the power -1": lambda h: lax.integer_pow(jnp.maximum(h, -0.0), -1),
    "rsqrt of negative zero": lambda h: lax.rsqrt(jnp.maximum(h, -0.0)),
    # rules that hold
    "softplus + c": lambda h: jax.nn.softplus(h) + 1e-3,
    "sigmoid and 1 - sigmoid": lambda h: jnp.concatenate([jax.nn.sigmoid(h),
                                                          1.0 - jax.nn.sigmoid(h)]),
    "exp, square, abs, sqrt": lambda h: jnp.exp(h) + h ** 2 + jnp.abs(h)
    + jnp.sqrt(jnp.abs(h)),
    "clip": lambda h: jnp.clip(h, 1e-3, 1.0),
    "select, pad, cumsum, dynamic_slice": lambda h: lax.dynamic_slice(jnp.cumsum(jnp.pad(
        jnp.where(h > 0, softplus1(h), 2.0), (1, 1), constant_values=3.0)), (1,), (3,)),
    "sort, max": lambda h: jnp.sort(jnp.maximum(h, 0.5)),
    "mul of units, div by positive": lambda h: jax.nn.sigmoid(h) * jax.nn.sigmoid(-h)
    + jax.nn.sigmoid(h) / softplus1(h),
}


def _facts_and_value(fn, h):
    jaxpr, inputs, _ = _expectation._trace(fn, (h,), {}, check=False)
    facts = _signs.fact_of(jaxpr, jaxpr.outvars[0])
    value = np.asarray(jax.core.eval_jaxpr(jaxpr, [], *inputs)[0], np.float64)
    return facts, value


def _strict_facts_and_value(fn, h):
    jaxpr, inputs, _ = _expectation._trace(fn, (h,), {}, check=False)
    facts = _signs.strict_facts(jaxpr).get(jaxpr.outvars[0], _signs.NONE)
    value = np.asarray(jax.core.eval_jaxpr(jaxpr, [], *inputs)[0], np.float64)
    return facts, value


@pytest.mark.parametrize("name", list(FACT_PROGRAMS))
def test_sign_facts_hold_on_adversarial_inputs(name):
    fn = FACT_PROGRAMS[name]
    for h in [ADVERSARIAL, ADVERSARIAL[::-1].copy(), np.full(3, 200.0, np.float32)]:
        # NaN tracked: every fact holds for every element
        facts, value = _strict_facts_and_value(fn, jnp.asarray(h))
        for fact in facts:
            if fact in HOLDS:
                assert np.all(HOLDS[fact](value)), (name, fact, h, value)
        # the checks' reading: every fact holds for every element that is not NaN
        facts, value = _facts_and_value(fn, jnp.asarray(h))
        for fact in facts:
            if fact in HOLDS:
                assert np.all(HOLDS[fact](value) | np.isnan(value)), (name, fact, h, value)


@pytest.mark.parametrize("name, fact", [
    ("softplus + c", "pos"), ("sigmoid and 1 - sigmoid", "unit"),
    ("exp, square, abs, sqrt", "nonneg"), ("clip", "unit"),
    ("select, pad, cumsum, dynamic_slice", "pos"), ("sort, max", "pos"),
    ("mul of units, div by positive", "nonneg"),
])
def test_sign_facts_still_prove_what_holds(name, fact):
    facts, _ = _facts_and_value(FACT_PROGRAMS[name], jnp.zeros(3))
    assert fact in facts, facts


def _integer_scale(kind):
    def program(k):
        k = jnp.asarray(k, jnp.int32)
        base = jnp.abs(k) if kind == "abs" else k ** 2
        return px.sample(dist.Normal(0.0, base.astype(jnp.float32) + 1e-3,
                                     validate_args=True), name="z")

    return program


RUNTIME = {  # (program, argument): the parameter is invalid at run time
    "gather fill": (lambda h: px.sample(dist.Normal(0.0, jnp.take(
        softplus1(h), jnp.array([5]), mode="fill", fill_value=-1.0), validate_args=True),
        name="z"), jnp.zeros(3)),
    "at get fill": (lambda h: px.sample(dist.Normal(0.0, softplus1(h).at[
        jnp.array([7])].get(mode="fill", fill_value=-2.0), validate_args=True),
        name="z"), jnp.zeros(3)),
    "cast to float16": (lambda h: px.sample(dist.Normal(
        0.0, (jax.nn.softplus(h) + 1e-30).astype(jnp.float16), validate_args=True),
        name="z"), jnp.full(2, -200.0)),
    "cast to bfloat16": (lambda h: px.sample(dist.Normal(
        0.0, (jax.nn.softplus(h) + 1e-42).astype(jnp.bfloat16), validate_args=True),
        name="z"), jnp.full(2, -200.0)),
    "cast to int": (lambda h: px.sample(dist.Normal(0.0, (jax.nn.softplus(h) + 0.5).astype(
        jnp.int32).astype(jnp.float32), validate_args=True), name="z"), jnp.full(2, -10.0)),
    "max over an empty axis": (lambda h: px.sample(dist.Normal(
        0.0, jnp.max(softplus1(h)[:0], initial=-1.0), validate_args=True), name="z"),
        jnp.zeros(3)),
    "sum over an empty axis": (lambda h: px.sample(dist.Normal(
        0.0, jnp.sum(softplus1(h)[:0]), validate_args=True), name="z"), jnp.zeros(3)),
    "user function named logaddexp": (lambda h: px.sample(dist.Normal(
        0.0, logaddexp(h, 0.0) + 1e-3, validate_args=True), name="z"), jnp.zeros(2)),
    "abs of INT_MIN": (_integer_scale("abs"), jnp.int32(-2**31)),
    "square overflows int32": (_integer_scale("square"), jnp.int32(50_000)),
}


RUNTIME["0 * inf under min (a Bernoulli draw hides a NaN)"] = (
    lambda h: px.sample(dist.Bernoulli(
        probs=jnp.minimum(jax.nn.sigmoid(h), jnp.exp(h) * jnp.exp(-h)), validate_args=True),
        px.reinforce, name="z") * 1.0, jnp.full(2, 200.0))

NAN_MADE = {  # a reparameterised site with a NaN parameter made by the program
    "inf - inf under max": (lambda h: px.sample(dist.Normal(
        0.0, jnp.maximum(jnp.exp(h) - jnp.exp(h), 1e-3), validate_args=True), name="z"),
        jnp.full(2, 100.0)),
}


@pytest.mark.parametrize("name", list(NAN_MADE))
def test_a_nan_parameter_of_a_reparameterised_site_gives_a_nan_estimate(name):
    # its check skips what only a NaN can violate (as NumPyro, which checks no traced
    # parameter): the draw and so the estimate are NaN, never a finite wrong value
    program, arg = NAN_MADE[name]
    estimate = px.expectation(lambda a: jnp.sum(program(a))).estimate(KEY, arg)
    assert np.isnan(estimate)


@pytest.mark.parametrize("name", list(RUNTIME))
def test_invalid_parameter_is_not_let_through_by_a_wrong_fact(name):
    program, arg = RUNTIME[name]
    with pytest.raises(px.InvalidParameterError, match="'z'.*violates its constraint"):
        jax.block_until_ready(px.expectation(
            lambda a: jnp.sum(program(a))).estimate(KEY, arg))


# ---------------------------------------------------------- plate separability


def test_checkpoint_and_closed_call_around_a_plate_sum_factorise():
    t = jnp.linspace(-1.0, 1.0, 5)
    value = jnp.arange(5.0)
    for wrap in (jax.checkpoint, lambda f: lambda c: _closed_call(f, c)):
        closed = jax.make_jaxpr(wrap(lambda c: jnp.sum(c * t) + jnp.sum(t)))(value)
        (out,) = _separable.separate(closed, value, [], 5)
        assert out.kind == _separable.S, out
        np.testing.assert_allclose(out.vec, value * t, rtol=1e-6)


def test_enumeration_per_element_under_checkpoint():
    # 20 elements: joint enumeration (2^20 values) is refused, per element is exact
    theta = jnp.linspace(-2.0, 2.0, 20)

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum) * 1.0
        return jax.checkpoint(lambda c: jnp.sum((c + 1.0) ** 2 * t))(c)

    def exact(t):
        p = jax.nn.sigmoid(t)
        return jnp.sum(p * 4.0 * t + (1.0 - p) * t)

    value, grad = px.expectation(program).value_and_grad(KEY, theta)
    np.testing.assert_allclose(value, exact(theta), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(exact)(theta), rtol=1e-4, atol=1e-5)


def test_support_marks_are_the_identity_for_separability_and_signs():
    def fn(h):
        return jnp.sum(dist.Normal(0.0, 1.0).log_prob(h))

    with _primitives.tracing_expectation():
        closed = jax.make_jaxpr(fn)(jnp.zeros(3))
    assert any(e.primitive is _engine().support_check_p for e in closed.eqns)
    (out,) = _separable.separate(closed, jnp.zeros(3), [], 3)
    assert out.kind == _separable.S
    np.testing.assert_allclose(out.array(), fn(jnp.zeros(3)), rtol=1e-6)
