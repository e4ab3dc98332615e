"""The continuity check: reparameterised draws that reach a step are refused by name.

Each refused program below is discontinuous in a reparameterised draw, so its pathwise
gradient is silently biased (it misses the jump); the previous check accepted it. Each
accepted program is continuous where its draws live, and must keep working: ordinary
guides and models evaluate numpyro log densities with `validate_args` on (numpyro's
default), whose support masks the check accepts only where they are constant.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax import lax
from jax.sharding import PartitionSpec

import ppl_ext as px

KEY = jax.random.key(0)


def run(fn, *args):
    return px.expectation(fn).grad(KEY, *args)


def normal(t, shape=()):
    return px.sample(dist.Normal(t, 1.0).expand(shape) if shape else dist.Normal(t, 1.0),
                     name="x")


def refused(program, *args, match="floor"):
    with pytest.raises(px.UnsupportedEstimatorError, match=f"'x'.*discontinuous.*{match}"):
        run(program, *args)


# ------------------------------------------------------------ (i) sorts and payloads


def test_sort_payload_ordered_by_a_draw_is_refused():
    # lax.sort((keys, payload), num_keys=1) reorders the payload as the keys move: with
    # payload = [0, 1], E[first payload] = P(x_0 > x_1) depends on theta, d/dtheta != 0,
    # but the payload is piecewise constant in x: the pathwise gradient is 0.
    def program(t):
        keys = normal(jnp.stack([t, 0.0]), (2,))
        return lax.sort((keys, jnp.array([0.0, 1.0])), num_keys=1)[1][0]

    refused(program, 0.3, match="'sort'")


def test_sort_payload_that_is_itself_a_draw_is_refused():
    def program(t):
        keys = normal(jnp.stack([t, 0.0]), (2,))
        return lax.sort((keys, keys * 2.0), num_keys=1)[1][0]

    refused(program, 0.3, match="'sort'")


def test_sorted_keys_and_argsort_gather():
    # the sorted keys themselves are continuous
    run(lambda t: jnp.sort(normal(jnp.stack([t, 0.0, 1.0]), (3,)))[0], 0.3)
    # the payload of an argsort is reordered as the draw moves
    refused(lambda t: jnp.take_along_axis(
        jnp.array([0.0, 1.0, 2.0]), jnp.argsort(normal(jnp.stack([t, 0.0, 1.0]), (3,))),
        axis=0)[0], 0.3, match="sort")


# ------------------------------------------------------ (ii) variadic reductions


def test_argmax_written_with_lax_reduce_is_refused():
    def argmax_value(values, payload):
        def pick(a, b):
            take_b = b[0] > a[0]
            return jnp.where(take_b, b[0], a[0]), jnp.where(take_b, b[1], a[1])

        return lax.reduce((values, payload), (-jnp.inf, 0.0), pick, (0,))[1]

    refused(lambda t: argmax_value(normal(jnp.stack([t, 0.0]), (2,)), jnp.array([0.0, 1.0])),
            0.3, match="select")


def test_variadic_reduce_that_is_continuous_is_accepted():
    # a sum and a max written with lax.reduce: continuous
    def program(t):
        x = normal(jnp.stack([t, 0.0]), (2,))
        total, top = lax.reduce((x, x), (0.0, -jnp.inf),
                                lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])), (0,))
        return total + top

    run(program, 0.3)


# ------------------------------------- (iii) primitives that carry a jaxpr, analysed


def _mesh(devices):
    return jax.make_mesh((devices,), ("i",), devices=jax.devices()[:devices])


@pytest.mark.parametrize("devices", [1, 2])
def test_step_inside_shard_map_is_refused(devices):
    mesh = _mesh(devices)

    def program(t):
        x = normal(jnp.full(2, t), (2,))
        inner = jax.shard_map(jnp.floor, mesh=mesh, in_specs=PartitionSpec(),
                              out_specs=PartitionSpec())
        return jnp.sum(inner(x))

    refused(program, 0.3, match="'floor'")
    # a continuous body is followed, not refused
    run(lambda t: jnp.sum(jax.shard_map(jnp.sin, mesh=mesh, in_specs=PartitionSpec(),
                                        out_specs=PartitionSpec())(normal(jnp.full(2, t),
                                                                          (2,)))), 0.3)


def test_step_inside_a_custom_jvp_function_is_refused():
    # a straight-through rounding: its hand-written derivative is 1, but E[round(x)] has
    # a different derivative; the body's round is a step
    @jax.custom_jvp
    def straight_through(x):
        return jnp.round(x)

    straight_through.defjvp(lambda p, t: (straight_through(p[0]), t[0]))
    refused(lambda t: straight_through(normal(t)), 0.3, match="'round'")


def test_step_inside_a_custom_vjp_function_is_refused():
    @jax.custom_vjp
    def floor_st(x):
        return jnp.floor(x)

    floor_st.defvjp(lambda x: (floor_st(x), None), lambda _, g: (g,))
    refused(lambda t: floor_st(normal(t)), 0.3, match="'floor'")


def test_step_inside_a_scatter_update_is_refused():
    # x.at[i].apply(f) carries f as the scatter's update computation
    refused(lambda t: (jnp.stack([normal(t), 0.0]).at[0].apply(jnp.floor)).sum(), 0.3,
            match="'floor'")
    px.expectation(lambda t: (jnp.stack([normal(t), 0.0]).at[0].apply(jnp.sin)).sum()
                   ).estimate(KEY, 0.3)  # (JAX has no JVP for .apply)


def test_step_inside_custom_vmap_and_composite_is_refused():
    @jax.custom_batching.custom_vmap
    def floored(x):
        return jnp.floor(x)

    floored.def_vmap(lambda size, batched, x: (jnp.floor(x), batched[0]))
    refused(lambda t: floored(normal(t)), 0.3, match="'floor'")
    refused(lambda t: lax.composite(lambda y: jnp.floor(y), name="ppl.floor")(normal(t)),
            0.3, match="'floor'")


def test_primitive_whose_body_is_not_analysed_counts_as_a_step():
    # custom_linear_solve's solve is arbitrary code (here a floor): not analysed, refused
    def program(t):
        return lax.custom_linear_solve(lambda v: v, normal(t), lambda mv, b: jnp.floor(b))

    refused(program, 0.3, match="'custom_linear_solve'.*does not analyse")


# ------------------------------------------------------- (iv) library case splits


def test_scipy_stats_density_outside_its_support_is_refused():
    # uniform.logpdf(x, 0, 2) is -inf outside [0, 2]: E[exp(logpdf(x))] moves with theta
    refused(lambda t: jnp.exp(jax.scipy.stats.uniform.logpdf(normal(t), 0.0, 2.0)), 0.3,
            match="lt|gt|select")
    refused(lambda t: jax.scipy.stats.expon.logpdf(normal(t)), 0.3, match="lt|select")


@pytest.mark.parametrize("model", [
    lambda: dist.Exponential(1.0), lambda: dist.Uniform(0.0, 1.0),
    lambda: dist.HalfNormal(1.0), lambda: dist.Gamma(2.0, 1.0), lambda: dist.Beta(2.0, 2.0),
], ids=["Exponential", "Uniform", "HalfNormal", "Gamma", "Beta"])
def test_model_density_at_a_draw_that_leaves_its_support_is_refused(model):
    # numpyro's validate_args (on by default): log_prob is -inf outside the support, and
    # a Normal draw crosses the boundary
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"'x'.*support check of \w+.*validate_args"):
        run(lambda t: model().log_prob(normal(t)), 0.3)


def test_density_with_a_support_that_moves_with_the_parameters():
    # the guide's draw lies in (0, theta): its own density's check is constant ...
    def own(t):
        u = px.sample(dist.Uniform(0.0, t), name="x")
        return dist.Uniform(0.0, t).log_prob(u) + u

    run(own, 2.0)

    # ... but not a density on a fixed interval that the draw can leave
    def other(t):
        u = px.sample(dist.Uniform(0.0, t), name="x")
        return jnp.exp(dist.Uniform(0.0, 1.0).log_prob(u))

    refused(other, 2.0, match="support check of Uniform")


def test_point_mass_of_a_draw_is_judged_by_the_draw():
    # Delta(u) has no randomness of its own: its value is u's
    def into_positive(t):
        u = normal(t)
        z = px.sample(dist.Delta(u), name="z")
        return dist.Exponential(1.0).log_prob(z)

    refused(into_positive, 0.3, match="support check of Exponential")

    def exp_is_positive(t):  # AutoDiagonalNormal-style: Delta(exp(u)) for a positive site
        u = normal(t)
        q = dist.Delta(jnp.exp(u), log_density=-u)
        z = px.sample(q, name="z")
        return dist.LogNormal(0.0, 1.0).log_prob(z) + q.log_prob(z)  # log(z == v): 0

    run(exp_is_positive, 0.3)


def test_hierarchical_densities_with_drawn_parameters():
    data = jnp.array([0.5, 1.5, 2.0])

    def gamma_likelihood(t):  # a drawn shape: xlogy(alpha - 1, data)
        alpha = px.sample(dist.LogNormal(t, 0.5), name="x")
        return jnp.sum(dist.Gamma(alpha, 1.0).log_prob(data))

    def beta_prior(t):  # drawn concentrations and a drawn value
        a = px.sample(dist.LogNormal(t, 0.5), name="x")
        p = px.sample(dist.Beta(2.0, 2.0), name="p")
        return dist.Beta(a, 2.0).log_prob(p)

    run(gamma_likelihood, 0.3)
    run(beta_prior, 0.3)
    # xlogy(x, y) switches at x = 0, which is continuous only where log y is finite: with
    # a y that can be 0, its split is analysed (and refused) like user code
    refused(lambda t: jax.scipy.special.xlogy(2.0 * normal(t), jax.nn.relu(normal(t))),
            0.3, match="select")


def test_opt_out_still_applies():
    run(lambda t: jnp.exp(jax.scipy.stats.uniform.logpdf(
        px.sample(dist.Normal(t, 1.0), px.Reparam(allow_discontinuous=True)), 0.0, 2.0)), 0.3)


# ------------------------------------------------- continuous programs still pass


GUIDES = {
    "Normal": lambda t: dist.Normal(t, 1.0),
    "LogNormal": lambda t: dist.LogNormal(t, 0.5),
    "Gamma": lambda t: dist.Gamma(jnp.exp(t), 1.0),
    "Beta": lambda t: dist.Beta(jnp.exp(t), 2.0),
    "Dirichlet": lambda t: dist.Dirichlet(jnp.exp(t) * jnp.ones(3)),
    "MultivariateNormal": lambda t: dist.MultivariateNormal(t * jnp.ones(2),
                                                            scale_tril=jnp.eye(2)),
    "Exponential": lambda t: dist.Exponential(jnp.exp(t)),
    "TruncatedNormal": lambda t: dist.TruncatedNormal(t, 1.0, low=0.0),
    "Uniform": lambda t: dist.Uniform(0.0, 1.0 + jnp.exp(t)),
    "plate": lambda t: dist.Normal(t, 1.0).expand((3,)).to_event(1),
}


@pytest.mark.parametrize("name", list(GUIDES))
def test_a_guide_density_of_its_own_draw_passes(name):
    def program(t):
        q = GUIDES[name](t)
        return jnp.sum(q.log_prob(px.sample(q, name="z")))

    assert np.isfinite(float(run(program, 0.3)))


MATCHED = {  # (guide, model): the guide's support lies inside the model's
    "LogNormal->Gamma": (lambda t: dist.LogNormal(t, 0.5), dist.Gamma(2.0, 1.0)),
    "LogNormal->LogNormal": (lambda t: dist.LogNormal(t, 0.5), dist.LogNormal(0.0, 1.0)),
    "Gamma->Exponential": (lambda t: dist.Gamma(jnp.exp(t), 1.0), dist.Exponential(1.0)),
    "Beta->Uniform": (lambda t: dist.Beta(jnp.exp(t), 2.0), dist.Uniform(0.0, 1.0)),
    "Beta->Beta": (lambda t: dist.Beta(jnp.exp(t), 2.0), dist.Beta(2.0, 2.0)),
    "Dirichlet->Dirichlet": (lambda t: dist.Dirichlet(jnp.exp(t) * jnp.ones(3)),
                             dist.Dirichlet(jnp.ones(3))),
    "Normal->StudentT": (lambda t: dist.Normal(t, 1.0), dist.StudentT(3.0, 0.0, 1.0)),
}


@pytest.mark.parametrize("name", list(MATCHED))
def test_a_model_density_at_a_guide_draw_inside_its_support_passes(name):
    guide, model = MATCHED[name]

    def program(t):
        z = px.sample(guide(t), name="z")
        return jnp.sum(model.log_prob(z))

    assert np.isfinite(float(run(program, 0.3)))


def test_safeguards_that_are_constant_where_the_draws_live_pass():
    run(lambda t: jnp.where(jnp.isnan(normal(t)), 0.0, normal(t)), 0.3)  # isnan(x) == x != x
    run(lambda t: jnp.where(jnp.isneginf(normal(t)), -jnp.inf, normal(t)), 0.3)  # keeps x
    # a positive draw compared with 0, a draw compared with a constant for equality
    run(lambda t: jnp.where(px.sample(dist.LogNormal(t, 1.0), name="x") > 0, 1.0, 0.0), 0.3)
    run(lambda t: jnp.where(normal(t) == 0.0, 0.0, normal(t) ** 2), 0.3)
    # jax.nn activations written with `where`, logsumexp's max shift, relu
    run(lambda t: jax.nn.elu(normal(t)) + jax.nn.leaky_relu(normal(t))
        + jax.nn.hard_tanh(normal(t)) + jax.nn.relu(normal(t)), 0.3)
    run(lambda t: jax.nn.logsumexp(normal(jnp.stack([t, 0.0]), (2,))), 0.3)


def test_a_comparison_of_a_draw_with_a_function_of_itself_stays_a_step():
    # relu(x) == x is true for x >= 0 only: not constant
    refused(lambda t: jnp.where(jax.nn.relu(normal(t)) == normal(t), 1.0, 0.0), 0.3,
            match="select")
    # a draw compared with another draw is not constant either (x > y)
    refused(lambda t: jnp.where(normal(t) > px.sample(dist.Normal(0.0, 1.0), name="y"),
                                1.0, 0.0), 0.3, match="select")


def test_support_marks_do_not_change_values_or_gradients():
    def program(t):
        z = px.sample(dist.LogNormal(t, 0.5), name="z")
        return dist.Gamma(2.0, 1.0).log_prob(z)

    f = px.expectation(program)
    value, grad = f.value_and_grad(KEY, 0.3)
    unvalidated = px.expectation(lambda t: dist.Gamma(2.0, 1.0, validate_args=False).log_prob(
        px.sample(dist.LogNormal(t, 0.5, validate_args=False), name="z")))
    v2, g2 = unvalidated.value_and_grad(KEY, 0.3)
    np.testing.assert_allclose(value, v2, rtol=1e-6)
    np.testing.assert_allclose(grad, g2, rtol=1e-6)


def test_support_checks_under_vmap_inside_the_program():
    # particles drawn with jax.vmap (an IWELBO): the marks are batched with the draws
    def particles(make_model):
        def program(t):
            def one(_):
                z = px.sample(dist.LogNormal(t, 0.5), name="x")
                return make_model().log_prob(z) - dist.LogNormal(t, 0.5).log_prob(z)

            return jax.nn.logsumexp(jax.vmap(one)(jnp.arange(4)))

        return program

    assert np.isfinite(float(run(particles(lambda: dist.Gamma(2.0, 1.0)), 0.3)))
    refused(particles(lambda: dist.Uniform(0.0, 1.0)), 0.3, match="support check of Uniform")
