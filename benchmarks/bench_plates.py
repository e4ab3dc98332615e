"""Plate groups: trace, compile and run time of several enumerated sites on one plate.

Usage:
    .venv/bin/python benchmarks/bench_plates.py [--quick] [--single-thread] [--repeats N]
    .venv/bin/python benchmarks/bench_plates.py --two-plates [--elements-b 30]

Program (as in tests/adev/test_groups.py): `m` Bernoulli sites on one plate of `n` (20)
elements, site j's logits depending on site j-1 element by element, objective
`Σ_j Σ_i log N(x_i; 2 c_ji - 1 + 0.1 j, 1)`, every site `px.enum`. ppl_ext evaluates the
sites per element together (`ppl_ext/adev/_groups.py`): the rest of the program for all
`2^m` joint values of one element's choices in one flat vmap, traced once.

Contenders, both `jax.jit(value_and_grad)` of (key, t):

    ppl_ext       f.value_and_grad of the @px.expectation program
    hand-written  the exact per-element enumeration written in jax.numpy: all 2^m joint
                  values of one element's m choices, weighted by their probabilities,
                  summed over elements, as one vectorised formula
    hand-written per site
                  the same sum with ppl_ext's per-site structure: site by site, a vmap
                  over the site's two values of the rest (2^m evaluations, nested)

Measured for m = 1, 2, 4, 8: lowering time (trace + ppl_ext's transformation +
StableHLO) and XLA compile time of a freshly built jitted function (median over
--compile-repeats), and run time per call (median over --repeats batches, interleaved).
Before the trace of an 8-site program took 86 s with 5 elements and 20 elements were
refused (2^20 joint values); the target is first-call time (lower + compile) within 2x of
hand-written code with the same per-site structure. `--single-thread` pins XLA to one thread (set before jax is imported).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

if "--single-thread" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
    os.environ["OMP_NUM_THREADS"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

import ppl_ext as px  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    command_line, load_average, log, machine, markdown_table, report, results_heading,
    versions)

TARGET = 2.0


def ppl_ext_fn(m, data):
    def program(t):
        total, prev = 0.0, jnp.zeros(data.shape[0])
        for j in range(m):
            c = px.sample(dist.Bernoulli(logits=0.3 * (j + 1) * t + prev - 0.5),
                          px.enum).astype(jnp.float32)
            total = total + jnp.sum(dist.Normal(2 * c - 1 + 0.1 * j, 1.0).log_prob(data))
            prev = c
        return total

    f = px.expectation(program)
    return jax.jit(lambda key, t: f.value_and_grad(key, t))


def hand_written_fn(m, data):
    configs = jnp.array(list(itertools.product([0.0, 1.0], repeat=m)))  # (2^m, m)

    def exact(t):
        log_p, term, prev = 0.0, 0.0, 0.0
        for j in range(m):
            c = configs[:, j, None]  # (2^m, 1) against data (n,)
            logit = 0.3 * (j + 1) * t + prev - 0.5
            log_p = log_p + c * jax.nn.log_sigmoid(logit) + (1 - c) * jax.nn.log_sigmoid(-logit)
            term = term + jax.scipy.stats.norm.logpdf(data, 2 * c - 1 + 0.1 * j, 1.0)
            prev = c
        return jnp.sum(jnp.exp(log_p) * term)

    return jax.jit(lambda key, t: jax.value_and_grad(exact)(t))


def hand_nested_fn(m, data):
    """The same per-site structure as ppl_ext's: site by site, vmap over its two values."""
    n = data.shape[0]

    def rest(j, prev, t):  # per-element expected sum of the terms of sites j, j+1, ...
        if j == m:
            return jnp.zeros(n)
        logit = 0.3 * (j + 1) * t + prev - 0.5

        def branch(c):
            cv = jnp.full(n, c)
            return jax.scipy.stats.norm.logpdf(data, 2 * cv - 1 + 0.1 * j, 1.0) + rest(
                j + 1, cv, t)

        values = jax.vmap(branch)(jnp.array([0.0, 1.0]))  # (2, n)
        p1 = jax.nn.sigmoid(logit)
        return (1 - p1) * values[0] + p1 * values[1]

    def exact(t):
        return jnp.sum(rest(0, jnp.zeros(n), t))

    return jax.jit(lambda key, t: jax.value_and_grad(exact)(t))


def two_plates_ppl_ext_fn(data, extra):
    """Two enumerated plates of different sizes (`data`: n, `extra`: m elements)."""

    def program(t):
        a = px.sample(dist.Bernoulli(logits=0.3 * t + data / 4), px.enum).astype(jnp.float32)
        b = px.sample(dist.Bernoulli(logits=-0.2 * t + extra / 4), px.enum).astype(jnp.float32)
        return (jnp.sum(dist.Normal(2 * a - 1, 1.0).log_prob(data))
                + jnp.sum(dist.Normal(2 * b - 1, 1.0).log_prob(extra)) + jnp.mean(a) * jnp.sum(b))

    f = px.expectation(program)
    return jax.jit(lambda key, t: f.value_and_grad(key, t))


def two_plates_hand_fn(data, extra):
    """The same expectation written per element: each element's two values weighted."""

    def exact(t):
        pa = jax.nn.sigmoid(0.3 * t + data / 4)
        pb = jax.nn.sigmoid(-0.2 * t + extra / 4)
        norm = jax.scipy.stats.norm.logpdf
        return (jnp.sum(pa * norm(data, 1.0, 1.0) + (1 - pa) * norm(data, -1.0, 1.0))
                + jnp.sum(pb * norm(extra, 1.0, 1.0) + (1 - pb) * norm(extra, -1.0, 1.0))
                + jnp.mean(pa) * jnp.sum(pb))

    return jax.jit(lambda key, t: jax.value_and_grad(exact)(t))


def two_plates(args, key, t, compile_repeats, repeats) -> int:
    """`--two-plates`: plates of `--elements` and `--elements-b` elements."""
    data = jnp.linspace(-1.5, 2.0, args.elements)
    extra = jnp.linspace(2.0, -1.0, args.elements_b)
    command = command_line(None, "bench_plates.py")
    log(f"# {command}; load {load_average()}")
    builds = {"ppl_ext": two_plates_ppl_ext_fn, "hand-written": two_plates_hand_fn}
    for build in builds.values():  # one-off import and cache costs
        first_call(lambda m, d: build(d, extra), 0, data, key, t, 1)
    fns = {name: build(data, extra) for name, build in builds.items()}
    v_ours, v_ref = fns["ppl_ext"](key, t), fns["hand-written"](key, t)
    agree = all(abs(float(a) - float(b)) <= 1e-4 * (1 + abs(float(b)))
                for a, b in zip(v_ours, v_ref))
    firsts = {name: first_call(lambda m, d, b=build: b(d, extra), 0, data, key, t,
                               compile_repeats) for name, build in builds.items()}
    runs = run_times(fns, key, t, repeats)
    ref_first = sum(firsts["hand-written"])
    rows = []
    for name in builds:
        lower, compile_ = firsts[name]
        rows.append([name, f"{lower:.3f}", f"{compile_:.3f}",
                     f"{(lower + compile_) / ref_first:.2f}x", f"{runs[name] * 1e6:.1f}",
                     f"{runs[name] / runs['hand-written']:.2f}x", "yes" if agree else "NO"])
    body = (
        results_heading("bench_plates.py", command, versions(("jax", "numpyro")))
        + f"- machine: {machine()}; load before the run {load_average()}; XLA threads: "
        f"{'1 (--single-thread)' if args.single_thread else 'default'}\n"
        f"- two enumerated plates of {args.elements} and {args.elements_b} elements "
        f"(2^{args.elements + args.elements_b} joint values; the second is enumerated per "
        f"element inside the first's group: {2 * args.elements_b + 1} evaluations of the "
        f"rest), lowering repeats {compile_repeats}, run repeats {repeats}\n\n"
        + markdown_table(["contender", "lower s", "XLA compile s", "first call vs hand",
                          "run µs", "run vs hand", "same value/grad"], "lrrrrrl", rows)
        + "\nhand-written = the closed-form per-element expectation (each element's two "
        "values weighted), a lower bound on any enumeration code.\n")
    return report(body, args.no_results)


CONTENDERS = {"ppl_ext": ppl_ext_fn, "hand-written": hand_written_fn,
              "hand-written per site": hand_nested_fn}


def first_call(build, m, data, key, t, repeats):
    lowers, compiles = [], []
    for _ in range(repeats):
        fn = build(m, data)
        start = time.perf_counter()
        lowered = fn.lower(key, t)
        lowers.append(time.perf_counter() - start)
        start = time.perf_counter()
        lowered.compile()
        compiles.append(time.perf_counter() - start)
    return statistics.median(lowers), statistics.median(compiles)


def run_times(fns, key, t, repeats, calls=50):
    times = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(key, t))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(key, t))
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="m = 1, 8 only, fewer repeats")
    p.add_argument("--single-thread", action="store_true", help="pin XLA to one thread")
    p.add_argument("--repeats", type=int, default=None, help="run-time repeats (default 11)")
    p.add_argument("--compile-repeats", type=int, default=None, help="default 3")
    p.add_argument("--elements", type=int, default=20)
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--two-plates", action="store_true",
                   help="two enumerated plates of different sizes instead")
    p.add_argument("--elements-b", type=int, default=30, help="second plate (--two-plates)")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 11)
    compile_repeats = args.compile_repeats or (1 if args.quick else 3)
    if args.two_plates:
        return two_plates(args, jax.random.key(0), jnp.float32(0.3), compile_repeats, repeats)
    sites = (1, 8) if args.quick else (1, 2, 4, 8)
    data = jnp.linspace(-1.5, 2.0, args.elements)
    key, t = jax.random.key(0), jnp.float32(0.3)
    command = command_line(argv, "bench_plates.py")
    log(f"# {command}; load {load_average()}")
    first_call(ppl_ext_fn, 1, data, key, t, 1)  # one-off import and cache costs
    first_call(hand_written_fn, 1, data, key, t, 1)
    first_call(hand_nested_fn, 1, data, key, t, 1)
    rows, verdicts = [], []
    for m in sites:
        fns = {name: build(m, data) for name, build in CONTENDERS.items()}
        v_ours, v_ref = fns["ppl_ext"](key, t), fns["hand-written"](key, t)
        agree = all(abs(float(a) - float(b)) <= 1e-4 * (1 + abs(float(b)))
                    for a, b in zip(v_ours, v_ref))
        firsts = {name: first_call(build, m, data, key, t, compile_repeats)
                  for name, build in CONTENDERS.items()}
        runs = run_times(fns, key, t, repeats)
        ref_first = sum(firsts["hand-written"])
        for name in CONTENDERS:
            lower, compile_ = firsts[name]
            rows.append([m, name, f"{lower:.3f}", f"{compile_:.3f}",
                         f"{(lower + compile_) / ref_first:.2f}x", f"{runs[name] * 1e6:.1f}",
                         f"{runs[name] / runs['hand-written']:.2f}x",
                         "yes" if agree else "NO"])
        ratio = sum(firsts["ppl_ext"]) / sum(firsts["hand-written per site"])
        verdicts.append(
            f"- m={m}: first call {ratio:.2f}x hand-written per site (target <= {TARGET}x: "
            f"{'met' if ratio <= TARGET else 'NOT met'}), "
            f"{sum(firsts['ppl_ext']) / ref_first:.2f}x the vectorised formula; run "
            f"{runs['ppl_ext'] / runs['hand-written per site']:.2f}x per site, "
            f"{runs['ppl_ext'] / runs['hand-written']:.2f}x the formula")
        log(verdicts[-1])
    body = (
        results_heading("bench_plates.py", command, versions(("jax", "numpyro")))
        + f"- machine: {machine()}; load before the run {load_average()}; XLA threads: "
        f"{'1 (--single-thread)' if args.single_thread else 'default'}\n"
        f"- {args.elements} elements per plate, lowering repeats {compile_repeats}, run repeats "
        f"{repeats}\n\n"
        + markdown_table(["sites", "contender", "lower s", "XLA compile s", "first call vs hand",
                          "run µs", "run vs hand", "same value/grad"], "rlrrrrrl", rows)
        + "\nlower = trace + ppl_ext transformation + StableHLO of a freshly built jitted "
        "value_and_grad (median); first call = lower + XLA compile.\n\n"
        + "\n".join(verdicts) + "\n"
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
