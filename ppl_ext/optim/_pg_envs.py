"""Two policy-gradient test problems whose optimum is known exactly.

Both sample trajectories inside a `px.expectation` program whose actions are
score-function sites (`px.sample(..., px.reinforce)`): the return depends on the policy
parameters only through the law of the actions, as in reinforcement learning, so
`.grad` is a REINFORCE-type estimate and `.hvp` a score-function Hessian-vector product.
Both are discounted, infinite-horizon problems; a trajectory is truncated after
`num_time_steps` steps, so the program's mean is the truncated return
`E[Σ_{t < T} γ^t r_t]`, within `γ^T` (relative) of the infinite-horizon value that the
exact formulas give (the defaults `γ = 0.5`, `T = 12`: `γ^T ≈ 2.4e-4`). The trajectory
loop is unrolled (not a `lax.scan`) so that ppl_ext's dependency-graph
Rao-Blackwellisation applies: `.grad` scores each action against the rewards that follow
it only (GPOMDP / rewards-to-go), while `.hvp` multiplies every score by the whole return
(unbiased, more variance).

- `LinearQuadraticRegulator`: `x_{t+1} = A x_t + B u_t`, `x_0 ~ N(0, diag(s²))`, a
  Gaussian linear policy `u_t ~ N(-K x_t, σ² I)`, reward `-(x_tᵀ Q x_t + u_tᵀ R u_t)`.
  The optimal gain is the discounted Riccati gain (`scipy.linalg.solve_discrete_are` on
  `(√γ A, √γ B)`); the exact value of any gain solves a discounted Lyapunov equation.
- `TabularMDP`: a finite MDP with a softmax policy `π(a | s) ∝ exp(θ[s, a])`; optimum by
  value iteration, exact value of a policy by a linear solve.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax

from .. import adev as _adev


def _check_matrix(owner, name, value, shape):
    array = np.asarray(value)
    if array.shape != shape:
        raise ValueError(f"{owner}.{name} must have shape {shape}, got {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{owner}.{name} must be finite.")


class LinearQuadraticRegulator(eqx.Module):
    """A discounted linear-quadratic regulator with a Gaussian linear policy.

    Dynamics `x_{t+1} = A x_t + B u_t` (state `n`, action `m`), `x_0 ~ N(0, diag(s²))`,
    policy `u_t ~ N(-K x_t, σ² I)` with the gain `K` (`(m, n)`) as parameters, cost
    `x_tᵀ Q x_t + u_tᵀ R u_t` discounted by `γ`. `objective` returns the REWARD (minus the
    discounted cost), to maximise with `px.fit`.

    Args:
        transition: `A`, `(n, n)`.
        control: `B`, `(n, m)`.
        state_cost: `Q`, `(n, n)`, symmetric positive semidefinite.
        control_cost: `R`, `(m, m)`, symmetric positive definite.
        initial_scale: `s`, `(n,)`, the initial state's standard deviations.
        policy_scale: `σ > 0`, the policy's standard deviation (fixed).
        discount: `γ` in (0, 1).
        num_time_steps: the truncation `T` of a sampled trajectory.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lqr = LinearQuadraticRegulator.small()
        >>> gain = lqr.optimal_gain()
        >>> value = jax.jit(lambda k: lqr.value(k))  # one compile, not op by op
        >>> bool(value(gain) >= value(jnp.zeros_like(gain)))
        True
    """

    transition: jax.Array
    control: jax.Array
    state_cost: jax.Array
    control_cost: jax.Array
    initial_scale: jax.Array
    policy_scale: float = 0.5
    discount: float = 0.5
    num_time_steps: int = eqx.field(static=True, default=12)

    def __check_init__(self):
        name = "LinearQuadraticRegulator"
        a = np.asarray(self.transition)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"{name}.transition must be square (n, n), got {a.shape}.")
        n = a.shape[0]
        b = np.asarray(self.control)
        if b.ndim != 2 or b.shape[0] != n:
            raise ValueError(f"{name}.control must have shape ({n}, m), got {b.shape}.")
        m = b.shape[1]
        _check_matrix(name, "state_cost", self.state_cost, (n, n))
        _check_matrix(name, "control_cost", self.control_cost, (m, m))
        _check_matrix(name, "initial_scale", self.initial_scale, (n,))
        if not np.all(np.linalg.eigvalsh(np.asarray(self.control_cost)) > 0):
            raise ValueError(f"{name}.control_cost must be positive definite.")
        if not np.all(np.linalg.eigvalsh(np.asarray(self.state_cost)) >= -1e-12):
            raise ValueError(f"{name}.state_cost must be positive semidefinite.")
        if not 0 < float(self.discount) < 1:
            raise ValueError(f"{name}.discount must be in (0, 1), got {self.discount!r}.")
        if not float(self.policy_scale) > 0:
            raise ValueError(f"{name}.policy_scale must be positive, got {self.policy_scale!r}.")
        if isinstance(self.num_time_steps, bool) or not isinstance(self.num_time_steps, int) \
                or self.num_time_steps < 1:
            raise ValueError(
                f"{name}.num_time_steps must be an int >= 1, got {self.num_time_steps!r}.")

    @classmethod
    def small(cls, num_time_steps: int = 12) -> "LinearQuadraticRegulator":
        """A scalar instance: `A = B = Q = R = s = 1`, `σ = 0.5`, `γ = 0.5`.

        Example:
            >>> LinearQuadraticRegulator.small().transition.shape
            (1, 1)
        """
        return cls(jnp.array([[1.0]]), jnp.array([[1.0]]), jnp.eye(1), jnp.eye(1),
                   jnp.ones(1), num_time_steps=num_time_steps)

    def initial_gain(self) -> jax.Array:
        """The zero gain `(m, n)` (stabilising when `√γ A` is stable).

        Example:
            >>> LinearQuadraticRegulator.small().initial_gain().shape
            (1, 1)
        """
        return jnp.zeros((self.control.shape[1], self.transition.shape[0]))

    def objective(self) -> _adev.Expectation:
        """`program(gain)`: one sampled trajectory's discounted reward (actions by `px.reinforce`).

        Example:
            >>> import jax
            >>> lqr = LinearQuadraticRegulator.small(num_time_steps=2)
            >>> lqr.objective()(jax.random.key(0), lqr.initial_gain()).shape
            ()
        """
        a, b = self.transition, self.control
        q, r = self.state_cost, self.control_cost
        scale, sigma, gamma = self.initial_scale, self.policy_scale, self.discount
        num_time_steps = self.num_time_steps

        def lqr_return(gain):
            x = px_sample(dist.Normal(jnp.zeros_like(scale), scale).to_event(1))
            total, weight = 0.0, 1.0
            # an unrolled loop, not a scan: top-level sites are Rao-Blackwellised along the
            # dependency graph, so `.grad` scores each action against its rewards-to-go
            for _ in range(num_time_steps):
                u = px_sample(dist.Normal(-(gain @ x), sigma).to_event(1), _adev.reinforce)
                total = total - weight * (x @ q @ x + u @ r @ u)
                x, weight = a @ x + b @ u, weight * gamma
            return total

        return _adev.expectation(lqr_return)

    def _riccati(self):
        import scipy.linalg

        gamma = float(self.discount)
        a = np.sqrt(gamma) * np.asarray(self.transition, np.float64)
        b = np.sqrt(gamma) * np.asarray(self.control, np.float64)
        q = np.asarray(self.state_cost, np.float64)
        r = np.asarray(self.control_cost, np.float64)
        p = scipy.linalg.solve_discrete_are(a, b, q, r)
        gain = np.linalg.solve(r + b.T @ p @ b, b.T @ p @ a)
        return p, gain

    def optimal_gain(self) -> np.ndarray:
        """The optimal gain `K* = γ (R + γ BᵀPB)⁻¹ BᵀPA` (discounted Riccati equation).

        Example:
            >>> LinearQuadraticRegulator.small().optimal_gain().shape
            (1, 1)
        """
        return self._riccati()[1]

    def optimal_value(self) -> float:
        """The optimal infinite-horizon reward `-(tr(P* Σ₀) + c*)` (see `value`).

        Example:
            >>> import jax
            >>> lqr = LinearQuadraticRegulator.small()
            >>> value = jax.jit(lambda k: lqr.value(k))
            >>> abs(lqr.optimal_value() - float(value(lqr.optimal_gain()))) < 1e-4
            True
        """
        p, _ = self._riccati()
        gamma, sigma = float(self.discount), float(self.policy_scale)
        b = np.asarray(self.control, np.float64)
        r = np.asarray(self.control_cost, np.float64)
        s = np.asarray(self.initial_scale, np.float64)
        constant = sigma**2 * (np.trace(r) + gamma * np.trace(b.T @ p @ b)) / (1 - gamma)
        return float(-(np.sum(np.diag(p) * s**2) + constant))

    def value(self, gain) -> jax.Array:
        """The exact infinite-horizon reward of a gain: `-(tr(P_K Σ₀) + c_K)`, with
        `P_K = Q + KᵀRK + γ A_Kᵀ P_K A_K`, `A_K = A - BK`, and
        `c_K = σ² (tr R + γ tr(BᵀP_K B)) / (1 - γ)`; `-inf` for a gain with
        `√γ A_K` unstable. Differentiable (jax.numpy).

        Example:
            >>> import jax
            >>> lqr = LinearQuadraticRegulator.small()
            >>> bool(jax.jit(lambda k: lqr.value(k))(lqr.initial_gain()) < 0)
            True
        """
        gain = jnp.asarray(gain)
        a, b = self.transition, self.control
        q, r = self.state_cost, self.control_cost
        n = a.shape[0]
        gamma, sigma = self.discount, self.policy_scale
        closed = a - b @ gain
        m = q + gain.T @ r @ gain
        # vec(P) = (I - γ A_Kᵀ ⊗ A_Kᵀ)⁻¹ vec(M)
        operator = jnp.eye(n * n) - gamma * jnp.kron(closed.T, closed.T)
        p = jnp.linalg.solve(operator, m.reshape(-1)).reshape(n, n)
        constant = sigma**2 * (jnp.trace(r) + gamma * jnp.trace(b.T @ p @ b)) / (1 - gamma)
        cost = jnp.sum(jnp.diag(p) * self.initial_scale**2) + constant
        stable = jnp.sqrt(gamma) * lax.stop_gradient(closed)
        radius = jnp.max(jnp.abs(jnp.linalg.eigvals(stable)))
        return jnp.where(radius < 1, -cost, -jnp.inf)


def px_sample(distribution, estimator=None):
    """`px.sample` (imported lazily to keep the module importable from `ppl_ext.optim`)."""
    return _adev.sample(distribution, estimator)


class TabularMDP(eqx.Module):
    """A finite discounted MDP with a softmax policy `π(a | s) ∝ exp(θ[s, a])`.

    Args:
        transition: `P[s, a, s']`, `(S, A, S)`, rows summing to 1.
        reward: `r[s, a]`, `(S, A)`.
        initial: `ρ[s]`, `(S,)`, the initial state law.
        discount: `γ` in (0, 1).
        num_time_steps: the truncation `T` of a sampled trajectory.

    `objective` returns one trajectory's discounted reward, to maximise.

    Example:
        >>> import jax
        >>> mdp = TabularMDP.random(0)
        >>> logits = mdp.initial_logits()
        >>> value = jax.jit(lambda theta: mdp.value(theta))  # one compile, not op by op
        >>> bool(mdp.optimal_value() >= float(value(logits)))
        True
    """

    transition: jax.Array
    reward: jax.Array
    initial: jax.Array
    discount: float = 0.5
    num_time_steps: int = eqx.field(static=True, default=12)

    def __check_init__(self):
        name = "TabularMDP"
        p = np.asarray(self.transition)
        if p.ndim != 3 or p.shape[0] != p.shape[2]:
            raise ValueError(f"{name}.transition must have shape (S, A, S), got {p.shape}.")
        s, a, _ = p.shape
        if np.any(p < 0) or not np.allclose(p.sum(-1), 1.0, atol=1e-5):
            raise ValueError(f"{name}.transition rows must be probability vectors.")
        _check_matrix(name, "reward", self.reward, (s, a))
        _check_matrix(name, "initial", self.initial, (s,))
        init = np.asarray(self.initial)
        if np.any(init < 0) or not np.isclose(init.sum(), 1.0, atol=1e-5):
            raise ValueError(f"{name}.initial must be a probability vector.")
        if not 0 < float(self.discount) < 1:
            raise ValueError(f"{name}.discount must be in (0, 1), got {self.discount!r}.")
        if isinstance(self.num_time_steps, bool) or not isinstance(self.num_time_steps, int) \
                or self.num_time_steps < 1:
            raise ValueError(
                f"{name}.num_time_steps must be an int >= 1, got {self.num_time_steps!r}.")

    @classmethod
    def random(cls, seed: int = 0, num_states: int = 3, num_actions: int = 2,
               num_time_steps: int = 12) -> "TabularMDP":
        """A random MDP: Dirichlet(1) transitions, uniform rewards in [0, 1], `γ = 0.5`.

        Example:
            >>> TabularMDP.random(0).transition.shape
            (3, 2, 3)
        """
        rng = np.random.default_rng(seed)
        transition = rng.dirichlet(np.ones(num_states), size=(num_states, num_actions))
        reward = rng.uniform(size=(num_states, num_actions))
        initial = np.full(num_states, 1.0 / num_states)
        return cls(jnp.asarray(transition, jnp.float32), jnp.asarray(reward, jnp.float32),
                   jnp.asarray(initial, jnp.float32), num_time_steps=num_time_steps)

    def initial_logits(self) -> jax.Array:
        """Zero logits `(S, A)`: the uniform policy.

        Example:
            >>> TabularMDP.random(0).initial_logits().shape
            (3, 2)
        """
        return jnp.zeros(self.reward.shape)

    def objective(self) -> _adev.Expectation:
        """`program(logits)`: one sampled trajectory's discounted reward (`px.reinforce` actions).

        Example:
            >>> import jax
            >>> mdp = TabularMDP.random(0, num_time_steps=2)
            >>> mdp.objective()(jax.random.key(0), mdp.initial_logits()).shape
            ()
        """
        transition, reward, initial = self.transition, self.reward, self.initial
        gamma, num_time_steps = self.discount, self.num_time_steps

        def mdp_return(logits):
            state = px_sample(dist.Categorical(probs=initial), _adev.reinforce)
            total, weight = 0.0, 1.0
            for _ in range(num_time_steps):  # unrolled: rewards-to-go, as for the LQR
                action = px_sample(dist.Categorical(logits=logits[state]), _adev.reinforce)
                total = total + weight * reward[state, action]
                state = px_sample(dist.Categorical(probs=transition[state, action]),
                                  _adev.reinforce)
                weight = weight * gamma
            return total

        return _adev.expectation(mdp_return)

    def optimal_values(self, tolerance: float = 1e-12) -> np.ndarray:
        """`V*` by value iteration (float64, until the sup-norm change is below `tolerance`).

        Example:
            >>> TabularMDP.random(0).optimal_values().shape
            (3,)
        """
        p = np.asarray(self.transition, np.float64)
        r = np.asarray(self.reward, np.float64)
        gamma = float(self.discount)
        v = np.zeros(p.shape[0])
        for _ in range(100_000):
            new = np.max(r + gamma * p @ v, axis=1)
            if np.max(np.abs(new - v)) < tolerance:
                return new
            v = new
        return v

    def optimal_value(self) -> float:
        """`ρᵀ V*`, the optimal expected discounted reward.

        Example:
            >>> float(TabularMDP.random(0).optimal_value()) > 0
            True
        """
        return float(np.asarray(self.initial, np.float64) @ self.optimal_values())

    def value(self, logits) -> jax.Array:
        """The exact discounted reward of the softmax policy: `ρᵀ (I - γ P_π)⁻¹ r_π`.

        Example:
            >>> import jax
            >>> mdp = TabularMDP.random(0)
            >>> float(jax.jit(lambda theta: mdp.value(theta))(mdp.initial_logits())) > 0
            True
        """
        policy = jax.nn.softmax(jnp.asarray(logits), axis=-1)
        p_pi = jnp.einsum("sa,sat->st", policy, self.transition)
        r_pi = jnp.sum(policy * self.reward, axis=-1)
        n = p_pi.shape[0]
        v = jnp.linalg.solve(jnp.eye(n) - self.discount * p_pi, r_pi)
        return self.initial @ v
