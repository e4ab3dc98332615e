"""Consensus-based optimisation and sampling: particle back-ends that use objective values only.

Every back-end here moves a cloud of `num_particles` points ("particles") in parameter space
using nothing but estimates of the objective at the particles, so it optimises objectives
that cannot be differentiated, are nonsmooth or multimodal. The common ingredient is the
consensus point (Pinnau, Totzeck, Tse and Martin, 2017)

    m_α = Σ_i x_i exp(-α f(x_i)) / Σ_i exp(-α f(x_i)),

a soft-min of the cloud, computed with `logsumexp` so large `α` and large values do not
overflow. A non-finite estimate (NaN or +inf) gives its particle zero weight.

Conventions shared by all of them:

- Parameters are pytrees; the cloud is the parameter tree with a leading axis of length
  `num_particles` on every leaf, and the dynamics act on each particle's flattened vector
  (`jax.flatten_util.ravel_pytree`).
- `init(key, params, objective, ...)` draws the cloud from `key`: `params + init_scale · ξ`
  with `ξ ~ N(0, I)`, or uniform on the box `init_bounds = (low, high)` (per coordinate of
  the flattened parameters) when that is given. It does not evaluate the objective.
- Each step evaluates the objective at every particle with `jax.vmap`: independent keys
  per particle (default), or one key shared by all particles in a step
  (`common_random_numbers=True`, which makes the comparison between particles exact for
  objectives whose noise does not depend on the parameters). A particle's value is the
  mean of `num_samples` independent estimates (default 1). On noisy objectives both help
  a lot: with independent noise the weights of a contracted cloud carry little
  information and the cloud freezes early (the conformance registry uses both).
- `params(state)` is the consensus point of the last evaluated cloud
  (`estimate="consensus"`, the default), the best particle seen so far (`estimate="best"`,
  for deterministic objectives; with noisy estimates the smallest estimate is biased low,
  the winner's curse) or the mean of the particles (`estimate="mean"`). Before the first
  step the first two are the initial `params`.
- The step's `info.value` is an estimate of the objective at `params(state)` (the point the
  step starts from), from one extra evaluation with its own key; `info.grad_norm` is NaN.
- The particle axis can be sharded over devices: pass `sharding`, a
  `jax.sharding.Sharding` for the `(num_particles, d)` cloud (e.g.
  `NamedSharding(mesh, PartitionSpec("particles"))`); the cloud is constrained to it in
  `init` and every step, and `jit` spreads the per-particle evaluations and the consensus
  reductions over the devices.
- The Gaussian noise is most of a step's cost (`N d` draws per step); `CBO` and
  `PolarisedCBO` offer `increments="quantised"`, a 256-level law with the normal's first
  three moments drawn from one random byte a coordinate, about 2x cheaper. Without
  `sharding` the noise is drawn under `jax.threefry_partitionable(False)` (JAX's older
  threefry layout, about twice as fast on CPU; a different stream from the same key, the
  same distribution); with `sharding`, under the global setting, so that each device draws
  only its shard. Other key implementations work (the noise comes from the key given)
  but do not pay on CPU (`benchmarks/bench_cbo.py --noise`, 2026-12-06, XLA on one
  thread, 80,000 float32 normals a step): `jax.random.key(seed, impl="rbg")` or
  `"unsafe_rbg"` draw about 10x slower (XLA's CPU `RngBitGenerator`; `unsafe_rbg` also
  gives up guarantees on the independence of split keys), `philox2x32` and
  `threefry4x32` about 1.8x slower, and drawing the normals of several steps at once does
  not help. A hand-fused step at CBXpy's Rastrigin setting (100 runs x 40 particles x
  d = 20) costs about 0.7 ms of CPU, 0.12 ms without its noise: the normals (threefry
  bits, then `erf_inv`) are most of it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from scipy.special import ndtri

from ._backend import AbstractBackend, BackendInfo

#: The noise models of CBO's diffusion term.
NOISES = ("isotropic", "anisotropic")
#: The laws of the Euler-scheme increments ξ (see `CBO`'s `increments`).
INCREMENTS = ("gaussian", "quantised")
#: What `params(state)` returns.
ESTIMATES = ("consensus", "best", "mean")
#: The modes of consensus-based sampling.
CBS_MODES = ("sampling", "optimisation")


class ConsensusState(NamedTuple):
    """State of the consensus-based back-ends.

    Attributes:
        particles: the cloud: the parameter tree with a leading `num_particles` axis on
            every leaf (for `ConsensusHopping`, the last samples drawn around the point).
        values: `(num_particles,)` the objective estimates of the cloud the last step
            evaluated (before it moved the particles); +inf before the first step.
        consensus: the consensus point of that cloud (a parameter tree); the initial
            `params` before the first step. For `PolarisedCBO`, the consensus point of the
            particle with the smallest estimate.
        best_params: the particle with the smallest estimate seen so far (a parameter
            tree); the initial `params` before the first step.
        best_value: that smallest estimate (a scalar; +inf before the first step).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.optim import CBO
        >>> backend = CBO(num_particles=8)
        >>> state = backend.init(jax.random.key(0), {"x": jnp.zeros(3)}, None)
        >>> state.particles["x"].shape, float(state.best_value)
        ((8, 3), inf)
    """

    particles: Any
    values: jax.Array
    consensus: Any
    best_params: Any
    best_value: jax.Array


# ------------------------------------------------------------------------ input checks


def _concrete(value):
    """`value` as a NumPy array, or None when it is traced (checked only when concrete)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_count(owner: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be at least {minimum}, got {value}.")


def _check_positive(owner: str, name: str, value, allow_zero: bool = False) -> None:
    array = None if value is None else _concrete(value)
    if array is None:
        return
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"{owner}.{name} must be a real number, got {value!r}.")
    bad = np.any(array < 0) if allow_zero else np.any(array <= 0)
    if bad or not np.all(np.isfinite(array)):
        what = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{owner}.{name} must be finite and {what}, got {value!r}.")


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"{owner}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _check_common(backend) -> None:
    """Checks of the fields every particle back-end has."""
    owner = type(backend).__name__
    _check_count(owner, "num_particles", backend.num_particles)
    _check_count(owner, "num_samples", backend.num_samples)
    _check_positive(owner, "alpha", backend.alpha)
    _check_positive(owner, "init_scale", backend.init_scale, allow_zero=True)
    _check_choice(owner, "estimate", backend.estimate, ESTIMATES)
    if backend.init_bounds is not None:
        bounds = backend.init_bounds
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise TypeError(f"{owner}.init_bounds must be a pair (low, high), got {bounds!r}.")
        low, high = bounds
        low, high = _concrete(low), _concrete(high)
        if low is not None and high is not None and np.any(low >= high):
            raise ValueError(f"{owner}.init_bounds needs low < high, got {bounds!r}.")


# ---------------------------------------------------------------------------- the cloud


def _constrain(backend, flat):
    if backend.sharding is None:
        return flat
    return jax.lax.with_sharding_constraint(flat, backend.sharding)


def _flat_cloud(particles) -> jax.Array:
    """The cloud as a `(num_particles, d)` array."""
    return jax.vmap(lambda p: ravel_pytree(p)[0])(particles)


def _unravel_cloud(flat, template):
    """A `(num_particles, d)` array back to a parameter tree with a leading axis."""
    unravel = ravel_pytree(template)[1]
    return jax.vmap(unravel)(flat)


def _initial_cloud(backend, key, params) -> jax.Array:
    flat, _ = ravel_pytree(params)
    shape = (backend.num_particles, flat.shape[0])
    if backend.init_bounds is None:
        noise = jax.random.normal(key, shape, flat.dtype)
        cloud = flat + jnp.asarray(backend.init_scale, flat.dtype) * noise
    else:
        low, high = (jnp.broadcast_to(jnp.asarray(b, flat.dtype), flat.shape)
                     for b in backend.init_bounds)
        cloud = jax.random.uniform(key, shape, flat.dtype, low, high)
    return _constrain(backend, cloud)


def _initial_state(backend, key, params) -> ConsensusState:
    flat, _ = ravel_pytree(params)
    cloud = _initial_cloud(backend, key, params)
    dtype = flat.dtype
    return ConsensusState(
        particles=_unravel_cloud(cloud, params),
        values=jnp.full((backend.num_particles,), jnp.inf, dtype),
        consensus=params,
        best_params=params,
        best_value=jnp.asarray(jnp.inf, dtype),
    )


def _evaluate(backend, key, flat, template, objective, args, kwargs) -> jax.Array:
    """`(num_particles,)` objective estimates at the flattened particles; NaN becomes +inf."""
    unravel = ravel_pytree(template)[1]

    def one(k, x):
        return jnp.asarray(objective(k, unravel(x), *args, **kwargs))

    def averaged(k, x):  # the mean of num_samples independent estimates
        keys = jax.random.split(k, backend.num_samples)
        return jnp.mean(jax.vmap(one, in_axes=(0, None))(keys, x), axis=0)

    evaluate = one if backend.num_samples == 1 else averaged
    if backend.common_random_numbers:
        values = jax.vmap(evaluate, in_axes=(None, 0))(key, flat)
    else:
        values = jax.vmap(evaluate)(jax.random.split(key, flat.shape[0]), flat)
    if values.shape != (flat.shape[0],):
        raise ValueError(
            f"{type(backend).__name__} needs a scalar objective; it returned values of shape "
            f"{values.shape[1:]} per particle.")
    return jnp.where(jnp.isnan(values), jnp.inf, values)


def _weights(values, alpha) -> jax.Array:
    """Normalised weights `exp(-α f_i) / Σ_j exp(-α f_j)`, by logsumexp."""
    logits = -jnp.asarray(alpha, values.dtype) * values
    return jnp.exp(logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True))


def _consensus(flat, values, alpha) -> jax.Array:
    weights = _weights(values, alpha).astype(flat.dtype)
    return weights @ flat


def _value_at(backend, key, state, objective, args, kwargs) -> jax.Array:
    return jnp.asarray(objective(key, backend.params(state), *args, **kwargs))


def _best(state, flat, values, template):
    """The best particle seen so far, updated with this step's evaluations."""
    index = jnp.argmin(values)
    old, _ = ravel_pytree(state.best_params)
    better = values[index] < state.best_value
    best_flat = jnp.where(better, flat[index], old.astype(flat.dtype))
    best_value = jnp.where(better, values[index].astype(state.best_value.dtype),
                           state.best_value)
    return ravel_pytree(template)[1](best_flat), best_value


def _in_layout(backend, draw):
    """`draw()` in the step noise's threefry layout. Without `sharding`, JAX's
    non-partitionable layout (`jax.threefry_partitionable(False)`), which draws about twice
    as fast on CPU; the noise is most of a step's cost (`N d` draws against `N`
    evaluations). With `sharding`, the global setting (its partitionable layout lets each
    device draw only its own shard)."""
    if backend.sharding is not None:
        return draw()
    with jax.threefry_partitionable(False):
        return draw()


def _normal(backend, key, shape, dtype) -> jax.Array:
    """Standard normal noise for a step, in `_in_layout`'s layout."""
    return _in_layout(backend, lambda: jax.random.normal(key, shape, dtype))


def _quantile_levels() -> np.ndarray:
    """The 256 levels of the quantised increments: the N(0, 1) quantiles at
    `(k + 1/2) / 256`, `k = 0, ..., 255`, rescaled to variance exactly 1 (float64)."""
    levels = ndtri((np.arange(256) + 0.5) / 256)
    levels = (levels - levels[::-1]) / 2  # exactly antisymmetric: odd moments vanish
    return levels / np.sqrt(np.mean(levels**2))


#: `increments="quantised"`: ξ takes each of these 256 values with probability 1/256.
QUANTISED_LEVELS = _quantile_levels()


def _quantised(backend, key, shape, dtype) -> jax.Array:
    """One random byte a coordinate (in `_in_layout`'s layout), mapped to
    `QUANTISED_LEVELS`."""
    index = _in_layout(backend, lambda: jax.random.bits(key, shape, jnp.uint8))
    return jnp.asarray(QUANTISED_LEVELS, dtype)[index.astype(jnp.int32)]


def _increments(backend, key, shape, dtype) -> jax.Array:
    """The standardised increments ξ of an Euler step: Gaussian or quantised."""
    if backend.increments == "quantised":
        return _quantised(backend, key, shape, dtype)
    return _normal(backend, key, shape, dtype)


def _diffusion(noise: str, drift, xi):
    if noise == "isotropic":
        return jnp.linalg.norm(drift, axis=-1, keepdims=True) * xi
    return drift * xi


def _select(backend, state):
    if backend.estimate == "mean":
        return jax.tree.map(lambda leaf: jnp.mean(leaf, axis=0), state.particles)
    return state.consensus if backend.estimate == "consensus" else state.best_params


def _nan(value) -> jax.Array:
    return jnp.full((), jnp.nan, jnp.result_type(value, jnp.float32))


class _ConsensusBackend(AbstractBackend):
    """The skeleton the consensus back-ends share: `init` draws the cloud, `step` estimates
    the objective at `params(state)`, forms the cloud it evaluates (`_cloud`), evaluates
    it, moves it (`_move`) and tracks the best particle; `params` selects by `estimate`."""

    def __check_init__(self):
        _check_common(self)

    def init(self, key, params, objective, *args, **kwargs) -> ConsensusState:
        """A cloud drawn around `params` (or on `init_bounds`) from `key`; no evaluation."""
        return _initial_state(self, key, params)

    def _cloud(self, key, state: ConsensusState, center) -> jax.Array:
        """The `(num_particles, d)` points this step evaluates: the state's cloud."""
        return _constrain(self, _flat_cloud(state.particles))

    def _move(self, key, flat, values) -> tuple[jax.Array, jax.Array]:
        """`(the new cloud, the flattened consensus point)` from the evaluated cloud."""
        raise NotImplementedError

    def step(self, key, state: ConsensusState, objective, *args, **kwargs):
        """Evaluate the cloud and move it once (the class docstring gives the dynamics)."""
        key_value, key_evaluate, key_noise = jax.random.split(key, 3)
        value = _value_at(self, key_value, state, objective, args, kwargs)
        template = state.consensus
        center, unravel = ravel_pytree(template)
        flat = self._cloud(key_noise, state, center)
        values = _evaluate(self, key_evaluate, flat, template, objective, args, kwargs)
        moved, consensus = self._move(key_noise, flat, values)
        best_params, best_value = _best(state, flat, values, template)
        new = ConsensusState(_unravel_cloud(_constrain(self, moved), template),
                             values.astype(state.values.dtype), unravel(consensus),
                             best_params, best_value)
        return new, BackendInfo(value, _nan(value))

    def params(self, state: ConsensusState) -> Any:
        """The consensus point (`estimate="consensus"`), the best particle (`"best"`) or
        the mean of the particles (`"mean"`)."""
        return _select(self, state)


# ----------------------------------------------------------------------------- CBO


class CBO(_ConsensusBackend):
    """Consensus-based optimisation, isotropic or anisotropic (derivative-free, global).

    Each step evaluates the objective `f` at the particles, forms the consensus point
    `m = Σ_i x_i e^{-α f(x_i)} / Σ_i e^{-α f(x_i)}` and moves every particle by the
    Euler-Maruyama step

        x_i ← x_i - λ dt (x_i - m) + σ √dt D_i ξ_i,   ξ_i ~ N(0, I),

    with `D_i ξ_i = |x_i - m|₂ ξ_i` (`noise="isotropic"`, Pinnau et al. 2017) or
    `(x_i - m) ⊙ ξ_i` (`noise="anisotropic"`, Carrillo, Jin, Li and Zhu 2021, whose
    convergence does not degrade with the dimension). The particles contract onto the
    consensus point while the noise explores around it; for large `α` the consensus point
    approaches the best particle, and the mean drift behaves like a gradient step on a
    smoothed objective (Riedl, Klock, Geldhauser and Fornasier, "Gradient is All You
    Need?", 2023). With the consensus point frozen, the mean-square spread of the cloud
    shrinks when `2λ > σ² d` (isotropic noise, dimension `d`) or `2λ > σ²` (anisotropic).

    Args:
        num_particles: the number of particles in the cloud.
        alpha: the inverse temperature α of the consensus weights (> 0).
        sigma: the noise scale σ (≥ 0).
        dt: the time step (> 0).
        drift_rate: the drift coefficient λ (> 0).
        noise: `"anisotropic"` (default) or `"isotropic"`.
        increments: the law of ξ: `"gaussian"` (default; Euler-Maruyama) or
            `"quantised"`: each coordinate takes one of 256 values with probability
            1/256, the `N(0, 1)` quantiles at `(k + 1/2) / 256` rescaled to variance 1
            (largest |ξ| about 2.9). Its mean, variance and third moment are those of
            `N(0, 1)`, which keeps the Euler scheme's weak order 1
            (Kloeden and Platen, "Numerical Solution of SDEs", §14.1): expectations over
            the cloud agree with Euler-Maruyama's to first order in `dt`; single paths
            differ. It costs one random byte a coordinate instead of a normal draw, about
            2x faster a step at CBXpy's Rastrigin setting, with the same success rate
            there (`benchmarks/bench_cbo.py`). Cruder laws are not offered: with
            `σ √dt ≈ 1`, as in that setting, two-point (±1) increments make the cloud
            collapse (0 of 100 runs succeed).
        init_scale: the standard deviation of the initial cloud around `params`.
        init_bounds: `None`, or `(low, high)`: draw the initial cloud uniformly on that box
            (scalars or arrays broadcastable to the flattened parameters) instead.
        estimate: what `params(state)` returns: `"consensus"`, `"best"` or `"mean"` (see
            the module docstring).
        num_samples: the objective estimates averaged per particle and step.
        common_random_numbers: one key for all particles in a step (default: independent).
        sharding: `None`, or a `jax.sharding.Sharding` for the `(num_particles, d)` cloud.

    Returns `ConsensusState` from `init`; `step` returns `(ConsensusState, BackendInfo)`
    with `info.value` an estimate at `params(state)` and `info.grad_norm` NaN. CBXpy's
    defaults are `α = 1, σ = 1, dt = 0.1, λ = 1`; the defaults here use a larger α. Large
    anisotropic noise explores well: CBXpy's Rastrigin setting (`num_particles=40,
    alpha=30, sigma=10.1, dt=0.01`, 5,000 steps, uniform on [-3, 3]^d) finds the global
    minimiser of Rastrigin in d = 20 (the noise multiplies `x - m`, so the cloud still
    contracts almost surely: `d log|x - m| = -(λ + σ²/2) dt + σ dW` per coordinate).

    Example (Rastrigin in d = 2, global minimum 0 at the origin, many local minima):
        >>> import jax, jax.numpy as jnp
        >>> import ppl_ext as px
        >>> from ppl_ext.optim import CBO
        >>> @px.expectation
        ... def rastrigin(x):
        ...     return 10 * x.size + jnp.sum(x**2 - 10 * jnp.cos(2 * jnp.pi * x))
        >>> backend = CBO(num_particles=100, alpha=30.0, sigma=1.0, dt=0.1,
        ...               init_bounds=(-3.0, 3.0), estimate="best")
        >>> result = px.fit(rastrigin, jnp.full(2, 2.0), backend, 300, jax.random.key(0),
        ...                 maximize=False, progress=False)
        >>> bool(jnp.max(jnp.abs(result.params)) < 0.25)
        True
    """

    num_particles: int = 100
    alpha: float = 30.0
    sigma: float = 1.0
    dt: float = 0.1
    drift_rate: float = 1.0
    noise: str = "anisotropic"
    increments: str = "gaussian"
    init_scale: float = 1.0
    init_bounds: tuple[Any, Any] | None = None
    estimate: str = "consensus"
    num_samples: int = 1
    common_random_numbers: bool = False
    sharding: Any = None

    def __check_init__(self):
        _check_positive("CBO", "sigma", self.sigma, allow_zero=True)
        _check_positive("CBO", "dt", self.dt)
        _check_positive("CBO", "drift_rate", self.drift_rate)
        _check_choice("CBO", "noise", self.noise, NOISES)
        _check_choice("CBO", "increments", self.increments, INCREMENTS)

    def _move(self, key, flat, values):
        consensus = _consensus(flat, values, self.alpha)
        drift = flat - consensus
        xi = _increments(self, key, flat.shape, flat.dtype)
        moved = (flat - self.drift_rate * self.dt * drift
                 + self.sigma * jnp.sqrt(self.dt) * _diffusion(self.noise, drift, xi))
        return moved, consensus

    def params(self, state: ConsensusState) -> Any:
        """The consensus point (`estimate="consensus"`) or the best particle (`"best"`)."""
        return _select(self, state)


# -------------------------------------------------------------------- consensus hopping


class ConsensusHopping(_ConsensusBackend):
    """Consensus hopping: jump to the consensus point of a Gaussian cloud around the point.

    The scheme of Riedl, Klock, Geldhauser and Fornasier ("Gradient is All You Need?",
    2023) that makes CBO's link to gradient descent explicit: from the current point `x`,
    draw `y_i = x + σ ξ_i`, `ξ_i ~ N(0, I)`, `i = 1..N`, and set

        x ← m_α(y) = Σ_i y_i e^{-α f(y_i)} / Σ_i e^{-α f(y_i)}.

    For a smooth `f`, large `N` and small `σ`, `m_α(y) ≈ argmin_z f(z) + |z - x|² / (2ασ²)`
    (Laplace's principle): an implicit (proximal) gradient step with step size `ασ²`,
    found from objective values alone; the noise of the finite cloud lets it hop over
    energy barriers. It is a (1, N) evolution strategy with soft selection.

    Args:
        num_particles: `N`, the samples drawn per step.
        alpha: the inverse temperature α of the consensus weights (> 0).
        sigma: the standard deviation σ of the samples around the point (> 0).
        init_scale, init_bounds: unused by the dynamics (the first step samples around
            `params`); they only set the placeholder cloud in the initial state.
        estimate, num_samples, common_random_numbers, sharding: as for `CBO`.

    Returns `ConsensusState` (its `particles` are the last samples, its `consensus` the
    current point) and `BackendInfo` with `grad_norm` NaN.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ppl_ext as px
        >>> from ppl_ext.optim import ConsensusHopping
        >>> @px.expectation
        ... def loss(x):
        ...     return jnp.sum(jnp.abs(x - 1.0))  # nonsmooth, minimal at 1
        >>> backend = ConsensusHopping(num_particles=50, alpha=100.0, sigma=0.1)
        >>> result = px.fit(loss, jnp.zeros(3), backend, 100, jax.random.key(0),
        ...                 maximize=False, progress=False)
        >>> bool(jnp.max(jnp.abs(result.params - 1.0)) < 0.05)
        True
    """

    num_particles: int = 100
    alpha: float = 30.0
    sigma: float = 0.1
    init_scale: float = 0.0
    init_bounds: tuple[Any, Any] | None = None
    estimate: str = "consensus"
    num_samples: int = 1
    common_random_numbers: bool = False
    sharding: Any = None

    def __check_init__(self):
        _check_positive("ConsensusHopping", "sigma", self.sigma)

    def _cloud(self, key, state, center):
        """Samples `center + σ ξ_i` around the current point."""
        shape = (self.num_particles, center.shape[0])
        xi = _normal(self, key, shape, center.dtype)
        return _constrain(self, center + jnp.asarray(self.sigma, center.dtype) * xi)

    def _move(self, key, flat, values):
        return flat, _consensus(flat, values, self.alpha)

    def params(self, state: ConsensusState) -> Any:
        """The current point (`estimate="consensus"`) or the best sample (`"best"`)."""
        return _select(self, state)


# ---------------------------------------------------------------------- polarised CBO


class PolarisedCBO(_ConsensusBackend):
    """Polarised CBO: a kernel-weighted consensus point per particle, so several minima are found.

    Bungert, Roith and Wacker ("Polarized consensus-based dynamics for optimization and
    sampling", 2022) replace the one consensus point by one per particle,

        c(x_i) = Σ_j k(x_i, x_j) e^{-α f(x_j)} x_j / Σ_j k(x_i, x_j) e^{-α f(x_j)},

    with the Gaussian kernel `k(x, y) = exp(-|x - y|² / (2κ²))`, and move each particle as
    in `CBO` towards its own consensus point. Particles listen mostly to their neighbours,
    so the cloud splits into groups that settle at different local (and global) minima:
    after a run, `state.particles` cluster at the minima found. The cost per step is
    `O(N² d)`. (CBXpy's default additionally multiplies the kernel's exponent by α; here
    the kernel is the paper's, with width κ alone.)

    Args:
        kernel_width: κ, the kernel's length scale (> 0); `inf` recovers `CBO`.

    The other fields (`num_particles`, `alpha`, `sigma`, `dt`, `drift_rate`, `noise`,
    `increments`, `init_scale`, `init_bounds`, `estimate`, `num_samples`,
    `common_random_numbers`, `sharding`) are as for `CBO`.

    `params(state)` (`estimate="consensus"`) is the consensus point of the particle with the
    smallest estimate in the last evaluated cloud.

    Example (two wells at -2 and 2; the cloud finds both):
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.optim import PolarisedCBO
        >>> def two_wells(key, x):
        ...     return jnp.sum((x**2 - 4.0) ** 2)
        >>> backend = PolarisedCBO(num_particles=100, alpha=10.0, sigma=0.5,
        ...                        kernel_width=0.5, init_bounds=(-4.0, 4.0))
        >>> state = backend.init(jax.random.key(0), jnp.zeros(1), two_wells)
        >>> step = jax.jit(lambda k, s: backend.step(k, s, two_wells)[0])
        >>> for i in range(200):
        ...     state = step(jax.random.key(i), state)
        >>> x = state.particles[:, 0]
        >>> bool(jnp.mean(jnp.abs(x + 2) < 0.2) > 0.2), bool(jnp.mean(jnp.abs(x - 2) < 0.2) > 0.2)
        (True, True)
    """

    num_particles: int = 100
    alpha: float = 30.0
    sigma: float = 1.0
    dt: float = 0.1
    drift_rate: float = 1.0
    noise: str = "anisotropic"
    increments: str = "gaussian"
    kernel_width: float = 1.0
    init_scale: float = 1.0
    init_bounds: tuple[Any, Any] | None = None
    estimate: str = "consensus"
    num_samples: int = 1
    common_random_numbers: bool = False
    sharding: Any = None

    def __check_init__(self):
        _check_positive("PolarisedCBO", "sigma", self.sigma, allow_zero=True)
        _check_positive("PolarisedCBO", "dt", self.dt)
        _check_positive("PolarisedCBO", "drift_rate", self.drift_rate)
        _check_positive("PolarisedCBO", "kernel_width", self.kernel_width)
        _check_choice("PolarisedCBO", "noise", self.noise, NOISES)
        _check_choice("PolarisedCBO", "increments", self.increments, INCREMENTS)

    def _move(self, key, flat, values):
        squared = jnp.sum((flat[:, None, :] - flat[None, :, :]) ** 2, axis=-1)
        log_kernel = -squared / (2.0 * jnp.asarray(self.kernel_width, flat.dtype) ** 2)
        logits = log_kernel.astype(values.dtype) - jnp.asarray(self.alpha, values.dtype) * values
        weights = jnp.exp(logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True))
        local = _constrain(self, weights.astype(flat.dtype) @ flat)
        drift = flat - local
        xi = _increments(self, key, flat.shape, flat.dtype)
        moved = (flat - self.drift_rate * self.dt * drift
                 + self.sigma * jnp.sqrt(self.dt) * _diffusion(self.noise, drift, xi))
        return moved, local[jnp.argmin(values)]

    def params(self, state: ConsensusState) -> Any:
        """The best particle's consensus point (`"consensus"`) or the best particle (`"best"`)."""
        return _select(self, state)


# ------------------------------------------------------------- consensus-based sampling


class ConsensusBasedSampling(_ConsensusBackend):
    """Consensus-based sampling (CBS): sample from `exp(-f)` or minimise `f` from values only.

    Carrillo, Hoffmann, Stuart and Vaes ("Consensus-based sampling", 2022). With the
    weights `w_i ∝ e^{-α f(x_i)}`, the weighted mean `m` and weighted covariance
    `C = Σ_i w_i (x_i - m)(x_i - m)ᵀ`, each particle takes the exact step of the
    Ornstein-Uhlenbeck process `dx = -(x - m) dt + √(2 λ⁻¹ C) dW` with `m, C` frozen:

        x_i ← m + e^{-dt} (x_i - m) + √((1 - e^{-2 dt}) / λ) C^{1/2} ξ_i,

    with `λ = 1 / (1 + α)` in `mode="sampling"`, where the cloud approximately samples the
    density proportional to `exp(-f)` (exactly, in the mean-field limit, for a Gaussian
    target), and `λ = 1` in `mode="optimisation"`, where it contracts onto a minimiser.
    `C^{1/2}` is the symmetric square root (eigendecomposition; `O(d³)` per step).

    In sampling mode `f` is the objective `px.fit` hands the back-end: to sample from a
    density `p`, fit `log p` with `maximize=True` (the back-end then sees `-log p`); the
    draws are `state.particles`. A noisy estimate of `log p` makes the samples approximate.

    Args:
        num_particles: the number of particles (at least `d + 1` so that `C` has full rank).
        alpha: the inverse temperature α of the weights (> 0).
        dt: the time step (> 0); large steps are stable (the OU step is exact).
        mode: `"sampling"` (default) or `"optimisation"`.
        init_scale, init_bounds, estimate, num_samples, common_random_numbers, sharding: as
            for `CBO`.

    Example (sampling N(1, 0.5²) from its log density):
        >>> import jax, jax.numpy as jnp
        >>> from ppl_ext.optim import ConsensusBasedSampling
        >>> def energy(key, x):  # -log density, up to a constant
        ...     return jnp.sum((x - 1.0) ** 2) / (2 * 0.25)
        >>> backend = ConsensusBasedSampling(num_particles=2000, alpha=1.0, dt=0.5,
        ...                                  init_scale=2.0)
        >>> state = backend.init(jax.random.key(0), jnp.zeros(1), energy)
        >>> step = jax.jit(lambda k, s: backend.step(k, s, energy)[0])
        >>> for i in range(50):
        ...     state = step(jax.random.key(i), state)
        >>> x = state.particles[:, 0]
        >>> bool(abs(x.mean() - 1.0) < 0.1), bool(abs(x.std() - 0.5) < 0.05)
        (True, True)
    """

    num_particles: int = 100
    alpha: float = 1.0
    dt: float = 0.1
    mode: str = "sampling"
    init_scale: float = 1.0
    init_bounds: tuple[Any, Any] | None = None
    estimate: str = "consensus"
    num_samples: int = 1
    common_random_numbers: bool = False
    sharding: Any = None

    def __check_init__(self):
        _check_positive("ConsensusBasedSampling", "dt", self.dt)
        _check_choice("ConsensusBasedSampling", "mode", self.mode, CBS_MODES)

    def _move(self, key, flat, values):
        weights = _weights(values, self.alpha).astype(flat.dtype)
        mean = weights @ flat
        centred = flat - mean
        covariance = (centred * weights[:, None]).T @ centred
        eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)
        root = (eigenvectors * jnp.sqrt(jnp.clip(eigenvalues, 0.0))) @ eigenvectors.T
        inverse_lambda = 1.0 + self.alpha if self.mode == "sampling" else 1.0
        decay = jnp.exp(-jnp.asarray(self.dt, flat.dtype))
        scale = jnp.sqrt((1.0 - decay**2) * inverse_lambda).astype(flat.dtype)
        xi = _normal(self, key, flat.shape, flat.dtype)
        return mean + decay * centred + scale * xi @ root.T, mean

    def params(self, state: ConsensusState) -> Any:
        """The weighted mean (`estimate="consensus"`) or the best particle (`"best"`)."""
        return _select(self, state)
