"""`px.expectation`: turn an expectation program into unbiased estimators."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax._src.interpreters import partial_eval as pe

from ._continuity import check_continuity
from ._errors import InvalidParameterError, ObjectiveShapeError, SecondOrderError
from ._interpreter import (
    finish,
    has_validated_sites,
    invalid_message,
    raise_if_invalid,
    run_jaxpr,
    zero_acc,
)
from ._graph import plan as graph_plan
from ._primitives import bind_nested, inside_expectation, tracing_expectation


class _Program:
    """A traced expectation program; hashable by identity (a static custom_jvp argument).

    `messages` is the list of run-time error messages of its parameter checks (owned by
    the `Expectation`, so that ids are stable across traces); `invalid` indexes it.
    """

    __slots__ = ("jaxpr", "messages")

    def __init__(self, jaxpr: core.Jaxpr, messages: list[str]):
        self.jaxpr = jaxpr
        self.messages = messages


def _evaluate(program: _Program, key, inputs, surrogate: bool):
    """`(outputs, invalid message id)` of the program, in value or surrogate mode."""
    graph = graph_plan(program.jaxpr) if surrogate else None
    return run_jaxpr(program.jaxpr, [], inputs, key, zero_acc(surrogate), surrogate, finish,
                     (), program.messages, graph)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _estimate(program: _Program, key, inputs):
    return _evaluate(program, key, inputs, surrogate=False)


@_estimate.defjvp
def _estimate_jvp(program: _Program, primals, tangents):
    key, inputs = primals
    _, inputs_dot = tangents
    # The primals carry tangents of an enclosing differentiation only when a second
    # derivative is being taken; `_first_order_only` refuses that.
    inputs = _first_order_only(inputs)

    def surrogate(inputs):
        return _evaluate(program, key, inputs, surrogate=True)

    outs, outs_dot, invalid = jax.jvp(surrogate, (inputs,), (inputs_dot,), has_aux=True)
    return (outs, invalid), (outs_dot, np.zeros(jnp.shape(invalid), jax.dtypes.float0))


@jax.custom_jvp
def _first_order_only(primals):
    """Identity; differentiating it (a second derivative of an estimate) is an error."""
    return primals


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise SecondOrderError(
        "a second derivative of an expectation estimate was requested (e.g. jax.hessian, "
        "or jax.grad of a function that calls f.grad). ppl_ext's estimators are first "
        "order: differentiating a gradient estimate does not give an unbiased estimate of "
        "the second derivative. Use f.hvp(key, *args, v=v) for an unbiased "
        "Hessian-vector product estimate (second-order estimator, checked), or an "
        "expectation program that computes them (e.g. a score-function identity)."
    )


def _as_key(key) -> jax.Array:
    key_dtype = getattr(key, "dtype", None)
    if key_dtype is not None and jax.dtypes.issubdtype(key_dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"expected a single PRNG key, got a key array of shape {key.shape}; "
                "vmap over keys with jax.vmap(f.estimate, in_axes=(0, None))."
            )
        return key
    if key_dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        "an expectation is called as f(key, *args) with a jax PRNG key first "
        f"(jax.random.key(0)); got {type(key).__name__} "
        f"{getattr(key, 'shape', '')} {key_dtype or ''}."
    )


def _trace(
    fn: Callable, args: tuple, kwargs: dict, check: bool = True, required: tuple = ()
) -> tuple[core.Jaxpr, list, Any]:
    """Trace `fn` to a closed-over-nothing jaxpr `(constants..., args...) -> outputs`.

    Returns the jaxpr after dead-code elimination (a draw whose value is unused would add
    score-function variance and work without changing the expectation), the inputs it
    still uses (constants first), and the output tree.
    """
    flat, in_tree = jax.tree.flatten((args, kwargs))
    # Python ints, bools, strings (anything that is not array-like) stay Python values,
    # as NumPyro and jax.jit(static_argnums) users expect: a plate size or a layer width
    # passed as an argument is a constant of the program, not a tracer.
    static = [not _traced_leaf(x) for x in flat]
    flat = [x for x, s in zip(flat, static) if not s]
    constants = [x for x, s in zip(jax.tree.leaves((args, kwargs)), static) if s]

    def flat_fn(*traced):
        with tracing_expectation():
            leaves = _merge(static, traced, constants)
            args, kwargs = jax.tree.unflatten(in_tree, leaves)
            return fn(*args, **kwargs)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
    leaves, out_tree = jax.tree.flatten(out_shape)
    name = getattr(fn, "__name__", repr(fn))
    if not leaves:
        raise ObjectiveShapeError(f"expectation program {name} returned no values.")
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise ObjectiveShapeError(
                f"expectation program {name} returned a {leaf.dtype} value; an "
                "expectation must return floating-point values (cast with "
                "jnp.asarray(x, float))."
            )
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    jaxpr, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    inputs = [x for x, keep in zip([*closed.consts, *flat], used, strict=True) if keep]
    if required:
        _refuse_unread(fn, args, kwargs, static, used[len(closed.consts):], required)
    if check:
        # concrete constants closed over are not differentiated (nothing moves them)
        fixed = [i < len(closed.consts) and not isinstance(x, jax.core.Tracer)
                 for i, x in enumerate([*closed.consts, *flat])]
        check_continuity(jaxpr, [f for f, keep in zip(fixed, used, strict=True) if keep])
    return jaxpr, inputs, out_tree


class Expectation:
    """An expectation program `E[P(*args)]` with unbiased value and gradient estimators.

    Created by `px.expectation`. Called as `f(key, *args)` it returns an unbiased estimate
    of `E[P(*args)]` that is differentiable: `jax.grad`, `jax.jvp` and `jax.vmap` of it
    give unbiased gradient estimates, through a custom JVP rule that JAX linearises and
    transposes (reverse mode costs what ordinary reverse mode costs). Inside another
    expectation program, call it without a key: `f(*args)` is then an unbiased sample of
    its value, with its own gradient estimator.

    Estimators are first-order: second derivatives of an estimate are not estimates of
    second derivatives (`jax.hessian` of an estimate raises `px.SecondOrderError`);
    `hvp` estimates Hessian-vector products with a second-order estimator.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        functools.update_wrapper(self, fn)
        self._messages: list[str] = []  # run-time check messages, indexed by `invalid`
        #: positions (after the key, from 0) of parameter arguments every leaf of which the
        #: program must read (set by `px.vi.AbstractObjective`; none for user programs)
        self._required_params: tuple[int, ...] = ()
        self._estimate = jax.jit(self._estimate_impl, static_argnums=0)
        self._grad = jax.jit(self._grad_impl, static_argnums=(0, 1))
        self._value_and_grad = jax.jit(self._value_and_grad_impl, static_argnums=(0, 1))
        # with no static argument (the common case) these plain signatures dispatch as
        # cheaply as a hand-written jitted function (no spec to hash, no tree rebuilt)
        self._estimate_plain = jax.jit(self._estimate_plain_impl)
        self._grad_plain = jax.jit(self._grad_plain_impl, static_argnums=0)
        self._value_and_grad_plain = jax.jit(self._value_and_grad_plain_impl,
                                             static_argnums=0)

    def __call__(self, *args, **kwargs):
        if inside_expectation():
            jaxpr, inputs, out_tree = _trace(self.fn, args, kwargs, check=False)
            label = f"nested expectation {getattr(self.fn, '__name__', '')}".strip()
            outs = bind_nested(jaxpr, inputs, label)
            return jax.tree.unflatten(out_tree, outs)
        if _all_concrete_arrays(args, kwargs):
            return self.estimate(*args, **kwargs)  # eager call: compile once, not per op
        return self._checked(*self._run(args, kwargs))

    def _run(self, args, kwargs):
        """`(estimate, invalid message id)`; the id is None when no site checks anything."""
        if not args:
            raise TypeError("an expectation is called as f(key, *args).")
        key, *rest = args
        key = _as_key(key)
        jaxpr, inputs, out_tree = _trace(self.fn, tuple(rest), kwargs,
                                         required=self._required_params)
        outs, invalid = _estimate(_Program(jaxpr, self._messages), key, inputs)
        out = jax.tree.unflatten(out_tree, outs)
        return out, (invalid if has_validated_sites(jaxpr) else None)

    def _checked(self, result, invalid):
        """Raise `InvalidParameterError` for an invalid id known on the host.

        Under an enclosing `jit`/`vmap` the id is traced: the error is then raised inside
        the compiled program (JAX wraps it in its runtime error, same message).
        """
        if invalid is None:
            return result
        concrete = invalid.to_concrete_value() if isinstance(invalid, jax.core.Tracer) else invalid
        if concrete is None:
            return raise_if_invalid(result, invalid, self._messages)
        text = invalid_message(self._messages, np.max(np.asarray(concrete)))
        if text is not None:
            raise InvalidParameterError(text.removeprefix("px.InvalidParameterError: "))
        return result

    def _estimate_plain_impl(self, key, *args, **kwargs):
        return self._run((key, *args), kwargs)

    def _grad_plain_impl(self, argnums, key, *args, **kwargs):
        return self._grad_impl(argnums, None, key, (args, kwargs))

    def _value_and_grad_plain_impl(self, argnums, key, *args, **kwargs):
        return self._value_and_grad_impl(argnums, None, key, (args, kwargs))

    def _estimate_impl(self, spec, key, arrays):
        args, kwargs = _join_static(spec, arrays)
        return self._run((key, *args), kwargs)

    def estimate(self, key, *args, **kwargs):
        """Unbiased estimate of `E[P(*args, **kwargs)]` (jitted).

        Raises `px.InvalidParameterError` naming the site, the parameter and its constraint
        when a site's traced parameters violate their constraints (numpyro validate_args).
        """
        spec, arrays = _split_static(args, kwargs)
        if spec is None:
            return self._checked(*self._estimate_plain(key, *args, **kwargs))
        return self._checked(*self._estimate(spec, key, arrays))

    def _scalar(self, key, *args, **kwargs):
        out, invalid = self._run((key, *args), kwargs)
        if not isinstance(out, jax.Array) or out.shape != ():
            shape = getattr(out, "shape", jax.tree.structure(out))
            raise ObjectiveShapeError(
                f"gradients need a scalar objective, but {self.__name__} returns {shape}. "
                "Reduce it (e.g. jnp.sum) or differentiate one output with jax.jacrev."
            )
        return out, invalid

    def _grad_impl(self, argnums, spec, key, arrays):
        args, kwargs = _join_static(spec, arrays)
        positions = _positions(argnums, len(args))
        grads, invalid = jax.grad(self._scalar, argnums=positions, has_aux=True)(
            key, *args, **kwargs
        )
        return (grads[0] if isinstance(argnums, int) else grads), invalid

    def _value_and_grad_impl(self, argnums, spec, key, arrays):
        args, kwargs = _join_static(spec, arrays)
        positions = _positions(argnums, len(args))
        (value, grads), invalid = _value_and_grad_aux(self._scalar, positions)(
            key, *args, **kwargs
        )
        return (value, (grads[0] if isinstance(argnums, int) else grads)), invalid

    def grad(self, key, *args, argnums: int | tuple[int, ...] = 1, **kwargs):
        """Unbiased estimate of the gradient with respect to the arguments `argnums`.

        Jitted. `argnums` counts positions as `jax.grad(f, argnums)` does for
        `f(key, *args)`: the key is position 0, so the default `argnums=1` is the argument
        right after the key (the parameters; data passed after them are not
        differentiated). An int gives that argument's gradient, a tuple a tuple of
        gradients: `f.grad(key, params, x, argnums=(1, 2))`. Keyword arguments are never
        differentiated. Invalid parameters raise `px.InvalidParameterError` (see
        `estimate`).
        """
        argnums = _check_argnums(argnums, len(args))
        spec, arrays = _split_static(args, kwargs)
        if spec is None:
            return self._checked(*self._grad_plain(argnums, key, *args, **kwargs))
        return self._checked(*self._grad(argnums, spec, key, arrays))

    def value_and_grad(self, key, *args, argnums: int | tuple[int, ...] = 1, **kwargs):
        """`(estimate, gradient estimate)` from the same draws (jitted); `argnums` as `grad`."""
        argnums = _check_argnums(argnums, len(args))
        spec, arrays = _split_static(args, kwargs)
        if spec is None:
            return self._checked(*self._value_and_grad_plain(argnums, key, *args, **kwargs))
        return self._checked(*self._value_and_grad(argnums, spec, key, arrays))

    def hvp(self, key, *args, v, argnums: int = 1, **kwargs):
        """Unbiased estimate of the Hessian-vector product `∇² E[P(*args)] · v` (jitted).

        The Hessian is taken with respect to the one argument at position `argnums`
        (counted as in `grad`: the key is 0, the default 1 is the argument right after
        it); `v` is a pytree of that argument's structure and shapes, and so is the
        result. The estimate is the forward-over-reverse product of the magic-box (DiCE)
        surrogate `y · exp(L - sg(L))` (`L` the score sites' log densities), unbiased for
        programs with `px.reparam` and `px.reinforce` sites whose pathwise part is twice
        continuously differentiable; anything else (`abs`, `relu`, `max`, `clip`, a
        `where` on a moving value, `px.enum`, `px.mvd`, `px.LeaveOneOut`, nested
        expectations, sites inside `while_loop` or `cond`, ...) raises
        `px.SecondOrderError` naming the primitive or site (see `ppl_ext/adev/_hvp.py`),
        and so does differentiating the result (a third derivative). Run-time parameter
        checks are not made by `.hvp`.

        Example:
            >>> import jax, jax.numpy as jnp, ppl_ext as px, numpyro.distributions as dist
            >>> @px.expectation
            ... def f(theta):  # E = (theta - 1)**4 + 6 (theta - 1)**2 + 3
            ...     return (px.sample(dist.Normal(theta, 1.0)) - 1.0) ** 4
            >>> keys = jax.random.split(jax.random.key(0), 20000)
            >>> hv = jax.vmap(lambda k: f.hvp(k, 0.0, v=1.0))(keys)
            >>> abs(float(hv.mean()) - (12 * 1.0 + 12)) < 1.0
            True
        """
        from ._hvp import hvp

        return hvp(self, key, args, kwargs, v, argnums)


def _check_argnums(argnums, num_args: int) -> int | tuple[int, ...]:
    """Validate `argnums` (jax.grad's positions of `f(key, *args)`; the key is 0)."""
    if num_args == 0:
        raise TypeError("grad needs at least one argument after the key.")
    many = isinstance(argnums, (tuple, list))
    positions = tuple(argnums) if many else (argnums,)
    for position in positions:
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
            raise TypeError(f"argnums must be an int or a tuple of ints, got {argnums!r}.")
        if position == 0:
            raise ValueError(
                "argnums=0 is the PRNG key, which is not differentiable; the first "
                "argument after the key is argnums=1."
            )
        if not 1 <= position <= num_args:
            raise ValueError(
                f"argnums={argnums!r}: the call has {num_args} argument(s) after the key "
                f"(positions 1 to {num_args})."
            )
    if len(set(positions)) != len(positions):
        raise ValueError(f"argnums={argnums!r} repeats a position.")
    return tuple(int(p) for p in positions) if many else int(positions[0])


def _positions(argnums, num_args: int) -> tuple[int, ...]:
    del num_args
    return argnums if isinstance(argnums, tuple) else (argnums,)


def _refuse_unread(fn, args, kwargs, static, used, required) -> None:
    """Refuse parameter leaves (of the arguments at positions `required`) that the
    program never reads: a misspelt or unknown key would silently get a zero gradient."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]]
    traced_paths = [path for path, s in zip(paths, static) if not s]
    unread = [path for path, keep in zip(traced_paths, used, strict=True)
              if not keep and path[0].idx == 0 and path[1].idx in required]
    if unread:
        names = ["/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                          for k in path[2:]) or f"argument {path[1].idx + 1}"
                 for path in unread]
        name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
        raise ValueError(
            f"params entries {names} are not read by {name} (no computation of the "
            "program uses their values), so their gradient would silently be 0: a "
            "misspelt or unknown name? Remove them or fix the name."
        )


def _traced_leaf(x) -> bool:
    """Whether an argument leaf is traced (array-like) rather than kept as a Python value."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, float, complex)) and not (
        isinstance(x, bool))


def _merge(static: list[bool], traced, constants) -> list:
    """Interleave traced leaves and static constants back into the flat argument order."""
    traced, constants = iter(traced), iter(constants)
    return [next(constants) if s else next(traced) for s in static]


def _split_static(args: tuple, kwargs: dict):
    """`(spec, arrays)`: a hashable spec of the non-array leaves and the array leaves.

    Lets the jitted methods keep Python ints, bools and strings static (compiled in), as
    `_trace` does; an unhashable non-array leaf is passed on (and fails there by name).
    With nothing static the spec is None and `arrays` is `(args, kwargs)` itself, which
    keeps the per-call dispatch cost of a plain jitted function.
    """
    if not kwargs and all(isinstance(x, jax.Array) for x in args):
        return None, (args, kwargs)  # the common case, cheap to dispatch: nothing static
    leaves, treedef = jax.tree.flatten((args, kwargs))
    static = tuple(not _traced_leaf(x) for x in leaves)
    if not any(static):
        return None, (args, kwargs)
    constants = tuple(x for x, s in zip(leaves, static) if s)
    try:
        hash(constants)
    except TypeError:
        return None, (args, kwargs)
    return (treedef, static, constants), [x for x, s in zip(leaves, static) if not s]


def _join_static(spec, arrays) -> tuple[tuple, dict]:
    if spec is None:
        return arrays
    treedef, static, constants = spec
    return jax.tree.unflatten(treedef, _merge(list(static), arrays, constants))


def _all_concrete_arrays(args, kwargs) -> bool:
    """Whether every leaf is a concrete array or number (no tracer: not under a transform)."""
    leaves = jax.tree.leaves((args, kwargs))
    return bool(leaves) and all(
        isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex))
        and not isinstance(x, jax.core.Tracer)
        for x in leaves
    )


def _value_and_grad_aux(fn, argnums):
    def wrapped(*args, **kwargs):
        (value, invalid), grads = jax.value_and_grad(fn, argnums=argnums, has_aux=True)(
            *args, **kwargs
        )
        return (value, grads), invalid

    return wrapped


def expectation(fn: Callable) -> Expectation:
    """Transform an expectation program into unbiased value and gradient estimators.

    `fn(*args)` is an ordinary JAX function that draws random choices with `px.sample` and
    returns floating-point values; it denotes `E[fn(*args)]`. The result `f` gives
    `f.estimate(key, *args)`, `f.grad(key, *args)`, `f.value_and_grad(key, *args)`, and is
    itself differentiable: `jax.grad(f, argnums=1)(key, theta) == f.grad(key, theta)`.

    Example:
        >>> import jax, ppl_ext as px, numpyro.distributions as dist
        >>> @px.expectation
        ... def f(theta):
        ...     x = px.sample(dist.Normal(theta, 1.0))
        ...     return (x - 3.0) ** 2
        >>> keys = jax.random.split(jax.random.key(0), 20000)
        >>> g = jax.vmap(f.grad, in_axes=(0, None))(keys, 1.0)
        >>> abs(float(g.mean()) - 2 * (1.0 - 3.0)) < 0.1
        True

    Reference: Lew, Huot, Staton & Mansinghka 2023, "ADEV: sound automatic
    differentiation of expected values of probabilistic programs" (POPL).
    """
    if isinstance(fn, Expectation):
        return fn
    if not callable(fn):
        raise TypeError(f"px.expectation expects a function, got {type(fn).__name__}.")
    return Expectation(fn)
