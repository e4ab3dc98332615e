"""Run time and compile time of ppl_ext gradients against hand-written JAX and genjax.

Usage:
    .venv/bin/python benchmarks/bench_adev.py [--repeats N] [--quick] [--no-genjax]

Four programs with `--sites` (default 100) sample sites, objective sum_i (x_i - 1)^2 with
x_i ~ Normal(theta_i, 1):

    reparam/unrolled    one px.sample per site in a Python for loop, px.reparam
    reparam/scan        the same as a lax.scan over theta
    reinforce/unrolled  as reparam/unrolled with estimator=px.reinforce
    reinforce/scan      as reparam/scan with estimator=px.reinforce

Contenders, each called as fn(key, theta) and returning d/dtheta:

    hand-written  jax.jit(jax.grad(loss)), keys from jax.random.split(key, n); for
                  reinforce, loss is the score-function surrogate
                  f + sg(f) * (sum_i log p(x_i) - sg(...)) with x = sg(sample)
    ppl_ext       f.grad(key, theta) of @px.expectation (already jitted), sites
                  px.sample(dist.Normal(theta_i, 1.0), est): numpyro's default
                  validate_args (on in numpyro 0.22)
    ppl_ext novalidate
                  the same with dist.Normal(..., validate_args=False)
    genjax        jax.jit(genjax.seed(f.grad_estimate)) of @genjax.adev.expectation
                  (genjax 1.0.14; normal_reparam / normal_reinforce)

Run time: median over --repeats batches of per-call time (each call ends with
block_until_ready), after warm-up; contenders interleaved within each repeat.

Compile time: each repeat builds fresh Python functions and a fresh jitted function
(so no trace/lowering/compilation cache can hit), then times `.lower(key, theta)`
(tracing + ppl_ext's transformation + lowering to StableHLO) and `.compile()` (XLA)
separately. Lowering is repeated --compile-repeats times; XLA compilation is repeated
until a contender has spent --compile-budget seconds in it (at least once), because an
unrolled 100-site program takes tens of seconds to compile on CPU. Compile time = median
lower + median XLA compile. Before measuring, every contender is built once on a
2-site program so one-off import and cache costs are not charged to anyone.

The table is printed and appended to benchmarks/RESULTS.md (unless --no-results).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import numpyro.distributions as dist
import ppl_ext as px

if str(Path(__file__).resolve().parent) not in sys.path:  # _common.py is next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    command_line, fmt, log, machine, markdown_table, report, results_heading,
    short_exception, versions)

sg = lax.stop_gradient

RUN_TARGET = 1.05  # ppl_ext run time / hand-written run time, at most
COMPILE_TARGET = 2.0  # ppl_ext compile time / hand-written compile time, at most

PROGRAMS = ("reparam/unrolled", "reparam/scan", "reinforce/unrolled", "reinforce/scan")
# "ppl_ext" is the default user code (numpyro >= 0.22 validates distribution arguments by
# default); "ppl_ext novalidate" builds the same sites with validate_args=False.
CONTENDERS = ("hand-written", "ppl_ext", "ppl_ext novalidate", "genjax")
VERSIONS = ("jaxlib", "numpyro", "genjax")  # packages whose versions are reported


# ------------------------------------------------------------------------------ builders
#
# Each builder takes (program, n) and returns (jitted, call): `jitted` has `.lower`, and
# `call(key, theta)` is what the run-time benchmark calls. Builders define their Python
# functions afresh on every call, so repeated builds share no JAX caches.


def build_hand(program: str, n: int):
    estimator, shape = program.split("/")
    logpdf = jax.scipy.stats.norm.logpdf

    if estimator == "reparam" and shape == "unrolled":

        def loss(key, theta):
            keys = jax.random.split(key, n)
            s = jnp.zeros((), theta.dtype)
            for i in range(n):
                x = theta[i] + jax.random.normal(keys[i], (), theta.dtype)
                s = s + (x - 1.0) ** 2
            return s

    elif estimator == "reparam":

        def loss(key, theta):
            def body(s, inp):
                th, k = inp
                x = th + jax.random.normal(k, (), theta.dtype)
                return s + (x - 1.0) ** 2, None

            s, _ = lax.scan(body, jnp.zeros((), theta.dtype), (theta, jax.random.split(key, n)))
            return s

    elif shape == "unrolled":

        def loss(key, theta):
            keys = jax.random.split(key, n)
            s = jnp.zeros((), theta.dtype)
            lp = jnp.zeros((), theta.dtype)
            for i in range(n):
                x = sg(theta[i] + jax.random.normal(keys[i], (), theta.dtype))
                lp = lp + logpdf(x, theta[i], 1.0)
                s = s + (x - 1.0) ** 2
            return s + sg(s) * (lp - sg(lp))

    else:

        def loss(key, theta):
            def body(carry, inp):
                s, lp = carry
                th, k = inp
                x = sg(th + jax.random.normal(k, (), theta.dtype))
                return (s + (x - 1.0) ** 2, lp + logpdf(x, th, 1.0)), None

            zero = jnp.zeros((), theta.dtype)
            (s, lp), _ = lax.scan(body, (zero, zero), (theta, jax.random.split(key, n)))
            return s + sg(s) * (lp - sg(lp))

    jitted = jax.jit(jax.grad(loss, argnums=1))
    return jitted, jitted


def _program(shape: str, n: int, draw: Callable):
    """`theta -> sum_i (x_i - 1)^2` with `x_i = draw(theta_i)`, in a Python for loop
    ("unrolled") or as a lax.scan over theta; a fresh Python function on every call."""
    if shape == "unrolled":

        def prog(theta):
            s = jnp.zeros((), theta.dtype)
            for i in range(n):
                s = s + (draw(theta[i]) - 1.0) ** 2
            return s

    else:

        def prog(theta):
            def body(s, th):
                return s + (draw(th) - 1.0) ** 2, None

            s, _ = lax.scan(body, jnp.zeros((), theta.dtype), theta)
            return s

    return prog


def build_ppl_ext(program: str, n: int, validate_args=None):
    estimator, shape = program.split("/")
    est = px.reparam if estimator == "reparam" else px.reinforce
    prog = _program(
        shape, n, lambda th: px.sample(dist.Normal(th, 1.0, validate_args=validate_args), est))
    f = px.expectation(prog)
    # `f.grad` calls the jitted `f._grad(argnums, ...)`; lowering and compiling that very
    # object fills the cache that `f.grad` hits. (Fallback if the attribute is renamed.)
    jitted = getattr(f, "_grad_plain", None)
    if not hasattr(jitted, "lower"):
        jitted = jax.jit(f.grad)
        return jitted, jitted
    return _FirstArgument(jitted), f.grad


class _FirstArgument:
    """`f.grad`'s jitted function for array arguments, `f._grad_plain(argnums, key,
    *args)`, with `argnums=1` bound, keeping `.lower` (compile-time measurement)."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, *args):
        return self.jitted(1, *args)

    def lower(self, *args):
        return self.jitted.lower(1, *args)


@functools.cache
def _genjax():
    import genjax
    from genjax import adev, seed

    return genjax, adev, seed


def build_genjax(program: str, n: int):
    _, adev, seed = _genjax()
    estimator, shape = program.split("/")
    prim = adev.normal_reparam if estimator == "reparam" else adev.normal_reinforce
    f = adev.expectation(_program(shape, n, lambda th: prim(th, 1.0)))
    jitted = jax.jit(seed(f.grad_estimate))
    return jitted, jitted


BUILDERS: dict[str, Callable] = {
    "hand-written": build_hand,
    "ppl_ext": build_ppl_ext,
    "ppl_ext novalidate": functools.partial(build_ppl_ext, validate_args=False),
    "genjax": build_genjax,
}


# ----------------------------------------------------------------------------- measuring


@dataclass
class Row:
    program: str
    contender: str
    run_us: float | None = None
    lower_ms: list[float] = field(default_factory=list)
    xla_ms: list[float] = field(default_factory=list)
    call: Callable | None = None
    na: str | None = None
    check: str = ""

    @property
    def compile_ms(self) -> float | None:
        if not self.lower_ms or not self.xla_ms:
            return None
        return statistics.median(self.lower_ms) + statistics.median(self.xla_ms)


def _inputs(n: int):
    return jax.random.key(0), jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)


def warm_up(contenders, programs, log):
    """Build and compile every contender on a 2-site version of each program."""
    key, theta = _inputs(2)
    for program in programs:
        for c in contenders:
            try:
                jitted, call = BUILDERS[c](program, 2)
                jax.block_until_ready(call(key, theta))
            except Exception as exc:  # reported later, when measured for real
                log(f"  warm-up {program} {c}: {short_exception(exc)}")


def check_rows(rows: list[Row], n: int, log):
    """Monte-Carlo sanity check of each contender's gradient, and n/a detection.

    E[d/dtheta_i] = 2 (theta_i - 1). Reports max over sites of |z|, the standardised
    error of the mean of K estimates. A contender whose estimates do not change with the
    key is marked n/a (it is not a Monte-Carlo estimator of this program).
    """
    key, theta = _inputs(n)
    truth = 2.0 * (np.asarray(theta) - 1.0)
    for row in rows:
        if row.na or row.call is None:
            continue
        k = 200 if row.program.startswith("reparam") else 1000
        keys = jax.random.split(jax.random.key(1), k)
        try:
            g = np.stack([np.asarray(row.call(kk, theta)) for kk in keys])
        except Exception as exc:
            row.na = f"fails when run: {short_exception(exc)}"
            continue
        std = g.std(axis=0, ddof=1)
        if not np.all(np.isfinite(g)):
            row.na = "non-finite gradient estimates"
            continue
        if np.all(std <= 1e-5 * (1.0 + np.abs(g.mean(axis=0)))):
            row.na = (
                "gradient does not depend on the key (every key gives the same estimate"
                + (", identical at every site" if np.ptp(g[0]) < 1e-4 else "")
                + "): not an estimator of this program"
            )
            continue
        z = (g.mean(axis=0) - truth) / (std / np.sqrt(k))
        zmax = float(np.max(np.abs(z)))
        row.check = f"K={k}, mean grad {g.mean():+.3f} (exact {truth.mean():+.3f}), max|z| {zmax:.1f}"
        if zmax > 5:
            row.check += " SUSPICIOUS"
        log(f"  check {row.program:<19} {row.contender:<12} {row.check}")


def measure_compile(rows: list[Row], n: int, repeats: int, budget_s: float, log):
    key, theta = _inputs(n)
    spent = {id(r): 0.0 for r in rows}
    for rep in range(repeats):
        for row in rows:
            if row.na:
                continue
            try:
                jitted, call = BUILDERS[row.contender](row.program, n)
                t0 = time.perf_counter()
                lowered = jitted.lower(key, theta)
                t1 = time.perf_counter()
                row.lower_ms.append((t1 - t0) * 1e3)
                if row.xla_ms and spent[id(row)] >= budget_s:
                    continue
                t1 = time.perf_counter()
                lowered.compile()
                t2 = time.perf_counter()
            except Exception as exc:
                row.na = f"fails: {short_exception(exc)}"
                log(f"  {row.program} {row.contender}: {row.na}")
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
                continue
            spent[id(row)] += t2 - t1
            row.xla_ms.append((t2 - t1) * 1e3)
            # The compiled executable is in `jitted`'s cache, so `call` will not recompile.
            row.call = call
            log(
                f"  compile {row.program:<19} {row.contender:<12} rep {rep}: "
                f"lower {row.lower_ms[-1]:8.1f} ms, XLA {row.xla_ms[-1]:9.1f} ms"
            )


def measure_run(rows: list[Row], n: int, repeats: int, log):
    key, theta = _inputs(n)
    live = [r for r in rows if not r.na and r.call is not None]
    for row in live:  # warm-up (and make sure the cached executable is used)
        for _ in range(3):
            jax.block_until_ready(row.call(key, theta))
    # Calls per batch: about 0.1 s for the slowest contender, 10 to 2000 calls.
    single = []
    for row in live:
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(row.call(key, theta))
        single.append((time.perf_counter() - t0) / 5)
    calls = int(np.clip(0.1 / max(single, default=1e-3), 10, 2000))
    samples: dict[int, list[float]] = {id(r): [] for r in live}
    for rep in range(repeats):
        order = live[rep % len(live):] + live[: rep % len(live)] if live else []
        for row in order:
            call = row.call
            t0 = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(call(key, theta))
            samples[id(row)].append((time.perf_counter() - t0) / calls * 1e6)
    for row in live:
        row.run_us = statistics.median(samples[id(row)])
    log(f"  run: {repeats} repeats x {calls} calls per contender")


# ------------------------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    hand = {r.program: r for r in rows if r.contender == "hand-written"}
    lines = []
    for r in rows:
        h = hand.get(r.program)
        if r.na:
            lines.append([r.program, r.contender, "n/a"])
            continue
        run_ratio = r.run_us / h.run_us if h and h.run_us and r.run_us else None
        comp_ratio = (
            r.compile_ms / h.compile_ms if h and h.compile_ms and r.compile_ms else None
        )
        lines.append([
            r.program, r.contender, fmt(r.run_us, ".1f"), f"{fmt(run_ratio, '.3f')}x",
            fmt(statistics.median(r.lower_ms) if r.lower_ms else None, ".0f"),
            fmt(statistics.median(r.xla_ms) if r.xla_ms else None, ".0f"),
            fmt(r.compile_ms, ".0f"), f"{fmt(comp_ratio, '.2f')}x",
            f"{len(r.lower_ms)}/{len(r.xla_ms)}",
        ])
    return markdown_table(
        ["program", "contender", "run (µs, median)", "run ratio", "lower (ms)",
         "XLA compile (ms)", "compile (ms)", "compile ratio", "compile n"],
        "llrrrrrrr", lines)


def verdicts(rows: list[Row]) -> str:
    hand = {r.program: r for r in rows if r.contender == "hand-written"}
    out = []
    for r in rows:
        if not r.contender.startswith("ppl_ext"):
            continue
        h = hand.get(r.program)
        if r.na or not h or not h.run_us or not h.compile_ms or not r.run_us:
            out.append(f"- {r.program} / {r.contender}: not measured ({r.na or 'no baseline'})")
            continue
        rr, cr = r.run_us / h.run_us, r.compile_ms / h.compile_ms
        out.append(
            f"- {r.program} / {r.contender}: run {rr:.3f}x (target <= {RUN_TARGET}x: "
            f"{'met' if rr <= RUN_TARGET else 'NOT met'}), compile {cr:.2f}x (target <= "
            f"{COMPILE_TARGET}x: {'met' if cr <= COMPILE_TARGET else 'NOT met'})"
        )
    return "\n".join(out) + "\n"


def notes(rows: list[Row]) -> str:
    out = [f"- {r.program} / {r.contender}: n/a, {r.na}" for r in rows if r.na]
    out += [f"- check {r.program} / {r.contender}: {r.check}" for r in rows if r.check]
    return "\n".join(out) + ("\n" if out else "")


# --------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="run-time repeats (default 15; quick 3)")
    p.add_argument("--compile-repeats", type=int, default=None, help="lowering repeats (default 3; quick 1)")
    p.add_argument(
        "--compile-budget", type=float, default=None,
        help="seconds of XLA compilation per contender after which it is not repeated (default 20; quick 0)",
    )
    p.add_argument("--sites", type=int, default=None, help="sample sites per program (default 100; quick 10)")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 sites, few repeats")
    p.add_argument("--no-genjax", action="store_true", help="skip genjax")
    p.add_argument("--no-check", action="store_true", help="skip the Monte-Carlo sanity check")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    args = p.parse_args(argv)

    quick = args.quick
    repeats = args.repeats or (3 if quick else 15)
    compile_repeats = args.compile_repeats or (1 if quick else 3)
    budget = args.compile_budget if args.compile_budget is not None else (0.0 if quick else 20.0)
    n = args.sites or (10 if quick else 100)

    contenders = list(CONTENDERS)
    genjax_reason = None
    if args.no_genjax:
        contenders.remove("genjax")
    else:
        try:
            _genjax()
        except Exception as exc:
            genjax_reason = f"genjax not importable ({short_exception(exc)}); pip install genjax==1.0.14"

    command = command_line(argv, "bench_adev.py")
    log(f"# {command}")
    log(f"# {versions(VERSIONS)}; {machine()}")
    log(f"# sites={n} repeats={repeats} compile_repeats={compile_repeats} compile_budget={budget}s")

    t_start = time.perf_counter()
    log("warm-up (2-site programs)")
    warm_up([c for c in contenders if not (c == "genjax" and genjax_reason)], args.programs, log)

    rows = [Row(prog, c) for prog in args.programs for c in contenders]
    for r in rows:
        if r.contender == "genjax" and genjax_reason:
            r.na = genjax_reason

    # genjax on scan: run its estimator first; if it ignores the key it is marked n/a.
    if not args.no_check:
        key, theta = _inputs(n)
        for r in rows:
            if r.contender == "genjax" and r.program.endswith("scan") and not r.na:
                try:
                    _, r.call = build_genjax(r.program, n)
                    jax.block_until_ready(r.call(key, theta))
                except Exception as exc:
                    r.na = f"fails: {short_exception(exc)}"
        check_rows([r for r in rows if r.contender == "genjax" and r.program.endswith("scan")], n, log)
        for r in rows:
            r.call, r.check = None, r.check if r.na else ""

    log("compile time")
    measure_compile(rows, n, compile_repeats, budget, log)
    log("run time")
    measure_run(rows, n, repeats, log)
    if not args.no_check:
        log("sanity check (Monte-Carlo mean of gradient estimates vs 2 (theta - 1))")
        check_rows(rows, n, log)

    elapsed = time.perf_counter() - t_start
    body = (
        results_heading("bench_adev.py", command, versions(VERSIONS))
        + f"- machine: {machine()}\n"
        f"- sites={n}, run repeats={repeats}, lowering repeats={compile_repeats}, "
        f"XLA compile budget={budget:g} s per contender, total wall time {elapsed:.0f} s"
        f"{' (QUICK smoke run)' if quick else ''}\n\n"
        + table(rows)
        + "\nrun = median per-call time of the jitted gradient (key, theta) -> grad, incl. "
        "dispatch and block_until_ready; compile = median lower (trace + transform + "
        "StableHLO) + median XLA compile of a freshly built jitted function; compile n = "
        "lowerings/XLA compiles measured.\n\n"
        f"Targets for ppl_ext (run <= {RUN_TARGET}x, compile <= {COMPILE_TARGET}x hand-written):\n\n"
        + verdicts(rows)
        + ("\nNotes:\n\n" + notes(rows) if notes(rows) else "")
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
