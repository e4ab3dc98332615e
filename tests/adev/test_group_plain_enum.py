"""A `px.enum` site that is not a member of a plate group (no plate axis, or parameters
that do not depend on the group) is summed over inside the group evaluation; one on
another plate, with the rest of the program additive in its elements, per element.

Before, such a site after a plate-batched enum site stopped the group, and the leader fell
back to re-analysing the interpreted continuation (`_separated`), which does not read the
code enumeration generates: a 20-element plate followed by a scalar enum site was refused.
Exact references are computed without ppl_ext: by enumerating every joint value (small
plates) or per element in closed form (20 elements). Deterministic programs (every site
enumerated) are compared to float32 round-off; stochastic ones by the mean of 2·10^4
estimates within K_SE = 4 standard errors.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.helpers import assert_unbiased, many

W = jnp.array([1.0, -0.5, 2.0, 0.3, 1.5])
N = W.shape[0]


@pytest.fixture
def no_reanalysis(monkeypatch):
    """The verdicts of the plate groups started (True: the group evaluation applied; the
    fallback is joint enumeration, which the 20-element test could not afford)."""
    from ppl_ext.adev import _estimators, _groups

    assert not hasattr(_estimators, "_separated")  # nothing left to re-analyse with
    verdicts = []
    original = _groups.enumerate_group

    def spy(*args):
        try:
            result = original(*args)
        except _groups.NotSeparable:
            verdicts.append(False)
            raise
        verdicts.append(True)
        return result

    monkeypatch.setattr(_groups, "enumerate_group", spy)
    return verdicts


def _bernoulli(value, logit):
    return jnp.where(value == 1, jax.nn.sigmoid(logit), jax.nn.sigmoid(-logit))


def _brute_force(f, logits):
    """Σ over every joint 0/1 value of the len(logits) Bernoulli variables of p · f."""
    total = 0.0
    for bits in itertools.product((0.0, 1.0), repeat=logits.shape[0]):
        values = jnp.array(bits)
        total = total + jnp.prod(_bernoulli(values, logits)) * f(values)
    return total


def _scalar_after_plate(theta):
    c = px.sample(dist.Bernoulli(logits=theta[:N]), px.enum)  # the plate group's leader
    g = px.sample(dist.Bernoulli(logits=theta[N]), px.enum)  # scalar: not a member
    return jnp.sum((c - 0.3 * g) ** 2 * W) + 2.0 * g


def _exact_scalar_after_plate(theta):
    return _brute_force(lambda v: jnp.sum((v[:N] - 0.3 * v[N]) ** 2 * W) + 2.0 * v[N],
                        theta[:N + 1])


THETA = jnp.array([0.3, -0.8, 1.2, 0.1, -0.4, 0.7, -0.2, 0.5])


def test_scalar_enum_after_a_plate_enum_site_is_exact(no_reanalysis):
    f = px.expectation(_scalar_after_plate)
    theta = THETA[:N + 1]
    np.testing.assert_allclose(f(jax.random.key(0), theta), _exact_scalar_after_plate(theta),
                               rtol=1e-5)
    assert no_reanalysis == [True]
    np.testing.assert_allclose(f.grad(jax.random.key(0), theta),
                               jax.grad(_exact_scalar_after_plate)(theta), rtol=1e-4,
                               atol=1e-6)


def test_scalar_enum_before_and_flat_member_after(no_reanalysis):
    """Plate leader, a scalar enum site, then a second plate enum member whose logits
    depend on the scalar value: the member is enumerated inside each scalar branch."""

    def program(theta):
        c = px.sample(dist.Bernoulli(logits=theta[:N]), px.enum)
        g = px.sample(dist.Bernoulli(logits=theta[N]), px.enum)
        d = px.sample(dist.Bernoulli(logits=c * 0.5 - g + theta[N + 1]), px.enum)
        return jnp.sum((c + d * W - g) ** 2)

    def exact(theta):
        def per_g(g):  # per element: Σ_{c, d} q(c) q(d | c, g) (c + d w - g)^2
            total = 0.0
            for c in (0.0, 1.0):
                for d in (0.0, 1.0):
                    q = (_bernoulli(c, theta[:N])
                         * _bernoulli(d, c * 0.5 - g + theta[N + 1]))
                    total = total + q * (c + d * W - g) ** 2
            return jnp.sum(total)

        return sum(_bernoulli(g, theta[N]) * per_g(g) for g in (0.0, 1.0))

    f = px.expectation(program)
    theta = THETA[:N + 2]
    np.testing.assert_allclose(f(jax.random.key(1), theta), exact(theta), rtol=1e-5)
    assert no_reanalysis == [True]
    np.testing.assert_allclose(f.grad(jax.random.key(1), theta), jax.grad(exact)(theta),
                               rtol=1e-4, atol=1e-6)


def test_twenty_elements_and_a_scalar_site(no_reanalysis):
    """Refused before (2^20 joint values); now one evaluation per value of each site."""
    n = 20
    w = jnp.linspace(-1.0, 2.0, n)

    def program(theta):
        c = px.sample(dist.Bernoulli(logits=theta[:n]), px.enum)
        g = px.sample(dist.Bernoulli(logits=theta[n]), px.enum)
        return jnp.sum((c - 0.3 * g) ** 2 * w) + 2.0 * g

    def exact(theta):  # per element in closed form, then over g
        p = jax.nn.sigmoid(theta[:n])
        return sum(_bernoulli(g, theta[n]) * (
            jnp.sum((p * (1 - 0.3 * g) ** 2 + (1 - p) * (0.3 * g) ** 2) * w) + 2.0 * g)
            for g in (0.0, 1.0))

    f = px.expectation(program)
    theta = jnp.linspace(-1.5, 1.5, n + 1)
    np.testing.assert_allclose(f(jax.random.key(2), theta), exact(theta), rtol=1e-5)
    assert no_reanalysis == [True]
    np.testing.assert_allclose(f.grad(jax.random.key(2), theta), jax.grad(exact)(theta),
                               rtol=1e-4, atol=1e-6)


def test_scores_after_the_scalar_site_stay_in_their_branch(no_reanalysis):
    """A reinforce site whose logits depend on the scalar enum value: its score is folded
    into its own branch's terms; a reparameterised site after it too."""

    def program(theta):
        c = px.sample(dist.Bernoulli(logits=theta[:N]), px.enum)
        g = px.sample(dist.Bernoulli(logits=theta[N]), px.enum)
        y = px.sample(dist.Bernoulli(logits=theta[N + 1] + 2.0 * g), px.reinforce)
        z = px.sample(dist.Normal(g + theta[N + 2], 1.0), px.reparam)
        return jnp.sum(c * W) * (y + 0.5 * g) + z ** 2 + jnp.sum(c) * z

    def exact(theta):
        p = jax.nn.sigmoid(theta[:N])
        total = 0.0
        for g in (0.0, 1.0):
            py = jax.nn.sigmoid(theta[N + 1] + 2.0 * g)
            mz = g + theta[N + 2]
            total = total + _bernoulli(g, theta[N]) * (
                jnp.sum(p * W) * (py + 0.5 * g) + mz ** 2 + 1.0 + jnp.sum(p) * mz)
        return total

    f = px.expectation(program)
    theta = THETA
    assert_unbiased(many(lambda k: f(k, theta), num=20_000), exact(theta), what="value")
    assert no_reanalysis and all(no_reanalysis)
    assert_unbiased(many(lambda k: f.grad(k, theta), num=20_000), jax.grad(exact)(theta),
                    what="gradient")


def test_site_on_another_plate(no_reanalysis):
    """A 4-element site on another plate inside a 20-element group: summed over per
    element inside the group (exact)."""
    n, m = 20, 4
    w = jnp.linspace(-1.0, 2.0, n)

    def program(theta):
        a = px.sample(dist.Bernoulli(logits=theta[:n]), px.enum)
        b = px.sample(dist.Bernoulli(logits=theta[n:]), px.enum)
        return jnp.sum(a * w) * jnp.sum(b) + jnp.sum((b - 0.5) ** 2)

    def exact(theta):  # E[Σ a w] E[Σ b] + Σ E[(b - 1/2)^2] (a and b independent)
        return (jnp.sum(jax.nn.sigmoid(theta[:n]) * w) * jnp.sum(jax.nn.sigmoid(theta[n:]))
                + 0.25 * m)

    f = px.expectation(program)
    theta = jnp.linspace(-1.0, 1.0, n + m)
    np.testing.assert_allclose(f(jax.random.key(3), theta), exact(theta), rtol=1e-5)
    np.testing.assert_allclose(f.grad(jax.random.key(3), theta), jax.grad(exact)(theta),
                               rtol=1e-4, atol=1e-6)
    assert no_reanalysis == [True, True]  # one group per trace (value, gradient)


# two enumerated plates of different sizes (20 and 30 elements: 2^50 joint values)
NA, NB = 20, 30
WA = jnp.linspace(-1.0, 2.0, NA)
UB = jnp.linspace(0.5, -1.5, NB)
THETA_AB = jnp.linspace(-1.0, 1.0, NA + NB)


def _two_plates(theta):
    a = px.sample(dist.Bernoulli(logits=theta[:NA] + jnp.arange(NA) / 10), px.enum)
    b = px.sample(dist.Bernoulli(logits=theta[NA:] - jnp.arange(NB) / 10), px.enum)
    return (jnp.sum(a * WA) * jnp.sum(b * UB) + jnp.sum((b - 0.5) ** 2 * jnp.sum(a * WA))
            + jnp.sum(jnp.sin(a + 0.3)) + jnp.sum(jnp.exp(-b * UB)))


def _exact_two_plates(theta):  # closed form, a and b independent per element
    pa = jax.nn.sigmoid(theta[:NA] + jnp.arange(NA) / 10)
    pb = jax.nn.sigmoid(theta[NA:] - jnp.arange(NB) / 10)
    ea = jnp.sum(pa * WA)
    return (ea * jnp.sum(pb * UB) + 0.25 * NB * ea
            + jnp.sum(pa * jnp.sin(1.3) + (1 - pa) * jnp.sin(0.3))
            + jnp.sum(pb * jnp.exp(-UB) + (1 - pb)))


def test_two_enumerated_plates_of_different_sizes(no_reanalysis):
    """Plates of 20 and 30 elements: the second is enumerated per element inside the
    first's group (61 evaluations of the rest, not 2^30), value and gradient exact."""
    f = px.expectation(_two_plates)
    np.testing.assert_allclose(f(jax.random.key(3), THETA_AB), _exact_two_plates(THETA_AB),
                               rtol=1e-5)
    np.testing.assert_allclose(f.grad(jax.random.key(3), THETA_AB),
                               jax.grad(_exact_two_plates)(THETA_AB), rtol=1e-4, atol=1e-5)
    assert no_reanalysis == [True, True]


def test_two_plates_of_the_same_size_with_a_product_of_their_sums(no_reanalysis):
    """Two 20-element plates: pairing b_i with a_i (b joins a's group) makes `Σ a w · Σ b`
    a product of two sums, so the group is evaluated once more with b as a site on another
    plate: exact value and gradient (before: refused)."""
    n = 20
    w = jnp.linspace(-1.0, 2.0, n)

    def program(theta):
        a = px.sample(dist.Bernoulli(logits=theta[:n]), px.enum)
        b = px.sample(dist.Bernoulli(logits=theta[n:]), px.enum)
        return jnp.sum(a * w) * jnp.sum(b) + jnp.sum(jnp.cos(b))

    def exact(theta):
        pa, pb = jax.nn.sigmoid(theta[:n]), jax.nn.sigmoid(theta[n:])
        return jnp.sum(pa * w) * jnp.sum(pb) + jnp.sum(pb * jnp.cos(1.0) + 1 - pb)

    f = px.expectation(program)
    theta = jnp.linspace(-1.0, 1.0, 2 * n)
    np.testing.assert_allclose(f(jax.random.key(0), theta), exact(theta), rtol=1e-5)
    np.testing.assert_allclose(f.grad(jax.random.key(0), theta), jax.grad(exact)(theta),
                               rtol=1e-4, atol=1e-5)
    assert no_reanalysis == [True, True]


def test_three_plates_and_a_flat_member_after_the_other_plate(no_reanalysis):
    """Plates of 4, 3 and 2 elements, then a member of the first plate whose logits depend
    on its element of the first: exact against closed-form per-element sums."""
    na, nb, nc = 4, 3, 2
    wa, ub, vc = jnp.linspace(-1.0, 1.0, na), jnp.linspace(0.5, 2.0, nb), jnp.arange(nc) / 3.0

    def program(theta):
        a = px.sample(dist.Bernoulli(logits=theta[:na]), px.enum)
        b = px.sample(dist.Bernoulli(logits=theta[na:na + nb]), px.enum)
        c = px.sample(dist.Categorical(logits=jnp.outer(vc, theta[-3:])), px.enum)
        d = px.sample(dist.Bernoulli(logits=2.0 * a - theta[0]), px.enum)
        return (jnp.sum(a * d * wa) + jnp.sum(b * ub) * jnp.sum(a) + jnp.sum(c ** 2 * vc)
                + jnp.sum(b) * jnp.sum(c))

    def exact(theta):
        pa = jax.nn.sigmoid(theta[:na])
        pb = jax.nn.sigmoid(theta[na:na + nb])
        pc = jax.nn.softmax(jnp.outer(vc, theta[-3:]), axis=-1)  # (nc, 3)
        ec, ec2 = pc @ jnp.arange(3.0), pc @ jnp.arange(3.0) ** 2
        pd1 = jax.nn.sigmoid(2.0 - theta[0])  # d given a = 1
        return (jnp.sum(pa * pd1 * wa) + jnp.sum(pb * ub) * jnp.sum(pa)
                + jnp.sum(ec2 * vc) + jnp.sum(pb) * jnp.sum(ec))

    f = px.expectation(program)
    theta = jnp.linspace(-0.8, 0.9, na + nb + 3)
    np.testing.assert_allclose(f(jax.random.key(0), theta), exact(theta), rtol=1e-5)
    np.testing.assert_allclose(f.grad(jax.random.key(0), theta), jax.grad(exact)(theta),
                               rtol=1e-4, atol=1e-5)
    assert no_reanalysis == [True, True]


def test_score_site_after_the_other_plate():
    """A reinforce site after the second plate, its law free of it: unbiased value and
    gradient (2·10^4 estimates, K_SE = 4) against the closed form."""

    def program(theta):
        y = _two_plates(theta[:-1])
        s = px.sample(dist.Bernoulli(logits=theta[-1]), px.reinforce)
        return y * (1.0 + s)  # additive in b's elements: s scales every term

    def exact(theta):
        return _exact_two_plates(theta[:-1]) * (1.0 + jax.nn.sigmoid(theta[-1]))

    f = px.expectation(program)
    theta = jnp.concatenate([THETA_AB, jnp.array([0.4])])
    values, grads = many(lambda k: f.value_and_grad(k, theta), num=20_000)
    assert_unbiased(values, exact(theta), what="value")
    assert_unbiased(grads, jax.grad(exact)(theta), what="gradient")


def test_mvd_site_on_another_plate_inside_an_enum_group():
    """A `px.mvd` site on another plate (its law free of the group) inside a plate enum
    group, then a flat member: perturbed one entry at a time inside the group (no
    additivity needed: `(Σ b)^2`). Before, it stopped the group and the 2^12-valued
    leader was refused. Unbiased value and gradient (2·10^4 estimates, K_SE = 4)."""
    n, m = 12, 5
    w, u = jnp.linspace(-1.0, 2.0, n), jnp.linspace(0.5, -1.5, m)

    def program(theta):
        a = px.sample(dist.Bernoulli(logits=theta[:n]), px.enum)
        b = px.sample(dist.Normal(theta[n:], 1.0), px.mvd)
        c = px.sample(dist.Bernoulli(logits=0.5 * theta[:n]), px.enum)
        return jnp.sum(a * w * c) * jnp.sum(b * u) + jnp.sum(b) ** 2 * jnp.sum(a)

    def exact(theta):
        pa, pc, mu = jax.nn.sigmoid(theta[:n]), jax.nn.sigmoid(0.5 * theta[:n]), theta[n:]
        return (jnp.sum(pa * pc * w) * jnp.sum(mu * u)
                + (jnp.sum(mu) ** 2 + m) * jnp.sum(pa))

    f = px.expectation(program)
    theta = jnp.linspace(-1.0, 1.0, n + m)
    values, grads = many(lambda k: f.value_and_grad(k, theta), num=20_000)
    assert_unbiased(values, exact(theta), what="value")
    assert_unbiased(grads, jax.grad(exact)(theta), what="gradient")


def test_reinforce_site_on_another_plate_is_scored_per_element():
    """A `px.reinforce` site on another plate (8 elements) inside a 12-element enum group:
    element j's score multiplies `y(x) - y(x with x_j redrawn)`. Unbiased value and
    gradient (2·10^4 estimates, K_SE = 4) even where `y` is not additive in it (`(Σ b)^2`),
    and its gradient variance far below the whole site's score (measured: 1.4k against
    126k), which is what the site got inside a group before."""
    n, m = 12, 8
    w, u = jnp.linspace(-1.0, 2.0, n), jnp.linspace(0.5, -1.5, m)

    def program(theta, estimator):
        a = px.sample(dist.Bernoulli(logits=theta[:n]), px.enum)
        b = px.sample(dist.Bernoulli(logits=theta[n:]), estimator)
        return (jnp.sum(a * w) * jnp.sum(b * u) + jnp.sum(b) ** 2 * jnp.sum(a)
                + 30.0 * jnp.sum(a))

    def exact(theta):
        pa, pb = jax.nn.sigmoid(theta[:n]), jax.nn.sigmoid(theta[n:])
        sum_b_squared = jnp.sum(pb) ** 2 - jnp.sum(pb ** 2) + jnp.sum(pb)
        return (jnp.sum(pa * w) * jnp.sum(pb * u) + sum_b_squared * jnp.sum(pa)
                + 30.0 * jnp.sum(pa))

    theta = jnp.linspace(-1.0, 1.0, n + m)
    f = px.expectation(lambda t: program(t, px.reinforce))
    values, grads = many(lambda k: f.value_and_grad(k, theta), num=20_000)
    assert_unbiased(values, exact(theta), what="value")
    assert_unbiased(grads, jax.grad(exact)(theta), what="gradient")
    whole = px.expectation(lambda t: program(t, px.Reinforce(rao_blackwellise=False)))
    whole_grads = many(lambda k: whole.grad(k, theta), num=2_000)
    assert float(jnp.sum(grads.var(0)[n:])) < 0.1 * float(jnp.sum(whole_grads.var(0)[n:]))


def test_other_plate_refused_where_the_rest_is_not_additive_in_it():
    """`(Σ b)^2` and a later site whose law depends on `b` are not sums over `b`'s
    elements: the second plate cannot be enumerated per element and is refused by name."""
    n, m = 20, 30
    w = jnp.linspace(-1.0, 2.0, n)

    @px.expectation
    def squared(theta):
        a = px.sample(dist.Bernoulli(logits=theta), px.enum)
        b = px.sample(dist.Bernoulli(logits=jnp.zeros(m)), px.enum)
        return jnp.sum(a * w) + jnp.sum(b) ** 2

    @px.expectation
    def law_depends(theta):
        a = px.sample(dist.Bernoulli(logits=theta), px.enum)
        b = px.sample(dist.Bernoulli(logits=jnp.zeros(m)), px.enum)
        c = px.sample(dist.Bernoulli(logits=jnp.sum(b) / m), px.reinforce)
        return jnp.sum(a * w) + jnp.sum(b) + c

    theta = jnp.linspace(-1.0, 1.0, n)
    for program, name in ((squared, "squared"), (law_depends, "law_depends")):
        with pytest.raises(px.UnsupportedEstimatorError,
                           match=rf"(?s)2\^20 joint.*test_group_plain_enum.py:\d+ "
                                 rf"\({name}\)\) cannot be enumerated inside the group"):
            program(jax.random.key(0), theta)


def test_plate_reinforce_member_after_the_scalar_site(no_reanalysis):
    """A reinforce member of the group (per-element scores) inside the scalar site's
    branches: unbiased value and gradient (2·10^4 estimates, K_SE = 4) against the exact
    per-element expectation."""

    def program(theta):
        c = px.sample(dist.Bernoulli(logits=theta[:N]), px.enum)
        g = px.sample(dist.Bernoulli(logits=theta[N]), px.enum)
        y = px.sample(dist.Bernoulli(logits=c - g + theta[N + 1]), px.reinforce)
        return jnp.sum(c * W * y) + jnp.sum(y) * 0.5 + g

    def exact(theta):
        total = 0.0
        for g in (0.0, 1.0):
            per = 0.0
            for c in (0.0, 1.0):
                py = jax.nn.sigmoid(c - g + theta[N + 1])
                per = per + _bernoulli(c, theta[:N]) * (c * W * py + 0.5 * py)
            total = total + _bernoulli(g, theta[N]) * (jnp.sum(per) + g)
        return total

    f = px.expectation(program)
    theta = THETA[:N + 2]
    assert_unbiased(many(lambda k: f(k, theta), num=20_000), exact(theta), what="value")
    assert_unbiased(many(lambda k: f.grad(k, theta), num=20_000), jax.grad(exact)(theta),
                    what="gradient")
    assert no_reanalysis and all(no_reanalysis)
