"""Unbiasedness catalogue: programs with closed-form expectations and gradients.

Each case is checked with NUM_ESTIMATES (10^4) value and gradient estimates, whose means
must lie within K_SE = 4 standard errors of the exact values (false-failure rate: see
tests/conftest.py). Exact values are written independently of ppl_ext (closed forms, or
explicit sums over finite supports differentiated by jax.grad).
"""

import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax
from jax.scipy.stats import norm

import ppl_ext as px
from tests.helpers import assert_unbiased, many


class Case(NamedTuple):
    name: str
    program: Callable  # theta -> value, written with px.sample
    exact: Callable  # theta -> E[program(theta)], differentiable by jax.grad
    theta: float = 0.3
    forward_only: bool = False  # while_loop: reverse mode is not defined by JAX itself


def scale(theta):
    return 0.5 + theta**2


def bernoulli_exact(values_fn, logits_fn):
    def exact(theta):
        p = jax.nn.sigmoid(logits_fn(theta))
        return p * values_fn(theta, 1.0) + (1 - p) * values_fn(theta, 0.0)

    return exact


NORMAL_ESTIMATORS = {
    "reparam": px.reparam,
    "reinforce": px.reinforce,
    "reinforce_baseline": px.Reinforce(baseline=5.0),
    "mvd": px.mvd,
    "leave_one_out": px.LeaveOneOut(4),
}
DISCRETE_ESTIMATORS = {
    "reinforce": px.reinforce,
    "reinforce_baseline": px.Reinforce(baseline=1.0),
    "enum": px.enum,
    "mvd": px.mvd,
    "leave_one_out": px.LeaveOneOut(3),
}
CATEGORY_VALUES = jnp.array([1.0, 4.0, -2.0])
CATEGORY_LOGITS = jnp.array([1.0, 2.0, -1.0])


def cases() -> list[Case]:
    out = []
    for name, est in NORMAL_ESTIMATORS.items():
        out.append(Case(
            f"normal_loc_scale-{name}",
            lambda t, est=est: (px.sample(dist.Normal(t, scale(t)), est) - 3.0) ** 2,
            lambda t: (t - 3.0) ** 2 + scale(t) ** 2,
        ))
    for name, est in DISCRETE_ESTIMATORS.items():
        out.append(Case(
            f"bernoulli-{name}",
            lambda t, est=est: (px.sample(dist.Bernoulli(logits=2 * t), est) + 1.0) ** 2 * t,
            bernoulli_exact(lambda t, b: (b + 1.0) ** 2 * t, lambda t: 2 * t),
        ))
        out.append(Case(
            f"categorical-{name}",
            lambda t, est=est: CATEGORY_VALUES[
                px.sample(dist.Categorical(logits=t * CATEGORY_LOGITS), est)
            ],
            lambda t: jnp.dot(jax.nn.softmax(t * CATEGORY_LOGITS), CATEGORY_VALUES),
        ))
    for name in ["reinforce", "mvd", "leave_one_out"]:
        est = DISCRETE_ESTIMATORS[name]
        out.append(Case(
            f"poisson-{name}",
            lambda t, est=est: px.sample(dist.Poisson(jnp.exp(t)), est).astype(float) ** 2,
            lambda t: jnp.exp(t) + jnp.exp(2 * t),
        ))
    # implicit reparameterisation (numpyro's differentiable Gamma/Beta/Dirichlet samplers)
    out += [
        Case("gamma-reparam", lambda t: px.sample(dist.Gamma(t, 1.0)) ** 2,
             lambda t: t * (t + 1), theta=1.5),
        Case("gamma-reinforce", lambda t: px.sample(dist.Gamma(t, 1.0), px.reinforce) ** 2,
             lambda t: t * (t + 1), theta=1.5),
        Case("beta-reparam", lambda t: px.sample(dist.Beta(t, 2.0)),
             lambda t: t / (t + 2.0), theta=1.5),
        Case("dirichlet-reparam",
             lambda t: px.sample(dist.Dirichlet(jnp.stack([t, 1.0, 2.0])))[0],
             lambda t: t / (t + 3.0), theta=1.5),
        Case("exponential-reinforce",
             lambda t: px.sample(dist.Exponential(jnp.exp(t)), px.reinforce) ** 2,
             lambda t: 2 * jnp.exp(-2 * t)),
    ]
    # several estimators mixed in one program
    def mixed(t):
        b = px.sample(dist.Bernoulli(logits=t), px.enum)
        x = px.sample(dist.Normal(t * b + 1.0, 1.0), px.reinforce)
        c = px.sample(dist.Poisson(jnp.exp(t)), px.mvd)
        y = px.sample(dist.Normal(t, 1.0))  # reparam by default
        return x**2 + c + y * x

    def mixed_exact(t):
        p = jax.nn.sigmoid(t)
        return p * ((t + 1) ** 2 + t * (t + 1)) + (1 - p) * (t + 1) + 1 + jnp.exp(t)

    out.append(Case("mixed-enum-reinforce-mvd-reparam", mixed, mixed_exact))
    # branches that depend on discrete draws
    for name, est in DISCRETE_ESTIMATORS.items():
        def branchy(t, est=est):
            b = px.sample(dist.Bernoulli(logits=t), est)
            return lax.cond(
                b == 1,
                lambda: px.sample(dist.Normal(t, 1.0)) ** 2,
                lambda: px.sample(dist.Normal(2 * t, 1.0), px.reinforce),
            )

        out.append(Case(f"cond_on_discrete-{name}", branchy,
                        bernoulli_exact(lambda t, b: b * (t**2 + 1) + (1 - b) * 2 * t,
                                        lambda t: t)))

    def switch3(t):
        c = px.sample(dist.Categorical(logits=t * CATEGORY_LOGITS), px.enum)
        return lax.switch(c, [lambda: t + 0.0,
                              lambda: px.sample(dist.Normal(t, 1.0), px.reinforce) ** 2,
                              lambda: px.sample(dist.Normal(t, 2.0)) * 3.0])

    def switch3_exact(t):
        p = jax.nn.softmax(t * CATEGORY_LOGITS)
        return p[0] * t + p[1] * (t**2 + 1) + p[2] * 3 * t

    out.append(Case("switch_with_enum", switch3, switch3_exact))

    # loops: the scan example from the issue (exact gradient 4 at theta = 0.5)
    for name, est in [("reparam", px.reparam), ("reinforce", px.reinforce),
                      ("reinforce_baseline", px.Reinforce(baseline=2.0))]:
        def scanned(t, est=est):
            def body(c, _):
                return c + px.sample(dist.Normal(t, 1.0), est), None
            return lax.scan(body, 0.0, length=2)[0] ** 2

        out.append(Case(f"scan_sum_square-{name}", scanned, lambda t: 2 + 4 * t**2,
                        theta=0.5))

        def fori(t, est=est):
            return lax.fori_loop(
                0, 3, lambda i, c: c + px.sample(dist.Normal(t * i, 1.0), est), 0.0) ** 2

        out.append(Case(f"fori_loop-{name}", fori, lambda t: 3 + 9 * t**2))

        def while_(t, est=est):
            def body(c):
                i, s = c
                return i + 1, s + px.sample(dist.Normal(t, 1.0), est)
            return lax.while_loop(lambda c: c[0] < 3, body, (0, 0.0))[1] ** 2

        out.append(Case(f"while_loop-{name}", while_, lambda t: 3 + 9 * t**2,
                        forward_only=True))

    def scan_discrete(t):
        def body(c, x):
            b = px.sample(dist.Bernoulli(logits=t * x), px.Reinforce(baseline=0.5))
            return c + b * x, None
        return lax.scan(body, 0.0, jnp.arange(1.0, 4.0))[0]

    out.append(Case("scan_bernoulli_reinforce", scan_discrete,
                    lambda t: jnp.sum(jax.nn.sigmoid(t * jnp.arange(1.0, 4.0))
                                      * jnp.arange(1.0, 4.0))))

    def nested_scan(t):
        def outer(c, _):
            inner = lax.scan(lambda s, _: (s + px.sample(dist.Normal(t, 1.0)), None),
                             0.0, length=2)[0]
            return c + inner, None
        return lax.scan(outer, 0.0, length=2)[0] ** 2

    out.append(Case("nested_scan-reparam", nested_scan, lambda t: 4 + 16 * t**2))

    # nested jit, jax.nn (custom_jvp) functions of draws, stop_gradient
    def jitted(t):
        x = jax.jit(lambda s: px.sample(dist.Normal(s, 1.0), px.reinforce))(t)
        b = jax.jit(lambda s: px.sample(dist.Bernoulli(logits=s), px.enum))(t)
        return jax.nn.relu(x) + b

    out.append(Case("nested_jit-relu", jitted,
                    lambda t: t * norm.cdf(t) + norm.pdf(t) + jax.nn.sigmoid(t)))
    for name, est in [("reparam", px.reparam), ("reinforce", px.reinforce),
                      ("mvd", px.mvd)]:
        out.append(Case(f"relu-{name}",
                        lambda t, est=est: jax.nn.relu(px.sample(dist.Normal(t, 1.0), est)),
                        lambda t: t * norm.cdf(t) + norm.pdf(t)))
    out.append(Case(
        "sigmoid_of_bernoulli-enum",
        lambda t: jax.nn.sigmoid(3.0 * px.sample(dist.Bernoulli(logits=t), px.enum) - t),
        bernoulli_exact(lambda t, b: jax.nn.sigmoid(3.0 * b - t), lambda t: t)))
    out.append(Case(
        "stop_gradient",
        lambda t: (px.sample(dist.Normal(t, 1.0)) - lax.stop_gradient(t)) ** 2 + t,
        lambda t: 1.0 + t))  # d/dt E[(x - c)^2]|_{c = t} = 0
    out.append(Case(
        "stop_gradient-reinforce",
        lambda t: (px.sample(dist.Normal(t, 1.0), px.reinforce) - lax.stop_gradient(t)) ** 2,
        lambda t: 1.0 + 0 * t))

    # batch-shaped sites (.expand, plates) and to_event
    a = jnp.arange(1.0, 4.0)
    for name, est in [("reparam", px.reparam), ("reinforce", px.reinforce),
                      ("mvd", px.mvd)]:
        out.append(Case(
            f"batch_normal-{name}",
            lambda t, est=est: jnp.sum(px.sample(dist.Normal(t * a, 1.0), est) ** 2),
            lambda t: jnp.sum((t * a) ** 2 + 1)))
        out.append(Case(
            f"expand_to_event-{name}",
            lambda t, est=est: jnp.prod(
                px.sample(dist.Normal(t, 1.0).expand((3,)).to_event(1), est)),
            lambda t: t**3))

    def bern_batch_exact(t):
        ps = jax.nn.sigmoid(t * a)
        total = 0.0
        for combo in itertools.product([0.0, 1.0], repeat=3):
            c = jnp.array(combo)
            total += jnp.prod(jnp.where(c == 1, ps, 1 - ps)) * jnp.sum(c) ** 2
        return total

    for name in ["reinforce", "enum", "mvd", "leave_one_out"]:
        est = DISCRETE_ESTIMATORS[name]
        out.append(Case(
            f"batch_bernoulli-{name}",
            lambda t, est=est: jnp.sum(
                px.sample(dist.Bernoulli(logits=t * a), est)).astype(float) ** 2,
            bern_batch_exact))
    out.append(Case(
        "plate_numpyro_expand-enum",
        lambda t: jnp.sum(
            px.sample(dist.Bernoulli(logits=t).expand((2,)), px.enum) * jnp.array([1.0, 2.0])
        ) ** 2,
        # E[(b1 + 2 b2)^2] = p + 4p + 4p^2 for iid b ~ Bernoulli(p)
        lambda t: (lambda p: 5 * p + 4 * p**2)(jax.nn.sigmoid(t))))

    # nested expectations: an inner expectation is an unbiased sample of its value
    @px.expectation
    def inner_reinforce(t):
        return px.sample(dist.Normal(t, 1.0), px.reinforce) ** 2

    @px.expectation
    def inner_enum(t):
        return px.sample(dist.Bernoulli(logits=t), px.enum) * 3.0

    out.append(Case(
        "nested_expectation",
        lambda t: px.sample(dist.Normal(t, 1.0)) + 2.0 * inner_reinforce(t) + inner_enum(t),
        lambda t: t + 2 * (t**2 + 1) + 3 * jax.nn.sigmoid(t)))

    def nested_in_scan(t):
        return lax.scan(lambda c, _: (c + inner_reinforce(t), None), 0.0, length=3)[0]

    out.append(Case("nested_expectation_in_scan", nested_in_scan, lambda t: 3 * (t**2 + 1)))
    return out


CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unbiased(case: Case):
    f = px.expectation(case.program)
    theta = jnp.asarray(case.theta)
    exact_value = case.exact(theta)
    exact_grad = jax.grad(case.exact)(theta)
    if case.forward_only:
        def one(key):
            return jax.jvp(lambda t: f(key, t), (theta,), (jnp.ones_like(theta),))
    else:
        def one(key):
            return f.value_and_grad(key, theta)
    values, grads = many(one)
    assert values.shape == grads.shape == (values.shape[0],)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    assert_unbiased(values, exact_value, what=f"{case.name} value")
    assert_unbiased(grads, exact_grad, what=f"{case.name} gradient")
    # the estimate itself (value mode, no surrogate) is unbiased too
    assert_unbiased(many(lambda k: f.estimate(k, theta), seed=1), exact_value,
                    what=f"{case.name} estimate")


def test_exact_examples_are_right():
    """The closed forms above are checked against brute-force Monte Carlo in plain JAX."""
    keys = jax.random.split(jax.random.key(3), 200_000)
    t = 0.5
    x = jax.vmap(lambda k: jax.random.normal(k, (2,)) + t)(keys)
    assert abs(float(jnp.mean(jnp.sum(x, -1) ** 2)) - (2 + 4 * t**2)) < 0.05
