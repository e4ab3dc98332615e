"""`Expectation.hvp`: unbiased Hessian-vector products, and the programs it refuses.

Exact Hessians are written without ppl_ext (closed forms of the expectations, or sums over
finite supports, differentiated twice by jax); Monte-Carlo means of NUM_KEYS estimates
must lie within K_SE standard errors of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax

import ppl_ext as px
from tests.helpers import assert_unbiased

K_SE = 4
NUM_KEYS = 10_000
KEYS = jax.random.split(jax.random.key(20261206), NUM_KEYS)


def hvp_samples(f, theta, v, *args):
    return jax.vmap(lambda k: f.hvp(k, theta, *args, v=v))(KEYS)


def exact_hvp(exact, theta, v):
    return jax.jvp(jax.grad(exact), (jnp.asarray(theta),), (jnp.asarray(v),))[1]


def softplus_scale(theta):
    return 0.5 + jax.nn.softplus(theta)


# ----------------------------------------------------------------------- (a) reparam


def test_reparam_fourth_moment_with_moving_scale():
    a = 0.7

    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, softplus_scale(theta)), px.reparam)
        return (x - a) ** 4

    def exact(theta):  # E(x - a)^4 = m^4 + 6 m^2 s^2 + 3 s^4 for x ~ N(theta, s)
        m, s = theta - a, softplus_scale(theta)
        return m**4 + 6 * m**2 * s**2 + 3 * s**4

    theta = 0.3
    assert_unbiased(hvp_samples(f, theta, 1.5), exact_hvp(exact, theta, 1.5), k=K_SE,
                    what="E(x-a)^4")


def test_reparam_exponential_moment():
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, softplus_scale(theta)))
        return jnp.exp(theta * x)

    def exact(theta):  # E exp(t x) = exp(t m + t^2 s^2 / 2) with m = t
        s = softplus_scale(theta)
        return jnp.exp(theta**2 + theta**2 * s**2 / 2)

    theta = 0.4
    assert_unbiased(hvp_samples(f, theta, 1.0), exact_hvp(exact, theta, 1.0), k=K_SE,
                    what="E exp(theta x)")


# --------------------------------------------------------------------- (b) reinforce


def test_reinforce_bernoulli_with_theta_in_f():
    @px.expectation
    def f(theta):
        x = px.sample(dist.Bernoulli(logits=theta), px.reinforce)
        return (x + 1.0) ** 2 * theta

    def exact(theta):
        p = jax.nn.sigmoid(theta)
        return theta * (p * 4.0 + (1 - p) * 1.0)

    assert_unbiased(hvp_samples(f, 0.4, 1.0), exact_hvp(exact, 0.4, 1.0), k=K_SE,
                    what="Bernoulli")


VALUES = jnp.array([1.0, 4.0, -2.0])


def test_reinforce_categorical_with_theta_in_f():
    @px.expectation
    def f(theta):
        x = px.sample(dist.Categorical(logits=theta * jnp.arange(3.0)), px.reinforce)
        return VALUES[x] * theta**2

    def exact(theta):  # explicit sum over the support
        return theta**2 * jnp.dot(jax.nn.softmax(theta * jnp.arange(3.0)), VALUES)

    assert_unbiased(hvp_samples(f, 0.3, -1.0), exact_hvp(exact, 0.3, -1.0), k=K_SE,
                    what="Categorical")


def test_reinforce_poisson():
    @px.expectation
    def f(theta):
        x = px.sample(dist.Poisson(jnp.exp(theta)), px.reinforce).astype(float)
        return x**2 + theta * x

    def exact(theta):  # E x = l, E x^2 = l + l^2
        rate = jnp.exp(theta)
        return rate + rate**2 + theta * rate

    assert_unbiased(hvp_samples(f, 0.2, 1.0), exact_hvp(exact, 0.2, 1.0), k=K_SE,
                    what="Poisson")


@pytest.mark.parametrize("baseline", [4.0, px.RunningAverage(jnp.array(4.0))])
def test_reinforce_scalar_baseline_is_unbiased_and_reduces_variance(baseline):
    def program(estimator):
        @px.expectation
        def f(theta):
            x = px.sample(dist.Normal(theta, jnp.exp(0.3 * theta)), estimator)
            return (x - 3.0) ** 2

        return f

    def exact(theta):
        return (theta - 3.0) ** 2 + jnp.exp(0.6 * theta)

    with_baseline = hvp_samples(program(px.Reinforce(baseline=baseline)), 0.5, 1.0)
    plain = hvp_samples(program(px.reinforce), 0.5, 1.0)
    assert_unbiased(with_baseline, exact_hvp(exact, 0.5, 1.0), k=K_SE, what="baseline")
    assert float(jnp.var(with_baseline)) < float(jnp.var(plain))


# ------------------------------------------------------------------------- (c) mixed


def mixed_program(theta):
    z = px.sample(dist.Normal(theta[0], jnp.exp(theta[1] / 2)), px.reparam)
    b = px.sample(dist.Bernoulli(logits=theta[0] * theta[1] + z), px.reinforce)
    # a branch on the score site's draw is allowed: it does not move with theta
    return jnp.where(b > 0.5, z**2 * theta[1], z * theta[0])


def mixed_exact(theta):
    """E over z ~ N(m, s) of the Bernoulli sum, by Gauss-Hermite quadrature (no ppl_ext)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    nodes, weights = jnp.asarray(nodes), jnp.asarray(weights / weights.sum())
    m, s = theta[0], jnp.exp(theta[1] / 2)
    z = m + s * nodes
    p = jax.nn.sigmoid(theta[0] * theta[1] + z)
    return jnp.sum(weights * (p * z**2 * theta[1] + (1 - p) * z * theta[0]))


def test_mixed_reparam_and_reinforce_non_diagonal_hessian():
    f = px.expectation(mixed_program)
    theta, v = jnp.array([0.3, -0.4]), jnp.array([1.0, -0.5])
    hessian = jax.hessian(mixed_exact)(theta)
    assert abs(float(hessian[0, 1])) > 0.1  # a genuinely non-diagonal Hessian
    assert_unbiased(hvp_samples(f, theta, v), hessian @ v, k=K_SE, what="mixed")


def test_pytree_argument_and_jit_calls_inside():
    @px.expectation
    def f(params, data):
        x = jax.jit(lambda p: px.sample(dist.Normal(p["loc"], jnp.exp(p["log_scale"]))))(
            params)
        return jnp.sum((x - data) ** 2)

    def exact(loc, log_scale):
        return jnp.sum((loc - DATA) ** 2) + 3 * jnp.exp(2 * log_scale)

    params = {"loc": jnp.array(0.2), "log_scale": jnp.array(-0.3)}
    v = {"loc": jnp.array(1.0), "log_scale": jnp.array(2.0)}
    out = jax.vmap(lambda k: f.hvp(k, params, DATA, v=v))(KEYS)
    hessian = jax.hessian(exact, argnums=(0, 1))(params["loc"], params["log_scale"])
    for i, name in enumerate(("loc", "log_scale")):
        target = hessian[i][0] * v["loc"] + hessian[i][1] * v["log_scale"]
        assert_unbiased(out[name], target, k=K_SE, what=name)


DATA = jnp.array([0.5, -1.0, 2.0])


# -------------------------------------------------------------------- (d) refusals


def normal_draw(theta):
    return px.sample(dist.Normal(theta, 1.0))


UNSOUND = {
    "abs": (lambda t: jnp.abs(normal_draw(t)), "'abs'"),
    "relu": (lambda t: jax.nn.relu(normal_draw(t)), "custom_jvp function 'relu'"),
    "max": (lambda t: jnp.maximum(normal_draw(t), 0.0), "'max'"),
    "where-on-draw": (lambda t: jnp.where(normal_draw(t) > 0, 1.0, -1.0),
                      "select .* whose predicate moves"),
    "clip": (lambda t: jnp.clip(normal_draw(t), -1.0, 1.0), "'(clamp|max|min)'"),
    "argmax": (lambda t: jnp.array([1.0, 2.0])[
        jnp.argmax(jnp.stack([normal_draw(t), 0.5]))], "'argmax'"),
    "sqrt-of-square": (lambda t: jnp.sqrt(normal_draw(t) ** 2), "'sqrt'.*not proven"),
    "floor": (lambda t: jnp.floor(normal_draw(t)), "'floor'"),
    "where-on-stopped-draw": (
        lambda t: (lambda x: jnp.where(lax.stop_gradient(x) > 0, x, 0.0))(
            px.sample(dist.Normal(t, 1.0), px.Reparam(allow_discontinuous=True))),
        "select .* whose predicate moves"),
    "where-on-theta": (lambda t: jnp.where(t > 0, t, 0.0) * normal_draw(0.0),
                       "select .* whose predicate moves"),
    "softmax-where": (lambda t: jax.nn.softmax(
        jnp.stack([normal_draw(t), t]), where=jnp.stack([normal_draw(t) > 0, True]))[0],
        "predicate moves"),
    "leave-one-out": (lambda t: px.sample(dist.Normal(t, 1.0), px.LeaveOneOut(3)) ** 2,
                      "LeaveOneOut has no proved second-order"),
    "enum": (lambda t: px.sample(dist.Bernoulli(logits=t), px.enum).astype(float),
             "Enum has no proved second-order"),
    "mvd": (lambda t: px.sample(dist.Normal(t, 1.0), px.mvd) ** 2,
            "MVD has no proved second-order"),
    "implicit-reparam": (lambda t: px.sample(dist.Gamma(jnp.exp(t), 1.0)),
                         "'random_gamma'.*reparameterised sampler"),
    "clamped-log-density": (
        lambda t: px.sample(dist.Geometric(probs=jax.nn.sigmoid(t))).astype(float),
        "log density"),
    "per-element-baseline": (
        lambda t: jnp.sum(px.sample(dist.Normal(t, 1.0).expand((2,)),
                                    px.Reinforce(baseline=jnp.zeros(2)))),
        "per-element Reinforce baseline"),
    "site-in-while": (lambda t: lax.while_loop(lambda c: c[1] < 2, lambda c: (
        c[0] + normal_draw(t), c[1] + 1), (0.0, 0))[0], "'while'"),
    "site-in-cond": (lambda t: lax.cond(True, normal_draw, lambda s: s, t), "'cond'"),
    "custom-jvp": (lambda t: _straight_through(normal_draw(t)), "'_straight_through'"),
    "custom-vjp": (lambda t: _vjp_square(normal_draw(t)), "'custom_vjp_call'"),
    "kink-inside-jit": (lambda t: jax.jit(jnp.abs)(normal_draw(t)), "'abs'.*inside 'abs'"),
    "kink-in-scan-body": (lambda t: lax.scan(lambda c, _: (jnp.abs(c) * t, None),
                                             normal_draw(t), None, length=3)[0], "'abs'"),
    "while-on-draw": (lambda t: (lambda x: lax.while_loop(
        lambda c: c[0] < x, lambda c: (c[0] + 1.0, c[1] * 2.0), (0.0, 1.0))[1])(
            normal_draw(t)), "while_loop whose condition moves"),
    "isfinite-guard": (lambda t: (lambda x: jnp.where(jnp.isfinite(jnp.log(x)), jnp.log(x),
                                                      0.0))(normal_draw(t)),
                       "predicate moves"),
    "int-cast": (lambda t: normal_draw(t).astype(jnp.int32).astype(float), "cast from"),
    "asin-branch-point": (lambda t: jnp.arcsin(1.0 - normal_draw(t) ** 2), "'asin'"),
    "bessel-i0e": (lambda t: jax.scipy.special.i0e(normal_draw(t)), "'bessel_i0e'"),
    # an isfinite guard inside a jit body: the body's input may be -inf or NaN (log x)
    "isfinite-guard-in-jit": (lambda t: jax.jit(
        lambda u: jnp.where(jnp.isfinite(u), u, 0.0))(jnp.log(normal_draw(t))),
        "predicate moves"),
    "bernoulli-logits-may-be-infinite": (lambda t: dist.Bernoulli(
        logits=jnp.log(normal_draw(t))).log_prob(1.0), "predicate moves"),
    "support-check-unchecked-site": (lambda t: dist.Exponential(1.0).log_prob(px.sample(
        dist.Normal(t, 1.0), px.Reparam(allow_discontinuous=True))),
        "support check .* allow_discontinuous"),
}


@jax.custom_vjp
def _vjp_square(x):
    return x**2


_vjp_square.defvjp(lambda x: (x**2, x), lambda x, g: (2 * x * g,))


@jax.custom_jvp
def logaddexp(x, y):  # a user's function named like a trusted one, with a wrong rule
    return jnp.logaddexp(x, y)


@logaddexp.defjvp
def _logaddexp_jvp(primals, tangents):
    return logaddexp(*primals), tangents[0]


UNSOUND["logsumexp-sign"] = (
    lambda t: jax.nn.logsumexp(jnp.stack([normal_draw(t), 0.0]),
                               b=jnp.array([1.0, -1.0]), return_sign=True)[1], "'sign'")
UNSOUND["custom-jvp-named-like-trusted"] = (lambda t: logaddexp(normal_draw(t), 0.0),
                                            "custom_jvp function 'logaddexp'")


@jax.custom_jvp
def _straight_through(x):
    return x**2


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    return primals[0] ** 2, tangents[0]  # a derivative rule that is not the derivative


@pytest.mark.parametrize("name", sorted(UNSOUND))
def test_unsound_programs_are_refused_by_name(name):
    program, pattern = UNSOUND[name]
    f = px.expectation(program)
    with pytest.raises(px.SecondOrderError, match=pattern):
        f.hvp(jax.random.key(0), 0.3, v=1.0)


def test_nested_expectation_is_refused():
    inner = px.expectation(normal_draw)
    f = px.expectation(lambda t: inner(t) ** 2)
    with pytest.raises(px.SecondOrderError, match="nested expectation"):
        f.hvp(jax.random.key(0), 0.3, v=1.0)


def test_refusal_names_site_and_source_line():
    f = px.expectation(lambda t: jnp.abs(px.sample(dist.Normal(t, 1.0), name="z")))
    with pytest.raises(px.SecondOrderError, match=r"sample site 'z'.*test_hvp\.py"):
        f.hvp(jax.random.key(0), 0.3, v=1.0)


def test_first_order_refusals_still_apply():
    """`.hvp` leaves numpyro's support masks to the first-order continuity check, which
    refuses this one: Exponential's support check on a Normal draw switches at 0."""
    f = px.expectation(lambda t: dist.Exponential(1.0).log_prob(normal_draw(t)))
    with pytest.raises(px.UnsupportedEstimatorError, match="support check of Exponential"):
        f.hvp(jax.random.key(0), 0.3, v=1.0)
    g = px.expectation(lambda t: lax.cond(normal_draw(t) > 0, lambda: 1.0, lambda: 0.0))
    with pytest.raises(px.SecondOrderError, match="cast from bool"):
        g.hvp(jax.random.key(0), 0.3, v=1.0)


def test_elbo_with_validated_log_densities():
    """An ELBO: guide z ~ N(m, exp(r)) (reparam), Bernoulli likelihood with logits 2z,
    N(0, 1) prior; numpyro's support checks and ppl_ext's Bernoulli log density are in
    the program. Exact: Gauss-Hermite quadrature of E log sigmoid(2z) plus closed forms."""

    @px.expectation
    def elbo(theta):
        guide = dist.Normal(theta[0], jnp.exp(theta[1]))
        z = px.sample(guide)
        return (dist.Bernoulli(logits=2.0 * z).log_prob(1.0) + dist.Normal(0.0, 1.0)
                .log_prob(z) - guide.log_prob(z))

    def exact(theta):
        m, s = theta[0], jnp.exp(theta[1])
        nodes, weights = np.polynomial.hermite_e.hermegauss(80)
        z = m + s * jnp.asarray(nodes)
        likelihood = jnp.sum(jnp.asarray(weights / weights.sum()) * jax.nn.log_sigmoid(2 * z))
        prior = -0.5 * jnp.log(2 * jnp.pi) - 0.5 * (m**2 + s**2)
        entropy = 0.5 * jnp.log(2 * jnp.pi * jnp.e) + theta[1]
        return likelihood + prior + entropy

    theta, v = jnp.array([0.4, -0.3]), jnp.array([1.0, 2.0])
    assert_unbiased(hvp_samples(elbo, theta, v), jax.hessian(exact)(theta) @ v, k=K_SE,
                    what="ELBO")


def test_non_moving_kinks_are_accepted():
    """A kink in a draw whose law does not move, or in data, is not a moving kink."""

    @px.expectation
    def f(theta, data):
        eps = px.sample(dist.Normal(0.0, 1.0))  # does not move with theta
        return jnp.abs(eps) * theta**2 + jnp.maximum(data, 0.0) * theta**3

    def exact(theta):
        return jnp.sqrt(2 / jnp.pi) * theta**2 + 2.0 * theta**3

    assert_unbiased(hvp_samples(f, 0.7, 1.0, jnp.array(2.0)), exact_hvp(exact, 0.7, 1.0),
                    k=K_SE, what="fixed kinks")


def test_smooth_library_functions_are_accepted():
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, 1.0))
        return jax.nn.logsumexp(jnp.stack([x, 0.0])) + jnp.sqrt(jnp.exp(theta) + x**2)

    value = f.hvp(jax.random.key(0), 0.3, v=1.0)
    assert np.isfinite(float(value))


def test_smooth_loops_and_checkpoint_are_accepted():
    @px.expectation
    def f(theta):  # x · theta^3 by a scan, then checkpointed: E = theta^4
        x = jax.checkpoint(lambda t: px.sample(dist.Normal(t, 1.0)))(theta)
        return x * lax.scan(lambda c, _: (c * theta, None), 1.0, None, length=3)[0]

    assert_unbiased(hvp_samples(f, 0.6, 1.0), 12 * 0.6**2, k=K_SE, what="scan")


def test_sites_inside_scan():
    """x_t = x_{t-1} + N(theta, 1) (reparam), b_t ~ Bernoulli(logits=theta) (reinforce),
    value sum_t x_t² + b_t theta² x_t: E = sum_t (t² θ² + t) + θ² σ(θ) sum_t t θ."""

    @px.expectation
    def f(theta):
        def step(x, _):
            x = x + px.sample(dist.Normal(theta, 1.0))
            b = px.sample(dist.Bernoulli(logits=theta), px.reinforce)
            return x, x**2 + b * theta**2 * x

        return jnp.sum(lax.scan(step, 0.0, None, length=3)[1])

    def exact(theta):
        t = jnp.arange(1.0, 4.0)
        return jnp.sum(t**2 * theta**2 + t) + theta**2 * jax.nn.sigmoid(theta) * jnp.sum(
            t * theta)

    assert_unbiased(hvp_samples(f, 0.3, 1.0), exact_hvp(exact, 0.3, 1.0), k=K_SE,
                    what="scan")
    # the scan's draws are those of `estimate` (keys split per iteration alike)
    key = jax.random.key(1)
    g = px.expectation(lambda t: lax.scan(
        lambda c, _: (c + px.sample(dist.Normal(t, 1.0)), None), 0.0, None,
        length=3)[0] * t**2)
    # d²/dt² [(3t + e) t²] = 18 t + 2 e, with e the sum of the three noises
    noise = (float(g.hvp(key, 0.5, v=1.0)) - 18 * 0.5) / 2
    assert float(g.estimate(key, 0.5)) == pytest.approx((1.5 + noise) * 0.25, rel=1e-4)


def test_sqrt_of_visibly_positive_value_by_quadrature():
    @px.expectation
    def f(theta):
        x = px.sample(dist.Normal(theta, jnp.exp(0.5 * theta)))
        return jnp.sqrt(x**2 + 1.0)

    def exact(theta):  # Gauss-Hermite quadrature of E sqrt(x^2 + 1), no ppl_ext
        nodes, weights = np.polynomial.hermite_e.hermegauss(80)
        x = theta + jnp.exp(0.5 * theta) * jnp.asarray(nodes)
        return jnp.sum(jnp.asarray(weights / weights.sum()) * jnp.sqrt(x**2 + 1.0))

    assert_unbiased(hvp_samples(f, 0.2, 1.0), exact_hvp(exact, 0.2, 1.0), k=K_SE,
                    what="sqrt(x^2 + 1)")


@pytest.mark.parametrize("point", [(2.0, 0.7), (1.0, 1.0), (-0.5, 0.3)])
def test_trusted_custom_jvp_functions_have_exact_second_derivatives(point):
    """`.hvp` trusts these custom-JVP functions by name: JAX's rules, differentiated
    twice, must give the closed-form Hessians (logaddexp also where its branch switches)."""
    x, y = point
    a = jnp.array(point)
    xlogy = jax.hessian(lambda a: jax.scipy.special.xlogy(a[0], a[1]))(a)
    np.testing.assert_allclose(xlogy, [[0, 1 / y], [1 / y, -x / y**2]], rtol=1e-5)
    xlog1py = jax.hessian(lambda a: jax.scipy.special.xlog1py(a[0], a[1]))(a)
    np.testing.assert_allclose(xlog1py, [[0, 1 / (1 + y)], [1 / (1 + y), -x / (1 + y) ** 2]],
                               rtol=1e-5)
    p = 1 / (1 + np.exp(y - x))  # d² logaddexp = p (1 - p) [[1, -1], [-1, 1]]
    logaddexp = jax.hessian(lambda a: jnp.logaddexp(a[0], a[1]))(a)
    np.testing.assert_allclose(logaddexp, p * (1 - p) * np.array([[1, -1], [-1, 1]]),
                               rtol=1e-5, atol=1e-6)


def test_jax_hessian_of_estimate_still_refused_and_points_to_hvp():
    f = px.expectation(normal_draw)
    with pytest.raises(px.SecondOrderError, match=r"\.hvp"):
        jax.hessian(f.estimate, argnums=1)(jax.random.key(0), 0.3)


def test_third_derivatives_are_refused():
    f = px.expectation(lambda t: px.sample(dist.Normal(t, 1.0)) ** 4)
    with pytest.raises(px.SecondOrderError, match="derivative of an .hvp estimate"):
        jax.grad(lambda t: f.hvp(jax.random.key(0), t, v=1.0))(0.3)
    with pytest.raises(px.SecondOrderError, match="derivative of an .hvp estimate"):
        jax.jvp(lambda w: f.hvp(jax.random.key(0), 0.3, v=w), (1.0,), (1.0,))


# ------------------------------------------------------------- (e) first order unchanged


def test_grad_unchanged_by_hvp_and_same_draws():
    f = px.expectation(mixed_program)
    theta, key = jnp.array([0.3, -0.4]), jax.random.key(3)
    before = f.grad(key, theta)
    estimate = f.estimate(key, theta)
    f.hvp(key, theta, v=jnp.ones(2))
    np.testing.assert_array_equal(f.grad(key, theta), before)
    assert np.isfinite(float(estimate))


def test_hvp_sees_the_draws_of_estimate():
    """Same key, same draws: with x = t + eps, d²/dt² [x t² + 3 b] = 6 t + 2 eps reveals
    the reparameterised noise, which must be the one `estimate` used (two sites, so the
    key is split as the first-order interpreter splits it)."""

    @px.expectation
    def g(t):
        x = px.sample(dist.Normal(t, 1.0))
        b = px.sample(dist.Bernoulli(logits=0.0), px.reinforce)
        return x * t**2 + 3.0 * b

    t = 0.8
    for seed in range(3):
        key = jax.random.key(seed)
        eps = (float(g.hvp(key, t, v=1.0)) - 6 * t) / 2
        bernoulli = (float(g.estimate(key, t)) - (t + eps) * t**2) / 3.0
        assert min(abs(bernoulli), abs(bernoulli - 1.0)) < 1e-4


# ------------------------------------------------------------ (f) transforms and input


def test_jit_and_vmap_over_keys():
    f = px.expectation(mixed_program)
    theta, v = jnp.array([0.3, -0.4]), jnp.array([1.0, -0.5])
    keys = KEYS[:8]
    vmapped = jax.vmap(lambda k: f.hvp(k, theta, v=v))(keys)
    jitted = jax.jit(lambda k, t, w: f.hvp(k, t, v=w))
    for i in range(3):
        np.testing.assert_allclose(jitted(keys[i], theta, v), vmapped[i], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(f.hvp(keys[i], theta, v=v), vmapped[i], rtol=1e-5,
                                   atol=1e-6)


def test_bad_input_is_refused():
    f = px.expectation(mixed_program)
    key, theta = jax.random.key(0), jnp.array([0.3, -0.4])
    with pytest.raises(ValueError, match="shape"):
        f.hvp(key, theta, v=jnp.ones(3))
    with pytest.raises(ValueError, match="structure"):
        f.hvp(key, theta, v={"a": jnp.ones(2)})
    with pytest.raises(TypeError, match="one argument"):
        f.hvp(key, theta, v=jnp.ones(2), argnums=(1,))
    with pytest.raises(ValueError, match="argnums=0"):
        f.hvp(key, theta, v=jnp.ones(2), argnums=0)
    with pytest.raises(TypeError, match="floating-point"):
        f.hvp(key, jnp.array([1, 2]), v=jnp.ones(2))
    with pytest.raises(TypeError, match="PRNG key"):
        f.hvp(0, theta, v=jnp.ones(2))
    vector = px.expectation(lambda t: px.sample(dist.Normal(t, 1.0)) * jnp.ones(2))
    with pytest.raises(px.ObjectiveShapeError, match="scalar"):
        vector.hvp(key, 0.3, v=1.0)


def test_differentiates_only_argnums():
    @px.expectation
    def f(a, b):
        x = px.sample(dist.Normal(a * b, 1.0))
        return x**2

    # E = a^2 b^2 + 1: d²/db² = 2 a^2 (deterministic given the reparam path)
    assert float(f.hvp(jax.random.key(0), 1.5, 0.7, v=1.0, argnums=2)) == pytest.approx(
        2 * 1.5**2, rel=1e-5)
    assert float(f.hvp(jax.random.key(0), 1.5, 0.7, v=1.0)) == pytest.approx(
        2 * 0.7**2, rel=1e-5)


# ------------------------------------------------------------- causal magic boxes


def _causal_program(estimator):
    @px.expectation
    def f(theta):
        x1 = px.sample(dist.Normal(theta[0], 1.0), estimator)
        x2 = px.sample(dist.Normal(theta[1] + x1, 1.0), estimator)
        x3 = px.sample(dist.Normal(theta[0] * theta[1], 1.0), estimator)  # free of x1, x2
        return x1**2 + 2.0 * x2 + x1 * x2 + jnp.sin(x3) + 10.0 + theta[1] ** 3

    return f


def _causal_exact(theta):
    # E[x1²] = θ0² + 1, E[x2] = θ1 + θ0, E[x1 x2] = θ0 θ1 + θ0² + 1, E[sin x3] = sin(θ0 θ1) e^{-1/2}
    return (theta[0] ** 2 + 1 + 2.0 * (theta[1] + theta[0]) + theta[0] * theta[1]
            + theta[0] ** 2 + 1 + jnp.sin(theta[0] * theta[1]) * jnp.exp(-0.5) + 10.0
            + theta[1] ** 3)


def test_causal_surrogate_is_unbiased_and_scores_only_dependent_terms():
    """Top-level score sites without baselines: each additive term carries the magic
    boxes of the sites it depends on only (the `10.0`, `theta[1]**3` and `sin(x3)` terms
    do not multiply the scores of x1 and x2). Unbiased against the closed-form Hessian
    (10^4 estimates, K_SE = 4) and with far less variance than the whole-value surrogate
    (a zero scalar baseline keeps that one: same estimator as before)."""
    theta, v = jnp.array([0.3, -0.7]), jnp.array([1.0, 0.5])
    causal = hvp_samples(_causal_program(px.reinforce), theta, v)
    whole = hvp_samples(_causal_program(px.Reinforce(baseline=0.0)), theta, v)
    exact = exact_hvp(_causal_exact, theta, v)
    assert_unbiased(causal, exact, k=K_SE, what="causal")
    assert_unbiased(whole, exact, k=K_SE, what="whole value")
    assert float(jnp.sum(jnp.var(causal, 0))) < 0.25 * float(jnp.sum(jnp.var(whole, 0)))
