"""genjax interop: genjax models inside ppl_ext objectives, ppl_ext models inside genjax."""

import sys

import pytest

genjax = pytest.importorskip("genjax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from genjax import gen  # noqa: E402
from tensorflow_probability.substrates import jax as tfp  # noqa: E402

import ppl_ext as px  # noqa: E402
from ppl_ext.gen._genjax import GenJAXModel, to_genjax_distribution  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_objective_unbiased, assert_unbiased, exact_gaussian_elbo, many, tree_allclose,
)

X = 1.3
PARAMS = {"loc": jnp.asarray(0.2), "log_scale": jnp.asarray(-0.3)}


exact_elbo = exact_gaussian_elbo


@gen
def genjax_model(x):
    z = genjax.normal(0.0, 1.0) @ "z"
    genjax.normal(z, 1.0) @ "x"
    return z


def numpyro_guide(x):
    loc = numpyro.param("loc", 0.0)
    log_scale = numpyro.param("log_scale", 0.0)
    numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)))


@gen
def genjax_guide(params, x):
    genjax.normal(params["loc"], jnp.exp(params["log_scale"])) @ "z"


P = GenJAXModel(genjax_model, observations=lambda x: {"x": x})
Q = px.gen.NumPyroModel(numpyro_guide)


# --- genjax model inside ppl_ext objectives ----------------------------------------------


def test_elbo_of_genjax_model_with_numpyro_guide_is_unbiased():
    objective = px.vi.elbo(P, Q)
    assert_objective_unbiased(objective, PARAMS, exact_elbo, X, what="elbo")


def test_genjax_guide_gives_the_same_estimates_as_the_numpyro_guide():
    # Both guides have one reparameterised Normal site: same key, same draws.
    model = px.gen.NumPyroModel(_numpyro_model)
    ours = many(lambda k: px.vi.elbo(model, GenJAXModel(genjax_guide, params_arg=True))
                .value_and_grad(k, PARAMS, X), num=8, seed=1)
    ref = many(lambda k: px.vi.elbo(model, Q).value_and_grad(k, PARAMS, X), num=8, seed=1)
    assert tree_allclose(ours, ref)


def _numpyro_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_assess_is_the_genjax_joint_and_needs_every_choice():
    z = 0.4
    expected = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(X)
    assert np.isclose(P.assess({"z": z}, None, X), expected)
    assert np.isclose(P.assess({"z": z}, PARAMS, X), expected)  # params are ignored
    fixed = GenJAXModel(genjax_model, observations={"x": X})
    assert np.isclose(fixed.assess({"z": z}, None, X), expected)
    with pytest.raises(ValueError, match="'z' is missing"):
        P.assess({}, None, X)


@gen
def flip_model(x):
    c = genjax.flip(0.3) @ "c"
    genjax.normal(2.0 * c - 1.0, 1.0) @ "x"


@gen
def flip_guide(params, x):
    genjax.bernoulli(logits=params["logit"]) @ "c"


def test_discrete_genjax_guide_uses_the_score_function_or_enumeration():
    def exact(params, x):
        p = jax.nn.sigmoid(params["logit"])
        terms = []
        for c, qc in [(1.0, p), (0.0, 1 - p)]:
            log_joint = (dist.Bernoulli(probs=0.3).log_prob(c)
                         + dist.Normal(2 * c - 1, 1.0).log_prob(x))
            terms.append(qc * (log_joint - jnp.log(qc)))
        return sum(terms)

    params = {"logit": jnp.asarray(0.4)}
    model = GenJAXModel(flip_model, observations=lambda x: {"x": x})
    exact_grad = jax.grad(exact)(params, 0.5)["logit"]
    for estimators in [{}, {"c": px.enum}]:
        guide = GenJAXModel(flip_guide, params_arg=True, estimators=estimators)
        objective = px.vi.elbo(model, guide)
        grads = many(lambda k: objective.grad(k, params, 0.5)["logit"],
                     num=10_000 if not estimators else 64)
        assert_unbiased(grads, exact_grad, what=f"discrete elbo {estimators}")


@gen
def inner(mu):
    return genjax.normal(mu, 1.0) @ "y"


@gen
def rich_model(s):
    f = genjax.flip(0.3) @ "f"
    k = genjax.categorical(jnp.log(jnp.array([0.2, 0.3, 0.5]))) @ "k"
    y = inner(s) @ "sub"
    v = genjax.normal.vmap(in_axes=(0, None))(jnp.arange(3.0), s) @ "v"
    r = genjax.normal.repeat(4)(0.0, 1.0) @ "r"
    return f, k, y, v, r


def test_simulate_draws_every_kind_of_site_with_genjax_densities():
    model = GenJAXModel(rich_model)

    @px.expectation
    def stats(s):
        trace = model.simulate(None, s)
        c = trace.choices
        assert set(c) == {"f", "k", "sub/y", "v", "r"}
        assert c["f"].dtype == jnp.bool_ and c["v"].shape == (3,) and c["r"].shape == (4,)
        gap = trace.log_density - model.assess(c, None, s)
        lp, _ = rich_model.assess(
            {"f": c["f"], "k": c["k"], "sub": {"y": c["sub/y"]},
             "v": c["v"], "r": c["r"]}, s)
        return jnp.stack([gap, trace.log_density - lp, c["f"].astype(float),
                          c["k"].astype(float), c["sub/y"], c["v"][2], c["r"][3]])

    out = many(lambda k: stats(k, 2.0), num=4000)
    assert np.allclose(out[:, :2], 0.0, atol=1e-4)
    # means: flip 0.3, categorical 1.3, N(2, 1), N(2, 2), N(0, 1)
    assert_unbiased(out[:, 2:], [0.3, 1.3, 2.0, 2.0, 0.0], what="site means")


def test_generate_weight_is_the_density_of_the_constraints():
    model = GenJAXModel(genjax_model, observations=lambda x: {"x": x})

    @px.expectation
    def weight_gap():
        trace, weight = model.generate({}, None, X)
        z = trace.choices["z"]
        return weight - dist.Normal(z, 1.0).log_prob(X)

    assert abs(float(weight_gap(jax.random.key(0)))) < 1e-5

    @px.expectation
    def fully_constrained():
        trace, weight = model.generate({"z": 0.4}, None, X)
        return jnp.stack([weight, trace.log_density])

    expected = dist.Normal(0.0, 1.0).log_prob(0.4) + dist.Normal(0.4, 1.0).log_prob(X)
    assert np.allclose(fully_constrained(jax.random.key(0)), expected)


def test_distributions_without_numpyro_counterpart_use_the_score_function():
    logistic = genjax.tfp_distribution(tfp.distributions.Logistic, name="Logistic")

    @gen
    def guide(params):
        logistic(params["loc"], 1.0) @ "z"

    q = GenJAXModel(guide, params_arg=True)

    @px.expectation
    def objective(params):
        trace = q.simulate(params)
        return trace.choices["z"] + 0.0 * trace.log_density

    grads = many(lambda k: objective.grad(k, {"loc": jnp.asarray(0.5)})["loc"])
    assert_unbiased(grads, 1.0, what="d/dloc E[z] by score function")
    q_reparam = GenJAXModel(guide, params_arg=True, estimators={"z": px.reparam})
    with pytest.raises(px.UnsupportedEstimatorError, match="no rsample"):
        px.expectation(lambda p: q_reparam.simulate(p).choices["z"])(
            jax.random.key(0), {"loc": 0.5})


@gen
def scan_model():
    def step(carry, _):
        x = genjax.normal(carry, 1.0) @ "x"
        return x, x

    return genjax.Scan(gen(step), length=genjax.const(3))(0.0, None) @ "steps"


def test_combinators_can_be_assessed_but_not_simulated():
    model = GenJAXModel(scan_model)
    xs = jnp.array([0.1, -0.2, 0.3])
    expected = (dist.Normal(0.0, 1.0).log_prob(xs[0]) + dist.Normal(xs[0], 1.0).log_prob(xs[1])
                + dist.Normal(xs[1], 1.0).log_prob(xs[2]))
    assert np.isclose(model.assess({"steps/x": xs}, None), expected)
    with pytest.raises(NotImplementedError, match="'steps'"):
        px.expectation(lambda: model.simulate(None).log_density)(jax.random.key(0))


def test_wrapping_a_non_genjax_object_is_a_type_error():
    with pytest.raises(TypeError, match="genjax generative function"):
        GenJAXModel(lambda x: x)


# --- ppl_ext generative functions inside genjax -------------------------------------------


def prior(scale):
    numpyro.sample("z", dist.Normal(0.0, scale))
    numpyro.sample("w", dist.Bernoulli(probs=0.3))


PRIOR = to_genjax_distribution(px.gen.NumPyroModel(prior))
Z = to_genjax_distribution(
    px.gen.NumPyroModel(lambda: numpyro.sample("z", dist.Normal(1.0, 2.0))), site="z")


@gen
def mixed(scale):
    a = PRIOR(scale) @ "a"
    b = Z() @ "b"
    Z.repeat(3)() @ "c"
    return genjax.normal(a["z"] + b, 1.0) @ "x"


def _numpyro_joint(c, scale):
    return (dist.Normal(0.0, scale).log_prob(c["a"]["z"])
            + dist.Bernoulli(probs=0.3).log_prob(c["a"]["w"])
            + dist.Normal(1.0, 2.0).log_prob(c["b"])
            + dist.Normal(1.0, 2.0).log_prob(c["c"]).sum()
            + dist.Normal(c["a"]["z"] + c["b"], 1.0).log_prob(c["x"]))


def test_numpyro_model_as_genjax_distribution_simulate_and_assess():
    trace = genjax.seed(mixed.simulate)(jax.random.key(3), 2.0)
    choices = trace.get_choices()
    expected = _numpyro_joint(choices, 2.0)
    assert np.isclose(-trace.get_score(), expected, rtol=1e-5)
    log_p, _ = mixed.assess(choices, 2.0)
    assert np.isclose(log_p, expected, rtol=1e-5)
    assert np.isclose(PRIOR.logpdf(choices["a"], 2.0),
                      px.gen.NumPyroModel(prior).assess(choices["a"], None, 2.0))
    assert np.isclose(Z.logpdf(0.7), dist.Normal(1.0, 2.0).log_prob(0.7))


def test_numpyro_model_as_genjax_distribution_samples_its_law_under_jit_and_vmap():
    c = many(lambda k: genjax.seed(mixed.simulate)(k, 2.0), num=4000, seed=4).get_choices()
    assert c["c"].shape == (4000, 3)
    # means of z^2, w, b, (c - 1)^2: 4, 0.3, 1, 4
    moments = jnp.stack([c["a"]["z"] ** 2, c["a"]["w"], c["b"],
                         ((c["c"] - 1.0) ** 2).mean(1)], axis=1)
    assert_unbiased(moments, [4.0, 0.3, 1.0, 4.0], what="moments")
    # different draws across keys and across the repeated site
    assert float(jnp.std(c["c"][:, 0] - c["c"][:, 1])) > 1.0


def test_numpyro_distribution_inside_a_genjax_model_inside_an_objective():
    # The wrapped NumPyroModel is simulated with its own px.sample sites there.
    @gen
    def guide():
        a = PRIOR(1.5) @ "a"
        return genjax.normal(a["z"], 1.0) @ "y"

    q = GenJAXModel(guide)

    @px.expectation
    def gap():
        trace = q.simulate(None)
        assert set(trace.choices) == {"a/z", "a/w", "y"}
        return trace.log_density - q.assess(trace.choices, None)

    assert abs(float(gap(jax.random.key(0)))) < 1e-5

    @px.expectation
    def mean_y(loc):
        return GenJAXModel(guide).simulate(None).choices["y"] + loc

    assert np.isclose(mean_y.grad(jax.random.key(0), 0.0), 1.0)


def test_other_ppl_ext_functions_are_assessable_but_not_simulated_in_genjax():
    class Custom(px.gen.AbstractGenerativeFunction):
        def simulate(self, params, *args):
            raise NotImplementedError("assessed only")

        def assess(self, choices, params, *args):
            return dist.Normal(0.0, 1.0).log_prob(choices["z"])

    d = to_genjax_distribution(Custom(), site="z")

    @gen
    def model():
        return d() @ "z"

    log_p, _ = model.assess({"z": 0.3})
    assert np.isclose(log_p, dist.Normal(0.0, 1.0).log_prob(0.3))
    with pytest.raises(NotImplementedError, match="NumPyroModel"):
        genjax.seed(model.simulate)(jax.random.key(0))


MAPPED = [  # name, arguments, values in the support
    ("normal", (0.3, 1.5), [-1.0, 0.5, 2.0]), ("uniform", (-1.0, 2.0), [-0.5, 1.5]),
    ("beta", (2.0, 3.0), [0.2, 0.7]), ("gamma", (2.0, 3.0), [0.3, 1.5]),
    ("exponential", (1.5,), [0.2, 2.0]), ("log_normal", (0.1, 0.5), [0.5, 2.0]),
    ("laplace", (0.2, 1.1), [-1.0, 1.0]), ("cauchy", (0.2, 1.1), [-1.0, 3.0]),
    ("half_normal", (1.3,), [0.1, 2.0]), ("student_t", (3.0, 0.2, 1.1), [-2.0, 0.5]),
    ("inverse_gamma", (3.0, 2.0), [0.5, 2.0]), ("weibull", (1.5, 2.0), [0.5, 3.0]),
    ("chi2", (3.0,), [0.5, 4.0]), ("flip", (0.3,), [True, False]),
    ("bernoulli", (0.4,), [0, 1]), ("categorical", (jnp.array([0.1, -0.3, 0.5]),), [0, 2]),
    ("geometric", (None, 0.3), [0, 3]), ("poisson", (2.5,), [0, 4]),
    ("binomial", (5.0, None, 0.3), [0.0, 2.0, 5.0]),
    ("dirichlet", (jnp.array([1.5, 2.0, 0.7]),), [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]),
    ("multivariate_normal", (jnp.array([0.1, -0.2]), jnp.array([[2.0, 0.3], [0.3, 1.0]])),
     [[0.0, 0.0], [1.0, -2.0]]),
]


@pytest.mark.parametrize("name, args, values", MAPPED, ids=[m[0] for m in MAPPED])
def test_builtin_distributions_map_to_numpyro_with_the_same_law(name, args, values):
    from ppl_ext.gen._genjax import _GenJAXSite, _numpyro_distribution

    g = getattr(genjax.distributions, name)
    d, expected = _numpyro_distribution(g, args, {})
    assert not isinstance(d, _GenJAXSite) and d.shape() == expected.shape
    for v in values:
        v = jnp.asarray(v, expected.dtype)
        assert np.isclose(d.log_prob(v), g.logpdf(v, *args), rtol=1e-4, atol=1e-4), v


def test_the_adapter_module_does_not_import_genjax():
    import importlib.util

    import ppl_ext.gen._genjax as adapter

    blocked = {name: sys.modules.get(name) for name in ["genjax", "tensorflow_probability"]}
    try:
        for name in blocked:
            sys.modules[name] = None  # `import genjax` now raises ImportError
        spec = importlib.util.spec_from_file_location("ppl_ext.gen._genjax_probe", adapter.__file__)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)  # no genjax import at module level
        assert hasattr(module, "GenJAXModel")
        with pytest.raises(ImportError, match="pip install"):
            module.GenJAXModel(genjax_model)
    finally:
        sys.modules.pop("ppl_ext.gen._genjax_probe", None)
        for name, value in blocked.items():
            sys.modules[name] = value
