"""Common tests over the generative-function registry (`registry.GENERATIVE_FUNCTIONS`).

Statistical checks (moments of `simulate`'s choices, inclusion frequencies of subsample
indices, the SIR law): 2·10^4 draws within K_SE = 4 standard errors of closed forms.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl_ext as px
from tests.conformance.registry import GENERATIVE_FUNCTIONS, GenFnCase, sharded
from tests.helpers import assert_unbiased, assert_within_se, many, tree_allclose

NUM = 20_000
CASES = pytest.mark.parametrize("case", GENERATIVE_FUNCTIONS, ids=lambda c: c.name)


def _simulate_and_assess(case: GenFnCase):
    gen_fn = case.build()

    @px.expectation
    def run(params):
        trace = gen_fn.simulate(params, *case.args)
        assessed = gen_fn.assess(trace.choices, params, *case.args)
        choices = jax.tree.map(lambda x: jnp.asarray(x, float), trace.choices)
        return choices, trace.log_density, assessed

    return gen_fn, run


@CASES
def test_is_a_generative_function(case: GenFnCase):
    gen_fn = case.build()
    assert isinstance(gen_fn, px.gen.AbstractGenerativeFunction)
    # generate is a sub-protocol a class implements or visibly does not
    assert hasattr(gen_fn, "generate") == isinstance(gen_fn, px.gen.AbstractConditionable)


@CASES
def test_assess_of_simulated_choices(case: GenFnCase):
    _, run = _simulate_and_assess(case)
    choices, log_density, assessed = run(jax.random.key(0), case.params)
    assert jnp.shape(log_density) == jnp.shape(assessed) == ()
    assert np.isfinite(log_density) and np.isfinite(assessed)
    if case.exact:
        assert np.allclose(log_density, assessed, rtol=1e-5, atol=1e-5), case.name


@CASES
def test_jit_vmap_and_two_devices(case: GenFnCase):
    _, run = _simulate_and_assess(case)
    keys = jax.random.split(jax.random.key(1), 4)
    batched = jax.jit(jax.vmap(run, (0, None)))(keys, case.params)
    one_by_one = jax.tree.map(lambda *x: jnp.stack(x), *[run(k, case.params) for k in keys])
    assert tree_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)
    two = sharded(lambda k: jax.vmap(run, (0, None))(k, case.params), keys)
    assert tree_allclose(batched, two, rtol=1e-5, atol=1e-5)
    # distinct keys give distinct draws (never one draw repeated)
    first = jax.tree.leaves(batched[0])[0]
    assert len(np.unique(np.asarray(first))) > 1 or first.dtype == bool or len(
        np.unique(np.asarray(batched[1]))) > 1


@CASES
def test_goodness_of_fit_of_simulate(case: GenFnCase):
    gen_fn = case.build()
    if not case.moments:
        pytest.skip("no closed-form moments")

    @px.expectation
    def moments(params):
        choices = gen_fn.simulate(params, *case.args).choices
        return jnp.stack([jnp.asarray(g(choices), float) for g, _ in case.moments])

    draws = many(lambda k: moments(k, case.params), num=NUM)
    assert_unbiased(draws, np.array([m for _, m in case.moments]), what=case.name)


@pytest.mark.parametrize("case", [c for c in GENERATIVE_FUNCTIONS if c.drawn_log_density],
                         ids=lambda c: c.name)
def test_generate_weight_identity(case: GenFnCase):
    """`generate(all choices)` weighs by `assess`; `generate({})` by what was not drawn."""
    gen_fn = case.build()
    assert isinstance(gen_fn, px.gen.AbstractConditionable)

    @px.expectation
    def check(params):
        trace = gen_fn.simulate(params, *case.args)
        full, full_weight = gen_fn.generate(trace.choices, params, *case.args)
        assessed = gen_fn.assess(trace.choices, params, *case.args)
        free, free_weight = gen_fn.generate({}, params, *case.args)
        drawn = case.drawn_log_density(free.choices, params, *case.args)
        return (full_weight - assessed, full.log_density - assessed,
                free.log_density - drawn - free_weight)

    for key in jax.random.split(jax.random.key(2), 3):
        errors = check(key, case.params)
        assert np.allclose(errors, 0.0, atol=1e-5), (case.name, errors)


def test_sir_law_goodness_of_fit():
    """`px.vi.normalize` (SIR) over a discrete proposal: the law of the selected value,
    against its exact law computed by enumerating every K-tuple of candidates."""
    values = jnp.arange(3)
    target = jnp.array([0.2, 0.5, 0.3])
    proposal = jnp.array([0.5, 0.3, 0.2])
    k = 3

    def model():
        numpyro.sample("v", dist.Categorical(probs=target))

    def guide():
        numpyro.sample("v", dist.Categorical(probs=proposal))

    sir = px.vi.normalize(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide), k)

    @px.expectation
    def one_hot(params):
        return jax.nn.one_hot(sir.simulate(params).choices["v"], 3)

    draws = many(lambda key: one_hot(key, {}), num=NUM)
    weights = np.asarray(target / proposal)
    exact = np.zeros(3)
    for tup in itertools.product(range(3), repeat=k):
        prob = np.prod(np.asarray(proposal)[list(tup)])
        w = weights[list(tup)]
        for i, v in enumerate(tup):
            exact[v] += prob * w[i] / w.sum()
    assert_unbiased(draws, exact, what="SIR law")
    assert not np.allclose(exact, target, atol=0.02)  # K = 3 is far from the target: a real test
    del values


def test_subsample_indices_are_uniform_without_replacement():
    """A subsampling plate's indices: each index is included with probability m/N and a
    minibatch never repeats an index."""
    size, subsample = 7, 3

    def model():
        with numpyro.plate("data", size, subsample_size=subsample):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    gen_fn = px.gen.NumPyroModel(model)

    @px.expectation
    def included(params):
        indices = gen_fn.simulate(params).choices["data"]
        return jnp.zeros(size).at[indices].add(1.0)

    counts = many(lambda key: included(key, {}), num=NUM)
    assert np.all(np.asarray(counts) <= 1.0), "an index repeated within one minibatch"
    mean = np.asarray(counts).mean(0)
    se = np.sqrt(subsample / size * (1 - subsample / size) / NUM)
    assert_within_se(mean - subsample / size, se, what="inclusion frequency")
