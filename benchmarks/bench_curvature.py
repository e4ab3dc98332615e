"""Curvature back-ends: M-FAC vs Adam vs SGD (an MLP), GRN vs GD vs L-BFGS (logistic regression).

Usage:
    .venv/bin/python benchmarks/bench_curvature.py [--quick] [--threads 1|default] [--no-results]
        [--part classic|overhead|race|fit|rates|rankone|all] [--repeats N]

Part 1, MLP classification on scikit-learn's digits (1,797 images of 8x8, 10 classes;
features scaled to [0, 1]): a 64-32-10 tanh MLP (2,410 parameters), minibatches of 64
drawn inside the objective (`px.sample` of indices), softmax cross-entropy, trained with
`px.fit` for 600 steps (150 with `--quick`) by `optax.sgd`, `optax.adam` and
`px.optim.mfac` (window 32, damping 1e-3, chained with `optax.scale_by_learning_rate`).
Each optimiser's learning rate is the best of a small grid (the final full-data training
loss decides; the grid is in the table). Reported: the full-data training loss at the
end and at 25%/50% of the run, the accuracy, and µs per step (`px.fit`'s run time over
its steps, compilation excluded).

Part 2, L2-regularised logistic regression on scikit-learn's breast cancer data (569 x 30,
standardised, plus an intercept; loss mean log-loss + 0.005 ‖w‖²), from w = 0: steps and
seconds until `f(w) - f* < 1e-8`, with `f*` from scipy's L-BFGS-B at gtol 1e-12, for
`px.optim.GradientRegularisedNewton` (exact Hessian), gradient descent with the 1/L step
(`L` bounds the Hessian) and `optax.lbfgs` (its zoom line search). Time to tolerance is
the steps times the measured time per step of the same run.

`--part` picks what runs (default all; each run appends one section):

- `classic`: parts 1 and 2 above.
- `overhead` (part 3): M-FAC's per-step cost over plain SGD at d ≈ 1e5 (a 64-280-280-10
  MLP, 99,690 parameters, minibatch 128) with a window of m = 128, in hand-written
  jitted `lax.scan` loops compiled once and run `--repeats` times interleaved; also the
  optimiser updates alone and, for reference, M-FAC with the paper's `O(m³)` refactor per
  gradient. Medians and the median of per-repeat ratios.
- `race` (part 4): on logistic regression and the 64-32-10 MLP on digits (minibatch 32,
  5 seeds vmapped), the first step at which M-FAC's full-data loss is at most what SGD
  reaches in 1,000 steps (each with the best of a small learning-rate grid).
- `fit` (part 5): px.fit against a hand-written jitted loop of the same steps for SGD,
  M-FAC, GradientRegularisedNewton (exact Hessian, empirical Fisher), N-PG-IGT and
  N-HARPG (on the LQR's policy-gradient objective), paired chunks as
  in bench_fit.py; each pair records the same per-step values (px.fit's default, the
  estimate and the gradient norm; and `record_grad_norm=False`, the estimate only).
- `rates` (part 6): GradientRegularisedNewton's log-residual slope on part 2's logistic
  regression with the exact Hessian, Gauss-Newton and the empirical Fisher.
- `rankone` (part 7): GradientRegularisedNewton with the exact Hessian against the
  rank-one Fisher term (Sherman-Morrison, `O(d)` a step) on `‖A x - b‖⁴ / 4`, side by
  side: steps and milliseconds to `f ≤ 1e-10 · f(x₀)`.

XLA and NumPy are pinned to one thread by default (`--threads 1`, set before jax and
numpy are imported); the machine is shared, so the load average is recorded.
"""

from __future__ import annotations

import argparse
import sys

from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

pin_threads_unless_default(sys.argv)  # before jax and numpy are imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from _common import (  # noqa: E402
    command_line, fmt, load_average, log, machine, markdown_table, report, results_heading,
    versions,
)

BATCH, HIDDEN, ALPHA, TOLERANCE = 64, 32, 1e-2, 1e-8
GRIDS = {"sgd": (0.3, 1.0, 3.0), "adam": (1e-2, 3e-2, 1e-1), "mfac": (3e-3, 1e-2, 3e-2)}


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return jnp.asarray(data.data / 16.0, jnp.float32), jnp.asarray(data.target)


def init_mlp(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (64, HIDDEN)) / 8.0, "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, 10)) / np.sqrt(HIDDEN), "b2": jnp.zeros(10)}


def cross_entropy(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)), logits


def mlp_objective():
    import numpyro.distributions as dist

    import ppl_ext as px

    @px.expectation
    def loss(params, x, y):
        i = px.sample(dist.DiscreteUniform(0, x.shape[0] - 1).expand((BATCH,)))
        return cross_entropy(params, x[i], y[i])[0]

    return loss


def optimiser(name, rate):
    from ppl_ext.optim import mfac

    if name == "sgd":
        return optax.sgd(rate)
    if name == "adam":
        return optax.adam(rate)
    return optax.chain(mfac(num_gradients=32, damping=1e-3), optax.scale_by_learning_rate(rate))


def run_mlp(name, rate, num_steps, x, y):
    import ppl_ext as px

    checkpoints = {}

    def record(step, state, history):
        checkpoints[step] = float(cross_entropy(state.params, x, y)[0])

    params = init_mlp(jax.random.key(0))
    result = px.fit(mlp_objective(), params, optimiser(name, rate), num_steps, jax.random.key(1),
                    x, y, maximize=False, progress=False, chunk_size=num_steps // 4,
                    callbacks=record)
    final, logits = cross_entropy(result.params, x, y)
    accuracy = float(jnp.mean(jnp.argmax(logits, 1) == y))
    per_step = result.history.wall_time[-1] / num_steps * 1e6
    return dict(final=float(final), checkpoints=checkpoints, accuracy=accuracy,
                per_step=per_step, compile=result.history.compile_time)


def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    return np.hstack([x, np.ones((len(x), 1))]), data.target.astype(np.float64)


def logistic_optimum(x, y):
    import scipy.optimize

    def loss(w):
        z = x @ w
        value = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * ALPHA * w @ w
        grad = x.T @ (1.0 / (1.0 + np.exp(-z)) - y) / len(y) + ALPHA * w
        return value, grad

    out = scipy.optimize.minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B",
                                  options=dict(gtol=1e-12, ftol=1e-16, maxiter=100_000))
    return float(out.fun)


def run_logistic(name, num_steps, x, y, optimum):
    import ppl_ext as px

    @px.expectation
    def loss(w, x, y):
        z = x @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * ALPHA * w @ w

    if name == "GradientRegularisedNewton":
        backend = px.optim.GradientRegularisedNewton()
    elif name == "gradient descent (1/L)":
        lipschitz = np.linalg.eigvalsh(x.T @ x / len(y)).max() / 4 + ALPHA
        backend = optax.sgd(1.0 / lipschitz)
    else:
        backend = optax.lbfgs()
    result = px.fit(loss, jnp.zeros(x.shape[1]), backend, num_steps, jax.random.key(0),
                    jnp.asarray(x), jnp.asarray(y), maximize=False, progress=False)
    gaps = result.history.value - optimum
    below = np.nonzero(gaps < TOLERANCE)[0]
    steps = int(below[0]) if below.size else None  # value is at the step's starting point
    per_step = result.history.wall_time[-1] / num_steps
    return dict(steps=steps, per_step=per_step,
                seconds=None if steps is None else steps * per_step,
                final_gap=float(gaps[-1]), compile=result.history.compile_time)


# ----------------------------------------------------------- part 3: M-FAC per-step overhead

WIDE = 280  # 64-280-280-10 tanh MLP: 99,690 parameters (d ≈ 1e5)


def init_wide(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (64, WIDE)) / 8.0, "b1": jnp.zeros(WIDE),
            "w2": jax.random.normal(k2, (WIDE, WIDE)) / np.sqrt(WIDE), "b2": jnp.zeros(WIDE),
            "w3": jax.random.normal(k3, (WIDE, 10)) / np.sqrt(WIDE), "b3": jnp.zeros(10)}


def wide_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    hidden = jnp.tanh(hidden @ params["w2"] + params["b2"])
    logits = hidden @ params["w3"] + params["b3"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def refactor_each_step(num_gradients, damping):
    """The paper's bookkeeping, for reference: Gram row update and a fresh `O(m³)` Cholesky
    of `m λ I + G Gᵀ` per gradient (what `px.optim.mfac` did before its `O(m²)` slide)."""
    import jax.scipy.linalg as jsl
    from jax.flatten_util import ravel_pytree

    def init(params):
        flat, _ = ravel_pytree(params)
        return (jnp.zeros((num_gradients, flat.size)), jnp.zeros((num_gradients,) * 2),
                jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        flat, unravel = ravel_pytree(updates)
        gradients, gram, count = state
        slot = count % num_gradients
        gradients = gradients.at[slot].set(flat)
        dots = gradients @ flat
        gram = gram.at[slot, :].set(dots).at[:, slot].set(dots)
        system = gram + num_gradients * damping * jnp.eye(num_gradients)
        coefficients = jsl.cho_solve(jsl.cho_factor(system, lower=True), dots)
        return (unravel((flat - coefficients @ gradients) / damping),
                (gradients, gram, count + 1))

    return optax.GradientTransformation(init, update)


def overhead_contenders(num_gradients, rate):
    from ppl_ext.optim import mfac

    return {
        "sgd": optax.sgd(rate),
        "mfac": optax.chain(mfac(num_gradients=num_gradients, damping=1e-3),
                            optax.scale_by_learning_rate(rate)),
        "mfac, O(m³) refactor per step": optax.chain(
            refactor_each_step(num_gradients, 1e-3), optax.scale_by_learning_rate(rate)),
    }


def time_loops(contenders, make_loop, init, num_repeats):
    """Compile each contender's loop, then time `num_repeats` interleaved runs (order
    rotated per repeat); returns {name: (compile s, [seconds per run])}."""
    import time

    compiled, times = {}, {}
    for name, optimiser in contenders.items():
        loop = jax.jit(make_loop(optimiser))
        args = init(optimiser)
        start = time.perf_counter()
        compiled[name] = (loop.lower(*args).compile(), args)
        times[name] = [time.perf_counter() - start, []]
        jax.block_until_ready(compiled[name][0](*args))  # first run of a fresh program
    names = list(contenders)
    for r in range(num_repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            program, args = compiled[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(program(*args))
            times[name][1].append(time.perf_counter() - start)
            # CPU seconds of this (single-threaded) process: unlike wall-clock, not
            # stretched by the other processes of a loaded machine
            times[name].append(time.process_time() - start_cpu)
    return times


def run_overhead(num_steps, num_repeats, num_gradients):
    x, y = digits()
    batch = 128

    def training_loop(optimiser):
        def loop(params, opt_state, key):
            def step(carry, key):
                params, opt_state = carry
                i = jax.random.randint(key, (batch,), 0, x.shape[0])
                loss, grads = jax.value_and_grad(wide_loss)(params, x[i], y[i])
                updates, opt_state = optimiser.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            carry, losses = jax.lax.scan(step, (params, opt_state),
                                         jax.random.split(key, num_steps))
            return carry, losses
        return loop

    def transformation_loop(optimiser):  # the optimiser alone, on stored gradients
        def loop(params, opt_state, grads):
            def step(carry, g):
                params, opt_state = carry
                updates, opt_state = optimiser.update(g, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            return jax.lax.scan(step, (params, opt_state), grads)[0]
        return loop

    params = init_wide(jax.random.key(0))
    dim = sum(v.size for v in jax.tree.leaves(params))
    contenders = overhead_contenders(num_gradients, 1e-2)
    full = time_loops(contenders, training_loop,
                      lambda o: (params, o.init(params), jax.random.key(1)), num_repeats)
    grads = jax.tree.map(lambda v: jax.random.normal(jax.random.key(2), (num_steps,) + v.shape)
                         * 1e-2, params)
    alone = time_loops(contenders, transformation_loop,
                       lambda o: (params, o.init(params), grads), num_repeats)
    rows = []
    for name in contenders:
        per_step = np.median(full[name][1]) / num_steps * 1e3
        ratios = np.array(full[name][1]) / np.array(full["sgd"][1])
        per_alone = np.median(alone[name][1]) / num_steps * 1e3
        cpu = np.array(full[name][2:])
        cpu_ratios = cpu / np.array(full["sgd"][2:])
        rows.append((name, f"{per_step:.2f}", f"{np.median(ratios):.2f}",
                     f"{np.percentile(ratios, 25):.2f}–{np.percentile(ratios, 75):.2f}",
                     f"{np.median(cpu) / num_steps * 1e3:.2f}", f"{np.median(cpu_ratios):.2f}",
                     f"{per_alone:.3f}", f"{full[name][0]:.1f}"))
        log(f"{name}: {per_step:.2f} ms/step (x{np.median(ratios):.2f} sgd), CPU "
            f"{np.median(cpu) / num_steps * 1e3:.2f} ms/step (x{np.median(cpu_ratios):.2f}), "
            f"optimiser alone {per_alone:.3f} ms/step")
    table = markdown_table(
        ["optimiser", "ms / training step (median)", "ratio to sgd (median)", "ratio IQR",
         "CPU ms / training step (median)", "CPU-time ratio to sgd (median)",
         "ms / step, optimiser update alone", "compile s"], "lrrrrrrr", rows)
    return dim, table


# ------------------------------------------- part 4: steps to SGD's 1,000-step loss, 5 seeds

RACE_BATCH, RACE_SEEDS = 32, 5
RACE_SGD = (0.1, 0.3, 1.0, 3.0)
RACE_MFAC = ((1e-2, 1e-3), (3e-2, 1e-3), (3e-2, 1e-2), (1e-1, 1e-2), (3e-1, 1e-2), (1e-1, 1e-1),
             (3e-1, 1e-1))


def race_problems():
    def logistic_init(key):
        return {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

    def logistic_loss(params, x, y):
        logits = x @ params["w"] + params["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return {"logistic regression (digits, 650 parameters)": (logistic_init, logistic_loss),
            f"64-{HIDDEN}-10 tanh MLP (digits, 2,410 parameters)":
            (init_mlp, lambda p, x, y: cross_entropy(p, x, y)[0])}


def race_curves(init, loss, optimiser, num_steps, x, y):
    """Full-data training loss after each of `num_steps` minibatch steps, one row per seed
    (seeds vmapped: seed s initialises with key s and draws batches from key 100 + s)."""
    def one(seed):
        params = init(jax.random.key(seed))
        opt_state = optimiser.init(params)

        def step(carry, key):
            params, opt_state = carry
            i = jax.random.randint(key, (RACE_BATCH,), 0, x.shape[0])
            grads = jax.grad(loss)(params, x[i], y[i])
            updates, opt_state = optimiser.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), loss(params, x, y)

        keys = jax.random.split(jax.random.key(100 + seed), num_steps)
        return jax.lax.scan(step, (params, opt_state), keys)[1]

    return np.asarray(jax.jit(jax.vmap(one))(jnp.arange(RACE_SEEDS)))


def run_race(num_sgd, num_mfac, num_gradients):
    from ppl_ext.optim import mfac

    x, y = digits()
    rows = []
    for problem, (init, loss) in race_problems().items():
        sgd = {rate: race_curves(init, loss, optax.sgd(rate), num_sgd, x, y) for rate in RACE_SGD}
        best_sgd = min(sgd, key=lambda r: np.median(sgd[r][:, -1]))
        targets = sgd[best_sgd][:, -1]  # per seed: SGD's loss after num_sgd steps
        curves = {c: race_curves(init, loss, optax.chain(
            mfac(num_gradients=num_gradients, damping=c[1]), optax.scale_by_learning_rate(c[0])),
            num_mfac, x, y) for c in RACE_MFAC}
        best = min(curves, key=lambda c: np.median(curves[c][:, -1]))
        hits = []
        for s in range(RACE_SEEDS):
            below = np.nonzero(curves[best][s] <= targets[s])[0]
            hits.append(int(below[0]) + 1 if below.size else None)
        log(f"{problem}: sgd lr {best_sgd} -> {np.round(targets, 4)}; mfac {best}: steps {hits}")
        rows.append((problem, best_sgd, f"{np.median(targets):.4f}", f"{best[0]:g}, {best[1]:g}",
                     f"{np.median(curves[best][:, -1]):.4f}",
                     ", ".join("—" if h is None else str(h) for h in hits),
                     sum(h is not None and h <= num_mfac for h in hits)))
    return markdown_table(
        ["problem", "sgd lr (best)", f"sgd loss @ {num_sgd} (median)", "mfac lr, damping (best)",
         f"mfac loss @ {num_mfac} (median)",
         f"mfac steps to each seed's sgd loss @ {num_sgd}",
         f"seeds within {num_mfac} steps"], "lrrrrlr", rows)


# ------------------------------------- part 5: px.fit against hand-written loops, per step

def paired_fit_overhead(objective, params, backend, args, chunk, num_chunks,
                        record_grad_norm=True):
    """px.fit's chunks paired with warm runs of a hand-written jitted `lax.scan` of the same
    steps (as bench_fit.py does): the callback runs the hand-written loop of `chunk` steps
    between px.fit's chunks, and each chunk is compared with the mean of the hand-written
    runs just before and after it; the first two chunks are left out. `backend` is an optax
    optimiser (the loop: value_and_grad of the objective, update, apply) or a px back-end
    (the loop: its `step`), minimising; step `i` uses `fold_in(key, i)` in both. Both
    sides record the same per-step values: the estimate, and the gradient norm too when
    `record_grad_norm` (px.fit's default; `record_grad_norm=False` skips it in both)."""
    import time

    import ppl_ext as px

    key = jax.random.key(1)
    is_optax = isinstance(backend, optax.GradientTransformation)
    if is_optax:
        def run(params, key):
            opt_state = backend.init(params)

            def step(carry, i):
                params, opt_state = carry
                value, grads = jax.value_and_grad(
                    lambda p: objective(jax.random.fold_in(key, i), p, *args))(params)
                updates, opt_state = backend.update(grads, opt_state, params)
                out = (value, optax.global_norm(grads)) if record_grad_norm else value
                return (optax.apply_updates(params, updates), opt_state), out

            return jax.lax.scan(step, (params, opt_state), jnp.arange(chunk))
    else:
        def run(params, key):
            state = backend.init(jax.random.fold_in(key, np.uint32(2**32 - 1)), params,
                                 objective, *args)

            def step(state, i):
                state, info = backend.step(jax.random.fold_in(key, i), state, objective, *args)
                return state, (info.value, info.grad_norm) if record_grad_norm else info.value

            return jax.lax.scan(step, state, jnp.arange(chunk))
    compiled = jax.jit(run).lower(params, key).compile()

    def hand_run():
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, key))
        return time.perf_counter() - start

    hand_run()
    hand_times = []
    result = px.fit(objective, params, backend, chunk * num_chunks, key, *args, maximize=False,
                    chunk_size=chunk, progress=False, record_grad_norm=record_grad_norm,
                    callbacks=[lambda step, state, history: hand_times.append(hand_run())])
    fit_times = np.diff(np.concatenate([[0.0], result.history.wall_time]))
    hand = np.array(hand_times)
    before = np.concatenate([hand[:1], hand[:-1]])
    ratios = (fit_times / ((before + hand) / 2))[2:]
    return (float(np.median(fit_times[2:]) / chunk * 1e6), float(np.median(hand[2:]) / chunk
                                                                  * 1e6), ratios)


def run_fit_overhead(chunk, num_chunks):
    import ppl_ext as px
    from ppl_ext.optim import EmpiricalFisher, GradientRegularisedNewton, mfac

    x, y = digits()
    xb, yb = breast_cancer()
    xb, yb = jnp.asarray(xb, jnp.float32), jnp.asarray(yb, jnp.float32)

    @px.expectation
    def logistic(w, x, y):
        z = x @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * ALPHA * w @ w

    def per_sample(w, x, y):
        z = x @ w
        return jnp.logaddexp(0.0, z) - y * z + 0.5 * ALPHA * w @ w

    mlp = (mlp_objective(), init_mlp(jax.random.key(0)), (x, y))
    logreg = (logistic, jnp.zeros(xb.shape[1]), (xb, yb))
    lqr = px.optim.LinearQuadraticRegulator.small()
    reward = lqr.objective()

    @px.expectation
    def lqr_cost(gain):  # minimised: the negated reward (actions drawn by px.reinforce)
        return -reward.fn(gain)

    policy = (lqr_cost, lqr.initial_gain(), ())
    contenders = [
        ("optax.sgd(0.3)", mlp, optax.sgd(0.3)),
        ("mfac(32, 1e-3) + lr 1e-2", mlp,
         optax.chain(mfac(num_gradients=32, damping=1e-3), optax.scale_by_learning_rate(1e-2))),
        ("GradientRegularisedNewton(ExactHessian)", logreg, GradientRegularisedNewton()),
        ("GradientRegularisedNewton(EmpiricalFisher)", logreg,
         GradientRegularisedNewton(EmpiricalFisher(per_sample))),
        ("NormalisedPGIGT(1e-3)", policy, px.optim.NormalisedPGIGT(step_size=1e-3)),
        ("NormalisedHARPG(1e-3)", policy, px.optim.NormalisedHARPG(step_size=1e-3)),
    ]
    names = {id(mlp[0]): "MLP (digits)", id(logreg[0]): "logistic (breast cancer)",
             id(policy[0]): "LQR policy gradient"}
    rows = []
    for name, (objective, params, args), backend in contenders:
        for record in (True, False):
            fit_us, hand_us, ratios = paired_fit_overhead(objective, params, backend, args,
                                                          chunk, num_chunks, record)
            q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
            recorded = "value, grad norm" if record else "value"
            log(f"{name} ({recorded}): px.fit {fit_us:.1f} µs/step, hand-written "
                f"{hand_us:.1f} µs/step, ratio {q2:.3f} (IQR {q1:.3f}-{q3:.3f})")
            rows.append((name, names[id(objective)], recorded, f"{fit_us:.1f}",
                         f"{hand_us:.1f}", f"{q2:.3f}", f"{q1:.3f}–{q3:.3f}", len(ratios),
                         "yes" if q2 <= 1.05 else "no"))
    return markdown_table(
        ["back-end", "objective", "recorded per step (both sides)", "px.fit µs / step",
         "hand-written µs / step", "ratio (median of pairs)", "ratio IQR", "pairs", "≤ 1.05"],
        "lllrrrrrl", rows)


# ------------------------------- part 6: GRN's linear rate with approximate Hessians (float64)

def run_grn_rates(num_steps):
    """Per-step gaps `f(x_k) - f*` of GradientRegularisedNewton on part 2's logistic
    regression with the exact Hessian, Gauss-Newton (outputs `[Xw, w]`: for this linear
    model it equals the Hessian) and the empirical Fisher; the log-residual slope is a
    least-squares line through `log10(f - f*)` over the steps with `1e-12 < f - f* < 1e-2`
    (a linear rate is a straight line), with the median one-step contraction
    `(f_{k+1} - f*) / (f_k - f*)` over the same steps."""
    import ppl_ext as px
    from ppl_ext.optim import EmpiricalFisher, GaussNewton, GradientRegularisedNewton

    xb, yb = breast_cancer()
    optimum = logistic_optimum(xb, yb)
    num_data = len(yb)
    rows = []
    with jax.enable_x64(True):
        x, y = jnp.asarray(xb), jnp.asarray(yb)

        @px.expectation
        def loss(w, x, y):
            z = x @ w
            return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * ALPHA * w @ w

        def per_sample(w, x, y):
            z = x @ w
            return jnp.logaddexp(0.0, z) - y * z + 0.5 * ALPHA * w @ w

        def model(w, x, y):
            return jnp.concatenate([x @ w, w])

        def output_loss(z, x, y):
            logits, w = z[:num_data], z[num_data:]
            return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits) + 0.5 * ALPHA * w @ w

        for name, curvature in (("exact Hessian", px.optim.ExactHessian()),
                                ("Gauss-Newton", GaussNewton(model, output_loss)),
                                ("empirical Fisher", EmpiricalFisher(per_sample))):
            result = px.fit(loss, jnp.zeros(xb.shape[1]), GradientRegularisedNewton(curvature),
                            num_steps, jax.random.key(0), x, y, maximize=False, progress=False)
            gaps = np.asarray(result.history.value) - optimum
            window = np.nonzero((gaps > 1e-12) & (gaps < 1e-2))[0]
            if window.size >= 3:
                slope = np.polyfit(window, np.log10(gaps[window]), 1)[0]
                contraction = np.median(gaps[window[1:]] / gaps[window[:-1]])
            else:
                slope = contraction = None
            below = np.nonzero(gaps < 1e-8)[0]
            log(f"{name}: slope {slope}, contraction {contraction}, steps to 1e-8 "
                f"{below[0] if below.size else None}")
            rows.append((name, num_steps, fmt(int(below[0]) if below.size else None, "d"),
                         int(window.size), fmt(slope, ".3f"), fmt(contraction, ".3f"),
                         f"{max(gaps[-1], 0.0):.1e}"))
    return markdown_table(
        ["curvature", "steps run", "steps to f - f* < 1e-8", "steps in the fit window",
         "slope of log10(f - f*) per step", "median contraction", "final f - f*"],
        "lrrrrrr", rows)


# ------------------------------- part 7: rank-one Fisher vs exact Hessian (GRN), equations

RANK_ONE_POWER = 4  # f = ‖A x - b‖^p / p


def run_grn_rank_one(sizes, tolerance, max_steps, num_repeats):
    """GradientRegularisedNewton on `f(x) = ‖A x - b‖⁴ / 4` (equations with a linear
    operator, Semenov, Jaggi and Doikov 2025: `A` `(2d, d)` Gaussian / sqrt(2d), `b = A x*`,
    so `f* = 0`; float64, from `x = 0`) with the exact Hessian (dense `jax.hessian`, an
    `O(d³)` eigendecomposition a step) against the rank-one Fisher term
    `(p - 2) ∇f ∇fᵀ / ‖u‖^p` (`EmpiricalFisher` of the one loss `2 sqrt((p - 2) f / p)`:
    Sherman-Morrison, `O(d)` a trial). Each is a jitted `lax.while_loop` of the back-end's
    own `step` until `f ≤ tolerance · f(x₀)` (at most `max_steps`), compiled once, then run
    `num_repeats` times interleaved; returns the table rows."""
    import time

    from ppl_ext.optim import EmpiricalFisher, ExactHessian, GradientRegularisedNewton

    p = RANK_ONE_POWER
    rows = []
    with jax.enable_x64(True):
        for dim in sizes:
            rng = np.random.default_rng(dim)
            a = jnp.asarray(rng.normal(size=(2 * dim, dim)) / np.sqrt(2 * dim))
            b = a @ jnp.asarray(rng.normal(size=dim))

            def f(x, a=a, b=b):
                return jnp.sum((a @ x - b) ** 2) ** (p / 2) / p

            def one_loss(x, f=f):
                return (2 * jnp.sqrt((p - 2) * f(x) / p))[None]

            x0 = jnp.zeros(dim)
            target = tolerance * float(f(x0))
            contenders = {"exact Hessian": ExactHessian(),
                          "rank-one Fisher": EmpiricalFisher(one_loss)}
            programs, times = {}, {}
            for name, curvature in contenders.items():
                backend = GradientRegularisedNewton(curvature)

                def run(x0, backend=backend, f=f):
                    key = jax.random.key(0)
                    state = backend.init(key, x0, f)

                    def cond(carry):
                        i, state, _ = carry
                        return (i < max_steps) & (f(state.params) > target)

                    def body(carry):
                        i, state, trials = carry
                        state, info = backend.step(key, state, lambda k, x: f(x))
                        return i + 1, state, trials + info.num_trials

                    return jax.lax.while_loop(cond, body, (0, state, 0))

                start = time.perf_counter()
                programs[name] = jax.jit(run).lower(x0).compile()
                times[name] = [time.perf_counter() - start, []]
                jax.block_until_ready(programs[name](x0))
            names = list(contenders)
            for r in range(num_repeats):
                for name in names[r % 2:] + names[:r % 2]:
                    start = time.perf_counter()
                    out = jax.block_until_ready(programs[name](x0))
                    times[name][1].append(time.perf_counter() - start)
                    times[name].append(out)
            exact_s = np.median(times["exact Hessian"][1])
            for name in names:
                steps, state, trials = times[name][-1]
                seconds = np.median(times[name][1])
                reached = float(f(state.params)) <= target
                rows.append((f"{dim:,}", name, fmt(int(steps), "d") if reached else
                             f"not within {max_steps}", int(trials),
                             f"{seconds * 1e3:.1f}", f"{seconds / int(steps) * 1e3:.3f}",
                             f"{exact_s / seconds:.1f}", f"{times[name][0]:.1f}"))
                log(f"d={dim} {name}: steps {int(steps)} (reached {reached}), trials "
                    f"{int(trials)}, {seconds * 1e3:.1f} ms, speed-up {exact_s / seconds:.1f}")
    return markdown_table(
        ["d", "curvature", "steps to f ≤ tol · f(x₀)", "trials (search)",
         "ms to tolerance (median)", "ms / step", "speed-up over exact", "compile s"],
        "llrrrrrr", rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="150 MLP steps, one rate each")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--part", choices=("classic", "overhead", "race", "fit", "rates",
                                      "rankone", "all"),
                   default="all", help="classic: parts 1-2; overhead: part 3; race: part 4; "
                   "fit: part 5; rates: part 6; rankone: part 7")
    p.add_argument("--repeats", type=int, default=5, help="part 3's interleaved repeats")
    args = p.parse_args(argv)
    command = command_line(argv, "benchmarks/bench_curvature.py")
    load = load_average()
    log(f"# {command}; load {load}")
    sections = []
    if args.part in ("overhead", "all"):
        num_steps = 20 if args.quick else 100
        dim, table = run_overhead(num_steps, args.repeats, 128)
        sections.append(
            f"- part 3, M-FAC per-step overhead: {dim:,}-parameter 64-{WIDE}-{WIDE}-10 tanh "
            f"MLP on digits, minibatch 128, hand-written jitted `lax.scan` loops of {num_steps} "
            "steps (value_and_grad, optimiser update, apply), each contender compiled once "
            f"then run {args.repeats} times interleaved (order rotated); `mfac`: window 128, "
            "damping 1e-3; the reference row refactors the m x m system by Cholesky every "
            "step; CPU columns: this single-threaded process's CPU time (time.process_time) "
            "per step, which the other processes of a loaded machine do not stretch; the "
            "last column times the optimiser update alone on stored gradients; "
            f"load before the run {load}, after {load_average()}\n\n" + table)
    if args.part in ("race", "all"):
        num_sgd, num_mfac = (200, 100) if args.quick else (1000, 500)
        table = run_race(num_sgd, num_mfac, 32)
        sections.append(
            f"- part 4, steps to SGD's {num_sgd}-step loss: minibatch {RACE_BATCH} (uniform "
            f"with replacement), full-data training cross-entropy after every step, "
            f"{RACE_SEEDS} seeds (vmapped hand-written loops); SGD: best constant lr of "
            f"{RACE_SGD} by median final loss; M-FAC (window 32): best (lr, damping) of "
            f"{RACE_MFAC} by median loss after {num_mfac} steps; then per seed the first step "
            f"where M-FAC's loss is at most that seed's SGD loss after {num_sgd} steps "
            f"(— if not within {num_mfac}); load after {load_average()}\n\n" + table)
    if args.part in ("fit", "all"):
        chunk, num_chunks = (20, 6) if args.quick else (500, 16)
        table = run_fit_overhead(chunk, num_chunks)
        sections.append(
            f"- part 5, px.fit against a hand-written jitted loop of the same steps: paired "
            f"chunks of {chunk} steps ({num_chunks} chunks, the first two left out; the "
            "hand-written loop runs in px.fit's callback between chunks, each chunk compared "
            "with the mean of the runs before and after it; both sides record the same "
            "per-step values, px.fit's default (estimate and gradient norm) and "
            "`record_grad_norm=False` (estimate only)); MLP: 64-32-10 tanh, minibatch "
            "64 drawn in the objective; logistic: breast cancer, float32; LQR: "
            "`LinearQuadraticRegulator.small()`'s negated reward (one trajectory a step, two "
            "for N-HARPG); target ratio at "
            f"most 1.05; load after {load_average()}\n\n" + table)
    if args.part in ("rates", "all"):
        table = run_grn_rates(60 if args.quick else 300)
        sections.append(
            "- part 6, GradientRegularisedNewton's rate on part 2's logistic regression "
            "(breast cancer, float64, from w = 0, adaptive γ search): least-squares slope of "
            "log10(f - f*) over the steps with 1e-12 < f - f* < 1e-2 and the median one-step "
            "contraction over them (a linear rate: a constant contraction below 1); "
            f"load after {load_average()}\n\n" + table)
    if args.part in ("rankone", "all"):
        sizes = (50, 200) if args.quick else (100, 400, 1000)
        tolerance = 1e-10
        table = run_grn_rank_one(sizes, tolerance, 5000, 3)
        sections.append(
            "- part 7, GradientRegularisedNewton on equations with a linear operator, "
            f"f(x) = ‖A x - b‖^{RANK_ONE_POWER} / {RANK_ONE_POWER} (A (2d, d) Gaussian / "
            "sqrt(2d), b = A x*, f* = 0, float64, x₀ = 0, adaptive γ search from γ₀ = 1): the "
            "exact Hessian (dense, eigendecomposition a step) against the rank-one Fisher "
            "term (p - 2) ∇f ∇fᵀ / ‖u‖^p (EmpiricalFisher of one loss: Sherman-Morrison, "
            f"O(d)), each a jitted while_loop of its `step` until f ≤ {tolerance:g} · f(x₀), "
            "compiled once, 3 runs interleaved (median); "
            f"load after {load_average()}\n\n" + table)
    if args.part in ("overhead", "race", "fit", "rates", "rankone"):
        body = (results_heading("bench_curvature.py", command,
                                versions(("jax", "numpy", "optax", "scikit-learn")))
                + f"- machine: {machine()}; load before the run {load}; threads: "
                f"{args.threads}\n" + "\n".join(sections))
        return report(body, args.no_results)

    x, y = digits()
    num_steps = 150 if args.quick else 600
    rows = []
    for name in ("sgd", "adam", "mfac"):
        grid = GRIDS[name][1:2] if args.quick else GRIDS[name]
        runs = {}
        for rate in grid:
            runs[rate] = run_mlp(name, rate, num_steps, x, y)
            log(f"{name} lr {rate}: final loss {runs[rate]['final']:.4f}, "
                f"{runs[rate]['per_step']:.0f} µs/step")
        best = min(runs, key=lambda r: runs[r]["final"])
        out = runs[best]
        marks = sorted(out["checkpoints"])
        rows.append((name, best, ", ".join(str(g) for g in grid),
                     f"{out['checkpoints'][marks[0]]:.4f}", f"{out['checkpoints'][marks[1]]:.4f}",
                     f"{out['final']:.4f}", f"{out['accuracy']:.3f}", f"{out['per_step']:.0f}",
                     f"{out['compile']:.1f}"))
    mlp_table = markdown_table(
        ["optimiser", "best lr", "lr grid", f"loss @ {num_steps // 4}",
         f"loss @ {num_steps // 2}", f"loss @ {num_steps}", "train accuracy", "µs / step",
         "compile s"], "lrlrrrrrr", rows)

    xb, yb = breast_cancer()
    optimum = logistic_optimum(xb, yb)
    rows = []
    for name, steps in (("GradientRegularisedNewton", 40), ("optax.lbfgs", 300),
                        ("gradient descent (1/L)", 20_000 if not args.quick else 5_000)):
        with jax.enable_x64(True):  # the 1e-8 tolerance needs float64; part 1 is float32
            out = run_logistic(name, steps, xb, yb, optimum)
        log(f"{name}: steps to tolerance {out['steps']}, final gap {out['final_gap']:.2e}")
        rows.append((name, steps, fmt(out["steps"], "d"), fmt(out["seconds"], ".4f"),
                     f"{out['per_step'] * 1e6:.0f}", f"{out['final_gap']:.1e}",
                     f"{out['compile']:.1f}"))
    logistic_table = markdown_table(
        ["method", "steps run", f"steps to f - f* < {TOLERANCE:g}", "seconds to tolerance",
         "µs / step", "final f - f*", "compile s"], "lrrrrrr", rows)

    body = (
        results_heading("bench_curvature.py", command,
                        versions(("jax", "numpy", "optax", "scikit-learn", "scipy")))
        + f"- machine: {machine()}; load before the run {load}; threads: {args.threads}\n"
        + "- part 1: digits, 64-32-10 tanh MLP, minibatch 64 drawn in the objective, "
        f"{num_steps} steps of px.fit; losses are full-data training cross-entropy; "
        "mfac: window 32, damping 1e-3, then scale_by_learning_rate\n\n"
        + mlp_table
        + "\n- part 2: breast cancer (569 x 31 with intercept, standardised), mean log-loss "
        f"+ {ALPHA / 2:g} ‖w‖², f* from scipy L-BFGS-B (gtol 1e-12); float64; "
        "GradientRegularisedNewton with the exact Hessian and the adaptive γ search\n\n"
        + logistic_table
        + "".join("\n" + s for s in sections)
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
