"""Plate factorisation: per-element enumeration, MVD and Rao-Blackwellised REINFORCE.

When the rest of the program is a sum of per-element terms along a site's batch axis,
px.enum enumerates each element on its own, px.mvd perturbs all elements at once, and
px.reinforce scores each element against its own term only. Enumeration is exact, so programs without other randomness have deterministic estimates:
they are compared with closed forms (or with joint enumeration) to float32 precision.
Programs with other randomness are checked statistically (k = 4 standard errors).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import assert_unbiased, many

KEY = jax.random.key(0)


def value_and_grad(program, *args):
    return px.expectation(program).value_and_grad(KEY, *args)


def assert_close(a, b, rtol=2e-5, atol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- programs with closed forms

def test_elementwise_sum_many_elements():
    theta = jnp.linspace(-2.0, 2.0, 1000)

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum)
        return jnp.sum((c + 1.0) ** 2 * t)

    def exact(t):
        p = jax.nn.sigmoid(t)
        return jnp.sum(p * 4.0 * t + (1.0 - p) * t)

    assert_close(value_and_grad(program, theta), jax.value_and_grad(exact)(theta), rtol=1e-4)


def test_gather_mixture_log_likelihood_in_a_plate():
    # Σ_i E_{c_i}[log N(x_i; centres[c_i], 1)] with a categorical c_i per point (numpyro plate)
    x = jnp.linspace(-3.0, 3.0, 300)

    def program(params):
        logits, centres = params
        with numpyro.plate("points", x.shape[0]):
            c = px.sample(dist.Categorical(logits=logits), px.enum)
        return jnp.sum(dist.Normal(centres[c], 1.0).log_prob(x)) / x.shape[0]

    def exact(params):
        logits, centres = params
        p = jax.nn.softmax(logits, axis=-1)
        return jnp.sum(p * dist.Normal(centres, 1.0).log_prob(x[:, None])) / x.shape[0]

    params = (jnp.sin(jnp.arange(900.0)).reshape(300, 3), jnp.array([-1.0, 0.5, 2.0]))
    assert_close(value_and_grad(program, params), jax.value_and_grad(exact)(params))


def test_event_dims_enumerated_jointly_per_element_through_a_matmul():
    # h_i ∈ {0,1}^3 per element (to_event(1)), objective Σ_i log σ(w·h_i + b_i): 8 values
    # per element, 50 elements (8^50 joint values)
    num = 50
    w = jnp.array([0.7, -1.2, 0.4])
    bias = jnp.linspace(-1.0, 1.0, num)
    configs = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))

    def program(logits):
        h = px.sample(dist.Bernoulli(logits=logits).to_event(1), px.enum)
        return jnp.sum(jax.nn.log_sigmoid(h @ w + bias))  # log_sigmoid is a custom_jvp

    def exact(logits):
        log_q = jnp.sum(dist.Bernoulli(logits=logits[:, None, :]).log_prob(configs), -1)
        f = jax.nn.log_sigmoid(configs @ w + bias[:, None])  # (num, 8)
        return jnp.sum(jnp.exp(log_q) * f)

    logits = jnp.cos(jnp.arange(3.0 * num)).reshape(num, 3)
    assert_close(value_and_grad(program, logits), jax.value_and_grad(exact)(logits))


def test_nested_jit_linear_combinations_and_plain_terms():
    def per_point(c, t):
        return jnp.where(c > 0, jnp.log1p(t**2), -t)

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum)
        terms = jax.jit(per_point)(c, t)
        # mean, scaling, a subtraction of two sums, and a term without c
        return 0.5 * jnp.mean(terms) - jnp.sum(terms[::1] * 0.1) + jnp.sum(t) ** 2

    def exact(t):
        p = jax.nn.sigmoid(t)
        e = p * jnp.log1p(t**2) + (1.0 - p) * (-t)
        return 0.5 * jnp.mean(e) - 0.1 * jnp.sum(e) + jnp.sum(t) ** 2

    theta = jnp.linspace(-1.5, 1.0, 40)
    assert_close(value_and_grad(program, theta), jax.value_and_grad(exact)(theta))


# ------------------------------------------------------- agreement with joint enumeration

PROGRAMS = {
    "reduce over a non-local axis first": lambda c, t: jnp.sum(
        jnp.sum(jnp.stack([c * t, c + t], axis=1) ** 2, axis=1)),
    "transpose and reshape": lambda c, t: jnp.sum(
        jnp.reshape(jnp.sum(jnp.transpose(jnp.outer(c, t[:3])), axis=0), (5, 1)) * 0.3),
    "softplus (custom_jvp), where, take": lambda c, t: jnp.sum(
        jax.nn.softplus(jnp.where(c > 0, t, -t)) + jnp.take(jnp.array([1.0, 3.0]),
                                                             c.astype(jnp.int32))),
    "cumsum along a non-local axis": lambda c, t: jnp.sum(
        jnp.cumsum(jnp.stack([c, t, c * t], axis=1), axis=1) ** 2),
    "broadcast against a plain matrix": lambda c, t: jnp.sum(
        jnp.tanh(c[:, None] * jnp.ones((1, 4)) + t[:, None])),
    "concatenate along a non-local axis": lambda c, t: jnp.sum(
        jnp.concatenate([c[:, None], (t * c)[:, None]], axis=1) ** 3),
}


@pytest.fixture
def factorised_calls(monkeypatch):
    """Record, per site, whether it was evaluated per element.

    A plate-batched enum, mvd or reinforce site tries the group evaluation on the user's
    program (`_groups.py`); if that does not apply, its estimator evaluates the site
    jointly (enum, mvd) or scores the whole value (reinforce). One entry per site: the
    group's verdict.
    """
    from ppl_ext.adev import _estimators, _groups

    assert not hasattr(_estimators, "_separated")  # no re-analysis of generated code
    calls = []

    def group_spy(original_group):
        def wrapped(*args):
            try:
                result = original_group(*args)
            except _groups.NotSeparable:
                calls.append(False)
                raise
            calls.append(True)
            return result

        return wrapped

    monkeypatch.setattr(_groups, "enumerate_group", group_spy(_groups.enumerate_group))
    monkeypatch.setattr(_groups, "mvd_group", group_spy(_groups.mvd_group))
    monkeypatch.setattr(_groups, "reinforce_group", group_spy(_groups.reinforce_group))
    return calls


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_factorised_equals_joint_enumeration(name, factorised_calls):
    body = PROGRAMS[name]
    theta = jnp.array([0.3, -0.8, 1.1, 0.0, -0.2])

    def factorised(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum) * 1.0
        return body(c, t)

    def forced_joint(t):  # `0 · prod(c)` combines the elements: joint enumeration
        c = px.sample(dist.Bernoulli(logits=t), px.enum) * 1.0
        return body(c, t) + 0.0 * jnp.prod(c + 1.0)

    ours = value_and_grad(factorised, theta)
    assert factorised_calls == [True]
    reference = value_and_grad(forced_joint, theta)
    assert factorised_calls == [True, False]
    assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_non_separable_small_site_falls_back_to_joint_enumeration(factorised_calls):
    theta = jnp.array([0.4, -0.3, 0.9])

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum) * 1.0
        return jnp.max(c * t) + jnp.prod(c + 1.0)

    def exact(t):
        total = 0.0
        for cs in itertools.product([0.0, 1.0], repeat=3):
            cs = jnp.array(cs)
            p = jnp.exp(jnp.sum(dist.Bernoulli(logits=t).log_prob(cs)))
            total += p * (jnp.max(cs * t) + jnp.prod(cs + 1.0))
        return total

    assert_close(value_and_grad(program, theta), jax.value_and_grad(exact)(theta))
    assert factorised_calls == [False]


def test_vector_valued_output_per_element_is_enumerated_jointly():
    theta = jnp.array([0.4, -0.3])

    def program(t):
        return px.sample(dist.Bernoulli(logits=t), px.enum) * 2.0

    estimate = px.expectation(program).estimate(KEY, theta)
    np.testing.assert_allclose(estimate, 2.0 * jax.nn.sigmoid(theta), rtol=1e-6)


MIXING = {  # each combines different elements; none may be evaluated per element
    "square of the sum": lambda c, t: jnp.sum(c * t) ** 2,
    "logsumexp over elements": lambda c, t: jax.nn.logsumexp(c * t),
    "reversed": lambda c, t: jnp.sum(c[::-1] * t),
    "rolled": lambda c, t: jnp.sum(jnp.roll(c, 1) * t),
    "sorted": lambda c, t: jnp.sum(jnp.sort(c * t) * jnp.arange(3.0)),
    "cumsum along the elements": lambda c, t: jnp.sum(jnp.cumsum(c) * t),
    "matrix product over the elements": lambda c, t: jnp.sum(
        jnp.tanh(jnp.array([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]]) @ c)),
    "permuted by a gather": lambda c, t: jnp.sum(c[jnp.array([2, 0, 1])] * t),
    "branch on the sum": lambda c, t: jnp.where(jnp.sum(c) > 1.5, jnp.sum(t), 0.0),
    "partial slice": lambda c, t: jnp.sum(c[1:] * t[:2]) + jnp.sum(c * t),
    "product of two sums": lambda c, t: jnp.sum(c) * jnp.sum(c * t),
}


@pytest.mark.parametrize("name", list(MIXING))
def test_programs_that_mix_elements_are_enumerated_jointly(name, factorised_calls):
    """A wrong per-element split would give a silently biased value and gradient."""
    body = MIXING[name]
    theta = jnp.array([0.4, -0.7, 1.2])

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum) * 1.0
        return body(c, t)

    def exact(t):
        total = 0.0
        for cs in itertools.product([0.0, 1.0], repeat=3):
            cs = jnp.array(cs)
            total += jnp.exp(jnp.sum(dist.Bernoulli(logits=t).log_prob(cs))) * body(cs, t)
        return total

    assert_close(value_and_grad(program, theta), jax.value_and_grad(exact)(theta),
                 rtol=1e-4, atol=1e-5)
    assert factorised_calls == [False]


# ------------------------------------------------------------ with other random choices

def test_later_reparameterised_draw_independent_of_the_site():
    theta = jnp.array([0.5, -1.0, 0.2, 1.5])

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum)
        z = px.sample(dist.Normal(jnp.sum(t), 1.0))
        return jnp.sum(c * t) + z**2

    def exact(t):
        return jnp.sum(jax.nn.sigmoid(t) * t) + jnp.sum(t) ** 2 + 1.0

    f = px.expectation(program)
    assert_unbiased(many(lambda k: f.grad(k, theta)), jax.grad(exact)(theta))


def test_later_draw_that_depends_on_the_site_uses_joint_enumeration():
    theta = jnp.array([0.5, -1.0, 0.2])

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t), px.enum) * 1.0
        z = px.sample(dist.Normal(jnp.sum(c), 1.0))  # couples the elements
        return z**2

    def exact(t):  # E[z²] = Var + mean² = 1 + E[(Σc)²]
        p = jax.nn.sigmoid(t)
        return 1.0 + jnp.sum(p * (1 - p)) + jnp.sum(p) ** 2

    f = px.expectation(program)
    assert_unbiased(many(lambda k: f.grad(k, theta)), jax.grad(exact)(theta))


# ------------------------------------------------------------------------ in an ELBO

def test_elbo_of_a_mixture_with_hundreds_of_enumerated_assignments():
    rng = np.random.default_rng(0)
    num = 400
    points = jnp.asarray(np.where(rng.integers(0, 2, num) == 1, 2.0, -2.0)
                         + rng.normal(size=num), jnp.float32)

    def mixture(x):
        centres = numpyro.sample("centres", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        with numpyro.plate("points", x.shape[0]):
            c = numpyro.sample("c", dist.Bernoulli(probs=0.5))
            numpyro.sample("x", dist.Normal(centres[c.astype(jnp.int32)], 1.0), obs=x)

    def guide(x):
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
        numpyro.sample("centres", dist.Normal(loc, 0.5).to_event(1))
        with numpyro.plate("points", x.shape[0]):
            numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("logits", jnp.zeros(num))))

    params = {"loc": jnp.array([-1.0, 1.0]), "logits": jnp.asarray(0.3 * rng.normal(size=num),
                                                                     jnp.float32)}
    loss = px.numpyro.ELBO(estimators={"c": px.enum})
    grads = many(lambda k: jax.grad(lambda p: -loss.loss(k, p, mixture, guide, points))(
        params)["logits"], num=2000)
    # exact d ELBO / d logit_i (the only noise left is the draw of the centres)
    q = jax.nn.sigmoid(params["logits"])
    expected_sq = (points[:, None] - params["loc"]) ** 2 + 0.25
    exact = q * (1 - q) * (0.5 * expected_sq[:, 0] - 0.5 * expected_sq[:, 1] - params["logits"])
    assert_unbiased(grads, exact)


# ------------------------------------------------------------ mvd and reinforce per element

W3 = jnp.array([0.7, -1.2, 0.4])
CONFIGS3 = jnp.array(list(itertools.product([0.0, 1.0], repeat=3)))


def _bernoulli_matmul(estimator):
    def program(logits):
        h = px.sample(dist.Bernoulli(logits=logits).to_event(1), estimator) * 1.0
        return jnp.sum(jax.nn.log_sigmoid(h @ W3 + jnp.arange(logits.shape[0]) * 0.1))

    return program


def _bernoulli_matmul_exact(logits):
    log_q = jnp.sum(dist.Bernoulli(logits=logits[:, None, :]).log_prob(CONFIGS3), -1)
    f = jax.nn.log_sigmoid(CONFIGS3 @ W3 + jnp.arange(logits.shape[0])[:, None] * 0.1)
    return jnp.sum(jnp.exp(log_q) * f)


@pytest.mark.parametrize("estimator", [px.mvd, px.reinforce], ids=["mvd", "reinforce"])
def test_mvd_and_reinforce_per_element_unbiased(estimator, factorised_calls):
    logits = jnp.cos(jnp.arange(3.0 * 6)).reshape(6, 3)
    f = px.expectation(_bernoulli_matmul(estimator))
    grads = many(lambda k: f.grad(k, logits))
    assert factorised_calls == [True]
    assert_unbiased(grads, jax.grad(_bernoulli_matmul_exact)(logits))


def test_rao_blackwellised_reinforce_has_much_lower_variance():
    logits = jnp.cos(jnp.arange(3.0 * 40)).reshape(40, 3)
    per_element = px.expectation(_bernoulli_matmul(px.reinforce))
    whole = px.expectation(_bernoulli_matmul(px.Reinforce(rao_blackwellise=False)))
    g_rb = many(lambda k: per_element.grad(k, logits), num=4000)
    g_whole = many(lambda k: whole.grad(k, logits), num=4000)
    exact = jax.grad(_bernoulli_matmul_exact)(logits)
    assert_unbiased(g_rb, exact)
    assert_unbiased(g_whole, exact)
    # each element's score multiplies its own term instead of the sum of 40 terms
    assert float(jnp.sum(jnp.var(g_rb, 0))) < 0.1 * float(jnp.sum(jnp.var(g_whole, 0)))


def test_mvd_per_element_costs_a_few_evaluations():
    # 2000 elements: the element-by-element MVD would evaluate the program 2001 times
    logits = jnp.linspace(-2.0, 2.0, 2000)
    weights = jnp.linspace(0.5, 1.5, 2000)
    f = px.expectation(lambda t: jnp.sum(
        (px.sample(dist.Bernoulli(logits=t), px.mvd) + 1.0) ** 2 * weights))
    jaxpr = jax.make_jaxpr(lambda k, t: f.grad(k, t))(KEY, logits)
    biggest = max(v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars
                  if hasattr(v.aval, "size"))
    assert biggest < 10 * 2000  # no (2001, 2000) intermediate
    # Bernoulli MVD is exact here: d/dt_i = sigmoid'(t_i) (k(1) - k(0)) = sigmoid'(t_i) 3 w_i
    exact = jax.grad(lambda t: jnp.sum((3.0 * jax.nn.sigmoid(t) + 1.0) * weights))(logits)
    np.testing.assert_allclose(f.grad(KEY, logits), exact, rtol=1e-4, atol=1e-5)


def test_reinforce_on_a_non_separable_program_stays_unbiased(factorised_calls):
    theta = jnp.array([0.4, -0.3, 0.9])

    def program(t):
        c = px.sample(dist.Bernoulli(logits=t)) * 1.0  # default estimator: reinforce
        return jnp.prod(c + 1.0) * jnp.sum(t)

    def exact(t):
        p = jax.nn.sigmoid(t)
        return jnp.prod(p + 1.0) * jnp.sum(t)

    f = px.expectation(program)
    assert_unbiased(many(lambda k: f.grad(k, theta)), jax.grad(exact)(theta))
    assert factorised_calls == [False]
