"""Nested expectations: the nested call is a sample of an unbiased estimate whose random
choices belong to the enclosing program, so any use of it (also nonlinear) is unbiased in
value and gradient for the enclosing expectation."""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import assert_unbiased, many

NUM = 20_000


@pytest.mark.parametrize("estimator", [px.reinforce, px.Reinforce(baseline=1.0), px.mvd,
                                       px.LeaveOneOut(3), px.reparam, px.enum],
                         ids=["reinforce", "baseline", "mvd", "loo", "reparam", "enum"])
def test_square_of_a_nested_estimate(estimator):
    # inner(t) = x with x ~ Bernoulli(sigmoid t) (enum, mvd) or N(t, 1): E[inner²] exactly
    discrete = estimator in (px.enum,) or isinstance(estimator, px.MVD)

    @px.expectation
    def inner(t):
        if discrete:
            return px.sample(dist.Bernoulli(logits=t), estimator).astype(jnp.float32)
        return px.sample(dist.Normal(t, 1.0), estimator)

    def program(t):
        return inner(t) ** 2

    def exact(t):
        if discrete:  # E[x²] = p whatever the estimator (it never changes the target)
            return jax.nn.sigmoid(t)
        return t**2 + 1  # LeaveOneOut too: its draws are the enclosing program's

    f = px.expectation(program)
    t = 0.7
    values, grads = many(lambda k: f.value_and_grad(k, t), num=NUM)
    assert_unbiased(values, exact(t), what="value")
    assert_unbiased(grads, jax.grad(exact)(t), what="gradient")


def test_product_of_two_calls_and_exp_of_a_call():
    # two independent calls multiplied: E[x1 x2] = t²; and E[exp(inner)] = e^{t + 1/2}
    @px.expectation
    def inner(t):
        return px.sample(dist.Normal(t, 1.0), px.reinforce)

    def program(t):
        return inner(t) * inner(t) + jnp.exp(inner(t))

    f = px.expectation(program)
    t = 0.3
    exact = lambda t: t**2 + jnp.exp(t + 0.5)  # noqa: E731
    values, grads = many(lambda k: f.value_and_grad(k, t), num=NUM)
    assert_unbiased(values, exact(t), what="value")
    assert_unbiased(grads, jax.grad(exact)(t), what="gradient")


def test_continuation_estimator_in_a_nested_call_inside_a_loop_is_refused():
    @px.expectation
    def inner(t):
        return px.sample(dist.Bernoulli(logits=t), px.mvd, name="coin").astype(jnp.float32)

    def program(t):
        return jax.lax.scan(lambda c, _: (c + inner(t) ** 2, None), 0.0, length=2)[0]

    with pytest.raises(px.UnsupportedEstimatorError, match="'coin'.*scan body"):
        px.expectation(program).grad(jax.random.key(0), 0.1)
