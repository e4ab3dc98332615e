"""The estimator protocol: abstract kinds, final estimators, class-level flags.

`px.AbstractEstimator` and its kinds `px.AbstractLocalEstimator` /
`px.AbstractContinuationEstimator` are abstract classes Python checks: a subclass that
leaves out a method or a flag cannot be instantiated (the error names what is missing),
and a concrete estimator cannot be subclassed. A user-written estimator that follows the
protocol works end to end.
"""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from ppl_ext.adev._primitives import sample_p, tracing_expectation
from tests.helpers import assert_unbiased, many

ABSTRACT = [px.AbstractEstimator, px.AbstractLocalEstimator,
            px.AbstractContinuationEstimator]


@pytest.mark.parametrize("cls", ABSTRACT, ids=lambda c: c.__name__)
def test_abstract_classes_cannot_be_instantiated(cls):
    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        cls()


class UserReparam(px.AbstractLocalEstimator):
    """A user's copy of px.reparam, written only against the protocol."""

    pathwise = True
    score_function = False

    def check(self, distribution, site):
        if not distribution.has_rsample:
            raise px.UnsupportedEstimatorError(f"{site}: UserReparam needs rsample.")

    def local(self, key, distribution, surrogate):
        return distribution.rsample(key), None, None


class UserScore(px.AbstractLocalEstimator):
    """A user's score-function estimator: `A += log q - sg(log q)`."""

    pathwise = False
    score_function = True

    def check(self, distribution, site):
        pass

    def local(self, key, distribution, surrogate):
        x = jax.lax.stop_gradient(distribution.sample(key))
        if not surrogate:
            return x, None, None
        log_q = jnp.sum(distribution.log_prob(x))
        return x, log_q - jax.lax.stop_gradient(log_q), None


class UserMean(px.AbstractContinuationEstimator):
    """A user's continuation estimator: the average of `k` over two draws."""

    pathwise = False
    score_function = True

    def check(self, distribution, site):
        pass

    def run(self, key, distribution, k, surrogate, dtype, site):
        xs = jax.lax.stop_gradient(distribution.sample(key, (2,))).astype(dtype)
        outs, invalid = jax.vmap(k)(xs)
        if surrogate:
            log_q = jax.vmap(lambda x: jnp.sum(distribution.log_prob(x)))(xs)
            score = log_q - jax.lax.stop_gradient(log_q)
            outs = [out + jax.lax.stop_gradient(out) * score.reshape((2,) + (1,) * (out.ndim - 1))
                    for out in outs]
        return [jnp.mean(out, axis=0) for out in outs], jnp.max(invalid)


def test_a_missing_method_is_named_at_instantiation():
    class NoLocal(px.AbstractLocalEstimator):
        pathwise = True
        score_function = False

        def check(self, distribution, site):
            pass

    with pytest.raises(TypeError, match="abstract method 'local'"):
        NoLocal()

    class NoRun(px.AbstractContinuationEstimator):
        pathwise = False
        score_function = False

        def check(self, distribution, site):
            pass

    with pytest.raises(TypeError, match="abstract method 'run'"):
        NoRun()

    class NoCheck(px.AbstractLocalEstimator):
        pathwise = True
        score_function = False

        def local(self, key, distribution, surrogate):
            return distribution.rsample(key), None, None

    with pytest.raises(TypeError, match="abstract method 'check'"):
        NoCheck()


def test_a_missing_flag_is_named_at_instantiation():
    class NoFlags(px.AbstractLocalEstimator):
        def check(self, distribution, site):
            pass

        def local(self, key, distribution, surrogate):
            return distribution.rsample(key), None, None

    with pytest.raises(TypeError, match="pathwise") as info:
        NoFlags()
    assert "score_function" in str(info.value)


@pytest.mark.parametrize("cls", [px.Reparam, px.Reinforce, px.Enum, px.MVD, px.LeaveOneOut],
                         ids=lambda c: c.__name__)
def test_concrete_estimators_are_final(cls):
    with pytest.raises(TypeError, match="concrete estimators are final"):
        class Sub(cls):
            pass


def test_abstract_intermediate_classes_are_allowed():
    class AbstractPathwise(px.AbstractLocalEstimator):
        pathwise = True

    class Concrete(AbstractPathwise):
        score_function = False

        def check(self, distribution, site):
            pass

        def local(self, key, distribution, surrogate):
            return distribution.rsample(key), None, None

    with pytest.raises(TypeError, match="score_function"):
        AbstractPathwise()
    assert Concrete().pathwise and Concrete().checks_continuity()


BUILT_INS = {
    # estimator: (continuation, pathwise, score_function, checks_continuity)
    "reparam": (px.reparam, False, True, False, True),
    "reparam_discontinuous": (px.Reparam(allow_discontinuous=True), False, True, False, False),
    "reinforce": (px.reinforce, False, False, True, False),
    "reinforce_baseline": (px.Reinforce(baseline=1.0), False, False, True, False),
    "enum": (px.enum, True, False, False, False),
    "mvd": (px.mvd, True, False, False, False),
    "leave_one_out": (px.LeaveOneOut(3), True, False, True, False),
}


@pytest.mark.parametrize("name", BUILT_INS)
def test_flags_of_every_built_in(name):
    estimator, continuation, pathwise, score_function, continuity = BUILT_INS[name]
    assert isinstance(estimator, px.AbstractEstimator)
    kind = px.AbstractContinuationEstimator if continuation else px.AbstractLocalEstimator
    assert isinstance(estimator, kind)
    assert (estimator.continuation, estimator.pathwise, estimator.score_function) == (
        continuation, pathwise, score_function)
    assert estimator.checks_continuity() is continuity


def _site_params(program, *args):
    with tracing_expectation():
        closed = jax.make_jaxpr(program)(*args)
    return [e.params for e in closed.jaxpr.eqns if e.primitive is sample_p]


def test_the_flags_reach_the_site():
    def program(theta):
        a = px.sample(dist.Normal(theta, 1.0), UserReparam())
        b = px.sample(dist.Normal(theta, 1.0), px.Reparam(allow_discontinuous=True))
        c = px.sample(dist.Normal(theta, 1.0), UserScore())
        return a + b + c

    params = _site_params(program, 0.3)
    assert [(p["pathwise"], p["continuity"], p["continuation"]) for p in params] == [
        (True, True, False), (True, False, False), (False, False, False)]


def test_a_point_mass_stays_pathwise_with_a_user_pathwise_estimator():
    def program(theta):
        return px.sample(dist.Delta(theta), UserReparam()) + px.sample(
            dist.Delta(theta), UserScore())

    params = _site_params(program, 0.3)
    assert "UserReparam" in params[0]["label"]  # kept: it is pathwise
    assert "Reparam" in params[1]["label"] and "UserScore" not in params[1]["label"]


def test_a_user_pathwise_estimator_is_checked_for_continuity():
    @px.expectation
    def jump(theta):
        x = px.sample(dist.Normal(theta, 1.0), UserReparam())
        return jnp.where(x > 0, 1.0, 0.0)

    with pytest.raises(px.UnsupportedEstimatorError, match="discontinuous"):
        jump.grad(jax.random.key(0), 0.3)


def test_site_kinds_come_from_the_flags():
    import numpyro

    from ppl_ext.vi._requirements import (
        CONTINUATION, DIRECT, PATHWISE, SCORE_FUNCTION, THROUGH_PATHWISE, simulate_sites,
    )

    def guide():
        loc = numpyro.param("loc", 0.0)
        a = numpyro.sample("a", dist.Normal(loc, 1.0), infer={"estimator": UserReparam()})
        numpyro.sample("b", dist.Normal(a, 1.0), infer={"estimator": UserScore()})
        numpyro.sample("c", dist.Normal(loc, 1.0), infer={"estimator": UserMean()})

    sites = simulate_sites(px.gen.NumPyroModel(guide), {"loc": jnp.asarray(0.3)})
    assert [(s.name, s.kind, s.law) for s in sites] == [
        ("a", PATHWISE, DIRECT),
        ("b", SCORE_FUNCTION, THROUGH_PATHWISE),  # its law moves with the pathwise `a`
        ("c", CONTINUATION, DIRECT),
    ]


# ------------------------------------------------------------- end to end, unbiased

THETA, SCALE = 0.7, 1.3


def _square(estimator):
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, SCALE), estimator)
        return x**2 + jnp.sin(theta)

    return f


def _exact(theta):
    return theta**2 + SCALE**2 + jnp.sin(theta)


@pytest.mark.parametrize("estimator", [UserReparam(), UserScore(), UserMean()],
                         ids=lambda e: type(e).__name__)
def test_user_estimators_are_unbiased(estimator):
    f = _square(estimator)
    values, grads = many(lambda k: f.value_and_grad(k, THETA))
    assert_unbiased(values, _exact(THETA), what=f"{type(estimator).__name__} value")
    assert_unbiased(grads, jax.grad(_exact)(THETA), what=f"{type(estimator).__name__} grad")


def test_user_reparam_matches_the_built_in_key_for_key():
    mine, theirs = _square(UserReparam()), _square(px.reparam)
    keys = jax.random.split(jax.random.key(3), 16)
    a = jax.vmap(lambda k: mine.value_and_grad(k, THETA))(keys)
    b = jax.vmap(lambda k: theirs.value_and_grad(k, THETA))(keys)
    assert jnp.allclose(a[0], b[0]) and jnp.allclose(a[1], b[1])


def test_user_local_estimator_works_in_a_loop_body():
    @px.expectation
    def f(theta):
        def body(carry, _):
            return carry + px.sample(dist.Normal(theta, SCALE), UserReparam()) ** 2, None

        total, _ = jax.lax.scan(body, 0.0, None, length=3)
        return total

    exact = lambda t: 3 * (t**2 + SCALE**2)  # noqa: E731
    grads = many(lambda k: f.grad(k, THETA))
    assert_unbiased(grads, jax.grad(exact)(THETA), what="scan grad")
