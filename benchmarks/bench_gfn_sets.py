"""GFlowNets on the FL paper's set generation: FL-DB against DB and TB (`px.gfn`).

Usage:
    .venv/bin/python benchmarks/bench_gfn_sets.py [--sizes small,medium] [--seeds 3]
        [--steps 10000] [--quick] [--threads 1|default] [--no-results]

The check of issue 12: on the set-generation task of Pan, Malkin, Zhang, Bengio (2023),
"Better training of GFlowNets with local credit and incomplete trajectories" (ICML),
with the authors' per-element energies (`px.gfn.SetGeneration.fl_paper`), train FL-DB, DB
and TB for 10,000 steps of batch 16 and record, at checkpoints, the FL paper's metric:
the mean reward `R(x) = exp(−Σ_{i∈x} e_i)` of the 100 best *distinct* sets among all
sets sampled so far by the evaluation draws. As in the authors' code
(ling-pan/FL-GFN, `set/gflownet.py`), every training step is accompanied by an
evaluation draw of 16 on-policy sets (no exploration, temperature 1); here the draws
of 10 steps are made at once, 160 sets with the parameters after the 10th step (a
`px.fit` callback every chunk of 10 steps).

Beside it: the exact optimum of the metric (the mean reward of the 100 best sets of the
universe, `SetGeneration.top_log_rewards`, exact, no enumeration of sets) and the
`|log Z − log Z*|` of the learned log Z (TB's `log_z`; DB's and FL-DB's `log F(s0)`,
also `params["log_z"]`) against the exact `log Z*` (`SetGeneration.log_partition`, a DP).

Settings from the authors' code: MLPs with 2 hidden layers of 256 (theirs: one shared
LeakyReLU trunk with forward, backward and flow heads; here `px.gfn.MLPPolicy`'s
separate ReLU networks for the forward policy, the learned backward policy and the
state flow), Adam with learning rate 1e-3 and 0.1 for log Z (theirs: 0.1 for TB's Z; for
DB their `log F(s0)` is a network output: here the same 0.1 as TB's, for a usable log Z
estimate), batch 16, the exploration weights their grid search chose: small: FL-DB 1.0,
DB 1.0, TB 0.0; medium: FL-DB 0.5, DB 1.0, TB 0.0625; large: FL-DB 0.5, DB 1.0, TB 0.0
(ε-uniform exploration of the training trajectories: ε = 1 trains on uniformly random
sets, the evaluation draws are on-policy). One difference in the environment: ours has
an explicit exit action (its probability is 1 at a full set, so the terminal flow is
`R(x)` as theirs).

Terminal flows: a full set's flow is pinned to `R(x)` in DB and FL-DB (`F̃(x) = 1`), as
the FL reparameterisation requires and as the authors' DB does (it replaces the last
flow by the reward). The authors' FL-DB code (`learn_from_fl`) instead keeps the
network's `F̃(x)` at full sets free, so its fixed points sample `F̃(x) R(x)` for any
`F̃`, not `R`; that variant is not run here. Their reward has no temperature (`R(x) =
exp(−E(x))`), as here, and their metric is the mean of the 100 largest rewards among
the distinct evaluation sets so far, unnormalised; it is reported here as a fraction
of its exact optimum.

There is no peer library here (the authors' code is a PyTorch script, not a package):
the comparison is between the objectives, all on `px.gfn`. Seeds and sizes interleaved:
for each seed, each size, each method in turn. Timing: training wall time per run
(`px.fit`'s, without compilation) and compile time, medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

PINNED = pin_threads_unless_default(sys.argv)  # before jax or numpy are imported

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HIDDEN, BATCH, LEARNING_RATE, LOG_Z_LEARNING_RATE, NUM_TOP = 256, 16, 1e-3, 0.1, 100
#: the authors' exploration weights (set/gflownet.py, chosen there by grid search)
EXPLORATION = {
    "small": {"FL-DB": 1.0, "DB": 1.0, "TB": 0.0},
    "medium": {"FL-DB": 0.5, "DB": 1.0, "TB": 0.0625},
    "large": {"FL-DB": 0.5, "DB": 1.0, "TB": 0.0},
}
METHODS = ("FL-DB", "DB", "TB")


def top_k_unique(states, energies, num_top=NUM_TOP):
    """The mean reward of the `num_top` best distinct rows of `states` (float64)."""
    import numpy as np

    unique = np.unique(np.packbits(states.astype(bool), axis=1), axis=0)
    rows = np.unpackbits(unique, axis=1)[:, : states.shape[1]].astype(np.float64)
    log_rewards = -rows @ energies
    best = np.sort(log_rewards)[::-1][:num_top]
    return float(np.exp(best).mean())


def exact_sampler_draws(energies, set_size, num_samples, seed):
    """`num_samples` sets drawn exactly from `R(x)/Z` (a perfect sampler), by the DP of
    elementary symmetric polynomials: element `i` joins with probability
    `w_i e_{r−1}(w_{i+1..}) / e_r(w_{i..})`, `r` the number of elements still to take."""
    import numpy as np

    log_w = -np.asarray(energies, np.float64)
    size = len(log_w)
    log_e = np.full((size + 1, set_size + 1), -np.inf)
    log_e[size, 0] = 0.0
    for i in range(size - 1, -1, -1):
        log_e[i, 0] = 0.0
        log_e[i, 1:] = np.logaddexp(log_e[i + 1, 1:], log_w[i] + log_e[i + 1, :-1])
    rng = np.random.default_rng(seed)
    remaining = np.full(num_samples, set_size)
    states = np.zeros((num_samples, size), np.int8)
    for i in range(size):
        take = remaining > 0
        log_p = np.where(take, log_w[i] + log_e[i + 1, np.maximum(remaining - 1, 0)]
                         - log_e[i, remaining], -np.inf)
        chosen = rng.random(num_samples) < np.exp(log_p)
        states[:, i] = chosen
        remaining = remaining - chosen
    assert np.all(remaining == 0)
    return states


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,medium", help="comma-separated: small, medium, "
                                                             "large")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--checkpoints", default="1000,2000,3000,4000,5000,6000,7000,8000,9000,"
                                            "10000")
    p.add_argument("--eval-every", type=int, default=10,
                   help="steps per chunk; 16 evaluation sets per step drawn at its end")
    p.add_argument("--quick", action="store_true", help="small only, 500 steps, one seed")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--reuse-log", default=None,
                   help="a log (stderr) of an earlier run of this script with the same "
                        "settings: its finished runs are reused, not run again")
    args = p.parse_args(argv)
    for path in (HERE, ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import equinox as eqx
    import jax
    import numpy as np
    import optax

    import ppl_ext as px
    from _common import (command_line, load_average, log, machine, markdown_table, report,
                         results_heading, versions)
    from ppl_ext import gfn

    command = command_line(argv, "benchmarks/bench_gfn_sets.py")
    load_before = load_average()
    log(f"# {command}; load {load_before}")
    sizes = ["small"] if args.quick else args.sizes.split(",")
    methods = args.methods.split(",")
    seeds = 1 if args.quick else args.seeds
    steps = min(args.steps, 500) if args.quick else args.steps
    checkpoints = [c for c in map(int, args.checkpoints.split(",")) if c <= steps]
    if args.quick:
        checkpoints = [100, 250, 500]
    if steps not in checkpoints:
        checkpoints.append(steps)
    if any(c % args.eval_every for c in checkpoints):
        raise SystemExit("--checkpoints must be multiples of --eval-every")
    for s in sizes:
        if s not in EXPLORATION:
            raise SystemExit(f"--sizes: small, medium or large, got {s!r}")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: a subset of {METHODS}, got {m!r}")

    sample = gfn.sample_trajectories  # jitted inside

    def optimizer(params):
        labels = {name: ("log_z" if name == "log_z" else "net") for name in params}
        return px.optim.OptaxBackend(optax.multi_transform(
            {"net": optax.adam(LEARNING_RATE), "log_z": optax.adam(LOG_Z_LEARNING_RATE)},
            labels))

    def run(size, method, seed):
        env = gfn.SetGeneration.fl_paper(size)
        energies = np.asarray(env.energies, np.float64)
        policy = gfn.MLPPolicy(env, hidden_sizes=(HIDDEN, HIDDEN), learned_backward=True)
        params = policy.init(jax.random.key(seed), log_flow=method != "TB")
        exploration = EXPLORATION[size][method]
        make = {"FL-DB": gfn.forward_looking_detailed_balance, "DB": gfn.detailed_balance,
                "TB": gfn.trajectory_balance}[method]
        loss = make(policy, num_samples=BATCH, exploration=exploration)
        backend = optimizer(params)
        drawn, curve, errors = [], {}, {}
        log_z_exact = float(env.log_partition())
        eval_key = jax.random.key(10_000 + seed)
        num_eval = BATCH * args.eval_every

        def callback(step, state, history):
            batch = sample(jax.random.fold_in(eval_key, step), policy, backend.params(state),
                           num_eval)
            drawn.append(np.asarray(batch.terminal_state, np.int8))
            if step in checkpoints:
                curve[step] = top_k_unique(np.concatenate(drawn), energies)
                log_z = float(backend.params(state)["log_z"])
                errors[step] = abs(log_z - log_z_exact)
                log(f"    {size} {method} seed {seed} step {step}: top-{NUM_TOP} "
                    f"{curve[step]:.6g}, |log Z err| {errors[step]:.4g}; load "
                    f"{load_average()}")

        start = time.perf_counter()
        result = px.fit(loss, params, backend, steps, jax.random.key(seed), maximize=False,
                        progress=False, chunk_size=args.eval_every, callbacks=callback)
        total = time.perf_counter() - start
        log_z_error = abs(float(result.params["log_z"]) - log_z_exact)
        return {"curve": curve, "log_z_error": log_z_error, "errors": errors,
                "train_s": float(result.history.wall_time[-1]),
                "compile_s": float(result.history.compile_time), "total_s": total,
                "num_distinct": len(np.unique(np.concatenate(drawn), axis=0))}

    optimum = {}
    for size in sizes:
        env = gfn.SetGeneration.fl_paper(size)
        optimum[size] = float(np.exp(np.asarray(env.top_log_rewards(NUM_TOP),
                                                np.float64)).mean())
        log(f"{size}: exact top-{NUM_TOP} mean reward {optimum[size]:.6g}, log Z "
            f"{float(env.log_partition()):.4f}")
    reused = {}
    if args.reuse_log:
        import re

        pattern = re.compile(r"^\s+(\w+) ([\w-]+) seed (\d+): top-100 (.*?); \|log Z err\| "
                             r"([\d.]+) \(at checkpoints (.*?)\); train ([\d.]+) s "
                             r"\(\+([\d.]+) s compile, ([\d.]+) s.*load ([\d.]+)")
        for line in Path(args.reuse_log).read_text().splitlines():
            match = pattern.match(line)
            if match:
                size, method, seed, curve, error, errors, train, compile_s, total, load = \
                    match.groups()
                curve = {int(c): float(v) for c, v in
                         (item.split(":") for item in curve.split())}
                errors = {int(c): float(v) for c, v in
                          (item.split(":") for item in errors.split())}
                if sorted(curve) == sorted(checkpoints):
                    reused[size, method, int(seed)] = {
                        "curve": curve, "log_z_error": float(error), "errors": errors,
                        "train_s": float(train), "compile_s": float(compile_s),
                        "total_s": float(total), "load": load}
        log(f"reusing {len(reused)} finished runs from {args.reuse_log}")
    results = {(s, m): [] for s in sizes for m in methods}
    for seed in range(seeds):  # interleaved
        for size in sizes:
            for method in methods:
                if (size, method, seed) in reused:
                    results[size, method].append(reused[size, method, seed])
                    continue
                out = run(size, method, seed)
                results[size, method].append(out)
                log(f"  {size} {method} seed {seed}: top-{NUM_TOP} "
                    + " ".join(f"{c}:{out['curve'][c]:.5g}" for c in checkpoints)
                    + f"; |log Z err| {out['log_z_error']:.3f} (at checkpoints "
                    + " ".join(f"{c}:{out['errors'][c]:.4g}" for c in checkpoints)
                    + f"); train {out['train_s']:.1f} s "
                    f"(+{out['compile_s']:.1f} s compile, {out['total_s']:.1f} s with "
                    f"evaluation draws); load {load_average()}")

    curve_rows, summary_rows, error_rows = [], [], []
    for size in sizes:
        env = gfn.SetGeneration.fl_paper(size)
        energies = np.asarray(env.energies, np.float64)
        perfect = []
        for seed in range(seeds):
            draws = exact_sampler_draws(energies, env.set_size, steps * BATCH, seed)
            perfect.append({c: top_k_unique(draws[: c * BATCH], energies)
                            for c in checkpoints})
        curve_rows.append([size, "exact sampler of R/Z"] + [
            f"{statistics.median(q[c] for q in perfect) / optimum[size]:.4f}"
            for c in checkpoints])
        for method in methods:
            runs = results[size, method]
            curve_rows.append([size, method] + [
                f"{statistics.median(r['curve'][c] for r in runs) / optimum[size]:.4f}"
                for c in checkpoints])
            error_rows.append([size, method] + [
                f"{statistics.median(r['errors'][c] for r in runs):.3f}" for c in checkpoints])
        medians = {m: [statistics.median(r["curve"][c] for r in results[size, m])
                       for c in checkpoints] for m in methods}
        for method in methods:
            runs = results[size, method]
            final = [r["curve"][checkpoints[-1]] for r in runs]
            seeds_all = {m: sum(all(a["curve"][c] > b["curve"][c] for c in checkpoints)
                                for a, b in zip(results[size, "FL-DB"], results[size, m]))
                         for m in methods if m != "FL-DB"} if "FL-DB" in methods else {}
            beats = ("n/a" if method != "FL-DB" else " and ".join(
                f"{m}: {sum(a > b for a, b in zip(medians['FL-DB'], medians[m]))}/"
                f"{len(checkpoints)} (all, in {seeds_all[m]}/{len(runs)} seeds)"
                for m in methods if m != "FL-DB"))
            summary_rows.append([
                size, method, f"{optimum[size]:.6g}", f"{statistics.median(final):.6g}",
                f"{100 * (1 - statistics.median(final) / optimum[size]):.3f}%",
                f"{100 * (1 - min(final) / optimum[size]):.3f}%",
                f"{statistics.median(r['log_z_error'] for r in runs):.3f}",
                f"{max(r['log_z_error'] for r in runs):.3f}", beats,
                f"{statistics.median(r['train_s'] for r in runs):.1f}",
                f"{statistics.median(r['compile_s'] for r in runs):.1f}"])
    body = (
        results_heading("bench_gfn_sets.py", command, versions(("equinox", "optax")))
        + f"- machine: {machine()}; load before the run {load_before}, after "
        f"{load_average()}; threads: {args.threads}; seeds: {seeds}; {steps} steps of batch "
        f"{BATCH}{' (QUICK)' if args.quick else ''}"
        + (f"; {len(reused)} runs reused from the log of an earlier run with the same "
           f"settings (`--reuse-log`; 1-minute load averages at the end of those runs: "
           f"{', '.join(r['load'] for r in reused.values())})" if reused else "")
        + "\n"
        "- the FL paper's set generation (authors' energies), FL-DB / DB / TB on px.gfn, "
        "MLPs 2 x 256 (separate forward, learned backward, flow), Adam 1e-3 (log Z 0.1), "
        "the authors' exploration weights (small: FL-DB 1.0, DB 1.0, TB 0; medium: 0.5, "
        "1.0, 0.0625; large: 0.5, 1.0, 0); metric: mean reward of the 100 best distinct "
        f"sets among {BATCH} on-policy evaluation sets per step so far (the authors' "
        "`mean_top_k_R`)\n"
        "- top-100 mean reward at the checkpoints (steps), median over seeds, as a fraction "
        "of the exact optimum (the mean reward of the universe's 100 best sets); 'exact "
        "sampler of R/Z': the same metric for a perfect GFlowNet, on as many sets drawn "
        "exactly from R/Z (DP over the elements), one draw per seed\n\n"
        + markdown_table(["size", "method", *map(str, checkpoints)],
                         "ll" + "r" * len(checkpoints), curve_rows) + "\n\n"
        "- |log Z − log Z*| at the checkpoints (learned log Z: TB's `log_z`, DB's and "
        "FL-DB's `log F(s0)`; exact log Z* by DP), median over seeds\n\n"
        + markdown_table(["size", "method", *map(str, checkpoints)],
                         "ll" + "r" * len(checkpoints), error_rows) + "\n\n"
        "- summary: exact optimum; final top-100 mean reward (median over seeds); its gap "
        "to the optimum, median and worst seed; |log Z − log Z*| at the end (exact log Z* "
        "by DP), median and worst; checkpoints where FL-DB's median beats each other "
        "method's (and the seeds where FL-DB's own run beats that seed's run at every "
        "checkpoint); training seconds per run (px.fit wall time without compilation, "
        "evaluation draws excluded) and compile seconds, medians\n\n"
        + markdown_table(["size", "method", "optimum", "final top-100", "gap (median)",
                          "gap (worst)", "log Z abs. error (median)", "log Z abs. error (worst)",
                          "FL-DB beats", "train s", "compile s"],
                         "llrrrrrrlrr", summary_rows) + "\n")
    log(body)
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
