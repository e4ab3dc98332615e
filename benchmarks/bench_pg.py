"""N-HARPG, N-PG-IGT and REINFORCE/GPOMDP (optax SGD): trajectories to a 1% optimality gap.

Problems (ppl_ext/optim/_pg_envs.py): `LinearQuadraticRegulator.small()` (scalar,
`γ = 0.5`, 12 steps a trajectory, optimum from the discrete Riccati equation) and
`TabularMDP.random(3)` (3 states, 2 actions, softmax policy, `γ = 0.5`, optimum by value
iteration). The objective is each problem's `px.expectation` trajectory program, with
`px.reinforce` action sites; `.grad` of it is GPOMDP (rewards-to-go, from ppl_ext's
dependency-graph Rao-Blackwellisation), `.hvp` the score-function Hessian-vector product.

Methods, each on the same objective: `px.optim.NormalisedHARPG` (2 trajectories a step),
`px.optim.NormalisedPGIGT` (1 a step) and REINFORCE/GPOMDP = `px.OptaxBackend(optax.sgd)`
(1 a step), all with the step schedule `s_t = s_0 · c / (t + c)` and the paper's default
momentum weights (`η_t = 2/(t + 2)` for N-HARPG, `(2/(t + 2))^{4/5}` for N-PG-IGT;
`--coupled` uses `c` in them too). Equal trajectory budgets: every method runs
`budget // trajectories_per_step` steps; `--batch B` averages B trajectories in every
gradient (and Hessian-vector product) estimate, for every method alike, so it divides
the number of steps by B. Step size tuned fairly: `(s_0, c)` on the same grid for every
method (`GRID_SIZE` values of `s_0`, a factor 2 apart, centred on the method's scale,
times `--offsets`), the pair with the smallest median trajectories-to-gap chosen per
method and problem (ties: more runs that reached the gap); the best `s_0` of every `c`
and the medians over the whole `s_0` grid are reported too.

A run's trajectories to the gap: the first recorded point (every `--record-every`
trajectories) from which the EXACT relative gap `(J* - J(θ)) / |J*|` (J from the Lyapunov
equation or the policy-evaluation linear solve, not an estimate) stays at most 1% until
the end of the budget ("first hit": the first record at most 1%); runs that end above it
count as infinite (medians and quartiles with them). Seeds: 20 (keys
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
    LinearQuadraticRegulator, NormalisedHARPG, NormalisedPGIGT, TabularMDP)

GAP = 0.01


def problems(num_time_steps: int):
    lqr = LinearQuadraticRegulator.small(num_time_steps=num_time_steps)
    mdp = TabularMDP.random(3, num_time_steps=num_time_steps)
    return {
        "LQR (scalar)": (lqr, lqr.initial_gain(), lqr.optimal_value()),
        "tabular MDP (3x2)": (mdp, mdp.initial_logits(), mdp.optimal_value()),
    }


#: grids of s_0 per method and problem: the same density for every method, 14 values a
#: factor 2 apart (a range of 2^13 ≈ 8,000, wide enough that no method's best (s_0, c) is
#: at an edge), centred on each method's scale (the normalised methods move by s_t per
#: step, SGD by s_t times the gradient)
GRID_SIZE = 14


def geometric(lowest: float, size: int = GRID_SIZE) -> list[float]:
    return [lowest * 2.0 ** k for k in range(size)]


GRIDS = {
    "LQR (scalar)": {"N-HARPG": geometric(0.000078125), "N-PG-IGT": geometric(0.000078125),
                     "REINFORCE/GPOMDP (SGD)": geometric(0.000015625)},
    "tabular MDP (3x2)": {"N-HARPG": geometric(0.00078125), "N-PG-IGT": geometric(0.00078125),
                          "REINFORCE/GPOMDP (SGD)": geometric(0.015625)},
}


class Batched:
    """The mean of `num_samples` independent copies of an objective (and of its `hvp`):
    an unbiased estimate from `num_samples` trajectories, for every method alike."""

    def __init__(self, objective, num_samples: int):
        self.objective, self.num_samples = objective, num_samples

    def _keys(self, key):
        return jax.random.split(key, self.num_samples)

    def __call__(self, key, params):
        if self.num_samples == 1:
            return self.objective(key, params)
        return jnp.mean(jax.vmap(lambda k: self.objective(k, params))(self._keys(key)))

    def hvp(self, key, params, v):
        if self.num_samples == 1:
            return self.objective.hvp(key, params, v=v)
        out = jax.vmap(lambda k: self.objective.hvp(k, params, v=v))(self._keys(key))
        return jax.tree.map(lambda x: jnp.mean(x, axis=0), out)


def backend(method: str, s0, offset, coupled: bool = False):
    """The back-end and its trajectories per step (per sample of the batch); `s0` and the
    offset `c` of the schedule `s_0 · c/(t + c)` may be traced (vmapped grids). `coupled`:
    the momentum weights use `c` too (`η_t = (c/(t + c))^p`, `p = 1` for N-HARPG, `4/5` for
    N-PG-IGT; the paper's `2/(t + 2)` forms are `c = 2`), which keeps the ratio
    `γ_t / η_t` that the paper's theorems fix."""
    def schedule(t):  # decaying_step_size(s0, offset), with traced s0 and offset
        return s0 * offset / (jnp.asarray(t, jnp.float32) + offset)

    if method == "N-HARPG":
        momentum = (lambda t: offset / (t + offset)) if coupled else None
        return NormalisedHARPG(step_size=schedule, momentum=momentum), 2
    if method == "N-PG-IGT":
        momentum = (lambda t: (offset / (t + offset)) ** 0.8) if coupled else None
        return NormalisedPGIGT(step_size=schedule, momentum=momentum), 1
    return px.optim.OptaxBackend(optax.sgd(schedule)), 1


def run_method(env, params0, optimum, method, grid, offsets, num_seeds, budget, record_every,
               seed_base, batch=1, coupled=False):
    """Exact relative gaps `(len(offsets), len(grid), num_seeds, num_records)`, the
    trajectories at each record, and seconds (compile, run)."""
    program = env.objective()
    target = Batched(px.expectation(lambda p: -program.fn(p)), batch)  # minimised
    tps = backend(method, 1.0, 1.0)[1] * batch
    steps_per_record = max(1, record_every // tps)
    num_records = budget // (steps_per_record * tps)

    def gap(params):
        return (optimum - env.value(params)) / abs(optimum)

    def one(s0, offset, key):
        b, _ = backend(method, s0, offset, coupled)
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
    fn = jax.jit(jax.vmap(jax.vmap(lambda s0, c: jax.vmap(lambda k: one(s0, c, k))(keys),
                                   in_axes=(0, None)), in_axes=(None, 0)))
    grid = jnp.asarray(grid, jnp.float32)
    offsets = jnp.asarray(offsets, jnp.float32)
    start = time.perf_counter()
    compiled = fn.lower(grid, offsets).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    gaps = np.asarray(jax.block_until_ready(compiled(grid, offsets)))
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
    parser.add_argument("--offsets", default="2,20,100",
                        help="offsets c of the schedule s_0 c/(t + c), tuned with s_0")
    parser.add_argument("--time-steps", type=int, default=12)
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--problems", default="all", help="all, lqr or mdp")
    parser.add_argument("--batch", type=int, default=1,
                        help="trajectories averaged per gradient (and per HVP) estimate, "
                             "every method alike")
    parser.add_argument("--coupled", action="store_true",
                        help="momentum weights with the step schedule's offset c")
    parser.add_argument("--methods", default="all", help="all or a comma list of substrings")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    load_before = load_average()
    rows, grid_rows, curves = [], [], {}
    for name, (env, params0, optimum) in problems(args.time_steps).items():
        if args.problems != "all" and args.problems.lower() not in name.lower():
            continue
        for method, grid in GRIDS[name].items():
            if args.methods != "all" and not any(
                    m.strip().lower() in method.lower() for m in args.methods.split(",")):
                continue
            offsets = [float(c) for c in args.offsets.split(",")]
            log(f"{name} / {method}: grid {grid} x offsets {offsets} ...")
            gaps, trajectories, compile_s, run_s = run_method(
                env, params0, optimum, method, grid, offsets, args.seeds, args.budget,
                args.record_every, args.seed_base, args.batch, args.coupled)
            counts = to_stay(gaps, trajectories)  # (offsets, grid, seeds)
            firsts = to_gap(gaps, trajectories)
            medians = np.quantile(counts, 0.5, axis=-1, method="lower")
            reached = np.isfinite(counts).sum(-1)
            # best: smallest median, then most runs that got there
            order = np.lexsort((-reached.ravel(), medians.ravel()))
            bc, bg = np.unravel_index(order[0], medians.shape)
            for ci, c in enumerate(offsets):
                gi = int(np.lexsort((-reached[ci], medians[ci]))[0])
                grid_rows.append([name, method, f"{c:g}", f"{grid[gi]:g}",
                                  fmt_count(medians[ci, gi]), f"{int(reached[ci, gi])}/"
                                  f"{args.seeds}", fmt_count(np.quantile(
                                      firsts[ci, gi], 0.5, method="lower")),
                                  ", ".join(fmt_count(m).replace("not reached", "—")
                                            for m in medians[ci])])
            q = np.quantile(counts[bc, bg], [0.25, 0.5, 0.75], method="lower")
            first = np.quantile(firsts[bc, bg], 0.5, method="lower")
            final = np.median(gaps[bc, bg, :, -1])
            rows.append([name, method, f"{grid[bg]:g}", f"{offsets[bc]:g}", *map(fmt_count, q),
                         f"{int(reached[bc, bg])}/{args.seeds}",
                         fmt_count(first), f"{final:.2e}", f"{compile_s:.1f}",
                         f"{run_s:.1f}"])
            curves[(name, method)] = (trajectories, np.median(gaps[bc, bg], axis=0))
            log(f"  best s0 {grid[bg]:g}, c {offsets[bc]:g}: quartiles {q}, reached "
                f"{int(reached[bc, bg])}, final median gap {final:.3g}, "
                f"compile {compile_s:.1f} s, run {run_s:.1f} s")
    command = command_line(argv, "benchmarks/bench_pg.py")
    body = results_heading("bench_pg.py", command, versions(["equinox", "optax", "numpyro"]))
    body += (f"- machine: {machine()}; load before the run {load_before}, after "
             f"{load_average()}; threads: {'1 (pinned)' if PINNED else 'default'}\n"
             f"- {args.seeds} seeds, budget {args.budget} trajectories per run (equal for every "
             f"method; N-HARPG samples 2 a step), exact relative gap recorded every "
             f"{args.record_every} trajectories; step schedule s_0 · c/(t + c), c in "
             f"{{{args.offsets}}}, momentum weights "
             f"{'coupled, (c/(t + c))^p' if args.coupled else 'the paper defaults'}; "
             f"batch {args.batch} trajectories per estimate; (s_0, c) tuned per method and "
             f"problem on a {GRID_SIZE}-value grid of s_0 (factor 2) times the c values "
             "(best median, then most runs reaching the gap); "
             f"{args.time_steps} steps a trajectory, γ = 0.5\n"
             "- trajectories to a 1% gap, counted from where the exact gap stays at most 1% "
             "until the end of the budget: quartiles (25%, median, 75%) over seeds, "
             "\"not reached\" = still above 1% at the end; \"first hit\": median "
             "trajectories to the first record at most 1% (it may leave again); last column "
             "pair: compile and run seconds of the whole grid x seeds batch\n\n")
    body += markdown_table(
        ["problem", "method", "s_0", "c", "q25", "median", "q75", "reached", "first hit",
         "final median gap", "compile s", "run s"], "llllrrrrrrrr", rows)
    body += ("\nPer offset c: the best s_0, its median trajectories until the gap stays "
             "below 1%, runs that got there, median first hit, and the medians over the "
             "whole s_0 grid (smallest s_0 first; — = not reached):\n\n")
    body += markdown_table(["problem", "method", "c", "best s_0", "median", "reached",
                            "first hit", "medians over the s_0 grid"], "lllrrrrl", grid_rows)
    return report(body, args.no_results)


if __name__ == "__main__":
    raise SystemExit(main())
