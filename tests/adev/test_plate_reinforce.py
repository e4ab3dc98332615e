"""Several plate-batched score-function sites in one program, with enum and mvd sites.

`px.reinforce` sites on a plate are Rao-Blackwellised per element by the plate-group
evaluation of the user's program (`_groups.py`), as later members of a group started by
any site on that plate: element i's score multiplies element i's term only. Means of
2·10^4 estimates are compared with brute-force sums over every joint value of every
element (written in plain JAX, without ppl_ext) within K_SE standard errors.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import assert_unbiased, many

DATA = jnp.array([-0.7, 0.2, 1.1])
THETA = jnp.array([0.4, -0.3, 0.8])


@pytest.fixture
def no_reanalysis(monkeypatch):
    """Fail if an estimator re-analyses the interpreted continuation (`_separated`), and
    record the verdicts of the plate-group evaluations started by reinforce sites."""
    from ppl_ext.adev import _estimators, _groups

    verdicts = []
    original = _groups.reinforce_group

    def spy(*args):
        try:
            result = original(*args)
        except _groups.NotSeparable:
            verdicts.append(False)
            raise
        verdicts.append(True)
        return result

    assert not hasattr(_estimators, "_separated")  # nothing left to re-analyse with
    monkeypatch.setattr(_groups, "reinforce_group", spy)
    return verdicts


def chain_program(data, estimators):
    """Bernoulli sites on one plate; site j's logits depend on site j-1 per element."""

    def program(t):
        total, prev = 0.0, jnp.zeros(data.shape[0])
        for j, estimator in enumerate(estimators):
            c = px.sample(dist.Bernoulli(logits=0.3 * (j + 1) * t + prev - 0.5), estimator,
                          name=f"c{j}").astype(jnp.float32)
            total = total + jnp.sum(dist.Normal(2 * c - 1 + 0.1 * j, 1.0).log_prob(data))
            prev = c
        return total

    return program


def chain_exact(data, m):
    """E[chain_program] by brute force over every joint value of all m·n entries."""
    n = data.shape[0]
    configs = np.array(list(itertools.product([0.0, 1.0], repeat=m * n)),
                       np.float32).reshape(-1, m, n)

    def value(t):
        log_p, term, prev = 0.0, 0.0, 0.0
        for j in range(m):
            c = configs[:, j, :]
            logit = 0.3 * (j + 1) * t + prev - 0.5
            log_p = log_p + c * jax.nn.log_sigmoid(logit) + (1 - c) * jax.nn.log_sigmoid(-logit)
            term = term + jax.scipy.stats.norm.logpdf(data, 2 * c - 1 + 0.1 * j, 1.0)
            prev = c
        return jnp.sum(jnp.exp(jnp.sum(log_p, -1)) * jnp.sum(term, -1))

    return value


@pytest.mark.parametrize("estimators", [
    (px.reinforce, px.reinforce, px.reinforce),
    (px.enum, px.reinforce, px.reinforce),
    (px.reinforce, px.mvd, px.reinforce),
    (px.mvd, px.reinforce, px.enum),
], ids=["reinforce x3", "enum-reinforce-reinforce", "reinforce-mvd-reinforce",
        "mvd-reinforce-enum"])
def test_chains_of_plate_sites_against_brute_force(estimators, no_reanalysis):
    f = px.expectation(chain_program(DATA, estimators))
    exact = chain_exact(DATA, len(estimators))
    values, grads = many(lambda k: f.value_and_grad(k, THETA), num=20_000)
    assert_unbiased(values, exact(THETA), what="value")
    assert_unbiased(grads, jax.grad(exact)(THETA), what="gradient")
    # a reinforce site that starts the program starts a group; later ones are members
    assert no_reanalysis == ([True] if estimators[0] is px.reinforce else [])


def mixed_program(data):
    """enum, reinforce and mvd Bernoulli sites, a reinforce Normal site whose law depends
    on them per element, and a reinforce Bernoulli site independent of them."""

    def program(t):
        c0 = px.sample(dist.Bernoulli(logits=t), px.enum).astype(jnp.float32)
        c1 = px.sample(dist.Bernoulli(logits=c0 - t), px.reinforce).astype(jnp.float32)
        c2 = px.sample(dist.Bernoulli(logits=0.5 + c1 * t), px.mvd).astype(jnp.float32)
        w = px.sample(dist.Bernoulli(logits=-t), px.reinforce).astype(jnp.float32)
        z = px.sample(dist.Normal(c2 + 0.5 * t, 1.0), px.reinforce)
        return jnp.sum((c0 + c1 - data) ** 2 - (z - data) ** 2 + w * data)

    return program


def mixed_exact(data):
    n = data.shape[0]
    configs = np.array(list(itertools.product([0.0, 1.0], repeat=3 * n)),
                       np.float32).reshape(-1, 3, n)

    def bern(c, logit):
        return c * jax.nn.log_sigmoid(logit) + (1 - c) * jax.nn.log_sigmoid(-logit)

    def value(t):
        c0, c1, c2 = configs[:, 0], configs[:, 1], configs[:, 2]
        log_p = bern(c0, t) + bern(c1, c0 - t) + bern(c2, 0.5 + c1 * t)
        # E[(z - x)²] with z ~ N(c2 + t/2, 1) is (c2 + t/2 - x)² + 1; E[w] = sigmoid(-t)
        term = (c0 + c1 - data) ** 2 - ((c2 + 0.5 * t - data) ** 2 + 1)
        return (jnp.sum(jnp.exp(jnp.sum(log_p, -1)) * jnp.sum(term, -1))
                + jnp.sum(jax.nn.sigmoid(-t) * data))

    return value


def test_mixed_enum_mvd_reinforce_sites_on_one_plate(no_reanalysis):
    f = px.expectation(mixed_program(DATA))
    exact = mixed_exact(DATA)
    values, grads = many(lambda k: f.value_and_grad(k, THETA), num=20_000)
    assert_unbiased(values, exact(THETA), what="value")
    assert_unbiased(grads, jax.grad(exact)(THETA), what="gradient")
    assert no_reanalysis == []  # the enum site starts the group; the others are members


def test_a_group_of_reinforce_sites_is_rao_blackwellised_per_element():
    # 12 elements, 3 sites (the first starts the group, the others are its members): each
    # element's scores multiply its own terms instead of the sum of 12 elements' terms
    data = jnp.linspace(-1.5, 2.0, 12)
    theta = jnp.linspace(-0.5, 0.5, 12)
    exact = jax.grad(lambda t: jnp.sum(jax.vmap(
        lambda x, ti: chain_exact(x[None], 3)(ti[None]))(data, t)))(theta)
    variances = {}
    for name, estimator in [("per element", px.reinforce),
                            ("whole", px.Reinforce(rao_blackwellise=False))]:
        f = px.expectation(chain_program(data, (estimator,) * 3))
        grads = many(lambda k: f.grad(k, theta), num=20_000)
        assert_unbiased(grads, exact, what=name)
        variances[name] = float(np.sum(np.var(np.asarray(grads, np.float64), axis=0)))
    assert variances["per element"] < 0.3 * variances["whole"], variances


def test_per_element_baselines_of_a_member_and_a_scalar_baseline_refused():
    n = DATA.shape[0]
    b = np.linspace(-3.0, -1.0, n).astype(np.float32)
    f = px.expectation(chain_program(DATA, (px.enum, px.Reinforce(baseline=b))))
    exact = chain_exact(DATA, 2)
    grads = many(lambda k: f.grad(k, THETA), num=20_000)
    assert_unbiased(grads, jax.grad(exact)(THETA), what="per-element baseline")
    scalar = px.expectation(chain_program(DATA, (px.enum, px.Reinforce(baseline=-2.0))))
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"c1.*scalar Reinforce baseline.*shape \(3,\)"):
        scalar.grad(jax.random.key(0), THETA)


def test_a_member_whose_draws_mix_the_elements_falls_back_unbiased(no_reanalysis):
    # the product couples c1's elements: no per-element split, whole-objective scores
    def program(t):
        c0 = px.sample(dist.Bernoulli(logits=t), px.reinforce).astype(jnp.float32)
        c1 = px.sample(dist.Bernoulli(logits=c0 - t), px.reinforce).astype(jnp.float32)
        return jnp.sum(c0 * DATA) + jnp.prod(1.0 + c1)

    n = DATA.shape[0]
    configs = np.array(list(itertools.product([0.0, 1.0], repeat=2 * n)),
                       np.float32).reshape(-1, 2, n)

    def exact(t):
        c0, c1 = configs[:, 0], configs[:, 1]
        log_p = (c0 * jax.nn.log_sigmoid(t) + (1 - c0) * jax.nn.log_sigmoid(-t)
                 + c1 * jax.nn.log_sigmoid(c0 - t) + (1 - c1) * jax.nn.log_sigmoid(t - c0))
        term = jnp.sum(c0 * DATA, -1) + jnp.prod(1.0 + c1, -1)
        return jnp.sum(jnp.exp(jnp.sum(log_p, -1)) * term)

    f = px.expectation(program)
    grads = many(lambda k: f.grad(k, THETA), num=20_000)
    assert_unbiased(grads, jax.grad(exact)(THETA))
    assert no_reanalysis == [False, False]


def test_calls_and_loops_with_sites_after_the_plate_site(no_reanalysis):
    # after the plate sites: a jitted helper holding a member site (followed into its body
    # with tags), and a scan and a cond holding local sites that do not depend on the
    # plate (run as outside a group): every reinforce site is still scored per element
    @jax.jit
    def helper(c0, t):
        c1 = px.sample(dist.Bernoulli(logits=c0 - t), px.reinforce, name="c1")
        return jnp.sum((c0 + c1.astype(jnp.float32) - DATA) ** 2)

    def program(t):
        c0 = px.sample(dist.Bernoulli(logits=t), px.reinforce, name="c0").astype(jnp.float32)
        total = helper(c0, t)

        def step(carry, _):
            z = px.sample(dist.Normal(jnp.sum(t), 1.0), name="z")
            return carry + z, None

        zs, _ = jax.lax.scan(step, 0.0, None, length=2)
        w = jax.lax.cond(jnp.sum(t) > 0, lambda: px.sample(dist.Normal(1.0, 1.0)),
                         lambda: px.sample(dist.Normal(-1.0, 1.0)))
        return total + zs + w

    n = DATA.shape[0]
    configs = np.array(list(itertools.product([0.0, 1.0], repeat=2 * n)),
                       np.float32).reshape(-1, 2, n)

    def exact(t):
        c0, c1 = configs[:, 0], configs[:, 1]
        log_p = (c0 * jax.nn.log_sigmoid(t) + (1 - c0) * jax.nn.log_sigmoid(-t)
                 + c1 * jax.nn.log_sigmoid(c0 - t) + (1 - c1) * jax.nn.log_sigmoid(t - c0))
        term = jnp.sum((c0 + c1 - DATA) ** 2, -1)
        w = jnp.where(jnp.sum(t) > 0, 1.0, -1.0)
        return jnp.sum(jnp.exp(jnp.sum(log_p, -1)) * term) + 2 * jnp.sum(t) + w

    f = px.expectation(program)
    values, grads = many(lambda k: f.value_and_grad(k, THETA), num=20_000)
    assert_unbiased(values, exact(THETA), what="value")
    assert_unbiased(grads, jax.grad(exact)(THETA), what="gradient")
    assert no_reanalysis == [True]
