"""Curvature back-ends: M-FAC vs Adam vs SGD (an MLP), GRN vs GD vs L-BFGS (logistic regression).

Usage:
    .venv/bin/python benchmarks/bench_curvature.py [--quick] [--threads 1|default] [--no-results]

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="150 MLP steps, one rate each")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    command = command_line(argv, "benchmarks/bench_curvature.py")
    load = load_average()
    log(f"# {command}; load {load}")

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
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
