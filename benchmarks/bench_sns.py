"""Sinkhorn-Newton-Sparse (`px.optim.SinkhornNewtonSparse`) against ott-jax and regot.

Usage:
    .venv/bin/pip install regot==0.0.3           # the C++ peer (`make benchmarks` does it)
    .venv/bin/python benchmarks/bench_sns.py [--quick] [--repeats R] [--threads 1|default]
                                             [--no-results]

Problems (float64, as regot computes; balanced, ε absolute):
- `assignment`: n = m = 500, uniform marginals, costs i.i.d. U[0, 1], η = 1 / ε = 1200 (Tang
  et al.'s random assignment problem, issue 15);
- `point cloud`: n = m = 500 points uniform on [0, 1]², squared Euclidean cost, ε = 0.001;
- `W1 grid`, `W2 grid`: two discretised 2-D densities (a two-bump mixture and a wide bump)
  on a 28 x 28 grid of [0, 1]² (784 points), Euclidean and squared Euclidean costs, ε = 0.001.

Contenders, each run to a marginal error of 1e-6 (each library's own criterion: ppl_ext
`‖P1 - a‖₁ + ‖Pᵀ1 - b‖₁`; ott `‖Pᵀ1 - b‖₁` checked every 10 sweeps; regot its own norm of
the dual gradient, `tol=1e-6`): SNS (ppl_ext, 20 warm-up Sinkhorn sweeps, 16 entries kept
per row and column, the default), and SNS again to 1e-10 (`SNS 1e-10`); ott-jax's
`Sinkhorn` plain, with adaptive momentum (Lehmann et al., `Momentum(start=100)`) and with Anderson acceleration
(memory 5), at most 20,000 sweeps; regot's `sinkhorn_ssns` (safe and sparse Newton, Tang and
Qiu, NeurIPS 2024; its plain `sinkhorn_sparse_newton` stalls, see tests/optim/test_sns.py,
and is left out). Every row also reports the same marginal error `‖P1 - a‖₁ + ‖Pᵀ1 - b‖₁`
of its returned plan, computed here. Times: median over `--repeats` interleaved repeats (a
contender slower than 5 s on its first run is run once); the JAX solvers are compiled
ahead (`lower().compile()`, the compile time reported apart, 0 when the executable is
reused for a second problem of the same shapes).

Then the assignment limit: the same n = 500 costs at η = 10^5 (ε = 1e-5), SNS (to 1e-6, at
most 1,000 Newton steps) and regot's `sinkhorn_ssns` (tol 1e-9): how many rows' argmax of
the plan differ from `optax.assignment.hungarian_algorithm`'s assignment (run once).
The machine is shared: XLA and NumPy are pinned to one thread unless `--threads default`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

pin_threads_unless_default(sys.argv)  # before jax and numpy are imported

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    command_line, load_average, log, machine, markdown_table, report, results_heading,
    short_exception, versions,
)
from ott.geometry import geometry, pointcloud  # noqa: E402
from ott.problems.linear import linear_problem  # noqa: E402
from ott.solvers.linear import acceleration, sinkhorn  # noqa: E402

from ppl_ext.optim import SinkhornNewtonSparse  # noqa: E402

EPSILON = 1e-3
ETA = 1200.0  # the assignment problem's 1 / ε
TOLERANCE = 1e-6
TIGHT_TOLERANCE = 1e-10  # SNS's second row
MAX_ITERATIONS = 20_000  # Sinkhorn sweeps; a run that hits it reports converged False
SLOW = 5.0  # seconds: a contender slower than this on its first run is not repeated


def grid_densities(side: int):
    """Points of a `side` x `side` grid of [0, 1]² and two densities on it."""
    ticks = (np.arange(side) + 0.5) / side
    grid = np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)

    def density(center, scale):
        d = np.exp(-np.sum((grid - np.asarray(center)) ** 2, 1) / (2 * scale**2))
        return d / d.sum()

    a = 0.5 * density([0.3, 0.3], 0.1) + 0.5 * density([0.7, 0.6], 0.15)
    return grid, a, density([0.5, 0.5], 0.2)


def problems(size: int, side: int) -> dict[str, linear_problem.LinearProblem]:
    key_cost, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    cost = jax.random.uniform(key_cost, (size, size))
    x = jax.random.uniform(key_x, (size, 2))
    y = jax.random.uniform(key_y, (size, 2))
    cloud = pointcloud.PointCloud(x, y, epsilon=EPSILON)
    grid, a, b = grid_densities(side)
    squared = np.sum((grid[:, None] - grid[None]) ** 2, -1)
    return {
        "assignment": linear_problem.LinearProblem(geometry.Geometry(cost, epsilon=1 / ETA)),
        # the dense cost, so every solver reads the same matrix
        "point cloud": linear_problem.LinearProblem(
            geometry.Geometry(cloud.cost_matrix, epsilon=EPSILON)),
        "W1 grid": linear_problem.LinearProblem(
            geometry.Geometry(jnp.asarray(np.sqrt(squared)), epsilon=EPSILON),
            jnp.asarray(a), jnp.asarray(b)),
        "W2 grid": linear_problem.LinearProblem(
            geometry.Geometry(jnp.asarray(squared), epsilon=EPSILON), jnp.asarray(a),
            jnp.asarray(b)),
    }


def marginal_error(plan, a, b) -> float:
    plan = np.asarray(plan)
    return float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())


def jax_runner(solve, prob):
    """A call `() -> (plan, iterations, detail)` of a jitted solver, and its compile time."""
    fn = jax.jit(solve)
    start = time.perf_counter()
    compiled = fn.lower(prob).compile()
    compile_time = time.perf_counter() - start

    def call():
        out = compiled(prob)
        jax.block_until_ready(out.potentials)
        return out

    return call, compile_time


def contenders(prob):
    sns = SinkhornNewtonSparse(threshold=TOLERANCE, num_sinkhorn_steps=20,
                               num_newton_steps=500, num_kept=16)
    sns_tight = SinkhornNewtonSparse(threshold=TIGHT_TOLERANCE, num_sinkhorn_steps=20,
                                     num_newton_steps=500, num_kept=16)
    plain = sinkhorn.Sinkhorn(threshold=TOLERANCE, max_iterations=MAX_ITERATIONS)
    momentum = sinkhorn.Sinkhorn(threshold=TOLERANCE, max_iterations=MAX_ITERATIONS,
                                 momentum=acceleration.Momentum(start=100))
    anderson = sinkhorn.Sinkhorn(threshold=TOLERANCE, max_iterations=MAX_ITERATIONS,
                                 anderson=acceleration.AndersonAcceleration(memory=5))
    runners, compile_times = {}, {}

    def wrap_sns(call):
        def run():
            out = call()
            return (out.matrix, int(out.n_iters),
                    f"{int(out.num_sinkhorn_steps)} Sinkhorn + {int(out.num_newton_steps)} "
                    f"Newton; converged {bool(out.converged)}")
        return run

    def wrap_ott(call):
        def run():
            out = call()
            return out.matrix, int(out.n_iters), f"converged {bool(out.converged)}"
        return run

    call, compile_times["ppl_ext SNS"] = jax_runner(sns, prob)
    runners["ppl_ext SNS"] = wrap_sns(call)
    call, compile_times["ppl_ext SNS 1e-10"] = jax_runner(sns_tight, prob)
    runners["ppl_ext SNS 1e-10"] = wrap_sns(call)
    for name, solver in [("ott Sinkhorn", plain), ("ott Sinkhorn + momentum", momentum),
                         ("ott Sinkhorn + Anderson", anderson)]:
        try:
            call, compile_times[name] = jax_runner(solver, prob)
            runners[name] = wrap_ott(call)
        except Exception as exc:  # noqa: BLE001 (report, do not stop the benchmark)
            log(f"  {name}: {short_exception(exc)}")
    try:
        import regot

        cost = np.asfortranarray(np.asarray(prob.geom.cost_matrix, dtype=np.float64))
        a, b = np.asarray(prob.a, np.float64), np.asarray(prob.b, np.float64)
        for name, fn in [("regot sinkhorn_ssns", regot.sinkhorn_ssns)]:
            def run(fn=fn):
                res = fn(cost, a, b, float(prob.geom.epsilon), tol=TOLERANCE,
                         max_iter=MAX_ITERATIONS)
                return res.plan, int(res.niter), "-"
            runners[name] = run
    except ImportError:
        log("  regot not installed: pip install regot==0.0.3")
    return runners, compile_times


def assignment_limit(size: int) -> list[list]:
    """Rows of the η = 10^5 check: argmax of the plan against the Hungarian assignment."""
    from optax.assignment import hungarian_algorithm

    cost = jax.random.uniform(jax.random.split(jax.random.key(0), 3)[0], (size, size))
    rows, cols = hungarian_algorithm(cost)
    assignment = np.empty(size, int)
    assignment[np.asarray(rows)] = np.asarray(cols)
    a = np.full(size, 1 / size)
    out_rows = []
    sns = SinkhornNewtonSparse(threshold=TOLERANCE, num_sinkhorn_steps=20,
                               num_newton_steps=1000, num_kept=16)
    start = time.perf_counter()
    out = sns(geometry.Geometry(cost, epsilon=1e-5))
    jax.block_until_ready(out.potentials)
    seconds = time.perf_counter() - start
    plan = np.asarray(out.matrix)
    out_rows.append(["ppl_ext SNS", int(out.n_iters), f"{seconds:.2f} (with compile)",
                     f"{marginal_error(plan, a, a):.1e}",
                     int(np.sum(plan.argmax(1) != assignment)),
                     f"{np.min(plan.max(1)) * size:.3f}"])
    try:
        import regot

        start = time.perf_counter()
        res = regot.sinkhorn_ssns(np.asfortranarray(np.asarray(cost, np.float64)), a, a,
                                  1e-5, tol=1e-9, max_iter=MAX_ITERATIONS)
        seconds = time.perf_counter() - start
        out_rows.append(["regot sinkhorn_ssns", int(res.niter), f"{seconds:.2f}",
                         f"{marginal_error(res.plan, a, a):.1e}",
                         int(np.sum(res.plan.argmax(1) != assignment)),
                         f"{np.min(res.plan.max(1)) * size:.3f}"])
    except ImportError:
        pass
    for row in out_rows:
        log(f"  assignment limit / {row[0]}: {row[1]} iterations, {row[2]} s, error {row[3]}, "
            f"{row[4]} rows off the Hungarian assignment")
    return out_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 100, a 10 x 10 grid, 1 repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    size, side, repeats = (100, 10, 1) if args.quick else (500, 28, args.repeats)
    command = command_line(argv, "benchmarks/bench_sns.py")
    log(f"# {command}; load {load_average()}")
    load_before = load_average()
    rows, ratios = [], []
    for label, prob in problems(size, side).items():
        a, b = np.asarray(prob.a), np.asarray(prob.b)
        runners, compile_times = contenders(prob)
        results, times = {}, {name: [] for name in runners}
        for repeat in range(repeats):  # interleaved
            for name, call in runners.items():
                if repeat and times[name][0] > SLOW:
                    continue
                start = time.perf_counter()
                results[name] = call()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(times[name]) for name in runners}
        for name in runners:
            plan, iterations, detail = results[name]
            median = medians[name]
            log(f"  {label} / {name}: {iterations} iterations, {median:.3f} s, "
                f"error {marginal_error(plan, a, b):.1e} ({detail})")
            rows.append([label, name, iterations, f"{median:.3f}",
                         f"{compile_times[name]:.2f}" if name in compile_times else "-",
                         f"{marginal_error(plan, a, b):.1e}", detail])
        ratio = [label] + [
            f"{medians['ppl_ext SNS'] / medians[peer]:.2f}" if peer in medians else "-"
            for peer in ("regot sinkhorn_ssns", "ott Sinkhorn + momentum", "ott Sinkhorn")]
        ratios.append(ratio)
    limit_rows = assignment_limit(size)
    body = (
        results_heading("bench_sns.py", command, versions(("ott-jax", "numpy", "regot")))
        + f"- machine: {machine()}; load before the run {load_before}, after "
        f"{load_average()}; threads: {args.threads} (XLA and NumPy); repeats: {repeats}\n"
        f"- n = m = {size} (assignment: η = {ETA:g}; point cloud: ε = {EPSILON}), grids "
        f"{side} x {side} (ε = {EPSILON}); float64, tolerance {TOLERANCE} (each solver's own "
        "criterion, see the script's docstring; `SNS 1e-10`: 1e-10); error: "
        f"‖P1 - a‖₁ + ‖Pᵀ1 - b‖₁ of the returned plan{' (QUICK)' if args.quick else ''}\n\n"
        + markdown_table(["problem", "solver", "iterations", "s (median)", "compile s",
                          "marginal error", "detail"], "llrrrrl", rows)
        + "\nSNS's time (to 1e-6) over the peer's (below 1 is faster):\n\n"
        + markdown_table(["problem", "/ regot ssns", "/ ott + momentum", "/ ott plain"],
                         "lrrr", ratios)
        + f"\nAssignment limit: the assignment costs at η = 10^5, n = {size}; rows whose "
        "plan argmax differs from optax's Hungarian assignment (min row max: the smallest "
        "largest entry of a row, times n; 1 for a permutation):\n\n"
        + markdown_table(["solver", "iterations", "s", "marginal error", "rows off",
                          "min row max"], "lrrrrr", limit_rows)
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
