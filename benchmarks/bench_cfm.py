"""Flow matching: `px.flows` I-CFM and OT-CFM training steps against torchcfm.

Usage:
    make torchcfm-venv                        # .venv-torchcfm: torch 2.13.0 (CPU), torchcfm
    .venv/bin/python benchmarks/bench_cfm.py [--quick] [--threads 1|default] [--no-results]

The setting is torchcfm's 2-D examples: an MLP with three hidden layers of 64 (SELU) on
`[x, t]` (torchcfm's `models.MLP(dim=2, time_varying=True, w=64)`, `px.flows.MLPField(2,
(64, 64, 64), jax.nn.selu)`), batch 256, Adam 1e-3, the linear (conditional-OT) path
without noise (torchcfm's `sigma=0`), source `N(0, I)`, target two moons (torchcfm's
`sample_moons` recipe: sklearn's moons with noise 0.2, times 3, minus 1). Both sides draw
the data *in the graph* every step (no host-side sampling, no sklearn): the moons are
written with each library's own random ops.

- I-CFM: independent pairs (`ConditionalFlowMatcher(sigma=0)`; `"independent"`).
- OT-CFM: minibatch exact OT. torchcfm's `ExactOptimalTransportConditionalFlowMatcher`
  solves it with POT's network simplex (`ot.emd`, on the CPU) and then draws 256 pairs
  from the plan with replacement; ours are `px.flows.ExactOTCoupling()` (the exact
  permutation by the same `ot.emd` on the host, read off the plan's rows, through
  `jax.pure_callback` inside the jitted step), `ExactOTCoupling(solver="scipy")` (scipy's
  `linear_sum_assignment`) and `px.flows.AuctionOTCoupling` (a permutation within
  `tolerance × cost range` of the optimum, JAX loops), both against the same torchcfm
  OT-CFM timings. The Hungarian `ExactOTCoupling(solver="hungarian")` is timed too when
  `--hungarian` is given (slow).

Measured, interleaved (one task of each side in turn), medians over the repeats: seconds
per training step over `--steps` steps after warm-up. Our steps run as one compiled
`lax.scan` (compile time reported apart); torchcfm's as its Python loop. Losses differ by
a constant factor (ours sums over the dimension, torchcfm averages): same minimiser.

torchcfm needs torch, whose CPU wheel here is for Python 3.11, so it runs in a worker
subprocess under `.venv-torchcfm`. Threads: XLA, torch and BLAS pinned to one
(`--threads 1`, default; `torch.set_num_threads(1)` in the worker) or left at defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import PeerWorker, pin_threads_unless_default  # noqa: E402 (stdlib only)

PINNED = pin_threads_unless_default(sys.argv)  # before jax, numpy or torch are imported

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER_PYTHON = ROOT / ".venv-torchcfm" / "bin" / "python"
WIDTH, BATCH, LEARNING_RATE, MOON_NOISE = 64, 256, 1e-3, 0.2


# -------------------------------------------------------------------- the torchcfm worker


def worker(pinned: bool) -> int:
    """Read JSON tasks from stdin, answer one JSON line each."""
    import math

    import torch
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher)
    from torchcfm.models.models import MLP

    if pinned:
        torch.set_num_threads(1)

    def moons(num):
        """torchcfm's `sample_moons` recipe with torch's random ops (in the graph)."""
        angle = math.pi * torch.rand(num)
        upper = torch.rand(num) < 0.5
        x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        points = torch.stack([x, y], -1) + MOON_NOISE * torch.randn(num, 2)
        return 3.0 * points - 1.0

    def build(coupling, seed):
        torch.manual_seed(seed)
        model = MLP(dim=2, time_varying=True, w=WIDTH)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        matcher = (ConditionalFlowMatcher(sigma=0.0) if coupling == "independent" else
                   ExactOptimalTransportConditionalFlowMatcher(sigma=0.0))
        return model, optimizer, matcher

    def train_step(model, optimizer, matcher):
        optimizer.zero_grad()
        x0, x1 = torch.randn(BATCH, 2), moons(BATCH)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        vt = model(torch.cat([xt, t[:, None]], dim=-1))
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()

    for line in sys.stdin:
        task = json.loads(line)
        if task["name"] == "describe":
            from importlib.metadata import version

            print(json.dumps({"versions": f"torch {torch.__version__}, torchcfm "
                                          f"{version('torchcfm')}, POT {version('pot')}",
                              "threads": torch.get_num_threads()}), flush=True)
            continue
        model, optimizer, matcher = build(task["coupling"], task["seed"])
        for _ in range(task["warmup"]):
            train_step(model, optimizer, matcher)
        start = time.perf_counter()
        for _ in range(task["steps"]):
            train_step(model, optimizer, matcher)
        print(json.dumps({"seconds": (time.perf_counter() - start) / task["steps"]}),
              flush=True)
    return 0


def Worker(python: Path, pinned: bool) -> PeerWorker:
    """The torchcfm worker: this script with `--worker` under `python`."""
    return PeerWorker(python, __file__, ["--worker"] + ([] if pinned else ["--threads", "default"]),
                      name="torchcfm")


# ------------------------------------------------------------------------ the main side


def jax_moons(key, num):
    """Two moons as torchcfm's `sample_moons` makes them, with JAX's random ops."""
    import jax
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(key, 3)
    angle = jnp.pi * jax.random.uniform(k1, (num,))
    upper = jax.random.uniform(k2, (num,)) < 0.5
    x = jnp.where(upper, jnp.cos(angle), 1.0 - jnp.cos(angle))
    y = jnp.where(upper, jnp.sin(angle), 0.5 - jnp.sin(angle))
    points = jnp.stack([x, y], -1) + MOON_NOISE * jax.random.normal(k3, (num, 2))
    return 3.0 * points - 1.0


def make_trainer(coupling, num_steps: int):
    """`train(params, key) -> (params, losses)`: `num_steps` Adam steps of the velocity
    loss with `coupling`, moons drawn in the graph each step (one jitted `lax.scan`)."""
    import jax
    import optax

    from ppl_ext.flows import MLPField, velocity_loss

    field = MLPField(2, hidden_sizes=(WIDTH,) * 3, activation=jax.nn.selu)
    loss = velocity_loss(field, "linear", coupling)
    optimizer = optax.adam(LEARNING_RATE)

    def step(carry, key):
        params, state = carry
        data_key, loss_key = jax.random.split(key)
        x1 = jax_moons(data_key, BATCH)
        value, grad = jax.value_and_grad(loss, argnums=1)(loss_key, params, x1)
        updates, state = optimizer.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), value

    @jax.jit
    def train(params, key):
        keys = jax.random.split(key, num_steps)
        (params, _), values = jax.lax.scan(step, (params, optimizer.init(params)), keys)
        return params, values

    return field, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="timed steps per task")
    p.add_argument("--hungarian", action="store_true",
                   help="also time ExactOTCoupling (optax's Hungarian algorithm; slow)")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(PINNED)
    for path in (HERE, ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import jax

    from _common import (command_line, load_average, log, machine, markdown_table, report,
                         results_heading, versions)
    from ppl_ext.flows import AuctionOTCoupling, ExactOTCoupling, IndependentCoupling

    if not WORKER_PYTHON.exists():
        raise SystemExit("no .venv-torchcfm: run `make torchcfm-venv` first")
    command = command_line(argv, "benchmarks/bench_cfm.py")
    load_before = load_average()
    log(f"# {command}; load {load_before}")
    repeats = 1 if args.quick else args.repeats
    steps = min(args.steps, 50) if args.quick else args.steps
    worker_proc = Worker(WORKER_PYTHON, PINNED)
    described = worker_proc.ask({"name": "describe"})

    # (name, coupling, the torchcfm task it is compared with); each torchcfm task runs
    # once per repeat, however many of our rows compare with it
    variants = [("I-CFM", IndependentCoupling(), "independent"),
                ("OT-CFM (exact, POT)", ExactOTCoupling(solver="pot"), "exact_ot"),
                ("OT-CFM (exact, scipy)", ExactOTCoupling(solver="scipy"), "exact_ot"),
                ("OT-CFM (auction)", AuctionOTCoupling(), "exact_ot")]
    if args.hungarian:
        variants.append(("OT-CFM (exact, Hungarian)", ExactOTCoupling(solver="hungarian"),
                         "exact_ot"))
    trainers, compile_s = {}, {}
    for name, coupling, _ in variants:
        field, train = make_trainer(coupling, steps)
        params = field.init(jax.random.key(0))
        start = time.perf_counter()
        train = train.lower(params, jax.random.key(0)).compile()
        compile_s[name] = time.perf_counter() - start
        jax.block_until_ready(train(params, jax.random.key(1)))  # warm-up run
        trainers[name] = (field, train)
        log(f"  compiled {name} in {compile_s[name]:.1f} s")

    mine = {name: [] for name, _, _ in variants}
    theirs = {peer: [] for _, _, peer in variants if peer}
    for r in range(repeats):  # interleaved
        done = set()
        for name, _, peer in variants:
            field, train = trainers[name]
            params = field.init(jax.random.key(10 + r))
            start = time.perf_counter()
            jax.block_until_ready(train(params, jax.random.key(20 + r)))
            mine[name].append((time.perf_counter() - start) / steps)
            line = f"  repeat {r} {name}: ppl_ext {mine[name][-1] * 1e3:.2f} ms"
            if peer and peer not in done:
                answer = worker_proc.ask({"name": "step", "coupling": peer, "seed": r,
                                          "warmup": 10, "steps": steps})
                theirs[peer].append(answer["seconds"])
                done.add(peer)
                line += f", torchcfm {theirs[peer][-1] * 1e3:.2f} ms"
            log(line)
    worker_proc.close()
    base = statistics.median(mine["I-CFM"])
    rows = []
    for name, _, peer in variants:
        t_mine = statistics.median(mine[name])
        t_theirs = statistics.median(theirs[peer]) if peer else None
        rows.append([name, f"{t_mine * 1e3:.2f}",
                     "n/a" if t_theirs is None else f"{t_theirs * 1e3:.2f}",
                     "n/a" if t_theirs is None else f"{t_theirs / t_mine:.1f}x",
                     f"{t_mine / base:.2f}x", f"{compile_s[name]:.1f}"])
        log("  " + " | ".join(rows[-1]))
    body = (
        results_heading("bench_cfm.py", command, versions(("equinox", "optax"),
                                                          [described["versions"]]))
        + f"- machine: {machine()}; load average before {load_before}, after "
        f"{load_average()}; threads: {args.threads} (XLA, BLAS and torch; torch in the "
        f"worker: {described['threads']}); repeats: {repeats}"
        f"{' (QUICK)' if args.quick else ''}\n"
        "- 2-D flow matching N(0, I) -> two moons drawn in the graph on both sides; MLP "
        "3 x 64 SELU on [x, t], batch 256, Adam 1e-3, linear path with sigma = 0; "
        "torchcfm in a worker subprocess under .venv-torchcfm (CPU torch)\n"
        "- OT-CFM: ours `ExactOTCoupling()` (the exact permutation: POT `ot.emd` on the "
        "host through `jax.pure_callback`, in the jitted step), `ExactOTCoupling(solver="
        "'scipy')` (scipy `linear_sum_assignment`, the same way) and `AuctionOTCoupling()` (a permutation, total cost within 1e-3 x cost "
        "range of the optimum, JAX loops), both against the same torchcfm OT-CFM runs "
        "(exact OT by POT `ot.emd` on the CPU, then 256 pairs drawn from the plan with "
        "replacement)\n"
        f"- time per training step: median over the repeats of the mean over {steps} "
        "steps (after warm-up); ours one compiled lax.scan, compile time apart; "
        "`vs I-CFM`: our step over our I-CFM step\n\n"
        + markdown_table(["coupling", "ppl_ext ms/step", "torchcfm ms/step", "speed-up",
                          "vs I-CFM", "ppl_ext compile s"], "lrrrrr", rows))
    log(body)
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
