"""GFlowNets: `px.gfn` trajectory balance against torchgfn on the hypergrid.

Usage:
    make torchgfn-venv                        # .venv-torchgfn: torch 2.13.0 (CPU), torchgfn
    .venv/bin/python benchmarks/bench_gfn.py [--quick] [--threads 1|default] [--no-results]

The setting is torchgfn's hypergrid example (`train_hypergrid.py` defaults): the
`HyperGrid` with the original reward (R0 = 0.1, R1 = 0.5, R2 = 2), side H = 8, in 2-D and
4-D; forward and backward MLPs with two hidden layers of 256 (ReLU; separate, untied
networks on both sides, as `px.gfn.MLPPolicy` has them), on torchgfn's K-hot encoding
(`Hypergrid.encode` is the same); trajectory balance on batches of 16 on-policy
trajectories; Adam with learning rate 1e-3 for the networks and 0.1 for log Z.

Measured, interleaved (one task of each side in turn) and as medians over the repeats:

- `step`: seconds per training step (sample a batch of trajectories, TB loss, gradient,
  Adam; batches of `--step-batches`: 128 on the 2-D grid and 512 on the 4-D grid, as
  issue 12 asks, reported also as training trajectories per second)
  over `--steps` steps after warm-up steps; ppl_ext's compile time apart (px.fit's
  `history.compile_time`; its `wall_time` excludes it);
- `converge`: steps until the *exact* L1 distance `Σ_x |P_T(x) − R(x)/Z|` falls below
  `--threshold`, checked every `--check-every` steps up to `--max-steps`. ppl_ext
  evaluates it with `px.gfn.evaluate` (DP over the state DAG). torchgfn's trained forward
  policy is exported as a table (its masked action probabilities at every state) and
  its exact terminal distribution is computed here, in the parent, by the same DP
  (`px.gfn.terminal_distribution` on a table policy), so both are judged alike.

- `reference` (`--tasks reference`): torchgfn's reference test settings (batch 128,
  250 iterations, the same networks and learning rates, learned backward policy) on each
  side for `--ref-seeds` seeds, for the objectives of `--ref-losses` (TB, DB, SubTB with
  λ = 0.9 geometric-within weighting, LPV = log-partition variance; torchgfn's
  `TBGFlowNet`, `DBGFlowNet`, `SubTBGFlowNet`, `LogPartitionVarianceGFlowNet`); then the
  exact L1, `|log Z − log Z*|` and torchgfn's sampled L1 (mean over states, 200,000
  terminal states drawn as one multinomial from the exact terminal distribution, the same
  law as sampled trajectories) for both sides, torchgfn's judged on its exported policy
  table by the same DP; mean ± standard error, median (worst), and the difference of the
  means with its SE (Welch; the seeds are unpaired). With `--ref-same-init` ppl_ext starts
  from torchgfn's initial weights of the same seed (paired seeds: the sides then differ
  only in the sampled trajectories and rounding; the SE is that of the paired
  differences). Both sides compute the same loss and gradient on the same trajectories
  from the same weights (checked to float32 rounding: TB on 2-D and 4-D).

torchgfn needs torch, whose CPU wheel here is for Python 3.11, so it runs in a worker
subprocess under `.venv-torchgfn`; the main process sends it one JSON task at a time.
Threads: XLA, torch and the BLAS/OpenMP libraries pinned to one (`--threads 1`, default;
`torch.set_num_threads(1)` in the worker), or left at their defaults.
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
WORKER_PYTHON = ROOT / ".venv-torchgfn" / "bin" / "python"
HIDDEN, BATCH, LEARNING_RATE, LOG_Z_LEARNING_RATE = 256, 16, 1e-3, 0.1


# ------------------------------------------------------------------- the torchgfn worker


def worker(pinned: bool) -> int:
    """Read JSON tasks from stdin, answer one JSON line each."""
    import itertools

    import torch
    from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
    from gfn.gflownet import (DBGFlowNet, LogPartitionVarianceGFlowNet, SubTBGFlowNet,
                              TBGFlowNet)
    from gfn.gym import HyperGrid
    from gfn.preprocessors import KHotPreprocessor
    from gfn.utils.modules import MLP

    if pinned:
        torch.set_num_threads(1)

    def build(dimension, side, seed, loss="TB"):
        """torchgfn's hypergrid GFlowNet for `loss` (TB, DB, SubTB or LPV), as its
        `train_hypergrid.py` builds it: K-hot preprocessor, separate MLPs 2 x 256 for
        P_F, P_B (and log F for DB and SubTB, built after them), log Z a scalar at 0;
        Adam 1e-3 for the networks, 0.1 for log Z."""
        torch.manual_seed(seed)
        env = HyperGrid(ndim=dimension, height=side)
        preprocessor = KHotPreprocessor(height=side, ndim=dimension)
        module_pf = MLP(input_dim=preprocessor.output_dim, output_dim=env.n_actions,
                        hidden_dim=HIDDEN, n_hidden_layers=2)
        module_pb = MLP(input_dim=preprocessor.output_dim, output_dim=env.n_actions - 1,
                        hidden_dim=HIDDEN, n_hidden_layers=2)
        pf = DiscretePolicyEstimator(module_pf, env.n_actions, preprocessor=preprocessor)
        pb = DiscretePolicyEstimator(module_pb, env.n_actions, preprocessor=preprocessor,
                                     is_backward=True)
        modules = {"forward": module_pf, "backward": module_pb}
        if loss in ("DB", "SubTB"):
            module_flow = MLP(input_dim=preprocessor.output_dim, output_dim=1,
                              hidden_dim=HIDDEN, n_hidden_layers=2)
            modules["log_flow"] = module_flow
            log_flow = ScalarEstimator(module_flow, preprocessor=preprocessor)
            if loss == "DB":
                gflownet = DBGFlowNet(pf=pf, pb=pb, logF=log_flow)
            else:
                gflownet = SubTBGFlowNet(pf=pf, pb=pb, logF=log_flow, lamda=0.9,
                                         weighting="geometric_within")
            optimizer = torch.optim.Adam(gflownet.parameters(), lr=LEARNING_RATE)
        elif loss == "LPV":
            gflownet = LogPartitionVarianceGFlowNet(pf=pf, pb=pb)
            optimizer = torch.optim.Adam(gflownet.pf_pb_parameters(), lr=LEARNING_RATE)
        else:
            gflownet = TBGFlowNet(pf=pf, pb=pb, init_logZ=0.0)
            optimizer = torch.optim.Adam(gflownet.pf_pb_parameters(), lr=LEARNING_RATE)
            optimizer.add_param_group({"params": gflownet.logz_parameters(),
                                       "lr": LOG_Z_LEARNING_RATE})
        return env, pf, gflownet, optimizer, modules

    def weights(modules):
        """The MLPs' layers as [[weight, bias], ...] lists (out x in weights, as equinox)."""
        out = {}
        for name, module in modules.items():
            layers = [m for m in module.trunk if isinstance(m, torch.nn.Linear)]
            layers.append(module.last_layer)
            out[name] = [[layer.weight.detach().tolist(), layer.bias.detach().tolist()]
                         for layer in layers]
        return out

    def log_z_of(env, gflownet, loss):
        """log Z: the TB scalar, log F(s0) of the flow network (DB, SubTB), none for LPV."""
        if loss == "TB":
            return float(gflownet.logZ.detach())
        if loss in ("DB", "SubTB"):
            with torch.no_grad():
                s0 = env.states_from_tensor(torch.zeros((1, env.ndim), dtype=torch.long))
                return float(gflownet.logF(s0).reshape(-1)[0])
        return None

    def train_step(env, gflownet, optimizer, batch=BATCH):
        trajectories = gflownet.sample_trajectories(env, n=batch, save_logprobs=True)
        optimizer.zero_grad()
        samples = gflownet.to_training_samples(trajectories)  # DB: transitions
        loss = gflownet.loss(env, samples, recalculate_all_logprobs=False)
        loss.backward()
        optimizer.step()

    def policy_table(env, pf, dimension, side):
        """P_F(a | s) at every state, rows in row-major order of the coordinates."""
        grid = torch.tensor(list(itertools.product(range(side), repeat=dimension)))
        states = env.states_from_tensor(grid)
        with torch.no_grad():
            output = pf(states)
            probs = pf.to_probability_distribution(states, output).probs
        return probs.tolist()

    for line in sys.stdin:
        task = json.loads(line)
        if task["name"] == "describe":  # versions and the rewards of every state
            from importlib.metadata import version

            dimension, side = task["dimension"], task["side"]
            env = HyperGrid(ndim=dimension, height=side)
            grid = torch.tensor(list(itertools.product(range(side), repeat=dimension)))
            log_rewards = env.log_reward(env.states_from_tensor(grid))
            print(json.dumps({"versions": f"torch {torch.__version__}, torchgfn "
                                          f"{version('torchgfn')}",
                              "log_rewards": log_rewards.tolist()}), flush=True)
            continue
        dimension, side, seed = task["dimension"], task["side"], task["seed"]
        loss = task.get("loss", "TB")
        env, pf, gflownet, optimizer, modules = build(dimension, side, seed, loss)
        if task["name"] == "weights":  # the initial weights of this seed
            answer = {"weights": weights(modules)}
        elif task["name"] == "step":
            batch = task.get("batch", BATCH)
            for _ in range(task["warmup"]):
                train_step(env, gflownet, optimizer, batch)
            start = time.perf_counter()
            for _ in range(task["steps"]):
                train_step(env, gflownet, optimizer, batch)
            answer = {"seconds": (time.perf_counter() - start) / task["steps"]}
        elif task["name"] == "reference":  # a fixed number of steps, then the policy
            start = time.perf_counter()
            for _ in range(task["iterations"]):
                train_step(env, gflownet, optimizer, task["batch"])
            answer = {"train_seconds": time.perf_counter() - start,
                      "table": policy_table(env, pf, dimension, side),
                      "log_z": log_z_of(env, gflownet, loss)}
        else:  # converge: policy tables at the checkpoints, judged by the parent
            tables, seconds = [], 0.0
            for step in range(1, task["max_steps"] + 1):
                start = time.perf_counter()
                train_step(env, gflownet, optimizer)
                seconds += time.perf_counter() - start
                if step % task["check_every"] == 0:
                    tables.append([step, policy_table(env, pf, dimension, side),
                                   float(gflownet.logZ.detach())])
                    if task.get("stop_when") is not None:
                        # the parent answers whether to go on (its exact L1 < threshold)
                        print(json.dumps({"checkpoint": tables[-1]}), flush=True)
                        if json.loads(sys.stdin.readline())["stop"]:
                            break
            answer = {"steps": step, "train_seconds": seconds}
        print(json.dumps(answer), flush=True)
    return 0


def Worker(python: Path, pinned: bool) -> PeerWorker:
    """The torchgfn worker: this script with `--worker` under `python`."""
    return PeerWorker(python, __file__, ["--worker"] + ([] if pinned else ["--threads", "default"]),
                      name="torchgfn")


# ------------------------------------------------------------------------ the main side


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-D only, short runs, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=200, help="timed steps per step task")
    p.add_argument("--threshold", type=float, default=0.1, help="exact L1 to reach")
    p.add_argument("--check-every", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--dimensions", default="2,4")
    p.add_argument("--step-batches", default="2:128,4:512",
                   help="batch size of the step task per dimension, dimension:batch,... "
                        "(issue 12: 128 on the 2-D grid, 512 on the 4-D grid)")
    p.add_argument("--tasks", default="step,converge",
                   help="comma-separated: step (time per step), converge (steps to L1), "
                        "reference (torchgfn's reference test settings: exact L1 and "
                        "|log Z error| after --ref-iterations steps of --ref-batch)")
    p.add_argument("--ref-iterations", type=int, default=250)
    p.add_argument("--ref-batch", type=int, default=128)
    p.add_argument("--ref-seeds", type=int, default=5)
    p.add_argument("--ref-first-seed", type=int, default=200,
                   help="seeds of the reference task: this one and the next --ref-seeds - 1")
    p.add_argument("--ref-losses", default="TB",
                   help="comma-separated objectives of the reference task, both sides: TB, "
                        "DB, SubTB (lambda 0.9, geometric within), LPV (log-partition "
                        "variance)")
    p.add_argument("--ref-initial-flow", choices=("head", "log_z"), default="head",
                   help="where ppl_ext's DB/SubTB read log F(s0): the flow head (default, "
                        "torchgfn's parametrisation) or params['log_z'] (Adam 0.1)")
    p.add_argument("--ref-same-init", action="store_true",
                   help="paired seeds: ppl_ext starts from torchgfn's initial weights of "
                        "the same seed (then the sides differ only in the sampled "
                        "trajectories and float rounding)")
    p.add_argument("--threads", choices=("1", "default"), default="1")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(PINNED)
    for path in (HERE, ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import ppl_ext as px
    from _common import (command_line, load_average, log, machine, markdown_table, report,
                         results_heading, versions)
    from ppl_ext import gfn

    if not WORKER_PYTHON.exists():
        raise SystemExit("no .venv-torchgfn: run `make torchgfn-venv` first")
    command = command_line(argv, "benchmarks/bench_gfn.py")
    log(f"# {command}; load {load_average()}")
    dimensions = [2] if args.quick else [int(d) for d in args.dimensions.split(",")]
    repeats = 1 if args.quick else args.repeats
    steps = min(args.steps, 50) if args.quick else args.steps
    max_steps = min(args.max_steps, 2000) if args.quick else args.max_steps
    side = 8

    class TablePolicy(gfn.AbstractPolicy):
        """A forward policy given as a table of probabilities (torchgfn's, exported)."""

        env: gfn.AbstractEnvironment

        def init(self, key, log_flow=False):
            raise NotImplementedError

        def forward_log_probs(self, params, state):
            return jnp.log(params["forward"][self.env.state_index(state)])

        def backward_log_probs(self, params, state):
            mask = self.env.backward_mask(state)
            return jnp.where(mask, -jnp.log(jnp.sum(mask)), -jnp.inf)

    def exact_l1(policy, table):
        table = np.asarray(table, np.float64)
        masks = np.asarray(jax.vmap(policy.env.forward_mask)(policy.env.all_states()))
        # torchgfn's exported rows: distributions over the valid actions, in our order
        np.testing.assert_allclose(table.sum(1), 1.0, atol=1e-4)
        assert np.all(table[~masks] < 1e-6), "torchgfn puts mass on an invalid action"
        params = {"forward": jnp.asarray(table, jnp.float32), "log_z": jnp.zeros(())}
        model = gfn.terminal_distribution(policy, params)
        return float(jnp.sum(jnp.abs(model - gfn.reward_distribution(policy.env))))

    def adam(params):
        labels = {name: ("log_z" if name == "log_z" else "net") for name in params}
        return optax.multi_transform({"net": optax.adam(LEARNING_RATE),
                                      "log_z": optax.adam(LOG_Z_LEARNING_RATE)}, labels)

    step_batches = {int(d): int(b) for d, b in
                    (item.split(":") for item in args.step_batches.split(","))}

    def ours_step(dimension, seed):
        env = gfn.Hypergrid(dimension, side)
        policy = gfn.MLPPolicy(env, hidden_sizes=(HIDDEN, HIDDEN), learned_backward=True)
        params = policy.init(jax.random.key(seed))
        loss = gfn.trajectory_balance(policy, num_samples=step_batches.get(dimension, BATCH))
        warm = px.fit(loss, params, adam(params), 10, jax.random.key(seed), maximize=False,
                      progress=False, chunk_size=10)
        result = px.fit(loss, warm.params, adam(params), steps, jax.random.key(seed + 1),
                        maximize=False, progress=False, chunk_size=steps)
        return float(result.history.wall_time[-1]) / steps, float(result.history.compile_time)

    def ours_converge(dimension, seed):
        env = gfn.Hypergrid(dimension, side)
        policy = gfn.MLPPolicy(env, hidden_sizes=(HIDDEN, HIDDEN), learned_backward=True)
        params = policy.init(jax.random.key(seed))
        loss = gfn.trajectory_balance(policy, num_samples=BATCH)
        evaluate = eqx.filter_jit(gfn.evaluate)

        def stop(step, state, history):
            return bool(evaluate(policy, state.params).l1_distance < args.threshold)

        start = time.perf_counter()
        result = px.fit(loss, params, adam(params), max_steps, jax.random.key(seed),
                        maximize=False, progress=False, chunk_size=args.check_every,
                        early_stopping=stop)
        total = time.perf_counter() - start
        done = int(result.history.step[-1])
        final = float(evaluate(policy, result.params).l1_distance)
        return (done if final < args.threshold else None), float(
            result.history.wall_time[-1]), final

    def judge(policy, params, seed, log_z=None):
        """Exact L1 (sum), |log Z error|, and torchgfn's sampled L1 (the mean over states
        of |histogram − R/Z| on 200,000 terminal states: drawn here as one multinomial
        from the exact terminal distribution, the same law as 200,000 sampled
        trajectories, for both sides alike)."""
        model = np.asarray(gfn.terminal_distribution(policy, params), np.float64)
        target = np.asarray(gfn.reward_distribution(policy.env), np.float64)
        log_z = params["log_z"] if log_z is None else log_z
        log_z_error = abs(float(log_z) - float(gfn.log_partition(policy.env)))
        rng = np.random.default_rng(seed)
        histogram = rng.multinomial(200_000, model / model.sum()) / 200_000
        return (float(np.abs(model - target).sum()), log_z_error,
                float(np.abs(histogram - target).mean()))

    objectives = {
        "TB": gfn.trajectory_balance,
        # DB and SubTB read log F(s0) from the flow head, as torchgfn's DBGFlowNet and
        # SubTBGFlowNet do (their log Z is the flow network's output at s0)
        "DB": lambda policy, num_samples: gfn.detailed_balance(
            policy, num_samples=num_samples, initial_flow=args.ref_initial_flow),
        "SubTB": lambda policy, num_samples: gfn.subtrajectory_balance(
            policy, num_samples=num_samples, lamda=0.9, weighting="geometric_within",
            initial_flow=args.ref_initial_flow),
        "LPV": gfn.log_partition_variance,
    }
    ref_losses = args.ref_losses.split(",")
    if not ref_losses or not set(ref_losses) <= set(objectives):
        raise SystemExit(f"--ref-losses: TB, DB, SubTB and/or LPV, got {args.ref_losses!r}")

    def load_weights(params, weights):
        """`params` with the MLP layers replaced by torchgfn's initial weights."""
        params = dict(params)
        for name, layers in weights.items():
            params[name] = tuple(
                eqx.tree_at(lambda layer: (layer.weight, layer.bias), layer,
                            (jnp.asarray(w, layer.weight.dtype), jnp.asarray(b, layer.bias.dtype)))
                for layer, (w, b) in zip(params[name], layers, strict=True))
        return params

    def ours_reference(dimension, seed, loss_name="TB", weights=None):
        env = gfn.Hypergrid(dimension, side)
        policy = gfn.MLPPolicy(env, hidden_sizes=(HIDDEN, HIDDEN), learned_backward=True)
        params = policy.init(jax.random.key(seed), log_flow=loss_name in ("DB", "SubTB"))
        if weights is not None:
            params = load_weights(params, weights)
        head = loss_name in ("DB", "SubTB") and args.ref_initial_flow == "head"
        if head:  # log F(s0) is the flow head's: no separate log Z to train
            params = {name: value for name, value in params.items() if name != "log_z"}
        loss = objectives[loss_name](policy, num_samples=args.ref_batch)
        result = px.fit(loss, params, adam(params), args.ref_iterations,
                        jax.random.key(seed + 1), maximize=False, progress=False,
                        chunk_size=args.ref_iterations)
        log_z = policy.log_flow(result.params, env.initial_state()) if head else None
        l1, log_z_error, sampled = judge(policy, result.params, seed, log_z)
        if loss_name == "LPV":  # no log Z is learned
            log_z_error = float("nan")
        return l1, log_z_error, sampled, float(result.history.wall_time[-1])

    def theirs_weights(worker_proc, dimension, seed, loss_name):
        worker_proc.send({"name": "weights", "dimension": dimension, "side": side,
                          "seed": seed, "loss": loss_name})
        return worker_proc.read()["weights"]

    def theirs_reference(worker_proc, dimension, seed, loss_name="TB"):
        policy = TablePolicy(gfn.Hypergrid(dimension, side))
        worker_proc.send({"name": "reference", "dimension": dimension, "side": side,
                          "seed": seed, "iterations": args.ref_iterations,
                          "batch": args.ref_batch, "loss": loss_name})
        answer = worker_proc.read()
        exact_l1(policy, answer["table"])  # checks the exported table
        log_z = answer["log_z"]
        params = {"forward": jnp.asarray(answer["table"], jnp.float32),
                  "log_z": jnp.asarray(0.0 if log_z is None else log_z)}
        l1, log_z_error, sampled = judge(policy, params, seed)
        if log_z is None:
            log_z_error = float("nan")
        return l1, log_z_error, sampled, answer["train_seconds"]

    def theirs_converge(worker_proc, dimension, seed):
        policy = TablePolicy(gfn.Hypergrid(dimension, side))
        worker_proc.send({"name": "converge", "dimension": dimension, "side": side,
                          "seed": seed, "max_steps": max_steps,
                          "check_every": args.check_every, "stop_when": args.threshold})
        reached, final = None, None
        while True:
            message = worker_proc.read()
            if "checkpoint" not in message:
                return reached, message["train_seconds"], final
            step, table, _ = message["checkpoint"]
            final = exact_l1(policy, table)
            stop = final < args.threshold
            if stop:
                reached = step
            worker_proc.send({"stop": stop})

    def describe(values):
        found = [v for v in values if v is not None]
        missed = len(values) - len(found)
        text = "n/a" if not found else f"{statistics.median(found):.0f}"
        return text + (f" ({missed} of {len(values)} not within {max_steps})" if missed else "")

    tasks = set(args.tasks.split(","))
    if not tasks or not tasks <= {"step", "converge", "reference"}:
        raise SystemExit(f"--tasks: step, converge and/or reference, got {args.tasks!r}")
    worker_proc = Worker(WORKER_PYTHON, PINNED)
    step_rows, converge_rows, reference_rows = [], [], []
    peer_versions = ""
    for dimension in dimensions:
        # the same target: torchgfn's rewards on every state against px.gfn.Hypergrid's
        worker_proc.send({"name": "describe", "dimension": dimension, "side": side})
        described = worker_proc.read()
        peer_versions = described["versions"]
        env = gfn.Hypergrid(dimension, side)
        np.testing.assert_allclose(np.asarray(described["log_rewards"]),
                                   np.asarray(jax.vmap(env.log_reward)(env.all_states())),
                                   rtol=1e-5, atol=1e-6)
        if "step" not in tasks:
            continue
        # warm-up of both sides (imports, first compilation)
        ours_step(dimension, 999)
        step_batch = step_batches.get(dimension, BATCH)
        worker_proc.send({"name": "step", "dimension": dimension, "side": side, "seed": 999,
                          "warmup": 2, "steps": 5, "batch": step_batch})
        worker_proc.read()
        mine, compiles, theirs = [], [], []
        for r in range(repeats):  # interleaved
            seconds, compile_s = ours_step(dimension, r)
            mine.append(seconds)
            compiles.append(compile_s)
            worker_proc.send({"name": "step", "dimension": dimension, "side": side,
                              "seed": r, "warmup": 10, "steps": steps, "batch": step_batch})
            theirs.append(worker_proc.read()["seconds"])
            log(f"  step D={dimension} repeat {r}: ppl_ext {mine[-1] * 1e3:.2f} ms, "
                f"torchgfn {theirs[-1] * 1e3:.2f} ms")
        t_mine, t_theirs = statistics.median(mine), statistics.median(theirs)
        step_rows.append([f"{dimension}-D, H={side}", f"{step_batch}", f"{t_mine * 1e3:.2f}",
                          f"{t_theirs * 1e3:.2f}", f"{step_batch / t_mine:.0f}",
                          f"{step_batch / t_theirs:.0f}", f"{t_theirs / t_mine:.1f}x",
                          f"{statistics.median(compiles):.2f}"])
        log("  " + " | ".join(map(str, step_rows[-1])))
    for dimension in dimensions if "converge" in tasks else []:
        mine_steps, their_steps, mine_s, their_s, mine_l1, their_l1 = [], [], [], [], [], []
        for r in range(repeats):
            reached, train_s, final = ours_converge(dimension, 100 + r)
            mine_steps.append(reached)
            mine_s.append(train_s)
            mine_l1.append(final)
            reached, train_s, final = theirs_converge(worker_proc, dimension, 100 + r)
            their_steps.append(reached)
            their_s.append(train_s)
            their_l1.append(final)
            log(f"  converge D={dimension} repeat {r}: ppl_ext {mine_steps[-1]} steps "
                f"({mine_s[-1]:.1f} s, L1 {mine_l1[-1]:.3f}), torchgfn {their_steps[-1]} "
                f"steps ({their_s[-1]:.1f} s, L1 {their_l1[-1]:.3f})")
        converge_rows.append([f"{dimension}-D, H={side}", describe(mine_steps),
                              describe(their_steps), f"{statistics.median(mine_s):.1f}",
                              f"{statistics.median(their_s):.1f}",
                              f"{statistics.median(mine_l1):.3f}",
                              f"{statistics.median(their_l1):.3f}"])
        log("  " + " | ".join(map(str, converge_rows[-1])))
    def mean_se(values):
        values = np.asarray(values, float)
        if np.all(np.isnan(values)):
            return "n/a"
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        return f"{values.mean():.4f} ± {se:.4f}"

    def median_worst(values):
        values = np.asarray(values, float)
        if np.all(np.isnan(values)):
            return "n/a"
        return f"{np.median(values):.4f} ({values.max():.4f})"

    def compare(mine, theirs, paired):
        """ppl_ext − torchgfn: difference of the means ± its standard error (Welch for
        unpaired seeds; the SE of the per-seed differences for paired ones), and whether
        ours is no worse (mean <= theirs) or at least not significantly worse (<= 2 SE)."""
        mine, theirs = np.asarray(mine, float), np.asarray(theirs, float)
        if np.all(np.isnan(mine)) or len(mine) < 2:
            return "n/a"
        if paired:
            diff = mine - theirs
            delta, se = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
        else:
            delta = mine.mean() - theirs.mean()
            se = np.sqrt(mine.var(ddof=1) / len(mine) + theirs.var(ddof=1) / len(theirs))
        verdict = ("no worse" if delta <= 0 else
                   "worse, within 2 SE" if delta <= 2 * se else "WORSE (> 2 SE)")
        return f"{delta:+.4f} ± {se:.4f}: {verdict}"

    reference_raw = {}
    for dimension in dimensions if "reference" in tasks else []:
        for loss_name in ref_losses:
            found = {"ppl_ext": [], "torchgfn": []}
            for seed in range(args.ref_seeds):  # interleaved
                seed_value = args.ref_first_seed + seed
                weights = (theirs_weights(worker_proc, dimension, seed_value, loss_name)
                           if args.ref_same_init else None)
                found["ppl_ext"].append(ours_reference(dimension, seed_value, loss_name,
                                                       weights))
                found["torchgfn"].append(theirs_reference(worker_proc, dimension, seed_value,
                                                          loss_name))
                log(f"  reference D={dimension} {loss_name} seed {seed}: " + "; ".join(
                    f"{name} exact L1 {v[-1][0]:.4f}, |log Z err| {v[-1][1]:.4f}, sampled "
                    f"L1 {v[-1][2]:.5f}, {v[-1][3]:.1f} s" for name, v in found.items()))
            reference_raw[f"{dimension}-D {loss_name}"] = {
                name: np.asarray(v).tolist() for name, v in found.items()}
            for name, values in found.items():
                values = np.asarray(values, float)
                reference_rows.append([
                    f"{dimension}-D, H={side}", loss_name, name,
                    mean_se(values[:, 0]), median_worst(values[:, 0]),
                    mean_se(values[:, 1]), median_worst(values[:, 1]),
                    f"{np.median(values[:, 2]):.5f}", f"{np.median(values[:, 3]):.1f}"])
            mine = np.asarray(found["ppl_ext"], float)
            theirs = np.asarray(found["torchgfn"], float)
            reference_rows.append([
                f"{dimension}-D, H={side}", loss_name, "ppl_ext − torchgfn",
                compare(mine[:, 0], theirs[:, 0], args.ref_same_init),
                f"seeds no worse {int(np.sum(mine[:, 0] <= theirs[:, 0]))}/{len(mine)}",
                compare(mine[:, 1], theirs[:, 1], args.ref_same_init),
                "n/a" if np.all(np.isnan(mine[:, 1])) else
                f"seeds no worse {int(np.sum(mine[:, 1] <= theirs[:, 1]))}/{len(mine)}",
                "", ""])
            log("  " + " | ".join(map(str, reference_rows[-1])))
    if reference_raw:
        log("raw reference values (exact L1, |log Z err|, sampled L1, train s): "
            + json.dumps(reference_raw))
    worker_proc.close()
    body = (
        results_heading("bench_gfn.py", command, versions(("equinox", "optax"),
                                                           [peer_versions]))
        + f"- machine: {machine()}; load before the run {load_average()}; threads: "
        f"{args.threads} (XLA, BLAS and torch, also in the torchgfn worker); repeats: "
        f"{repeats}{' (QUICK)' if args.quick else ''}\n"
        "- torchgfn in a worker subprocess under .venv-torchgfn (CPU torch); hypergrid with "
        "the original reward (torchgfn's rewards checked equal to px.gfn.Hypergrid's on "
        "every state), MLPs 2 x 256 (separate forward and backward), TB, Adam 1e-3 "
        f"(log Z 0.1), on-policy; batch {BATCH} in the converge task\n"
    )
    if step_rows:
        body += (
            f"- time per training step (sample a batch of trajectories, TB loss, gradient, "
            f"Adam): median over the repeats of the mean over {steps} steps (after "
            "warm-up); training trajectories per second = batch / time per step; ppl_ext's "
            "compile time apart\n\n"
            + markdown_table(["grid", "batch", "ppl_ext ms/step", "torchgfn ms/step",
                              "ppl_ext traj/s", "torchgfn traj/s", "speed-up",
                              "ppl_ext compile s"], "lrrrrrrr", step_rows) + "\n")
    if converge_rows:
        body += (
            f"- steps to an exact L1 < {args.threshold} (Σ_x |P_T(x) − R(x)/Z|, checked "
            f"every {args.check_every} steps, at most {max_steps}; torchgfn's policy "
            "exported and its terminal distribution computed by the same DP), median over "
            "the repeats (seeds differ between the sides: same settings, not the same "
            "initial weights); training seconds exclude the checks; last L1: the exact L1 "
            "where each run stopped\n\n"
            + markdown_table(["grid", "ppl_ext steps", "torchgfn steps", "ppl_ext train s",
                              "torchgfn train s", "ppl_ext last L1", "torchgfn last L1"],
                             "lrrrrrr", converge_rows))
    if reference_rows:
        pairing = ("paired seeds: ppl_ext starts from torchgfn's initial weights of the same "
                   "seed, so the sides differ only in the sampled trajectories and rounding"
                   if args.ref_same_init else
                   "unpaired seeds: same settings, not the same initial weights")
        body += (
            f"\n- torchgfn's reference test settings: batch {args.ref_batch}, "
            f"{args.ref_iterations} iterations, Adam 1e-3 (log Z 0.1), MLPs 2 x 256 "
            f"(separate P_F, P_B and, for DB and SubTB, log F), learned backward policy, "
            f"on-policy, float32; seeds {args.ref_first_seed} to "
            f"{args.ref_first_seed + args.ref_seeds - 1}; objectives {', '.join(ref_losses)} (SubTB: lambda 0.9, "
            "geometric within; LPV: log-partition variance, no log Z learned; DB and "
            "SubTB: torchgfn's log F(s0) is its log F network at s0, ppl_ext's "
            + ("the same (initial_flow='head')" if args.ref_initial_flow == "head"
               else "the scalar log Z at lr 0.1 (initial_flow='log_z')")
            + f"); {args.ref_seeds} seeds per side ({pairing}). "
            "Exact L1: Σ_x |P_T(x) − R(x)/Z| by DP (torchgfn's policy exported as a table); "
            "|log Z − log Z*|; sampled L1: torchgfn's older metric, the mean over states "
            "of |histogram − R/Z| on 200,000 terminal states drawn as one multinomial from "
            "the exact P_T (targets of torchgfn's test as quoted in issue 12: 0.012 for 2-D "
            "and 0.25 for 4-D). Mean ± standard error and median (worst) over the seeds. "
            "'ppl_ext − torchgfn': the difference of the means ± its SE ("
            + ("SE of the per-seed paired differences" if args.ref_same_init else
               "Welch: the seeds are unpaired, so the comparison is on the means")
            + "); 'no worse' when it is <= 0, 'within 2 SE' when positive but at most 2 SE"
            "; 'seeds no worse': seed indices where ppl_ext's value <= torchgfn's\n\n"
            + markdown_table(["grid", "loss", "side", "exact L1 mean ± SE",
                              "exact L1 median (worst)", "log Z abs. err. mean ± SE",
                              "log Z abs. err. median (worst)", "sampled L1 median",
                              "train s"], "lllllllrr", reference_rows) + "\n")
    log(body)
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
