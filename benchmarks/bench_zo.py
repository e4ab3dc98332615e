"""ZO-RankSGD (`px.optim.ZerothOrderRankSGD`, rankings only) against value-based ZO-SGD.

Usage:
    .venv/bin/python benchmarks/bench_zo.py [--quick] [--seeds S] [--threads 1|default]
                                            [--rosenbrock-smoothing MU] [--no-results]

Issue 15's check: on a d = 100 quadratic, ZO-RankSGD (Tang, Rybin and Chang, ICLR 2024)
reaches the tolerance within 1.5x the queries of value-based two-point ZO-SGD; both also
run on Rosenbrock. Queries are objective evaluations: 2 a step for ZO-SGD with one
direction, `m` ranked candidates (plus `L` ranked step sizes with the ranking line search)
a step for ZO-RankSGD (a ranking of `m` points counts as `m` queries, as in the paper's
comparison); the values reported here are computed apart and are not queries.

Problems (float32, x0 = 0):
- `quadratic`: f(x) = |x - 1|², d = 100; queries until f ≤ 1e-4 f(x0);
- `Rosenbrock d`: Σ 100 (x_{i+1} - x_i²)² + (1 - x_i)², d = 2 (from (-1.2, 1)), 10 and
  100; f after a fixed budget of queries.

Contenders: ZO-SGD (`ZerothOrderSGD`, one direction, μ = 1e-3) at constant steps (the
quadratic: 1 / (L (d + 2)) with L = 2, the step that minimises the expected next value, and
0.5x, 1.5x of it; Rosenbrock: the largest of 1e-3, 3e-4, 1e-4, 3e-5 that does not diverge
on seed 0); ZO-RankSGD with m = 5, 10, 20 candidates (full rankings) and a 3-point ranking
line search (no tuning: initial step 0.1 on the quadratic, 1e-3 on Rosenbrock), and
ZO-RankSGD m = 10 with a tuned exponentially decaying step instead of the line search.
On Rosenbrock the smoothing μ limits ZO-RankSGD more than its line search does (a
ranking of points μ apart blurs the narrow valley): `--rosenbrock-smoothing 1e-4` gives
every contender μ = 1e-4 there. Medians over `--seeds` seeds; wall time per step reported
apart from compile time (one jitted `lax.scan` per run). No peer library has ZO-RankSGD;
the comparison is the issue's (value-based ZO-SGD, ppl_ext's own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

pin_threads_unless_default(sys.argv)  # before jax and numpy are imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import (  # noqa: E402
    command_line, load_average, log, machine, markdown_table, report, results_heading,
    versions,
)

import ppl_ext as px  # noqa: E402
from ppl_ext.optim import ZerothOrderRankSGD, ZerothOrderSGD  # noqa: E402


def quadratic(x):
    return jnp.sum((x - 1.0) ** 2)


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def run(backend, exact, x0, num_steps, seed):
    """Exact values after each step (one jitted scan), and the compile and run seconds."""
    objective = px.expectation(exact)
    state = backend.init(jax.random.key(0), x0, objective)

    def body(state, key):
        state, _ = backend.step(key, state, objective)
        return state, exact(backend.params(state))

    keys = jax.random.split(jax.random.key(seed), num_steps)
    fn = jax.jit(lambda s, k: jax.lax.scan(body, s, k)[1])
    start = time.perf_counter()
    compiled = fn.lower(state, keys).compile()
    compile_time = time.perf_counter() - start
    start = time.perf_counter()
    values = np.asarray(jax.block_until_ready(compiled(state, keys)))
    return values, compile_time, time.perf_counter() - start


def contenders(d, quadratic_problem, smoothing=1e-3):
    """(name, backend, queries per step) of every contender; `smoothing` is μ for all."""
    zo_step = 1.0 / (2 * (d + 2))
    out = []
    if quadratic_problem:
        for factor in (0.5, 1.0, 1.5):
            out.append((f"ZO-SGD step {factor:g}/(L(d+2))",
                        ZerothOrderSGD(factor * zo_step, smoothing=smoothing,
                                       num_directions=1), 2))
        rank_start = 0.1
    else:
        for step in (1e-3, 3e-4, 1e-4, 3e-5):
            out.append((f"ZO-SGD step {step:g}",
                        ZerothOrderSGD(step, smoothing=smoothing, num_directions=1), 2))
        rank_start = 1e-3
    for m in (5, 10, 20):
        out.append((f"ZO-RankSGD m={m}, line search", ZerothOrderRankSGD(
            rank_start, smoothing=smoothing, num_candidates=m, num_step_sizes=3,
            report_value=False), m + 3))
    decay = optax.exponential_decay(0.3 if quadratic_problem else 3e-3, 1, 0.98
                                    if quadratic_problem else 0.9995)
    out.append(("ZO-RankSGD m=10, decaying step", ZerothOrderRankSGD(
        decay, smoothing=smoothing, num_candidates=10, report_value=False), 10))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, smaller budgets")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rosenbrock-smoothing", type=float, default=1e-3,
                   help="μ of every contender on Rosenbrock (the quadratic keeps 1e-3)")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    budget = 20_000 if args.quick else 200_000  # Rosenbrock queries
    command = command_line(argv, "benchmarks/bench_zo.py")
    load_before = load_average()
    log(f"# {command}; load {load_before}")
    d = 100
    target = 1e-4 * float(quadratic(jnp.zeros(d)))
    quad_rows, rosen_rows = [], []
    for name, backend, per_step in contenders(d, True):
        queries, compile_times, step_times = [], [], []
        for seed in range(seeds):
            num_steps = 8000 // per_step + 10  # 8,000 queries
            values, compile_time, seconds = run(backend, quadratic, jnp.zeros(d), num_steps, seed)
            reached = np.flatnonzero(values <= target)
            queries.append(per_step * (int(reached[0]) + 1) if reached.size else np.inf)
            compile_times.append(compile_time)
            step_times.append(seconds / num_steps)
        median = statistics.median(queries)
        log(f"  quadratic / {name}: median {median} queries ({queries})")
        quad_rows.append([name, per_step, f"{median:g}", " ".join(f"{q:g}" for q in queries),
                          f"{statistics.median(compile_times):.2f}",
                          f"{1e3 * statistics.median(step_times):.3f}"])
    best_zo = min(float(r[2]) for r in quad_rows if r[0].startswith("ZO-SGD"))
    for row in quad_rows:
        row.append(f"{float(row[2]) / best_zo:.2f}")
    for dim in (2, 10, 100):
        x0 = jnp.array([-1.2, 1.0]) if dim == 2 else jnp.zeros(dim)
        f0 = float(rosenbrock(x0))
        zo_kept = False
        for name, backend, per_step in contenders(dim, False, args.rosenbrock_smoothing):
            if name.startswith("ZO-SGD") and zo_kept:
                continue  # the largest stable ZO-SGD step is kept, smaller ones skipped
            finals = []
            for seed in range(seeds):
                values, _, _ = run(backend, rosenbrock, x0, budget // per_step, seed)
                finals.append(float(values[-1]))
            if name.startswith("ZO-SGD"):
                if not all(np.isfinite(finals)) or max(finals) > f0:  # diverged
                    log(f"  Rosenbrock {dim} / {name}: diverged")
                    continue
                zo_kept = True
            median = statistics.median(finals)
            log(f"  Rosenbrock {dim} / {name}: median f {median:.3g} after {budget} queries")
            rosen_rows.append([f"Rosenbrock {dim}", name, f"{f0:.3g}", f"{median:.3g}",
                               " ".join(f"{v:.3g}" for v in finals)])
    body = (
        results_heading("bench_zo.py", command, versions(("optax", "numpy")))
        + f"- machine: {machine()}; load before the run {load_before}, after "
        f"{load_average()}; threads: {args.threads} (XLA); seeds: {seeds}"
        f"{' (QUICK)' if args.quick else ''}\n"
        "- queries: objective evaluations (a ranking of m points counts m); d = 100 "
        "quadratic |x - 1|² from 0 to f ≤ 1e-4 f(0)\n\n"
        + markdown_table(["quadratic, d = 100", "queries / step", "queries (median)",
                          "per seed", "compile s", "ms / step", "/ best ZO-SGD"],
                         "lrrrrrr", quad_rows)
        + f"\nRosenbrock, f after {budget} queries (median over seeds; ZO-SGD at its "
        f"largest non-diverging step of the grid; smoothing μ = {args.rosenbrock_smoothing:g} "
        "for every contender):\n\n"
        + markdown_table(["problem", "method", "f(x0)", "f (median)", "per seed"], "llrrr",
                         rosen_rows)
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
