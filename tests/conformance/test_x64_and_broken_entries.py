"""The registries under double precision (a fresh process), and deliberately broken entries
that the common tests must catch (a conformance suite that passes everything is useless)."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest
from jax import lax

import ppl_ext as px
from tests.conformance import registry
from tests.conformance import test_generative_functions as generative_function_tests
from tests.conformance import test_objectives as objective_tests
from tests.conformance.test_estimators import check_unbiased

X64_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from tests.conformance import registry
    assert jax.config.jax_enable_x64
    key = jax.random.key(0)
    for case in registry.ESTIMATORS:
        f = registry.estimator_program(case)
        value, grads = f.value_and_grad(key, {"theta": jnp.asarray(case.theta, jnp.float64)})
        assert value.dtype == grads["theta"].dtype == jnp.float64, (case.name, value.dtype)
        assert np.isfinite(value) and np.isfinite(grads["theta"]), case.name
    for case in registry.GENERATIVE_FUNCTIONS:
        gen_fn = case.build()
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), case.params)
        import ppl_ext as px
        run = px.expectation(lambda p: gen_fn.simulate(p, *case.args).log_density)
        assert run(key, params).dtype == jnp.float64, case.name
    for case in registry.OBJECTIVES:
        objective = case.build()
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                              registry.objective_params(case))
        value = case.call(objective, key, params)
        assert value.dtype == jnp.float64, (case.name, value.dtype)
        if case.value_at_posterior is not None:
            assert abs(float(value) - case.value_at_posterior) < 1e-9, (case.name, value)
        grads = case.grads(objective, key, params)
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads)), case.name
    print("ok")
    """
)


def test_every_registry_entry_under_x64():
    env = {**os.environ, "JAX_ENABLE_X64": "1", "XLA_FLAGS": ""}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c",
                             X64_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-4000:])


# ---------------------------------------------------------------- broken entries are caught


def test_a_biased_estimator_entry_fails_the_common_tests():
    # a pathwise estimator forced onto a step function: its gradient is 0, the truth is not
    broken = registry.EstimatorCase(
        "broken/reparam-through-a-step", px.Reparam(allow_discontinuous=True),
        registry._normal, lambda x: jnp.where(x > 0.5, 1.0, 0.0),
        lambda t: jax.scipy.stats.norm.sf(0.5, t, 1.0), 0.3)
    with pytest.raises(AssertionError, match="gradient"):
        check_unbiased(broken, num=4000)


class _MisreportingCoin(px.gen.AbstractGenerativeFunction):
    """`simulate` reports the log density at the wrong scale: assess disagrees."""

    def simulate(self, params, *args):
        law = dist.Bernoulli(logits=params["logit"])
        c = px.sample(law)
        return px.gen.Trace({"c": c}, 0.5 * law.log_prob(c), c)

    def assess(self, choices, params, *args):
        return dist.Bernoulli(logits=params["logit"]).log_prob(choices["c"])


def test_a_generative_function_whose_assess_disagrees_is_caught():
    broken = registry.GenFnCase("broken/misreporting", _MisreportingCoin,
                                {"logit": jnp.asarray(0.3)}, ())
    with pytest.raises(AssertionError, match="broken/misreporting"):
        generative_function_tests.test_assess_of_simulated_choices(broken)


class _PathOnlyELBO(px.vi.AbstractObjective):
    """An ELBO that drops the guide density's parameter dependence: biased."""

    model: px.gen.AbstractGenerativeFunction
    guide: px.gen.AbstractGenerativeFunction

    def program(self, params, *args):
        trace = self.guide.simulate(params, *args)
        return (self.model.assess(trace.choices, params, *args)
                - lax.stop_gradient(trace.log_density))


def test_a_biased_objective_entry_fails_the_common_tests():
    broken = dataclasses.replace(
        registry.OBJECTIVES[0], name="broken/path-only-elbo",
        build=lambda: _PathOnlyELBO(registry.M, registry.Q))
    with pytest.raises(AssertionError, match="log_scale"):
        objective_tests.test_gradient_at_the_posterior(broken)


class _OffByOneGrid(px.gfn.AbstractEnvironment):
    """A hypergrid whose backward step forgets to decrement (a broken protocol identity)."""

    inner: Any

    @property
    def num_actions(self):
        return self.inner.num_actions

    @property
    def num_backward_actions(self):
        return self.inner.num_backward_actions

    @property
    def max_length(self):
        return self.inner.max_length

    @property
    def encoding_size(self):
        return self.inner.encoding_size

    def initial_state(self):
        return self.inner.initial_state()

    def forward_mask(self, state):
        return self.inner.forward_mask(state)

    def backward_mask(self, state):
        return self.inner.backward_mask(state)

    def step(self, state, action):
        return self.inner.step(state, action)

    def backward_step(self, state, action):
        return state  # should undo `step`

    def to_backward_action(self, state, action):
        return self.inner.to_backward_action(state, action)

    def log_reward(self, state):
        return self.inner.log_reward(state)

    def encode(self, state):
        return self.inner.encode(state)

    def all_states(self):
        return self.inner.all_states()

    def state_index(self, state):
        return self.inner.state_index(state)


def test_an_environment_whose_backward_step_is_wrong_is_caught():
    from tests.conformance import test_environments as environment_tests

    broken = registry.EnvironmentCase("broken/backward-step",
                                      lambda: _OffByOneGrid(px.gfn.Hypergrid(2, 3)))
    with pytest.raises(AssertionError):
        environment_tests.test_backward_step_undoes_step(broken)
