"""scikit-learn's bundled 8x8 digits as float32 arrays (no download)."""

from __future__ import annotations

import functools

import numpy as np

#: Number of pixels (features) of one digit image.
NUM_FEATURES = 64


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn; no network

    bunch = load_digits()
    images = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load(binarize: bool = False, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Load all 1797 digits.

    Returns `(images, labels)`: `images` is float32 of shape `(1797, 64)` with values in
    `[0, 1]` (pixel intensity / 16), or in `{0, 1}` when `binarize` is true (pixels above
    `threshold`); `labels` is int32 of shape `(1797,)` with the digit classes 0-9.
    """
    images, labels = _load()
    if binarize:
        images = binarized(images, threshold)
    return images.copy(), labels.copy()


def binarized(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Threshold images in `[0, 1]`.

    Returns a float32 array of the same shape with 1.0 where `images > threshold`, else 0.0.
    """
    return (np.asarray(images) > threshold).astype(np.float32)


def train_test_split(*arrays: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """Split arrays with a common leading axis by a deterministic random permutation.

    Returns `(a_train, a_test, b_train, b_test, ...)`: for each array its training and test
    rows (the last `round(test_fraction * n)` rows of the permutation drawn from `seed`).
    """
    if not arrays:
        raise ValueError("train_test_split needs at least one array.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError("all arrays must have the same leading dimension.")
    order = np.random.default_rng(seed).permutation(n)
    num_test = int(round(test_fraction * n))
    train, test = order[: n - num_test], order[n - num_test :]
    out = []
    for a in arrays:
        a = np.asarray(a)
        out += [a[train], a[test]]
    return tuple(out)


def load_split(binarize: bool = True, test_fraction: float = 0.2, seed: int = 0):
    """Load the digits and split them deterministically.

    Returns `(x_train, x_test, y_train, y_test)`: float32 images of shape `(n, 64)` (binary
    when `binarize`, else in `[0, 1]`) and int32 labels. With the defaults, 1438 training
    and 359 test digits.
    """
    images, labels = load(binarize=binarize)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_fraction=test_fraction, seed=seed
    )
    return x_train, x_test, y_train, y_test


def fit_svi(svi, x, num_steps: int, batch_size: int, key, progress: bool = False):
    """Run `svi` (a `numpyro.infer.SVI` on `fn(x_batch)`) on random minibatches of `x`.

    `key` is split into SVI's initialisation key and the minibatch keys; each step draws
    `batch_size` distinct rows of `x`. With `num_steps=0` it returns the initial
    parameters. Prints the running mean loss ten times when `progress` is true.

    Returns `(params, losses)`: `svi.get_params` of the final state and a float32 numpy
    array of the `num_steps` loss values.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if not 0 < batch_size <= x.shape[0]:
        raise ValueError(f"batch_size must be in [1, {x.shape[0]}], got {batch_size!r}.")
    key_init, key_batch = jax.random.split(key)
    state = svi.init(key_init, x[:batch_size])

    @jax.jit
    def step(state, step_key):
        idx = jax.random.choice(step_key, x.shape[0], (batch_size,), replace=False)
        return svi.update(state, x[idx])

    losses = np.zeros(num_steps, dtype=np.float32)
    report = max(1, num_steps // 10)
    for i, step_key in enumerate(jax.random.split(key_batch, num_steps)):
        state, value = step(state, step_key)
        losses[i] = value
        if progress and (i + 1) % report == 0:
            recent = losses[i + 1 - report : i + 1]
            print(f"step {i + 1}/{num_steps}: loss {np.mean(recent):.2f}")
    return svi.get_params(state), losses
