"""Particle filters and smoothers: `px.smc` against `particles` on the linear-Gaussian model.

Usage:
    make particles-venv                       # .venv-particles: particles 0.4, numpy<2
    .venv/bin/python benchmarks/bench_smc.py [--quick] [--threads 1|default] [--no-results]

The model is `particles`' `LinearGauss` with its defaults (rho 0.9, sigma_x 1, sigma_y 0.2,
x_0 ~ N(0, sigma_x^2 / (1 - rho^2))), `models.ssm.linear_gaussian_1d` here; one series of
T observations simulated once and given to both. Tasks, at equal N:

- `filter`: bootstrap filter, systematic resampling at every step (particles:
  `ESSrmin=1`), the log-likelihood estimate; N in {100, 1000, 10000}, T in {100, 1000};
- `ffbs`: O(N^2) forward-filtering backward-sampling of N trajectories after a stored
  filter (particles: `hist.backward_sampling_ON2(N)`), the smoothing time only;
- `paris`: PaRIS (Ñ = 2, accept-reject with exact fallback: particles' `Paris`
  collector, ppl_ext with `log_transition_bound`) for the additive functional Σ x_t.

`particles` needs numpy<2, so it runs in a worker subprocess under `.venv-particles`;
the main process sends it one task at a time, interleaved with the ppl_ext runs of the
same task. Reported: median seconds per run over the repeats, the speed-up, ppl_ext's
compile time apart, and the estimates of both (their means over the repeats, with the
exact Kalman values: log p(y) and E[Σ x_t | y]). Threads: XLA and NumPy pinned to one
(`--threads 1`, default, set before jax and numpy are imported, also in the worker).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


from _common import PeerWorker, pin_threads_unless_default  # noqa: E402 (stdlib only)

pin_threads_unless_default(sys.argv)  # before jax and numpy are imported

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER_PYTHON = ROOT / ".venv-particles" / "bin" / "python"


# ------------------------------------------------------------------ the particles worker


def worker() -> int:
    """Read JSON tasks from stdin, answer one JSON line each (time and estimate)."""
    import numpy as np
    import particles
    from particles import collectors
    from particles import state_space_models as ssms
    from particles.kalman import LinearGauss

    class Bounded(LinearGauss):
        def upper_bound_log_pt(self, t):  # f(x_t | x_{t-1}) <= 1 / (sqrt(2 pi) sigma_x)
            return -0.5 * np.log(2 * np.pi) - np.log(self.sigmaX)

        def add_func(self, t, xp, x):  # the additive functional Σ_t x_t (t = 0 too)
            return x

    for line in sys.stdin:
        task = json.loads(line)
        ys = np.asarray(task["ys"])
        np.random.seed(task["seed"])
        model = Bounded()
        fk = ssms.Bootstrap(ssm=model, data=list(ys))
        n = task["num_particles"]
        if task["name"] == "filter":
            start = time.perf_counter()
            pf = particles.SMC(fk=fk, N=n, resampling="systematic", ESSrmin=1.0)
            pf.run()
            seconds, estimate = time.perf_counter() - start, float(pf.logLt)
        elif task["name"] == "ffbs":
            pf = particles.SMC(fk=fk, N=n, resampling="systematic", ESSrmin=1.0,
                               store_history=True)
            pf.run()
            start = time.perf_counter()
            paths = pf.hist.backward_sampling_ON2(n)
            seconds = time.perf_counter() - start
            estimate = float(np.mean(np.sum(np.asarray(paths), axis=0)))
        elif task["name"] == "ffbs_hybrid":  # Dau and Chopin's hybrid rejection, max_trials=N
            pf = particles.SMC(fk=fk, N=n, resampling="systematic", ESSrmin=1.0,
                               store_history=True)
            pf.run()
            start = time.perf_counter()
            paths = pf.hist.backward_sampling_reject(n)
            seconds = time.perf_counter() - start
            estimate = float(np.mean(np.sum(np.asarray(paths), axis=0)))
        else:  # paris
            pf = particles.SMC(fk=fk, N=n, resampling="systematic", ESSrmin=1.0,
                               collect=[collectors.Paris(Nparis=2)])
            start = time.perf_counter()
            pf.run()
            seconds = time.perf_counter() - start
            estimate = float(pf.summaries.paris[-1])
        print(json.dumps({"seconds": seconds, "estimate": estimate}), flush=True)
    return 0


class Worker(PeerWorker):
    """The particles worker: this script with `--worker` under `python`."""

    def __init__(self, python: Path):
        super().__init__(python, __file__, ["--worker"], name="particles")

    def run(self, task: dict) -> dict:
        return self.ask(task)


# ------------------------------------------------------------------------ the main side


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small N and T, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heavy-repeats", type=int, default=2,
                   help="repeats of the rows where particles takes seconds per run (filter "
                   "N=10^4 T=10^3, FFBS O(N^2) and PaRIS)")
    p.add_argument("--smoother-sizes", default="100,1000",
                   help="the N of the smoother rows (T = 100), comma-separated")
    p.add_argument("--bias-runs", type=int, default=12,
                   help="particles' runs per smoother in the bias table (ppl_ext: 10x)")
    p.add_argument("--tasks", default="filter,ffbs,ffbs_hybrid,paris",
                   help="the rows of the main table to run, comma-separated")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker()
    for path in (HERE, ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ppl_ext.smc as smc
    from _common import (command_line, load_average, log, machine, markdown_table, report,
                         results_heading, versions)
    from models import ssm

    if not WORKER_PYTHON.exists():
        raise SystemExit("no .venv-particles: run `make particles-venv` first")
    command = command_line(argv, "benchmarks/bench_smc.py")
    log(f"# {command}; load {load_average()}")
    model, params = ssm.linear_gaussian_1d, ssm.LINEAR_GAUSSIAN_1D_PARAMS
    if args.quick:
        filters, smoothers, repeats = [(100, 100), (1000, 100)], [(100, 100)], 1
        args.heavy_repeats, args.bias_runs = 1, 2
    else:
        filters = [(n, t) for t in (100, 1000) for n in (100, 1000, 10_000)]
        smoothers = [(int(n), 100) for n in args.smoother_sizes.split(",")]
        repeats = args.repeats
    # particles' O(N²) FFBS and its PaRIS collector take seconds per run
    heavy = {("filter", 10_000, 1000)} | {(name, n, t) for n, t in smoothers
                                          for name in ("ffbs", "paris")}
    series = {t: np.asarray(ssm.generate_data(model, params, t, seed=0)[1], np.float64)
              for t in {t for _, t in filters + smoothers}}
    from tests.smc.kalman import kalman, lg1_matrices  # NumPy float64, no ppl_ext

    exact = {}
    for t, ys in series.items():
        k = kalman(lg1_matrices(params), ys[:, None])
        exact[t] = (float(k["log_likelihoods"][-1]), float(np.sum(k["smoothed_means"])))
    worker_proc = Worker(WORKER_PYTHON)
    bound = float(-0.5 * np.log(2 * np.pi) - np.log(float(params["sigma_x"])))

    def ours(name, n, t):
        ys = jnp.asarray(series[t], jnp.float32)
        if name == "filter":
            def run(key):
                return smc.filter(key, model, params, ys, num_particles=n,
                                  store_particles=False).log_likelihood
        elif name in ("ffbs", "ffbs_hybrid"):
            result = smc.filter(jax.random.key(99), model, params, ys, num_particles=n)
            hybrid = (lambda p_, tt, u: bound) if name == "ffbs_hybrid" else None

            def run(key):
                paths = smc.ffbs(key, model, params, result, num_samples=n,
                                 log_transition_bound=hybrid)
                return jnp.mean(jnp.sum(paths, axis=1))
        elif name == "ffbs_full":  # the filter too (each run its own filter: the bias table)
            def run(key):
                key_filter, key_back = jax.random.split(key)
                result = smc.filter(key_filter, model, params, ys, num_particles=n)
                paths = smc.ffbs(key_back, model, params, result, num_samples=n)
                return jnp.mean(jnp.sum(paths, axis=1))
        else:
            def run(key):
                return smc.paris(key, model, params, ys, lambda xp, x, tt, u: x,
                                 initial_additive=lambda x, u: x, num_particles=n,
                                 num_backward_samples=2,
                                 log_transition_bound=lambda p_, tt, u: bound).estimate
        run = jax.jit(run)
        start = time.perf_counter()
        jax.block_until_ready(run(jax.random.key(1000)))
        compile_s = time.perf_counter() - start

        def call(seed):
            # one untimed run first: a process that waited for the worker can wait 0.1-0.4 s
            # for a core on a loaded machine (measured, load 10), which would time the wait
            jax.block_until_ready(run(jax.random.key(seed + 500_000)))
            start = time.perf_counter()
            value = float(jax.block_until_ready(run(jax.random.key(seed))))
            return time.perf_counter() - start, value

        return call, compile_s

    rows = []
    tasks = [("filter", n, t) for n, t in filters] + [
        (name, n, t) for name in ("ffbs", "ffbs_hybrid", "paris") for n, t in smoothers]
    chosen, known = set(args.tasks.split(",")), {"filter", "ffbs", "ffbs_hybrid", "paris"}
    if not chosen <= known:
        raise SystemExit(f"--tasks: unknown task(s) {sorted(chosen - known)}")
    tasks = [task for task in tasks if task[0] in chosen]
    for name, n, t in tasks:
        repeats_here = args.heavy_repeats if (name, n, t) in heavy else repeats
        call, compile_s = ours(name, n, t)
        call(10_000)  # warm-up, both sides (the worker's first task also pays its imports);
        # the heavy rows (seconds to minutes a particles run) warm the worker with N = 100
        worker_proc.run({"name": name, "num_particles": min(n, 100) if (name, n, t) in heavy
                         else n, "ys": series[t].tolist(), "seed": 10_000})
        mine, theirs = [], []
        for r in range(repeats_here):  # interleaved
            mine.append(call(r))
            answer = worker_proc.run({"name": name, "num_particles": n, "ys": series[t].tolist(),
                                      "seed": r})
            theirs.append((answer["seconds"], answer["estimate"]))
        t_mine = statistics.median(s for s, _ in mine)
        t_theirs = statistics.median(s for s, _ in theirs)
        reference = f"{exact[t][0]:.3f}" if name == "filter" else f"{exact[t][1]:.3f}"
        rows.append([name, n, t, repeats_here, f"{t_mine:.4f}", f"{t_theirs:.3f}",
                     f"{t_theirs / t_mine:.0f}x", f"{compile_s:.2f}",
                     f"{np.mean([v for _, v in mine]):.3f}",
                     f"{np.mean([v for _, v in theirs]):.3f}", reference])
        log("  " + " | ".join(map(str, rows[-1])))

    # same bias and spread as particles at equal N: each run its own filter and smoother
    bias_rows = []
    n_bias, t_bias = (100, 100)
    runs_theirs, runs_mine = args.bias_runs, 10 * args.bias_runs
    truth = exact[t_bias][1]
    for label, mine_name, their_name in (("FFBS O(N²)", "ffbs_full", "ffbs"),
                                         ("PaRIS (Ñ = 2, hybrid)", "paris", "paris")):
        call, _ = ours(mine_name, n_bias, t_bias)
        mine = [call(20_000 + r)[1] for r in range(runs_mine)]
        theirs = [worker_proc.run({"name": their_name, "num_particles": n_bias,
                                   "ys": series[t_bias].tolist(), "seed": 20_000 + r}
                                  )["estimate"] for r in range(runs_theirs)]
        for side, values in (("ppl_ext", mine), ("particles", theirs)):
            values = np.asarray(values)
            bias_rows.append([label, side, n_bias, t_bias, len(values),
                              f"{values.mean() - truth:+.3f} ± "
                              f"{values.std(ddof=1) / np.sqrt(len(values)):.3f}",
                              f"{values.std(ddof=1):.3f}", f"{truth:.3f}"])
            log("  " + " | ".join(map(str, bias_rows[-1])))
    worker_proc.close()

    # PaRIS cost against N (ppl_ext only: particles' PaRIS takes ~30 s at N = 10^3)
    scaling_rows = []
    for n in (100, 1000, 10_000):
        call, compile_s = ours("paris", n, 100)
        seconds = statistics.median(call(r)[0] for r in range(3))
        scaling_rows.append([n, 100, f"{seconds:.4f}", f"{seconds / (n * 99) * 1e9:.0f}",
                             f"{compile_s:.2f}"])
        log("  " + " | ".join(map(str, scaling_rows[-1])))

    # XLA's memory analysis of the compiled programs (no run): temp bytes against T and N
    def temp_bytes(kind, n, t):
        ys = jnp.zeros(t, jnp.float32)
        def add(xp, x, tt, u):
            return x
        if kind == "paris":
            def f(key, ys):
                return smc.paris(key, model, params, ys, add, num_particles=n,
                                 log_transition_bound=lambda p_, tt, u: bound).estimate
        elif kind == "ppg":
            def f(key, ys):
                return smc.ppg(key, model, params, ys, add, num_particles=n, num_sweeps=4,
                               num_burnin=1,
                               log_transition_bound=lambda p_, tt, u: bound).estimate
        else:  # the stored filter that FFBS needs: O(N T)
            def f(key, ys):
                return smc.filter(key, model, params, ys, num_particles=n).particles
        analysis = jax.jit(f).lower(jax.random.key(0), ys).compile().memory_analysis()
        return analysis.temp_size_in_bytes + analysis.output_size_in_bytes

    memory_rows = []
    for kind, sizes in (("paris", (100, 10_000)), ("ppg", (100, 1000)),
                        ("filter (stored, for FFBS)", (100,))):
        for n in sizes:
            short, long = (temp_bytes(kind.split()[0], n, t) for t in (50, 400))
            memory_rows.append([kind, n, f"{short / 1024:.1f}", f"{long / 1024:.1f}",
                                f"{(long - short) / 350:.1f}"])
            log("  " + " | ".join(map(str, memory_rows[-1])))
    body = (
        results_heading("bench_smc.py", command, versions(("jax", "numpy", "blackjax")))
        + f"- machine: {machine()}; load before the run {load_average()}; threads: "
        f"{args.threads} (XLA and NumPy, also in the particles worker); repeats: {repeats}"
        f"{' (QUICK)' if args.quick else ''}\n"
        "- particles 0.4 (numpy<2) in a worker subprocess; linear-Gaussian model with "
        "particles' LinearGauss defaults; systematic resampling at every step; estimates: "
        "log p(y) (filter), E[Σ x_t | y] (ffbs, paris), means over the repeats\n\n"
        + markdown_table(["task", "N", "T", "repeats", "ppl_ext s", "particles s", "speed-up",
                          "ppl_ext compile s", "ppl_ext estimate", "particles estimate",
                          "exact (Kalman)"], "lrrrrrrrrrr", rows)
        + "\n\n- ffbs_hybrid: ppl_ext `ffbs(..., log_transition_bound=...)` (10 "
        "accept-reject rounds, then exact draws), particles `backward_sampling_reject(N)`\n"
        f"- bias and spread at equal N: E[Σ x_t | y], each run its own filter and smoother "
        f"(seeds 20000 + r), exact RTS value {truth:.3f}; bias ± its standard error\n\n"
        + markdown_table(["smoother", "library", "N", "T", "runs", "bias ± se", "sd",
                          "exact"], "llrrrrrr", bias_rows)
        + "\n\n- PaRIS (Ñ = 2, hybrid backward draws) cost against N, ppl_ext only, T = 100,"
        " median of 3 runs\n\n"
        + markdown_table(["N", "T", "s", "ns per particle-step", "compile s"], "rrrrr",
                         scaling_rows)
        + "\n\n- XLA memory analysis (`jit(f).lower(...).compile().memory_analysis()`, "
        "temp + output bytes, float32): PaRIS and PPG (4 sweeps) keep O(N) per step, PPG's "
        "reference trajectory adds O(T); the stored filter that FFBS reads grows as N·T\n\n"
        + markdown_table(["program", "N", "KiB at T = 50", "KiB at T = 400",
                          "bytes per extra step"], "lrrrr", memory_rows)
    )
    log(body)
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
