"""Sinkhorn-Newton-Sparse (`px.optim.SinkhornNewtonSparse`) against ott-jax and regot.

Usage:
    .venv/bin/pip install regot==0.0.3           # the C++ peer (`make benchmarks` does it)
    .venv/bin/python benchmarks/bench_sns.py [--quick] [--repeats R] [--threads 1|default]
                                             [--no-results]

Problems (float64, as regot computes; balanced, ε absolute):
- `assignment`: n = m = 500, uniform marginals, costs i.i.d. U[0, 1] (issue 15's random
  assignment-like problem), ε = 0.001;
- `point cloud`: n = m = 500 points uniform on [0, 1]², squared Euclidean cost, ε = 0.001.

Contenders, each run to a marginal error of 1e-6 (each library's own criterion: ppl_ext
`‖P1 - a‖₁ + ‖Pᵀ1 - b‖₁`; ott `‖Pᵀ1 - b‖₁` checked every 10 sweeps; regot its own norm of
the dual gradient, `tol=1e-6`): SNS (ppl_ext, 50 warm-up Sinkhorn sweeps, 16 entries kept
per row and column); ott-jax's `Sinkhorn` plain, with adaptive momentum (Lehmann et al.,
`Momentum(start=100)`) and with Anderson acceleration (memory 5), at most 20,000 sweeps;
regot's `sinkhorn_ssns` (safe and sparse Newton, Tang and Qiu, NeurIPS 2024; its
`sinkhorn_bcd` and `sinkhorn_sparse_newton` took minutes at n = 100 on this machine and are
left out). Every row also reports the same marginal error `‖P1 - a‖₁ + ‖Pᵀ1 - b‖₁` of its
returned plan, computed here. Times: median over `--repeats` interleaved repeats (a
contender slower than 5 s on its first run is run once); the JAX solvers are compiled
ahead (`lower().compile()`, the compile time reported apart, 0 when the executable is
reused for a second problem of the same shapes).
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
TOLERANCE = 1e-6
MAX_ITERATIONS = 20_000  # Sinkhorn sweeps; a run that hits it reports converged False
SLOW = 5.0  # seconds: a contender slower than this on its first run is not repeated


def problems(size: int) -> dict[str, linear_problem.LinearProblem]:
    key_cost, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    cost = jax.random.uniform(key_cost, (size, size))
    x = jax.random.uniform(key_x, (size, 2))
    y = jax.random.uniform(key_y, (size, 2))
    cloud = pointcloud.PointCloud(x, y, epsilon=EPSILON)
    return {
        "assignment": linear_problem.LinearProblem(geometry.Geometry(cost, epsilon=EPSILON)),
        # the dense cost, so every solver reads the same matrix
        "point cloud": linear_problem.LinearProblem(
            geometry.Geometry(cloud.cost_matrix, epsilon=EPSILON)),
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
    sns = SinkhornNewtonSparse(threshold=TOLERANCE, num_sinkhorn_steps=50,
                               num_newton_steps=200, num_kept=16)
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
                res = fn(cost, a, b, EPSILON, tol=TOLERANCE, max_iter=MAX_ITERATIONS)
                return res.plan, int(res.niter), "-"
            runners[name] = run
    except ImportError:
        log("  regot not installed: pip install regot==0.0.3")
    return runners, compile_times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 100, 1 repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    size, repeats = (100, 1) if args.quick else (500, args.repeats)
    command = command_line(argv, "benchmarks/bench_sns.py")
    log(f"# {command}; load {load_average()}")
    load_before = load_average()
    rows = []
    for label, prob in problems(size).items():
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
        for name in runners:
            plan, iterations, detail = results[name]
            median = statistics.median(times[name])
            log(f"  {label} / {name}: {iterations} iterations, {median:.3f} s, "
                f"error {marginal_error(plan, a, b):.1e} ({detail})")
            rows.append([label, name, iterations, f"{median:.3f}",
                         f"{compile_times[name]:.2f}" if name in compile_times else "-",
                         f"{marginal_error(plan, a, b):.1e}", detail])
    body = (
        results_heading("bench_sns.py", command, versions(("ott-jax", "numpy", "regot")))
        + f"- machine: {machine()}; load before the run {load_before}, after "
        f"{load_average()}; threads: {args.threads} (XLA and NumPy); repeats: {repeats}\n"
        f"- n = m = {size}, ε = {EPSILON}, float64, tolerance {TOLERANCE} (each solver's own "
        "criterion, see the script's docstring); error: ‖P1 - a‖₁ + ‖Pᵀ1 - b‖₁ of the "
        f"returned plan{' (QUICK)' if args.quick else ''}\n\n"
        + markdown_table(["problem", "solver", "iterations", "s (median)", "compile s",
                          "marginal error", "detail"], "llrrrrl", rows)
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
