"""NumPyro's own SVI workflows, run as written with NumPyro's loss and with a ppl_ext loss.

Workflows (small settings; data that NumPyro's examples download is replaced by
scikit-learn's bundled digits or by synthetic data):

- `vae`: examples/vae.py (stax encoder/decoder, `SVI(..., hidden_dim=..., z_dim=...)`
  static kwargs), on the 8x8 digits, Trace_ELBO vs `px.numpyro.ELBO()`;
- `toy_mixture`: examples/toy_mixture_model_discrete_enumeration.py (`num_obs` a positional
  int, B enumerated in the model), TraceEnum_ELBO vs `px.numpyro.ELBO()`;
- `zip`: examples/zero_inflated_poisson.py (AutoDiagonalNormal, synthetic fish-like data),
  Trace_ELBO vs `px.numpyro.ELBO()`;
- `dais`: AutoDAIS (numpyro's annealed-importance-sampling autoguide) on a logistic
  regression of scikit-learn's breast cancer data, Trace_ELBO vs `px.numpyro.ELBO()`;
- `neutra`: examples/neutra.py (AutoBNAFNormal on the dual moon, then NeuTra HMC),
  Trace_ELBO vs `px.numpyro.ELBO()`.

For each: per-step time of one jitted `svi.update` (median over interleaved repeats), the
ratio ppl_ext / NumPyro, the compile time, and the workflow's answer after training with
each loss (the same seeds and steps).

    .venv/bin/python benchmarks/bench_numpyro_workflows.py [--quick] [--no-results]
        [--threads 1|default]

XLA is pinned to one thread (`--threads 1`, the default: set before jax is imported) or
left at its default (`--threads default`); the table says which.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path


from _common import pin_threads_unless_default  # noqa: E402 (stdlib only)

pin_threads_unless_default(sys.argv)  # before jax and numpy are imported

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO  # noqa: E402

import ppl_ext as px  # noqa: E402
from _common import (  # noqa: E402
    command_line,
    load_average,
    log,
    machine,
    markdown_table,
    report,
    results_heading,
    versions,
)

VERSIONS = ("numpyro", "funsor", "optax", "scikit-learn")
#: ppl_ext with numpyro's validation off (`numpyro.validation_enabled(False)` while tracing):
#: no run-time parameter checks, so no in-graph error (a host callback) in the step
NOVALIDATE = "ppl_ext novalidate"


# ------------------------------------------------------------------------------ vae.py


def vae_workflow(quick):
    from jax.example_libraries import stax

    from models import digits

    def encoder(hidden_dim, z_dim):
        return stax.serial(
            stax.Dense(hidden_dim, W_init=stax.randn()), stax.Softplus, stax.FanOut(2),
            stax.parallel(stax.Dense(z_dim, W_init=stax.randn()),
                          stax.serial(stax.Dense(z_dim, W_init=stax.randn()), stax.Exp)))

    def decoder(hidden_dim, out_dim):
        return stax.serial(stax.Dense(hidden_dim, W_init=stax.randn()), stax.Softplus,
                           stax.Dense(out_dim, W_init=stax.randn()), stax.Sigmoid)

    def model(batch, hidden_dim=400, z_dim=100):
        batch = jnp.reshape(batch, (batch.shape[0], -1))
        batch_dim, out_dim = jnp.shape(batch)
        decode = numpyro.module("decoder", decoder(hidden_dim, out_dim), (batch_dim, z_dim))
        with numpyro.plate("batch", batch_dim):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([z_dim]).to_event(1))
            img_loc = decode(z)
            return numpyro.sample("obs", dist.Bernoulli(img_loc).to_event(1), obs=batch)

    def guide(batch, hidden_dim=400, z_dim=100):
        batch = jnp.reshape(batch, (batch.shape[0], -1))
        batch_dim, out_dim = jnp.shape(batch)
        encode = numpyro.module("encoder", encoder(hidden_dim, z_dim), (batch_dim, out_dim))
        z_loc, z_std = encode(batch)
        with numpyro.plate("batch", batch_dim):
            return numpyro.sample("z", dist.Normal(z_loc, z_std).to_event(1))

    images, _ = digits.load(binarize=True)
    train, test = jnp.asarray(images[:1500]), jnp.asarray(images[1500:1628])
    batch_size = 128
    num_batches = len(train) // batch_size

    def batches(step):
        i = step % num_batches
        return (train[i * batch_size:(i + 1) * batch_size],)

    def answer(svi, state):
        keys = jax.random.split(jax.random.key(7), 20)
        per_image = jnp.mean(jax.vmap(lambda k: Trace_ELBO().loss(
            k, svi.get_params(state), model, guide, test, hidden_dim=64, z_dim=10))(keys))
        return f"test -ELBO/image {float(per_image) / len(test):.2f}"

    return dict(model=model, guide=guide, args=batches, static={"hidden_dim": 64, "z_dim": 10},
                optim=lambda: numpyro.optim.Adam(1e-3), numpyro_loss=Trace_ELBO(),
                steps=200 if quick else 1500, answer=answer,
                setting="digits 8x8 binarized, batch 128, hidden 64, z 10, Adam(1e-3)")


# ------------------------------------------------------------------- toy mixture example


def toy_mixture_workflow(quick):
    from models import toy_mixture

    model, guide = toy_mixture.model, toy_mixture.guide
    num_obs = 1000
    prior, obs = toy_mixture.generate_data(num_obs)

    def answer(svi, state):
        p = svi.get_params(state)
        mean = lambda ab: ab[..., 0] / ab.sum(-1)  # noqa: E731
        return (f"p_A {float(mean(p['a'])):.3f} (true 0.3), p_B {np.round(mean(p['b']), 2)} "
                f"(true [0.2 0.8], or [0.8 0.2] with B's labels swapped), p_C "
                f"{np.round(mean(p['c']), 2)} (true [0.3 0.9], or [0.9 0.3])")

    return dict(model=model, guide=guide, args=lambda step: (prior, obs, num_obs), static={},
                optim=lambda: numpyro.optim.Adam(0.01), numpyro_loss=TraceEnum_ELBO(),
                steps=300 if quick else 3000, answer=answer,
                setting=f"num_obs {num_obs} (a positional int), Adam(0.01)")


# --------------------------------------------------------------- zero-inflated Poisson


def zip_workflow(quick):
    import jax.scipy as jsp
    from numpyro.infer import autoguide

    def model(X, Y):
        D_X = X.shape[1]
        b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([D_X]).to_event(1))
        b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0).expand([D_X]).to_event(1))
        q = jsp.special.expit(jnp.dot(X, b1[:, None])).reshape(-1)
        lam = jnp.exp(jnp.dot(X, b2[:, None]).reshape(-1))
        with numpyro.plate("obs", X.shape[0]):
            numpyro.sample("Y", dist.ZeroInflatedPoisson(gate=q, rate=lam), obs=Y)

    rng = np.random.default_rng(0)
    n = 250
    X = np.column_stack([rng.integers(0, 2, n), rng.integers(0, 2, n), rng.integers(1, 5, n),
                         rng.integers(0, 4, n), np.ones(n)]).astype(np.float32)
    b1_true = np.array([-0.5, 0.3, -0.2, 0.6, -0.4])
    b2_true = np.array([0.8, -0.4, 0.5, -0.9, -0.6])
    gate = 1 / (1 + np.exp(-X @ b1_true))
    Y = np.where(rng.random(n) < gate, 0, rng.poisson(np.exp(X @ b2_true))).astype(np.float32)
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    guide = autoguide.AutoDiagonalNormal(model)

    def answer(svi, state):
        median = guide.median(svi.get_params(state))
        return f"b1 {np.round(median['b1'], 2)}, b2 {np.round(median['b2'], 2)}"

    return dict(model=model, guide=guide, args=lambda step: (X, Y), static={},
                optim=lambda: numpyro.optim.Adam(0.01), numpyro_loss=Trace_ELBO(),
                steps=300 if quick else 3000, answer=answer,
                setting=f"synthetic n={n}, AutoDiagonalNormal, Adam(0.01) (the example's "
                "0.001 x 50000 steps shortened)")


# ------------------------------------------------------------------------------ neutra


def neutra_workflow(quick):
    from numpyro.distributions import constraints
    from numpyro.infer import MCMC, NUTS
    from numpyro.infer.autoguide import AutoBNAFNormal
    from numpyro.infer.reparam import NeuTraReparam

    class DualMoonDistribution(dist.Distribution):
        support = constraints.real_vector

        def __init__(self):
            super().__init__(event_shape=(2,))

        def sample(self, key, sample_shape=()):
            return jnp.zeros(sample_shape + self.event_shape)  # a dummy value

        def log_prob(self, x):
            term1 = 0.5 * ((jnp.linalg.norm(x, axis=-1) - 2) / 0.4) ** 2
            term2 = -0.5 * ((x[..., :1] + jnp.array([-2.0, 2.0])) / 0.6) ** 2
            pe = term1 - jax.scipy.special.logsumexp(term2, axis=-1)
            return -pe

    def model():
        numpyro.sample("x", DualMoonDistribution())

    guide = AutoBNAFNormal(model, hidden_factors=[8, 8])

    def answer(svi, state):
        # the trained guide's ELBO, 2000 Trace_ELBO estimates (the NUTS mode shares below
        # vary a lot from seed to seed: one chain of 200 draws)
        keys = jax.random.split(jax.random.key(99), 2000)
        elbo = -jax.vmap(lambda k: Trace_ELBO().loss(
            k, svi.get_params(state), model, guide))(keys)
        fit = f"ELBO {float(elbo.mean()):.3f} ± {float(elbo.std() / np.sqrt(2000)):.3f}; "
        neutra = NeuTraReparam(guide, svi.get_params(state))
        mcmc = MCMC(NUTS(neutra.reparam(model)), num_warmup=200, num_samples=200,
                    progress_bar=False)
        mcmc.run(jax.random.key(3))
        zs = mcmc.get_samples()["auto_shared_latent"]
        x = neutra.transform_sample(zs)["x"]
        return fit + (f"NeuTra HMC: mean |x| {float(jnp.mean(jnp.linalg.norm(x, axis=-1))):.2f} "
                f"(target about 2), share x0>0 {float(jnp.mean(x[:, 0] > 0)):.2f} (0.5)")

    return dict(model=model, guide=guide, args=lambda step: (), static={},
                optim=lambda: numpyro.optim.Adam(0.003), numpyro_loss=Trace_ELBO(),
                steps=300 if quick else 2000, answer=answer,
                setting="AutoBNAFNormal(hidden_factors=[8, 8]), Adam(0.003), then NUTS "
                "200+200 on the NeuTra-reparameterised model")


# ------------------------------------------------------------------------------ AutoDAIS


def dais_workflow(quick):
    from numpyro.infer.autoguide import AutoDAIS
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = np.asarray(data.data[:, :8], np.float32)  # the first 8 features, standardised
    X = (X - X.mean(0)) / X.std(0)
    Y = np.asarray(data.target, np.float32)
    X, Y = jnp.asarray(X), jnp.asarray(Y)

    def model(X, Y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 5.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=Y)

    guide = AutoDAIS(model, K=4, eta_init=0.02, eta_max=0.1)

    def answer(svi, state):
        params = svi.get_params(state)
        samples = guide.sample_posterior(jax.random.key(5), params, sample_shape=(200,))
        logits = X @ samples["w"].T + samples["b"]
        accuracy = float(jnp.mean((jnp.mean(jax.nn.sigmoid(logits), 1) > 0.5) == Y))
        return (f"posterior-mean w[:3] {np.round(np.mean(samples['w'], 0)[:3], 2)}, "
                f"training accuracy {accuracy:.3f}")

    return dict(model=model, guide=guide, args=lambda step: (X, Y), static={},
                optim=lambda: numpyro.optim.Adam(0.01), numpyro_loss=Trace_ELBO(),
                steps=200 if quick else 2000, answer=answer,
                setting="logistic regression on scikit-learn's breast cancer data (569 x 8 "
                "standardised features), AutoDAIS(K=4), Adam(0.01)")


WORKFLOWS = {"vae": vae_workflow, "toy_mixture": toy_mixture_workflow, "zip": zip_workflow,
             "dais": dais_workflow, "neutra": neutra_workflow}


# --------------------------------------------------------------------------- measuring


def build(workflow, loss):
    svi = SVI(workflow["model"], workflow["guide"], workflow["optim"](), loss,
              **workflow["static"])
    args = workflow["args"]
    state = svi.init(jax.random.key(0), *args(0))
    return svi, state, args


def time_steps(step, state, args, num):
    t0 = time.perf_counter()
    for i in range(num):
        state, loss = step(state, *args(i))
    jax.block_until_ready(loss)
    return state, (time.perf_counter() - t0) / num


def run_workflow(name, quick, repeats, timed_steps):
    workflow = WORKFLOWS[name](quick)
    contenders = {"numpyro": workflow["numpyro_loss"], "ppl_ext": px.numpyro.ELBO(),
                  NOVALIDATE: px.numpyro.ELBO()}
    built, compile_s, times, answers, final = {}, {}, {c: [] for c in contenders}, {}, {}
    for contender, loss in contenders.items():
        with numpyro.validation_enabled(contender != NOVALIDATE):
            svi, state, args = build(workflow, loss)
        # static (non-array) arguments stay Python values, as in svi.run: close over them
        arrays_of = lambda i, args=args: tuple(  # noqa: E731
            a for a in args(i) if isinstance(a, jax.Array) or isinstance(a, dict))
        static_of = [not (isinstance(a, jax.Array) or isinstance(a, dict)) for a in args(0)]

        def call(state, *arrays, svi=svi, args=args, static_of=static_of):
            full = iter(arrays)
            merged = [args(0)[j] if s else next(full) for j, s in enumerate(static_of)]
            return svi.update(state, *merged)

        step = jax.jit(call)
        t0 = time.perf_counter()
        with numpyro.validation_enabled(contender != NOVALIDATE):  # traced here
            state, loss_value = step(state, *arrays_of(0))
        jax.block_until_ready(loss_value)
        compile_s[contender] = time.perf_counter() - t0
        built[contender] = (svi, state, step, arrays_of)
    for _ in range(repeats):  # interleaved
        for contender in contenders:
            svi, state, step, arrays_of = built[contender]
            state, per_step = time_steps(step, state, arrays_of, timed_steps)
            built[contender] = (svi, state, step, arrays_of)
            times[contender].append(per_step)
    for contender, loss in contenders.items():  # training, fresh state, same seeds
        svi, state, step, arrays_of = built[contender]
        with numpyro.validation_enabled(contender != NOVALIDATE):
            state = svi.init(jax.random.key(0), *workflow["args"](0))
        losses = []
        for i in range(workflow["steps"]):
            state, loss_value = step(state, *arrays_of(i))
            losses.append(loss_value)
        losses = np.asarray(jnp.stack(losses))
        tail = losses[-max(1, len(losses) // 10):]
        final[contender] = f"{np.mean(tail):.2f}"
        try:
            answers[contender] = workflow["answer"](svi, state)
        except Exception as exc:  # report, do not stop the other workflows
            answers[contender] = f"answer failed: {type(exc).__name__}: {str(exc)[:120]}"
    ratios = {c: statistics.median(p / n for p, n in zip(times[c], times["numpyro"]))
              for c in contenders}
    rows = [(name, c, f"{1e6 * statistics.median(times[c]):.0f}", f"{ratios[c]:.2f}",
             f"{compile_s[c]:.1f}", final[c], answers[c]) for c in contenders]
    return rows, workflow["setting"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few steps and repeats")
    p.add_argument("--workflows", nargs="+", default=list(WORKFLOWS), choices=list(WORKFLOWS))
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--threads", choices=("1", "default"), default="1",
                   help="XLA CPU threads: pinned to 1 (default) or XLA's default")
    args = p.parse_args(argv)
    repeats, timed_steps = (3, 20) if args.quick else (7, 100)
    command = command_line(argv, "benchmarks/bench_numpyro_workflows.py")
    log(f"# {command}")
    load_start, t_start = load_average(), time.perf_counter()
    rows, settings = [], []
    for name in args.workflows:
        log(f"workflow {name}")
        try:
            workflow_rows, setting = run_workflow(name, args.quick, repeats, timed_steps)
        except Exception as exc:
            workflow_rows, setting = [(name, "ppl_ext", "n/a", "n/a", "n/a", "n/a",
                                       f"fails: {type(exc).__name__}: {str(exc)[:200]}")], ""
        for row in workflow_rows:
            log("  " + " | ".join(map(str, row)))
        rows += workflow_rows
        settings.append(f"- {name}: {setting}")
    body = (
        results_heading("bench_numpyro_workflows.py", command, versions(VERSIONS),
                        ("ppl_ext", "models"))
        + f"- machine: {machine()}; 1-min load average {load_start} at start, "
        f"{load_average()} at end; XLA threads: {args.threads}; total wall time {time.perf_counter() - t_start:.0f} s"
        f"{' (QUICK smoke run)' if args.quick else ''}\n"
        + "\n".join(settings) + "\n\n"
        + markdown_table(["workflow", "loss", "µs / step", "ratio", "compile s",
                          "final loss (mean of last 10%)", "answer"], "llrrrrl", rows)
        + f"\nµs / step: median over {repeats} interleaved repeats of {timed_steps} jitted "
        "`svi.update` steps; ratio: median of ppl_ext / NumPyro per repeat; numpyro is "
        "TraceEnum_ELBO for toy_mixture and Trace_ELBO otherwise, ppl_ext is "
        "`px.numpyro.ELBO()`; all train from the same seeds for the same steps. ppl_ext "
        "novalidate: the same, traced under `numpyro.validation_enabled(False)`, so without "
        "the run-time parameter checks (an in-graph error whose host callback costs 20-30% "
        "of a step on CPU in some workflows).\n"
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    raise SystemExit(main())
