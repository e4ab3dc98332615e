"""Statistical helpers for tests (see conftest.py for the false-failure budget).

Every comparison of a Monte-Carlo mean with an exact value (or with another mean) goes
through `assert_unbiased`, `assert_same_mean` or `assert_within_se`, which count it; the
suite's false-failure probability is computed from that count at the end of the run.
"""

import jax
import numpy as np

K_SE = 4.0
NUM_ESTIMATES = 10_000

_COUNT = {"comparisons": 0}


def record_comparisons(number: int) -> None:
    """Count `number` statistical comparisons made (e.g. in a subprocess)."""
    _COUNT["comparisons"] += int(number)


def comparisons_made() -> int:
    """Statistical comparisons counted so far in this process."""
    return _COUNT["comparisons"]


def assert_within_se(difference, se, k: float = K_SE, atol: float = 0.0, what: str = ""):
    """`|difference| <= k · se + atol`, elementwise; one counted comparison per element."""
    difference, se = np.asarray(difference, np.float64), np.asarray(se, np.float64)
    record_comparisons(np.broadcast(difference, se).size)
    bad = np.abs(difference) > k * se + atol
    assert not np.any(bad), f"{what}: difference {difference}, {k} SE = {k * se} (+ {atol})"


def mean_and_se(samples) -> tuple[np.ndarray, np.ndarray]:
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


def assert_same_mean(a, b, k: float = K_SE, atol: float = 1e-6, what: str = ""):
    """Two independent samples (leading axis) have means within `k` combined standard errors."""
    (m1, s1), (m2, s2) = mean_and_se(a), mean_and_se(b)
    record_comparisons(np.size(m1))
    bad = np.abs(m1 - m2) > k * np.hypot(s1, s2) + atol
    assert not np.any(bad), f"{what}: means {m1} vs {m2}, {k} SE = {k * np.hypot(s1, s2)}"


def assert_unbiased(samples, exact, k: float = K_SE, atol: float = 1e-5, what: str = ""):
    """Assert the mean of `samples` (leading axis) is within `k` standard errors of `exact`."""
    mean, se = mean_and_se(samples)
    exact = np.asarray(exact, dtype=np.float64)
    record_comparisons(np.broadcast(mean, exact).size)
    bound = k * se + atol
    bad = np.abs(mean - exact) > bound
    assert not np.any(bad), (
        f"{what}: mean {mean} vs exact {exact}, {k} standard errors = {k * se}"
    )


def tree_allclose(a, b, rtol=1e-5, atol=1e-6) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(leaves_a, leaves_b)
    )


def many(f, num=NUM_ESTIMATES, seed=0):
    """Vectorised, jitted `f(key)` over `num` independent keys."""
    keys = jax.random.split(jax.random.key(seed), num)
    return jax.jit(jax.vmap(f))(keys)




def assert_objective_unbiased(objective, params, exact, *args, what: str = ""):
    """Value and parameter-gradient means of `objective(key, params, *args)` match `exact`.

    `exact(params, *args)` is the closed form, differentiated by jax.grad for the gradient.
    """
    values, grads = many(lambda k: objective.value_and_grad(k, params, *args))
    assert_unbiased(values, exact(params, *args), what=f"{what} value")
    exact_grads = jax.grad(exact)(params, *args)
    for name in params:
        assert_unbiased(grads[name], exact_grads[name], what=f"{what} d/d{name}")


# --------------------------------------------- a one-coin model with exactly computable bounds

def coin_model(x):
    """`c ~ Bernoulli(0.3)`, `x | c ~ Normal(2c - 1, 1)` (NumPyro model, `x` observed)."""
    import numpyro
    import numpyro.distributions as dist

    c = numpyro.sample("c", dist.Bernoulli(probs=0.3))
    numpyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)


def coin_guide(x):
    """`q(c) = Bernoulli(logits = param "logit")`."""
    import numpyro
    import numpyro.distributions as dist

    numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("logit", 0.0)))


def exact_coin_iwelbo(params, x, k):
    """IWELBO(k) of `coin_model`/`coin_guide`, summing over all 2^k joint draws (k=1: ELBO)."""
    import itertools
    import math

    import jax.numpy as jnp
    import numpyro.distributions as dist

    total = 0.0
    for cs in itertools.product([0.0, 1.0], repeat=k):
        cs = jnp.array(cs)
        log_q = dist.Bernoulli(logits=params["logit"]).log_prob(cs)
        log_p = dist.Bernoulli(probs=0.3).log_prob(cs) + dist.Normal(2 * cs - 1, 1.0).log_prob(x)
        total += jnp.exp(jnp.sum(log_q)) * (jax.scipy.special.logsumexp(log_p - log_q)
                                             - math.log(k))
    return total


# ---------------------------- z ~ Normal(0, 1), x | z ~ Normal(z, 1), q(z) = Normal(loc, e^ls)

def exact_gaussian_elbo(params, x):
    """Closed-form ELBO of that model with guide params `{"loc", "log_scale"}`."""
    import math

    import jax.numpy as jnp

    m, s = params["loc"], jnp.exp(params["log_scale"])
    log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * (m**2 + s**2)
    log_lik = -0.5 * math.log(2 * math.pi) - 0.5 * ((x - m) ** 2 + s**2)
    entropy = 0.5 * math.log(2 * math.pi * math.e) + jnp.log(s)
    return log_prior + log_lik + entropy
