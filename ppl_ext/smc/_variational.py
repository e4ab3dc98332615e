"""SMC as a generative function: a particle filter whose draws are `px.sample` sites.

`SMC(model, num_particles)` runs a particle filter inside an expectation program: the
proposal draws are sites with their own estimators (reparameterised for Normal-like laws),
and every resampling step draws the ancestor indices at a `px.sample` site of a
`Categorical` over the particles (multinomial resampling). So the core transformation sees
the whole filter, and the gradient of an objective built on it is unbiased, including the
terms that come from resampling: the score of the ancestor indices multiplies the value
(`px.reinforce`, the default). FIVO/VSMC-style code drops those terms, which is biased
(Naesseth et al. 2018, Le et al. 2018, Maddison et al. 2017 all report it);
`resampling_gradient="none"` drops them too, on request, and says so.

Proper weighting (docs/design.md). `simulate` returns one trajectory `x` drawn from the
final weights, traced back through the ancestors, and `log_density = log p(x, y) - log Ẑ`,
with `Ẑ` the filter's unbiased marginal-likelihood estimate: `Ẑ / p(x, y)` is unbiased for
`1 / q(x)`, `q` the law of the returned trajectory (the particle-MCMC identity: the ratio
of the conditional-SMC law of the other particles to the SMC law of all of them). `assess(x)`
runs conditional SMC with `x` as the reference and returns `log p(x, y) - log Ẑ_x`, whose
exponential is unbiased for `q(x)`. The return value holds `log Ẑ` too, so VSMC's objective
`E[log Ẑ]` and an ELBO over trajectories are a few lines.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array

from ..adev import reinforce as _reinforce, sample as _sample
from ..gen._protocol import AbstractGenerativeFunction, Trace
from ._ssm import StateSpaceModel, at_time, check_series, scalar_log_density

#: What happens to the gradient terms of the resampling steps.
RESAMPLING_GRADIENTS = ("score", "none")


class SMCReturn(NamedTuple):
    """`SMC.simulate`'s return value.

    Attributes:
        trajectory: the returned trajectory `x_{0:T-1}` (leading time axis).
        log_evidence: `log Ẑ`, the log of the unbiased marginal-likelihood estimate.
        log_joint: `log p(x, y)` of the trajectory.
    """

    trajectory: Array
    log_evidence: Array
    log_joint: Array


def _check_count(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SMC.{name} must be an int >= {minimum}, got {value!r}")


class SMC(AbstractGenerativeFunction):
    """A particle filter as a generative function over state trajectories.

    Each step proposes every particle from the model's `proposal` (or, without one, from
    the transition: the bootstrap filter), weights it by
    `f(x_t | x_{t-1}) g(y_t | x_t) / q(x_t | x_{t-1}, y_t)`, and resamples all particles
    multinomially before the next step. Every draw is a `px.sample` site, so inside an
    expectation program the proposal draws get their estimators (reparameterised where the
    law allows) and the ancestor indices a score-function estimator.

    Args:
        model: the `StateSpaceModel`; its `proposal` and `initial_proposal` are used when
            given (they may read proposal parameters from `params`).
        num_particles: `N >= 1`.
        resampling_gradient: `"score"` (default): the ancestor indices are `px.reinforce`
            sites, and the gradient of any objective built on the filter is unbiased.
            `"none"`: the ancestors' probabilities are frozen (`stop_gradient`), so their
            score terms vanish: lower variance, but the gradient is BIASED (the
            FIVO/VSMC convention); for example `∇_φ E[Ẑ]` with respect to proposal
            parameters, which is exactly 0, is not 0 in expectation then.

    `simulate(params, observations, inputs=None)` returns a `Trace` with choices
    `{"x": trajectory}`, `log_density = log p(x, y) - log Ẑ` (properly weighted) and
    `retval` an `SMCReturn`. `assess({"x": trajectory}, params, observations, inputs=None)`
    returns `log p(x, y) - log Ẑ_x` from conditional SMC with reference `x`, an estimate
    whose exponential is unbiased for the trajectory's density under the filter.

    Example (the VSMC objective `E[log Ẑ]` and its gradient):
        >>> import jax, jax.numpy as jnp
        >>> import numpyro.distributions as dist
        >>> import ppl_ext as px
        >>> from ppl_ext.smc import SMC, StateSpaceModel
        >>> model = StateSpaceModel(
        ...     initial=lambda p, u: dist.Normal(0.0, 1.0),
        ...     transition=lambda p, x, t, u: dist.Normal(p["rho"] * x, 1.0),
        ...     observation=lambda p, x, t, u: dist.Normal(x, 0.5))
        >>> smc = SMC(model, num_particles=8)
        >>> @px.expectation
        ... def vsmc(params, ys):
        ...     return smc.simulate(params, ys).retval.log_evidence
        >>> ys = jnp.array([0.3, -0.1, 0.8])
        >>> grad = vsmc.grad(jax.random.key(0), {"rho": jnp.asarray(0.5)}, ys)
        >>> grad["rho"].shape
        ()
    """

    model: StateSpaceModel
    num_particles: int = eqx.field(static=True)
    resampling_gradient: str = eqx.field(default="score", static=True)

    def __check_init__(self):
        if not isinstance(self.model, StateSpaceModel):
            raise TypeError(f"SMC.model must be a px.smc.StateSpaceModel, got "
                            f"{type(self.model).__name__}")
        _check_count(self.num_particles, "num_particles", 1)
        if self.resampling_gradient not in RESAMPLING_GRADIENTS:
            raise ValueError(f"SMC.resampling_gradient must be one of "
                             f"{', '.join(map(repr, RESAMPLING_GRADIENTS))}; got "
                             f"{self.resampling_gradient!r}")

    # ------------------------------------------------------------------ the model's laws

    def _first(self, params, y, u):
        """`(proposal law of x_0, log weight function of x_0)` for one particle."""
        model = self.model
        prior = lambda: model.initial(params, u)  # noqa: E731
        law = prior() if model.initial_proposal is None else model.initial_proposal(params, y,
                                                                                      u)

        def log_weight(x):
            zero = jnp.asarray(0, jnp.int32)
            log_w = scalar_log_density(model.observation(params, x, zero, u), y, "observation")
            if model.initial_proposal is not None:
                log_w = (log_w + scalar_log_density(prior(), x, "initial")
                         - scalar_log_density(law, x, "initial proposal"))
            return log_w

        return law, log_weight

    def _next(self, params, x_prev, t, y, u):
        """`(proposal law of x_t, log weight function of x_t)` for one particle."""
        model = self.model
        transition = model.transition(params, x_prev, t, u)
        law = transition if model.proposal is None else model.proposal(params, x_prev, t, y, u)

        def log_weight(x):
            log_w = scalar_log_density(model.observation(params, x, t, u), y, "observation")
            if model.proposal is not None:
                log_w = (log_w + scalar_log_density(transition, x, "transition")
                         - scalar_log_density(law, x, "proposal"))
            return log_w

        return law, log_weight

    def _log_joint(self, params, trajectory, observations, inputs):
        """`log p(x_{0:T-1}, y_{0:T-1})` of one trajectory."""
        model = self.model
        num_times = jax.tree.leaves(observations)[0].shape[0]
        u0 = at_time(inputs, 0)
        zero = jnp.asarray(0, jnp.int32)
        total = (scalar_log_density(model.initial(params, u0), trajectory[0], "initial")
                 + scalar_log_density(model.observation(params, trajectory[0], zero, u0),
                                      at_time(observations, 0), "observation"))
        if num_times == 1:
            return total

        def step(t):
            u = at_time(inputs, t)
            return (scalar_log_density(model.transition(params, trajectory[t - 1], t, u),
                                       trajectory[t], "transition")
                    + scalar_log_density(model.observation(params, trajectory[t], t, u),
                                         at_time(observations, t), "observation"))

        times = jnp.arange(1, num_times, dtype=jnp.int32)
        return total + jnp.sum(jax.vmap(step)(times))

    # ------------------------------------------------------------------ the filter

    def _ancestors(self, log_weights, num=None):
        """`num` (default `N`) indices drawn from `softmax(log_weights)` at one site."""
        logits = log_weights
        if self.resampling_gradient == "none":
            logits = jax.lax.stop_gradient(logits)
        shape = (self.num_particles if num is None else num,)
        law = dist.Categorical(logits=jnp.broadcast_to(logits, shape + logits.shape))
        return _sample(law, _reinforce, name="smc_ancestors").astype(jnp.int32)

    def _run(self, params, observations, inputs, reference=None):
        """The filter (conditional on `reference` in slot 0 when given).

        Returns `(particles (T, N, ...), ancestors (T-1, N), log_weights (T, N), log Ẑ)`.
        """
        num = self.num_particles
        y0, u0 = at_time(observations, 0), at_time(inputs, 0)
        law0, log_weight0 = self._first(params, y0, u0)
        x0 = jax.vmap(lambda _: _sample(law0, name="smc_initial"))(jnp.arange(num))
        if reference is not None:
            x0 = x0.at[0].set(reference[0])
        log_w0 = jax.vmap(log_weight0)(x0)
        num_times = jax.tree.leaves(observations)[0].shape[0]
        log_normaliser = jax.nn.logsumexp(log_w0) - jnp.log(num)
        if num_times == 1:
            return x0[None], jnp.zeros((0, num), jnp.int32), log_w0[None], log_normaliser

        def body(carry, xs):
            x_prev, log_w_prev = carry
            t, y, u, ref = xs
            ancestors = self._ancestors(log_w_prev)
            if reference is not None:
                ancestors = ancestors.at[0].set(0)
            parents = x_prev[ancestors]

            def propose(x_parent):
                law, _ = self._next(params, x_parent, t, y, u)
                return _sample(law, name="smc_proposal")

            x = jax.vmap(propose)(parents)
            if reference is not None:
                x = x.at[0].set(ref)
            log_w = jax.vmap(lambda xp, xt: self._next(params, xp, t, y, u)[1](xt))(parents, x)
            increment = jax.nn.logsumexp(log_w) - jnp.log(num)
            return (x, log_w), (x, ancestors, log_w, increment)

        later = lambda tree: None if tree is None else jax.tree.map(lambda a: a[1:], tree)  # noqa: E731
        times = jnp.arange(1, num_times, dtype=jnp.int32)
        refs = None if reference is None else reference[1:]
        _, (xs, ancestors, log_ws, increments) = jax.lax.scan(
            body, (x0, log_w0), (times, later(observations), later(inputs), refs))
        particles = jnp.concatenate([x0[None], xs])
        log_weights = jnp.concatenate([log_w0[None], log_ws])
        return particles, ancestors, log_weights, log_normaliser + jnp.sum(increments)

    def _check(self, observations, inputs):
        num_times = check_series(observations, inputs, "SMC")
        return num_times

    def simulate(self, params, observations, inputs=None) -> Trace:
        """Run the filter, draw one trajectory from the final weights (see the class)."""
        self._check(observations, inputs)
        particles, ancestors, log_weights, log_evidence = self._run(params, observations,
                                                                   inputs)
        # one index: unused draws would only add score-function noise
        final = self._ancestors(log_weights[-1], num=1)[0]

        def back(index, xs):
            a_t = xs
            parent = a_t[index]
            return parent, parent

        # indices b_t of the returned trajectory, from b_{T-1} = final backwards
        _, earlier = jax.lax.scan(back, final, ancestors, reverse=True)
        indices = jnp.concatenate([earlier, final[None]])
        trajectory = particles[jnp.arange(indices.shape[0]), indices]
        log_joint = self._log_joint(params, trajectory, observations, inputs)
        return Trace({"x": trajectory}, log_joint - log_evidence,
                     SMCReturn(trajectory, log_evidence, log_joint))

    def assess(self, choices, params, observations, inputs=None) -> Array:
        """`log p(x, y) - log Ẑ_x`, from conditional SMC with reference `choices["x"]`."""
        if not isinstance(choices, dict) or set(choices) != {"x"}:
            raise ValueError(f"SMC.assess takes choices {{'x': trajectory}}, got keys "
                             f"{sorted(choices) if isinstance(choices, dict) else choices!r}")
        num_times = self._check(observations, inputs)
        reference = jnp.asarray(choices["x"])
        if reference.shape[0] != num_times:
            raise ValueError(f"SMC.assess: the trajectory has {reference.shape[0]} time steps, "
                             f"the observations {num_times}")
        *_, log_evidence = self._run(params, observations, inputs, reference=reference)
        return self._log_joint(params, reference, observations, inputs) - log_evidence

