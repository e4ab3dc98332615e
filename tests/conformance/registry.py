"""The conformance registries: every estimator, generative function, objective, SVI loss and
back-end of ppl_ext, each with what the common tests need to check it.

A new component is one file in `ppl_ext/` plus one entry here; the parametrised tests in
this folder then check it (jit, vmap over keys, no retrace, pytree parameters, float32 and
x64, two devices equal one, protocol identities, exact or bounded values, goodness of
fit). Exact values are written here in closed form, without ppl_ext.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.stats import norm

import ppl_ext as px

try:  # optional; its import touches deprecated jax names (silenced by the adapter)
    from ppl_ext.gen._genjax import _genjax

    genjax = _genjax()
except ImportError:  # pragma: no cover
    genjax = None

# ---------------------------------------------------------------------------- estimators


@dataclasses.dataclass(frozen=True)
class EstimatorCase:
    """An estimator on one site `x ~ law(theta)` and a test function `f(x)`.

    `exact(theta)` is `E[f(x)]` in closed form; its derivative (by jax.grad of the closed
    form) is what the gradient estimates must average to.
    """

    name: str
    estimator: Any
    law: Callable[[Any], dist.Distribution]
    f: Callable[[Any], Any]
    exact: Callable[[Any], Any]
    theta: float
    #: test-function bins for a goodness-of-fit check of the derivative measure (MVD)
    bins: tuple[float, ...] | None = None


def _normal(theta):
    return dist.Normal(theta, 1.0)


def _normal_quadratic(x):
    return (x - 3.0) ** 2


def _normal_quadratic_exact(theta):
    return (theta - 3.0) ** 2 + 1.0


def _bernoulli(theta):
    return dist.Bernoulli(logits=theta)


def _categorical(theta):
    return dist.Categorical(logits=theta * jnp.arange(3.0))


_CATEGORY_VALUES = jnp.array([1.0, 4.0, -2.0])


def _poisson(theta):
    return dist.Poisson(jnp.exp(theta))


ESTIMATORS: list[EstimatorCase] = [
    EstimatorCase("reparam/normal", px.reparam, _normal, _normal_quadratic,
                  _normal_quadratic_exact, 0.5),
    EstimatorCase("reinforce/normal", px.reinforce, _normal, _normal_quadratic,
                  _normal_quadratic_exact, 0.5),
    EstimatorCase("reinforce+baseline/normal", px.Reinforce(baseline=6.0), _normal,
                  _normal_quadratic, _normal_quadratic_exact, 0.5),
    EstimatorCase("reinforce/categorical", px.reinforce, _categorical,
                  lambda x: _CATEGORY_VALUES[x],
                  lambda t: jnp.dot(jax.nn.softmax(t * jnp.arange(3.0)), _CATEGORY_VALUES),
                  0.3),
    EstimatorCase("leave-one-out/normal", px.LeaveOneOut(4), _normal, _normal_quadratic,
                  _normal_quadratic_exact, 0.5),
    EstimatorCase("enum/bernoulli", px.enum, _bernoulli, lambda x: (x + 1.0) ** 2,
                  lambda t: 1.0 + 3.0 * jax.nn.sigmoid(t), 0.4),
    EstimatorCase("enum/categorical", px.enum, _categorical, lambda x: _CATEGORY_VALUES[x],
                  lambda t: jnp.dot(jax.nn.softmax(t * jnp.arange(3.0)), _CATEGORY_VALUES),
                  0.3),
    EstimatorCase("mvd/normal", px.mvd, _normal, _normal_quadratic, _normal_quadratic_exact,
                  0.5, bins=(-1.0, 0.0, 0.5, 1.0, 2.0)),
    EstimatorCase("mvd/poisson", px.mvd, _poisson, lambda x: x**2,
                  lambda t: jnp.exp(t) + jnp.exp(2 * t), 0.2, bins=(0.5, 1.5, 2.5, 3.5)),
    EstimatorCase("mvd/bernoulli", px.mvd, _bernoulli, lambda x: (x + 1.0) ** 2,
                  lambda t: 1.0 + 3.0 * jax.nn.sigmoid(t), 0.4),
]


def estimator_program(case: EstimatorCase, counter: list | None = None):
    """`E[f(x)]`, `x ~ law(params["theta"])` as an expectation of a pytree parameter."""

    def program(params):
        if counter is not None:
            counter.append(1)
        x = px.sample(case.law(params["theta"]), case.estimator)
        return jnp.asarray(case.f(x), jnp.result_type(float))

    return px.expectation(program)


# ------------------------------------------------------------------ generative functions
# One conjugate model: z ~ N(prior_loc, 1), x ~ N(z, 1), x observed. Its posterior is
# N((prior_loc + x) / 2, 1/2) and its evidence N(x; prior_loc, 2).

X_OBS = 1.0
PRIOR_LOC = 0.2
POSTERIOR_LOC = (PRIOR_LOC + X_OBS) / 2
POSTERIOR_SCALE = math.sqrt(0.5)


def gaussian_model(x):
    z = numpyro.sample("z", dist.Normal(numpyro.param("prior_loc", 0.0), 1.0))
    numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gaussian_guide(x):
    loc = numpyro.param("loc", 0.0)
    scale = jnp.exp(numpyro.param("log_scale", 0.0))
    numpyro.sample("z", dist.Normal(loc, scale))


def coin_model(x):
    c = numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("logit", 0.0)))
    numpyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)


def log_evidence(prior_loc=PRIOR_LOC, x=X_OBS):
    return norm.logpdf(x, prior_loc, math.sqrt(2.0))


#: params at which the Gaussian guide is the exact posterior
POSTERIOR_PARAMS = {"prior_loc": jnp.asarray(PRIOR_LOC), "loc": jnp.asarray(POSTERIOR_LOC),
                    "log_scale": jnp.asarray(math.log(POSTERIOR_SCALE))}


class Coin(px.gen.AbstractGenerativeFunction):
    """A generative function written directly against the protocol (the docs' skeleton)."""

    def simulate(self, params, *args):
        law = dist.Bernoulli(logits=params["logit"])
        c = px.sample(law)
        return px.gen.Trace({"c": c}, law.log_prob(c), c)

    def assess(self, choices, params, *args):
        return dist.Bernoulli(logits=params["logit"]).log_prob(choices["c"])


def joint_guide(x):
    """`u ~ N(0, 1)`, `z ~ N(loc + a u, s)`: marginal of z is N(loc, sqrt(a² + s²))."""
    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0) + JOINT_A * u, JOINT_S))


JOINT_A, JOINT_S = 0.5, 0.5  # a² + s² = 1/2: the marginal is the posterior's scale


def reverse_guide(kept, x):
    """The exact conditional `u | z` of `joint_guide` (so the marginal estimate is exact)."""
    total = JOINT_A**2 + JOINT_S**2
    mean = JOINT_A * (kept["z"] - numpyro.param("loc", 0.0)) / total
    numpyro.sample("u", dist.Normal(mean, math.sqrt(JOINT_S**2 / total)))


@dataclasses.dataclass(frozen=True)
class GenFnCase:
    """A generative function with parameters and arguments, and what is known about it.

    - `exact`: `simulate`'s log density is exact (so `assess(choices)` must equal it);
    - `drawn_log_density(choices, params, *args)`: the log density of the drawn choices
      alone, in closed form (checks `generate`'s weight identity), or None;
    - `moments`: `(g, exact E[g(choices)])` pairs, a goodness-of-fit check of `simulate`.
    """

    name: str
    build: Callable[[], px.gen.AbstractGenerativeFunction]
    params: dict
    args: tuple
    exact: bool = True
    drawn_log_density: Callable | None = None
    moments: tuple = ()


def _gaussian_drawn(choices, params, x):
    return norm.logpdf(choices["z"], params["prior_loc"], 1.0)


def _coin_drawn(choices, params, x):
    return dist.Bernoulli(logits=params["logit"]).log_prob(choices["c"])


def _genjax_model():
    @genjax.gen
    def model(x):
        z = genjax.normal(0.2, 1.0) @ "z"
        genjax.normal(z, 1.0) @ "x"

    return px.gen.GenJAXModel(model, observations=lambda x: {"x": x})


_SIGMOID_03 = 1.0 / (1.0 + math.exp(-0.3))

GENERATIVE_FUNCTIONS: list[GenFnCase] = [
    GenFnCase("numpyro/gaussian-model", lambda: px.gen.NumPyroModel(gaussian_model),
              {"prior_loc": jnp.asarray(PRIOR_LOC)}, (X_OBS,),
              drawn_log_density=_gaussian_drawn,
              moments=((lambda c: c["z"], PRIOR_LOC), (lambda c: c["z"] ** 2,
                                                        1.0 + PRIOR_LOC**2))),
    GenFnCase("numpyro/gaussian-guide", lambda: px.gen.NumPyroModel(gaussian_guide),
              {"loc": jnp.asarray(0.3), "log_scale": jnp.asarray(-0.5)}, (X_OBS,),
              drawn_log_density=lambda c, p, x: norm.logpdf(c["z"], p["loc"],
                                                            jnp.exp(p["log_scale"])),
              moments=((lambda c: c["z"], 0.3),)),
    GenFnCase("numpyro/coin", lambda: px.gen.NumPyroModel(coin_model),
              {"logit": jnp.asarray(0.3)}, (0.5,), drawn_log_density=_coin_drawn,
              moments=((lambda c: c["c"], _SIGMOID_03),)),
    GenFnCase("genjax/gaussian-model", _genjax_model, {}, (X_OBS,),
              drawn_log_density=lambda c, p, x: norm.logpdf(c["z"], PRIOR_LOC, 1.0),
              moments=((lambda c: c["z"], PRIOR_LOC),)),
    GenFnCase("user/coin", Coin, {"logit": jnp.asarray(0.3)}, (),
              moments=((lambda c: c["c"], _SIGMOID_03),)),
    GenFnCase("vi/marginal", lambda: px.vi.marginal(
        px.gen.NumPyroModel(joint_guide), ["z"], px.gen.NumPyroModel(reverse_guide), 3),
        {"loc": jnp.asarray(0.3)}, (X_OBS,), exact=False,
        moments=((lambda c: c["z"], 0.3), (lambda c: c["z"] ** 2, 0.5 + 0.09))),
    GenFnCase("vi/normalize", lambda: px.vi.normalize(
        px.gen.NumPyroModel(gaussian_model), px.gen.NumPyroModel(gaussian_guide), 4),
        {**POSTERIOR_PARAMS}, (X_OBS,), exact=False,
        # the proposal is the posterior: every weight is equal, SIR returns a posterior draw
        moments=((lambda c: c["z"], POSTERIOR_LOC),
                 (lambda c: c["z"] ** 2, POSTERIOR_LOC**2 + 0.5))),
    # the exact velocity of the linear path from N(0, 1) to N(m, s²): the flow's law is
    # N(m, s²) and its exact-divergence density that law's (up to the ODE solver)
    GenFnCase("flows/gaussian-flow", lambda: px.flows.FlowModel(gaussian_flow_velocity, 1,
                                                                num_steps=16),
              {"m": jnp.asarray(1.0), "s": jnp.asarray(2.0)}, (),
              moments=((lambda c: c["x"][0], 1.0), (lambda c: c["x"][0] ** 2, 5.0))),
]


# SMC over one time step whose initial proposal is the exact posterior p(x_0 | y_0): every
# weight is p(y_0), so the returned state is a posterior draw (a Gaussian, in closed form)
_SMC_Y, _SMC_S0, _SMC_SY = 0.7, 1.5, 0.5
_SMC_POSTERIOR_VAR = 1.0 / (1.0 / _SMC_S0**2 + 1.0 / _SMC_SY**2)
_SMC_POSTERIOR_MEAN = _SMC_POSTERIOR_VAR * _SMC_Y / _SMC_SY**2


def _smc_one_step():
    model = px.smc.StateSpaceModel(
        initial=lambda p, u: dist.Normal(0.0, p["s0"]),
        transition=lambda p, x, t, u: dist.Normal(x, 1.0),
        observation=lambda p, x, t, u: dist.Normal(x, p["sy"]),
        initial_proposal=lambda p, y, u: dist.Normal(
            y * p["s0"] ** 2 / (p["s0"] ** 2 + p["sy"] ** 2),
            jnp.sqrt(1.0 / (1.0 / p["s0"] ** 2 + 1.0 / p["sy"] ** 2))))
    return px.smc.SMC(model, 4)


GENERATIVE_FUNCTIONS.append(
    GenFnCase("smc/one-step-exact-proposal", _smc_one_step,
              {"s0": jnp.asarray(_SMC_S0), "sy": jnp.asarray(_SMC_SY)},
              (jnp.array([_SMC_Y]),), exact=False,
              moments=((lambda c: c["x"][0], _SMC_POSTERIOR_MEAN),
                       (lambda c: c["x"][0] ** 2,
                        _SMC_POSTERIOR_MEAN**2 + _SMC_POSTERIOR_VAR))))


# a uniform forward policy on the 1-D hypergrid of side 3: exit first with probability 1/2,
# reach the far end (two moves) with probability 1/4
def _gfn_sampler():
    return px.gfn.ForwardPolicySampler(px.gfn.TabularPolicy(px.gfn.Hypergrid(1, 3)))


GENERATIVE_FUNCTIONS.append(
    GenFnCase("gfn/forward-policy-sampler", _gfn_sampler,
              {"forward": jnp.zeros((3, 2)), "log_z": jnp.asarray(0.0)}, (),
              moments=((lambda c: (c["actions"][0] == 1).astype(jnp.float32), 0.5),
                       (lambda c: ((c["actions"][0] == 0) & (c["actions"][1] == 0)).astype(
                           jnp.float32), 0.25))))


def gaussian_flow_velocity(params, t, x):
    """`E[x1 - x0 | x_t = x]` for `x0 ~ N(0, 1)`, `x1 ~ N(m, s²)`, `x_t = (1-t) x0 + t x1`."""
    m, s = params["m"], params["s"]
    variance = (1 - t) ** 2 + t**2 * s**2
    return m + (t * s**2 - (1 - t)) * (x - t * m) / variance


# -------------------------------------------------------------------- interpolant paths


@dataclasses.dataclass(frozen=True)
class PathCase:
    """An interpolant path (`px.flows.AbstractPath`); `tests/conformance/test_paths.py`
    checks its boundary conditions and its derivatives by finite differences."""

    name: str
    build: Callable[[], Any]


PATHS: list[PathCase] = [
    PathCase("linear", lambda: px.flows.LinearPath()),
    PathCase("trigonometric", lambda: px.flows.TrigonometricPath()),
    PathCase("vp", lambda: px.flows.VPPath()),
    PathCase("linear+bridge", lambda: px.flows.LinearPath(px.flows.BridgeGamma(2.0))),
    PathCase("linear+bridge(0.5)", lambda: px.flows.LinearPath(px.flows.BridgeGamma(0.5))),
    PathCase("trigonometric+parabolic",
             lambda: px.flows.TrigonometricPath(px.flows.ParabolicGamma(1.5))),
    PathCase("kinetic-optimal", lambda: px.flows.KineticOptimalPath.from_data(
        jax.random.key(0), np.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 1.5]]), num_samples=64,
        num_grid=513)),
]


# -------------------------------------------------------------------- minibatch couplings


@dataclasses.dataclass(frozen=True)
class CouplingCase:
    """A minibatch coupling (`px.flows.AbstractCoupling`); `tests/conformance/
    test_couplings.py` checks its indices (shape, dtype, a permutation where
    `permutation`), jit against eager, vmap against a loop, two devices against one."""

    name: str
    build: Callable[[], Any]
    permutation: bool = True


COUPLINGS: list[CouplingCase] = [
    CouplingCase("independent", lambda: px.flows.IndependentCoupling()),
    CouplingCase("exact_ot(pot)", lambda: px.flows.ExactOTCoupling(solver="pot")),
    CouplingCase("exact_ot(scipy)", lambda: px.flows.ExactOTCoupling(solver="scipy")),
    CouplingCase("exact_ot(hungarian)", lambda: px.flows.ExactOTCoupling(solver="hungarian")),
    CouplingCase("auction_ot", lambda: px.flows.AuctionOTCoupling()),
    CouplingCase("entropic_ot(permutation)",
                 lambda: px.flows.EntropicOTCoupling(epsilon=0.05, permutation=True)),
    CouplingCase("entropic_ot(sampled rows)",
                 lambda: px.flows.EntropicOTCoupling(epsilon=0.5), permutation=False),
]


# ---------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class ObjectiveCase:
    """An objective of the Gaussian model, guide at the exact posterior.

    There every bound equals `log p(x)` for every draw (`value_at_posterior`), the guide's
    gradient averages to 0, and the model's `prior_loc` gradient to
    `d/dθ log p(x) = (x - θ)/2` for bounds (Fisher's identity) or 0 for divergences that
    are minimal there (`prior_gradient`). `call(objective, key, params)` runs it.
    """

    name: str
    build: Callable[[], Any]
    value_at_posterior: float | None
    prior_gradient: float
    call: Callable = staticmethod(lambda objective, key, params, **kw: objective(
        key, params, X_OBS, **kw))
    grads: Callable = staticmethod(lambda objective, key, params: objective.grad(
        key, params, X_OBS))
    is_bound: bool = True


M = px.gen.NumPyroModel(gaussian_model)
Q = px.gen.NumPyroModel(gaussian_guide)
_FISHER = (X_OBS - PRIOR_LOC) / 2


def _dreg_call(objective, key, params, **kw):
    model_params = {"prior_loc": params["prior_loc"]}
    guide_params = {"loc": params["loc"], "log_scale": params["log_scale"]}
    return objective(key, model_params, guide_params, X_OBS, **kw)


def _dreg_grads(objective, key, params):
    model_params = {"prior_loc": params["prior_loc"]}
    guide_params = {"loc": params["loc"], "log_scale": params["log_scale"]}
    g_model, g_guide = objective.grad(key, model_params, guide_params, X_OBS, argnums=(1, 2))
    return {**g_model, **g_guide}


def _hvi_parts():
    return (px.gen.NumPyroModel(joint_guide), ["z"], px.gen.NumPyroModel(reverse_guide))


OBJECTIVES: list[ObjectiveCase] = [
    ObjectiveCase("elbo", lambda: px.vi.elbo(M, Q), log_evidence(), _FISHER),
    ObjectiveCase("iwelbo", lambda: px.vi.iwelbo(M, Q, 4), log_evidence(), _FISHER),
    ObjectiveCase("renyi", lambda: px.vi.renyi(M, Q, 0.5, 4), log_evidence(), _FISHER),
    ObjectiveCase("wake_p", lambda: px.vi.wake_p(M, Q, 4), log_evidence(), _FISHER),
    ObjectiveCase("wake_q", lambda: px.vi.wake_q(M, Q, 4), None, 0.0, is_bound=False),
    ObjectiveCase("vimco", lambda: px.vi.vimco(M, Q, 4), log_evidence(), _FISHER),
    ObjectiveCase("iwelbo_dreg", lambda: px.vi.iwelbo_dreg(M, Q, 4), log_evidence(), _FISHER,
                  call=_dreg_call, grads=_dreg_grads),
    ObjectiveCase("symmetric_kl", lambda: px.vi.symmetric_kl(M, Q, 4), 0.0, 0.0,
                  is_bound=False),
    ObjectiveCase("hvi", lambda: px.vi.hvi(M, *_hvi_parts(), 2), log_evidence(), _FISHER),
    ObjectiveCase("diwhvi", lambda: px.vi.diwhvi(M, *_hvi_parts(), 2, 3), log_evidence(),
                  _FISHER),
]

#: params of the HVI cases at the posterior (their guide has `loc` only)
HVI_POSTERIOR_PARAMS = {"prior_loc": jnp.asarray(PRIOR_LOC), "loc": jnp.asarray(POSTERIOR_LOC)}


def objective_params(case: ObjectiveCase) -> dict:
    return HVI_POSTERIOR_PARAMS if case.name in ("hvi", "diwhvi") else POSTERIOR_PARAMS


# ---------------------------------------------------------------------------- SVI losses


@dataclasses.dataclass(frozen=True)
class LossCase:
    """A `px.numpyro` loss; at the posterior guide its loss is `-log p(x)` for every draw."""

    name: str
    build: Callable[[], Any]
    #: the loss is `-log p(x)` for every draw (else only in mean: analytic KL terms)
    exact_per_draw: bool = True


LOSSES: list[LossCase] = [
    LossCase("ELBO", lambda: px.numpyro.ELBO()),
    LossCase("ELBO(num_particles=3)", lambda: px.numpyro.ELBO(num_particles=3)),
    LossCase("ELBO(analytic_kl=True)", lambda: px.numpyro.ELBO(analytic_kl=True),
             exact_per_draw=False),
    LossCase("IWELBO", lambda: px.numpyro.IWELBO(4)),
    LossCase("IWELBO(num_samples=2)", lambda: px.numpyro.IWELBO(4, num_samples=2)),
    LossCase("VIMCO", lambda: px.numpyro.VIMCO(4)),
    LossCase("ObjectiveLoss(renyi)", lambda: px.numpyro.ObjectiveLoss(
        lambda m, g: px.vi.renyi(m, g, 0.5, 4))),
]


def loss_params() -> dict:
    return dict(POSTERIOR_PARAMS)


# ----------------------------------------------------------------------------- back-ends


@dataclasses.dataclass(frozen=True)
class BackendCase:
    """A back-end for `px.fit` (an optax transformation or an `AbstractBackend`) and the
    number of steps it needs to bring E[-(x - 3)²], x ~ N(θ, 1), from θ = 0 to within
    `tolerance` of its maximiser θ = 3."""

    name: str
    build: Callable[[], Any]
    num_steps: int = 400
    tolerance: float = 0.3


def _optax():
    import optax

    return optax


BACKENDS: list[BackendCase] = [
    BackendCase("optax.adam", lambda: _optax().adam(
        _optax().cosine_decay_schedule(0.1, 400, alpha=0.01))),
    BackendCase("OptaxBackend(optax.sgd)", lambda: px.OptaxBackend(_optax().sgd(
        _optax().cosine_decay_schedule(0.05, 400, alpha=0.01)))),
    BackendCase("OptaxBackend(optax.chain(clip, adamw))", lambda: px.OptaxBackend(
        _optax().chain(_optax().clip_by_global_norm(5.0), _optax().adamw(
            _optax().cosine_decay_schedule(0.1, 400, alpha=0.01), weight_decay=0.0)))),
    # value-only particle methods on a noisy objective: one key per step for the whole cloud
    # (the comparison between particles is then exact) and 4 estimates averaged per particle
    BackendCase("CBO(anisotropic)", lambda: px.optim.CBO(
        num_particles=50, alpha=10.0, sigma=1.0, dt=0.1, init_scale=3.0, num_samples=4,
        common_random_numbers=True)),
    BackendCase("CBO(isotropic)", lambda: px.optim.CBO(
        num_particles=50, alpha=10.0, sigma=0.5, dt=0.1, noise="isotropic", init_scale=3.0,
        num_samples=4, common_random_numbers=True)),
    BackendCase("ConsensusHopping", lambda: px.optim.ConsensusHopping(
        num_particles=50, alpha=5.0, sigma=0.1, num_samples=4, common_random_numbers=True)),
    BackendCase("PolarisedCBO", lambda: px.optim.PolarisedCBO(
        num_particles=50, alpha=10.0, sigma=1.0, dt=0.1, kernel_width=2.0, init_scale=3.0,
        num_samples=4, common_random_numbers=True)),
    BackendCase("ConsensusBasedSampling(optimisation)", lambda: px.optim.ConsensusBasedSampling(
        num_particles=50, alpha=10.0, dt=0.2, mode="optimisation", init_scale=3.0,
        num_samples=4, common_random_numbers=True)),
    BackendCase("ZerothOrderSGD", lambda: px.optim.ZerothOrderSGD(
        _optax().cosine_decay_schedule(0.05, 400, alpha=0.01), smoothing=0.1,
        num_directions=4)),
    BackendCase("ZerothOrderSGD(optax.adam)", lambda: px.optim.ZerothOrderSGD(
        _optax().adam(_optax().cosine_decay_schedule(0.1, 400, alpha=0.01)), smoothing=0.1,
        num_directions=4)),
    BackendCase("ZerothOrderRankSGD", lambda: px.optim.ZerothOrderRankSGD(
        _optax().cosine_decay_schedule(0.3, 400, alpha=0.01), smoothing=0.1,
        num_candidates=8)),
    BackendCase("QuantizedZerothOrderSGD", lambda: px.optim.QuantizedZerothOrderSGD(
        _optax().adam(_optax().cosine_decay_schedule(0.1, 400, alpha=0.01)), smoothing=0.1,
        num_directions=4, clip=50.0)),
    # curvature: M-FAC preconditioning (the gradient noise keeps the empirical Fisher
    # non-degenerate), and gradient-regularised Newton with a decaying step (each Newton
    # step jumps to the minimiser of that step's sampled objective)
    BackendCase("OptaxBackend(mfac)", lambda: px.OptaxBackend(_optax().chain(
        px.optim.mfac(num_gradients=8, damping=1.0), _optax().scale_by_learning_rate(
            _optax().cosine_decay_schedule(0.5, 400, alpha=0.01))))),
    BackendCase("GradientRegularisedNewton(FiniteDifferenceHessian)", lambda:
                px.optim.GradientRegularisedNewton(
                    px.optim.FiniteDifferenceHessian(), step_size=_optax().cosine_decay_schedule(
                        1.0, 400, alpha=0.01))),
    BackendCase("GradientRegularisedNewton(ExactHessian, unbiased hvp)", lambda:
                px.optim.GradientRegularisedNewton(
                    px.optim.ExactHessian(), step_size=_optax().cosine_decay_schedule(
                        1.0, 400, alpha=0.01))),
    # normalised policy-gradient methods (a 1/t step: normalised steps have a fixed length)
    BackendCase("NormalisedHARPG", lambda: px.optim.NormalisedHARPG(
        step_size=px.optim.decaying_step_size(0.1, 100.0))),
    BackendCase("NormalisedPGIGT", lambda: px.optim.NormalisedPGIGT(
        step_size=px.optim.decaying_step_size(0.1, 100.0))),
]


# ----------------------------------------------------------------------------- helpers


def sharded(fn, *arrays):
    """`fn(*arrays)` with the leading axis of every array sharded over two host devices."""
    devices = jax.devices()
    assert len(devices) >= 2, "tests/conftest.py sets two host devices"
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("batch",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    return jax.jit(fn)(*(jax.device_put(a, spec) for a in arrays))


# ------------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """A kernel on the protocol of `ppl_ext/_kernel.py` and how to call it.

    `init(kernel, key)` builds a state; `step_args(seed)` gives the arguments after
    `(key, state)` of `kernel.step`, with the same shapes and dtypes for every seed (the
    no-retrace check calls the jitted step with two seeds). Arrays are built inside the
    callables, so that under x64 they are float64.
    """

    name: str
    build: Callable[[], Any]
    init: Callable[[Any, Any], Any]
    step_args: Callable[[int], tuple]


def _smc():
    return px.smc  # imported on first use (lazy subpackage)


def _ssm_1d():
    """x_0 ~ N(0, 1), x_t ~ N(a x_{t-1}, 1), y_t ~ N(x_t, 1/2), with the optimal proposal."""
    def proposal(params, x, t, y, inputs):
        var = 1.0 / (1.0 + 4.0)
        return dist.Normal(var * (params["a"] * x + 4.0 * y), jnp.sqrt(var))

    return _smc().StateSpaceModel(
        initial=lambda params, inputs: dist.Normal(0.0, 1.0),
        transition=lambda params, x, t, inputs: dist.Normal(params["a"] * x, 1.0),
        observation=lambda params, x, t, inputs: dist.Normal(x, 0.5),
        proposal=proposal)


def _ssm_2d():
    """A 2-D random walk observed through its sum (MultivariateNormal laws)."""
    return _smc().StateSpaceModel(
        initial=lambda params, inputs: dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)),
        transition=lambda params, x, t, inputs: dist.MultivariateNormal(
            params["a"] * x, params["q"] * jnp.eye(2)),
        observation=lambda params, x, t, inputs: dist.Normal(x.sum(), 0.5))


def _filter_init(kernel, key):
    params = {"a": jnp.asarray(0.9, float), "q": jnp.asarray(0.5, float)}
    return kernel.init(key, params, jnp.asarray(0.3, float))


def _filter_step_args(seed):
    a = 0.9 - 0.01 * seed
    return ({"a": jnp.asarray(a, float), "q": jnp.asarray(0.5 + 0.1 * seed, float)},
            jnp.asarray(1.0 - 0.5 * seed, float))


def _look_ahead(params, x, t, y, inputs):
    return dist.Normal(params["a"] * x, 1.2).log_prob(y)


def _paris_additive(x_prev, x, t, inputs):
    """`(x_t, x_{t-1} x_t)`, a pytree-valued additive functional."""
    return {"sum": x, "cross": x_prev * x}


def _log_transition_bound(params, t, inputs):
    """`max f(x_t | x_{t-1}) = 1 / sqrt(2π)` for the 1-D model's N(a x, 1) transition."""
    return jnp.asarray(-0.5 * math.log(2 * math.pi), float)


KERNELS: list[KernelCase] = [
    KernelCase("smc.BootstrapFilter", lambda: _smc().BootstrapFilter(_ssm_1d(), 16),
               _filter_init, _filter_step_args),
    KernelCase("smc.BootstrapFilter(multinomial, ess_threshold=0.5)",
               lambda: _smc().BootstrapFilter(_ssm_1d(), 16, "multinomial", 0.5),
               _filter_init, _filter_step_args),
    KernelCase("smc.BootstrapFilter(residual, 2-D)",
               lambda: _smc().BootstrapFilter(_ssm_2d(), 16, "residual"),
               _filter_init, _filter_step_args),
    KernelCase("smc.GuidedFilter(stratified)",
               lambda: _smc().GuidedFilter(_ssm_1d(), 16, "stratified"),
               _filter_init, _filter_step_args),
    KernelCase("smc.AuxiliaryFilter", lambda: _smc().AuxiliaryFilter(
        _ssm_1d(), 16, ess_threshold=0.7, log_auxiliary=_look_ahead),
        _filter_init, _filter_step_args),
    KernelCase("smc.Paris(BootstrapFilter)", lambda: _smc().Paris(
        _smc().BootstrapFilter(_ssm_1d(), 16), _paris_additive), _filter_init,
        _filter_step_args),
    KernelCase("smc.Paris(GuidedFilter, accept-reject)", lambda: _smc().Paris(
        _smc().GuidedFilter(_ssm_1d(), 16, ess_threshold=0.5), _paris_additive,
        num_backward_samples=3, log_transition_bound=_log_transition_bound,
        num_proposals=2), _filter_init, _filter_step_args),
    KernelCase("smc.ParisParticleGibbs (a sweep over the whole series)", lambda: _smc(
        ).ParisParticleGibbs(_ssm_1d(), _paris_additive, num_particles=8),
        lambda kernel, key: kernel.init(key, _filter_step_args(0)[0], jnp.linspace(-1., 1., 5)),
        lambda seed: (_filter_step_args(seed)[0], jnp.linspace(-1.0, 1.0, 5) + 0.1 * seed)),
    KernelCase("smc.MarkovScoreClimbing (mean-field Gaussian, optax.adam)", lambda: _smc(
        ).MarkovScoreClimbing(_ssm_1d(), _smc().mean_field_gaussian(5)[0],
                              _optax().adam(1e-2), num_particles=8),
        lambda kernel, key: kernel.init(key, _smc().mean_field_gaussian(5)[1],
                                        _filter_step_args(0)[0], jnp.linspace(-1., 1., 5)),
        lambda seed: (_filter_step_args(seed)[0], jnp.linspace(-1.0, 1.0, 5) + 0.1 * seed)),
    KernelCase("smc.MarkovScoreClimbing(markov_kernel='ppg')", lambda: _smc(
        ).MarkovScoreClimbing(_ssm_1d(), _smc().mean_field_gaussian(5)[0],
                              _optax().adam(1e-2), num_particles=8, markov_kernel="ppg"),
        lambda kernel, key: kernel.init(key, _smc().mean_field_gaussian(5)[1],
                                        _filter_step_args(0)[0], jnp.linspace(-1., 1., 5)),
        lambda seed: (_filter_step_args(seed)[0], jnp.linspace(-1.0, 1.0, 5) + 0.1 * seed)),
]


# --------------------------------------------------------------------------- environments


@dataclasses.dataclass(frozen=True)
class EnvironmentCase:
    """A GFlowNet environment small enough to enumerate (`px.gfn.AbstractEnvironment`)."""

    name: str
    build: Callable[[], Any]


ENVIRONMENTS: list[EnvironmentCase] = [
    EnvironmentCase("Hypergrid(2, 4)", lambda: px.gfn.Hypergrid(2, 4)),
    EnvironmentCase("Hypergrid(3, 3)", lambda: px.gfn.Hypergrid(3, 3)),
    EnvironmentCase("Hypergrid(1, 6, r0=0.5)", lambda: px.gfn.Hypergrid(1, 6, r0=0.5)),
    EnvironmentCase("BitSequence(n=4, k=1)", lambda: px.gfn.BitSequence(
        [[1, 0, 1, 1], [0, 0, 0, 0]], word_size=1)),
    EnvironmentCase("BitSequence(n=4, k=2, temperature=0.5)", lambda: px.gfn.BitSequence(
        [[1, 1, 0, 1]], word_size=2, temperature=0.5)),
    EnvironmentCase("SetGeneration(U=6, k=3)", lambda: px.gfn.SetGeneration(
        (0.3, -0.7, 0.1, 0.9, -0.2, 0.5), set_size=3)),
    EnvironmentCase("SetGeneration(U=4, k=4)", lambda: px.gfn.SetGeneration(
        (0.5, -1.0, 0.25, 0.0), set_size=4)),
]


# ------------------------------------------------------------------- GFlowNet objectives


@dataclasses.dataclass(frozen=True)
class GfnObjectiveCase:
    """A GFlowNet balance objective on an enumerable environment with a `TabularPolicy`
    (uniform backward policy). At the balanced flows, built by hand in
    `tests/gfn/test_objectives_more.py` (`balanced_params`), its value is 0 for every draw.

    `build(policy)` returns the `px.Expectation`; `forward_looking` marks objectives whose
    learned flow is `log F̃ = log F + E`.
    """

    name: str
    env: Callable[[], Any]
    build: Callable[[Any], Any]
    forward_looking: bool = False


GFN_OBJECTIVES: list[GfnObjectiveCase] = [
    GfnObjectiveCase("trajectory_balance/Hypergrid(2, 4)", lambda: px.gfn.Hypergrid(2, 4),
                     lambda p: px.gfn.trajectory_balance(p, 8)),
    GfnObjectiveCase("detailed_balance/SetGeneration(U=4, k=2)",
                     lambda: px.gfn.SetGeneration((0.5, -1.0, 0.25, 0.0), set_size=2),
                     lambda p: px.gfn.detailed_balance(p, 8, exploration=0.3)),
    GfnObjectiveCase("subtrajectory_balance/BitSequence(n=4, k=2)",
                     lambda: px.gfn.BitSequence([[1, 1, 0, 1]], word_size=2),
                     lambda p: px.gfn.subtrajectory_balance(p, 8, lamda=0.9)),
    GfnObjectiveCase("subtrajectory_balance(geometric)/Hypergrid(3, 3)",
                     lambda: px.gfn.Hypergrid(3, 3),
                     lambda p: px.gfn.subtrajectory_balance(p, 8, lamda=1.5,
                                                            weighting="geometric")),
    GfnObjectiveCase("forward_looking_detailed_balance/Hypergrid(1, 6)",
                     lambda: px.gfn.Hypergrid(1, 6, r0=0.5),
                     lambda p: px.gfn.forward_looking_detailed_balance(p, 8, temperature=2.0),
                     forward_looking=True),
    GfnObjectiveCase("forward_looking_subtrajectory_balance/SetGeneration(U=4, k=2)",
                     lambda: px.gfn.SetGeneration((0.5, -1.0, 0.25, 0.0), set_size=2),
                     lambda p: px.gfn.forward_looking_subtrajectory_balance(p, 8),
                     forward_looking=True),
    GfnObjectiveCase("flow_matching/BitSequence(n=4, k=1)",
                     lambda: px.gfn.BitSequence([[1, 0, 1, 1], [0, 0, 0, 0]], word_size=1),
                     lambda p: px.gfn.flow_matching(p, 8)),
    GfnObjectiveCase("log_partition_variance/Hypergrid(2, 4)", lambda: px.gfn.Hypergrid(2, 4),
                     lambda p: px.gfn.log_partition_variance(p, 8, exploration=0.5)),
]
