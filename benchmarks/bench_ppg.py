"""PaRIS against PaRIS particle Gibbs (PPG) at equal particle budget, against Kalman.

Usage:
    .venv/bin/python benchmarks/bench_ppg.py [--quick] [--budgets 16,64,256]
        [--num-times T] [--num-runs R] [--sweeps 2:1,4:1,8:2]
        [--fixed-n N --fixed-sweeps 2:1,4:1,8:2,16:4,32:8]
        [--threads 1|default] [--no-results]

Model: `models.ssm.linear_gaussian_1d` with rho 0.9, sigma_x 1, sigma_y 1 (x_0 from the
stationary law), one series of T observations simulated once. Functionals:
`E[Σ_t x_t | y]` and `E[Σ_t x_{t-1} x_t | y]`, exact values from the RTS smoother
(`tests/smc/kalman.py`, NumPy float64). Each method runs R times with independent keys
(one vmapped, jitted batch); reported: bias (mean - exact, with its standard error), the
standard deviation over the runs and the root mean squared error, per functional, and
the seconds of the R runs (compile time apart).

Budgets: PaRIS with N particles against PPG with N/k particles and k sweeps (plus the
burn-in sweeps left out of the roll-out average counted in k), so every row of one
budget draws the same number of particles per time step (N·sweeps). Backward draws are
accept-reject with exact fallback (`log_transition_bound = -log(sqrt(2π) σ_X)`, Ñ = 2)
for all, O(N) per step, so equal particle budgets are close to equal compute; PPG also
draws a first reference (one O(N T) bootstrap genealogy) and stores each conditional run
(O(N T) memory, where PaRIS keeps O(N)). Threads: XLA and NumPy pinned to one unless
`--threads default`.

`--sweeps k:b,...` sets the PPG rows of each budget (k sweeps, b of them burn-in);
`--fixed-n N` adds a second table, PPG at fixed N with the sweeps of `--fixed-sweeps`
against PaRIS at the same N (the bias should tend to 0 as the sweeps grow);
`--num-times` and `--num-runs` override T and R (longer series make PaRIS's
self-normalisation bias, O(T/N), measurable at small N).
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

pin_threads_unless_default(sys.argv)  # before jax and numpy are imported

import _common  # noqa: E402

sys.path.insert(0, str(_common.ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="R = 50 runs, T = 20")
    parser.add_argument("--threads", default="1", help="1 (default) or default")
    parser.add_argument("--no-results", action="store_true", help="do not append RESULTS.md")
    parser.add_argument("--budgets", default="16,64,256",
                        help="comma-separated particle budgets N·sweeps (default 16,64,256)")
    parser.add_argument("--num-times", type=int, default=None, help="series length T")
    parser.add_argument("--num-runs", type=int, default=None, help="runs R per row")
    parser.add_argument("--sweeps", default="2:1,4:1,8:2",
                        help="PPG rows per budget, sweeps:burn-in (default 2:1,4:1,8:2)")
    parser.add_argument("--fixed-n", type=int, default=None,
                        help="also PPG at this fixed N against PaRIS at the same N")
    parser.add_argument("--fixed-sweeps", default="2:1,4:1,8:2,16:4,32:8",
                        help="sweeps:burn-in of the fixed-N rows")
    args = parser.parse_args(argv)

    import math

    import jax
    import jax.numpy as jnp
    import numpy as np

    import ppl_ext.smc as smc
    from models import ssm
    from tests.smc.kalman import kalman, lg1_matrices

    num_runs, num_times = (50, 20) if args.quick else (400, 50)
    num_runs = args.num_runs or num_runs
    num_times = args.num_times or num_times

    def pairs(text):
        out = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
        if any(len(p) != 2 or p[0] < 1 or not 0 <= p[1] < p[0] for p in out):
            raise SystemExit(f"bench_ppg: sweeps must be k:b with 0 <= b < k, got {text!r}")
        return out
    model = ssm.linear_gaussian_1d
    params = {**ssm.LINEAR_GAUSSIAN_1D_PARAMS, "sigma_y": jnp.asarray(1.0)}
    _, ys = ssm.generate_data(model, params, num_times, seed=0)
    truth = kalman(lg1_matrices(params), ys)
    means, cross = truth["smoothed_means"][:, 0], truth["smoothed_cross"][:, 0, 0]
    exact = np.array([means.sum(), np.sum(cross + means[:-1] * means[1:])])
    bound = lambda p, t, u: -0.5 * math.log(2 * math.pi) - jnp.log(p["sigma_x"])

    def additive(x_prev, x, t, inputs):
        return jnp.stack([x, x_prev * x])

    def initial_additive(x, inputs):
        return jnp.stack([x, jnp.zeros_like(x)])

    common = dict(initial_additive=initial_additive, log_transition_bound=bound)

    def paris(num_particles):
        return lambda key: smc.paris(key, model, params, ys, additive,
                                     num_particles=num_particles, **common).estimate

    def ppg(num_particles, num_sweeps, num_burnin):
        return lambda key: smc.ppg(key, model, params, ys, additive,
                                   num_particles=num_particles, num_sweeps=num_sweeps,
                                   num_burnin=num_burnin, **common).estimate

    budgets = [int(b) for b in args.budgets.split(",")]
    configs = []
    for budget in budgets:
        configs.append((budget, "PaRIS", budget, 1, 0, paris(budget)))
        for sweeps, burnin in pairs(args.sweeps):
            if budget // sweeps >= 2:
                configs.append((budget, "PPG", budget // sweeps, sweeps, burnin,
                                ppg(budget // sweeps, sweeps, burnin)))
    fixed = []
    if args.fixed_n is not None:
        n = args.fixed_n
        fixed.append((n, "PaRIS", n, 1, 0, paris(n)))
        for sweeps, burnin in pairs(args.fixed_sweeps):
            fixed.append((n * sweeps, "PPG", n, sweeps, burnin, ppg(n, sweeps, burnin)))

    load_before = _common.load_average()
    rows, fixed_rows = [], []
    warm_keys = jax.random.split(jax.random.key(1), num_runs)
    done = {}  # a fixed-N row already run for a budget is not run again
    for index, (budget, name, num_particles, sweeps, burnin, run) in enumerate(configs + fixed):
        if (name, num_particles, sweeps, burnin) in done:
            fixed_rows.append(done[name, num_particles, sweeps, burnin])
            continue
        batch = jax.jit(jax.vmap(run))
        start = time.perf_counter()
        jax.block_until_ready(batch(warm_keys))  # compile and a first run
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        run_keys = jax.random.split(jax.random.key(100 * budget + sweeps), num_runs)
        estimates = np.asarray(jax.block_until_ready(batch(run_keys)), np.float64)
        seconds = time.perf_counter() - start
        error = estimates - exact
        bias, sd = error.mean(0), estimates.std(0, ddof=1)
        se, rmse = sd / np.sqrt(num_runs), np.sqrt(np.mean(error**2, 0))
        _common.log(f"{name} N={num_particles} sweeps={sweeps}: bias {bias}, sd {sd}, "
                    f"{seconds:.2f} s")
        cells = [budget, name, num_particles, f"{sweeps} ({burnin})" if name == "PPG" else "-"]
        for i in range(2):
            cells += [f"{bias[i]:+.3f} ± {se[i]:.3f}", f"{sd[i]:.3f}", f"{rmse[i]:.3f}"]
        cells += [f"{seconds:.2f}", f"{compile_s - seconds:.1f}"]
        (rows if index < len(configs) else fixed_rows).append(cells)
        done[name, num_particles, sweeps, burnin] = cells

    header = ["budget N·sweeps", "method", "N", "sweeps (burn-in)", "bias Σx (± se)", "sd Σx",
              "RMSE Σx", "bias Σx₋x (± se)", "sd Σx₋x", "RMSE Σx₋x", f"s ({num_runs} runs)",
              "compile s"]
    table = _common.markdown_table(header, "rlrl" + "r" * 8, rows) if rows else ""
    if fixed_rows:
        table += (f"\n\nFixed N = {args.fixed_n}: PPG's bias against its sweeps, PaRIS at the "
                  "same N first\n\n"
                  + _common.markdown_table(header, "rlrl" + "r" * 8, fixed_rows))
    body = (_common.results_heading("bench_ppg.py", _common.command_line(argv, "bench_ppg.py"),
                                    _common.versions(["numpyro", "equinox"]))
            + f"- machine: {_common.machine()}; load before the run {load_before}, after "
            f"{_common.load_average()}; threads: {'default' if args.threads == 'default' else 1}\n"
            f"- linear Gaussian 1-D (rho 0.9, sigma_x 1, sigma_y 1), T = {num_times}, "
            f"R = {num_runs} runs per row; exact E[Σx] = {exact[0]:.4f}, "
            f"E[Σ x_(t-1) x_t] = {exact[1]:.4f} (RTS); Ñ = 2 accept-reject backward draws; "
            "PPG's sweeps include its burn-in (left out of the average)\n\n" + table)
    return _common.report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
