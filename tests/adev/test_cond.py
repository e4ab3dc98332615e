"""`lax.cond` on a draw: gradients of vmapped expectations, and the continuity check.

An expectation is a `jax.custom_jvp` whose rule is `jax.jvp` of surrogate mode; under
`jax.vmap` a cond on a batched predicate becomes a select whose operands (tangents
included) JAX wraps in `stop_gradient`, which `jax.grad` must then transpose (JAX issues
#22011, #39219). `jax.grad` of a vmapped mean is what `px.numpyro.ELBO(num_particles=2)`
computes. Exact values are closed forms (`jax.scipy.stats.norm`), differentiated by
`jax.grad`; means of 10^4 estimates within K_SE = 4 standard errors.
"""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest
from jax import lax
from jax.scipy.stats import norm

import ppl_ext as px
from tests.helpers import NUM_ESTIMATES, assert_unbiased

THETA = 0.3
NUM_PARTICLES = 2


def grads_of_vmapped_means(f, theta=THETA, seed=0):
    """`NUM_ESTIMATES` independent `jax.grad` of a mean over `NUM_PARTICLES` vmapped calls."""
    keys = jax.random.split(jax.random.key(seed), NUM_ESTIMATES * NUM_PARTICLES)
    keys = keys.reshape(NUM_ESTIMATES, NUM_PARTICLES)

    def one(ks):
        return jax.grad(lambda p: jnp.mean(jax.vmap(lambda k: f(k, p))(ks)))(theta)

    return jax.jit(jax.vmap(one))(keys)


def _exact_normal_cond(theta):
    # x ~ N(theta, 1): E[cond(x > 0, x + theta², 2 theta)]
    #   = E[x; x > 0] + theta² P(x > 0) + 2 theta P(x <= 0)
    p = norm.cdf(theta)
    return theta * p + norm.pdf(theta) + theta**2 * p + 2.0 * theta * (1.0 - p)


NORMAL_ESTIMATORS = {
    "reinforce": px.reinforce,
    "reinforce_baseline": px.Reinforce(baseline=0.5),
    "mvd": px.mvd,
    "leave_one_out": px.LeaveOneOut(3),
}


@pytest.mark.parametrize("name", NORMAL_ESTIMATORS)
def test_grad_of_vmap_through_a_cond_on_a_draw(name):
    estimator = NORMAL_ESTIMATORS[name]

    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, 1.0), estimator)
        return lax.cond(x > 0, lambda x: x + theta**2, lambda x: 2.0 * theta, x)

    assert_unbiased(grads_of_vmapped_means(f), jax.grad(_exact_normal_cond)(THETA),
                    what=f"{name}: grad of vmap")


def test_grad_of_vmap_through_a_cond_on_an_enumerated_draw():
    @px.expectation
    def f(theta):
        c = px.sample(dist.Bernoulli(logits=theta), px.enum)
        return lax.cond(c > 0.5, lambda: jnp.sin(theta), lambda: theta**2)

    def exact(theta):
        p = jax.nn.sigmoid(theta)
        return p * jnp.sin(theta) + (1.0 - p) * theta**2

    assert_unbiased(grads_of_vmapped_means(f), jax.grad(exact)(THETA), what="enum")


def test_grad_of_vmap_through_a_cond_with_sites_in_its_branches():
    # the interpreter's cond rule (sites inside the branches) under grad of vmap
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, 1.0), px.reinforce)
        return lax.cond(x > 0, lambda: px.sample(dist.Normal(theta, 1.0)) ** 2,
                        lambda: theta)

    def exact(theta):
        p = norm.cdf(theta)
        return p * (theta**2 + 1.0) + (1.0 - p) * theta

    assert_unbiased(grads_of_vmapped_means(f), jax.grad(exact)(THETA), what="branch sites")


def test_grad_of_vmap_agrees_with_vmap_of_grad_key_for_key():
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, 1.0), px.reinforce)
        return lax.cond(x > 0, lambda x: x + theta**2, lambda x: 2.0 * theta, x)

    keys = jax.random.split(jax.random.key(1), 8)
    outer = jax.grad(lambda p: jnp.mean(jax.vmap(lambda k: f(k, p))(keys)))(THETA)
    inner = jnp.mean(jax.vmap(lambda k: jax.grad(lambda p: f(k, p))(THETA))(keys))
    assert jnp.allclose(outer, inner, rtol=1e-5, atol=1e-6)


# ---------------------------------- continuity: draws whose law has no parameters


def _fixed_law_cond(theta):
    eps = px.sample(dist.Normal(0.0, 1.0), name="eps")  # reparameterised, law fixed
    return lax.cond(eps > 0, lambda: theta**2, lambda: jnp.sin(theta))


def test_a_cond_on_a_draw_from_a_fixed_law_is_accepted_and_unbiased():
    f = px.expectation(_fixed_law_cond)
    exact = lambda t: 0.5 * t**2 + 0.5 * jnp.sin(t)  # noqa: E731
    assert_unbiased(grads_of_vmapped_means(f), jax.grad(exact)(THETA), what="fixed law")


def test_fixed_laws_through_chains_wrappers_and_constants_are_accepted():
    loc = jnp.zeros(3)  # a concrete array closed over: nothing differentiates it

    def chained(theta):
        eps = px.sample(dist.Normal(0.0, 1.0))
        y = px.sample(dist.Normal(eps, 1.0))  # its law depends on a fixed-law draw only
        return jnp.where(y > 0, theta, 2.0 * theta)

    def expanded(theta):
        eps = px.sample(dist.Normal(loc, 1.0).to_event(1))
        return jnp.sum(jnp.where(eps > 0, theta, 1.0)) + jnp.floor(eps[0]) * theta

    def smooth_in_a_moving_draw(theta):
        eps = px.sample(dist.Normal(0.0, 1.0))
        z = px.sample(dist.Normal(theta, 1.0))  # moves, and stays continuous
        return lax.cond(eps > 0, lambda z: z**2, lambda z: z, z)

    for program, exact in [
        (chained, lambda t: 1.5 * t),
        # 3 (t + 1) / 2, and E[floor(eps)] = -1/2 (floor(z) + floor(-z) = -1, symmetry)
        (expanded, lambda t: 1.5 * (t + 1.0) - 0.5 * t),
        (smooth_in_a_moving_draw, lambda t: 0.5 * (t**2 + 1.0) + 0.5 * t),
    ]:
        f = px.expectation(program)
        assert_unbiased(grads_of_vmapped_means(f), jax.grad(exact)(THETA),
                        what=program.__name__)


REFUSED = {
    # the law depends on theta: the draw moves, and the branch switches as it does
    "law_moves": lambda t: lax.cond(px.sample(dist.Normal(t, 1.0)) > 0,
                                    lambda: 1.0, lambda: 0.0),
    # a fixed law, but the place of the jump moves with theta
    "jump_moves": lambda t: lax.cond(px.sample(dist.Normal(0.0, 1.0)) > t,
                                     lambda: 1.0, lambda: 0.0),
    "shifted": lambda t: jnp.where(px.sample(dist.Normal(0.0, 1.0)) + t > 0, 1.0, 0.0),
    "remainder": lambda t: jnp.remainder(px.sample(dist.Normal(0.0, 1.0)), t),
    # a law that depends on theta through an earlier pathwise draw
    "chain_moves": lambda t: jnp.where(
        px.sample(dist.Normal(px.sample(dist.Normal(t, 1.0)), 1.0)) > 0, 1.0, 0.0),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_jump_that_moves_is_still_refused(name):
    f = px.expectation(REFUSED[name])
    with pytest.raises(px.UnsupportedEstimatorError, match="discontinuous"):
        f.grad(jax.random.key(0), THETA)


def test_the_refusal_under_grad_of_vmap_is_the_same():
    f = px.expectation(REFUSED["law_moves"])
    with pytest.raises(px.UnsupportedEstimatorError, match="discontinuous"):
        jax.grad(lambda p: jnp.mean(jax.vmap(lambda k: f(k, p))(
            jax.random.split(jax.random.key(0), 2))))(THETA)


def test_a_jump_in_theta_alone_is_refused_when_it_moves_a_fixed_law_draw():
    # E[1{eps > theta}] = 1 - Phi(theta) has derivative -phi(theta); the pathwise
    # estimate would be 0: exactly the bias the check exists for
    f = px.expectation(REFUSED["jump_moves"])
    with pytest.raises(px.UnsupportedEstimatorError, match="lax.cond"):
        f.grad(jax.random.key(0), THETA)


def test_an_untaken_branch_passes_on_no_nan():
    # sqrt(eps) is NaN where eps < 0, in the branch that is not taken there: as for plain
    # JAX code, jax.grad of the vmapped mean is finite and equals vmap of jax.grad
    @px.expectation
    def f(theta):
        eps = px.sample(dist.Normal(0.0, 1.0))
        return lax.cond(eps > 0, lambda e: jnp.sqrt(e) * theta, lambda e: theta, eps)

    keys = jax.random.split(jax.random.key(2), 16)
    outer = jax.grad(lambda p: jnp.mean(jax.vmap(lambda k: f(k, p))(keys)))(THETA)
    inner = jnp.mean(jax.vmap(lambda k: jax.grad(lambda p: f(k, p))(THETA))(keys))
    assert jnp.isfinite(outer)
    assert jnp.allclose(outer, inner, rtol=1e-5, atol=1e-6)
    # E[sqrt(eps); eps > 0] = 2^(1/4) Gamma(3/4) / (2 sqrt(pi)), plus P(eps <= 0) = 1/2
    exact = 2.0**0.25 * jnp.exp(jax.scipy.special.gammaln(0.75)) / (2.0 * jnp.sqrt(jnp.pi))
    assert_unbiased(grads_of_vmapped_means(f), exact + 0.5, what="sqrt branch")


def test_a_cond_inside_a_jitted_function_under_grad_of_vmap():
    # a cond in a call without sites is JAX's to batch: its tangents do reach JAX's rule
    @jax.jit
    def branchy(x, theta):
        return lax.cond(x > 0, lambda x: x + theta**2, lambda x: 2.0 * theta, x)

    @px.expectation
    def f(theta):
        return branchy(px.sample(dist.Normal(theta, 1.0), px.reinforce), theta)

    assert_unbiased(grads_of_vmapped_means(f), jax.grad(_exact_normal_cond)(THETA),
                    what="jitted cond")
