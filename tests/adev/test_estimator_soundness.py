"""Soundness rules of the gradient estimators (`ppl_ext/adev/_laws.py`, `_estimators.py`).

The tests check what each rule refuses (where earlier rules gave a silently wrong
gradient) and the neighbouring cases it accepts, whose estimates are compared with exact
values computed without ppl_ext: closed forms, explicit sums over finite supports (differentiated by
jax.grad), Monte-Carlo means of NUM = 20000 estimates within K_SE = 4 standard errors
(`tests/helpers.py`), fixed seeds.

1. supports that move with the parameters behind transforms, wrappers and mixtures;
2. masked sites: scores, enumeration weights, MVD and leave-one-out use the sampling law;
3. probabilities at numpyro's clamps (near 1, and exactly 0 or 1);
4. point masses inside mixtures;
5. per-element baselines with per-element Rao-Blackwellisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from numpyro.distributions import transforms as T
from scipy import special, stats

import ppl_ext as px
from tests.helpers import assert_unbiased, many

NUM = 20_000
KEY = jax.random.key(0)
SCORE_FUNCTION = {"reinforce": px.reinforce, "loo": px.LeaveOneOut(3)}
#: The largest float32 below 1: inside (0, 1), above numpyro's clamp at 1 - 2^-23.
NEAR_ONE = np.float32(1.0 - 2.0**-24)


def grads_of(program, *args, num=NUM):
    f = px.expectation(program)
    return many(lambda k: f.grad(k, *args), num=num)


def one_grad(program, *args):
    return px.expectation(program).value_and_grad(KEY, *args)


def close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


# ------------------------------------------------------------- 1. supports that move

ONES2 = np.ones(2, np.float32)
HALF = np.full(2, 0.5, np.float32)
REAL = constraints.real


def _shifted_exponential(t):
    return dist.TransformedDistribution(dist.Exponential(1.0), T.AffineTransform(t, 1.0))


def _scaled_uniform(t):
    return dist.TransformedDistribution(dist.Uniform(0.0, 1.0), T.AffineTransform(0.0, t))


MOVING = {
    # an affine map with traced parameters of a bounded set: the image moves
    "affine-of-uniform": _scaled_uniform,
    "shifted-exponential": _shifted_exponential,
    "composed-affine-of-beta": lambda t: dist.TransformedDistribution(
        dist.Beta(2.0, 2.0), T.ComposeTransform([T.AffineTransform(1.0, 2.0),
                                                 T.AffineTransform(t, 1.0)])),
    "lower-cholesky-affine-of-uniforms": lambda t: dist.TransformedDistribution(
        dist.Uniform(0.0, ONES2).to_event(1),
        T.LowerCholeskyAffine(jnp.stack([t, t]), np.eye(2, dtype=np.float32))),
    # a traced bound under a constant transform whose codomain is constant
    "exp-of-uniform(0,t)": lambda t: dist.TransformedDistribution(
        dist.Uniform(0.0, t), T.ExpTransform()),
    "sigmoid-of-uniform(0,t)": lambda t: dist.TransformedDistribution(
        dist.Uniform(0.0, t), T.SigmoidTransform()),
    "folded-uniform(-1,t)": lambda t: dist.FoldedDistribution(dist.Uniform(-1.0, t)),
    # wrappers and mixtures around them
    "independent": lambda t: _scaled_uniform(t).expand((2,)).to_event(1),
    "masked": lambda t: _scaled_uniform(t).mask(False),
    "mixture-same-family": lambda t: dist.MixtureSameFamily(
        dist.Categorical(probs=HALF),
        dist.TransformedDistribution(dist.Uniform(0.0, ONES2),
                                     T.AffineTransform(0.0, jnp.stack([t, 2.0 * t])))),
    "mixture-general": lambda t: dist.MixtureGeneral(
        dist.Categorical(probs=HALF), [dist.Normal(0.0, 1.0), _shifted_exponential(t)],
        support=REAL),
}


@pytest.mark.parametrize("estimator", SCORE_FUNCTION.values(), ids=SCORE_FUNCTION.keys())
@pytest.mark.parametrize("make", MOVING.values(), ids=MOVING.keys())
def test_supports_moving_behind_transforms_wrappers_and_mixtures_are_refused(estimator, make):
    f = px.expectation(lambda t: jnp.sum(px.sample(make(t), estimator, name="u")))
    with pytest.raises(px.UnsupportedEstimatorError, match="'u'.*support moves"):
        f.grad(KEY, 1.5)


# accepted neighbours, with closed forms: (distribution, f, d/dt E[f(x)])
THETA = 0.7
FIXED = {
    "affine-of-normal": (lambda t: dist.TransformedDistribution(
        dist.Normal(0.0, 1.0), T.AffineTransform(t, 2.0)), lambda x: x**2, 2 * THETA),
    "lognormal": (lambda t: dist.LogNormal(t, 0.5), lambda x: x,
                  np.exp(THETA + 0.125)),
    "scaled-exponential": (lambda t: dist.TransformedDistribution(
        dist.Exponential(1.0), T.AffineTransform(0.0, t)), lambda x: x, 1.0),
    "mixture-of-normals": (lambda t: dist.MixtureSameFamily(
        dist.Categorical(probs=np.array([0.3, 0.7], np.float32)),
        dist.Normal(jnp.stack([t, 2.0 * t]), 1.0)), lambda x: x**2,
        0.3 * 2 * THETA + 0.7 * 8 * THETA),
}


@pytest.mark.parametrize("estimator", SCORE_FUNCTION.values(), ids=SCORE_FUNCTION.keys())
def test_supports_kept_fixed_are_accepted_and_unbiased(estimator):
    for name, (make, fn, exact) in FIXED.items():
        grads = grads_of(lambda t: fn(px.sample(make(t), estimator)), THETA)
        assert_unbiased(grads, exact, what=name)
    # the rule's boundary: the same affine map with a traced shift on a half-line moves it
    with pytest.raises(px.UnsupportedEstimatorError, match="AffineTransform.*Positive"):
        one_grad(lambda t: px.sample(_shifted_exponential(t), estimator), THETA)


# ---------------------------------------------------------------- 2. masked sites

W3 = np.array([1.0, -2.0, 0.5], np.float32)
LOGITS3 = np.array([0.3, -0.8, 1.1], np.float32)
PARTIAL = np.array([True, False, True])
MASKINGS = {
    "mask-false": (lambda d: d.mask(False), 1),
    "partial-mask": (lambda d: d.mask(PARTIAL), 1),
    "masked-to-event": (lambda d: d.mask(PARTIAL).to_event(1), 1),
    "masked-expanded": (lambda d: d.mask(False).expand((2, 3)), 2),
}
ESTIMATORS = {**SCORE_FUNCTION, "enum": px.enum, "mvd": px.mvd}


def _bernoulli_objective(theta, reps):  # E[Σ w_i (c_i + 1)²], c_i ~ Bernoulli(sigmoid θ_i)
    p = jax.nn.sigmoid(theta)
    return reps * jnp.sum(W3 * (4.0 * p + (1.0 - p)))


@pytest.mark.parametrize("estimator", ESTIMATORS.values(), ids=ESTIMATORS.keys())
@pytest.mark.parametrize("masking", MASKINGS.values(), ids=MASKINGS.keys())
def test_masked_sites_use_the_sampling_law(estimator, masking):
    mask, reps = masking

    def program(theta):
        c = px.sample(mask(dist.Bernoulli(logits=theta)), estimator)
        return jnp.sum(W3 * (c + 1.0) ** 2)

    exact_value, exact_grad = jax.value_and_grad(_bernoulli_objective)(LOGITS3, reps)
    if estimator is px.enum or isinstance(estimator, px.MVD):  # exact here
        value, grad = one_grad(program, LOGITS3)
        if estimator is px.enum:
            close(value, exact_value)
        close(grad, exact_grad)
    else:
        assert_unbiased(grads_of(program, LOGITS3), exact_grad)


CONTINUOUS_WRAPPERS = {
    "mask-false": lambda t: dist.Normal(t, 1.0).mask(False),
    # drawn from the base law; log_prob is log F(x), a censored observation's likelihood
    "left-censored": lambda t: dist.LeftCensoredDistribution(dist.Normal(t, 1.0), censored=True),
}


@pytest.mark.parametrize("estimator", SCORE_FUNCTION.values(), ids=SCORE_FUNCTION.keys())
@pytest.mark.parametrize("make", CONTINUOUS_WRAPPERS.values(), ids=CONTINUOUS_WRAPPERS.keys())
def test_continuous_sites_score_with_the_law_they_draw_from(estimator, make):
    # E[x²] = t² + 1 for x ~ Normal(t, 1), whatever the wrapper's log_prob says
    assert_unbiased(grads_of(lambda t: px.sample(make(t), estimator) ** 2, 0.8), 1.6)


@pytest.mark.parametrize("estimator", [px.reinforce, px.LeaveOneOut(3), px.enum],
                         ids=["reinforce", "loo", "enum"])
def test_a_mask_inside_a_composite_that_cannot_be_rebuilt_is_refused(estimator):
    # ZeroInflated draws from its masked base's law but scores with the masked log_prob
    def program(p):
        base = dist.Binomial(3, probs=p).mask(False)
        return px.sample(dist.ZeroInflatedDistribution(base, gate=0.2), estimator,
                         name="z").astype(jnp.float32)

    with pytest.raises(px.UnsupportedEstimatorError,
                       match="'z'.*masked .* inside ZeroInflatedProbs.*cannot rebuild"):
        one_grad(program, np.float32(0.4))


X3 = np.array([-1.2, 0.4, 2.0], np.float32)


def _mask_model(x):
    with numpyro.plate("data", 3):
        c = numpyro.sample("c", dist.Bernoulli(probs=0.3))
        numpyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)


def _mask_guide(x):
    logits = numpyro.param("logits", jnp.zeros(3))
    with numpyro.plate("data", 3), numpyro.handlers.mask(mask=PARTIAL):
        numpyro.sample("c", dist.Bernoulli(logits=logits))


def _exact_masked_elbo(params):
    """NumPyro's ELBO with the guide's log density masked: Σ_i Σ_c q_i(c) [log p(x_i, c)
    - m_i log q_i(c)] (the masked element contributes no log q term)."""
    logits = params["logits"]
    total = 0.0
    for c in (0.0, 1.0):
        log_q = c * jax.nn.log_sigmoid(logits) + (1 - c) * jax.nn.log_sigmoid(-logits)
        log_p = (np.log(0.3) if c else np.log(0.7)) + stats.norm.logpdf(X3, 2 * c - 1, 1)
        total = total + jnp.sum(jnp.exp(log_q) * (log_p - PARTIAL * log_q))
    return total


@pytest.mark.parametrize("name", ["default", "enum", "loo"])
def test_numpyro_mask_in_a_guide_keeps_the_objective_masked(name):
    estimators = {"default": {}, "enum": {"c": px.enum}, "loo": {"c": px.LeaveOneOut(3)}}[name]
    loss = px.numpyro.ELBO(estimators=estimators)
    params = {"logits": jnp.asarray(LOGITS3)}

    def value_and_grad(k):
        return jax.value_and_grad(lambda p: -loss.loss(k, p, _mask_model, _mask_guide, X3))(
            params)

    exact_value, exact_grad = jax.value_and_grad(_exact_masked_elbo)(params)
    if name == "enum":
        value, grad = value_and_grad(KEY)
        close(value, exact_value)
        close(grad["logits"], exact_grad["logits"])
    else:
        _, grads = many(value_and_grad, num=NUM)
        assert_unbiased(grads["logits"], exact_grad["logits"])


# --------------------------------------------------- 3. probabilities at numpyro's clamps

VALUES3 = jnp.array([1.0, 4.0, -2.0])


def _binomial_second_moment(n, p):  # E[k²] = n p (1 - p) + n² p², and its p-derivative
    return n * p * (1 - p) + n**2 * p**2, n * (1 - 2 * p) + 2 * n**2 * p


@pytest.mark.parametrize("p", [NEAR_ONE, 0.0, 1.0], ids=["1-2^-24", "0", "1"])
def test_enumeration_gradients_at_the_clamps(p):
    p = np.float32(p)
    # Bernoulli: E = 12 p + 3 (1 - p)
    value, grad = one_grad(
        lambda q: 3.0 * (px.sample(dist.Bernoulli(probs=q), px.enum) + 1.0) ** 2, p)
    close(value, 12 * np.float64(p) + 3 * (1 - np.float64(p)))
    close(grad, 9.0)
    # Binomial(3): E[k²]
    exact_value, exact_grad = _binomial_second_moment(3, np.float64(p))
    value, grad = one_grad(
        lambda q: px.sample(dist.Binomial(3, probs=q), px.enum).astype(jnp.float32) ** 2, p)
    close(value, exact_value)
    close(grad, exact_grad, rtol=1e-4)
    # zero-inflated Binomial(3) with gate 0.2: (1 - g) E[k²]
    value, grad = one_grad(lambda q: px.sample(dist.ZeroInflatedDistribution(
        dist.Binomial(3, probs=q), gate=0.2), px.enum).astype(jnp.float32) ** 2, p)
    close(value, 0.8 * exact_value)
    close(grad, 0.8 * exact_grad, rtol=1e-4)


def test_enumeration_gradient_at_a_zero_categorical_probability():
    # probs (0.6 - t, 0.4, t) at t = 0: dE/dt = f(2) - f(0), not -f(0)
    def program(t):
        probs = jnp.stack([0.6 - t, 0.4, t])
        return VALUES3[px.sample(dist.Categorical(probs=probs), px.enum)]

    value, grad = one_grad(program, np.float32(0.0))
    close(value, 0.6 * 1.0 + 0.4 * 4.0)
    close(grad, VALUES3[2] - VALUES3[0])
    # jointly enumerated batch (a product over elements, not a plate sum): E[Π_i f(c_i)]
    probs2 = np.array([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0]], np.float32)
    value, grad = one_grad(
        lambda q: jnp.prod(VALUES3[px.sample(dist.Categorical(probs=q), px.enum)]), probs2)
    per_element = probs2 @ np.asarray(VALUES3)
    close(value, np.prod(per_element))
    close(grad, per_element[::-1, None] * np.asarray(VALUES3)[None, :])


def test_plate_enumeration_gradient_at_zero_categorical_probabilities():
    # a plate enumerated per element: d/dprobs_ij Σ_i E[w_i f(c_i)] = w_i f(j)
    probs = np.array([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]],
                     np.float32)
    weights = np.array([1.0, 2.0, -1.0, 0.5], np.float32)

    def plate(q):
        return jnp.sum(weights * VALUES3[px.sample(dist.Categorical(probs=q), px.enum)])

    value, grad = one_grad(plate, probs)
    close(value, np.sum(weights * (probs @ VALUES3)))
    close(grad, weights[:, None] * VALUES3[None, :])


def test_score_function_gradients_near_the_clamp():
    # Bernoulli(p): f(c) = 3c never sees the rare c = 0, dE/dp = 3
    grads = grads_of(lambda q: 3.0 * px.sample(dist.Bernoulli(probs=q), px.reinforce), NEAR_ONE)
    assert_unbiased(grads, 3.0, what="reinforce, Bernoulli")
    # Binomial(2^20, p): failures are not rare (n (1 - p) = 1/16); f(k) = k, dE/dp = n
    n = 2**20
    for est in [px.LeaveOneOut(3), px.Reinforce(baseline=float(n))]:
        grads = grads_of(lambda q: px.sample(dist.Binomial(n, probs=q), est).astype(
            jnp.float32), NEAR_ONE)
        assert_unbiased(grads, float(n), what=f"{type(est).__name__}, Binomial")


# ------------------------------------------------------------- 4. point masses in trees

LOCS3 = np.array([0.0, 1.0, 3.0], np.float32)
SLOPES3 = np.array([1.0, 2.0, -1.0], np.float32)
POINT_MASS_ESTIMATORS = {"default": None, **SCORE_FUNCTION}


@pytest.mark.parametrize("estimator", POINT_MASS_ESTIMATORS.values(),
                         ids=POINT_MASS_ESTIMATORS.keys())
def test_point_masses_inside_mixtures(estimator):
    traced_atoms = lambda t: dist.MixtureSameFamily(  # noqa: E731
        dist.Categorical(probs=np.array([0.4, 0.6], np.float32)), dist.Delta(jnp.stack([t, 2 * t])))
    atom_and_density = lambda t: dist.MixtureGeneral(  # noqa: E731
        dist.Categorical(logits=jnp.stack([t, 0.0])), [dist.Normal(0.0, 1.0), dist.Delta(0.0)],
        support=REAL)
    moved_atom = lambda t: dist.MixtureGeneral(  # noqa: E731
        dist.Categorical(probs=np.array([0.4, 0.6], np.float32)),
        [dist.TransformedDistribution(dist.Delta(0.0), T.AffineTransform(t, 1.0)),
         dist.Delta(1.0)], support=REAL)
    for make in (traced_atoms, atom_and_density, moved_atom):
        with pytest.raises(px.UnsupportedEstimatorError,
                           match="'m'.*point mass.*component index at its own site"):
            one_grad(lambda t: px.sample(make(t), estimator, name="m") ** 2, 0.5)
    # constant atoms only: a discrete law; E[x²] = Σ_k w_k loc_k²
    atoms = lambda t: dist.MixtureGeneral(  # noqa: E731
        dist.Categorical(logits=t * SLOPES3), [dist.Delta(float(v)) for v in LOCS3])
    exact = jax.grad(lambda t: jnp.dot(jax.nn.softmax(t * SLOPES3), LOCS3**2))(0.5)
    assert_unbiased(grads_of(lambda t: px.sample(atoms(t), estimator) ** 2, 0.5), exact)
    # the explicit form: the component index at its own site, then the atom (pathwise)
    def explicit(t):
        k = px.sample(dist.Categorical(probs=np.array([0.4, 0.6], np.float32)), px.enum)
        return px.sample(dist.Delta(jnp.stack([t, 2 * t])[k]), estimator) ** 2

    close(one_grad(explicit, 0.5)[1], 0.4 * 2 * 0.5 + 0.6 * 8 * 0.5)


# ---------------------------------------------- 5. baselines and per-element scores

X4 = np.array([-0.3, 1.5, -4.0, 9.0], np.float32)
MU = jnp.array([-1.0, 1.0])
LOGITS4 = np.array([0.2, -0.5, 0.9, -1.3], np.float32)


def _g(c, theta, x, scale):
    """Per-element ELBO-like terms: log N(x_i; scale_i mu[c_i], 1) - log q(c_i)."""
    return (dist.Normal(MU[c] * scale, 1.0).log_prob(x)
            - dist.Bernoulli(logits=theta).log_prob(c))


def _plate_program(estimator, x, separable=True):
    scale = np.sqrt(np.abs(x))

    def program(theta, *_):
        c = px.sample(dist.Bernoulli(logits=theta), estimator, name="c")
        terms = _g(c, theta, x, scale)
        return jnp.sum(terms) if separable else jnp.sum(terms) + 0.1 * jnp.prod(c + 1.0)

    return program


def _plate_exact(theta, x, separable=True):
    """Σ_i Σ_c q_i(c) g_i(c) (+ 0.1 Π_i E[c_i + 1]): explicit sums over each element."""
    scale = np.sqrt(np.abs(x))
    p = jax.nn.sigmoid(theta)
    total = 0.0
    for c in (0, 1):
        q = p if c else 1 - p
        g = stats.norm.logpdf(x, MU[c] * scale, 1.0) - jnp.where(
            c, jax.nn.log_sigmoid(theta), jax.nn.log_sigmoid(-theta))
        total = total + jnp.sum(q * g)
    return total if separable else total + 0.1 * jnp.prod(p + 1.0)


def _element_means(theta, x):
    """E[g_i] per element (numpy): a good per-element baseline."""
    scale = np.sqrt(np.abs(x))
    p = special.expit(np.asarray(theta, np.float64))
    means = 0.0
    for c in (0, 1):
        q = p if c else 1 - p
        means = means + q * (stats.norm.logpdf(x, MU[c] * scale, 1.0) - np.log(q))
    return means.astype(np.float32)


def test_per_element_baselines_are_unbiased():
    b = _element_means(LOGITS4, X4)
    for separable, rao_blackwellise in [(True, True), (True, False), (False, True)]:
        est = px.Reinforce(baseline=b, rao_blackwellise=rao_blackwellise)
        grads = grads_of(_plate_program(est, X4, separable), LOGITS4)
        exact = jax.grad(_plate_exact)(LOGITS4, X4, separable)
        assert_unbiased(grads, exact, what=f"separable={separable}, rb={rao_blackwellise}")


def test_scalar_baseline_on_a_per_element_site_is_refused_and_whole_objective_kept():
    scalar = float(np.sum(_element_means(LOGITS4, X4)))
    with pytest.raises(px.UnsupportedEstimatorError,
                       match=r"'c'.*scalar Reinforce baseline.*shape \(4,\)"):
        one_grad(_plate_program(px.Reinforce(baseline=scalar), X4), LOGITS4)
    with pytest.raises(px.UnsupportedEstimatorError, match=r"scalar or a per-element.*\(4,\)"):
        one_grad(_plate_program(px.Reinforce(baseline=np.zeros(3, np.float32)), X4), LOGITS4)
    # the whole-objective score with the scalar, as before (rao_blackwellise=False)
    est = px.Reinforce(baseline=scalar, rao_blackwellise=False)
    grads = grads_of(_plate_program(est, X4), LOGITS4)
    assert_unbiased(grads, jax.grad(_plate_exact)(LOGITS4, X4))


X30 = (np.geomspace(0.1, 30.0, 30) * np.where(np.arange(30) % 2, 1.0, -1.0)).astype(np.float32)
LOGITS30 = (0.3 * np.cos(np.arange(30.0))).astype(np.float32)


def test_per_element_baseline_variance_on_a_30_element_plate():
    # data of scales 0.1 to 30: per-element terms g_i from about -1 to -460
    b = _element_means(LOGITS30, X30)

    def variance(est):
        grads = grads_of(_plate_program(est, X30), LOGITS30, num=4000)
        return float(np.sum(np.var(np.asarray(grads, np.float64), axis=0)))

    per_element = variance(px.Reinforce(baseline=b))
    no_baseline = variance(px.reinforce)
    spread = variance(px.Reinforce(baseline=np.full(30, b.sum() / 30, np.float32)))
    whole = variance(px.Reinforce(baseline=float(b.sum()), rao_blackwellise=False))
    # a per-element baseline removes most of the variance; the whole-objective scalar one
    # and the scalar spread as b / n do not
    assert per_element < 0.02 * no_baseline
    assert per_element < 0.01 * whole
    assert per_element < 0.02 * spread
