"""Variational objectives, each a short expectation program over generative functions.

Each objective is a module (`AbstractObjective`): its fields are the generative functions
and settings, its `program` is the expectation program, and it is called like a
`px.Expectation`: `objective(key, params, *args, **kw)`, `.estimate`, `.grad`,
`.value_and_grad`. `params` is passed to both the model and the guide (NumPyro style: one
parameter dict). The lowercase builders (`px.vi.elbo(model, guide)`, ...) return these
modules. Programs are written in the same language as user programs and are meant as
examples of writing your own.

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

import abc
import contextlib
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

import equinox as eqx

from ..adev import AbstractEstimator, Expectation, reinforce
from ..gen import AbstractGenerativeFunction, NumPyroModel
from ..gen._protocol import score_function_densities_stopped
from ._constructs import _check_gen_fn, _check_particles, marginal, normalize
from ._requirements import SiteRequirement, check_sites, pathwise_site, score_function_site


class AbstractObjective(eqx.Module):
    """An objective: an expectation program over generative functions, as a module.

    A subclass declares its generative functions and settings as fields and writes the
    program in `program(params, *args, **kwargs)` (an ordinary expectation program, as
    given to `px.expectation`); the base class checks that fields annotated as generative
    functions are ones, builds the `px.Expectation` once, and forwards the calling
    conventions to it. Concrete objectives are final.

    The value is to be *maximised* (a bound on the log evidence, or its negated
    divergence); `px.fit` maximises by default. An entry of a params argument
    (`params_argnums`) that the program never reads is refused by name: a misspelt or
    unknown key would silently get a zero gradient.

    Example (the ELBO, as `px.vi.ELBO` writes it):
        >>> import jax, numpyro, numpyro.distributions as dist, ppl_ext as px
        >>> class MyELBO(px.vi.AbstractObjective):
        ...     model: px.gen.AbstractGenerativeFunction
        ...     guide: px.gen.AbstractGenerativeFunction
        ...     def program(self, params, *args):
        ...         trace = self.guide.simulate(params, *args)
        ...         return self.model.assess(trace.choices, params, *args) - trace.log_density
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0.0, 1.0))
        >>> objective = MyELBO(px.gen.NumPyroModel(model), px.gen.NumPyroModel(model))
        >>> float(objective(jax.random.key(0), {}))  # q = p: the ELBO is exactly 0
        0.0
    """

    _expectation: Expectation = eqx.field(static=True, init=False, repr=False)

    #: The argument positions (after the key) that are parameter dicts; `px.fit` trains them.
    params_argnums: ClassVar[tuple[int, ...]] = (1,)

    def __post_init__(self):
        expectation = Expectation(self.program)
        expectation.__name__ = expectation.__qualname__ = type(self).__name__
        # a params entry the objective never reads is refused by name (zero gradient)
        expectation._required_params = tuple(p - 1 for p in self.params_argnums)
        self._expectation = expectation

    def __check_init__(self):
        for field in dataclasses.fields(self):
            if "AbstractGenerativeFunction" in str(field.type):
                _check_gen_fn(type(self).__name__, field.name, getattr(self, field.name))

    @abc.abstractmethod
    def program(self, params, *args, **kwargs):
        """The expectation program: one estimate of the objective (run inside ADEV)."""

    @property
    def expectation(self) -> Expectation:
        """The `px.Expectation` of `program`."""
        return self._expectation

    def __call__(self, *args, **kwargs):
        """`objective(key, params, *args)`: an unbiased, differentiable estimate."""
        return self._expectation(*args, **kwargs)

    def estimate(self, key, *args, **kwargs):
        """Unbiased estimate of the objective (see `px.Expectation.estimate`)."""
        return self._expectation.estimate(key, *args, **kwargs)

    def grad(self, key, *args, argnums=1, **kwargs):
        """Unbiased gradient estimate (see `px.Expectation.grad`; `argnums=1`: params)."""
        return self._expectation.grad(key, *args, argnums=argnums, **kwargs)

    def value_and_grad(self, key, *args, argnums=1, **kwargs):
        """`(estimate, gradient estimate)` from the same draws (see `px.Expectation`)."""
        return self._expectation.value_and_grad(key, *args, argnums=argnums, **kwargs)


def _check_vimco_particles(num_particles):
    if not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(f"vimco needs num_particles >= 2, got {num_particles!r}.")



class ELBO(AbstractObjective):
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
        >>> grad_params = objective.grad(jax.random.key(0), {"loc": 0.0}, 1.0)  # argnums=1
        >>> grad_params["loc"].shape
        ()

    Reference: Jordan et al. 1999; Kingma & Welling 2014; Ranganath et al. 2014.
    """

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction

    def program(self, params, *args, **kwargs):
        # linear in log q: the score-function draws' own log q derivative (mean zero) is
        # left out, as TraceGraph_ELBO does (see gen.score_function_densities_stopped);
        # only for a NumPyro guide, whose log density is a plain sum over its sites (a
        # construct or a user's generative function may combine densities nonlinearly)
        stop = isinstance(self.guide, NumPyroModel)
        with score_function_densities_stopped() if stop else contextlib.nullcontext():
            trace = self.guide.simulate(params, *args, **kwargs)
        return self.model.assess(trace.choices, params, *args, **kwargs) - trace.log_density


def elbo(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction) -> ELBO:
    """`px.vi.ELBO(model, guide)`: the evidence lower bound (see `ELBO`)."""
    return ELBO(model, guide)


class IWELBO(AbstractObjective):
    """Importance-weighted bound `E[log (1/K) Σ_k p(x, z_k) / q(z_k)]`, `z_k` iid from q.

    Tighter than the ELBO for `K > 1` and non-decreasing in `K` (Burda et al. 2016). The K
    draws are a `lax.scan`, so each particle's sites use local estimators.

    Reference: Burda, Grosse & Salakhutdinov 2016, "Importance weighted autoencoders".
    """

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True)

    def __check_init__(self):
        _check_particles(self.num_particles)

    def program(self, params, *args, **kwargs):
        log_weights = _log_weights(self.model, self.guide, self.num_particles, params, args,
                                   kwargs)
        return logsumexp(log_weights) - math.log(self.num_particles)


def iwelbo(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int) -> IWELBO:
    """`px.vi.IWELBO(model, guide, num_particles)` (see `IWELBO`)."""
    return IWELBO(model, guide, num_particles)


def _log_weights(model, guide, num_particles, params, args, kwargs, guide_params=None):
    """`log p(x, z_k) - log q(z_k)` for `num_particles` iid guide draws (a scan)."""
    guide_params = params if guide_params is None else guide_params

    def particle(carry, _):
        trace = guide.simulate(guide_params, *args, **kwargs)
        return carry, model.assess(trace.choices, params, *args, **kwargs) - trace.log_density

    return lax.scan(particle, None, length=num_particles)[1]


def hvi(
    model: AbstractGenerativeFunction,
    variational_joint: AbstractGenerativeFunction,
    keep,
    reverse: AbstractGenerativeFunction,
    num_particles: int = 1,
) -> ELBO:
    """Hierarchical VI: the ELBO of `marginal(variational_joint, keep, reverse, K)`.

    `K = 1` is HVI (Ranganath, Tran & Blei 2016); `K > 1` is IWHVI (Sobolev & Vetrov 2019),
    a tighter bound. `reverse` is the auxiliary model `r(u | z)` of the dropped choices.
    """
    return ELBO(model, marginal(variational_joint, keep, reverse, num_particles))


def diwhvi(
    model: AbstractGenerativeFunction,
    variational_joint: AbstractGenerativeFunction,
    keep,
    reverse: AbstractGenerativeFunction,
    num_inner: int,
    num_outer: int,
) -> IWELBO:
    """Doubly importance-weighted HVI: IWELBO(`num_outer`) of an IWHVI(`num_inner`) marginal.

    Reference: Sobolev & Vetrov 2019, "Importance weighted hierarchical variational
    inference".
    """
    return IWELBO(model, marginal(variational_joint, keep, reverse, num_inner), num_outer)


class Renyi(AbstractObjective):
    """Rényi variational bound `E[1/(1-α) log (1/K) Σ_k w_k^(1-α)]`, `w_k = p(x, z_k)/q(z_k)`.

    `α = 0` is the IWELBO, `α → 1` the ELBO (`α = 1` is computed as the mean of `log w_k`).
    For fixed draws the estimate is non-increasing in `α` (power-mean inequality).

    Reference: Li & Turner 2016, "Rényi divergence variational inference".
    """

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction
    alpha: float = eqx.field(static=True, converter=float)
    num_particles: int = eqx.field(static=True)

    def __check_init__(self):
        _check_particles(self.num_particles)

    def program(self, params, *args, **kwargs):
        log_w = _log_weights(self.model, self.guide, self.num_particles, params, args, kwargs)
        if self.alpha == 1.0:
            return jnp.mean(log_w)
        scaled = (1.0 - self.alpha) * log_w
        return (logsumexp(scaled) - math.log(self.num_particles)) / (1.0 - self.alpha)


def renyi(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, alpha: float, num_particles: int) -> Renyi:
    """`px.vi.Renyi(model, guide, alpha, num_particles)` (see `Renyi`)."""
    return Renyi(model, guide, alpha, num_particles)


class WakeP(AbstractObjective):
    """Reweighted wake-sleep, wake-p: the IWELBO with the guide's parameters frozen.

    Its gradient w.r.t. the model's parameters is the self-normalised importance-sampling
    estimate `Σ_k w̃_k ∇ log p(x, z_k)`; the guide gets no gradient from it.

    Reference: Bornschein & Bengio 2015, "Reweighted wake-sleep"; Le et al. 2019.
    """

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True)

    def __check_init__(self):
        _check_particles(self.num_particles)

    def program(self, params, *args, **kwargs):
        log_w = _log_weights(self.model, self.guide, self.num_particles, params, args, kwargs,
                             guide_params=lax.stop_gradient(params))
        return logsumexp(log_w) - math.log(self.num_particles)


def wake_p(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int) -> WakeP:
    """`px.vi.WakeP(model, guide, num_particles)` (see `WakeP`)."""
    return WakeP(model, guide, num_particles)


class WakeQ(AbstractObjective):
    """Reweighted wake-sleep, wake-q: `E_{z ~ SIR}[log q(z)]` (forward KL, up to a constant).

    `z` is drawn by `normalize(model, guide, K)` with all parameters frozen, so only
    `log q(z)` is differentiated. The expectation is over the SIR law, which tends to the
    posterior as `K` grows: as an estimate of `-KL(p(z|x) || q) + const` it is biased for
    finite `K` (the usual RWS bias), and unbiased for the SIR objective it defines.

    Reference: Bornschein & Bengio 2015; Le, Kosiorek, Siddharth, Teh & Wood 2019,
    "Revisiting reweighted wake-sleep".
    """

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True)
    selection_estimator: AbstractEstimator = eqx.field(static=True, default=reinforce)

    def __check_init__(self):
        _check_particles(self.num_particles)
        normalize(self.model, self.guide, self.num_particles, self.selection_estimator)

    def program(self, params, *args, **kwargs):
        sir = normalize(self.model, self.guide, self.num_particles, self.selection_estimator)
        trace = sir.simulate(lax.stop_gradient(params), *args, **kwargs)
        return self.guide.assess(trace.choices, params, *args, **kwargs)


def wake_q(
    model: AbstractGenerativeFunction,
    guide: AbstractGenerativeFunction,
    num_particles: int,
    selection_estimator: AbstractEstimator = reinforce,
) -> WakeQ:
    """`px.vi.WakeQ(model, guide, num_particles, selection_estimator)` (see `WakeQ`)."""
    return WakeQ(model, guide, num_particles, selection_estimator)


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


class IWELBODReg(AbstractObjective):
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

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True)

    params_argnums: ClassVar[tuple[int, ...]] = (1, 2)

    def __check_init__(self):
        _check_particles(self.num_particles)

    def program(self, model_params, guide_params, *args, **kwargs):
        model, guide, sg = self.model, self.guide, lax.stop_gradient
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

        log_w_model, log_w_path = lax.scan(particle, None, length=self.num_particles)[1]
        normalized = jax.nn.softmax(sg(log_w_model))
        value = sg(logsumexp(log_w_model) - math.log(self.num_particles))
        model_term = jnp.sum(sg(normalized) * (log_w_model - sg(log_w_model)))
        path_term = jnp.sum(sg(normalized**2) * (log_w_path - sg(log_w_path)))
        return value + model_term + path_term


def iwelbo_dreg(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int) -> IWELBODReg:
    """`px.vi.IWELBODReg(model, guide, num_particles)` (see `IWELBODReg`)."""
    return IWELBODReg(model, guide, num_particles)


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


class VIMCO(AbstractObjective):
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

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True)

    def __post_init__(self):
        guide = self.guide
        if dataclasses.is_dataclass(guide) and any(
                f.name == "default_estimator" for f in dataclasses.fields(guide)):
            self.guide = dataclasses.replace(guide, default_estimator=reinforce)
        super().__post_init__()

    def __check_init__(self):
        _check_vimco_particles(self.num_particles)

    def program(self, params, *args, **kwargs):
        model, guide, k, sg = self.model, self.guide, self.num_particles, lax.stop_gradient
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


def vimco(model: AbstractGenerativeFunction, guide: AbstractGenerativeFunction, num_particles: int) -> VIMCO:
    """`px.vi.VIMCO(model, guide, num_particles)` (see `VIMCO`)."""
    _check_vimco_particles(num_particles)
    return VIMCO(model, guide, num_particles)


class SymmetricKL(AbstractObjective):
    """Negated Jeffreys divergence `-(KL(q || p) + KL(p || q))` of guide and posterior.

    `log p(x)` cancels between the two directions:
    `-J = E_q[log p(x,z) - log q(z)] - E_p[log p(x,z) - log q(z)]`. The first term is the
    ELBO (unbiased); the second is estimated under the SIR law of `normalize(model, guide,
    K)` with frozen parameters for the draw, so the whole is consistent as `K` grows and
    biased for finite `K`, like `wake_q`.
    """

    model: AbstractGenerativeFunction
    guide: AbstractGenerativeFunction
    num_particles: int = eqx.field(static=True)
    selection_estimator: AbstractEstimator = eqx.field(static=True, default=reinforce)

    def __check_init__(self):
        _check_particles(self.num_particles)
        normalize(self.model, self.guide, self.num_particles, self.selection_estimator)

    def program(self, params, *args, **kwargs):
        model, guide = self.model, self.guide
        sir = normalize(model, guide, self.num_particles, self.selection_estimator)
        trace = guide.simulate(params, *args, **kwargs)
        forward = model.assess(trace.choices, params, *args, **kwargs) - trace.log_density
        z = sir.simulate(lax.stop_gradient(params), *args, **kwargs).choices
        backward = model.assess(z, params, *args, **kwargs) - guide.assess(
            z, params, *args, **kwargs
        )
        return forward - backward


def symmetric_kl(
    model: AbstractGenerativeFunction,
    guide: AbstractGenerativeFunction,
    num_particles: int,
    selection_estimator: AbstractEstimator = reinforce,
) -> SymmetricKL:
    """`px.vi.SymmetricKL(model, guide, num_particles, selection_estimator)`."""
    return SymmetricKL(model, guide, num_particles, selection_estimator)
