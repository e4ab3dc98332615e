"""Zeroth-order back-ends: descent directions from objective values or from rankings alone.

- `ZerothOrderSGD`: two-point Gaussian-smoothing gradient estimates fed to an optax
  transformation (Nesterov and Spokoiny, 2017).
- `QuantizedZerothOrderSGD` (QZO): the same two-point estimate on the continuous scales
  of quantised weights (`quantize`, `dequantize`), with clipped directional derivatives.
- `ZerothOrderRankSGD`: ZO-RankSGD (Tang, Rybin and Chang, "Zeroth-Order Optimization Meets
  Human Feedback: Provable Learning via Ranking Oracles", ICLR 2024), which needs only an
  ordering of candidate points, from the objective or from any ranking oracle (a
  simulated judge, or a person at a prompt behind `jax.pure_callback`).

Both work on the flattened parameter vector (`jax.flatten_util.ravel_pytree`) and return
parameters with the tree of the initial ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from ._backend import AbstractBackend, BackendInfo
from ._cbo import _check_count, _check_positive


class ZerothOrderState(NamedTuple):
    """State of the zeroth-order back-ends: the parameters and the optax state.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"theta": jnp.array(0.0)}
        >>> state = ZerothOrderState(params, optax.sgd(0.1).init(params))
        >>> float(state.params["theta"])
        0.0
    """

    params: Any
    opt_state: optax.OptState


def _as_transformation(owner: str, transformation) -> optax.GradientTransformation:
    """An optax transformation, or plain SGD for a step size (a float or an optax schedule)."""
    if isinstance(transformation, optax.GradientTransformation):
        return transformation
    if callable(transformation):
        return optax.sgd(transformation)
    _check_positive(owner, "transformation (a step size)", transformation)
    return optax.sgd(transformation)


def _check_transformation(owner: str, transformation) -> None:
    if isinstance(transformation, optax.GradientTransformation) or callable(transformation):
        return
    if isinstance(transformation, (int, float)) and not isinstance(transformation, bool):
        _check_positive(owner, "transformation (a step size)", transformation)
        return
    raise TypeError(
        f"{owner}.transformation must be an optax.GradientTransformation, a step size or an "
        f"optax schedule, got {type(transformation).__name__}.")


def _apply(transformation, grads, state: ZerothOrderState) -> ZerothOrderState:
    updates, opt_state = transformation.update(grads, state.opt_state, state.params)
    return ZerothOrderState(optax.apply_updates(state.params, updates), opt_state)


def _nan(value) -> jax.Array:
    return jnp.full((), jnp.nan, jnp.result_type(value, jnp.float32))


class ZerothOrderSGD(AbstractBackend):
    """Two-point Gaussian-smoothing zeroth-order SGD, optionally through any optax transformation.

    The gradient estimate at `x`, from `q = num_directions` directions `u_k ~ N(0, I)`, is

        g = (1/q) Σ_k [F(x + μ u_k; ω_k) - F(x - μ u_k; ω_k)] / (2μ) · u_k,

    where `F(·; ω)` is the objective's estimate with key `ω` (each direction's two points
    share their key, common random numbers). It is an unbiased estimate of the gradient of
    the Gaussian smoothing `f_μ(x) = E_u f(x + μu)` (Stein's identity
    `∇f_μ(x) = E[f(x + μu) u] / μ`, symmetrised); `f_μ` is close to `f` for small `μ`
    (`|∇f_μ - ∇f| ≤ μ L (d + 3)^{3/2} / 2` for an `L`-smooth `f`). The estimate feeds an
    optax transformation (`transformation`), or plain SGD when a step size is given.
    `optax.perturbations.make_perturbed_fun` with `Normal` noise estimates the same
    `∇f_μ` one-sided, with `f(x)` as a baseline, for deterministic functions of arrays;
    this estimator takes the objective's keys and parameter trees.

    Each step uses `2q` objective evaluations, all for `g`; `info.value` is their mean,
    `Σ_j (f(x + μu_j) + f(x - μu_j)) / 2q`, an unbiased estimate of the smoothed objective
    `f_μ(x)` that the back-end minimises (it exceeds `f(x)` by `O(μ²)`: `μ² tr(H) / 2` for
    a quadratic with Hessian `H`), at no extra evaluation. `info.grad_norm` is the global
    norm of `g`.

    Args:
        transformation: an `optax.GradientTransformation` (e.g. `optax.adam(1e-2)`), or a
            step size (a float or an optax schedule) for plain SGD. Default `1e-2`.
        smoothing: μ, the smoothing radius (> 0).
        num_directions: `q`, the directions averaged per step.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ppl_ext as px
        >>> from ppl_ext.optim import ZerothOrderSGD
        >>> @px.expectation
        ... def loss(x):
        ...     return jnp.sum((x - 1.0) ** 2)
        >>> backend = ZerothOrderSGD(0.05, smoothing=0.01, num_directions=4)
        >>> result = px.fit(loss, jnp.zeros(5), backend, 300, jax.random.key(0),
        ...                 maximize=False, progress=False)
        >>> bool(jnp.max(jnp.abs(result.params - 1.0)) < 0.05)
        True
    """

    transformation: Any = 1e-2
    smoothing: float = 1e-2
    num_directions: int = 10

    def __check_init__(self):
        _check_transformation("ZerothOrderSGD", self.transformation)
        _check_positive("ZerothOrderSGD", "smoothing", self.smoothing)
        _check_count("ZerothOrderSGD", "num_directions", self.num_directions)

    def estimate_gradient(self, key, params, objective, *args, **kwargs) -> Any:
        """The two-point estimate `g` of `∇f_μ(params)` (a tree like `params`)."""
        return self._estimate(key, params, objective, args, kwargs)[0]

    def _estimate(self, key, params, objective, args, kwargs):
        """`(g, the mean of the 2q evaluations, an estimate of f_μ(params))`."""
        flat, unravel = ravel_pytree(params)
        mu = jnp.asarray(self.smoothing, flat.dtype)

        def one(k):
            key_direction, key_value = jax.random.split(k)
            u = jax.random.normal(key_direction, flat.shape, flat.dtype)
            plus = objective(key_value, unravel(flat + mu * u), *args, **kwargs)
            minus = objective(key_value, unravel(flat - mu * u), *args, **kwargs)
            return ((plus - minus) / (2.0 * mu)).astype(flat.dtype) * u, (plus + minus) / 2.0

        keys = jax.random.split(key, self.num_directions)
        directions, values = jax.vmap(one)(keys)
        return unravel(jnp.mean(directions, axis=0)), jnp.mean(values)

    def init(self, key, params, objective, *args, **kwargs) -> ZerothOrderState:
        """`ZerothOrderState(params, transformation.init(params))`; `key` is unused."""
        transformation = _as_transformation("ZerothOrderSGD", self.transformation)
        return ZerothOrderState(params, transformation.init(params))

    def step(self, key, state: ZerothOrderState, objective, *args, **kwargs):
        """One update with the two-point estimate of the smoothed objective's gradient."""
        _, key_gradient = jax.random.split(key)  # the same gradient keys as before
        grads, value = self._estimate(key_gradient, state.params, objective, args, kwargs)
        transformation = _as_transformation("ZerothOrderSGD", self.transformation)
        return _apply(transformation, grads, state), BackendInfo(value, optax.tree.norm(grads))

    def params(self, state: ZerothOrderState) -> Any:
        """`state.params`."""
        return state.params


def quantize(weights, num_bits: int = 4):
    """Symmetric absmax quantisation, one scale per row: `(codes, scales)`.

    For an array `w` whose last axis holds a group (a row of a weight matrix), `scale =
    max|w| / (2^(b-1) - 1)` per group and `code = round(w / scale)`, an integer in
    `[-(2^(b-1) - 1), 2^(b-1) - 1]` stored as `int8` (`num_bits` from 2 to 8); `dequantize`
    returns `scale · code`, within `scale / 2` of `w`. Works leaf by leaf on a pytree (a
    scalar leaf is one group). These are the frozen integer weights and the continuous
    scales that `QuantizedZerothOrderSGD` fine-tunes (QZO).

    Example:
        >>> import jax.numpy as jnp
        >>> codes, scales = quantize(jnp.array([[0.7, -1.4, 0.1]]), num_bits=4)
        >>> codes.tolist(), [round(float(s), 4) for s in scales.ravel()]
        ([[4, -7, 0]], [0.2])
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 2 <= num_bits <= 8:
        raise ValueError(f"quantize: num_bits must be an integer from 2 to 8, got {num_bits!r}")
    levels = 2 ** (num_bits - 1) - 1

    def one(w):
        w = jnp.asarray(w)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"quantize: weights must be floating point, got {w.dtype}")
        scale = jnp.max(jnp.abs(w), axis=-1, keepdims=True) / levels if w.ndim else (
            jnp.abs(w) / levels)
        scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))  # an all-zero group
        codes = jnp.clip(jnp.round(w / scale), -levels, levels).astype(jnp.int8)
        return codes, scale

    pairs = jax.tree.map(one, weights)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2  # noqa: E731
    codes = jax.tree.map(lambda pair: pair[0], pairs, is_leaf=is_pair)
    scales = jax.tree.map(lambda pair: pair[1], pairs, is_leaf=is_pair)
    return codes, scales


def dequantize(codes, scales):
    """`scales · codes`, leaf by leaf (the inverse of `quantize` up to rounding)."""
    return jax.tree.map(lambda c, s: s * c.astype(s.dtype), codes, scales)


class QuantizedZerothOrderSGD(AbstractBackend):
    """QZO: zeroth-order fine-tuning of quantisation scales with clipped directional
    derivatives.

    Shang, Zhou, Lin, Li and Zhou, "Fine-tuning Quantized Neural Networks with Zeroth-order
    Optimization" (2025). The weights are `scale · code` with frozen integer codes
    (`quantize`); the parameters are the continuous scales `Δ`, so the objective is written
    as a function of them (`objective(key, scales)` evaluates the network at
    `dequantize(codes, scales)`). Per direction `z ~ N(0, I)`,

        d = [F(Δ + ε z) - F(Δ - ε z)] / (2ε),   d' = clip(d, -C, C),   g = mean_k d'_k z_k,

    and `Δ ← max(Δ - γ g, 0)` (through `transformation`, then the projection onto
    non-negative scales). Without clipping (`clip=None`), `g` is `ZerothOrderSGD`'s
    unbiased estimate of the smoothed objective's gradient; clipping bounds every
    direction's step (`|d'| ≤ C`) where the objective is sharp in the scales, at the price
    of a bias where `|d| > C` (stated, as the paper does). Each step uses `2q`
    evaluations; `info.value` is their mean (an estimate of the smoothed objective at the
    scales, as for `ZerothOrderSGD`) and `info.grad_norm` the norm of `g`.

    Args:
        transformation: an optax transformation or a step size (default `1e-3`).
        smoothing: ε (> 0).
        num_directions: `q`, the directions averaged per step (the paper uses 1).
        clip: `C` (> 0), or None for no clipping.

    Example (least squares through 4-bit weights whose scales start 30% too small):
        >>> import jax, jax.numpy as jnp
        >>> import ppl_ext as px
        >>> from ppl_ext.optim import QuantizedZerothOrderSGD, quantize, dequantize
        >>> w_true = jax.random.normal(jax.random.key(0), (3, 8))
        >>> codes, scales = quantize(w_true, num_bits=4)
        >>> x = jax.random.normal(jax.random.key(1), (64, 8))
        >>> @px.expectation
        ... def loss(s):
        ...     return jnp.mean((x @ dequantize(codes, s).T - x @ w_true.T) ** 2)
        >>> backend = QuantizedZerothOrderSGD(0.002, smoothing=1e-3, clip=5.0)
        >>> result = px.fit(loss, 0.7 * scales, backend, 400, jax.random.key(2),
        ...                 maximize=False, progress=False)
        >>> key = jax.random.key(3)
        >>> bool(loss(key, result.params) < 0.1 * loss(key, 0.7 * scales))
        True
    """

    transformation: Any = 1e-3
    smoothing: float = 1e-3
    num_directions: int = 1
    clip: float | None = 100.0

    def __check_init__(self):
        _check_transformation("QuantizedZerothOrderSGD", self.transformation)
        _check_positive("QuantizedZerothOrderSGD", "smoothing", self.smoothing)
        _check_count("QuantizedZerothOrderSGD", "num_directions", self.num_directions)
        if self.clip is not None:
            _check_positive("QuantizedZerothOrderSGD", "clip", self.clip)

    def estimate_gradient(self, key, params, objective, *args, **kwargs) -> Any:
        """`g`: the mean over directions of the clipped directional derivative times `z`."""
        return self._estimate(key, params, objective, args, kwargs)[0]

    def _estimate(self, key, params, objective, args, kwargs):
        """`(g, the mean of the 2q evaluations)`."""
        flat, unravel = ravel_pytree(params)
        eps = jnp.asarray(self.smoothing, flat.dtype)

        def one(k):
            key_direction, key_value = jax.random.split(k)
            z = jax.random.normal(key_direction, flat.shape, flat.dtype)
            plus = objective(key_value, unravel(flat + eps * z), *args, **kwargs)
            minus = objective(key_value, unravel(flat - eps * z), *args, **kwargs)
            d = ((plus - minus) / (2.0 * eps)).astype(flat.dtype)
            if self.clip is not None:
                d = jnp.clip(d, -self.clip, self.clip)
            return d * z, (plus + minus) / 2.0

        keys = jax.random.split(key, self.num_directions)
        directions, values = jax.vmap(one)(keys)
        return unravel(jnp.mean(directions, axis=0)), jnp.mean(values)

    def init(self, key, params, objective, *args, **kwargs) -> ZerothOrderState:
        """`ZerothOrderState(scales, transformation.init(scales))`; `key` is unused."""
        transformation = _as_transformation("QuantizedZerothOrderSGD", self.transformation)
        return ZerothOrderState(params, transformation.init(params))

    def step(self, key, state: ZerothOrderState, objective, *args, **kwargs):
        """One clipped two-point update of the scales, then `max(·, 0)`."""
        _, key_gradient = jax.random.split(key)  # the same gradient keys as before
        grads, value = self._estimate(key_gradient, state.params, objective, args, kwargs)
        transformation = _as_transformation("QuantizedZerothOrderSGD", self.transformation)
        new = _apply(transformation, grads, state)
        scales = jax.tree.map(lambda s: jnp.maximum(s, 0), new.params)
        return ZerothOrderState(scales, new.opt_state), BackendInfo(value, optax.tree.norm(grads))

    def params(self, state: ZerothOrderState) -> Any:
        """`state.params` (the scales)."""
        return state.params


def rank_by_objective(objective, *args, **kwargs) -> Callable:
    """The ranking oracle that orders candidates by the objective's estimates, lowest first.

    Returns `oracle(key, candidates) -> ordering`: `candidates` is a parameter tree with a
    leading axis of length `m`; `ordering` holds the `m` candidate indices from best
    (smallest estimate) to worst. All candidates are estimated with the same key (common
    random numbers), so for noise that does not depend on the parameters the ordering is
    that of the exact values. This is `ZerothOrderRankSGD`'s default oracle.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> oracle = rank_by_objective(lambda key, x: jnp.sum(x**2))
        >>> oracle(jax.random.key(0), jnp.array([[2.0], [0.5], [-1.0]])).tolist()
        [1, 2, 0]
    """

    def oracle(key, candidates):
        values = jax.vmap(lambda c: objective(key, c, *args, **kwargs))(candidates)
        return jnp.argsort(values)

    return oracle


class ZerothOrderRankSGD(AbstractBackend):
    """ZO-RankSGD: descend along a direction built from a ranking of perturbed candidates.

    Tang, Rybin and Chang (ICLR 2024). At `x`, draw `ξ_1..ξ_m ~ N(0, I)`
    (`m = num_candidates`) and ask a ranking oracle to order the candidates `x + μ ξ_i`
    from best to worst; with the top `k = num_ranked` of that ordering, each pair
    `(a, b)` with `a` ranked above `b` (both in the top `k`, or `a` in the top `k` and `b`
    not) is an edge of the comparison graph `E`, and

        g = (1 / |E|) Σ_{(a, b) ∈ E} (ξ_b - ξ_a),      x ← x - η g

    (through `transformation`). `g` needs no values: in expectation it points along the
    gradient of the smoothed objective (the paper's rank-based estimator), with an
    unknown positive scale, so the step size sets the step length (use a decaying
    schedule for convergence).

    With `num_step_sizes = L` (at least 2) the step length comes from the oracle too, a
    line search by ranking (the paper pairs its estimator with a ranking-based line search
    in the same spirit): the `L` trial points `x - s_j g`, `s_j = η 2^(j - ⌊L/2⌋)`, are
    ranked, the best is the new `x`, and its step size the next `η` (so `η` doubles, halves
    or stays; `transformation` must then be the initial step size, a float). It needs no
    schedule and adapts to the objective's scale; a step costs `m + L` ranked candidates.

    The oracle is a callable `ranking_oracle(key, candidates) -> ordering`: `candidates` is
    the parameter tree with a leading axis of length `m` (or `L` for the line search),
    `ordering` an int array of those indices from best to worst (only its first `k`
    entries are used for the direction, its first for the line search). It runs inside
    `jit`: a person at a prompt or another process is reached through
    `jax.pure_callback`. The default, `None`, is `rank_by_objective(objective, *args)`.

    Args:
        transformation: an `optax.GradientTransformation`, or a step size (a float or an
            optax schedule) for plain SGD. Default `1e-2`.
        smoothing: μ, the perturbation radius (> 0).
        num_candidates: `m`, the candidates ranked per step (at least 2).
        num_ranked: `k`, how many of the best candidates the oracle orders (`None`: all).
        ranking_oracle: `None` (rank by the objective) or a callable as above.
        num_step_sizes: `L`, the step sizes tried by the ranking line search (`None`: no
            line search, the `transformation`'s step).
        report_value: evaluate the objective at the current parameters for `info.value`
            (one query per step, its own key); `False` reports NaN and never calls the
            objective outside the default oracle (for a ranking-only problem whose
            objective is a placeholder).

    `info.grad_norm` is NaN (`g` has no gradient scale).

    Example (a simulated judge that only compares distances to a hidden target):
        >>> import jax, jax.numpy as jnp, optax
        >>> from ppl_ext.optim import ZerothOrderRankSGD
        >>> target = jnp.arange(4.0)
        >>> def judge(key, candidates):
        ...     return jnp.argsort(jnp.sum((candidates - target) ** 2, axis=1))
        >>> backend = ZerothOrderRankSGD(optax.cosine_decay_schedule(0.2, 400, 0.01),
        ...                              num_candidates=8, ranking_oracle=judge,
        ...                              report_value=False)
        >>> state = backend.init(jax.random.key(0), jnp.zeros(4), None)
        >>> step = jax.jit(lambda k, s: backend.step(k, s, None)[0])
        >>> for i in range(400):
        ...     state = step(jax.random.key(i), state)
        >>> bool(jnp.max(jnp.abs(backend.params(state) - target)) < 0.1)
        True
    """

    transformation: Any = 1e-2
    smoothing: float = 1e-2
    num_candidates: int = 10
    num_ranked: int | None = None
    ranking_oracle: Callable | None = None
    report_value: bool = True
    num_step_sizes: int | None = None

    def __check_init__(self):
        owner = "ZerothOrderRankSGD"
        _check_transformation(owner, self.transformation)
        _check_positive(owner, "smoothing", self.smoothing)
        _check_count(owner, "num_candidates", self.num_candidates, minimum=2)
        if self.num_ranked is not None:
            _check_count(owner, "num_ranked", self.num_ranked)
            if self.num_ranked > self.num_candidates:
                raise ValueError(
                    f"{owner}.num_ranked ({self.num_ranked}) must be at most num_candidates "
                    f"({self.num_candidates}).")
        if self.num_step_sizes is not None:
            _check_count(owner, "num_step_sizes", self.num_step_sizes, minimum=2)
            if not (isinstance(self.transformation, (int, float))
                    and not isinstance(self.transformation, bool)):
                raise TypeError(
                    f"{owner}: with num_step_sizes (the ranking line search) the "
                    "transformation must be the initial step size, a float, got "
                    f"{type(self.transformation).__name__}.")
        if self.ranking_oracle is not None and not callable(self.ranking_oracle):
            raise TypeError(f"{owner}.ranking_oracle must be None or a callable "
                            f"(key, candidates) -> ordering, got {self.ranking_oracle!r}.")

    def _rank_weights(self, dtype) -> jax.Array:
        """Coefficient of the candidate at each rank position in `Σ_E (ξ_b - ξ_a) / |E|`."""
        m = self.num_candidates
        k = m if self.num_ranked is None else self.num_ranked
        position = jnp.arange(m)
        # in the top k: worse than `position` candidates, better than the m - 1 - position
        # after it; below the top k: worse than the k ranked ones, unordered among itself
        top = 2 * position - (m - 1)
        rest = jnp.full((m,), k)
        edges = k * (k - 1) / 2 + k * (m - k)
        return (jnp.where(position < k, top, rest) / edges).astype(dtype)

    def estimate_direction(self, key, params, objective, *args, **kwargs) -> Any:
        """The rank-based direction `g` at `params` (a tree like `params`)."""
        flat, unravel = ravel_pytree(params)
        key_direction, key_oracle = jax.random.split(key)
        xi = jax.random.normal(key_direction, (self.num_candidates, flat.shape[0]), flat.dtype)
        candidates = jax.vmap(unravel)(flat + jnp.asarray(self.smoothing, flat.dtype) * xi)
        ordering = self._rank(key_oracle, candidates, self.num_candidates, objective, args,
                              kwargs)
        direction = self._rank_weights(flat.dtype) @ xi[ordering]
        return unravel(direction)

    def _rank(self, key, candidates, count, objective, args, kwargs) -> jax.Array:
        oracle = self.ranking_oracle
        if oracle is None:
            oracle = rank_by_objective(objective, *args, **kwargs)
        ordering = jnp.asarray(oracle(key, candidates))
        if ordering.shape != (count,) or not jnp.issubdtype(ordering.dtype, jnp.integer):
            raise ValueError(
                f"the ranking oracle must return {count} integer indices (best "
                f"first), got an array of shape {ordering.shape} and dtype {ordering.dtype}.")
        return ordering

    def init(self, key, params, objective, *args, **kwargs) -> ZerothOrderState:
        """`ZerothOrderState(params, transformation.init(params))`, or with the line search
        `ZerothOrderState(params, η)` (the current step size); `key` is unused."""
        if self.num_step_sizes is not None:
            dtype = ravel_pytree(params)[0].dtype
            return ZerothOrderState(params, jnp.asarray(self.transformation, dtype))
        transformation = _as_transformation("ZerothOrderRankSGD", self.transformation)
        return ZerothOrderState(params, transformation.init(params))

    def step(self, key, state: ZerothOrderState, objective, *args, **kwargs):
        """Rank `num_candidates` perturbations, step along the rank-based direction (with
        the step size of the ranking line search when `num_step_sizes` is set)."""
        key_value, key_direction = jax.random.split(key)
        if self.report_value:
            value = jnp.asarray(objective(key_value, state.params, *args, **kwargs))
        else:
            value = jnp.full((), jnp.nan, ravel_pytree(state.params)[0].dtype)
        if self.num_step_sizes is not None:
            key_direction, key_search = jax.random.split(key_direction)
        direction = self.estimate_direction(key_direction, state.params, objective, *args,
                                            **kwargs)
        if self.num_step_sizes is None:
            transformation = _as_transformation("ZerothOrderRankSGD", self.transformation)
            return _apply(transformation, direction, state), BackendInfo(value, _nan(value))
        flat, unravel = ravel_pytree(state.params)
        g = ravel_pytree(direction)[0]
        count = self.num_step_sizes
        sizes = state.opt_state * 2.0 ** (jnp.arange(count) - count // 2).astype(flat.dtype)
        trials = flat - sizes[:, None] * g
        ordering = self._rank(key_search, jax.vmap(unravel)(trials), count, objective, args,
                              kwargs)
        best = ordering[0]
        return (ZerothOrderState(unravel(trials[best]), sizes[best]),
                BackendInfo(value, _nan(value)))

    def params(self, state: ZerothOrderState) -> Any:
        """`state.params`."""
        return state.params
