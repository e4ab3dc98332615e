"""Consensus-based optimisation: `px.optim.CBO` against CBXpy (`cbx`) on Rastrigin and Ackley.

Usage:
    .venv/bin/pip install cbx==1.0.4          # the peer (NumPy; `make benchmarks` does it)
    .venv/bin/python benchmarks/bench_cbo.py [--quick] [--threads 1|default] [--no-results]
    .venv/bin/python benchmarks/bench_cbo.py --curves [--quick] [--runs M] [--steps K]
    .venv/bin/python benchmarks/bench_cbo.py --noise [--quick] [--runs M] [--steps K]

Speed (default): CBXpy's own success-rate example (issue 15): Rastrigin in d = 20 (the
standard, unnormalised one, 10 d + Σ (x² - 10 cos 2πx), global minimum 0 at the origin),
N = 40 particles, anisotropic noise, α = 30, σ = 10.1, dt = 0.01, λ = 1, 5,000 steps,
x0 uniform on [-3, 3]^d, M = 100 independent runs. A run succeeds when its best particle
is within 0.25 of the origin in max-norm.

Both libraries run all M runs at once, the same algorithm (CBXpy's update
x ← x - λ dt (x - m) + σ √dt (x - m) ⊙ ξ with the logsumexp-weighted consensus m, the
best particle tracked from the evaluated cloud): CBXpy on its (M, N, d) ensemble (float64,
NumPy), ppl_ext as a `jax.vmap` over runs of `lax.scan` over the kernel's `step` (the kernel
protocol: no `px.fit`, whose host loop serves one run; float32). Evaluations per step and
run: CBXpy N; ppl_ext N + 1 (the step's `info.value`, an estimate at `params(state)`). The
same objective function is given to both (CBXpy with `f_dim="3D"`). CBXpy runs with
`optimize(sched=None)`, a constant α like ours: its default scheduler multiplies α by 1.05
every step (up to 1e5), a different algorithm (the bench_cbo.py sections of RESULTS.md
before 2026-12-06T03:20 used that default). A second ppl_ext row runs
`CBO(increments="quantised")`: each ξ one of 256 equiprobable levels (the N(0, 1)
quantiles rescaled to variance 1; the weak-order-1 simplified Euler scheme), one random
byte a coordinate instead of a normal draw; its successes are reported beside the
Gaussian ones, since "at equal success" is the claim. A further row is the
same dynamics written by hand as one fused JAX scan over (M, N, d) arrays (no kernel
protocol, no extra evaluation): the floor of JAX on this CPU, to show what the kernel
protocol costs. Times: median over `--repeats` interleaved repeats of a whole batch (all
M runs, all steps) after a warm-up call, also per run (batch time / M), and the
process CPU time of each call (less sensitive to the load of a shared machine than wall
time); compile time apart. The machine is shared: XLA and NumPy (OpenBLAS/MKL/OMP) are
pinned to one thread by default (`--threads 1`, set before jax and numpy are imported);
`--threads default` leaves them.

Noise (`--noise`): the CPU time per step of the step's Gaussian noise alone, by PRNG
implementation (threefry in both layouts, philox, threefry4x32, rbg, unsafe_rbg), drawn
one step or several steps at a time, of the uniform bits alone, and of the hand-fused step
with and without the noise: where a step's time goes.

Curves (`--curves`): success rate against N for Ackley in d = 20 and Rastrigin in d = 50,
the same settings otherwise (α = 30, σ = 10.1, dt = 0.01, anisotropic, x0 uniform on
[-3, 3]^d, success: best particle within 0.25 of the origin in max-norm), M runs per point
for each library, equal steps (so equal evaluations up to ppl_ext's one extra per step);
a table with binomial standard errors and a plot saved to docs/assets/cbo_success_rates.png.
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

from _common import (  # noqa: E402
    command_line, load_average, log, machine, markdown_table, report, results_heading,
    versions,
)

D, N, ALPHA, SIGMA, DT, STEPS, RUNS, LOW, HIGH = 20, 40, 30.0, 10.1, 0.01, 5000, 100, -3.0, 3.0
TOLERANCE = 0.25
#: (problem, d, the numbers of particles N): Ackley succeeds from N = 10 on, so smaller N
CURVE_PROBLEMS = (("Ackley", 20, (2, 3, 5, 10, 20)), ("Rastrigin", 50, (10, 20, 40, 80)))
PEER = "CBXpy (cbx.dynamics.CBO)"
OURS = "ppl_ext (px.optim.CBO, kernel step)"
OURS_QUANTISED = "ppl_ext (px.optim.CBO, kernel step, increments='quantised')"
FUSED = "hand-fused JAX scan (floor)"


def rastrigin_numpy(x):
    """(M, N, d) -> (M, N), for CBXpy."""
    return 10.0 * x.shape[-1] + np.sum(x**2 - 10.0 * np.cos(2 * np.pi * x), axis=-1)


def rastrigin_jax(key, x):
    """One particle's value (the key is unused: a deterministic objective)."""
    return 10.0 * x.shape[-1] + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))




def ackley_numpy(x):
    """(M, N, d) -> (M, N), for CBXpy: the standard Ackley function, minimum 0 at 0."""
    d = x.shape[-1]
    return (-20.0 * np.exp(-0.2 * np.sqrt(np.sum(x**2, -1) / d))
            - np.exp(np.sum(np.cos(2 * np.pi * x), -1) / d) + 20.0 + np.e)


def ackley_jax(key, x):
    d = x.shape[-1]
    return (-20.0 * jnp.exp(-0.2 * jnp.sqrt(jnp.sum(x**2) / d))
            - jnp.exp(jnp.sum(jnp.cos(2 * jnp.pi * x)) / d) + 20.0 + jnp.e)


OBJECTIVES = {"Rastrigin": (rastrigin_jax, rastrigin_numpy), "Ackley": (ackley_jax, ackley_numpy)}


def _compiled(fn, runs):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(jax.random.split(jax.random.key(0), runs)).compile()
    compile_time = time.perf_counter() - start

    def call(seed):
        best = compiled(jax.random.split(jax.random.key(seed), runs))
        return np.asarray(jax.block_until_ready(best))

    return call, compile_time


def ppl_ext_runner(objective, d, n, steps, runs, increments="gaussian"):
    """All `runs` runs at once: `vmap` over runs of `lax.scan` over `CBO.step`."""
    from ppl_ext.optim import CBO

    backend = CBO(num_particles=n, alpha=ALPHA, sigma=SIGMA, dt=DT, noise="anisotropic",
                  init_bounds=(LOW, HIGH), estimate="best", increments=increments)

    def one_run(key):
        key_init, key_steps = jax.random.split(key)
        state = backend.init(key_init, jnp.zeros(d), objective)

        def body(state, k):
            state, _ = backend.step(k, state, objective)
            return state, None

        state, _ = jax.lax.scan(body, state, jax.random.split(key_steps, steps))
        return state.best_params

    return _compiled(jax.vmap(one_run), runs)


def fused_runner(objective, d, n, steps, runs):
    """The same dynamics by hand: one scan over (M, N, d) arrays, N evaluations per step."""
    value = jax.vmap(jax.vmap(lambda x: objective(None, x)))

    def batch(keys):
        x = jax.vmap(lambda k: jax.random.uniform(k, (n, d), minval=LOW, maxval=HIGH))(keys)

        def body(carry, key):
            x, best, best_value = carry
            f = value(x)
            logits = -ALPHA * f
            w = jnp.exp(logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True))
            drift = x - jnp.einsum("mn,mnd->md", w, x)[:, None]
            i = jnp.argmin(f, -1)
            f_i = jnp.take_along_axis(f, i[:, None], 1)[:, 0]
            better = f_i < best_value
            best = jnp.where(better[:, None], jnp.take_along_axis(x, i[:, None, None], 1)[:, 0],
                             best)
            with jax.threefry_partitionable(False):
                xi = jax.random.normal(key, x.shape)
            x = x - DT * drift + SIGMA * jnp.sqrt(DT) * drift * xi
            return (x, best, jnp.minimum(f_i, best_value)), None

        init = (x, jnp.zeros((runs, d)), jnp.full((runs,), jnp.inf))
        (_, best, _), _ = jax.lax.scan(body, init, jax.random.split(keys[0], steps))
        return best

    return _compiled(batch, runs)


def cbx_runner(objective, d, n, steps, runs):
    from cbx.dynamics import CBO

    def call(seed):
        rng = np.random.default_rng(seed)
        x0 = rng.uniform(LOW, HIGH, (runs, n, d))
        dyn = CBO(objective, f_dim="3D", x=x0, M=runs, N=n, d=d, alpha=ALPHA,
                  sigma=SIGMA, dt=DT, lamda=1.0, noise="anisotropic", max_it=steps,
                  verbosity=0, seed=seed)
        # sched=None: constant alpha, the algorithm px.optim.CBO runs; CBXpy's default
        # (`optimize()`) multiplies alpha by 1.05 every step, up to 1e5
        dyn.optimize(sched=None)
        return np.asarray(dyn.best_particle)

    return call


def successes(best) -> int:
    return int(np.sum(np.max(np.abs(best), axis=-1) < TOLERANCE))


def speed(args, command) -> str:
    steps, runs, repeats = (500, 20, 1) if args.quick else (args.steps or STEPS,
                                                            args.runs or RUNS, args.repeats)
    ours, compile_ours = ppl_ext_runner(rastrigin_jax, D, N, steps, runs)
    quantised, compile_quantised = ppl_ext_runner(rastrigin_jax, D, N, steps, runs, "quantised")
    fused, compile_fused = fused_runner(rastrigin_jax, D, N, steps, runs)
    theirs = cbx_runner(rastrigin_numpy, D, N, steps, runs)
    contenders = {OURS: ours, OURS_QUANTISED: quantised, FUSED: fused, PEER: theirs}
    compile_times = {OURS: compile_ours, OURS_QUANTISED: compile_quantised, FUSED: compile_fused}
    evaluations = {OURS: N + 1, OURS_QUANTISED: N + 1, FUSED: N, PEER: N}
    for call in contenders.values():  # warm-up
        call(100)
    times = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}  # process CPU seconds: less sensitive to load
    wins = {name: [] for name in contenders}
    for r in range(repeats):  # interleaved
        for name, call in contenders.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            best = call(r)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            wins[name].append(successes(best))
            log(f"  {name}: {times[name][-1]:.2f} s, {wins[name][-1]}/{runs} successes")
    rows = []
    for name in contenders:
        ratio = statistics.median(p / q for p, q in zip(times[PEER], times[name]))
        median = statistics.median(times[name])
        cpu_ratio = statistics.median(p / q for p, q in zip(cpu[PEER], cpu[name]))
        rows.append([name, f"{median:.2f}", f"{1e3 * median / runs:.1f}",
                     f"{ratio:.1f}x" if name != PEER else "1x",
                     f"{statistics.median(cpu[name]):.2f}",
                     f"{cpu_ratio:.1f}x" if name != PEER else "1x",
                     " ".join(f"{s}/{runs}" for s in wins[name]),
                     str(evaluations[name]),
                     f"{compile_times[name]:.2f}" if name in compile_times else "-"])
    return (
        f"- speed: Rastrigin d={D}, N={N}, anisotropic, alpha={ALPHA}, sigma={SIGMA}, dt={DT}, "
        f"{steps} steps, x0 ~ U[{LOW}, {HIGH}]^d, {runs} runs batched in one call for every "
        f"contender (CBXpy: M={runs}); success: best particle within {TOLERANCE} of the "
        f"origin (max-norm); float32 (JAX) against float64 (CBXpy, NumPy)"
        f"{' (QUICK)' if args.quick else ''}\n\n"
        + markdown_table(["contender", "s per batch (median)", "ms per run", "speed-up vs CBXpy",
                          "CPU s per batch", "CPU-time ratio", "successes per repeat",
                          "evaluations / step / run", "compile s"], "lrrrrrlrl", rows))


def curves(args, command) -> str:
    steps = 500 if args.quick else (args.steps or STEPS)
    runs = 10 if args.quick else (args.runs or 25)
    table, rows = {}, []
    for problem, d, sizes in CURVE_PROBLEMS:
        f_jax, f_numpy = OBJECTIVES[problem]
        for n in sizes[:3] if args.quick else sizes:
            ours, _ = ppl_ext_runner(f_jax, d, n, steps, runs)
            theirs = cbx_runner(f_numpy, d, n, steps, runs)
            start = time.perf_counter()
            ours_wins = successes(ours(1))
            ours_time = time.perf_counter() - start
            start = time.perf_counter()
            theirs_wins = successes(theirs(1))
            theirs_time = time.perf_counter() - start
            table[problem, n] = (ours_wins / runs, theirs_wins / runs)
            se = [np.sqrt(max(p * (1 - p), 1e-12) / runs) for p in table[problem, n]]
            rows.append([f"{problem} d={d}", str(n), f"{ours_wins}/{runs} ± {se[0] * runs:.1f}",
                         f"{theirs_wins}/{runs} ± {se[1] * runs:.1f}", f"{n * steps:,}",
                         f"{ours_time:.1f}", f"{theirs_time:.1f}"])
            log(f"  {problem} d={d} N={n}: ppl_ext {ours_wins}/{runs} ({ours_time:.1f} s), "
                f"CBXpy {theirs_wins}/{runs} ({theirs_time:.1f} s)")
    plot = plot_curves(table, runs, steps, args.quick)
    return (
        f"- success rate against N: alpha={ALPHA}, sigma={SIGMA}, dt={DT}, anisotropic, "
        f"{steps} steps, x0 ~ U[{LOW}, {HIGH}]^d, {runs} independent runs per point and "
        f"library (batched); success: best particle within {TOLERANCE} of the origin "
        f"(max-norm); ± one binomial standard error (in runs); evaluations per run N x steps "
        f"(ppl_ext: + steps for the step's info.value){' (QUICK)' if args.quick else ''}; "
        f"plot: {plot}\n\n"
        + markdown_table(["problem", "N", "ppl_ext successes", "CBXpy successes",
                          "evaluations / run", "ppl_ext s", "CBXpy s"], "lrllrrr", rows))


def noise_costs(args, command) -> str:
    """CPU milliseconds per step of drawing the (runs, N, d) standard normals of one CBO step
    in float32, one way at a time (each a jitted `lax.scan` over steps, the draws summed so
    that nothing is optimised away), and of the hand-fused step with and without its noise."""
    steps = 50 if args.quick else (args.steps or 500)
    runs = args.runs or RUNS
    shape = (runs, N, D)

    def draws(impl, partitionable=False, block=1, uniform=False):
        def batch(seed):
            def body(total, key):
                with jax.threefry_partitionable(partitionable):
                    draw = (jax.random.uniform(key, (block,) + shape) if uniform
                            else jax.random.normal(key, (block,) + shape))
                return total + draw.sum(0), None

            keys = jax.random.split(jax.random.key(seed, impl=impl), steps // block)
            return jax.lax.scan(body, jnp.zeros(shape), keys)[0]

        return batch

    def fused(noise: bool):
        def batch(seed):
            x = jax.random.uniform(jax.random.key(seed), shape, minval=LOW, maxval=HIGH)

            def body(x, key):
                f = jax.vmap(jax.vmap(lambda z: rastrigin_jax(None, z)))(x)
                w = jax.nn.softmax(-ALPHA * f, axis=-1)
                drift = x - jnp.einsum("mn,mnd->md", w, x)[:, None]
                with jax.threefry_partitionable(False):
                    xi = jax.random.normal(key, shape) if noise else jnp.zeros(shape)
                return x - DT * drift + SIGMA * jnp.sqrt(DT) * drift * xi, None

            return jax.lax.scan(body, x, jax.random.split(jax.random.key(seed), steps))[0]

        return batch

    variants = {
        "normal, threefry2x32, non-partitionable (the default)": draws("threefry2x32"),
        "normal, threefry2x32, partitionable": draws("threefry2x32", True),
        "normal, philox2x32": draws("philox2x32"),
        "normal, threefry4x32": draws("threefry4x32"),
        "normal, rbg": draws("rbg"),
        "normal, unsafe_rbg": draws("unsafe_rbg"),
        "normal, threefry, 5 steps drawn at once": draws("threefry2x32", block=5),
        "normal, threefry, 10 steps drawn at once": draws("threefry2x32", block=10),
        "uniform, threefry (the bits and their float conversion)": draws("threefry2x32",
                                                                         uniform=True),
        "hand-fused CBO step (Rastrigin), with its noise": fused(True),
        "hand-fused CBO step (Rastrigin), noise replaced by 0": fused(False),
    }
    compiled = {name: jax.jit(fn).lower(0).compile() for name, fn in variants.items()}
    for call in compiled.values():
        jax.block_until_ready(call(0))
    cpu = {name: [] for name in variants}
    for r in range(args.repeats):  # interleaved
        for name, call in compiled.items():
            start = time.process_time()
            jax.block_until_ready(call(r + 1))
            cpu[name].append(1e3 * (time.process_time() - start) / steps)
    base = statistics.median(cpu[next(iter(variants))])
    rows = [[name, f"{statistics.median(t):.3f}", f"{min(t):.3f}",
             f"{statistics.median(t) / base:.2f}"] for name, t in cpu.items()]
    for row in rows:
        log("  " + " | ".join(row))
    return (
        f"- noise cost: {runs} x {N} x {D} = {runs * N * D:,} float32 normals per step (CBXpy's "
        f"Rastrigin setting, all runs batched), {steps} steps per call, process CPU ms per "
        f"step, median and min over {args.repeats} interleaved repeats"
        f"{' (QUICK)' if args.quick else ''}\n\n"
        + markdown_table(["what is drawn / run", "CPU ms per step (median)", "min",
                          "vs default normals"], "lrrr", rows))


def plot_curves(table, runs, steps, quick) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _common import ROOT

    fig, axes = plt.subplots(1, len(CURVE_PROBLEMS), figsize=(10, 3.6))
    for ax, (problem, d, _) in zip(axes, CURVE_PROBLEMS):
        sizes = sorted(n for p, n in table if p == problem)
        for column, (label, style) in enumerate((("ppl_ext", "o-"), ("CBXpy", "s--"))):
            p = np.array([table[problem, n][column] for n in sizes])
            ax.errorbar(sizes, p, yerr=np.sqrt(p * (1 - p) / runs), fmt=style, capsize=3,
                        label=label)
        ax.set(xscale="log", xticks=list(sizes), xticklabels=[str(n) for n in sizes],
               ylim=(-0.05, 1.05), xlabel="particles N", ylabel="success rate",
               title=f"{problem}, d = {d} ({steps} steps, {runs} runs)")
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    path = ROOT / "docs" / "assets" / ("cbo_success_rates_quick.png" if quick
                                       else "cbo_success_rates.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path.relative_to(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="500 steps, fewer runs, 1 repeat")
    p.add_argument("--curves", action="store_true", help="success rate against N instead")
    p.add_argument("--noise", action="store_true",
                   help="the cost of the Gaussian noise per step, by PRNG and layout, instead")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    command = command_line(argv, "benchmarks/bench_cbo.py")
    load = load_average()
    log(f"# {command}; load {load}")
    start = time.perf_counter()
    if args.noise:
        table = noise_costs(args, command)
    else:
        table = curves(args, command) if args.curves else speed(args, command)
    body = (
        results_heading("bench_cbo.py", command, versions(("jax", "numpy", "cbx")))
        + f"- machine: {machine()}; load before the run {load}, after {load_average()}; "
        f"threads: {args.threads} (XLA and NumPy); wall time {time.perf_counter() - start:.0f} s\n"
        + table
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
