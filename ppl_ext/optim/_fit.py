"""`fit`: run any back-end on any expectation program, in compiled chunks of steps.

The loop: the back-end's `step` is run by a `lax.fori_loop` inside one jitted function
`chunk(state, start, length, ...)` whose trip count `length` is a run-time argument, so
chunks of every length share one compiled program (compiled ahead of time, before the
first chunk runs, and never retraced). Between chunks the host records the per-step
estimates, updates the progress bar, calls the callbacks and asks the early-stopping rule.
Step `i` (counted from 0 over the whole run) uses the key `jax.random.fold_in(key, i)`,
so the result does not depend on how the steps are cut into chunks; the back-end's
`init` gets `jax.random.fold_in(key, 2**32 - 1)`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.extend import core as jex_core

from ..adev import Expectation, ObjectiveShapeError, expectation
from ._backend import AbstractBackend, OptaxBackend
from ._progress import ProgressBar

#: With `chunk_size=None`, chunks grow or shrink to last about this many seconds each.
TARGET_CHUNK_SECONDS = 0.25
#: With `chunk_size=None`, the most steps in one chunk (the per-step history buffer size).
MAX_CHUNK_SIZE = 4096

_FIT_NAMES = ("objective", "params", "backend", "num_steps", "key", "maximize",
              "chunk_size", "progress", "callbacks", "early_stopping", "record_grad_norm")


class FitHistory(NamedTuple):
    """What `fit` recorded: per-step estimates and per-chunk wall-clock times.

    Attributes:
        value: float array `(num_steps_run,)`, the objective estimate of each step at the
            parameters the step started from, in the user's sign (the ELBO when
            maximising an ELBO). Noisy: average windows of it to see a trend.
        grad_norm: float array `(num_steps_run,)`, the global L2 norm of each step's
            gradient estimate (NaN for back-ends that use no gradient, and for every step
            of a fit run with `record_grad_norm=False`).
        step: int array `(num_chunks,)`, the number of steps done at the end of each chunk.
        wall_time: float array `(num_chunks,)`, seconds spent running steps up to the end
            of each chunk (cumulative; `np.diff` gives per-chunk times), compilation
            excluded.
        compile_time: seconds from the start to the compiled chunk program: the input
            check's trace of the objective, the back-end's `init`, and tracing, lowering
            and compiling the chunk program.

    Example:
        >>> import numpy as np
        >>> h = FitHistory(np.zeros(4), np.ones(4), np.array([2, 4]), np.array([0.1, 0.2]),
        ...                1.5)
        >>> int(h.step[-1]) == len(h.value)
        True
    """

    value: np.ndarray
    grad_norm: np.ndarray
    step: np.ndarray
    wall_time: np.ndarray
    compile_time: float


class FitResult(NamedTuple):
    """The result of `fit`.

    Attributes:
        params: the final parameters (same tree as the initial ones).
        state: the back-end's final state (e.g. `OptaxState(params, opt_state)`), from
            which a further `fit` could continue.
        history: a `FitHistory`.

    Example:
        >>> import numpy as np
        >>> r = FitResult({"theta": 1.0}, None, None)
        >>> r.params["theta"]
        1.0
    """

    params: Any
    state: Any
    history: FitHistory


class EarlyStopping(NamedTuple):
    """Stop when the chunk mean of the objective estimates stops improving.

    The rule: let `m_1, m_2, ...` be the means of `history.value` over the chunks run so
    far. A chunk *improves* when its mean beats the best earlier mean by more than
    `min_delta` (is larger when maximising, smaller when minimising). The fit stops after
    `patience` consecutive chunks without improvement. The estimates are noisy, so
    `min_delta` of a few standard errors of a chunk mean avoids stopping on noise. Chunk
    boundaries set the granularity: pass `fit(..., chunk_size=...)` for a rule that does
    not depend on the wall-clock (with `chunk_size=None` chunks adapt to the step time).

    Args:
        patience: chunks without improvement before stopping (at least 1).
        min_delta: the least change of the chunk mean that counts as an improvement.
        maximize: the direction; `None` (default) takes `fit`'s `maximize`.

    Returns (when called as `rule(step, state, history)`) True to stop.

    Example:
        >>> import numpy as np
        >>> rule = EarlyStopping(patience=2, maximize=True)
        >>> values = np.array([1.0, 1.0, 3.0, 3.0, 2.0, 2.0, 2.5, 2.5])
        >>> h = FitHistory(values, values, np.array([2, 4, 6, 8]), np.zeros(4), 0.0)
        >>> rule(8, None, h)  # chunk means 1, 3, 2, 2.5: no improvement on 3 for 2 chunks
        True
    """

    patience: int = 5
    min_delta: float = 0.0
    maximize: bool | None = None

    def __call__(self, step: int, state: Any, history: FitHistory) -> bool:
        """True when the last `patience` chunks did not improve on the best chunk mean."""
        if self.patience < 1:
            raise ValueError(f"EarlyStopping.patience must be >= 1, got {self.patience!r}.")
        sign = 1.0 if self.maximize in (None, True) else -1.0
        bounds = np.concatenate([[0], np.asarray(history.step)])
        value = np.asarray(history.value, np.float64)
        means = [value[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        best, since = -math.inf, 0
        for mean in means:
            if sign * mean > best + self.min_delta:
                best, since = sign * mean, 0
            else:
                since += 1
        return since >= self.patience


def fit(
    objective: Expectation,
    params: Any,
    backend: AbstractBackend | optax.GradientTransformation,
    num_steps: int,
    key: jax.Array,
    *args: Any,
    maximize: bool = True,
    chunk_size: int | None = None,
    progress: bool = True,
    callbacks: Callable | Sequence[Callable] = (),
    early_stopping: Callable | None = None,
    record_grad_norm: bool = True,
    **kwargs: Any,
) -> FitResult:
    """Optimise an expectation program's parameters with any back-end.

    Runs `num_steps` steps of `backend` on `objective(key, params, *args, **kwargs)`,
    maximising it (ELBOs and other bounds; `maximize=False` for losses). The back-end
    receives an objective to minimise: `-objective` (a `px.Expectation` of the negated
    program) when maximising. With an optax transformation, a step is
    `(v, g) = jax.value_and_grad(objective)(key_i, θ)` (unbiased estimates), then an
    optax update of θ.

    Steps run in compiled chunks (a `lax.fori_loop` over the back-end's `step`, one
    compiled program for every chunk, never retraced); between chunks the host updates
    the progress bar, calls `callbacks` and asks `early_stopping`. Step `i` uses the key
    `jax.random.fold_in(key, i)`, so the result does not depend on `chunk_size`. With
    `chunk_size=None` chunk lengths adapt so that each lasts about a quarter of a second
    (at most `MAX_CHUNK_SIZE` steps).

    Args:
        objective: a `px.Expectation` returning a scalar, called as
            `objective(key, params, *args, **kwargs)`, or a `px.vi` objective (an
            `AbstractObjective`, e.g. `px.vi.elbo(model, guide)`).
        params: the initial parameters, a pytree of floating-point arrays. For an
            objective with several parameter arguments (`params_argnums = (1, 2)`, e.g.
            `px.vi.iwelbo_dreg`'s model and guide parameters), the tuple of them.
        backend: an `AbstractBackend`, or an `optax.GradientTransformation` (wrapped in
            `OptaxBackend`).
        num_steps: the number of steps (at least 1).
        key: a JAX PRNG key.
        *args: further arguments of the objective (data), fixed during the fit.
        maximize: maximise the objective (default) or minimise it.
        chunk_size: steps per compiled chunk; `None` adapts it to the step time.
        progress: show a tqdm progress bar with the latest chunk's mean estimate; it opens
            before compilation starts.
        callbacks: callables (or one callable) called on the host after every chunk as
            `callback(step, state, history)`: the steps done so far, the back-end state
            and the `FitHistory` so far. Their return values are ignored.
        early_stopping: `None`, an `EarlyStopping` rule, or any callable
            `(step, state, history) -> bool`, asked after every chunk (after the
            callbacks); True stops the fit there.
        record_grad_norm: record each step's gradient norm in `history.grad_norm`
            (default). With False the entries are NaN and the norm is never computed
            (XLA drops it), which saves its cost (about 1.5 µs a step for a 2·10⁴-parameter
            model on one CPU core) when steps are very cheap.
        **kwargs: keyword arguments of the objective (not differentiated).

    Returns:
        `FitResult(params, state, history)`; `history.value` and `history.grad_norm` hold
        one entry per step actually run (fewer than `num_steps` after an early stop).

    Raises:
        TypeError: `objective` is not a `px.Expectation` or `px.vi` objective, `backend`
            is neither a back-end nor an optax transformation, a keyword argument looks
            like a misspelt `fit` argument or does not fit the objective's signature,
            `params` has non-floating leaves, a back-end breaks the protocol.
        KeyError, IndexError, AttributeError: the objective fails on `params` (a note
            says it happened at the initial parameters).
        ValueError: `num_steps` or `chunk_size` below 1.
        px.ObjectiveShapeError: the objective is not a floating-point scalar.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, optax
        >>> import ppl_ext as px
        >>> from ppl_ext.optim import fit
        >>> @px.expectation
        ... def objective(params):  # E[-(x - 3)^2] = -(theta - 3)^2 - 1, maximal at 3
        ...     x = px.sample(dist.Normal(params["theta"], 1.0))
        ...     return -((x - 3.0) ** 2)
        >>> optimiser = optax.adam(optax.cosine_decay_schedule(0.1, 500))
        >>> result = fit(objective, {"theta": jnp.array(0.0)}, optimiser, 500,
        ...              jax.random.key(0), progress=False)
        >>> bool(abs(result.params["theta"] - 3.0) < 0.1), result.history.value.shape
        (True, (500,))
    """
    program, name, num_params = _program(objective)
    _check_kwargs(program, kwargs)
    backend = _as_backend(backend)
    num_steps = _check_count("num_steps", num_steps)
    if chunk_size is not None:
        chunk_size = min(_check_count("chunk_size", chunk_size), num_steps)
    key = _as_key(key)
    callbacks = _as_callbacks(callbacks)
    early_stopping = _as_stopping(early_stopping, maximize)
    if not isinstance(record_grad_norm, (bool, np.bool_)):
        raise TypeError(
            f"record_grad_norm must be True or False, got {type(record_grad_norm).__name__} "
            f"{record_grad_norm!r}.")
    _check_signature(program, name, num_params, params, args, kwargs)
    params = _canonical_params(params)

    bar = ProgressBar(num_steps) if progress else None  # before tracing and compiling
    try:
        start = time.perf_counter()
        target = _target(objective, program, name, num_params, maximize)
        value_dtype = _check_value(target, name, key, params, args, kwargs)
        dynamic, static = eqx.partition((args, kwargs), eqx.is_array)
        # the init key is folded off the step keys, which stay those of `key`
        key_init = jax.random.fold_in(key, np.uint32(2**32 - 1))
        state = _strong(backend.init(key_init, params, target, *args, **kwargs))
        _check_params_tree(backend, state, params)
        buffer = chunk_size or min(num_steps, MAX_CHUNK_SIZE)
        chunk = _chunk_program(backend, target, static, buffer, value_dtype, record_grad_norm)
        compiled = jax.jit(chunk).lower(state, np.int32(0), np.int32(1), key, dynamic).compile()
        compile_time = time.perf_counter() - start
        if bar is not None:
            bar.compiled(compile_time)

        values = np.full(num_steps, np.nan, dtype=value_dtype)
        grad_norms = np.full(num_steps, np.nan, dtype=value_dtype)
        ends: list[int] = []
        times: list[float] = []
        sign = -1.0 if maximize else 1.0
        done, length, run_time = 0, chunk_size or 1, 0.0
        while done < num_steps:
            length = min(length, num_steps - done)
            start = time.perf_counter()
            state, chunk_values, chunk_norms = compiled(
                state, np.int32(done), np.int32(length), key, dynamic)
            chunk_values, chunk_norms = jax.device_get((chunk_values, chunk_norms))
            elapsed = time.perf_counter() - start
            run_time += elapsed
            values[done:done + length] = sign * chunk_values[:length]
            grad_norms[done:done + length] = chunk_norms[:length]
            done += length
            ends.append(done)
            times.append(run_time)
            if bar is not None:
                bar.advance(length, float(np.mean(values[done - length:done])))
            if callbacks or early_stopping is not None:
                history = _history(values, grad_norms, ends, times, compile_time, done)
                for callback in callbacks:
                    callback(done, state, history)
                if early_stopping is not None and early_stopping(done, state, history):
                    break
            if chunk_size is None:
                grown = int(length * TARGET_CHUNK_SECONDS / max(elapsed, 1e-6))
                length = max(1, min(grown, 4 * length, buffer))
    finally:
        if bar is not None:
            bar.close()
    history = _history(values, grad_norms, ends, times, compile_time, done)
    return FitResult(backend.params(state), state, history)


# ------------------------------------------------------------------------------ the loop


def _chunk_program(backend, target, static, buffer: int, value_dtype,
                   record_grad_norm: bool = True):
    """`chunk(state, start, length, key, dynamic) -> (state, values, grad_norms)`.

    Runs steps `start, ..., start + length - 1` (`length <= buffer`); the per-step
    estimates fill the first `length` entries of buffers of size `buffer` (the gradient
    norms stay NaN unless `record_grad_norm`).
    """

    def chunk(state, start, length, key, dynamic):
        args, kwargs = eqx.combine(dynamic, static)

        def body(i, carry):
            state, values, grad_norms = carry
            step_key = jax.random.fold_in(key, start + i)
            new_state, info = backend.step(step_key, state, target, *args, **kwargs)
            value, grad_norm = _info_scalars(backend, info)
            new_state = _like(backend, new_state, state)
            if record_grad_norm:
                grad_norms = grad_norms.at[i].set(grad_norm.astype(value_dtype))
            return new_state, values.at[i].set(value.astype(value_dtype)), grad_norms

        values = jnp.full((buffer,), jnp.nan, value_dtype)
        return lax.fori_loop(0, length, body, (state, values, values))

    return chunk


def _info_scalars(backend, info):
    name = type(backend).__name__
    missing = [a for a in ("value", "grad_norm") if not hasattr(info, a)]
    if missing:
        raise TypeError(
            f"{name}.step must return (state, info) with info.value and info.grad_norm "
            f"(use ppl_ext.optim.BackendInfo); the info {type(info).__name__} lacks "
            f"{', '.join(missing)}."
        )
    out = []
    for attr in ("value", "grad_norm"):
        leaf = jnp.asarray(getattr(info, attr))
        if leaf.shape != ():
            raise ObjectiveShapeError(
                f"{name}.step returned info.{attr} of shape {leaf.shape}; it must be a scalar.")
        out.append(leaf)
    return out


def _like(backend, new_state, state):
    """`new_state` cast to the dtypes of `state`, after checking structure and shapes."""
    name = type(backend).__name__
    new_leaves, new_tree = jax.tree.flatten(new_state)
    leaves, tree = jax.tree.flatten(state)
    if new_tree != tree:
        raise TypeError(
            f"{name}.step returned a state of structure {new_tree}, but received {tree}; "
            "a step must keep the state's structure.")
    out = []
    for new, old in zip(new_leaves, leaves):
        if jnp.shape(new) != jnp.shape(old):
            raise TypeError(
                f"{name}.step changed a state leaf's shape from {jnp.shape(old)} to "
                f"{jnp.shape(new)}; a step must keep the state's shapes.")
        dtype = jnp.asarray(old).dtype
        out.append(new if jnp.asarray(new).dtype == dtype else lax.convert_element_type(new, dtype))
    return jax.tree.unflatten(tree, out)


def _history(values, grad_norms, ends, times, compile_time, done) -> FitHistory:
    return FitHistory(values[:done], grad_norms[:done], np.asarray(ends, np.int64),
                      np.asarray(times, np.float64), compile_time)


def _program(objective) -> tuple[Callable, str, int]:
    """`(program, name, number of parameter arguments)` of a `px.Expectation` or objective.

    A `px.vi` objective (`AbstractObjective`) carries its `px.Expectation` as
    `.expectation` and the positions of its parameter arguments as `params_argnums`.
    """
    if isinstance(objective, Expectation):
        return objective.fn, getattr(objective, "__name__", "objective"), 1
    inner = getattr(objective, "expectation", None)
    if isinstance(inner, Expectation):
        argnums = tuple(getattr(objective, "params_argnums", (1,)))
        if argnums != tuple(range(1, len(argnums) + 1)):
            raise TypeError(
                f"fit trains the parameter arguments right after the key; "
                f"{type(objective).__name__}.params_argnums is {argnums}.")
        return inner.fn, type(objective).__name__, len(argnums)
    raise TypeError(
        "fit optimises a px.Expectation (decorate the program with @px.expectation) or a "
        f"px.vi objective (e.g. px.vi.elbo(model, guide)), got {type(objective).__name__}.")


def _target(objective, program, name: str, num_params: int, maximize: bool) -> Expectation:
    """The `px.Expectation` handed to the back-end: `target(key, params, *args)`, minimised.

    The user's program, negated when maximising; with several parameter arguments
    (`params_argnums = (1, ..., n)`), `params` is the tuple of them.
    """
    if isinstance(objective, Expectation) and not maximize:
        return objective
    sign = -1.0 if maximize else 1.0

    def target(params, *args, **kwargs):
        params = tuple(params) if num_params > 1 else (params,)
        out = program(*params, *args, **kwargs)
        return out if sign > 0 else jax.tree.map(jnp.negative, out)

    prefix = "negated_" if maximize else ""
    target.__name__ = target.__qualname__ = f"{prefix}{name}"
    wrapped = expectation(target)
    inner = getattr(objective, "expectation", objective)
    if getattr(inner, "_required_params", ()):
        # an objective refuses params entries it never reads (a misspelt name): so does fit
        wrapped._required_params = (0,)
    return wrapped


# ------------------------------------------------------------------------- input checks


def _as_backend(backend) -> AbstractBackend:
    if isinstance(backend, AbstractBackend):
        return backend
    if isinstance(backend, optax.GradientTransformation):
        return OptaxBackend(backend)
    raise TypeError(
        "backend must be a ppl_ext.optim.AbstractBackend or an optax.GradientTransformation "
        f"(e.g. optax.adam(1e-3)), got {type(backend).__name__}.")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
    return int(value)


def _as_key(key) -> jax.Array:
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"fit needs one PRNG key, got a key array of shape {key.shape}.")
        return key
    if dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        "fit(objective, params, backend, num_steps, key, ...) needs a JAX PRNG key "
        f"(jax.random.key(0)) as key, got {type(key).__name__}.")


def _as_callbacks(callbacks) -> tuple[Callable, ...]:
    if callable(callbacks):
        return (callbacks,)
    callbacks = tuple(callbacks)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"callbacks must be callables, got {type(callback).__name__}.")
    return callbacks


def _as_stopping(early_stopping, maximize: bool):
    if early_stopping is None:
        return None
    if isinstance(early_stopping, EarlyStopping):
        if early_stopping.patience < 1:
            raise ValueError(
                f"EarlyStopping.patience must be >= 1, got {early_stopping.patience!r}.")
        if early_stopping.maximize is None:
            return early_stopping._replace(maximize=bool(maximize))
        return early_stopping
    if not callable(early_stopping):
        raise TypeError(
            "early_stopping must be None, an EarlyStopping rule or a callable "
            f"(step, state, history) -> bool, got {type(early_stopping).__name__}.")
    return early_stopping


def _check_kwargs(program, kwargs: dict) -> None:
    """Refuse a keyword argument that looks like a misspelt argument of `fit` itself."""
    named = set()
    with _suppress_signature_errors():
        named = set(inspect.signature(program).parameters)
    for name in kwargs:
        if name in named:
            continue
        close = difflib.get_close_matches(name, _FIT_NAMES, n=1, cutoff=0.75)
        if close:
            raise TypeError(
                f"fit() got an unexpected keyword argument {name!r}; did you mean "
                f"{close[0]!r}? (keyword arguments that are not fit's own are passed to the "
                "objective)")


def _check_signature(program, name: str, num_params: int, params, args, kwargs) -> None:
    """The objective's program accepts `(params, *args, **kwargs)`."""
    if num_params > 1:
        if not isinstance(params, (tuple, list)) or len(params) != num_params:
            raise TypeError(
                f"{name} takes {num_params} parameter arguments after the key; pass params "
                f"as a tuple of {num_params} parameter trees.")
        params = tuple(params)
    else:
        params = (params,)
    signature = None
    with _suppress_signature_errors():
        signature = inspect.signature(program)
    if signature is None:
        return
    try:
        signature.bind(*params, *args, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"fit calls {name}(key, params, *args, **kwargs) with {len(params) + len(args)} "
            f"positional argument(s) after the key and keywords {sorted(kwargs)}, which does "
            f"not fit its program's signature {signature}: {exc}") from None


class _suppress_signature_errors:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (TypeError, ValueError))


def _canonical_params(params):
    """Arrays without weak types (so the loop's carry keeps its types); floats only."""
    leaves, tree = jax.tree.flatten_with_path(params)
    if not leaves:
        raise ValueError("fit needs parameters: params has no array leaves.")
    out = []
    for path, leaf in leaves:
        array = jnp.asarray(leaf)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} is {array.dtype}; parameters are "
                "floating-point arrays (gradients of integers are not defined).")
        out.append(jnp.asarray(array, dtype=array.dtype))
    return jax.tree.unflatten(tree, out)


def _strong(tree):
    return jax.tree.map(
        lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype) if eqx.is_array_like(x) else x,
        tree)


def _check_value(target, name, key, params, args, kwargs):
    """Trace the objective once: a floating scalar, and every parameter is used."""
    try:
        closed, shape = jax.make_jaxpr(
            lambda p: target(key, p, *args, **kwargs), return_shape=True)(params)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        exc.add_note(
            f"(raised by fit's first evaluation of {name}(key, params, *args, **kwargs) at "
            "the initial params: do params and args match what the objective expects?)")
        raise
    if not isinstance(shape, jax.ShapeDtypeStruct) or shape.shape != ():
        what = getattr(shape, "shape", jax.tree.structure(shape))
        raise ObjectiveShapeError(
            f"fit needs a scalar objective, but {name} returns {what}; reduce it (e.g. "
            "jnp.sum or jnp.mean).")
    used = set()
    for eqn in closed.jaxpr.eqns:
        used.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
    used.update(v for v in closed.jaxpr.outvars if not isinstance(v, jex_core.Literal))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(params)[0]]
    unused = [p for p, v in zip(paths, closed.jaxpr.invars) if v not in used]
    if unused:
        warnings.warn(
            f"the objective {name} does not depend on params{', params'.join(unused)}: "
            "fit will not change them (a misspelt parameter name?).", stacklevel=3)
    return shape.dtype


def _check_params_tree(backend, state, params) -> None:
    got = jax.tree.structure(backend.params(state))
    if got != jax.tree.structure(params):
        raise TypeError(
            f"{type(backend).__name__}.params(state) must return the parameters' tree "
            f"{jax.tree.structure(params)}, got {got}.")
