"""Several plate-batched `px.enum` sites in one program: enumerated per element together.

Exact values: enumeration is exact, so value and gradient are compared (to float32
rounding) with brute-force sums written in plain JAX, without ppl_ext.
"""

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import assert_unbiased, many


def chain_program(m, data, estimator=px.enum):
    """`m` Bernoulli sites on one plate; site j's logits depend on site j-1 per element."""

    def program(t):
        total, prev = 0.0, jnp.zeros(data.shape[0])
        for j in range(m):
            c = px.sample(dist.Bernoulli(logits=0.3 * (j + 1) * t + prev - 0.5), estimator,
                          name=f"c{j}").astype(jnp.float32)
            total = total + jnp.sum(dist.Normal(2 * c - 1 + 0.1 * j, 1.0).log_prob(data))
            prev = c
        return total

    return program


def element_terms(m, t, x, cs):
    """log-probability of one element's chain `cs` and its term, in plain JAX."""
    log_p, term, prev = 0.0, 0.0, 0.0
    for j, c in enumerate(cs):
        logit = 0.3 * (j + 1) * t + prev - 0.5
        log_p = log_p + (c * jax.nn.log_sigmoid(logit) + (1 - c) * jax.nn.log_sigmoid(-logit))
        term = term + jax.scipy.stats.norm.logpdf(x, 2 * c - 1 + 0.1 * j, 1.0)
        prev = c
    return log_p, term


def exact_joint(m, data):
    """E[program] by brute force over every joint value of all m·n entries."""
    n = data.shape[0]
    configs = jnp.array(list(itertools.product([0.0, 1.0], repeat=m * n))).reshape(-1, m, n)

    def value(t):
        # element_terms is elementwise in (x, cs), so one call covers every configuration
        log_p, term = element_terms(m, t, data, [configs[:, j, :] for j in range(m)])
        return jnp.sum(jnp.exp(jnp.sum(log_p, -1)) * jnp.sum(term, -1))

    return value


def exact_per_element(m, data):
    """The same, summing element by element (valid because the elements are independent)."""
    configs = jnp.array(list(itertools.product([0.0, 1.0], repeat=m)))  # (2^m, m)

    def value(t):
        cs = [configs[:, j, None] for j in range(m)]  # each (2^m, 1) against data (n,)
        log_p, term = element_terms(m, t, data, cs)
        return jnp.sum(jnp.exp(log_p) * term)

    return value


def test_small_instance_against_the_joint_brute_force():
    data = jnp.array([-0.7, 0.2, 1.1])
    f = px.expectation(chain_program(3, data))
    t = 0.4
    value, grad = f.value_and_grad(jax.random.key(0), t)
    exact = exact_joint(3, data)
    np.testing.assert_allclose(value, exact(t), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(exact)(t), rtol=1e-4)
    np.testing.assert_allclose(f.estimate(jax.random.key(1), t), exact(t), rtol=1e-5)


def test_eight_sites_of_twenty_elements_trace_in_linear_time():
    data = jnp.linspace(-1.5, 2.0, 20)
    t = 0.3
    exact = exact_per_element(8, data)
    times = {}
    for m in (2, 8):
        f = px.expectation(chain_program(m, data))
        start = time.perf_counter()
        jax.make_jaxpr(f.value_and_grad)(jax.random.key(0), t)
        times[m] = time.perf_counter() - start
    f = px.expectation(chain_program(8, data))
    value, grad = f.value_and_grad(jax.random.key(0), t)
    np.testing.assert_allclose(value, exact(t), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(exact)(t), rtol=1e-4)
    # linear in the number of sites (2^m - 1 re-traces would be ~100x): generous bound
    assert times[8] < 12 * times[2] + 1.0, times


def test_group_with_a_global_score_function_site_and_a_reparameterised_local():
    # z ~ N(t, 1) (reinforce, independent of the plate) and per element
    # c_i ~ Bern(sigmoid(t)), d_i ~ Bern(sigmoid(c_i - t)) (enum), y_i ~ N(c_i + t, 1)
    # (reparam, depends on c_i): E = t² + 1 + Σ_i E[(d_i + y_i - x_i)²]
    data = jnp.array([0.5, -1.0, 2.0, 0.0])

    def program(t):
        z = px.sample(dist.Normal(t, 1.0), px.reinforce)
        c = px.sample(dist.Bernoulli(logits=jnp.full(4, t)), px.enum).astype(jnp.float32)
        d = px.sample(dist.Bernoulli(logits=c - t), px.enum).astype(jnp.float32)
        y = px.sample(dist.Normal(c + t, 1.0))
        return z**2 + jnp.sum((d + y - data) ** 2)

    def exact(t):
        total = t**2 + 1
        p = jax.nn.sigmoid(t)
        for c in (0.0, 1.0):
            pc = p if c else 1 - p
            q = jax.nn.sigmoid(c - t)
            for d in (0.0, 1.0):
                pd = q if d else 1 - q
                # E[(d + y - x)²] with y ~ N(c + t, 1): (d + c + t - x)² + 1
                total = total + pc * pd * jnp.sum((d + c + t - data) ** 2 + 1)
        return total

    f = px.expectation(program)
    t = 0.6
    values, grads = many(lambda k: f.value_and_grad(k, t), num=20_000)
    assert_unbiased(values, exact(t), what="value")
    assert_unbiased(grads, jax.grad(exact)(t), what="gradient")


def test_sites_on_different_plates_and_mixing_programs_fall_back_correctly():
    # c (3 elements) and d (2 elements) are different plates; a product mixes c's elements
    def program(t):
        c = px.sample(dist.Bernoulli(logits=jnp.full(3, t)), px.enum).astype(jnp.float32)
        d = px.sample(dist.Bernoulli(logits=jnp.full(2, -t)), px.enum).astype(jnp.float32)
        return jnp.prod(1 + c) + jnp.sum(d * jnp.array([1.0, 3.0]))

    def exact(t):
        p, q = jax.nn.sigmoid(t), jax.nn.sigmoid(-t)
        return (1 + p) ** 3 + q * 4.0

    f = px.expectation(program)
    value, grad = f.value_and_grad(jax.random.key(0), 0.2)
    np.testing.assert_allclose(value, exact(0.2), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(exact)(0.2), rtol=1e-5)


@pytest.mark.parametrize("inside", ["jit", "checkpoint"])
def test_group_inside_a_jitted_or_checkpointed_function(inside):
    data = jnp.array([-0.7, 0.2, 1.1])
    program = chain_program(3, data)
    wrap = jax.jit if inside == "jit" else jax.checkpoint
    f = px.expectation(lambda t: wrap(program)(t) * 2.0)
    exact = exact_joint(3, data)
    value, grad = f.value_and_grad(jax.random.key(0), 0.4)
    np.testing.assert_allclose(value, 2 * exact(0.4), rtol=1e-5)
    np.testing.assert_allclose(grad, 2 * jax.grad(exact)(0.4), rtol=1e-4)


def test_mvd_sites_compose_per_element():
    data = jnp.linspace(-1.0, 1.5, 6)
    f = px.expectation(chain_program(3, data, px.mvd))
    exact = exact_per_element(3, data)
    t = 0.4
    values, grads = many(lambda k: f.value_and_grad(k, t), num=20_000)
    assert_unbiased(values, exact(t), what="value")
    assert_unbiased(grads, jax.grad(exact)(t), what="gradient")


def test_normal_mvd_site_followed_by_an_enumerated_site_on_the_same_plate():
    # c_i ~ N(t, 1) (mvd), d_i ~ Bern(sigmoid(c_i)) (enum):
    # E[Σ_i (d_i - x_i)² + c_i²] = Σ_i [E σ(c)(1 - 2x_i) + x_i²] + n(t² + 1)
    data = jnp.array([0.3, -1.0, 2.0, 0.5])

    def program(t):
        c = px.sample(dist.Normal(jnp.full(4, t), 1.0), px.mvd)
        d = px.sample(dist.Bernoulli(logits=c), px.enum).astype(jnp.float32)
        return jnp.sum((d - data) ** 2 + c**2)

    nodes, w = np.polynomial.hermite_e.hermegauss(80)  # E over N(0, 1)
    w = w / w.sum()

    def mean_sigmoid(t):
        return float(np.sum(w / (1 + np.exp(-(t + nodes)))))

    def exact(t):
        return mean_sigmoid(t) * float(np.sum(1 - 2 * data)) + float(np.sum(data**2)) + 4 * (
            t**2 + 1)

    t, h = 0.3, 1e-4
    exact_grad = (exact(t + h) - exact(t - h)) / (2 * h)
    f = px.expectation(program)
    values, grads = many(lambda k: f.value_and_grad(k, t), num=20_000)
    assert_unbiased(values, exact(t), what="value")
    assert_unbiased(grads, exact_grad, atol=1e-3, what="gradient")


@pytest.mark.parametrize("max_flat", [1, 4, 1024])
def test_flat_and_nested_members_agree(monkeypatch, max_flat):
    # the group's enum members are enumerated in one flat vmap up to MAX_FLAT_SIZE joint
    # values; later ones (here: all but the first 0, 1 or 2) get a vmap of their own
    from ppl_ext.adev import _groups

    monkeypatch.setattr(_groups, "MAX_FLAT_SIZE", max_flat)
    data = jnp.array([-0.7, 0.2, 1.1])
    f = px.expectation(chain_program(3, data))
    exact = exact_joint(3, data)
    value, grad = f.value_and_grad(jax.random.key(0), 0.4)
    np.testing.assert_allclose(value, exact(0.4), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(exact)(0.4), rtol=1e-4)


def test_flat_members_around_a_reinforce_member_with_baselines(monkeypatch):
    # enum c0, c1 (flat), reinforce c2 with per-element baselines (its terms carry the
    # flat members' weights, and so does its baseline), enum c3 (nested: beyond the cap)
    from ppl_ext.adev import _groups

    monkeypatch.setattr(_groups, "MAX_FLAT_SIZE", 4)
    data = jnp.array([-0.7, 0.2, 1.1])
    b = np.array([-4.0, -2.0, -3.0], np.float32)
    estimators = [px.enum, px.enum, px.Reinforce(baseline=b), px.enum]

    def program(t):
        total, prev = 0.0, jnp.zeros(data.shape[0])
        for j, estimator in enumerate(estimators):
            c = px.sample(dist.Bernoulli(logits=0.3 * (j + 1) * t + prev - 0.5), estimator,
                          name=f"c{j}").astype(jnp.float32)
            total = total + jnp.sum(dist.Normal(2 * c - 1 + 0.1 * j, 1.0).log_prob(data))
            prev = c
        return total

    f = px.expectation(program)
    exact = exact_per_element(4, data)
    t = 0.4
    values, grads = many(lambda k: f.value_and_grad(k, t), num=20_000)
    assert_unbiased(values, exact(t), what="value")
    assert_unbiased(grads, jax.grad(exact)(t), what="gradient")


@pytest.mark.parametrize("estimator", [px.enum, px.mvd], ids=["enum", "mvd"])
def test_members_inside_a_jitted_helper(estimator):
    # the first site starts the group; the later ones sit in a jitted helper, whose body
    # the group evaluation follows with tags (no fallback, no re-analysis)
    data = jnp.array([-0.7, 0.2, 1.1])

    @jax.jit
    def helper(prev, t):
        total = 0.0
        for j in (1, 2):
            c = px.sample(dist.Bernoulli(logits=0.3 * (j + 1) * t + prev - 0.5), estimator,
                          name=f"c{j}").astype(jnp.float32)
            total = total + jnp.sum(dist.Normal(2 * c - 1 + 0.1 * j, 1.0).log_prob(data))
            prev = c
        return total

    def program(t):
        c = px.sample(dist.Bernoulli(logits=0.3 * t - 0.5), estimator,
                      name="c0").astype(jnp.float32)
        return jnp.sum(dist.Normal(2 * c - 1, 1.0).log_prob(data)) + helper(c, t)

    f = px.expectation(program)
    exact = exact_joint(3, data)
    if estimator is px.enum:
        value, grad = f.value_and_grad(jax.random.key(0), 0.4)
        np.testing.assert_allclose(value, exact(0.4), rtol=1e-5)
        np.testing.assert_allclose(grad, jax.grad(exact)(0.4), rtol=1e-4)
    else:
        values, grads = many(lambda k: f.value_and_grad(k, 0.4), num=20_000)
        assert_unbiased(values, exact(0.4), what="value")
        assert_unbiased(grads, jax.grad(exact)(0.4), what="gradient")
