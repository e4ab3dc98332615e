"""Time per step of `px.fit` with optax.adam against a hand-written jitted `lax.scan` loop.

Usage:
    .venv/bin/python benchmarks/bench_fit.py [--quick] [--repeats N] [--num-steps S]
                                             [--batch-sizes B ...] [--threads MODE]
                                             [--paired-chunk C] [--paired-chunks N]
                                             [--no-results]

Objective: the single-particle ELBO of the digits VAE of `models/vae.py` (defaults: 64
binarised pixels, latent dimension 4, tanh MLPs with 64 hidden units),
`px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))`, summed over a fixed
batch of the first B images (B = 64, 256) of a fixed permutation of the digits training
split. Every run starts from the same weights (NumPyro's initial `"encoder$params"` /
`"decoder$params"`) and does steps of `optax.adam(1e-3)` maximising it, step `i` with the
key `jax.random.fold_in(key, i)`. The hand-written loop is one jitted function running the
steps as a `lax.scan`: value and gradient of `-objective(key_i, params, x)` by
jax.value_and_grad, the Adam update, the per-step estimate stacked (what a user writes by
hand, as tutorial 02 does).

Two measurements per batch size, in one process:

1. Paired chunks (steady state; the target is checked on it): one
   `px.fit(..., chunk_size=C, progress=False)` run of N chunks (C = 256, N = 100) whose
   callback runs the compiled, warm hand-written loop of C steps between px.fit's chunks.
   Each px.fit chunk (`np.diff(history.wall_time)`, host work between chunks included) is
   paired with the mean of the hand-written runs just before and after it, milliseconds
   apart, so the machine's drift cancels; the first two chunks (the first run of a
   freshly compiled program) are left out. Reported: median µs per step of each, the
   median of the paired ratios and their interquartile range.

2. Whole runs of S = 2000 steps from scratch, each contender compiled and run once per
   repeat, in an order rotated from repeat to repeat:

    hand-written scan   the loop above, built afresh, compiled and run once, as px.fit is
    px.fit              `px.fit(objective, params, optax.adam(1e-3), S, key, x,
                        progress=False)`: default (adaptive) chunks
    px.fit one chunk    the same with `chunk_size=S` (one chunk, no host round trips)
    px.fit progress bar the default call with its tqdm bar (written to a string buffer)
    hand-written scan, warm
                        a second run of the compiled hand-written loop, for reference: the
                        first run of a freshly compiled XLA:CPU program is slower (tens of
                        ms here, for every contender alike), which the comparison includes

   Time per step: the hand-written call's wall-clock (with block_until_ready) / S; for
   px.fit, `history.wall_time[-1] / S`, the time spent running chunks, host work between
   chunks included (recording, progress bar), compilation and input checks excluded
   ("compile s" is `history.compile_time`: the input check's trace, the back-end's init,
   tracing, lowering and compiling the chunk program; "call overhead s" is the call's
   time beyond running the steps). Ratio: the median over repeats of the per-repeat ratio
   to the hand-written scan, with its interquartile range.

Threads: XLA on CPU uses a thread pool; on a shared 2-core machine its scheduling adds noise.
`--threads 1` pins XLA to one thread (`--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`, set before jax is imported), `--threads default` leaves it,
`--threads both` (the default) measures pinned in this process and runs itself again in a
subprocess with default threads; both are in the table.

Sanity check: the final parameters and the per-step estimates of `px.fit` and of the
hand-written loop from the same key (they compute the same steps; the largest relative
difference is reported, float32 round-off expected).

The table is printed and appended to benchmarks/RESULTS.md (unless --no-results).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _threads_from_argv(argv) -> str:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "both"


if _threads_from_argv(sys.argv) in ("1", "both"):  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
    os.environ["OMP_NUM_THREADS"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # _common.py is next to this file; `models` is a
    if str(_path) not in sys.path:  # top-level folder of the repository
        sys.path.insert(0, str(_path))

import ppl_ext as px  # noqa: E402
from _common import (  # noqa: E402
    command_line, load_average, log, machine, markdown_table, report, results_heading,
    versions)
from models import digits, vae  # noqa: E402
from ppl_ext.optim import fit  # noqa: E402

TARGET = 1.05  # px.fit / hand-written scan, time per step, at most
LEARNING_RATE = 1e-3
WARM = "hand-written scan, warm"
PAIRED_HAND = "hand-written, paired chunks"
PAIRED = "px.fit, paired chunks"
VERSIONS = ("jaxlib", "numpyro", "equinox", "optax", "tqdm")


def _initial_params(model, guide, x):
    params = {}
    for fn in (model, guide):
        trace = numpyro.handlers.trace(numpyro.handlers.seed(fn, 0)).get_trace(x)
        params.update({k: s["value"] for k, s in trace.items() if s["type"] == "param"})
    return params


def setup(batch: int):
    """`(objective, params, x)`: the VAE ELBO, NumPyro's initial weights, the batch."""
    model, guide = vae.make_vae(jax.random.key(0))
    images = digits.load_split()[0]
    images = images[np.random.default_rng(0).permutation(len(images))]
    x = jnp.asarray(images[:batch])
    params = jax.jit(_initial_params, static_argnums=(0, 1))(model, guide, x)
    objective = px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))
    return objective, params, x


def hand_written(objective, num_steps: int):
    """The hand-written loop: `run(params, opt_state, key, x) -> (params, opt_state, values)`."""
    optimiser = optax.adam(LEARNING_RATE)

    def run(params, opt_state, key, x):
        def step(carry, i):
            params, opt_state = carry
            value, grads = jax.value_and_grad(
                lambda p: -objective(jax.random.fold_in(key, i), p, x))(params)
            updates, opt_state = optimiser.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), -value

        (params, opt_state), values = lax.scan(step, (params, opt_state),
                                               jnp.arange(num_steps))
        return params, opt_state, values

    return jax.jit(run), optimiser


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def measure(batch: int, num_steps: int, repeats: int) -> dict:
    objective, params, x = setup(batch)
    key = jax.random.key(1)
    warm = {}

    def call_hand():
        # a fresh jitted loop, compiled and run once, as px.fit does; its second run
        # (warm) is kept for "hand-written scan, warm"
        run, optimiser = hand_written(objective, num_steps)
        start = time.perf_counter()
        compiled = run.lower(params, optimiser.init(params), key, x).compile()
        compile_time = time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(params, optimiser.init(params), key, x))
        warm["compiled"], warm["init"] = compiled, optimiser.init(params)
        return time.perf_counter() - start, (None, compile_time), out

    def call_warm():
        start = time.perf_counter()
        out = jax.block_until_ready(warm["compiled"](params, warm["init"], key, x))
        return time.perf_counter() - start, None, out

    def call_fit(**options):
        def call():
            buffer = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stderr(buffer):
                result = fit(objective, params, optax.adam(LEARNING_RATE), num_steps, key, x,
                             **options)
            total = time.perf_counter() - start
            return (result.history.wall_time[-1],
                    (total - result.history.wall_time[-1], result.history.compile_time),
                    result)
        return call

    calls = {
        "hand-written scan": call_hand,
        "px.fit": call_fit(progress=False),
        "px.fit one chunk": call_fit(progress=False, chunk_size=num_steps),
        "px.fit progress bar": call_fit(progress=True),
    }
    # warm-up and sanity check: the same steps from the same key
    _, _, (hand_params, _, hand_values) = call_hand()
    _, _, result = calls["px.fit"]()
    hand_flat, fit_flat = _flat(hand_params), _flat(result.params)
    params_diff = float(np.max(np.abs(fit_flat - hand_flat)) / np.max(np.abs(hand_flat)))
    values_diff = float(np.max(np.abs(result.history.value - np.asarray(hand_values))
                               / np.abs(np.asarray(hand_values))))

    names = [*calls, WARM]
    samples = {name: [] for name in names}
    overheads = {name: [] for name in names}
    compiles = {name: [] for name in names}
    order = list(calls)
    for rep in range(repeats):
        k = rep % len(order)
        for name in order[k:] + order[:k]:
            seconds, extra, _ = calls[name]()
            samples[name].append(seconds / num_steps)
            overheads[name].append(extra[0])
            compiles[name].append(extra[1])
            if name == "hand-written scan":
                samples[WARM].append(call_warm()[0] / num_steps)
    rows = []
    for name in names:
        ratios = [a / b for a, b in zip(samples[name], samples["hand-written scan"])]
        q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
        rows.append({
            "contender": name, "batch": batch,
            "us_per_step": statistics.median(samples[name]) * 1e6,
            "ratio": float(q2), "ratio_q1": float(q1), "ratio_q3": float(q3),
            "compile_s": statistics.median(compiles[name]) if compiles[name] else None,
            "overhead_s": (statistics.median(overheads[name])
                           if overheads[name] and overheads[name][0] is not None else None),
        })
    log(f"  B={batch}: " + ", ".join(
        f"{r['contender']} {r['us_per_step']:.0f} µs/step ({r['ratio']:.3f}x)" for r in rows))
    return {"rows": rows, "params_diff": params_diff, "values_diff": values_diff}


def measure_paired(batch: int, chunk: int, num_chunks: int) -> list[dict]:
    """Steady state: px.fit's chunks against warm hand-written runs of the same length.

    One `px.fit(..., chunk_size=chunk)` run whose callback runs the compiled hand-written
    loop of `chunk` steps between px.fit's chunks: chunk i of px.fit is paired with the
    hand-written runs just before and after it (their mean), a few milliseconds apart.
    The first two chunks (the first run of a fresh program) are left out.
    """
    objective, params, x = setup(batch)
    key = jax.random.key(1)
    run, optimiser = hand_written(objective, chunk)
    compiled = run.lower(params, optimiser.init(params), key, x).compile()
    opt_state = optimiser.init(params)

    def hand_run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, opt_state, key, x))
        return time.perf_counter() - start

    hand_run()
    hand_times: list[float] = []
    result = fit(objective, params, optax.adam(LEARNING_RATE), chunk * num_chunks, key, x,
                 chunk_size=chunk, progress=False,
                 callbacks=[lambda step, state, history: hand_times.append(hand_run())])
    fit_times = np.diff(np.concatenate([[0.0], result.history.wall_time]))
    before = np.array([hand_times[0], *hand_times[:-1]])
    ratios = (fit_times / ((before + np.array(hand_times)) / 2))[2:]
    q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
    hand_us = float(np.median(hand_times[2:]) / chunk * 1e6)
    rows = [
        {"contender": PAIRED_HAND, "batch": batch, "us_per_step": hand_us, "ratio": 1.0,
         "ratio_q1": 1.0, "ratio_q3": 1.0, "compile_s": None, "overhead_s": None},
        {"contender": PAIRED, "batch": batch,
         "us_per_step": float(np.median(fit_times[2:]) / chunk * 1e6),
         "ratio": float(q2), "ratio_q1": float(q1), "ratio_q3": float(q3),
         "compile_s": None, "overhead_s": None},
    ]
    log(f"  B={batch}, paired chunks of {chunk} steps: px.fit {rows[1]['us_per_step']:.0f} "
        f"µs/step, hand-written {hand_us:.0f} µs/step, ratio {q2:.3f} "
        f"(IQR {q1:.3f}-{q3:.3f}, {len(ratios)} pairs)")
    return rows


def run_all(batch_sizes, num_steps, repeats, chunk, num_chunks) -> dict:
    out = {}
    for b in batch_sizes:
        paired = measure_paired(b, chunk, num_chunks)
        out[str(b)] = measure(b, num_steps, repeats)
        out[str(b)]["rows"][:0] = paired
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="B = 64 only, 3 repeats, 300 steps")
    p.add_argument("--repeats", type=int, default=None, help="default 11")
    p.add_argument("--num-steps", type=int, default=None, help="steps per run (default 2000)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default 64 256")
    p.add_argument("--paired-chunk", type=int, default=256,
                   help="steps per chunk of the paired measurement (default 256)")
    p.add_argument("--paired-chunks", type=int, default=None,
                   help="chunks of the paired measurement (default 100)")
    p.add_argument("--threads", choices=("1", "default", "both"), default="both",
                   help="XLA CPU threads: pinned to 1, default, or both (default)")
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)  # for the subprocess
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 11)
    num_steps = args.num_steps or (300 if args.quick else 2000)
    batch_sizes = args.batch_sizes or ([64] if args.quick else [64, 256])
    paired = (args.paired_chunk, args.paired_chunks or (20 if args.quick else 100))
    command = command_line(argv, "bench_fit.py")

    if args.json_out:  # the default-threads subprocess
        results = run_all(batch_sizes, num_steps, repeats, *paired)
        Path(args.json_out).write_text(json.dumps(results))
        return 0

    load_start = load_average()
    log(f"# {command}; load {load_start}")
    results = {}
    if args.threads in ("1", "both"):
        log("XLA threads: 1")
        results["1"] = run_all(batch_sizes, num_steps, repeats, *paired)
    if args.threads == "both":
        log("XLA threads: default (subprocess)")
        out = HERE / ".bench_fit_default_threads.json"
        try:
            subprocess.run([sys.executable, __file__, "--threads", "default",
                            "--json-out", str(out), "--repeats", str(repeats),
                            "--num-steps", str(num_steps), "--paired-chunk", str(paired[0]),
                            "--paired-chunks", str(paired[1]), "--batch-sizes",
                            *map(str, batch_sizes)], check=True)
            results["default"] = json.loads(out.read_text())
        finally:
            out.unlink(missing_ok=True)
    elif args.threads == "default":
        log("XLA threads: default")
        results["default"] = run_all(batch_sizes, num_steps, repeats, *paired)

    rows, verdicts, checks = [], [], []
    for threads, by_batch in results.items():
        for batch, measured in by_batch.items():
            for r in measured["rows"]:
                rows.append([threads, batch, r["contender"], f"{r['us_per_step']:.1f}",
                             f"{r['ratio']:.3f}x", f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}",
                             "" if r["compile_s"] is None else f"{r['compile_s']:.2f}",
                             "" if r["overhead_s"] is None else f"{r['overhead_s']:.2f}"])
                if r["contender"] in ("px.fit", PAIRED):
                    met = ("met" if r["ratio"] <= TARGET else
                           "met within noise" if r["ratio_q1"] <= TARGET else "NOT met")
                    what = ("px.fit / hand-written, whole runs (each compiled and run once)"
                            if r["contender"] == "px.fit" else
                            f"px.fit / hand-written, paired chunks of {paired[0]} steps")
                    verdicts.append(f"- threads {threads}, B={batch}: {what} "
                                    f"{r['ratio']:.3f}x per step (target <= {TARGET}x: {met})")
            checks.append(f"- threads {threads}, B={batch}: same key, px.fit vs hand-written: "
                          f"largest relative difference of the final parameters "
                          f"{measured['params_diff']:.1e}, of the per-step estimates "
                          f"{measured['values_diff']:.1e}")
    body = (
        results_heading("bench_fit.py", command, versions(VERSIONS), ("ppl_ext", "models"))
        + f"- machine: {machine()}; 1-min load average {load_start} at start, "
        f"{load_average()} at end (other processes share this machine; ratios come from "
        "interleaved repeats)\n"
        f"- VAE {digits.NUM_FEATURES}-{vae.HIDDEN}-{vae.LATENT_DIM} (models.vae defaults), "
        f"single-particle ELBO (px.vi.elbo) on a fixed batch, optax.adam({LEARNING_RATE:g}), "
        f"{num_steps} steps per run, repeats={repeats}\n\n"
        + markdown_table(["XLA threads", "B", "contender", "µs / step", "ratio",
                          "ratio IQR", "compile s", "call overhead s"], "rrlrrrrr", rows)
        + "\nµs / step = median over repeats of (run time / steps): the hand-written loop's "
        "call, px.fit's `history.wall_time[-1]` (chunks run, host work between chunks "
        "included); ratio = median over repeats of (contender / hand-written scan in the same "
        "repeat), IQR its quartiles; paired chunks: one px.fit run with chunk_size="
        f"{paired[0]} and {paired[1]} chunks whose callback runs a warm hand-written loop of "
        f"{paired[0]} steps between chunks, µs / step = median over chunks, ratio = median "
        "over chunks of (px.fit chunk / mean of the hand-written runs just before and after "
        "it), first two chunks left out; "
        "compile s = lower + XLA compile of the loop (px.fit: "
        "`history.compile_time`, median); call overhead s = px.fit's call time minus its "
        "run time (input checks, tracing, compiling; median).\n\n"
        + "\n".join(verdicts) + "\n\nSanity check:\n\n" + "\n".join(checks) + "\n"
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
