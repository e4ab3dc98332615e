"""`fit`, the back-end protocol and `OptaxBackend` (statistical checks at K_SE = 4).

Optima are checked against closed forms: E[-(x - 3)^2] with x ~ Normal(θ, 1), the
conjugate Gaussian ELBO (tests/helpers.py), the log evidence of tutorial 02's model by
one-dimensional quadrature (written with numpy, independently of ppl_ext), and the digits
VAE's ELBO before and after training.
"""

import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import ppl_ext as px
from models import digits, vae
from ppl_ext._kernel import AbstractKernel
from ppl_ext.optim import (
    AbstractBackend,
    BackendInfo,
    EarlyStopping,
    FitHistory,
    FitResult,
    OptaxBackend,
    OptaxState,
    fit,
)
from tests.helpers import (
    assert_within_se,
    exact_gaussian_elbo,
    mean_and_se,
    record_comparisons,
)


@px.expectation
def quadratic(params):
    """E[-(x - 3)^2] = -(θ - 3)^2 - 1 with x ~ Normal(θ, 1): maximal at θ = 3."""
    x = px.sample(dist.Normal(params["theta"], 1.0))
    return -((x - 3.0) ** 2)


@px.expectation
def quadratic_loss(params):
    """The negated objective, a loss to minimise."""
    x = px.sample(dist.Normal(params["theta"], 1.0))
    return (x - 3.0) ** 2


THETA0 = {"theta": jnp.asarray(0.0)}


def test_adam_maximises_closed_form_objective():
    optimiser = optax.adam(optax.cosine_decay_schedule(0.1, 600, alpha=0.01))
    result = fit(quadratic, THETA0, optimiser, 600, jax.random.key(0), progress=False)
    assert isinstance(result, FitResult) and isinstance(result.history, FitHistory)
    assert isinstance(result.state, OptaxState)
    assert abs(float(result.params["theta"]) - 3.0) < 0.15  # gradient noise: sd 2
    history = result.history
    assert history.value.shape == history.grad_norm.shape == (600,)
    assert history.step[-1] == 600 and history.wall_time.shape == history.step.shape
    assert np.all(np.diff(history.wall_time) >= 0) and history.compile_time > 0
    # estimates are in the objective's own sign: near the optimum E[value] = -1 and
    # E[|gradient|^2] = E[4 eps^2] = 4
    last = history.value[-300:]
    mean, se = mean_and_se(last)
    assert_within_se(mean + 1.0, se, atol=0.05, what="objective near the optimum")
    assert_within_se(np.mean(history.grad_norm[-300:] ** 2) - 4.0,
                     np.std(history.grad_norm[-300:] ** 2) / np.sqrt(300), atol=0.05)


def test_sgd_robbins_monro_reaches_the_optimum_in_distribution():
    # SGD with step 1/(2(t+1)) on E[-(x - 3)^2]: θ_T - 3 = -(1/T) Σ_t eps_t exactly, so
    # θ_T - 3 ~ Normal(0, 1/T).
    num_steps = 1000
    optimiser = optax.sgd(lambda count: 0.5 / (count + 1.0))
    result = fit(quadratic, THETA0, optimiser, num_steps, jax.random.key(1), progress=False)
    assert_within_se(float(result.params["theta"]) - 3.0, 1.0 / math.sqrt(num_steps),
                     what="Robbins-Monro iterate")
    # minimising the negated objective is the same run
    loss = fit(quadratic_loss, THETA0, optimiser, num_steps, jax.random.key(1),
               maximize=False, progress=False)
    np.testing.assert_allclose(loss.params["theta"], result.params["theta"], rtol=1e-6)
    np.testing.assert_allclose(loss.history.value, -result.history.value, rtol=1e-6)


# ------------------------------------------------------------- objectives from px.vi


X = 1.3


def gaussian_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gaussian_guide(x):
    loc = numpyro.param("loc", 0.0)
    log_scale = numpyro.param("log_scale", 0.0)
    numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)))


def test_elbo_reaches_the_exact_posterior():
    # q = Normal(loc, e^log_scale); the posterior is Normal(x/2, 1/2), where the ELBO
    # equals log p(x) = log Normal(x; 0, 2).
    objective = px.vi.elbo(px.gen.NumPyroModel(gaussian_model),
                           px.gen.NumPyroModel(gaussian_guide))
    params = {"loc": jnp.asarray(-1.0), "log_scale": jnp.asarray(0.5)}
    optimiser = optax.adam(optax.cosine_decay_schedule(0.05, 800, alpha=0.01))
    result = fit(objective, params, optimiser, 800, jax.random.key(2), X, progress=False)
    assert abs(float(result.params["loc"]) - X / 2) < 0.1
    assert abs(float(result.params["log_scale"]) - 0.5 * math.log(0.5)) < 0.1
    log_evidence = float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(X))
    assert float(exact_gaussian_elbo(result.params, X)) > log_evidence - 0.01
    assert float(exact_gaussian_elbo(params, X)) < log_evidence - 0.5  # it had to move


Y_OBS, NOISE = 1.5, 0.3


def banana_model(y):
    """Tutorial 02's model: z ~ Normal(0, I_2), y | z ~ Normal(z_2 + z_1^2, 0.3)."""
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("y", dist.Normal(z[1] + z[0] ** 2, NOISE), obs=y)


def full_rank_guide(y):
    loc = numpyro.param("loc", jnp.zeros(2))
    raw = numpyro.param("raw_tril", jnp.zeros((2, 2)))
    scale_tril = jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diag(raw)))
    numpyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def banana_log_evidence() -> float:
    """log p(y): z_2 integrates out (y | z_1 ~ Normal(z_1^2, 1 + 0.3^2)); then quadrature."""
    z1 = np.linspace(-8.0, 8.0, 200_001)
    var = 1.0 + NOISE**2
    integrand = (np.exp(-0.5 * z1**2) / math.sqrt(2 * math.pi)
                 * np.exp(-0.5 * (Y_OBS - z1**2) ** 2 / var) / math.sqrt(2 * math.pi * var))
    return math.log(np.sum(integrand) * (z1[1] - z1[0]))


def test_iwelbo_of_tutorial_model_approaches_the_log_evidence():
    num_particles = 8
    objective = px.vi.iwelbo(px.gen.NumPyroModel(banana_model),
                             px.gen.NumPyroModel(full_rank_guide), num_particles)
    params = {"loc": jnp.zeros(2), "raw_tril": jnp.zeros((2, 2))}
    optimiser = optax.adam(optax.cosine_decay_schedule(0.05, 3000, alpha=0.05))
    result = fit(objective, params, optimiser, 3000, jax.random.key(3), Y_OBS, progress=False)
    log_evidence = banana_log_evidence()
    estimates = jax.jit(jax.vmap(objective, in_axes=(0, None, None)))
    keys = jax.random.split(jax.random.key(4), 4000)
    before, _ = mean_and_se(estimates(keys, params, Y_OBS))
    after, se = mean_and_se(estimates(keys, result.params, Y_OBS))
    # IWELBO <= log p(y): one-sided check at K_SE standard errors
    record_comparisons(1)
    assert after <= log_evidence + 4 * se, (after, se, log_evidence)
    # the posterior has two modes (z_1 = ±sqrt(y - z_2)), so a Gaussian guide keeps a gap:
    # about 0.25 nats at K = 8 (0.42 at the prior, where the fit starts)
    assert after > log_evidence - 0.35 and after > before + 0.1, (before, after, log_evidence)


def initial_params(model, guide, x):
    """NumPyro's initial values of the `numpyro.param` sites of `model` and `guide`."""
    params = {}
    for fn in (model, guide):
        trace = numpyro.handlers.trace(numpyro.handlers.seed(fn, 0)).get_trace(x)
        params.update({k: s["value"] for k, s in trace.items() if s["type"] == "param"})
    return params


def test_digits_vae_elbo_improves():
    model, guide = vae.make_vae(jax.random.key(0), latent_dim=4, hidden=32)
    x_train, x_test, _, _ = digits.load_split()
    x = jnp.asarray(x_train[:256])
    params = jax.jit(initial_params, static_argnums=(0, 1))(model, guide, x)
    objective = px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))
    result = fit(objective, params, optax.adam(3e-3), 300, jax.random.key(1), x,
                 progress=False)
    eval_key = jax.random.key(2)
    before = vae.estimate_elbo(params, (model, guide), x_test, eval_key, num_samples=4)
    after = vae.estimate_elbo(result.params, (model, guide), x_test, eval_key, num_samples=4)
    # 64 binary pixels: an untrained decoder gives about -64 log 2 ≈ -44 nats per image;
    # 300 full-batch Adam steps on 256 images reach about -21.6 on the test split
    assert before < -40.0 and after > -25.0, (before, after)
    training = result.history.value / x.shape[0]
    assert np.mean(training[-30:]) > np.mean(training[:30]) + 15.0


# ---------------------------------------------------------------- the back-end protocol


class SearchState(NamedTuple):
    params: dict
    value: jax.Array


class RandomSearch(AbstractBackend):
    """A value-only back-end: keep a Gaussian proposal when its estimate is lower."""

    step_size: float

    def init(self, key, params, objective, *args, **kwargs):
        return SearchState(params, jnp.asarray(jnp.inf))

    def step(self, key, state, objective, *args, **kwargs):
        key_move, key_value = jax.random.split(key)
        leaves, tree = jax.tree.flatten(state.params)
        keys = jax.random.split(key_move, len(leaves))
        proposal = jax.tree.unflatten(tree, [
            leaf + self.step_size * jax.random.normal(k, leaf.shape)
            for leaf, k in zip(leaves, keys)])
        current = objective(key_value, state.params, *args, **kwargs)
        candidate = objective(key_value, proposal, *args, **kwargs)
        better = candidate < current
        params = jax.tree.map(lambda a, b: jnp.where(better, a, b), proposal, state.params)
        return (SearchState(params, jnp.minimum(current, candidate)),
                BackendInfo(current, jnp.asarray(jnp.nan)))

    def params(self, state):
        return state.params


@px.expectation
def narrow(params):
    """E[-(x - 3)^2] with x ~ Normal(θ, 0.1): little noise for a value-only search."""
    x = px.sample(dist.Normal(params["theta"], 0.1))
    return -((x - 3.0) ** 2)


def test_custom_value_only_backend_runs_through_fit():
    seen = []

    class Recording(RandomSearch):
        def init(self, key, params, objective, *args, **kwargs):
            seen.append(objective)
            return super().init(key, params, objective, *args, **kwargs)

    result = fit(narrow, THETA0, Recording(0.3), 400, jax.random.key(4), progress=False)
    assert abs(float(result.params["theta"]) - 3.0) < 0.3
    assert np.all(np.isnan(result.history.grad_norm))
    assert isinstance(result.state, SearchState)
    # the back-end minimises what it receives: the negated objective, a px.Expectation
    (target,) = seen
    assert isinstance(target, px.Expectation)
    key = jax.random.key(5)
    assert float(target(key, THETA0)) == -float(narrow(key, THETA0))
    # history values are in the user's sign
    assert np.mean(result.history.value[-100:]) < 0


def test_abstract_classes_cannot_be_instantiated():
    with pytest.raises(TypeError):
        AbstractKernel()
    with pytest.raises(TypeError):
        AbstractBackend()

    class NoParams(AbstractBackend):
        def init(self, key, params, objective, *args, **kwargs):
            return params

        def step(self, key, state, objective, *args, **kwargs):
            return state, BackendInfo(jnp.asarray(0.0), jnp.asarray(0.0))

    with pytest.raises(TypeError):
        NoParams()
    with pytest.raises(TypeError, match="GradientTransformation"):
        OptaxBackend("adam")


def test_raw_transformation_is_wrapped_and_keys_reproduce():
    adam = optax.adam(0.05)
    a = fit(quadratic, THETA0, adam, 50, jax.random.key(6), progress=False)
    b = fit(quadratic, THETA0, OptaxBackend(adam), 50, jax.random.key(6), progress=False)
    c = fit(quadratic, THETA0, adam, 50, jax.random.key(7), progress=False)
    np.testing.assert_array_equal(a.history.value, b.history.value)
    assert float(a.params["theta"]) == float(b.params["theta"])
    assert float(a.params["theta"]) != float(c.params["theta"])


def test_chunk_size_does_not_change_the_result():
    runs = [fit(quadratic, THETA0, optax.adam(0.05), 40, jax.random.key(8), chunk_size=c,
                progress=False) for c in (1, 7, 40, None)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.params["theta"], runs[0].params["theta"])
        np.testing.assert_array_equal(run.history.value, runs[0].history.value)
        np.testing.assert_array_equal(run.history.grad_norm, runs[0].history.grad_norm)
    assert list(runs[0].history.step) == list(range(1, 41))
    assert list(runs[1].history.step) == [7, 14, 21, 28, 35, 40]


def test_record_grad_norm_false_keeps_the_fit_and_leaves_norms_nan():
    runs = [fit(quadratic, THETA0, optax.adam(0.05), 30, jax.random.key(8), chunk_size=7,
                progress=False, record_grad_norm=record) for record in (True, False)]
    np.testing.assert_array_equal(runs[1].params["theta"], runs[0].params["theta"])
    np.testing.assert_array_equal(runs[1].history.value, runs[0].history.value)
    assert np.all(np.isfinite(runs[0].history.grad_norm))
    assert runs[1].history.grad_norm.shape == (30,)
    assert np.all(np.isnan(runs[1].history.grad_norm))


def test_no_retrace_per_chunk():
    traces = {"count": 0}

    @px.expectation
    def counted(params):
        traces["count"] += 1  # runs once per trace of the program
        x = px.sample(dist.Normal(params["theta"], 1.0))
        return -((x - 3.0) ** 2)

    chunks = []
    fit(counted, THETA0, optax.adam(0.05), 20, jax.random.key(9), chunk_size=20,
        progress=False, callbacks=lambda step, state, history: chunks.append(step))
    one_chunk = traces["count"]
    traces["count"] = 0
    chunks.clear()
    fit(counted, THETA0, optax.adam(0.05), 20, jax.random.key(9), chunk_size=1,
        progress=False, callbacks=lambda step, state, history: chunks.append(step))
    assert len(chunks) == 20
    assert traces["count"] == one_chunk <= 2  # the input check, then the compiled loop


def test_callbacks_see_the_history_so_far():
    calls = []

    def record(step, state, history):
        assert isinstance(state, OptaxState) and isinstance(history, FitHistory)
        calls.append((step, len(history.value), len(history.grad_norm),
                      list(history.step), float(state.params["theta"])))

    result = fit(quadratic, THETA0, optax.adam(0.05), 25, jax.random.key(10), chunk_size=10,
                 progress=False, callbacks=[record, record])
    assert [c[0] for c in calls] == [10, 10, 20, 20, 25, 25]
    assert all(c[0] == c[1] == c[2] for c in calls)
    assert calls[-1][3] == [10, 20, 25]
    assert calls[-1][4] == float(result.params["theta"])


def test_early_stopping_by_callable_and_by_rule():
    stop_at_30 = fit(quadratic, THETA0, optax.adam(0.05), 100, jax.random.key(11),
                     chunk_size=10, progress=False,
                     early_stopping=lambda step, state, history: step >= 30)
    assert stop_at_30.history.value.shape == (30,) and stop_at_30.history.step[-1] == 30
    full = fit(quadratic, THETA0, optax.adam(0.05), 30, jax.random.key(11), chunk_size=10,
               progress=False)
    np.testing.assert_array_equal(stop_at_30.params["theta"], full.params["theta"])

    @px.expectation
    def deterministic(params):  # -(θ - 3)^2, no randomness: the chunk means settle
        return -((params["theta"] - 3.0) ** 2)

    rule = EarlyStopping(patience=3, min_delta=1e-4)
    result = fit(deterministic, THETA0, optax.adam(0.3), 5000, jax.random.key(12),
                 chunk_size=20, progress=False, early_stopping=rule)
    num_run = len(result.history.value)
    assert 60 < num_run < 5000 and num_run % 20 == 0
    assert abs(float(result.params["theta"]) - 3.0) < 0.05
    # the same rule minimising the loss stops at the same step
    @px.expectation
    def deterministic_loss(params):
        return (params["theta"] - 3.0) ** 2

    loss = fit(deterministic_loss, THETA0, optax.adam(0.3), 5000, jax.random.key(12),
               chunk_size=20, maximize=False, progress=False, early_stopping=rule)
    assert len(loss.history.value) == num_run


def test_progress_bar_opens_before_compilation(capsys):
    class Announcing(RandomSearch):
        def step(self, key, state, objective, *args, **kwargs):
            print("TRACING STEP", file=sys.stderr)  # runs while the loop is traced
            return super().step(key, state, objective, *args, **kwargs)

    fit(quadratic, THETA0, Announcing(0.3), 50, jax.random.key(13), chunk_size=25)
    err = capsys.readouterr().err
    assert "px.fit" in err and "TRACING STEP" in err
    assert err.index("px.fit") < err.index("TRACING STEP")
    assert "compiling" in err and "objective" in err and "50/50" in err


def test_lbfgs_gets_value_and_value_fn():
    @px.expectation
    def rosenbrock_like(params):  # deterministic: a line search sees a smooth function
        a, b = params["a"], params["b"]
        return (1.0 - a) ** 2 + 10.0 * (b - a**2) ** 2

    params = {"a": jnp.asarray(-1.0), "b": jnp.asarray(1.0)}
    result = fit(rosenbrock_like, params, optax.lbfgs(), 60, jax.random.key(14),
                 maximize=False, progress=False)
    assert abs(float(result.params["a"]) - 1.0) < 1e-2
    assert abs(float(result.params["b"]) - 1.0) < 2e-2


def test_several_parameter_arguments():
    class TwoParams:  # an objective whose parameters come in two arguments, as px.vi's
        params_argnums = (1, 2)

        def __init__(self):
            @px.expectation
            def program(first, second, target):
                x = px.sample(dist.Normal(first["a"] + second["b"], 1.0))
                return -((x - target) ** 2) - (first["a"] - second["b"]) ** 2

            self.expectation = program

    params = ({"a": jnp.asarray(0.0)}, {"b": jnp.asarray(0.0)})
    optimiser = optax.adam(optax.cosine_decay_schedule(0.1, 500, alpha=0.01))
    result = fit(TwoParams(), params, optimiser, 500, jax.random.key(15), 4.0,
                 progress=False)
    first, second = result.params
    assert abs(float(first["a"]) - 2.0) < 0.1 and abs(float(second["b"]) - 2.0) < 0.1
    with pytest.raises(TypeError, match="tuple of 2"):
        fit(TwoParams(), params[0], optimiser, 5, jax.random.key(15), 4.0, progress=False)


def test_bad_input_gives_clear_errors():
    key = jax.random.key(0)
    adam = optax.adam(0.1)
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        fit(quadratic, THETA0, adam, 0, key)
    with pytest.raises(TypeError, match="num_steps must be an int"):
        fit(quadratic, THETA0, adam, 10.0, key)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        fit(quadratic, THETA0, adam, 10, key, chunk_size=0)
    with pytest.raises(TypeError, match="px.Expectation"):
        fit(lambda key, params: 0.0, THETA0, adam, 10, key)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        fit(quadratic, THETA0, "adam", 10, key)
    with pytest.raises(TypeError, match="PRNG key"):
        fit(quadratic, THETA0, adam, 10, 0)
    with pytest.raises(TypeError, match="did you mean 'chunk_size'"):
        fit(quadratic, THETA0, adam, 10, key, chunksize=5)
    with pytest.raises(TypeError, match="did you mean 'maximize'"):
        fit(quadratic, THETA0, adam, 10, key, maximise=False)
    with pytest.raises(TypeError, match="signature"):
        fit(quadratic, THETA0, adam, 10, key, 1.0)  # an argument the program does not take
    with pytest.raises(TypeError, match="floating-point"):
        fit(quadratic, {"theta": jnp.asarray(0)}, adam, 10, key)
    with pytest.raises(KeyError) as info:
        fit(quadratic, {"thetta": jnp.asarray(0.0)}, adam, 10, key)
    assert "initial params" in "".join(getattr(info.value, "__notes__", []))
    with pytest.raises(TypeError, match="early_stopping"):
        fit(quadratic, THETA0, adam, 10, key, early_stopping=5)
    with pytest.raises(ValueError, match="patience"):
        fit(quadratic, THETA0, adam, 10, key, early_stopping=EarlyStopping(patience=0))
    with pytest.raises(TypeError, match="callbacks"):
        fit(quadratic, THETA0, adam, 10, key, callbacks=[1])
    with pytest.raises(TypeError, match="record_grad_norm must be True or False"):
        fit(quadratic, THETA0, adam, 10, key, record_grad_norm="no")
    with pytest.raises(TypeError, match="did you mean 'record_grad_norm'"):
        fit(quadratic, THETA0, adam, 10, key, record_grad_norms=False)

    @px.expectation
    def vector(params):
        return px.sample(dist.Normal(params["theta"], 1.0).expand([3]))

    with pytest.raises(px.ObjectiveShapeError, match="scalar"):
        fit(vector, THETA0, adam, 10, key)
    with pytest.warns(UserWarning, match=r"params\['unused'\]"):
        fit(quadratic, {**THETA0, "unused": jnp.asarray(1.0)}, adam, 2, key, progress=False)


def test_backend_protocol_violations_are_named():
    class ShapeChanging(RandomSearch):
        def step(self, key, state, objective, *args, **kwargs):
            state, info = super().step(key, state, objective, *args, **kwargs)
            return state._replace(value=jnp.zeros(2)), info

    with pytest.raises(TypeError, match="ShapeChanging.step changed a state leaf's shape"):
        fit(quadratic, THETA0, ShapeChanging(0.1), 5, jax.random.key(0), progress=False)

    class NoInfo(RandomSearch):
        def step(self, key, state, objective, *args, **kwargs):
            state, info = super().step(key, state, objective, *args, **kwargs)
            return state, {"value": info.value}

    with pytest.raises(TypeError, match="BackendInfo"):
        fit(quadratic, THETA0, NoInfo(0.1), 5, jax.random.key(0), progress=False)


def test_fit_refuses_params_entries_an_objective_never_reads():
    """A misspelt key of a px.vi objective's params is refused by name, as the objective
    itself refuses it (a plain px.Expectation only warns: it may ignore inputs)."""
    def model(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 1.0))

    objective = px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))
    with pytest.raises(ValueError, match=r"\['lco'\] are not read"):
        fit(objective, {"loc": jnp.asarray(0.0), "lco": jnp.asarray(1.0)}, optax.adam(0.1), 5,
            jax.random.key(0), 1.0, progress=False)
    result = fit(objective, {"loc": jnp.asarray(0.0)}, optax.adam(0.1), 5, jax.random.key(0),
                 1.0, progress=False)
    assert np.isfinite(float(result.params["loc"]))
