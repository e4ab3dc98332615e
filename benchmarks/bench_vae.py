"""Time per jitted training step of a VAE on digits: ppl_ext vs hand-written JAX, NumPyro, genjax.

Usage:
    .venv/bin/python benchmarks/bench_vae.py [--repeats N] [--batch-sizes B ...] [--quick]
                                             [--no-genjax] [--no-check] [--no-results]

The VAE is `models.vae.make_vae(key)` with its defaults: 64 binarised pixels, latent
dimension 4, equinox MLP encoder (64 -> 64 -> 2*4) and decoder (4 -> 64 -> 64), tanh,
guide `Normal(loc, softplus(raw) + 1e-3)`, likelihood `Bernoulli(logits = decoder(z))`.
Every contender uses these very modules: the initial weights are the parameter dict that
`numpyro.infer.SVI.init` builds for them (`"encoder$params"`, `"decoder$params"`), and the
non-array parts of the networks come from the modules in make_vae's closures. Data:
the first B images of a fixed permutation of `models.digits.load_split()`'s training
split (1438 images), B in 64, 128, 256, 512, 1024.

Each contender is one jitted function `step(state, x) -> (state, loss)` doing ONE training
step of the single-particle reparameterised ELBO summed over the batch: split the state's
key, estimate the loss (negative ELBO) and its gradient w.r.t. all network weights from one
draw `z ~ q(z | x)`, and apply `optax.adam(1e-3)`. This is exactly what
`numpyro.infer.SVI.update` does (its optimiser here is `optax_to_numpyro(optax.adam(1e-3))`),
so every contender does the same work around the estimator:

    hand-written        negative ELBO written directly in JAX: z = loc + scale * eps with
                        eps = jax.random.normal(key, (B, 4)), log densities from
                        jax.scipy.stats.norm.logpdf and x*logits - softplus(logits);
                        jax.value_and_grad
    hand-written numpyro-densities
                        the same, with z = q.rsample(key) and the log densities from
                        numpyro's Normal/Bernoulli(logits).log_prob: the hand-written
                        equivalent of the ppl_ext program (it compiles to the same kernels as
                        "ppl_ext novalidate"), so that ppl_ext / this = cost of the
                        transformation and hand-written / this = cost of numpyro's formulas
    ppl_ext jnp-densities
                        the hand-written program as a @px.expectation program: z =
                        px.sample(dist.Normal(loc, scale).to_event(1)) (default estimator
                        px.reparam), the same jax.numpy log densities;
                        f.value_and_grad(key, params, x=x)   <- target: <= 1.05x hand-written
    ppl_ext             the same with numpyro's log densities (numpyro's default
                        validate_args, on in 0.22): the program as a NumPyro user writes it
                                    <- target: <= 1.05x hand-written numpyro-densities
    ppl_ext novalidate  the same with dist.Normal(..., validate_args=False): separates the
                        run-time parameter check (scale > 0) from the transformation
    ppl_ext vi.elbo     px.vi.elbo(px.gen.NumPyroModel(model), px.gen.NumPyroModel(guide))
                        on models/vae.py's NumPyro model/guide, .value_and_grad, no SVI
    ppl_ext SVI         SVI(model, guide, optim, loss=px.numpyro.ELBO()).update
    ppl_ext SVI novalidate
                        the same, called inside numpyro.validation_enabled(False) (so the
                        guide's Normal has validate_args=False when traced)
    numpyro SVI         SVI(model, guide, optim, loss=numpyro.infer.Trace_ELBO()).update
                                              <- target: ppl_ext SVI / numpyro SVI <= 1.0
    genjax              genjax 1.0.14 (if installed): @genjax.gen model and guide (guide site
                        genjax.multivariate_normal_diag_reparam; prior and likelihood are
                        tfd.Independent TFP distributions), the negative ELBO as a
                        @genjax.adev.expectation (as genjax.inference.vi.elbo_factory
                        writes it; that factory fixes the model's arguments, so it cannot
                        learn the decoder), value and gradient by
                        jax.value_and_grad of genjax.adev.invoke_closed_over (what
                        Expectation.grad_estimate differentiates), under genjax.seed

Time per step: each call is followed by block_until_ready and feeds the returned state to
the next call (so it trains); after warm-up, --repeats repeats, each running every
contender for the same number of calls (about 0.03 s for the slowest, at least 5), in
an order rotated from repeat to repeat. Short blocks and many repeats because this kind of
machine (a shared 2-vCPU VM) drifts by +-30% within seconds: a contender is compared with
hand-written in the same repeat, a fraction of a second apart. Reported: the median over
repeats of the per-call time; the ratio to hand-written as the median over repeats of the
paired per-repeat ratio (contender / hand-written in the same repeat), which is robust to
the drift, and the interquartile range of those paired ratios as a noise estimate. "HLO ops" counts the instructions of the optimised XLA module of one step
(entry and fused computations) and "dots" its matrix products, machine-independent
measures of the work compiled in; "callback" says whether the step contains a host
callback (ppl_ext's run-time parameter check, eqx.branched_error_if, compiles one into a
never-taken lax.cond branch; on XLA:CPU its mere presence slows the whole step).

Note: importing ppl_ext replaces numpyro's Bernoulli(logits).log_prob by a softplus form
with the correct gradient at logit 0 (ppl_ext/_numpyro_fixes.py), so every contender that
uses numpyro densities (numpyro SVI included) uses that form here.

Sanity check (--no-check skips it), at the initial weights and B = 64, over K keys: (1) the
loss of every contender's first training step: mean +- standard error, and its z against
hand-written (|z| <= 4 expected); (2) the mean gradient estimate of every contender against
hand-written's: the largest |z| over the 9160 weights (about 4.5 expected for independent
streams, 0 for identical ones; > 6 is flagged); (3) hand-written and all contenders but
the SVI ones and genjax draw eps from the same key in the same way (one site: the key is
used as is; z = loc + scale * normal(key, (B, 4))), so their loss and gradient for one key
must agree to float32 round-off: the largest relative difference is reported.

The table is printed and appended to benchmarks/RESULTS.md (unless --no-results).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # _common.py is next to this file; `models` is a
    if str(_path) not in sys.path:  # top-level folder of the repository
        sys.path.insert(0, str(_path))

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402
from numpyro.optim import optax_to_numpyro  # noqa: E402

import ppl_ext as px  # noqa: E402
from _common import (  # noqa: E402
    command_line, fmt, load_average, log, machine, markdown_table, report, results_heading,
    short_exception, versions)
from models import digits, vae  # noqa: E402

RUN_TARGET = 1.05  # ppl_ext program / the same hand-written program, time per step, at most
NUMPYRO_TARGET = 1.0  # ppl_ext SVI / numpyro SVI time per step, at most (within noise)
LEARNING_RATE = 1e-3
BATCH_SIZES = (64, 128, 256, 512, 1024)
CONTENDERS = (
    "hand-written",
    "hand-written numpyro-densities",
    "ppl_ext jnp-densities",
    "ppl_ext",
    "ppl_ext novalidate",
    "ppl_ext vi.elbo",
    "ppl_ext SVI",
    "ppl_ext SVI novalidate",
    "numpyro SVI",
    "genjax",
)
#: Contenders that draw eps exactly as hand-written does (same key, same shape). The
#: px.numpyro losses split a plate key off the step key first (so that every particle of a
#: bound shares one minibatch), so "ppl_ext SVI" draws from the second half of that split.
SAME_DRAWS = ("hand-written numpyro-densities", "ppl_ext jnp-densities", "ppl_ext",
              "ppl_ext novalidate", "ppl_ext vi.elbo")
CHECK_BATCH = 64
BLOCK_SECONDS = 0.03  # per contender and repeat, for the slowest contender
VERSIONS = ("jaxlib", "numpyro", "equinox", "optax", "genjax")  # versions reported


# ------------------------------------------------------------------------------- the VAE


@dataclass(frozen=True)
class Setup:
    """The VAE shared by every contender."""

    model: Callable
    guide: Callable
    params: dict  # {"encoder$params": ..., "decoder$params": ...} as SVI initialises them
    encoder_static: eqx.Module
    decoder_static: eqx.Module
    latent_dim: int
    images: np.ndarray  # the training split in a fixed random order


def make_setup() -> Setup:
    model, guide = vae.make_vae(jax.random.key(0))
    # The modules make_vae registers with eqx_module; their array leaves are the weights.
    encoder = inspect.getclosurevars(guide).nonlocals["encoder"]
    decoder = inspect.getclosurevars(model).nonlocals["decoder"]
    latent_dim = inspect.getclosurevars(guide).nonlocals["latent_dim"]
    images = digits.load_split()[0]
    images = images[np.random.default_rng(0).permutation(len(images))]
    svi = SVI(model, guide, optax_to_numpyro(optax.adam(LEARNING_RATE)), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.key(0), jnp.asarray(images[:8])))
    encoder_params, encoder_static = eqx.partition(encoder, eqx.is_inexact_array)
    decoder_params, decoder_static = eqx.partition(decoder, eqx.is_inexact_array)
    for mine, theirs in ((encoder_params, params["encoder$params"]),
                         (decoder_params, params["decoder$params"])):
        if not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True)):
            raise RuntimeError("SVI's initial weights differ from make_vae's modules")
    return Setup(model, guide, params, encoder_static, decoder_static, latent_dim, images)


def _networks(setup: Setup, params):
    return (eqx.combine(params["encoder$params"], setup.encoder_static),
            eqx.combine(params["decoder$params"], setup.decoder_static))


def _encode(setup: Setup, encoder, x):
    out = jax.vmap(encoder)(x)
    latent = setup.latent_dim
    return out[:, :latent], jax.nn.softplus(out[:, latent:]) + 1e-3


# ------------------------------------------------------------------------------ builders
#
# Each builder returns (step, init, value_and_grad): `step(state, x) -> (state, loss)` is
# jitted, `init(key)` the state at the initial weights with SVI-style key `key`, and
# `value_and_grad(key, params, x) -> (loss, grads)` the jitted estimator alone (loss =
# negative ELBO), for the sanity check.


def _optax_step(setup: Setup, value_and_grad):
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(setup.params)

    def init(key):
        return setup.params, opt_state, key

    @jax.jit
    def step(state, x):
        params, opt_state, key = state
        key, key_step = jax.random.split(key)
        loss, grads = value_and_grad(key_step, params, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    return step, init, jax.jit(value_and_grad)


def _jnp_negative_elbo(setup: Setup, params, x, draw):
    """The negative ELBO with log densities written in jax.numpy, `z = draw(loc, scale)`:
    the hand-written loss (draw = loc + scale * eps) and, with draw = px.sample of numpyro's
    Normal, the same program in ppl_ext."""
    norm_logpdf = jax.scipy.stats.norm.logpdf
    encoder, decoder = _networks(setup, params)
    loc, scale = _encode(setup, encoder, x)
    z = draw(loc, scale)
    logits = jax.vmap(decoder)(z)
    log_likelihood = jnp.sum(x * logits - jax.nn.softplus(logits))
    log_prior = jnp.sum(norm_logpdf(z))
    log_q = jnp.sum(norm_logpdf(z, loc, scale))
    return log_q - log_prior - log_likelihood


def build_hand(setup: Setup):
    def loss(params, key, x):
        return _jnp_negative_elbo(
            setup, params, x,
            lambda loc, scale: loc + scale * jax.random.normal(key, loc.shape, loc.dtype))

    def value_and_grad(key, params, x):
        return jax.value_and_grad(loss)(params, key, x)

    return _optax_step(setup, value_and_grad)


def _numpyro_negative_elbo(setup: Setup, params, x, draw, validate_args=None):
    """The negative ELBO with numpyro's densities, `z = draw(q)`: the body of the ppl_ext
    program (draw = px.sample) and of its hand-written equivalent (draw = q.rsample(key))."""
    encoder, decoder = _networks(setup, params)
    loc, scale = _encode(setup, encoder, x)
    q = dist.Normal(loc, scale, validate_args=validate_args).to_event(1)
    z = draw(q)
    logits = jax.vmap(decoder)(z)
    log_likelihood = dist.Bernoulli(logits=logits).to_event(1).log_prob(x).sum()
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum()
    return q.log_prob(z).sum() - log_prior - log_likelihood


def build_hand_numpyro(setup: Setup):
    def loss(params, key, x):
        return _numpyro_negative_elbo(setup, params, x, lambda q: q.rsample(key))

    def value_and_grad(key, params, x):
        return jax.value_and_grad(loss)(params, key, x)

    return _optax_step(setup, value_and_grad)


def build_ppl_ext_jnp(setup: Setup):
    @px.expectation
    def negative_elbo(params, x):
        return _jnp_negative_elbo(
            setup, params, x,
            lambda loc, scale: px.sample(dist.Normal(loc, scale).to_event(1)))

    def value_and_grad(key, params, x):
        return negative_elbo.value_and_grad(key, params, x=x)

    return _optax_step(setup, value_and_grad)


def build_ppl_ext(setup: Setup, validate_args=None):
    @px.expectation
    def negative_elbo(params, x):
        return _numpyro_negative_elbo(setup, params, x, px.sample, validate_args)

    def value_and_grad(key, params, x):
        return negative_elbo.value_and_grad(key, params, x=x)

    return _optax_step(setup, value_and_grad)


def build_vi_elbo(setup: Setup):
    objective = px.vi.elbo(px.gen.NumPyroModel(setup.model), px.gen.NumPyroModel(setup.guide))

    def value_and_grad(key, params, x):
        value, grads = objective.value_and_grad(key, params, x=x)
        return -value, jax.tree.map(jnp.negative, grads)

    return _optax_step(setup, value_and_grad)


def _build_svi(setup: Setup, loss):
    svi = SVI(setup.model, setup.guide, optax_to_numpyro(optax.adam(LEARNING_RATE)), loss)
    step = jax.jit(svi.update)
    state = svi.init(jax.random.key(0), jnp.asarray(setup.images[:8]))

    def init(key):
        return state._replace(rng_key=key)

    def value_and_grad(key, params, x):
        return jax.value_and_grad(
            lambda p: loss.loss(key, p, setup.model, setup.guide, x)
        )(params)

    return step, init, jax.jit(value_and_grad)


def build_px_svi(setup: Setup):
    return _build_svi(setup, px.numpyro.ELBO())


def build_px_svi_novalidate(setup: Setup):
    step, init, value_and_grad = _build_svi(setup, px.numpyro.ELBO())

    # numpyro's global default is read when the model builds its distributions, i.e.
    # when the jitted step is traced (on its first call for each batch size).
    def step_novalidate(state, x):
        with numpyro.validation_enabled(False):
            return step(state, x)

    def value_and_grad_novalidate(key, params, x):
        with numpyro.validation_enabled(False):
            return value_and_grad(key, params, x)

    def lower(state, x):
        with numpyro.validation_enabled(False):
            return step.lower(state, x)

    step_novalidate.lower = lower  # for the HLO statistics
    return step_novalidate, init, value_and_grad_novalidate


def build_numpyro_svi(setup: Setup):
    return _build_svi(setup, Trace_ELBO())


@functools.cache
def _genjax():
    import genjax
    from genjax import adev
    from tensorflow_probability.substrates import jax as tfp

    return genjax, adev, tfp.distributions


def build_genjax(setup: Setup):
    genjax, adev, tfd = _genjax()
    # Array-valued sites with one log density each (genjax's normal/bernoulli are
    # elementwise): TFP Independent over the batch and event axes.
    prior = genjax.tfp_distribution(
        lambda loc, scale: tfd.Independent(tfd.Normal(loc, scale), 2), name="prior")
    likelihood = genjax.tfp_distribution(
        lambda logits: tfd.Independent(tfd.Bernoulli(logits=logits, dtype=jnp.float32), 2),
        name="likelihood")

    @genjax.gen
    def model(decoder_params, x):
        shape = (x.shape[0], setup.latent_dim)
        z = prior(jnp.zeros(shape), jnp.ones(shape)) @ "z"
        decoder = eqx.combine(decoder_params, setup.decoder_static)
        likelihood(jax.vmap(decoder)(z)) @ "x"

    @genjax.gen
    def guide(encoder_params, x):
        encoder = eqx.combine(encoder_params, setup.encoder_static)
        loc, scale = _encode(setup, encoder, x)
        adev.multivariate_normal_diag_reparam(loc, scale) @ "z"

    @adev.expectation
    def negative_elbo(params, x):
        trace = guide.simulate(params["encoder$params"], x)
        log_p, _ = model.assess({"z": trace.get_choices()["z"], "x": x},
                                params["decoder$params"], x)
        return -(log_p + trace.get_score())  # the score is -log q(z)

    def loss(params, x):
        return adev.invoke_closed_over(negative_elbo, (params, x))

    seeded = genjax.seed(jax.value_and_grad(loss))

    def value_and_grad(key, params, x):
        return seeded(key, params, x)

    return _optax_step(setup, value_and_grad)


BUILDERS: dict[str, Callable] = {
    "hand-written": build_hand,
    "hand-written numpyro-densities": build_hand_numpyro,
    "ppl_ext jnp-densities": build_ppl_ext_jnp,
    "ppl_ext": build_ppl_ext,
    "ppl_ext novalidate": functools.partial(build_ppl_ext, validate_args=False),
    "ppl_ext vi.elbo": build_vi_elbo,
    "ppl_ext SVI": build_px_svi,
    "ppl_ext SVI novalidate": build_px_svi_novalidate,
    "numpyro SVI": build_numpyro_svi,
    "genjax": build_genjax,
}


# ----------------------------------------------------------------------------- measuring


@dataclass
class Row:
    batch: int
    contender: str
    run_us: float | None = None
    samples: list[float] = field(default_factory=list)
    hlo: tuple[int, int, bool] | None = None  # (instructions, dots, has a host callback)
    na: str | None = None


@dataclass
class Live:
    row: Row
    step: Callable
    state: object


def _hlo_stats(step, state, x) -> tuple[int, int, bool] | None:
    """(instructions, dot products, any host callback) of the optimised HLO module."""
    try:
        text = step.lower(state, x).compile().as_text()
    except Exception:
        return None
    lines = text.splitlines()
    ops = sum(1 for line in lines if " = " in line and line.startswith("  "))
    dots = sum(1 for line in lines if " dot(" in line)
    callback = any("custom-call(" in line and "callback" in line for line in lines)
    return ops, dots, callback


def measure_batch(setup: Setup, built: dict, batch: int, repeats: int, log) -> list[Row]:
    x = jnp.asarray(setup.images[:batch])
    rows, live = [], []
    for name, b in built.items():
        row = Row(batch, name)
        rows.append(row)
        if isinstance(b, str):
            row.na = b
            continue
        step, init, _ = b
        try:
            state = init(jax.random.key(1))
            for _ in range(3):  # compile and warm up
                state, loss = step(state, x)
                jax.block_until_ready(loss)
            if not np.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite loss {float(loss)}")
        except Exception as exc:
            row.na = f"fails: {short_exception(exc)}"
            log(f"  B={batch} {name}: {row.na}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            continue
        row.hlo = _hlo_stats(step, state, x)
        live.append(Live(row, step, state))

    single = []
    for lv in live:
        t0 = time.perf_counter()
        for _ in range(5):
            lv.state, loss = lv.step(lv.state, x)
            jax.block_until_ready(loss)
        single.append((time.perf_counter() - t0) / 5)
    calls = int(np.clip(BLOCK_SECONDS / max(single, default=1e-3), 5, 2000))

    for rep in range(repeats):
        k = rep % max(len(live), 1)
        for lv in live[k:] + live[:k]:
            step, state = lv.step, lv.state
            t0 = time.perf_counter()
            for _ in range(calls):
                state, loss = step(state, x)
                jax.block_until_ready(loss)
            lv.row.samples.append((time.perf_counter() - t0) / calls * 1e6)
            lv.state = state
    for lv in live:
        lv.row.run_us = statistics.median(lv.row.samples)
    log(f"  B={batch}: {repeats} repeats x {calls} calls per contender; "
        + ", ".join(f"{lv.row.contender} {lv.row.run_us:.0f} µs" for lv in live))
    return rows


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def check(setup: Setup, built: dict, num_keys: int, log) -> list[str]:
    """Loss and gradient means over keys against hand-written; same-draw contenders exactly."""
    x = jnp.asarray(setup.images[:CHECK_BATCH])
    keys = jax.random.split(jax.random.key(2), num_keys)
    out, losses, grads = [], {}, {}
    for name, b in built.items():
        if isinstance(b, str):
            continue
        step, init, value_and_grad = b
        try:
            losses[name] = np.array([float(step(init(k), x)[1]) for k in keys])
            grads[name] = np.stack([_flat(value_and_grad(k, setup.params, x)[1]) for k in keys])
        except Exception as exc:
            out.append(f"- {name}: check fails: {short_exception(exc)}")
            losses.pop(name, None)
    hand = "hand-written"
    for name, values in losses.items():
        mean, se = values.mean(), values.std(ddof=1) / np.sqrt(num_keys)
        line = (f"- {name}: first-step loss at B={CHECK_BATCH} over K={num_keys} keys "
                f"{mean:.2f} ± {se:.2f}")
        if hand in losses and name != hand:
            h = losses[hand]
            z = (mean - h.mean()) / np.hypot(se, h.std(ddof=1) / np.sqrt(num_keys))
            g, gh = grads[name], grads[hand]
            diff = g.mean(axis=0) - gh.mean(axis=0)
            se_g = np.hypot(g.std(axis=0, ddof=1), gh.std(axis=0, ddof=1)) / np.sqrt(num_keys)
            live = se_g > 0
            zg = np.abs(diff[live]) / se_g[live] if live.any() else np.zeros(1)
            zg_max = 0.0 if np.all(np.abs(diff) < 1e-6 * (1 + np.abs(gh.mean(axis=0)))) else float(zg.max())
            line += (f", z vs hand-written {z:+.2f}; mean gradient max|z| over {g.shape[1]} "
                     f"weights {zg_max:.1f}")
            if abs(z) > 4 or zg_max > 6:
                line += " SUSPICIOUS"
        out.append(line)

    reference = built.get(hand)
    for name in SAME_DRAWS:
        other = built.get(name)
        if not isinstance(reference, tuple) or not isinstance(other, tuple):
            continue
        worst_value = worst_grad = 0.0
        for k in keys[:10]:
            v0, g0 = reference[2](k, setup.params, x)
            v1, g1 = other[2](k, setup.params, x)
            g0, g1 = _flat(g0), _flat(g1)
            worst_value = max(worst_value, abs(float(v1 - v0)) / abs(float(v0)))
            worst_grad = max(worst_grad, float(np.max(np.abs(g1 - g0)) / np.max(np.abs(g0))))
        verdict = "same draws" if worst_value < 1e-4 and worst_grad < 1e-3 else "DIFFERENT"
        out.append(
            f"- {name} vs hand-written with the same key (10 keys): largest relative "
            f"difference of the loss {worst_value:.1e}, of the gradient (max-norm) "
            f"{worst_grad:.1e}: {verdict}"
        )
    for line in out:
        log("  " + line[2:])
    return out


# ------------------------------------------------------------------------------- report


def _paired(row: Row, base: Row | None):
    if not base or not row.samples or len(row.samples) != len(base.samples):
        return None
    return np.array(row.samples) / np.array(base.samples)


def table(rows: list[Row]) -> str:
    hand = {r.batch: r for r in rows if r.contender == "hand-written"}
    lines = []
    for r in rows:
        if r.na or r.run_us is None:
            lines.append([r.batch, r.contender, "n/a"])
            continue
        h = hand.get(r.batch)
        paired = _paired(r, h)
        ratio = float(np.median(paired)) if paired is not None else None
        iqr = (f"{np.percentile(paired, 25):.3f}–{np.percentile(paired, 75):.3f}"
               if paired is not None else "")
        ops, dots, callback = r.hlo if r.hlo else (None, None, None)
        lines.append([
            r.batch, r.contender, f"{r.run_us:.1f}", f"{fmt(ratio, '.3f')}x", iqr,
            fmt(ops, "d"), fmt(dots, "d"), "" if callback is None else "yes" if callback else "no",
        ])
    return markdown_table(
        ["batch", "contender", "µs / step (median)", "ratio to hand-written",
         "paired ratio IQR", "HLO ops", "dots", "callback"], "rlrrrrrl", lines)


def _ratio(by, batch, num, den):
    """(median, lower quartile) of the paired per-repeat ratios num / den, or None."""
    a, b = by.get((batch, num)), by.get((batch, den))
    paired = _paired(a, b) if a and b else None
    if paired is None:
        return None
    return float(np.median(paired)), float(np.percentile(paired, 25))


def _target(by, batch, num, den, target) -> str:
    """`num / den` at `batch` against `target` (at most), as a verdict clause."""
    r = _ratio(by, batch, num, den)
    if not r:
        return f"{num} / {den} not measured"
    verdict = "met" if r[0] <= target else "met within noise" if r[1] <= target else "NOT met"
    return (f"{num} / {den} {r[0]:.3f}x (paired lower quartile {r[1]:.3f}; "
            f"target <= {target}x: {verdict})")


def verdicts(rows: list[Row]) -> str:
    by = {(r.batch, r.contender): r for r in rows}
    out = []
    for batch in sorted({r.batch for r in rows}):
        parts = [_target(by, batch, "ppl_ext jnp-densities", "hand-written", RUN_TARGET),
                 _target(by, batch, "ppl_ext", "hand-written numpyro-densities", RUN_TARGET),
                 _target(by, batch, "ppl_ext SVI", "numpyro SVI", NUMPYRO_TARGET)]
        extra = []
        for num, den in (("ppl_ext", "hand-written"),
                         ("hand-written numpyro-densities", "hand-written"),
                         ("ppl_ext novalidate", "hand-written"),
                         ("ppl_ext novalidate", "hand-written numpyro-densities"),
                         ("ppl_ext SVI novalidate", "numpyro SVI"),
                         ("genjax", "hand-written")):
            r = _ratio(by, batch, num, den)
            if r:
                extra.append(f"{num} / {den} {r[0]:.3f}x")
        out.append(f"- B={batch}: " + "; ".join(parts) + ("; for reference: " + ", ".join(extra) if extra else ""))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="repeats (default 51; quick 5)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help=f"batch sizes (default {' '.join(map(str, BATCH_SIZES))}; quick 64 1024)")
    p.add_argument("--quick", action="store_true", help="smoke run: two batch sizes, 3 repeats")
    p.add_argument("--no-genjax", action="store_true", help="skip genjax")
    p.add_argument("--no-check", action="store_true", help="skip the sanity check")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    quick = args.quick
    repeats = args.repeats or (5 if quick else 51)
    batch_sizes = args.batch_sizes or ([64, 1024] if quick else list(BATCH_SIZES))
    num_keys = 50 if quick else 200

    command = command_line(argv, "benchmarks/bench_vae.py")
    log(f"# {command}")
    log(f"# {versions(VERSIONS)}; {machine()}; load average {load_average()}")
    t_start, load_start = time.perf_counter(), load_average()

    setup = make_setup()
    if any(b > len(setup.images) or b < 1 for b in batch_sizes):
        p.error(f"batch sizes must be in [1, {len(setup.images)}]")
    built: dict[str, object] = {}
    for name in CONTENDERS:
        if name == "genjax" and args.no_genjax:
            continue
        try:
            built[name] = BUILDERS[name](setup)
        except Exception as exc:
            reason = ("genjax not importable; pip install genjax==1.0.14"
                      if name == "genjax" and isinstance(exc, ImportError) else "")
            built[name] = reason or f"fails to build: {short_exception(exc)}"
            log(f"  {name}: {built[name]}")

    check_lines = []
    if not args.no_check:
        log(f"sanity check (B={CHECK_BATCH}, K={num_keys})")
        check_lines = check(setup, built, num_keys, log)

    rows: list[Row] = []
    for batch in batch_sizes:
        log(f"batch size {batch}")
        rows += measure_batch(setup, built, batch, repeats, log)

    elapsed = time.perf_counter() - t_start
    notes = [f"- {r.contender} at B={r.batch}: n/a, {r.na}" for r in rows if r.na]
    body = (
        results_heading("bench_vae.py", command, versions(VERSIONS), ("ppl_ext", "models"))
        + f"- machine: {machine()}; 1-min load average {load_start} at start, "
        f"{load_average()} at end "
        "(other processes share this machine; ratios come from interleaved repeats)\n"
        f"- VAE {digits.NUM_FEATURES}-{vae.HIDDEN}-{setup.latent_dim} (models.vae defaults), "
        f"single-particle ELBO, optax.adam({LEARNING_RATE:g}); repeats={repeats}; total wall "
        f"time {elapsed:.0f} s{' (QUICK smoke run)' if quick else ''}\n\n"
        + table(rows)
        + "\nµs / step = median over repeats of the per-call time of one jitted training step "
        "(key split, loss and gradient, Adam update; block_until_ready after each call); "
        "ratio = median over repeats of (contender / hand-written in the same repeat), "
        "contenders interleaved; paired ratio IQR = quartiles of that ratio; ratios in the "
        "verdicts likewise (\"met within noise\": the median is above the target, the lower "
        "quartile is not); HLO ops / dots = instructions / matrix products "
        "in the optimised XLA module of the step; callback = the step contains a host "
        "callback.\n\n"
        f"Targets: a ppl_ext program <= {RUN_TARGET}x the hand-written JAX program with the "
        "same log densities (jax.numpy ones: ppl_ext jnp-densities / hand-written; numpyro's: "
        "ppl_ext / hand-written numpyro-densities); ppl_ext SVI <= "
        f"{NUMPYRO_TARGET}x numpyro SVI (Trace_ELBO). ppl_ext / hand-written, for reference, "
        "adds the cost of numpyro's log_prob formulas and of its default sample validation "
        "(the Bernoulli support mask on x), which numpyro SVI pays too:\n\n"
        + verdicts(rows)
        + ("\nSanity check:\n\n" + "\n".join(check_lines) + "\n" if check_lines else "")
        + ("\nNotes:\n\n" + "\n".join(notes) + "\n" if notes else "")
    )
    return report(body, args.no_results)


if __name__ == "__main__":
    sys.exit(main())
