"""`jax.vmap` inside an expectation program: each mapped element draws independently.

A site under `jax.vmap` is one plate-like site whose leading batch axis is the mapped
axis (never one draw repeated), with the estimator's semantics per element.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import assert_unbiased, many

NUM = 20_000


@pytest.mark.parametrize("estimator", [px.reparam, px.reinforce, px.mvd],
                         ids=["reparam", "reinforce", "mvd"])
def test_unmapped_parameters_draw_independently(estimator):
    # E[(Σ_k x_k)^2] for 4 iid N(t, 1) draws is 4 + 16 t^2; four copies of one draw
    # would give 16 + 16 t^2.
    def program(t):
        xs = jax.vmap(lambda _: px.sample(dist.Normal(t, 1.0), estimator))(jnp.arange(4))
        return jnp.sum(xs) ** 2

    f = px.expectation(program)
    t = 0.5
    values, grads = many(lambda k: f.value_and_grad(k, t), num=NUM)
    assert_unbiased(values, 4 + 16 * t**2, what="value")
    assert_unbiased(grads, 32 * t, what="gradient")


def test_mapped_parameters_and_enumeration():
    # b_k ~ Bernoulli(sigmoid(t + w_k)) independently; E[(Σ_k b_k)^2] by brute force
    w = jnp.array([-1.0, 0.0, 2.0])

    def program(t):
        bs = jax.vmap(lambda wk: px.sample(dist.Bernoulli(logits=t + wk), px.enum))(w)
        bs = bs.astype(jnp.float32)
        return jnp.sum(bs) ** 2

    def exact(t):
        p = jax.nn.sigmoid(t + w)
        total = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=3):
            b = jnp.array(bits)
            total += jnp.prod(jnp.where(b == 1, p, 1 - p)) * jnp.sum(b) ** 2
        return total

    f = px.expectation(program)
    t = 0.3
    value, grad = f.value_and_grad(jax.random.key(0), t)  # exact: enumeration
    np.testing.assert_allclose(value, exact(t), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(exact)(t), rtol=1e-5)


def test_vmap_of_jit_and_of_a_scan_draw_independently():
    @jax.jit
    def draw(t):
        return px.sample(dist.Normal(t, 1.0), px.reinforce)

    def program(t):
        xs = jax.vmap(lambda _: draw(t))(jnp.arange(3))
        ys = jax.vmap(lambda _: jax.lax.scan(
            lambda c, _: (c + px.sample(dist.Normal(t, 1.0)), None), 0.0, length=2)[0]
        )(jnp.arange(2))
        return jnp.sum(xs) ** 2 + jnp.sum(ys) ** 2

    f = px.expectation(program)
    t = 0.4
    # Σ of 3 iid N(t,1): 3 + 9t²; Σ of 2×2 iid: 4 + 16t²
    values, grads = many(lambda k: f.value_and_grad(k, t), num=NUM)
    assert_unbiased(values, 7 + 25 * t**2, what="value")
    assert_unbiased(grads, 50 * t, what="gradient")


def test_hand_written_iwelbo_with_vmap_is_the_iwelbo():
    # c ~ Bernoulli(0.3), x | c ~ N(2c - 1, 1); q(c) = Bernoulli(sigmoid(l)); K = 3 particles
    x, k = -1.0, 3

    def log_weight(logit):
        q = dist.Bernoulli(logits=logit)
        c = px.sample(q, px.reinforce)
        return (dist.Bernoulli(probs=0.3).log_prob(c) + dist.Normal(2 * c - 1, 1.0).log_prob(x)
                - q.log_prob(c))

    def iwelbo(logit):
        w = jax.vmap(lambda _: log_weight(logit))(jnp.arange(k))
        return jax.scipy.special.logsumexp(w) - jnp.log(k)

    def exact(logit):
        total = 0.0
        for cs in itertools.product([0.0, 1.0], repeat=k):
            cs = jnp.array(cs)
            q = dist.Bernoulli(logits=logit)
            lw = dist.Bernoulli(probs=0.3).log_prob(cs) + dist.Normal(2 * cs - 1, 1.0).log_prob(
                x) - q.log_prob(cs)
            total += jnp.exp(jnp.sum(q.log_prob(cs))) * (
                jax.scipy.special.logsumexp(lw) - jnp.log(k))
        return total

    f = px.expectation(iwelbo)
    logit = 2.0
    values, grads = many(lambda key: f.value_and_grad(key, logit), num=NUM)
    assert_unbiased(values, exact(logit), what="IWELBO value")
    assert_unbiased(grads, jax.grad(exact)(logit), what="IWELBO gradient")
    # a one-draw ELBO has a different value here, so the test can tell them apart
    exact_elbo = 0.0
    for c in (0.0, 1.0):
        q = dist.Bernoulli(logits=logit)
        exact_elbo += jnp.exp(q.log_prob(c)) * (dist.Bernoulli(probs=0.3).log_prob(c)
                                                + dist.Normal(2 * c - 1, 1.0).log_prob(x)
                                                - q.log_prob(c))
    assert float(exact(logit)) - float(exact_elbo) > 0.5


def test_vmap_of_a_nested_expectation_gives_independent_estimates():
    @px.expectation
    def inner(t):
        return px.sample(dist.Normal(t, 1.0), px.reinforce)

    def program(t):
        return jnp.sum(jax.vmap(lambda _: inner(t))(jnp.arange(3))) ** 2

    f = px.expectation(program)
    t = 0.2
    values, grads = many(lambda k: f.value_and_grad(k, t), num=NUM)
    assert_unbiased(values, 3 + 9 * t**2, what="value")
    assert_unbiased(grads, 18 * t, what="gradient")
