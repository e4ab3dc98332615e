"""Consensus-based optimisation: `px.optim.CBO` against CBXpy (`cbx`) on Rastrigin.

Usage:
    .venv/bin/pip install cbx==1.0.4          # the peer (NumPy; `make benchmarks` does it)
    .venv/bin/python benchmarks/bench_cbo.py [--quick] [--threads 1|default] [--no-results]

The problem is CBXpy's own success-rate example (issue 15): Rastrigin in d = 20 (the
standard, unnormalised one, 10 d + Σ (x² - 10 cos 2πx), global minimum 0 at the origin),
N = 40 particles, anisotropic noise, α = 30, σ = 10.1, dt = 0.01, λ = 1, 5,000 steps,
x0 uniform on [-3, 3]^d, M = 100 independent runs. A run succeeds when its best particle
is within 0.25 of the origin in max-norm.

Both libraries run all M runs at once: CBXpy on its (M, N, d) ensemble, ppl_ext as a
`jax.vmap` over runs of `lax.scan` over the kernel's `step` (the kernel protocol: no
`px.fit`, whose host loop serves one run). The same objective function is given to both
(CBXpy with `f_dim="3D"`). Times: median over `--repeats` interleaved repeats of a whole
run (all M runs, all steps), after a warm-up call; ppl_ext's compile time apart. A
second ppl_ext row traces the same run under `jax.threefry_partitionable(False)`: the
Gaussian noise (M·N·d draws per step) is most of a step, and JAX's default (partitionable)
threefry layout draws bits about 2.7x slower on this CPU. The
machine is shared: XLA and NumPy (OpenBLAS/MKL/OMP) are pinned to one thread by default
(`--threads 1`, set before jax and numpy are imported); `--threads default` leaves them.
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
#: the same run traced under `jax.threefry_partitionable(False)`: JAX's older threefry
#: layout, which on this CPU draws random bits about 2.7x faster (the noise draws are most
#: of a step's time); a different random stream, not a different algorithm
FAST = "ppl_ext, jax_threefry_partitionable=False"


def rastrigin_numpy(x):
    """(M, N, d) -> (M, N), for CBXpy."""
    return 10.0 * x.shape[-1] + np.sum(x**2 - 10.0 * np.cos(2 * np.pi * x), axis=-1)


def rastrigin_jax(key, x):
    """One particle's value (the key is unused: a deterministic objective)."""
    return 10.0 * x.shape[-1] + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))


def ppl_ext_runner(steps, runs, partitionable=True):
    from ppl_ext.optim import CBO

    backend = CBO(num_particles=N, alpha=ALPHA, sigma=SIGMA, dt=DT, noise="anisotropic",
                  init_bounds=(LOW, HIGH), estimate="best")

    def one_run(key):
        key_init, key_steps = jax.random.split(key)
        state = backend.init(key_init, jnp.zeros(D), rastrigin_jax)

        def body(state, k):
            state, _ = backend.step(k, state, rastrigin_jax)
            return state, None

        state, _ = jax.lax.scan(body, state, jax.random.split(key_steps, steps))
        return state.best_params, state.best_value

    run = jax.jit(jax.vmap(one_run))
    keys = jax.random.split(jax.random.key(0), runs)
    start = time.perf_counter()
    with jax.threefry_partitionable(partitionable):  # read while tracing
        compiled = run.lower(keys).compile()
    compile_time = time.perf_counter() - start

    def call(seed):
        best, _ = compiled(jax.random.split(jax.random.key(seed), runs))
        return np.asarray(jax.block_until_ready(best))

    return call, compile_time


def cbx_runner(steps, runs):
    from cbx.dynamics import CBO

    def call(seed):
        rng = np.random.default_rng(seed)
        x0 = rng.uniform(LOW, HIGH, (runs, N, D))
        dyn = CBO(rastrigin_numpy, f_dim="3D", x=x0, M=runs, N=N, d=D, alpha=ALPHA,
                  sigma=SIGMA, dt=DT, lamda=1.0, noise="anisotropic", max_it=steps,
                  verbosity=0, seed=seed)
        dyn.optimize()
        return np.asarray(dyn.best_particle)

    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="500 steps, 20 runs, 1 repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    steps, runs, repeats = (500, 20, 1) if args.quick else (STEPS, RUNS, args.repeats)
    command = command_line(argv, "benchmarks/bench_cbo.py")
    log(f"# {command}; load {load_average()}")
    ours, compile_time = ppl_ext_runner(steps, runs)
    ours_fast, compile_fast = ppl_ext_runner(steps, runs, partitionable=False)
    theirs = cbx_runner(steps, runs)
    contenders = {"ppl_ext (px.optim.CBO)": ours, FAST: ours_fast,
                  "CBXpy (cbx.dynamics.CBO)": theirs}
    compile_times = {"ppl_ext (px.optim.CBO)": compile_time, FAST: compile_fast}
    for call in contenders.values():  # warm-up
        call(100)
    times = {name: [] for name in contenders}
    successes = {name: [] for name in contenders}
    for r in range(repeats):  # interleaved
        for name, call in contenders.items():
            start = time.perf_counter()
            best = call(r)
            times[name].append(time.perf_counter() - start)
            successes[name].append(int(np.sum(np.max(np.abs(best), axis=-1) < TOLERANCE)))
            log(f"  {name}: {times[name][-1]:.2f} s, {successes[name][-1]}/{runs} successes")
    peer = "CBXpy (cbx.dynamics.CBO)"
    rows = []
    for name in contenders:
        ratio = statistics.median(p / q for p, q in zip(times[peer], times[name]))
        rows.append([name, f"{statistics.median(times[name]):.2f}",
                     f"{ratio:.1f}x" if name != peer else "1x",
                     " ".join(f"{s}/{runs}" for s in successes[name]),
                     f"{compile_times[name]:.2f}" if name != peer else "-"])
    body = (
        results_heading("bench_cbo.py", command, versions(("jax", "numpy", "cbx")))
        + f"- machine: {machine()}; load before the run {load_average()}; threads: "
        f"{args.threads} (XLA and NumPy)\n"
        f"- Rastrigin d={D}, N={N}, anisotropic, alpha={ALPHA}, sigma={SIGMA}, dt={DT}, "
        f"{steps} steps, x0 ~ U[{LOW}, {HIGH}]^d, {runs} runs at once; success: best "
        f"particle within {TOLERANCE} of the origin (max-norm){' (QUICK)' if args.quick else ''}"
        "\n\n"
        + markdown_table(["contender", "s per batch of runs (median)", "speed-up vs CBXpy",
                          "successes per repeat", "compile s"], "lrrll", rows)
    )
    log(body)
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
