"""ppl_ext's correction of NumPyro's Bernoulli/Binomial logits gradients at exactly 0."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from ppl_ext import _numpyro_fixes
from tests.helpers import assert_unbiased, many

LOGITS = jnp.array([-jnp.inf, -30.0, -2.5, -1e-6, 0.0, 1e-6, 0.7, 4.0, 30.0, jnp.inf])


def test_installed_on_import():
    assert _numpyro_fixes._APPLIED
    assert "BinomialLogits.log_prob" in _numpyro_fixes.ORIGINALS


@pytest.mark.parametrize("y", [0.0, 1.0])
def test_bernoulli_values_unchanged_and_gradient_exact(y):
    original = _numpyro_fixes.ORIGINALS["binary_cross_entropy_with_logits"]
    ours = dist.Bernoulli(logits=LOGITS, validate_args=False).log_prob(y)  # with ±inf
    theirs = -original(LOGITS, y)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)  # incl. -inf and 0
    finite = LOGITS[jnp.isfinite(LOGITS)]
    grads = jax.vmap(jax.grad(lambda l: dist.Bernoulli(logits=l).log_prob(y)))(finite)
    np.testing.assert_allclose(grads, y - jax.nn.sigmoid(finite), rtol=1e-5, atol=1e-6)
    assert float(jax.grad(lambda l: dist.Bernoulli(logits=l).log_prob(y))(0.0)) == y - 0.5


@pytest.mark.parametrize("k", [0.0, 1.0, 3.0, 5.0])
def test_binomial_values_unchanged_and_gradient_exact(k):
    finite = LOGITS[jnp.isfinite(LOGITS)]
    d = dist.Binomial(5, logits=finite)
    np.testing.assert_allclose(d.log_prob(k),
                               _numpyro_fixes.ORIGINALS["BinomialLogits.log_prob"](d, k),
                               rtol=1e-5, atol=1e-5)
    grads = jax.vmap(jax.grad(lambda l: dist.Binomial(5, logits=l).log_prob(k)))(finite)
    np.testing.assert_allclose(grads, k - 5 * jax.nn.sigmoid(finite), rtol=1e-5, atol=1e-5)


def test_score_function_gradient_unbiased_at_logit_zero():
    # d/dl E[(b + 1)^2], b ~ Bernoulli(sigmoid(l)), at l = 0: 3 sigmoid'(0) = 0.75
    # (NumPyro's uncorrected log_prob gives 1.25 in expectation).
    @px.expectation
    def f(l):
        return (px.sample(dist.Bernoulli(logits=l), px.reinforce) + 1.0) ** 2

    assert_unbiased(many(lambda key: f.grad(key, 0.0)), 0.75)


def test_numpyro_own_elbo_is_fixed_too():
    # the guide's log q enters TraceGraph_ELBO's score term through the same log_prob
    def model():
        numpyro.sample("b", dist.Bernoulli(0.5))

    def guide():
        numpyro.sample("b", dist.Bernoulli(logits=numpyro.param("l", 0.0)))

    # ELBO = -KL(q || Bernoulli(0.5)); its gradient at q = prior is exactly 0
    loss = numpyro.infer.TraceGraph_ELBO()
    keys = jax.random.split(jax.random.key(0), 2000)
    grads = jax.vmap(lambda k: jax.grad(lambda p: loss.loss(k, p, model, guide))(
        {"l": jnp.asarray(0.0)})["l"])(keys)
    np.testing.assert_allclose(grads, 0.0, atol=1e-6)


# ------------------------------------------ support-check and transform marks (continuity)


def _primitives_of(jaxpr):
    from ppl_ext.adev._analysis import sub_jaxprs

    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive)
        for sub in sub_jaxprs(eqn.params):
            found |= _primitives_of(sub)
    return found


def _trace(fn, *args, inside):
    from ppl_ext.adev._primitives import tracing_expectation

    if not inside:
        return jax.make_jaxpr(fn)(*args).jaxpr
    with tracing_expectation():
        return jax.make_jaxpr(fn)(*args).jaxpr


def test_support_checks_and_transforms_are_marked_only_inside_expectations():
    from numpyro.distributions.transforms import biject_to
    from ppl_ext.adev._analysis import support_check_p, transform_p

    assert _numpyro_fixes.mark_support_checks() is False  # installed on import, once
    assert "Distribution._validate_sample" in _numpyro_fixes.ORIGINALS

    def make():  # a fresh function each time: JAX caches traces by function
        def log_density(z):
            return dist.Gamma(2.0, 1.0).log_prob(jnp.exp(z)) + jnp.sum(
                dist.Dirichlet(jnp.ones(3)).log_prob(biject_to(dist.constraints.simplex)(
                    jnp.stack([z, -z]))))

        return log_density

    log_density = make()
    outside = _primitives_of(_trace(make(), 0.3, inside=False))
    inside = _primitives_of(_trace(make(), 0.3, inside=True))
    assert support_check_p not in outside and transform_p not in outside
    assert support_check_p in inside and transform_p in inside
    # the marks are identities: values and gradients are unchanged
    from ppl_ext.adev._primitives import tracing_expectation

    plain = jax.jit(jax.value_and_grad(log_density))(0.3)
    with tracing_expectation():
        marked = jax.jit(jax.value_and_grad(make()))(0.3)
    np.testing.assert_allclose(plain, marked, rtol=1e-6)


def test_invalid_values_still_get_minus_infinity():
    # the mark records the check; it does not remove it
    @px.expectation
    def f(t):
        z = px.sample(dist.Normal(t, 1.0), px.reinforce, name="z")
        return dist.Exponential(1.0).log_prob(z - 100.0)

    assert float(f.estimate(jax.random.key(0), 0.0)) == -np.inf


def test_bernoulli_log_density_of_reparameterised_logits_passes_the_continuity_check():
    # a VAE decoder: Bernoulli(logits=f(z)).log_prob(x) for a reparameterised z; the
    # isfinite split of the corrected log density only picks the limit at infinite logits
    x = jnp.array([0.0, 1.0, 1.0])

    @px.expectation
    def elbo_term(t):
        z = px.sample(dist.Normal(t, 1.0).expand((3,)).to_event(1), name="z")
        return jnp.sum(dist.Bernoulli(logits=2.0 * z).log_prob(x))

    assert np.isfinite(float(elbo_term.grad(jax.random.key(0), 0.3)))
