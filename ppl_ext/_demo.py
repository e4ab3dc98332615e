"""`ppl-ext demo`: train the digits VAE of `models/vae.py` with a chosen objective.

The run uses `numpyro.infer.SVI` with a ppl_ext loss, prints progress (training loss per
image, held-out bound, elapsed time) and writes a figure with the learning curves, test
digits next to their reconstructions, and digits decoded from prior draws.

`models/` ships with the repository, not with the installed package, so the demo runs from
a source checkout (`make demo` does this); it needs scikit-learn (the digits) and
matplotlib (the figure), both in the `demo` extra (and in `test` and `tutorials`).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

#: Objectives the demo can train with (all continuous-latent bounds; VAE latents are
#: reparameterised).
OBJECTIVES = ("elbo", "iwelbo", "renyi")


def _import_models():
    """Import the repository's `models` package (current directory or the source tree)."""
    try:
        return importlib.import_module("models.vae"), importlib.import_module("models.digits")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name not in ("models",
                                                                         "models.vae"):
            raise  # e.g. scikit-learn missing: let the caller explain
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "models" / "vae.py").is_file():
            sys.path.insert(0, str(root))
            importlib.invalidate_caches()
            return importlib.import_module("models.vae"), importlib.import_module("models.digits")
    raise SystemExit(
        "ppl-ext demo: the example models (models/vae.py) ship with the ppl_ext repository, "
        "not with the installed package; run the demo from a checkout's root (`make demo`)."
    )


def _loss(objective: str, particles: int):
    import ppl_ext as px

    if objective == "elbo":
        return px.numpyro.ELBO(num_particles=particles), f"ELBO ({particles} particle(s))"
    if objective == "iwelbo":
        return px.numpyro.IWELBO(particles), f"IWELBO (K = {particles})"
    return (px.numpyro.ObjectiveLoss(lambda m, g: px.vi.renyi(m, g, 0.5, particles)),
            f"Renyi bound (alpha = 0.5, K = {particles})")


def run(objective: str = "elbo", steps: int = 5000, batch_size: int = 128,
        particles: int = 1, eval_every: int = 500, out: str = "ppl_ext_demo.png",
        seed: int = 0) -> dict:
    """Train the VAE and write the figure; returns a summary dict (for tests)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    for name, value in [("steps", steps), ("batch_size", batch_size),
                        ("particles", particles), ("eval_every", eval_every)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    print(f"ppl-ext demo: a VAE on scikit-learn's digits, {steps} SVI steps of {objective} "
          f"(--help for the settings)", flush=True)
    print("loading the digits and building the VAE ...", flush=True)
    start = time.perf_counter()
    try:
        import matplotlib  # noqa: F401  (checked here for a clear message)
    except ImportError:
        raise SystemExit("ppl-ext demo needs matplotlib: pip install 'ppl_ext[demo]'.")
    try:
        vae, digits = _import_models()
    except ModuleNotFoundError as error:
        raise SystemExit(f"ppl-ext demo needs {error.name}: pip install 'ppl_ext[demo]'.")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    from numpyro.infer import SVI

    import ppl_ext as px

    x_train, x_test, _, _ = digits.load_split()
    if batch_size > x_train.shape[0]:
        raise ValueError(f"batch_size must be at most {x_train.shape[0]}, got {batch_size}.")
    key_net, key_init, key_steps, key_eval = jax.random.split(jax.random.key(seed), 4)
    model, guide = vae.make_vae(key_net)
    print(f"ppl_ext {px.__version__}, jax {jax.__version__} on {jax.devices()[0].platform}: "
          f"{x_train.shape[0]} train / {x_test.shape[0]} test binarised 8x8 images, latent "
          f"dim {vae.LATENT_DIM} ({time.perf_counter() - start:.1f} s)")
    loss, loss_name = _loss(objective, particles)
    print(f"objective: {loss_name}; Adam(3e-3), batch {batch_size}, {steps} steps")
    print("initialising SVI (tracing the model and the guide) ...", flush=True)
    svi = SVI(model, guide, numpyro.optim.Adam(3e-3), loss=loss)
    x = jnp.asarray(x_train)
    state = svi.init(key_init, x[:batch_size])

    @jax.jit
    def step(state, key):
        idx = jax.random.choice(key, x.shape[0], (batch_size,), replace=False)
        return svi.update(state, x[idx])

    # held-out log-likelihood bound: IWELBO with 64 particles, per test image
    bound = px.vi.iwelbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide), 64)
    heldout = jax.jit(lambda params, key: bound(key, params, jnp.asarray(x_test))
                      / x_test.shape[0])
    keys = jax.random.split(key_steps, steps)
    print("compiling the training step and the held-out bound (jax.jit) ...", flush=True)
    compile_start = time.perf_counter()
    # ahead-of-time compilation: the loop below only runs compiled code
    step = step.lower(state, keys[0]).compile()
    heldout = heldout.lower(svi.get_params(state), key_eval).compile()
    print(f"compiled in {time.perf_counter() - compile_start:.1f} s; training "
          f"(held-out IWELBO(64) every {eval_every} steps)", flush=True)
    progress = _Progress(steps)
    losses = np.zeros(steps, np.float32)
    evals = []
    for i, key in enumerate(keys):
        state, value = step(state, key)
        losses[i] = value
        progress.update(i + 1)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            params = svi.get_params(state)
            test_bound = float(heldout(params, jax.random.fold_in(key_eval, i)))
            evals.append((i + 1, test_bound))
            recent = losses[max(0, i + 1 - eval_every): i + 1] / batch_size
            progress.clear()
            print(f"step {i + 1:>6}/{steps}  train loss/image {np.mean(recent):8.3f}  "
                  f"test IWELBO(64)/image {test_bound:8.3f}  "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError("the training loss became non-finite; lower the step size.")
    print("drawing the figure ...", flush=True)
    params = svi.get_params(state)
    _plot(out, losses / batch_size, evals, params, (model, guide), vae, x_test, key_eval,
          loss_name)
    elapsed = time.perf_counter() - start
    print(f"wrote {out} ({elapsed:.1f} s in total)")
    return {"losses": losses, "evals": evals, "seconds": elapsed, "out": out}


class _Progress:
    """A one-line step counter between the evaluation lines, on terminals only."""

    def __init__(self, total: int, every_s: float = 0.5):
        self.total, self.every_s = total, every_s
        self.enabled = sys.stdout.isatty()
        self.last = time.perf_counter()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self.shown = True
            print(f"\rstep {done:>6}/{self.total}", end="", flush=True)

    def clear(self) -> None:
        if self.shown:
            print("\r" + " " * 20 + "\r", end="")
            self.shown = False


def _plot(out, losses, evals, params, vae_fns, vae, x_test, key, loss_name):
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import numpyro

    num_show = 8
    recon = np.asarray(vae.reconstruct(params, vae_fns, x_test[:num_show], key))
    model = vae_fns[0]
    z = jax.random.normal(jax.random.fold_in(key, 1), (num_show, vae.LATENT_DIM))
    trace = numpyro.handlers.trace(numpyro.handlers.substitute(
        model, data={**params, "z": z})).get_trace(np.zeros((num_show, 64), np.float32))
    samples = np.asarray(trace["x"]["fn"].base_dist.probs)

    fig = plt.figure(figsize=(10, 6.5), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[1.4, 1])
    ax = fig.add_subplot(grid[0])
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(window, len(losses) + 1), -smooth, label=f"train: -loss ({loss_name})")
    steps, values = zip(*evals)
    ax.plot(steps, values, "o-", label="test: IWELBO(64) per image")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("nats per image")
    ax.set_title("VAE on digits with ppl_ext")
    ax.legend()
    rows = grid[1].subgridspec(3, num_show)
    for row, (images, label) in enumerate([(x_test[:num_show], "test digit"),
                                           (recon, "reconstruction"),
                                           (samples, "prior sample")]):
        for col in range(num_show):
            axis = fig.add_subplot(rows[row, col])
            axis.imshow(np.asarray(images[col]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(label, fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
