"""Variational objectives, each a short expectation program over generative functions.

Each builder returns a `px.Expectation` called as `objective(key, params, *args, **kw)`;
`params` is passed to both the model and the guide (NumPyro style: one parameter dict).
They are written in the same language as user programs and are meant as examples of
writing your own.

Estimator assumptions. ADEV combines per-site estimators soundly, so most objectives are
unbiased (for the quantity they define) whatever estimator each guide site uses: `elbo`,
`iwelbo`, `renyi`, `hvi`/`diwhvi`, `wake_p`, `wake_q`/`forward_kl`, `symmetric_kl` (the
last two are consistent, not unbiased, for the KL they target: the SIR bias).
`normalize`'s selection is an ordinary Categorical site: every estimator that accepts it
is unbiased (`px.reparam` is refused by its own check). Particles are drawn in a
`lax.scan`, where the interpreter refuses continuation estimators by name. Two objectives
are estimators that assume more of the guide, and state it as a `SiteRequirement`
(`_requirements.py`) checked when traced, naming the offending site: `vimco`
(`VIMCO_GUIDE`: score-function sites) and `iwelbo_dreg` (`DREG_GUIDE`: reparameterised
sites); both also need the guide's exact log density (not `marginal` or `normalize`, not
an observed site or factor that depends on the parameters).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

from ..adev import AbstractEstimator, Expectation, expectation, reinforce
from ..gen import AbstractGenerativeFunction
from ._constructs import _check_particles, checks_gen_fns, marginal, normalize
from ._requirements import SiteRequirement, check_sites, pathwise_site, score_function_site


@checks_gen_fns
def elbo(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction) -> Expectation:
    """Evidence lower bound `E_q[log p(x, z) - log q(z)]`.

    Gradient estimators come from the guide's sites (reparam for reparameterisable
    distributions, score function otherwise, or as chosen per site).

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist, ppl_ext as px
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        >>> objective = px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))
        >>> grad_params, grad_x = objective.grad(jax.random.key(0), {"loc": 0.0}, 1.0)
        >>> grad_params["loc"].shape
        ()

    Reference: Jordan et al. 1999; Kingma & Welling 2014; Ranganath et al. 2014.
    """

    @expectation
    def objective(params, *args, **kwargs):
        trace = guide.simulate(params, *args, **kwargs)
        return model.assess(trace.choices, params, *args, **kwargs) - trace.log_density

    return objective


@checks_gen_fns
def iwelbo(
    model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int
) -> Expectation:
    """Importance-weighted bound `E[log (1/K) Σ_k p(x, z_k) / q(z_k)]`, `z_k` iid from q.

    Tighter than the ELBO for `K > 1` and non-decreasing in `K` (Burda et al. 2016). The K
    draws are a `lax.scan`, so each particle's sites use local estimators.

    Reference: Burda, Grosse & Salakhutdinov 2016, "Importance weighted autoencoders".
    """
    _check_particles(num_particles)

    @expectation
    def objective(params, *args, **kwargs):
        log_weights = _log_weights(model, guide, num_particles, params, args, kwargs)
        return logsumexp(log_weights) - math.log(num_particles)

    return objective


def _log_weights(model, guide, num_particles, params, args, kwargs, guide_params=None):
    """`log p(x, z_k) - log q(z_k)` for `num_particles` iid guide draws (a scan)."""
    guide_params = params if guide_params is None else guide_params

    def particle(carry, _):
        trace = guide.simulate(guide_params, *args, **kwargs)
        return carry, model.assess(trace.choices, params, *args, **kwargs) - trace.log_density

    return lax.scan(particle, None, length=num_particles)[1]


@checks_gen_fns
def hvi(
    model: AbstractGenerativeFunction,
    variational_joint: AbstractGenerativeFunction,
    keep,
    reverse: AbstractGenerativeFunction,
    num_particles: int = 1,
) -> Expectation:
    """Hierarchical VI: the ELBO of `marginal(variational_joint, keep, reverse, K)`.

    `K = 1` is HVI (Ranganath, Tran & Blei 2016); `K > 1` is IWHVI (Sobolev & Vetrov 2019),
    a tighter bound. `reverse` is the auxiliary model `r(u | z)` of the dropped choices.
    """
    return elbo(model, marginal(variational_joint, keep, reverse, num_particles))


@checks_gen_fns
def diwhvi(
    model: AbstractGenerativeFunction,
    variational_joint: AbstractGenerativeFunction,
    keep,
    reverse: AbstractGenerativeFunction,
    num_inner: int,
    num_outer: int,
) -> Expectation:
    """Doubly importance-weighted HVI: IWELBO(`num_outer`) of an IWHVI(`num_inner`) marginal.

    Reference: Sobolev & Vetrov 2019, "Importance weighted hierarchical variational
    inference".
    """
    return iwelbo(model, marginal(variational_joint, keep, reverse, num_inner), num_outer)


@checks_gen_fns
def renyi(
    model: AbstractGenerativeFunction,
    guide: AbstractGenerativeFunction,
    alpha: float,
    num_particles: int,
) -> Expectation:
    """Rényi variational bound `E[1/(1-α) log (1/K) Σ_k w_k^(1-α)]`, `w_k = p(x, z_k)/q(z_k)`.

    `α = 0` is the IWELBO, `α → 1` the ELBO (`α = 1` is computed as the mean of `log w_k`).
    For fixed draws the estimate is non-increasing in `α` (power-mean inequality).

    Reference: Li & Turner 2016, "Rényi divergence variational inference".
    """
    _check_particles(num_particles)
    alpha = float(alpha)

    @expectation
    def objective(params, *args, **kwargs):
        log_w = _log_weights(model, guide, num_particles, params, args, kwargs)
        if alpha == 1.0:
            return jnp.mean(log_w)
        scaled = (1.0 - alpha) * log_w
        return (logsumexp(scaled) - math.log(num_particles)) / (1.0 - alpha)

    return objective


@checks_gen_fns
def wake_p(
    model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int
) -> Expectation:
    """Reweighted wake-sleep, wake-p: the IWELBO with the guide's parameters frozen.

    Its gradient w.r.t. the model's parameters is the self-normalised importance-sampling
    estimate `Σ_k w̃_k ∇ log p(x, z_k)`; the guide gets no gradient from it.

    Reference: Bornschein & Bengio 2015, "Reweighted wake-sleep"; Le et al. 2019.
    """
    _check_particles(num_particles)

    @expectation
    def objective(params, *args, **kwargs):
        log_w = _log_weights(model, guide, num_particles, params, args, kwargs,
                             guide_params=lax.stop_gradient(params))
        return logsumexp(log_w) - math.log(num_particles)

    return objective


@checks_gen_fns
def wake_q(
    model: AbstractGenerativeFunction,
    guide: AbstractGenerativeFunction,
    num_particles: int,
    selection_estimator: AbstractEstimator = reinforce,
) -> Expectation:
    """Reweighted wake-sleep, wake-q: `E_{z ~ SIR}[log q(z)]` (forward KL, up to a constant).

    `z` is drawn by `normalize(model, guide, K)` with all parameters frozen, so only
    `log q(z)` is differentiated. The expectation is over the SIR law, which tends to the
    posterior as `K` grows: as an estimate of `-KL(p(z|x) || q) + const` it is biased for
    finite `K` (the usual RWS bias), and unbiased for the SIR objective it defines.

    Reference: Bornschein & Bengio 2015; Le, Kosiorek, Siddharth, Teh & Wood 2019,
    "Revisiting reweighted wake-sleep".
    """
    _check_particles(num_particles)
    sir = normalize(model, guide, num_particles, selection_estimator)

    @expectation
    def objective(params, *args, **kwargs):
        trace = sir.simulate(lax.stop_gradient(params), *args, **kwargs)
        return guide.assess(trace.choices, params, *args, **kwargs)

    return objective


forward_kl = wake_q


#: DReG's guide: every score term is replaced by a pathwise one (refused otherwise).
DREG_GUIDE = SiteRequirement(
    objective="px.vi.iwelbo_dreg",
    role="guide",
    refuse=pathwise_site,
    why=("DReG replaces the guide's score terms by pathwise derivatives of the "
         "guide's exact log density, so every guide site whose law depends on the "
         "parameters must be reparameterised (px.reparam, a distribution with rsample); "
         "at K >= 2 another estimator's score term would be dropped (a biased gradient)."),
    way_out=("Give the site px.reparam (remove its estimator override), or use "
             "px.vi.iwelbo (any estimators) or px.vi.vimco (score-function guides)."),
)


@checks_gen_fns
def iwelbo_dreg(
    model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int
) -> Expectation:
    """IWELBO with the doubly-reparameterised gradient estimator (DReG).

    Called as `objective(key, model_params, guide_params, *args)`: the guide's parameters
    must be separate, since they get `Σ_k w̃_k² ∂ log w_k/∂z_k ∂z_k/∂φ` (path derivative
    only, `log q` with frozen parameters) while the model's get `Σ_k w̃_k ∇θ log p(x, z_k)`.
    The arguments (`x`, also differentiated) get both: `Σ_k w̃_k ∂x log p(x, z_k)` for
    their direct part and the path part through an amortised guide's draws. All are
    unbiased for the IWELBO gradient; the guide part keeps its signal-to-noise ratio as
    `K` grows, unlike the plain IWELBO estimator. The value is the IWELBO estimate.

    Requires (checked when traced, naming the site; `DREG_GUIDE`): the guide's log density
    is exact, and every guide site whose law depends on the parameters or arguments is
    reparameterised with a density (`px.reparam`), or is a point mass that is a function
    of such draws (an autoguide's unpacked latent). A score-function, enumerated or other
    site, or a point mass placed by the parameters themselves (`AutoDelta`), is refused:
    DReG has no term for its score (biased for `K >= 2`).

    Reference: Tucker, Lawson, Gu & Maddison 2019, "Doubly reparameterized gradient
    estimators for Monte Carlo objectives".
    """
    _check_particles(num_particles)
    sg = lax.stop_gradient

    @expectation
    def objective(model_params, guide_params, *args, **kwargs):
        check_sites(DREG_GUIDE, guide, guide_params, *args, **kwargs)
        # the arguments' direct derivative goes to the model-parameter part only; the path
        # part differentiates the draws alone (everything else frozen)
        frozen_args, frozen_kwargs = _stop_gradient((args, kwargs))

        def particle(carry, _):
            z = guide.simulate(guide_params, *args, **kwargs).choices
            frozen_q = sg(guide_params)
            # model-parameter part (no path through z) and path-only part (frozen params)
            log_w_model = model.assess(sg(z), model_params, *args, **kwargs) - guide.assess(
                sg(z), frozen_q, *frozen_args, **frozen_kwargs)
            log_w_path = model.assess(z, sg(model_params), *frozen_args,
                                      **frozen_kwargs) - guide.assess(
                z, frozen_q, *frozen_args, **frozen_kwargs)
            return carry, (log_w_model, log_w_path)

        log_w_model, log_w_path = lax.scan(particle, None, length=num_particles)[1]
        normalized = jax.nn.softmax(sg(log_w_model))
        value = sg(logsumexp(log_w_model) - math.log(num_particles))
        model_term = jnp.sum(sg(normalized) * (log_w_model - sg(log_w_model)))
        path_term = jnp.sum(sg(normalized**2) * (log_w_path - sg(log_w_path)))
        return value + model_term + path_term

    return objective


def _stop_gradient(tree):
    """`stop_gradient` on the floating array leaves of `tree` (others as they are)."""
    def leaf(x):
        if isinstance(x, (jax.Array, float, complex)) and jnp.issubdtype(
                jnp.result_type(x), jnp.inexact):
            return lax.stop_gradient(x)
        return x

    return jax.tree.map(leaf, tree)


#: VIMCO's guide: the leave-one-out baselines multiply `d log q` of each particle.
VIMCO_GUIDE = SiteRequirement(
    objective="px.vi.vimco",
    role="guide",
    refuse=score_function_site,
    why=("VIMCO subtracts, per particle, a leave-one-out baseline times the derivative of "
         "that particle's exact guide log density; that is unbiased only when this "
         "derivative averages to zero, i.e. when every guide site whose law depends on the "
         "parameters or arguments uses the score function (px.reinforce, no baseline: "
         "vimco's default) or is a point mass with a constant log_density."),
    way_out=("Remove the site's estimator override (vimco gives every guide site "
             "px.reinforce), or use px.vi.iwelbo (any estimators) or px.vi.iwelbo_dreg "
             "(reparameterised guides)."),
)


@checks_gen_fns
def vimco(
    model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int
) -> Expectation:
    """IWELBO with the VIMCO score-function estimator (per-particle leave-one-out baselines).

    Every guide site defaults to the score function (`guide.default_estimator` is set to
    `px.reinforce` when the guide has one, so discrete guides work). For particle `k` the
    baseline is the bound with `log w_k` replaced by the mean of the others' log weights;
    it does not depend on `z_k`, so the estimator is unbiased for the IWELBO gradient.
    Needs `K >= 2`.

    Requires (checked when traced, naming the site; `VIMCO_GUIDE`): the guide's log
    density is exact, and every guide site whose law depends on the parameters or
    arguments uses the score function without a baseline of its own, or is a point mass
    with a constant `log_density`. A per-site override to `px.reparam` (or any other
    estimator, or a `px.Reinforce(baseline=...)`) is refused: the baselines would multiply
    a derivative of `log q` that does not average to zero (a biased gradient).

    Reference: Mnih & Rezende 2016, "Variational inference for Monte Carlo objectives".
    """
    if not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(f"vimco needs num_particles >= 2, got {num_particles!r}.")
    if dataclasses.is_dataclass(guide) and any(
            f.name == "default_estimator" for f in dataclasses.fields(guide)):
        guide = dataclasses.replace(guide, default_estimator=reinforce)
    sg = lax.stop_gradient
    k = num_particles

    @expectation
    def objective(params, *args, **kwargs):
        check_sites(VIMCO_GUIDE, guide, params, *args, **kwargs)

        def particle(carry, _):
            trace = guide.simulate(params, *args, **kwargs)
            log_w = model.assess(trace.choices, params, *args, **kwargs) - trace.log_density
            return carry, (log_w, trace.log_density)

        log_w, log_q = lax.scan(particle, None, length=k)[1]
        bound = logsumexp(log_w) - math.log(k)
        # leave-one-out bounds: log w_k replaced by the mean of the other log weights
        others_mean = (jnp.sum(log_w) - log_w) / (k - 1)
        replaced = log_w[None, :] + jnp.diag(others_mean - log_w)
        baselines = logsumexp(sg(replaced), axis=1) - math.log(k)
        # every site already contributes sg(bound) · score; subtract the baselines' share
        return bound - jnp.sum(baselines * (log_q - sg(log_q)))

    return objective


@checks_gen_fns
def symmetric_kl(
    model: AbstractGenerativeFunction,
    guide: AbstractGenerativeFunction,
    num_particles: int,
    selection_estimator: AbstractEstimator = reinforce,
) -> Expectation:
    """Negated Jeffreys divergence `-(KL(q || p) + KL(p || q))` of guide and posterior.

    `log p(x)` cancels between the two directions:
    `-J = E_q[log p(x,z) - log q(z)] - E_p[log p(x,z) - log q(z)]`. The first term is the
    ELBO (unbiased); the second is estimated under the SIR law of `normalize(model, guide,
    K)` with frozen parameters for the draw, so the whole is consistent as `K` grows and
    biased for finite `K`, like `wake_q`.
    """
    _check_particles(num_particles)
    sir = normalize(model, guide, num_particles, selection_estimator)

    @expectation
    def objective(params, *args, **kwargs):
        trace = guide.simulate(params, *args, **kwargs)
        forward = model.assess(trace.choices, params, *args, **kwargs) - trace.log_density
        z = sir.simulate(lax.stop_gradient(params), *args, **kwargs).choices
        backward = model.assess(z, params, *args, **kwargs) - guide.assess(
            z, params, *args, **kwargs
        )
        return forward - backward

    return objective
