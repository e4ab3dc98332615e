"""N-HARPG, N-PG-IGT and REINFORCE/GPOMDP (optax SGD): trajectories to a 1% optimality gap.

Problems (ppl_ext/optim/_pg_envs.py): `LinearQuadraticRegulator.small()` (scalar,
`γ = 0.5`, 12 steps a trajectory, optimum from the discrete Riccati equation) and
`TabularMDP.random(3)` (3 states, 2 actions, softmax policy, `γ = 0.5`, optimum by value
iteration). The objective is each problem's `px.expectation` trajectory program, with
`px.reinforce` action sites; `.grad` of it is GPOMDP (rewards-to-go, from ppl_ext's
dependency-graph Rao-Blackwellisation), `.hvp` the score-function Hessian-vector product.

Methods, each on the same objective: `px.optim.NormalisedHARPG` (2 trajectories a step),
`px.optim.NormalisedPGIGT` (1 a step) and REINFORCE/GPOMDP = `px.OptaxBackend(optax.sgd)`
(1 a step), all with the step schedule `s_t = s_0 · c / (t + c)` (`c = --offset`) and the
paper's default momentum weights. Equal trajectory budgets: every method runs
`budget // trajectories_per_step` steps. Step size tuned fairly: the same number of grid
values `s_0` per method (geometric, factor 2 or 3), the value with the smallest median
trajectories-to-gap chosen per method and problem (all grid values are reported too).

A run's trajectories to the gap: the first recorded point (every `--record-every`
trajectories) where the EXACT relative gap `(J* - J(θ)) / |J*|` (J from the Lyapunov
equation or the policy-evaluation linear solve, not an estimate) is at most 1%;
"not reached" runs count as infinite (medians and quartiles with them). Seeds: 20 (keys
`fold_in(key(seed_base), seed)`), the same keys for every method.

The runs are a `lax.scan` of the back-end's own `step`, vmapped over seeds and grid
values: the body `px.fit` compiles, without its host loop (px.fit runs one seed at a
time). No peer library: N-PG-IGT and N-HARPG have no public code.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

PINNED = pin_threads_unless_default(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ppl_ext as px  # noqa: E402
from _common import (  # noqa: E402
    command_line, load_average, log, machine, markdown_table, report, results_heading,
    versions)
from ppl_ext.optim import (  # noqa: E402
    LinearQuadraticRegulator, NormalisedHARPG, NormalisedPGIGT, TabularMDP,
    decaying_step_size)

GAP = 0.01


def problems(num_time_steps: int):
    lqr = LinearQuadraticRegulator.small(num_time_steps=num_time_steps)
    mdp = TabularMDP.random(3, num_time_steps=num_time_steps)
    return {
        "LQR (scalar)": (lqr, lqr.initial_gain(), lqr.optimal_value()),
        "tabular MDP (3x2)": (mdp, mdp.initial_logits(), mdp.optimal_value()),
    }


#: grids of s_0 per method and problem: 4 values each (geometric)
GRIDS = {
    "LQR (scalar)": {"N-HARPG": [0.01, 0.02, 0.05, 0.1], "N-PG-IGT": [0.01, 0.02, 0.05, 0.1],
                     "REINFORCE/GPOMDP (SGD)": [0.001, 0.003, 0.01, 0.03]},
    "tabular MDP (3x2)": {"N-HARPG": [0.05, 0.1, 0.2, 0.5],
                          "N-PG-IGT": [0.05, 0.1, 0.2, 0.5],
                          "REINFORCE/GPOMDP (SGD)": [1.0, 3.0, 10.0, 30.0]},
}


def backend(method: str, s0, offset: float):
    schedule = decaying_step_size(s0, offset)
    if method == "N-HARPG":
        return NormalisedHARPG(step_size=schedule), 2
    if method == "N-PG-IGT":
        return NormalisedPGIGT(step_size=schedule), 1
    return px.optim.OptaxBackend(optax.sgd(schedule)), 1


def run_method(env, params0, optimum, method, grid, num_seeds, budget, record_every, offset,
               seed_base):
    """Exact relative gaps `(len(grid), num_seeds, num_records)` and seconds (compile, run)."""
    program = env.objective()
    target = px.expectation(lambda p: -program.fn(p))  # minimised, as px.fit hands it over
    tps = backend(method, 1.0, offset)[1]
    steps_per_record = max(1, record_every // tps)
    num_records = budget // (steps_per_record * tps)

    def gap(params):
        return (optimum - env.value(params)) / abs(optimum)

    def one(s0, key):
        b, _ = backend(method, s0, offset)
        state = b.init(key, params0, target)

        def record(state, r):
            def body(i, state):
                step = r * steps_per_record + i
                return b.step(jax.random.fold_in(key, step), state, target)[0]

            state = jax.lax.fori_loop(0, steps_per_record, body, state)
            return state, gap(b.params(state))

        return jax.lax.scan(record, state, jnp.arange(num_records))[1]

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed_base), i))(
        jnp.arange(num_seeds))
    fn = jax.jit(jax.vmap(lambda s0: jax.vmap(lambda k: one(s0, k))(keys)))
    grid = jnp.asarray(grid, jnp.float32)
    start = time.perf_counter()
    compiled = fn.lower(grid).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    gaps = np.asarray(jax.block_until_ready(compiled(grid)))
    run_s = time.perf_counter() - start
    trajectories = (np.arange(num_records) + 1) * steps_per_record * tps
    return gaps, trajectories, compile_s, run_s


def to_gap(gaps, trajectories):
    """Trajectories at the first record with gap <= GAP (inf if never), per seed."""
    hit = gaps <= GAP
    first = np.argmax(hit, axis=-1)
    out = trajectories[first].astype(np.float64)
    return np.where(hit.any(-1), out, np.inf)


def to_stay(gaps, trajectories):
    """Trajectories from which the gap stays <= GAP to the end of the budget (inf if the
    last record is above it), per seed."""
    above = gaps > GAP
    num = gaps.shape[-1]
    last_above = num - 1 - np.argmax(above[..., ::-1], axis=-1)
    index = np.where(above.any(-1), last_above + 1, 0)
    out = trajectories[np.minimum(index, num - 1)].astype(np.float64)
    return np.where(index >= num, np.inf, out)


def quartiles(x):
    return np.percentile(x, [25, 50, 75], method="lower") if np.all(np.isfinite(x)) else \
        np.quantile(np.where(np.isfinite(x), x, np.inf), [0.25, 0.5, 0.75], method="lower")


def fmt_count(v):
    return "not reached" if not np.isfinite(v) else f"{int(v)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget", type=int, default=20000, help="trajectories per run")
    parser.add_argument("--record-every", type=int, default=100)
    parser.add_argument("--offset", type=float, default=100.0)
    parser.add_argument("--time-steps", type=int, default=12)
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--problems", default="all", help="all, lqr or mdp")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    load_before = load_average()
    rows, grid_rows, curves = [], [], {}
    for name, (env, params0, optimum) in problems(args.time_steps).items():
        if args.problems != "all" and args.problems.lower() not in name.lower():
            continue
        for method, grid in GRIDS[name].items():
            log(f"{name} / {method}: grid {grid} ...")
            gaps, trajectories, compile_s, run_s = run_method(
                env, params0, optimum, method, grid, args.seeds, args.budget,
                args.record_every, args.offset, args.seed_base)
            counts = to_stay(gaps, trajectories)  # (grid, seeds)
            firsts = to_gap(gaps, trajectories)
            medians = [np.quantile(c, 0.5, method="lower") for c in counts]
            best = int(np.argmin([(m, -np.isfinite(c).sum()) for m, c in
                                  zip(medians, counts)], axis=0)[0])
            for g, c, f in zip(grid, counts, firsts):
                grid_rows.append([name, method, f"{g:g}", fmt_count(np.quantile(
                    c, 0.5, method="lower")), f"{int(np.isfinite(c).sum())}/{len(c)}",
                    fmt_count(np.quantile(f, 0.5, method="lower"))])
            q = np.quantile(counts[best], [0.25, 0.5, 0.75], method="lower")
            first = np.quantile(firsts[best], 0.5, method="lower")
            final = np.median(gaps[best, :, -1])
            rows.append([name, method, f"{grid[best]:g}", *map(fmt_count, q),
                         f"{int(np.isfinite(counts[best]).sum())}/{args.seeds}",
                         fmt_count(first), f"{final:.2e}", f"{compile_s:.1f}",
                         f"{run_s:.1f}"])
            curves[(name, method)] = (trajectories, np.median(gaps[best], axis=0))
            log(f"  best s0 {grid[best]:g}: quartiles {q}, final median gap {final:.3g}, "
                f"compile {compile_s:.1f} s, run {run_s:.1f} s")
    command = command_line(argv, "benchmarks/bench_pg.py")
    body = results_heading("bench_pg.py", command, versions(["equinox", "optax", "numpyro"]))
    body += (f"- machine: {machine()}; load before the run {load_before}, after "
             f"{load_average()}; threads: {'1 (pinned)' if PINNED else 'default'}\n"
             f"- {args.seeds} seeds, budget {args.budget} trajectories per run (equal for every "
             f"method; N-HARPG samples 2 a step), exact relative gap recorded every "
             f"{args.record_every} trajectories; step schedule s_0 · c/(t + c), c = "
             f"{args.offset:g}, s_0 tuned on a 4-value grid per method (best median); "
             f"{args.time_steps} steps a trajectory, γ = 0.5\n"
             "- trajectories to a 1% gap, counted from where the exact gap stays at most 1% "
             "until the end of the budget: quartiles (25%, median, 75%) over seeds, "
             "\"not reached\" = still above 1% at the end; \"first hit\": median "
             "trajectories to the first record at most 1% (it may leave again); last column "
             "pair: compile and run seconds of the whole grid x seeds batch\n\n")
    body += markdown_table(
        ["problem", "method", "s_0", "q25", "median", "q75", "reached", "first hit",
         "final median gap", "compile s", "run s"], "lllrrrrrrrr", rows)
    body += ("\nAll grid values (median trajectories until the gap stays below 1%, runs "
             "that got there, median first hit):\n\n")
    body += markdown_table(["problem", "method", "s_0", "median", "reached", "first hit"],
                           "lllrrr", grid_rows)
    return report(body, args.no_results)


if __name__ == "__main__":
    raise SystemExit(main())
