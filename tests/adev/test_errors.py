"""What the transformation cannot handle correctly is refused with an error naming it."""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest
from jax import lax

import ppl_ext as px
from tests.helpers import assert_unbiased


def run(fn, *args):
    return px.expectation(fn).grad(jax.random.key(0), *args)


@pytest.mark.parametrize("estimator", [px.enum, px.mvd, px.LeaveOneOut(3)],
                         ids=["enum", "mvd", "leave_one_out"])
@pytest.mark.parametrize("loop", ["scan", "fori_loop", "while_loop"])
def test_continuation_estimator_in_loop_is_refused(estimator, loop):
    def draw(t):
        return px.sample(dist.Bernoulli(logits=t), estimator, name="coin").astype(float)

    def program(t):
        if loop == "scan":
            return lax.scan(lambda c, _: (c + draw(t), None), 0.0, length=3)[0]
        if loop == "fori_loop":
            return lax.fori_loop(0, 3, lambda i, c: c + draw(t), 0.0)
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] + draw(t)),
                              (0, 0.0))[1]

    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"'coin'.*(scan|while_loop) body.*px.reinforce"):
        px.expectation(program).estimate(jax.random.key(0), 0.3)


def test_reparam_on_discrete_is_refused():
    with pytest.raises(px.UnsupportedEstimatorError, match="Bernoulli.*no rsample"):
        run(lambda t: px.sample(dist.Bernoulli(logits=t), px.reparam) * 1.0, 0.1)


def test_enum_on_continuous_is_refused():
    with pytest.raises(px.UnsupportedEstimatorError, match="enum needs finite support"):
        run(lambda t: px.sample(dist.Normal(t, 1.0), px.enum), 0.1)


def test_mvd_on_unsupported_family_is_refused():
    with pytest.raises(px.UnsupportedEstimatorError, match="mvd supports.*not Gamma"):
        run(lambda t: px.sample(dist.Gamma(t, 1.0), px.mvd), 1.0)


def test_enumeration_too_large_is_refused():
    # 20 elements combined by a product: not a sum of per-element terms, 2^20 joint values
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"2\^20 joint values.*per element either.*'reduce_prod'"):
        run(lambda t: jnp.prod(px.sample(dist.Bernoulli(logits=t).expand((20,)), px.enum) * 1.0),
            0.1)
    # one element of the leading batch axis alone has 2^13 joint values
    with pytest.raises(px.UnsupportedEstimatorError, match=r"one element.*2\^13 joint"):
        run(lambda t: jnp.sum(px.sample(dist.Bernoulli(logits=t).expand((3, 13)), px.enum) * 1.0),
            0.1)


def test_bad_baseline_and_loo_size():
    with pytest.raises(px.UnsupportedEstimatorError, match="baseline must be a scalar"):
        run(lambda t: px.sample(dist.Normal(t, 1.0), px.Reinforce(baseline=jnp.ones(2))), 0.1)
    with pytest.raises(px.UnsupportedEstimatorError, match="num_samples >= 2"):
        run(lambda t: px.sample(dist.Normal(t, 1.0), px.LeaveOneOut(1)), 0.1)


def test_sample_in_custom_jvp_is_refused():
    @jax.custom_jvp
    def noisy(t):
        return px.sample(dist.Normal(t, 1.0))

    noisy.defjvp(lambda p, t: (noisy(*p), t[0]))
    with pytest.raises(px.UnsupportedPrimitiveError, match="custom_jvp_call.*noisy"):
        run(lambda t: noisy(t) ** 2, 0.1)


def test_sample_in_custom_vjp_is_refused():
    @jax.custom_vjp
    def noisy(t):
        return px.sample(dist.Normal(t, 1.0))

    noisy.defvjp(lambda t: (noisy(t), None), lambda _, g: (g,))
    with pytest.raises(px.UnsupportedPrimitiveError, match="custom_vjp_call"):
        run(lambda t: noisy(t) ** 2, 0.1)


def test_primitive_without_rule_is_refused():
    def program(t):
        def matvec(x):
            return x * px.sample(dist.Normal(t, 1.0))
        return lax.custom_linear_solve(matvec, jnp.ones(()), lambda mv, b: b)

    with pytest.raises(px.UnsupportedPrimitiveError, match="'custom_linear_solve'"):
        run(program, 0.1)


def test_batched_baseline_under_vmap_and_grad_inside_program_are_refused():
    def batched_baseline(t):
        return jnp.sum(jax.vmap(lambda b: px.sample(
            dist.Normal(t, 1.0), px.Reinforce(baseline=b), name="z"))(jnp.arange(3.0)))

    with pytest.raises(px.UnsupportedPrimitiveError, match="'z'.*inside jax.vmap.*baseline"):
        run(batched_baseline, 0.1)
    with pytest.raises(px.UnsupportedPrimitiveError, match="differentiated inside"):
        run(lambda t: jax.grad(lambda s: px.sample(dist.Normal(s, 1.0)))(t), 0.1)


def test_sample_in_while_condition_is_refused():
    def program(t):
        return lax.while_loop(lambda c: c + px.sample(dist.Normal(t, 1.0), px.reinforce) < 3.0,
                              lambda c: c + 1.0, 0.0)

    with pytest.raises(px.UnsupportedPrimitiveError, match="condition of a while_loop"):
        run(program, 0.1)


def test_non_scalar_objective_for_grad():
    f = px.expectation(lambda t: px.sample(dist.Normal(t, 1.0)))
    with pytest.raises(px.ObjectiveShapeError, match="scalar objective.*\\(3,\\)"):
        f.grad(jax.random.key(0), jnp.zeros(3))
    assert f.estimate(jax.random.key(0), jnp.zeros(3)).shape == (3,)


def test_integer_objective():
    f = px.expectation(lambda t: px.sample(dist.Bernoulli(logits=t)))
    with pytest.raises(px.ObjectiveShapeError, match="int32"):
        f.estimate(jax.random.key(0), 0.1)


def test_sample_outside_expectation():
    with pytest.raises(px.OutsideExpectationError, match="outside an expectation"):
        px.sample(dist.Normal(0.0, 1.0))
    with pytest.raises(px.OutsideExpectationError, match="outside an expectation"):
        jax.jit(lambda: px.sample(dist.Normal(0.0, 1.0)))()


def test_bad_arguments():
    with pytest.raises(TypeError, match="numpyro distribution"):
        run(lambda t: px.sample(t), 0.1)
    with pytest.raises(TypeError, match="estimator= must be"):
        run(lambda t: px.sample(dist.Normal(t, 1.0), "reparam"), 0.1)
    f = px.expectation(lambda t: px.sample(dist.Normal(t, 1.0)))
    with pytest.raises(TypeError, match="PRNG key first"):
        f.estimate(0.1, 0.2)
    with pytest.raises(ValueError, match="single PRNG key"):
        f.estimate(jax.random.split(jax.random.key(0), 3), 0.2)
    with pytest.raises(TypeError, match="expects a function"):
        px.expectation(3)


def normal(t):
    return px.sample(dist.Normal(t, 1.0), name="x")


@pytest.mark.parametrize(
    "program, primitive",
    [
        (lambda t: (normal(t) > 0).astype(float), "'gt'"),
        (lambda t: jnp.where(normal(t) > 0, 1.0, 0.0), "select"),
        (lambda t: jnp.floor(normal(t)), "'floor'"),
        (lambda t: jnp.ones(3)[normal(t).astype(int)], "cast to int"),
        (lambda t: lax.cond(normal(t) > 0, lambda: 1.0, lambda: 0.0), "lax.cond"),
        (lambda t: lax.scan(lambda c, _: (c + normal(t), jnp.sign(c)), 0.0,
                            length=3)[1].sum(), "'sign'"),
        (lambda t: px.sample(dist.Normal(jnp.round(normal(t)), 1.0), px.reinforce), "'round'"),
        # a step made in user code stays a step inside trusted library code
        (lambda t: jax.nn.one_hot(jnp.argmax(jnp.stack([normal(t), 0.3])), 2)[0], "'argmax'"),
        (lambda t: dist.Bernoulli(0.3).log_prob((normal(t) > 0).astype(jnp.int32)), "'gt'"),
    ],
    ids=["indicator", "where", "floor", "index", "cond", "scan_carry", "parameter",
         "one_hot_of_argmax", "log_prob_of_indicator"],
)
def test_reparam_into_discontinuity_is_refused(program, primitive):
    """E[1{x > 0}] has gradient pdf(theta), but the pathwise estimator gives 0."""
    with pytest.raises(px.UnsupportedEstimatorError, match=f"'x'.*discontinuous.*{primitive}"):
        run(program, 0.3)


def test_continuous_programs_pass_the_continuity_check():
    # custom_jvp functions and numpyro's support checks are trusted; dead code is ignored;
    # score-function sites may branch on their value; the opt-out skips the check.
    run(lambda t: jax.nn.relu(normal(t)) + jnp.abs(normal(t)) + jnp.maximum(normal(t), 0.0), 0.3)
    run(lambda t: dist.Gamma(2.0, 1.0).log_prob(jnp.exp(normal(t))), 0.3)
    run(lambda t: (lambda x: [x, (x > 0).astype(float)][0])(normal(t)), 0.3)  # dead code
    run(lambda t: (px.sample(dist.Normal(t, 1.0), px.reinforce) > 0).astype(float), 0.3)
    run(lambda t: jnp.where(
        px.sample(dist.Normal(t, 1.0), px.Reparam(allow_discontinuous=True)) > 0, 1.0, 0.0), 0.3)


def test_second_derivatives_are_refused():
    f = px.expectation(lambda t: px.sample(dist.Normal(t, 1.0)) ** 2)
    key = jax.random.key(0)
    with pytest.raises(px.SecondOrderError, match="first order"):
        jax.hessian(f, argnums=1)(key, 0.3)
    with pytest.raises(px.SecondOrderError):
        jax.grad(lambda t: f.grad(key, t))(0.3)
    with pytest.raises(px.SecondOrderError):
        jax.jacfwd(jax.jacfwd(f, argnums=1), argnums=1)(key, 0.3)
    # first-order forward and reverse mode still work
    assert jnp.isfinite(jax.jacfwd(f, argnums=1)(key, 0.3))
    assert jnp.isfinite(jax.jvp(lambda t: f(key, t), (0.3,), (1.0,))[1])


def test_invalid_traced_parameters_raise_with_validate_args():
    f = px.expectation(lambda s: px.sample(dist.Normal(0.0, s, validate_args=True),
                                           name="z") ** 2)
    assert jnp.isfinite(f.grad(jax.random.key(0), 0.5))
    # on the host: px.InvalidParameterError, one line naming site, parameter, constraint
    calls = [f.grad, f.estimate, f.value_and_grad, f,
             lambda k, s: jax.grad(f, argnums=1)(k, s)]
    for method in calls:
        with pytest.raises(px.InvalidParameterError) as info:
            jax.block_until_ready(method(jax.random.key(0), -0.5))
        message = str(info.value)
        assert "\n" not in message
        assert "'z'" in message and "'scale'" in message and "Normal" in message
        assert "positive" in message.lower() or "greater" in message.lower(), message
    # under a user's jit or vmap the check runs in the compiled program, same message
    with pytest.raises(Exception, match=r"InvalidParameterError: sample site 'z'.*'scale'"):
        jax.block_until_ready(jax.jit(f.grad)(jax.random.key(0), -0.5))
    # under vmap, one bad element is enough; the good ones alone pass
    with pytest.raises(Exception, match="InvalidParameterError"):
        jax.block_until_ready(jax.vmap(f.grad, (None, 0))(jax.random.key(0), jnp.array([0.5, -1.0])))
    assert jnp.all(jnp.isfinite(jax.vmap(f.grad, (None, 0))(jax.random.key(0), jnp.array([0.5, 1.0]))))
    # in loops too
    g = px.expectation(lambda s: lax.scan(
        lambda c, _: (c + px.sample(dist.Normal(0.0, s - c, validate_args=True)), None),
        0.0, length=3)[0])
    with pytest.raises(px.InvalidParameterError):
        g.estimate(jax.random.key(0), -0.1)


def test_invalid_parameter_inside_a_nested_expectation_is_reported():
    inner = px.expectation(lambda s: px.sample(dist.Exponential(s, validate_args=True),
                                               px.reinforce, name="wait"))
    outer = px.expectation(lambda s: inner(s) ** 2)
    assert jnp.isfinite(outer.grad(jax.random.key(0), 1.5))
    with pytest.raises(px.InvalidParameterError, match="'wait'.*'rate'"):
        outer.grad(jax.random.key(0), -1.5)


def test_subsampled_plate_is_refused():
    import numpyro

    def program(t):
        with numpyro.handlers.seed(rng_seed=0), numpyro.plate("data", 10, subsample_size=5):
            return jnp.sum(px.sample(dist.Normal(t, 1.0)))

    with pytest.raises(px.UnsupportedEstimatorError, match="subsampled numpyro.plate"):
        run(program, 0.1)


def test_invalid_parameters_of_wrapped_distributions():
    f = px.expectation(lambda s: jnp.sum(px.sample(
        dist.Normal(0.0, s, validate_args=True).expand((3,)).to_event(1))))
    with pytest.raises(px.InvalidParameterError, match="'scale' of Normal"):
        f.estimate(jax.random.key(0), -1.0)


class _Coin(dist.Distribution):
    """A user-defined discrete distribution that declares no constraints."""

    pytree_data_fields = ("p",)

    def __init__(self, p):
        self.p = p
        super().__init__()

    def sample(self, key, sample_shape=()):
        return (jax.random.uniform(key, sample_shape) < self.p).astype(jnp.float32)

    def log_prob(self, value):
        return jnp.where(value == 1, jnp.log(self.p), jnp.log1p(-self.p))


def test_custom_distribution_without_constraints_is_not_taken_as_reparameterisable():
    # numpyro's has_rsample is vacuously True here; reparam would give a zero gradient.
    assert px.adev.default_estimator(_Coin(0.3)) is px.reinforce
    with pytest.raises(px.UnsupportedEstimatorError, match="no rsample"):
        run(lambda p: px.sample(_Coin(p), px.reparam), 0.3)
    f = px.expectation(lambda p: px.sample(_Coin(p)))
    keys = jax.random.split(jax.random.key(0), 10_000)
    grads = jax.vmap(f.grad, (0, None))(keys, 0.3)
    assert_unbiased(grads, 1.0, what="custom distribution gradient")


def test_checks_the_program_guarantees_are_not_compiled():
    # softplus(.) + 1e-3 > 0 and sigmoid(.) in [0, 1] hold by construction: no run-time check
    # (which would be a host callback in the compiled program)
    def guaranteed(raw):
        scale = jax.nn.softplus(raw) + 1e-3
        p = jax.nn.sigmoid(raw)
        return (jnp.sum(px.sample(dist.Normal(0.0, scale, validate_args=True)))
                + jnp.sum(px.sample(dist.Bernoulli(probs=1.0 - p, validate_args=True),
                                    px.enum)))

    def unproven(raw):  # exp can underflow to 0: checked
        return jnp.sum(px.sample(dist.Normal(0.0, jnp.exp(raw), validate_args=True)))

    raw = jnp.array([-2.0, 0.0, 3.0])
    key = jax.random.key(0)
    for program, expect_check in [(guaranteed, False), (unproven, True)]:
        f = px.expectation(program)
        text = jax.jit(f.grad).lower(key, raw).as_text()
        assert ("callback" in text) == expect_check, program.__name__
        assert jnp.all(jnp.isfinite(f.grad(key, raw)))
    with pytest.raises(px.InvalidParameterError, match="violates its constraint"):
        px.expectation(unproven).estimate(key, jnp.array([-200.0]))


@pytest.mark.parametrize("estimator", [px.reinforce, px.LeaveOneOut(3)])
@pytest.mark.parametrize("make", [
    lambda t: dist.Uniform(0.0, t), lambda t: dist.Pareto(t, 2.0),
    lambda t: dist.TruncatedNormal(0.0, 1.0, low=t).expand((2,)).to_event(1)])
def test_score_function_on_a_moving_support_is_refused(estimator, make):
    f = px.expectation(lambda t: jnp.sum(px.sample(make(t), estimator, name="u")))
    with pytest.raises(px.UnsupportedEstimatorError, match="'u'.*bound of .* support"):
        f.grad(jax.random.key(0), 2.0)


def test_score_function_with_constant_bounds_is_accepted_and_unbiased():
    # d/dt E[x], x ~ TruncatedNormal(t, 1, low=0): the bound is a constant (k = 4 SE)
    f = px.expectation(lambda t: px.sample(dist.TruncatedNormal(t, 1.0, low=0.0),
                                           px.reinforce))
    n = 20_000
    grads = jax.vmap(lambda k: f.grad(k, 0.3))(jax.random.split(jax.random.key(0), n))
    exact = float(jax.grad(lambda t: dist.TruncatedNormal(t, 1.0, low=0.0).mean)(0.3))
    assert_unbiased(grads, exact, what="truncated normal gradient")


@pytest.mark.parametrize("estimator", [px.reinforce, px.LeaveOneOut(3), px.reparam])
def test_delta_sites_are_pathwise_whatever_the_estimator(estimator):
    # A point mass has no randomness: d/dt 3 t^2 = 6 t exactly, from one draw
    f = px.expectation(lambda t: 3.0 * jnp.sum(
        px.sample(dist.Delta(jnp.full(2, t**2)).to_event(1), estimator)))
    assert float(f.grad(jax.random.key(0), 1.5)) == pytest.approx(2 * 6 * 1.5, rel=1e-6)


def test_transformed_delta_is_pathwise():
    from numpyro.distributions.transforms import ExpTransform

    f = px.expectation(lambda t: px.sample(
        dist.TransformedDistribution(dist.Delta(t), ExpTransform()), px.reinforce))
    assert float(f.grad(jax.random.key(0), 0.4)) == pytest.approx(float(jnp.exp(0.4)), rel=1e-6)


def test_lazily_computed_parameter_is_checked():
    # MultivariateNormal(loc, covariance_matrix) keeps covariance_matrix as a lazy
    # property; its run-time check read it from the flattened site (a KeyError before)
    def program(loc, cov):
        d = dist.MultivariateNormal(loc, covariance_matrix=cov, validate_args=True)
        return jnp.sum(px.sample(d, name="mvn") ** 2)

    f = px.expectation(program)
    loc = jnp.zeros(2)
    assert jnp.isfinite(f.grad(jax.random.key(0), loc, jnp.eye(2))).all()
    with pytest.raises(px.InvalidParameterError, match="'mvn'"):
        f.grad(jax.random.key(0), loc, -jnp.eye(2))
