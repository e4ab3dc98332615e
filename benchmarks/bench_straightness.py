"""Straightness: sample quality against the number of Euler steps, I-CFM vs OT-CFM.

Usage:
    .venv/bin/python benchmarks/bench_straightness.py [--quick] [--threads 1|default]
        [--steps 3000] [--no-results]

Trains the same model twice (MLP 3 x 64 SELU, batch 256, Adam 1e-3, the linear path,
`N(0, I)` -> two moons drawn in the graph each step; as `bench_cfm.py`): with independent
pairs (I-CFM) and with the minibatch OT permutation (`px.flows.AuctionOTCoupling`,
OT-CFM). Then draws 10^4 samples with `NFE` Euler steps of the probability-flow ODE
(`px.flows.ode_sample(..., solver="euler")`) and, for I-CFM, with Euler–Maruyama steps of
the SDE `dX = (v + ε s) dt + sqrt(2ε) dW` (`px.flows.sde_sample`, score
`px.flows.score_from_velocity`, stopped at t = 0.999 where the score is finite; NFE counts
steps), and reports the sliced Wasserstein-2 distance (200 random directions, exact 1-D
W2 between sorted projections) to 10^4 fresh target samples.

The metric's noise floor: the same distance between two independent draws of 10^4 target
samples (median over seeds). "NFE to reach q": the fewest Euler steps whose distance is
at most q, for q = 1.5 x the I-CFM distance at the largest NFE.

No SDE for OT-CFM: with coupled endpoints the score is not a function of the velocity
(`score_from_velocity` assumes independent `x0 ~ N(0, I)`), so it needs its own trained
score; that is not done here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

PINNED = pin_threads_unless_default(sys.argv)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NFES = (1, 2, 4, 8, 16, 32, 64)


def sliced_w2(x, y, directions):
    """Sliced Wasserstein-2 distance between equal-size samples (numpy, float64)."""
    import numpy as np

    px_ = np.sort(np.asarray(x, np.float64) @ directions.T, axis=0)
    py_ = np.sort(np.asarray(y, np.float64) @ directions.T, axis=0)
    return float(np.sqrt(np.mean((px_ - py_) ** 2)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short training")
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--epsilon", type=float, default=0.1, help="SDE diffusion coefficient")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    for path in (HERE, ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import jax
    import numpy as np

    from _common import (command_line, load_average, log, machine, markdown_table, report,
                         results_heading, versions)
    from bench_cfm import jax_moons, make_trainer
    from ppl_ext.flows import (AuctionOTCoupling, IndependentCoupling, LinearPath,
                               ode_sample, score_from_velocity, sde_sample)

    command = command_line(argv, "benchmarks/bench_straightness.py")
    load_before = load_average()
    log(f"# {command}; load {load_before}")
    steps = min(args.steps, 500) if args.quick else args.steps
    num = args.samples
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(200, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    target = np.asarray(jax_moons(jax.random.key(1000), num))
    floors = [sliced_w2(np.asarray(jax_moons(jax.random.key(2000 + s), num)), target,
                        directions) for s in range(5)]
    floor = float(np.median(floors))
    log(f"  noise floor (two target draws of {num}): {floor:.4f} (seeds: "
        + ", ".join(f"{f:.4f}" for f in floors) + ")")

    x0 = jax.random.normal(jax.random.key(3000), (num, 2))
    path = LinearPath()
    results, train_s = {}, {}
    for name, coupling in (("I-CFM", IndependentCoupling()),
                           ("OT-CFM", AuctionOTCoupling())):
        field, train = make_trainer(coupling, steps)
        start = time.perf_counter()
        params, values = jax.block_until_ready(train(field.init(jax.random.key(0)),
                                                     jax.random.key(1)))
        train_s[name] = time.perf_counter() - start
        log(f"  trained {name}: {steps} steps in {train_s[name]:.1f} s (with compile), "
            f"last-100 mean loss {float(np.mean(values[-100:])):.3f}")

        def euler(params, x0, nfe):
            return ode_sample(lambda t, x: field(params, t, x), x0, solver="euler",
                              num_steps=nfe)

        score = score_from_velocity(path, field)

        def sde(params, key, x0, nfe):
            return sde_sample(key, lambda t, x: field(params, t, x),
                              lambda t, x: score(params, t, x), x0, args.epsilon,
                              num_steps=nfe, t1=0.999, brownian="unsafe")

        row_ode, row_sde = [], []
        for nfe in NFES:
            samples = jax.jit(euler, static_argnums=2)(params, x0, nfe)
            row_ode.append(sliced_w2(samples, target, directions))
            if name == "I-CFM":
                samples = jax.jit(sde, static_argnums=3)(params, jax.random.key(4000 + nfe),
                                                         x0, nfe)
                row_sde.append(sliced_w2(samples, target, directions))
        results[name] = (row_ode, row_sde)
        log(f"  {name} ODE: " + ", ".join(f"{v:.3f}" for v in row_ode))
        if row_sde:
            log(f"  {name} SDE: " + ", ".join(f"{v:.3f}" for v in row_sde))

    rows = [["I-CFM, ODE (Euler)", *[f"{v:.3f}" for v in results["I-CFM"][0]]],
            [f"I-CFM, SDE (Euler–Maruyama, ε = {args.epsilon})",
             *[f"{v:.3f}" for v in results["I-CFM"][1]]],
            ["OT-CFM, ODE (Euler)", *[f"{v:.3f}" for v in results["OT-CFM"][0]]]]
    quality = 1.5 * results["I-CFM"][0][-1]

    def nfe_to_reach(values):
        hits = [nfe for nfe, v in zip(NFES, values) if v <= quality]
        return str(hits[0]) if hits else f"> {NFES[-1]}"

    reach = {name: nfe_to_reach(results[name][0]) for name in results}
    reach_sde = nfe_to_reach(results["I-CFM"][1])
    body = (
        results_heading("bench_straightness.py", command, versions(("equinox", "optax",
                                                                    "diffrax")))
        + f"- machine: {machine()}; load average before {load_before}, after "
        f"{load_average()}; threads: {args.threads}{' (QUICK)' if args.quick else ''}\n"
        f"- N(0, I) -> two moons, MLP 3 x 64 SELU, batch 256, Adam 1e-3, {steps} steps "
        f"each (training s with compile: I-CFM {train_s['I-CFM']:.0f}, OT-CFM "
        f"{train_s['OT-CFM']:.0f}); OT-CFM with `AuctionOTCoupling()`\n"
        f"- sliced W2 (200 directions) of {num} samples to {num} fresh target samples; "
        f"noise floor (two independent target draws): {floor:.4f}\n"
        f"- NFE to reach sliced W2 <= {quality:.3f} (1.5 x I-CFM's ODE value at NFE "
        f"{NFES[-1]}): I-CFM ODE {reach['I-CFM']}, I-CFM SDE {reach_sde}, OT-CFM ODE "
        f"{reach['OT-CFM']}\n"
        "- no OT-CFM SDE: its score is not a function of its velocity (coupled "
        "endpoints)\n\n"
        + markdown_table(["sampler \\ NFE", *map(str, NFES)], "l" + "r" * len(NFES), rows))
    log(body)
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
