"""Discrete latents: seconds per epoch and held-out objective at equal wall-clock.

Usage:
    .venv/bin/python benchmarks/bench_discrete.py [--quick] [--budget S] [--contenders ...]
                                                  [--python-loop]

Model: a sigmoid belief net on the binarised 8x8 digits (`models.digits.load_split()`,
1438 training / 359 test images of 64 binary pixels) with 8 binary latents per image:

    h_j ~ Bernoulli(logits = prior_logits_j)            j = 1..8
    x   ~ Bernoulli(logits = W h + b)                   64 pixels
    q(h | x) = prod_j Bernoulli(h_j; logits = (enc_W x + enc_b)_j)

2^8 = 256 latent configurations per image, so the held-out log-likelihood
log p(x) = logsumexp_h log p(x, h) and the ELBO E_q[log p(x, h) - log q(h | x)] are computed
EXACTLY by enumeration (`exact_scores`, numpy float64, the same function for every
contender). Every contender starts from the same parameters (numpy arrays given to JAX
and torch), visits the minibatches in the same order (an epoch is 22 minibatches of 64
images of a fresh permutation; the 30 images left over are skipped, so shapes never
change), and uses Adam (lr 1e-2, betas 0.9/0.999, eps 1e-8; optax in JAX, torch.optim in
Pyro). Losses are summed over the minibatch (no subsampling scale).

Contenders (key: what runs):

    reinforce         ppl_ext, ELBO, px.reinforce on the latent site
    baseline          ppl_ext, ELBO, px.Reinforce(baseline=px.RunningAverage(decay 0.9))
    vimco             ppl_ext, px.vi.vimco with K=5 particles (IWELBO objective)
    enum              ppl_ext, ELBO, px.enum (exact sum over the 256 configurations)
    mvd               ppl_ext, ELBO, px.mvd (8 coordinates x 2 extra continuations)
    loo               ppl_ext, ELBO, px.LeaveOneOut(4)
    numpyro-tracegraph          numpyro.infer.TraceGraph_ELBO (SVI)
    numpyro-traceenum           numpyro.infer.TraceEnum_ELBO, guide-side enumeration
    pyro-tracegraph             pyro.infer.TraceGraph_ELBO (eager)
    pyro-tracegraph-baseline    the same with use_decaying_avg_baseline (beta 0.9)
    pyro-jit-tracegraph         pyro.infer.JitTraceGraph_ELBO
    pyro-traceenum              pyro.infer.TraceEnum_ELBO, guide-side enumeration (eager)
    pyro-jit-traceenum          pyro.infer.JitTraceEnum_ELBO

The ppl_ext contenders and NumPyro's TraceGraph_ELBO use one NumPyro model/guide pair
(`numpyro_sbn`): called on one image it has a latent site "h" of 8 independent units; on
a minibatch the same code runs inside `numpyro.plate("batch")` with the 8 units as the
event. ppl_ext objectives (`px.vi.elbo`/`px.vi.vimco` over `px.gen.NumPyroModel`) are
written per image and `jax.vmap`ped over the minibatch *outside* the expectation, then
summed: each image's score is multiplied by its own ELBO term, which is exactly the
plate-wise Rao-Blackwellisation TraceGraph_ELBO does, and it is also what makes px.enum
(256 joint values per image instead of 2^(8*64)) and px.mvd usable. The TraceEnum
contenders need one site per unit (`h_0..h_7`, each its own enumeration dimension):
`numpyro_sbn_by_unit` / `pyro_sbn(by_unit=True)`; their guides enumerate all eight, so
they compute the same exact ELBO gradient as px.enum. Distributions are built with
`validate_args=False` (JAX) and `pyro.enable_validation(False)` (Pyro); bench_adev.py
measures what validation costs.

Pyro runs on the CPU in a worker subprocess (`--pyro-worker`) under `--pyro-python`
(default: this interpreter if it imports torch and pyro, else `.venv-pyro/bin/python`):
the CPU wheel of torch 2.13.0 on this machine exists for Python 3.11 only, and PyPI's
torch for Python 3.12 pulls in the CUDA packages. The two processes never run at the same
time (the main process waits on the worker), torch uses `torch.set_num_threads(T)` with
T = the cores this process may use (JAX's CPU backend uses them all), and epochs are
interleaved across all contenders, in-process or not. The worker runs with
OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy`): with OpenMP's default spinning, two torch
threads on two busy cores made Pyro's epochs up to 10x slower here, which would flatter
ppl_ext.

Measured:

1. seconds per epoch: after compilation (timed separately: `lower` + XLA `compile` of the
   jitted epoch, or of the jitted update with `--python-loop`, in JAX; first update in
   Pyro's JIT variants, minus a plain update) and one warm-up epoch, the median over
   `--repeats` epochs, contenders interleaved round-robin. A JAX epoch is one jitted
   `lax.scan` of the update over the epoch's minibatches (one dispatch per epoch: how a
   JAX user writes a fast epoch); with `--python-loop` it is a Python loop of jitted
   updates, one dispatch per minibatch. Pyro always loops over `SVI.step` in Python, in
   its eager and its JIT variants (both reported).
   Ratios: Pyro seconds/epoch / ppl_ext seconds/epoch per pairing (target >= 5x against
   the faster of Pyro's eager and JIT variant of the same estimator).
2. objective at equal wall-clock: each contender trains from the initial parameters for
   `--budget` seconds of training time (compilation excluded, see 1; the clock is read at
   epoch ends in JAX and after every update in Pyro; evaluation is off the clock; the
   contenders take turns in five slices of the budget, so load changes hit all); the
   exact held-out log-likelihood and ELBO (nats per test image) of the final parameters
   and at 25% / 50% of the budget. `--curve-csv PATH` writes every checkpoint.
3. a Monte-Carlo check of every contender's gradient at the initial parameters
   against the exact ELBO gradient (autodiff of `exact_scores` in jax.numpy): max |z| over
   parameter entries of the mean of `--check-draws` estimates, flagged past a Bonferroni
   Student-t limit (a false alarm in 1 of 1000 runs for Gaussian estimates); deterministic
   estimators: max relative error. VIMCO estimates the IWELBO gradient, which has no exact
   value here, and is not checked.

The tables are printed and appended to benchmarks/RESULTS.md (unless --no-results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

# _common.py (next to this file) needs only the standard library: the Pyro worker imports it
if str(Path(__file__).resolve().parent) not in sys.path:  # _common.py is next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT, command_line, fmt, load_average, log, machine, markdown_table, report,
    results_heading, short_exception, versions)

NUM_LATENT = 8
NUM_PIXELS = 64
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
BASELINE_DECAY = 0.9
VIMCO_PARTICLES = 5
LOO_SAMPLES = 4
SEED = 0
SPEEDUP_TARGET = 5.0

PPL_EXT = ("reinforce", "baseline", "vimco", "enum", "mvd", "loo")
NUMPYRO = ("numpyro-tracegraph", "numpyro-traceenum")
PYRO = (
    "pyro-tracegraph",
    "pyro-tracegraph-baseline",
    "pyro-jit-tracegraph",
    "pyro-traceenum",
    "pyro-jit-traceenum",
)
CONTENDERS = PPL_EXT + NUMPYRO + PYRO

LABELS = {
    "reinforce": "ppl_ext px.reinforce",
    "baseline": f"ppl_ext px.Reinforce(baseline=RunningAverage({BASELINE_DECAY}))",
    "vimco": f"ppl_ext px.vi.vimco (K={VIMCO_PARTICLES})",
    "enum": "ppl_ext px.enum",
    "mvd": "ppl_ext px.mvd",
    "loo": f"ppl_ext px.LeaveOneOut({LOO_SAMPLES})",
    "numpyro-tracegraph": "NumPyro TraceGraph_ELBO",
    "numpyro-traceenum": "NumPyro TraceEnum_ELBO (guide enum)",
    "pyro-tracegraph": "Pyro TraceGraph_ELBO",
    "pyro-tracegraph-baseline": f"Pyro TraceGraph_ELBO + avg baseline ({BASELINE_DECAY})",
    "pyro-jit-tracegraph": "Pyro JitTraceGraph_ELBO",
    "pyro-traceenum": "Pyro TraceEnum_ELBO (guide enum)",
    "pyro-jit-traceenum": "Pyro JitTraceEnum_ELBO (guide enum)",
}

# ppl_ext contender -> (Pyro contenders with the same estimator, or the closest one;
# whether the estimator is the same)
PAIRINGS = {
    "reinforce": (("pyro-tracegraph", "pyro-jit-tracegraph"), True),
    "baseline": (("pyro-tracegraph-baseline",), True),
    "enum": (("pyro-traceenum", "pyro-jit-traceenum"), True),
    "vimco": (("pyro-tracegraph", "pyro-jit-tracegraph"), False),
    "mvd": (("pyro-tracegraph", "pyro-jit-tracegraph"), False),
    "loo": (("pyro-tracegraph", "pyro-jit-tracegraph"), False),
}
NUMPYRO_PAIRINGS = {"reinforce": "numpyro-tracegraph", "enum": "numpyro-traceenum"}


# ------------------------------------------------------------------ shared (numpy only)


def load_data():
    """Binarised digits: `(x_train, x_test)` float32 arrays of shape (n, 64)."""
    sys.path.insert(0, str(ROOT))
    from models import digits

    x_train, x_test, _, _ = digits.load_split()
    return np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)


def initial_params(x_train: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """The parameters every contender starts from (float32 numpy arrays).

    Weights are 0.1 x standard normals; `b` is the logit of the mean training pixel. No
    logit starts at exactly 0: numpyro's Bernoulli(logits).log_prob has a wrong derivative
    there (see the notes of the results), which would bias the first update of the JAX
    contenders only.
    """
    rng = np.random.default_rng(seed)
    mean = np.clip(x_train.mean(0), 0.01, 0.99)
    params = {
        "prior_logits": 0.1 * rng.standard_normal(NUM_LATENT),
        "W": 0.1 * rng.standard_normal((NUM_PIXELS, NUM_LATENT)),
        "b": np.log(mean / (1.0 - mean)),
        "enc_W": 0.1 * rng.standard_normal((NUM_LATENT, NUM_PIXELS)),
        "enc_b": 0.1 * rng.standard_normal(NUM_LATENT),
    }
    return {k: np.asarray(v, np.float32) for k, v in params.items()}


def epoch_order(epoch: int, n: int, seed: int = SEED) -> np.ndarray:
    """The permutation of the training images visited in `epoch` (same for everyone)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(x_train: np.ndarray, epoch: int) -> np.ndarray:
    """`(num_batches, BATCH_SIZE, 64)`: the full minibatches of one epoch."""
    num = x_train.shape[0] // BATCH_SIZE
    order = epoch_order(epoch, x_train.shape[0])[: num * BATCH_SIZE]
    return x_train[order].reshape(num, BATCH_SIZE, NUM_PIXELS)


def all_configurations(xp=np):
    """The 2^8 latent configurations, float array of shape (256, 8)."""
    bits = (np.arange(2**NUM_LATENT)[:, None] >> np.arange(NUM_LATENT)[None, :]) & 1
    return xp.asarray(bits.astype(np.float64))


def exact_scores(params, x, xp=np):
    """Exact mean log p(x) and mean ELBO per image, by enumerating the 256 configurations.

    `xp` is numpy (float64; used for every contender's results) or jax.numpy (for the
    gradient check). Returns `(log_likelihood, elbo)`.
    """

    def log_sigmoid(z):
        return -xp.logaddexp(0.0, -z)

    def logsumexp(a):
        m = xp.max(a, axis=1, keepdims=True)
        return (m + xp.log(xp.sum(xp.exp(a - m), axis=1, keepdims=True)))[:, 0]

    cfg = all_configurations(xp).astype(x.dtype)  # (256, 8)
    logits_x = cfg @ params["W"].T + params["b"]  # (256, 64)
    log_px_h = x @ log_sigmoid(logits_x).T + (1.0 - x) @ log_sigmoid(-logits_x).T
    prior = params["prior_logits"]
    log_ph = cfg @ log_sigmoid(prior) + (1.0 - cfg) @ log_sigmoid(-prior)  # (256,)
    log_joint = log_px_h + log_ph[None, :]  # (n, 256)
    enc = x @ params["enc_W"].T + params["enc_b"]  # (n, 8)
    log_q = log_sigmoid(enc) @ cfg.T + log_sigmoid(-enc) @ (1.0 - cfg).T  # (n, 256)
    elbo = xp.sum(xp.exp(log_q) * (log_joint - log_q), axis=1)
    return xp.mean(logsumexp(log_joint)), xp.mean(elbo)


def exact_scores64(params, x):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ll, elbo = exact_scores(p, np.asarray(x, np.float64))
    return float(ll), float(elbo)


# ---------------------------------------------------------------- Pyro side (torch only)


def pyro_sbn(init, by_unit: bool, prefix: str = ""):
    """The sigmoid belief net in Pyro: `(model, guide)` on a minibatch `x` (B, 64).

    `by_unit=False`: one site "h" with the 8 units as the event (TraceGraph_ELBO);
    `by_unit=True`: sites h_0..h_7 (each its own enumeration dimension), enumerated in the
    guide (TraceEnum_ELBO). Parameters `prefix + name` start as copies of `init` (torch
    tensors).
    """
    import pyro
    import pyro.distributions as pdist

    def param(name):
        return pyro.param(prefix + name, lambda: init[name].clone())

    def model(x):
        prior_logits, w, b = param("prior_logits"), param("W"), param("b")
        with pyro.plate("batch", x.shape[0]):
            if by_unit:
                logits = b
                for j in range(NUM_LATENT):
                    h_j = pyro.sample(f"h_{j}", pdist.Bernoulli(logits=prior_logits[j]))
                    logits = logits + h_j[..., None] * w[:, j]
            else:
                h = pyro.sample("h", pdist.Bernoulli(logits=prior_logits).to_event(1))
                logits = h @ w.T + b
            pyro.sample("x", pdist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x, baseline=False):
        logits = x @ param("enc_W").T + param("enc_b")
        with pyro.plate("batch", x.shape[0]):
            if by_unit:
                for j in range(NUM_LATENT):
                    pyro.sample(f"h_{j}", pdist.Bernoulli(logits=logits[:, j]),
                                infer={"enumerate": "parallel"})
            else:
                infer = {}
                if baseline:
                    infer = {"baseline": {"use_decaying_avg_baseline": True,
                                          "baseline_beta": BASELINE_DECAY}}
                pyro.sample("h", pdist.Bernoulli(logits=logits).to_event(1), infer=infer)

    return model, guide


class PyroRunner:
    """One Pyro contender: SVI with torch's Adam, eager or JIT-compiled loss."""

    def __init__(self, name, init, x_train):
        import pyro
        import pyro.infer as infer

        self.name, self.x_train = name, x_train
        self.init = {k: self._torch().tensor(v) for k, v in init.items()}
        # each contender has its own parameters in Pyro's global parameter store
        self.prefix = name + "/"
        by_unit = "traceenum" in name
        self.model, guide = pyro_sbn(self.init, by_unit, self.prefix)
        self.guide = (lambda x: guide(x, baseline=True)) if name.endswith("baseline") else guide
        self.loss = {
            "pyro-tracegraph": lambda: infer.TraceGraph_ELBO(),
            "pyro-tracegraph-baseline": lambda: infer.TraceGraph_ELBO(),
            "pyro-jit-tracegraph": lambda: infer.JitTraceGraph_ELBO(),
            "pyro-traceenum": lambda: infer.TraceEnum_ELBO(max_plate_nesting=1),
            "pyro-jit-traceenum": lambda: infer.JitTraceEnum_ELBO(max_plate_nesting=1),
        }[name]()
        self.pyro = pyro
        self.reset()

    @staticmethod
    def _torch():
        import torch

        return torch

    def reset(self):
        """Initial parameters (copied in place: a JIT loss looks them up by name) and a
        fresh optimiser; a JIT loss keeps its compiled graph."""
        torch = self._torch()
        store = self.pyro.get_param_store()
        with torch.no_grad():
            for name, value in self.init.items():
                if self.prefix + name in store:
                    self.pyro.param(self.prefix + name).unconstrained().copy_(value)
        for name in list(store.keys()):
            if name.startswith("__baseline"):  # the decaying average starts again at 0
                del store[name]
        optim = self.pyro.optim.Adam({"lr": LEARNING_RATE, "betas": (0.9, 0.999), "eps": 1e-8})
        self.svi = self.pyro.infer.SVI(self.model, self.guide, optim, loss=self.loss)

    def prepare(self):
        """Two updates (the first compiles a JIT loss), then reset. Returns their times."""
        torch = self._torch()
        xb = torch.from_numpy(epoch_batches(self.x_train, 0)[0])
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            self.svi.step(xb)
            times.append(time.perf_counter() - t0)
        self.reset()
        return times

    def run_epoch(self, epoch):
        torch = self._torch()
        batches = epoch_batches(self.x_train, epoch)
        t0 = time.perf_counter()
        total = 0.0
        for xb in batches:
            total += self.svi.step(torch.from_numpy(xb))
        return time.perf_counter() - t0, total / batches.shape[0]

    def gradients(self, draws):
        """`draws` estimates of the loss gradient at the initial parameters, each flattened
        (parameters in sorted order), on the first minibatch of epoch 0."""
        torch = self._torch()
        xb = torch.from_numpy(epoch_batches(self.x_train, 0)[0])
        self.reset()
        out = []
        for _ in range(draws):
            store = self.pyro.get_param_store()
            for name in self.init:
                if self.prefix + name in store:
                    self.pyro.param(self.prefix + name).unconstrained().grad = None
            self.loss.loss_and_grads(self.model, self.guide, xb)
            grads = [self.pyro.param(self.prefix + k).unconstrained().grad for k in sorted(self.init)]
            out.append(torch.cat([g.reshape(-1) for g in grads]).numpy().copy())
        self.reset()
        return np.stack(out)

    def params(self):
        store = self.pyro.get_param_store()
        return {k: store[self.prefix + k].detach().numpy().copy() for k in self.init}

    def begin_training(self, checkpoints):
        """Start training from the initial parameters; snapshots at `checkpoints` seconds."""
        self.reset()
        self.spent, self.steps, self.epoch, self.pending = 0.0, 0, 0, list(checkpoints)
        self.batches = iter(())

    def train_until(self, until):
        """Update until `until` seconds of update time in all; the new snapshots."""
        torch = self._torch()
        per_epoch = self.x_train.shape[0] // BATCH_SIZE
        snaps = []
        while self.spent < until:
            xb = next(self.batches, None)
            if xb is None:
                self.batches = iter(epoch_batches(self.x_train, 1000 + self.epoch))
                self.epoch += 1
                continue
            t0 = time.perf_counter()
            self.svi.step(torch.from_numpy(xb))
            self.spent += time.perf_counter() - t0
            self.steps += 1
            while self.pending and self.spent >= self.pending[0]:
                self.pending.pop(0)
                snaps.append((self.spent, self.steps / per_epoch, self.params()))
        return snaps


def pyro_worker() -> int:
    """Serve Pyro contenders over JSON lines on stdin/stdout (see PyroClient)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed goes to stderr
    import torch
    import pyro

    warnings.filterwarnings("ignore")
    runners, x_train = {}, None

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def tolist(params):
        return {k: v.tolist() for k, v in params.items()}

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "setup":
                torch.set_num_threads(msg["threads"])
                pyro.enable_validation(False)
                torch.manual_seed(SEED)
                data = np.load(msg["data"])
                x_train = data["x_train"]
                init = {k[5:]: data[k] for k in data.files if k.startswith("init_")}
                reply({
                    "torch": torch.__version__, "pyro": pyro.__version__,
                    "python": platform.python_version(), "threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                    "order0": epoch_order(0, x_train.shape[0])[:8].tolist(),
                })
            elif cmd == "prepare":
                runners[msg["name"]] = PyroRunner(msg["name"], init, x_train)
                reply({"times": runners[msg["name"]].prepare()})
            elif cmd == "epoch":
                seconds, loss = runners[msg["name"]].run_epoch(msg["epoch"])
                reply({"seconds": seconds, "loss": loss})
            elif cmd == "grads":
                g = runners[msg["name"]].gradients(msg["draws"])
                reply({"grads": g.tolist()})
            elif cmd == "begin_training":
                runners[msg["name"]].begin_training(msg["checkpoints"])
                reply({})
            elif cmd == "train_until":
                snaps = runners[msg["name"]].train_until(msg["until"])
                reply({"snapshots": [(t, e, tolist(p)) for t, e, p in snaps]})
            elif cmd == "quit":
                reply({})
                return 0
            else:
                reply({"error": f"unknown command {cmd!r}"})
        except Exception as exc:  # reported by the main process
            reply({"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}",
                   "traceback": traceback.format_exc()})
    return 0


class PyroClient:
    """The main process's end of the Pyro worker."""

    def __init__(self, python, data_path, threads, omp_wait_policy):
        env = dict(os.environ)
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--pyro-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=str(ROOT), env=env,
        )
        self.info = self.call("setup", data=str(data_path), threads=threads)

    def call(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Pyro worker exited (code {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            if os.environ.get("BENCH_TRACEBACK"):
                print(reply.get("traceback", ""), file=sys.stderr)
            raise RuntimeError(reply["error"])
        return reply

    def close(self):
        with contextlib.suppress(Exception):
            self.call("quit")
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


class RemotePyro:
    """A Pyro contender run by the worker, with the JAX runners' interface."""

    def __init__(self, client, name):
        self.client, self.name = client, name
        times = client.call("prepare", name=name)["times"]
        # JIT variants trace and compile in their first update
        self.compile_s = max(times[0] - times[1], 0.0) if "jit" in name else None

    def run_epoch(self, epoch):
        r = self.client.call("epoch", name=self.name, epoch=epoch)
        return r["seconds"], r["loss"]

    def gradients(self, draws):
        return np.asarray(self.client.call("grads", name=self.name, draws=draws)["grads"])

    def begin_training(self, checkpoints):
        self.client.call("begin_training", name=self.name, checkpoints=list(checkpoints))

    def train_until(self, until):
        r = self.client.call("train_until", name=self.name, until=until)
        return [(t, e, {k: np.asarray(v, np.float32) for k, v in p.items()})
                for t, e, p in r["snapshots"]]


# ------------------------------------------------------------------- JAX side (in process)

try:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    import scipy.stats
    from numpyro.infer import SVI, TraceEnum_ELBO, TraceGraph_ELBO

    import ppl_ext as px
except ImportError:  # the Pyro worker's interpreter has no JAX
    jax = None


def numpyro_sbn(init):
    """The sigmoid belief net as NumPyro functions `(model, guide)`, written once.

    Called on one image `x` of shape (64,), the latent site "h" is a batch of 8
    independent units (what ppl_ext's per-image objectives use; px.enum enumerates its
    256 joint values). Called on a minibatch (B, 64), the same code runs inside
    `numpyro.plate("batch", B)` with the 8 units as the event (TraceGraph_ELBO).
    """

    def units(d, x):
        return d if x.ndim == 1 else d.to_event(1)

    def plate(x):
        if x.ndim == 1:
            return contextlib.nullcontext()
        return numpyro.plate("batch", x.shape[0])

    def model(x):
        prior_logits = numpyro.param("prior_logits", init["prior_logits"])
        w = numpyro.param("W", init["W"])
        b = numpyro.param("b", init["b"])
        with plate(x):
            h = numpyro.sample(
                "h", units(dist.Bernoulli(logits=prior_logits, validate_args=False), x))
            numpyro.sample(
                "x", dist.Bernoulli(logits=h @ w.T + b, validate_args=False).to_event(1),
                obs=x)

    def guide(x):
        logits = x @ numpyro.param("enc_W", init["enc_W"]).T + numpyro.param(
            "enc_b", init["enc_b"])
        with plate(x):
            numpyro.sample("h", units(dist.Bernoulli(logits=logits, validate_args=False), x))

    return model, guide


def numpyro_sbn_by_unit(init):
    """The same net with one site per unit, h_0..h_7, enumerated in the guide."""

    def model(x):
        prior_logits = numpyro.param("prior_logits", init["prior_logits"])
        w = numpyro.param("W", init["W"])
        logits = numpyro.param("b", init["b"])
        with numpyro.plate("batch", x.shape[0]):
            for j in range(NUM_LATENT):
                h_j = numpyro.sample(
                    f"h_{j}", dist.Bernoulli(logits=prior_logits[j], validate_args=False))
                logits = logits + h_j[..., None] * w[:, j]
            numpyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1),
                           obs=x)

    def guide(x):
        logits = x @ numpyro.param("enc_W", init["enc_W"]).T + numpyro.param(
            "enc_b", init["enc_b"])
        with numpyro.plate("batch", x.shape[0]):
            for j in range(NUM_LATENT):
                numpyro.sample(f"h_{j}", dist.Bernoulli(logits=logits[:, j], validate_args=False),
                               infer={"enumerate": "parallel"})

    return model, guide


@contextlib.contextmanager
def _quiet_static_baseline():
    # px.gen.NumPyroModel keeps its estimators in a static field, so a Reinforce holding a
    # traced baseline makes equinox warn at trace time (see the notes of the results).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A JAX array is being set as static")
        yield


def ppl_ext_objective(name, model, guide, baseline=None):
    """The per-image objective of a ppl_ext contender, `objective(key, params, x)`."""
    m = px.gen.NumPyroModel(model)
    if name == "vimco":
        return px.vi.vimco(m, px.gen.NumPyroModel(guide), VIMCO_PARTICLES)
    estimator = {
        "reinforce": px.reinforce,
        "baseline": px.Reinforce(baseline=baseline),
        "enum": px.enum,
        "mvd": px.mvd,
        "loo": px.LeaveOneOut(LOO_SAMPLES),
    }[name]
    return px.vi.elbo(m, px.gen.NumPyroModel(guide, {"h": estimator}))


class JaxRunner:
    """A JAX contender: a jitted update `step(state, x) -> (state, loss)`, compiled ahead."""

    def __init__(self, name, init, x_train, scan=True):
        self.name, self.x_train, self.scan = name, x_train, scan
        self.init = {k: jnp.asarray(v) for k, v in init.items()}
        self.x0 = epoch_batches(x_train, 0)[0]
        if name in PPL_EXT:
            self._build_ppl_ext(name)
        else:
            self._build_numpyro(name)
        if scan:  # one dispatch per epoch: the updates are a lax.scan over the minibatches
            fn = lambda state, batches: jax.lax.scan(self.step_fn, state, batches)  # noqa: E731
            example = epoch_batches(x_train, 0)
        else:
            fn, example = self.step_fn, self.x0
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(self.initial_state(), example)
        t1 = time.perf_counter()
        self.step = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.xla_s = t1 - t0, t2 - t1
        self.compile_s = self.lower_s + self.xla_s
        self.state = self.initial_state()

    def _build_ppl_ext(self, name):
        model, guide = numpyro_sbn(self.init)
        optimizer = optax.adam(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8)

        def loss(params, key, x, baseline):
            with _quiet_static_baseline():
                objective = ppl_ext_objective(name, model, guide, baseline)
            keys = jax.random.split(key, x.shape[0])
            values = jax.vmap(lambda k, xi: objective(k, params, xi))(keys, x)
            return -jnp.sum(values), values

        def step(state, x):
            params, opt_state, baseline, key = state
            key, sub = jax.random.split(key)
            (value, per_image), grads = jax.value_and_grad(loss, has_aux=True)(
                params, sub, x, baseline.value)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, baseline.update(jnp.mean(per_image)), key), value

        def initial_state():
            return (self.init, optimizer.init(self.init),
                    px.RunningAverage(jnp.zeros(()), BASELINE_DECAY), jax.random.key(SEED))

        def grad(params, key, x, baseline):
            return jax.grad(lambda p: loss(p, key, x, baseline)[0])(params)

        self.step_fn, self.initial_state = step, initial_state
        self.params_of = lambda state: state[0]
        self.grad_fn = grad

    def _build_numpyro(self, name):
        if name == "numpyro-tracegraph":
            model, guide = numpyro_sbn(self.init)
            elbo = TraceGraph_ELBO()
        else:
            model, guide = numpyro_sbn_by_unit(self.init)
            elbo = TraceEnum_ELBO(max_plate_nesting=1)
        optimizer = numpyro.optim.optax_to_numpyro(
            optax.adam(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8))
        svi = SVI(model, guide, optimizer, loss=elbo)
        self.step_fn = svi.update
        self.initial_state = lambda: svi.init(jax.random.key(SEED), self.x0)
        self.params_of = svi.get_params

        def grad(params, key, x, baseline):
            return jax.grad(lambda p: elbo.loss(key, p, model, guide, x))(params)

        self.grad_fn = grad

    def reset(self):
        self.state = self.initial_state()

    def run_epoch(self, epoch):
        batches = epoch_batches(self.x_train, epoch)
        step, state = self.step, self.state
        t0 = time.perf_counter()
        if self.scan:
            state, losses = step(state, batches)
            jax.block_until_ready(state)
            seconds = time.perf_counter() - t0
            self.state = state
            return seconds, float(np.mean(np.asarray(losses)))
        losses = []
        for xb in batches:
            state, value = step(state, xb)
            losses.append(value)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0
        self.state = state
        return seconds, float(np.mean(np.asarray(losses)))

    def params(self):
        return {k: np.asarray(v) for k, v in jax.device_get(self.params_of(self.state)).items()
                if k in self.init}

    def begin_training(self, checkpoints):
        self.reset()
        self.spent, self.epoch, self.pending = 0.0, 0, list(checkpoints)

    def train_until(self, until):
        snaps = []
        while self.spent < until:
            seconds, _ = self.run_epoch(1000 + self.epoch)
            self.spent += seconds
            self.epoch += 1
            while self.pending and self.spent >= self.pending[0]:
                self.pending.pop(0)
                snaps.append((self.spent, float(self.epoch), self.params()))
        return snaps


# ------------------------------------------------------------------------------- phases


def measure_epochs(runners, repeats, log):
    """Median seconds per epoch (one warm-up epoch), contenders interleaved round-robin."""
    live = list(runners.items())
    samples = {name: [] for name, _ in live}
    losses = {name: None for name, _ in live}
    for rnd in range(repeats + 1):
        shift = rnd % len(live)
        times = {}
        for name, runner in live[shift:] + live[:shift]:
            times[name], losses[name] = runner.run_epoch(rnd)
            if rnd > 0:
                samples[name].append(times[name])
        log(f"  round {rnd}{' (warm-up)' if rnd == 0 else ''}: "
            + ", ".join(f"{n} {times[n]:.3f}" for n, _ in live) + " s")
    return {name: statistics.median(s) for name, s in samples.items()}, samples, losses


def measure_budget(runners, budget, x_test, log, slices=5):
    """Train each contender for `budget` seconds; exact held-out scores of the snapshots.

    Training is interleaved in `slices` rounds (each contender trains until k/slices of its
    budget in round k), so that a change in the machine's load hits every contender.
    """
    checkpoints = [budget * k / 20 for k in range(1, 21)]
    snaps = {name: [] for name in runners}
    wall = {name: 0.0 for name in runners}
    for name, runner in runners.items():
        runner.begin_training(checkpoints)
    for k in range(1, slices + 1):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            snaps[name] += runner.train_until(budget * k / slices)
            wall[name] += time.perf_counter() - t0
        log(f"  slice {k}/{slices} done")
    curves = {}
    for name in runners:
        curve = []
        for spent, epochs, params in snaps[name]:
            ll, elbo = exact_scores64(params, x_test)
            curve.append((spent, epochs, ll, elbo))
        curves[name] = curve
        log(f"  {name:<26} {curve[-1][1]:7.1f} epochs in {curve[-1][0]:5.1f} s "
            f"(wall {wall[name]:5.1f} s): held-out log p(x) {curve[-1][2]:8.3f}, "
            f"ELBO {curve[-1][3]:8.3f}")
    return curves


def check_gradients(runners, init, x_train, draws, log):
    """Mean of `draws` gradient estimates at `init` vs the exact ELBO gradient.

    The ppl_ext baseline contender is checked with a baseline near the per-image ELBO
    (so with b != 0); Pyro's decaying average starts at 0 and follows its draws.
    """
    xb = jnp.asarray(epoch_batches(x_train, 0)[0])
    params = {k: jnp.asarray(v) for k, v in init.items()}
    exact = jax.grad(lambda p: -xb.shape[0] * exact_scores(p, xb, jnp)[1])(params)
    exact_flat = np.concatenate([np.ravel(exact[k]) for k in sorted(exact)])
    # a baseline near the per-image ELBO, so the baseline contender is checked with b != 0
    b0 = px.RunningAverage(jnp.asarray(float(exact_scores(params, xb, jnp)[1])), BASELINE_DECAY)
    out = {}
    for name, runner in runners.items():
        if name == "vimco":
            continue
        deterministic = "enum" in name
        n = 1 if deterministic else draws
        if isinstance(runner, JaxRunner):
            fn = jax.jit(runner.grad_fn)
            g = []
            for key in jax.random.split(jax.random.key(123), n):
                grads = fn(params, key, xb, b0.value)
                g.append(np.concatenate([np.ravel(grads[k]) for k in sorted(grads)]))
            g = np.stack(g)
        else:  # Pyro: its decaying-average baseline starts at 0 and follows the draws
            g = runner.gradients(n)
        if not np.all(np.isfinite(g)):
            out[name] = "non-finite gradient estimates"
        elif deterministic:
            rel = np.max(np.abs(g[0] - exact_flat)) / np.max(np.abs(exact_flat))
            out[name] = f"exact (deterministic): max rel. error {rel:.1e}" + (
                " SUSPICIOUS" if rel > 1e-3 else "")
        else:
            se = g.std(axis=0, ddof=1) / np.sqrt(n)
            ok = se > 0
            z = np.abs(g.mean(axis=0) - exact_flat)[ok] / se[ok]
            zmax = float(np.max(z))
            # Bonferroni over the entries, Student t with n - 1 degrees of freedom:
            # a false alarm in 1 of 1000 checks if the estimates were Gaussian
            limit = float(scipy.stats.t.isf(1e-3 / (2 * ok.sum()), n - 1))
            out[name] = (f"{n} draws: max|z| {zmax:.1f} over {ok.sum()} entries (limit "
                         f"{limit:.1f}), median se/|exact| "
                         f"{np.median(se[ok] / (np.abs(exact_flat[ok]) + 1e-3)):.2f}"
                         + (" SUSPICIOUS" if zmax > limit else ""))
        log(f"  check {name:<20} {out[name]}")
    return out


# ------------------------------------------------------------------------------- report


def _at(curve, fraction, budget):
    """Held-out log-lik at the first checkpoint past `fraction` of the budget."""
    for spent, _, ll, _ in curve:
        if spent >= fraction * budget - 1e-9:
            return ll
    return None


def epoch_table(names, per_epoch, compile_s, samples, losses) -> str:
    rows = []
    for n in names:
        if n not in per_epoch:
            rows.append([LABELS[n], "n/a"])
            continue
        s = samples[n]
        rows.append([LABELS[n], f"{per_epoch[n]:.4f}", f"{min(s):.4f}–{max(s):.4f}",
                     fmt(compile_s.get(n), ".2f"), len(s), fmt(losses.get(n), ".1f")])
    return markdown_table(["contender", "s / epoch (median)", "min–max", "compile (s)",
                           "epochs", "train loss (last epoch, per batch)"], "lrrrrr", rows)


def ratio_table(per_epoch) -> tuple[str, list[str]]:
    rows, verdicts = [], []
    for p, (pyros, same) in PAIRINGS.items():
        if p not in per_epoch:
            continue
        best = None
        for q in pyros:
            if q not in per_epoch:
                continue
            r = per_epoch[q] / per_epoch[p]
            best = r if best is None else min(best, r)  # the faster Pyro variant
            rows.append([LABELS[p], LABELS[q], "yes" if same else "no (closest)",
                         f"{per_epoch[q]:.4f}", f"{per_epoch[p]:.4f}", f"{r:.1f}x"])
        if best is not None and same:
            verdicts.append(
                f"- {LABELS[p]}: {best:.1f}x faster per epoch than the faster Pyro variant "
                f"(target >= {SPEEDUP_TARGET:g}x: {'met' if best >= SPEEDUP_TARGET else 'NOT met'})")
    for p, q in NUMPYRO_PAIRINGS.items():
        if p in per_epoch and q in per_epoch:
            r = per_epoch[q] / per_epoch[p]
            rows.append([LABELS[p], f"({LABELS[q]})", "yes", f"{per_epoch[q]:.4f}",
                         f"{per_epoch[p]:.4f}", f"{r:.2f}x"])
    table = markdown_table(["ppl_ext", "Pyro contender", "same estimator", "Pyro s/epoch",
                            "ppl_ext s/epoch", "speed-up"], "lllrrr", rows)
    return table, verdicts


def budget_table(names, curves, budget) -> str:
    rows = []
    for n in names:
        c = curves.get(n)
        if not c:
            rows.append([LABELS[n], "n/a"])
            continue
        spent, epochs, ll, elbo = c[-1]
        rows.append([LABELS[n], f"{spent:.1f}", f"{epochs:.1f}",
                     fmt(_at(c, .25, budget), ".3f"), fmt(_at(c, .5, budget), ".3f"),
                     f"{ll:.3f}", f"{elbo:.3f}"])
    return markdown_table(["contender", "train s", "epochs", "log p(x) @25%", "log p(x) @50%",
                           "held-out log p(x)", "held-out ELBO"], "lrrrrrr", rows)


def _versions(pyro_info) -> str:
    extra = []
    if pyro_info:
        extra.append(f"torch {pyro_info['torch']}, pyro-ppl {pyro_info['pyro']} "
                     f"(Python {pyro_info['python']}, {pyro_info['threads']} threads, "
                     f"OMP_WAIT_POLICY={pyro_info['omp_wait_policy']})")
    return versions(("jaxlib", "numpyro", "funsor", "optax"), extra)


def _default_pyro_python() -> str | None:
    probe = "import torch, pyro"
    for python in (sys.executable, str(ROOT / ".venv-pyro" / "bin" / "python")):
        if Path(python).exists() and subprocess.run(
                [python, "-c", probe], capture_output=True).returncode == 0:
            return python
    return None


# --------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s budget, 2 timed epochs, 20 check draws")
    p.add_argument("--budget", type=float, default=None,
                   help="training seconds per contender for the equal-wall-clock run (default 30)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed epochs per contender (default 7; quick 2)")
    p.add_argument("--check-draws", type=int, default=None,
                   help="gradient draws for the check (default 300; quick 20)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--pyro-python", default=None,
                   help="interpreter with torch and pyro-ppl (default: this one if it has "
                        "them, else .venv-pyro/bin/python)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the cores this process may use)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for the torch worker (default PASSIVE; '' leaves it "
                        "unset: torch's OpenMP threads then spin, and Pyro runs up to 10x "
                        "slower whenever anything else uses a core)")
    p.add_argument("--python-loop", action="store_true",
                   help="JAX contenders run each epoch as a Python loop of jitted updates, "
                        "one dispatch per minibatch, like Pyro (default: one jitted lax.scan "
                        "over the epoch's minibatches; compile time is then that of the "
                        "scanned epoch)")
    p.add_argument("--no-check", action="store_true", help="skip the gradient check")
    p.add_argument("--curve-csv", default=None, help="write every checkpoint to this CSV")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--pyro-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pyro_worker:
        return pyro_worker()
    if jax is None:
        raise SystemExit("bench_discrete.py needs jax, numpyro and ppl_ext (use .venv/bin/python).")

    quick = args.quick
    budget = args.budget or (2.0 if quick else 30.0)
    repeats = args.repeats or (2 if quick else 7)
    draws = args.check_draws or (20 if quick else 300)
    threads = args.threads or len(os.sched_getaffinity(0))
    names = list(args.contenders)

    command = command_line(argv, "bench_discrete.py")
    t_start = time.perf_counter()
    load_start = load_average()
    x_train, x_test = load_data()
    init = initial_params(x_train)
    n_batches = x_train.shape[0] // BATCH_SIZE
    ll0, elbo0 = exact_scores64(init, x_test)
    log(f"# {command}")
    log(f"# {x_train.shape[0]} train / {x_test.shape[0]} test images; epoch = {n_batches} "
        f"minibatches of {BATCH_SIZE}; initial held-out log p(x) {ll0:.3f}, ELBO {elbo0:.3f}")

    notes, failed = [], {}
    client = None
    pyro_names = [n for n in names if n in PYRO]
    if pyro_names:
        python = args.pyro_python or _default_pyro_python()
        if python is None:
            for n in pyro_names:
                failed[n] = ("no interpreter with torch and pyro-ppl (see benchmarks/README.md: "
                             ".venv-pyro)")
        else:
            tmp = tempfile.mkdtemp(prefix="bench_discrete_")
            data_path = Path(tmp) / "data.npz"
            np.savez(data_path, x_train=x_train, **{f"init_{k}": v for k, v in init.items()})
            client = PyroClient(python, data_path, threads, args.omp_wait_policy)
            mine = epoch_order(0, x_train.shape[0])[:8].tolist()
            if client.info["order0"] != mine:
                raise SystemExit("the Pyro worker draws different minibatch orders")
            log(f"# Pyro worker: {python} (torch {client.info['torch']}, pyro "
                f"{client.info['pyro']}, {client.info['threads']} threads)")
    pyro_info = client.info if client else None
    log(f"# {_versions(pyro_info)}; {machine()}")

    try:
        log("compile / prepare")
        runners = {}
        for n in names:
            if n in failed:
                continue
            try:
                t0 = time.perf_counter()
                runners[n] = (RemotePyro(client, n) if n in PYRO
                              else JaxRunner(n, init, x_train, scan=not args.python_loop))
                log(f"  {n:<26} {time.perf_counter() - t0:6.2f} s"
                    + (f" (lower {runners[n].lower_s:.2f} + XLA {runners[n].xla_s:.2f})"
                       if n not in PYRO else ""))
            except Exception as exc:
                failed[n] = short_exception(exc, 200)
                log(f"  {n}: FAILED {failed[n]}")
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
        compile_s = {n: r.compile_s for n, r in runners.items() if r.compile_s is not None}

        check = {}
        if not args.no_check:
            log(f"gradient check at the initial parameters ({draws} draws)")
            check = check_gradients(runners, init, x_train, draws, log)

        log(f"seconds per epoch ({repeats} timed epochs + 1 warm-up, interleaved)")
        per_epoch, samples, losses = measure_epochs(runners, repeats, log)
        log(f"equal wall-clock: {budget:g} s of training per contender")
        curves = measure_budget(runners, budget, x_test, log)
    finally:
        if client:
            client.close()

    if args.curve_csv:
        with open(args.curve_csv, "w") as fh:
            fh.write("contender,train_seconds,epochs,heldout_loglik,heldout_elbo\n")
            for n, c in curves.items():
                for spent, epochs, ll, elbo in c:
                    fh.write(f"{n},{spent:.4f},{epochs:.3f},{ll:.5f},{elbo:.5f}\n")

    elapsed = time.perf_counter() - t_start
    ratios, verdicts = ratio_table(per_epoch)
    for n, why in failed.items():
        notes.append(f"- {LABELS[n]}: n/a, {why}")
    for n, c in check.items():
        notes.append(f"- gradient check {LABELS[n]}: {c}")
    body = (
        results_heading("bench_discrete.py", command, _versions(pyro_info))
        + f"- machine: {machine()}; torch.set_num_threads({threads}); load average "
        f"{load_start} at start, {load_average()} at end\n"
        f"- sigmoid belief net, {NUM_LATENT} binary latents, digits {x_train.shape[0]} train / "
        f"{x_test.shape[0]} test; epoch = {n_batches} minibatches of {BATCH_SIZE}; Adam lr "
        f"{LEARNING_RATE:g}; JAX epochs as "
        f"{'a Python loop of jitted updates' if args.python_loop else 'one lax.scan'}; "
        f"{repeats} timed epochs; budget {budget:g} s; total wall time "
        f"{elapsed:.0f} s{' (QUICK smoke run)' if quick else ''}\n"
        f"- initial parameters: held-out log p(x) {ll0:.3f}, ELBO {elbo0:.3f} nats/image\n\n"
        "Seconds per epoch (median of the timed epochs, contenders interleaved; compile = "
        f"JAX lower + XLA compile of the {'update' if args.python_loop else 'scanned epoch'}, "
        "or a Pyro JIT variant's first update minus a plain one; excluded from s/epoch):\n\n"
        + epoch_table(names, per_epoch, compile_s, samples, losses)
        + "\nSpeed-up per epoch (Pyro s/epoch / ppl_ext s/epoch; 'closest' = no Pyro "
        "estimator of that kind, compared with TraceGraph_ELBO):\n\n"
        + ratios
        + "\n" + "\n".join(verdicts) + "\n"
        + f"\nEqual wall-clock ({budget:g} s of training each, compilation excluded; exact "
        "held-out scores in nats per test image, by enumeration of the 256 configurations; "
        "higher is better):\n\n"
        + budget_table(names, curves, budget)
        + ("\nNotes:\n\n" + "\n".join(notes) + "\n" if notes else "")
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
