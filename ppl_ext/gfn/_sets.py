"""Set generation (Pan, Malkin, Zhang, Bengio 2023, "Better training of GFlowNets with
local credit and incomplete trajectories", the forward-looking (FL) GFlowNet paper).

A set of exactly `set_size` elements is built from a universe of `universe_size`, one
element at a time; the energy of a set is the sum of its elements' energies, so every
partial set has a natural intermediate energy (the FL paper's point).
"""

from __future__ import annotations

import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._env import AbstractEnvironment, _check_action

#: The FL paper's per-element energies (ling-pan/FL-GFN, `set/gflownet.py`), stored as
#: the 10 distinct values of each size and, per element, the index of its value. Each
#: value is taken by exactly `universe_size / 10` elements.
_FL_PAPER = {
    "small": (30, 20, (
        -0.4381397850674522, -0.40046449111789073, -0.2745059751263419,
        0.013149744911117978, 0.4110535720923896, 0.6261749162235306, 0.6961474461702144,
        0.7442282139370466, 0.8206350287761408, 0.883494921538938),
        "692977150408636431097255818243"),
    "medium": (80, 60, (
        -0.7866830411595669, -0.7837872949891345, -0.5230497555411129,
        -0.41860806745880197, -0.3855205729595568, 0.2961218224370139, 0.5731802451199923,
        0.6009291618806774, 0.6881812517688572, 0.7396350970666805),
        "26803969078211307342235871506543219373525821858668442651398497107690507769490441"),
    "large": (100, 80, (
        -0.8596854107736154, -0.5938789622812419, -0.5596177369051512,
        -0.4589997720511263, -0.15382957507887518, 0.13832182722858843, 0.3925029176153736,
        0.7231982581431591, 0.7326989860019331, 0.9244538380742333),
        "44005393186780911528205974419596463305025058975734811297708361869324614158204296"
        "30873226675477218369"),
}

#: Largest number of states `all_states` enumerates (exact evaluation by the generic DP).
MAX_ENUMERATED_STATES = 200_000


def _num_states(universe_size: int, set_size: int) -> int:
    return sum(math.comb(universe_size, j) for j in range(set_size + 1))


class SetGeneration(AbstractEnvironment):
    """Build a set of `k = set_size` elements out of `U = universe_size`; the FL paper's task.

    A state is a 0/1 int32 vector `s` of length `U` (the members), starting empty.
    Forward action `i < U` adds element `i` (valid while `s_i = 0` and `|s| < k`); action
    `U` exits and is valid exactly when `|s| = k`, so the terminal objects are the
    `C(U, k)` sets of size `k` and every trajectory takes `k + 1` actions. Backward action
    `i` removes element `i` (valid where `s_i = 1`). With per-element energies `e_i`,

        log R(x) = −Σ_{i ∈ x} e_i,     E(s) = Σ_{i ∈ s} e_i   (`log_energy`),

    so `E(x) = −log R(x)` at terminal sets and the FL paper's intermediate rewards
    `exp(−e_i)` multiply to `R(x)`. (`log_reward` is defined, by the same formula, on
    partial sets too; only its terminal values are rewards.) The encoding is `s` itself
    as floats, the paper's MLP input.

    Because `R` is a product over members, `log Z = log e_k(exp(−e_1), ..., exp(−e_U))`,
    an elementary symmetric polynomial, is exact by a DP over elements
    (`log_partition`) at any size. The state space (all sets of size `≤ k`) is enumerated
    for the generic exact evaluation only when it has at most `MAX_ENUMERATED_STATES`
    states (e.g. `U = 10, k = 5`; not the paper's sizes).

    Args:
        energies: the per-element energies `e_i` (a tuple of floats, length `U >= 1`).
        set_size: `k`, with `1 <= k <= U`.

    Raises:
        ValueError: empty or non-finite energies, or `set_size` outside `[1, U]`.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.gfn import SetGeneration
        >>> env = SetGeneration(energies=(0.5, -1.0, 2.0), set_size=2)
        >>> s = env.step(env.initial_state(), jnp.int32(1))
        >>> tuple(s.tolist()), tuple(env.forward_mask(s).tolist())
        ((0, 1, 0), (True, False, True, False))
        >>> x = env.step(s, jnp.int32(0))
        >>> float(env.log_reward(x)), float(env.log_energy(x)), bool(env.forward_mask(x)[-1])
        (0.5, -0.5, True)

    Reference: Pan, Malkin, Zhang, Bengio (2023), ICML; energies from the authors' code
    (github.com/ling-pan/FL-GFN, `set/gflownet.py`), see `SetGeneration.fl_paper`.
    """

    energies: tuple[float, ...] = eqx.field(static=True)
    set_size: int = eqx.field(static=True)

    def __init__(self, energies, set_size: int):
        energies = tuple(float(e) for e in np.asarray(energies, np.float64).reshape(-1))
        if len(energies) == 0:
            raise ValueError("SetGeneration needs at least one element energy, got none.")
        if not all(math.isfinite(e) for e in energies):
            raise ValueError(f"SetGeneration energies must be finite, got {energies!r}.")
        if isinstance(set_size, bool) or not isinstance(set_size, (int, np.integer)) \
                or not 1 <= set_size <= len(energies):
            raise ValueError(f"SetGeneration needs 1 <= set_size <= universe_size = "
                             f"{len(energies)}, got set_size={set_size!r}.")
        self.energies = energies
        self.set_size = int(set_size)

    @classmethod
    def fl_paper(cls, size: str = "small") -> "SetGeneration":
        """The FL paper's instances: `"small"` (U = 30, k = 20), `"medium"` (80, 60) or
        `"large"` (100, 80), with the authors' per-element energies.

        Raises:
            ValueError: an unknown `size`.

        Example:
            >>> from ppl_ext.gfn import SetGeneration
            >>> env = SetGeneration.fl_paper("medium")
            >>> env.universe_size, env.set_size
            (80, 60)
        """
        if size not in _FL_PAPER:
            raise ValueError(f"SetGeneration.fl_paper: size must be one of "
                             f"{sorted(_FL_PAPER)}, got {size!r}.")
        universe_size, set_size, levels, index = _FL_PAPER[size]
        assert len(index) == universe_size
        return cls(tuple(levels[int(c)] for c in index), set_size)

    @classmethod
    def random(cls, key: jax.Array, universe_size: int, set_size: int,
               num_levels: int = 10) -> "SetGeneration":
        """Random energies with the law of the FL paper's instances.

        The published instances (`fl_paper`) have 10 distinct energies in (−1, 1), each
        taken by exactly `U / 10` elements in a scrambled order. This draws `num_levels`
        values i.i.d. uniform on (−1, 1) and assigns them to the elements by a uniformly
        random permutation of the balanced assignment (level `j` to `U / num_levels`
        elements, the remainder going to the first levels). (The law is read off the
        published constants; the paper's code only lists them.)

        Args:
            key: a JAX PRNG key.
            universe_size: `U >= 1`.
            set_size: `k`, `1 <= k <= U`.
            num_levels: the number of distinct energies, `1 <= num_levels <= U`.

        Raises:
            ValueError: `num_levels` outside `[1, U]` (the constructor checks the rest).
        """
        if isinstance(universe_size, bool) or not isinstance(universe_size, (int, np.integer)) \
                or universe_size < 1:
            raise ValueError(f"SetGeneration.random needs universe_size >= 1, got "
                             f"{universe_size!r}.")
        if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) \
                or not 1 <= num_levels <= universe_size:
            raise ValueError(f"SetGeneration.random needs 1 <= num_levels <= universe_size, "
                             f"got num_levels={num_levels!r}.")
        key_levels, key_perm = jax.random.split(key)
        levels = jax.random.uniform(key_levels, (num_levels,), minval=-1.0, maxval=1.0)
        assignment = jnp.arange(universe_size) % num_levels
        assignment = jax.random.permutation(key_perm, assignment)
        return cls(np.asarray(levels[assignment]), set_size)

    @property
    def universe_size(self) -> int:
        """`U`, the number of elements."""
        return len(self.energies)

    @property
    def num_actions(self) -> int:
        """`U + 1`: add one element, or exit."""
        return self.universe_size + 1

    @property
    def num_backward_actions(self) -> int:
        """`U`: remove one element."""
        return self.universe_size

    @property
    def max_length(self) -> int:
        """`k + 1`: add `k` elements, then exit."""
        return self.set_size + 1

    @property
    def encoding_size(self) -> int:
        """`U` (the membership vector)."""
        return self.universe_size

    def _energies(self) -> jax.Array:
        return jnp.asarray(self.energies, jnp.result_type(float))

    def _check_state(self, state, name):
        state = jnp.asarray(state)
        if state.shape != (self.universe_size,):
            raise ValueError(f"SetGeneration.{name} takes one state of shape "
                             f"({self.universe_size},), got shape {state.shape}; vmap over "
                             f"a batch.")
        return state

    def initial_state(self) -> jax.Array:
        """The empty set, int32 `(U,)` zeros."""
        return jnp.zeros((self.universe_size,), jnp.int32)

    def forward_mask(self, state: jax.Array) -> jax.Array:
        """Add a non-member while `|s| < k`; exit exactly when `|s| = k`."""
        state = self._check_state(state, "forward_mask")
        size = jnp.sum(state)
        return jnp.concatenate([(state == 0) & (size < self.set_size),
                                (size == self.set_size)[None]])

    def backward_mask(self, state: jax.Array) -> jax.Array:
        """Remove a member."""
        return self._check_state(state, "backward_mask") == 1

    def step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """Set `s_action = 1` (unchanged for the exit action `U`)."""
        state = self._check_state(state, "step")
        action = _check_action(action, "SetGeneration.step")
        return jnp.maximum(state, (jnp.arange(self.universe_size) == action).astype(state.dtype))

    def backward_step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """Set `s_action = 0`."""
        state = self._check_state(state, "backward_step")
        action = _check_action(action, "SetGeneration.backward_step")
        return jnp.where(jnp.arange(self.universe_size) == action, 0, state).astype(state.dtype)

    def to_backward_action(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """Adding `i` is undone by removing `i`."""
        return _check_action(action, "SetGeneration.to_backward_action")

    def log_reward(self, state: jax.Array) -> jax.Array:
        """`−Σ_{i ∈ s} e_i`."""
        state = self._check_state(state, "log_reward")
        return -jnp.sum(state * self._energies())

    def log_energy(self, state: jax.Array) -> jax.Array:
        """`E(s) = Σ_{i ∈ s} e_i`, the partial set's energy (`−log R(x)` at terminals)."""
        state = self._check_state(state, "log_energy")
        return jnp.sum(state * self._energies())

    def log_partition(self) -> jax.Array:
        """Exact `log Z = log Σ_{|x| = k} Π_{i ∈ x} exp(−e_i)` by a DP over the elements.

        `L_j` (the log elementary symmetric polynomial of degree `j` of the elements seen
        so far) is updated element by element, `L_j ← logaddexp(L_j, L_{j−1} − e_i)`;
        `O(U k)`, exact at the paper's sizes, where the sets cannot be enumerated.
        """
        dtype = jnp.result_type(float)
        start = jnp.full((self.set_size + 1,), -jnp.inf, dtype).at[0].set(0.0)

        def add(log_e, energy):
            shifted = jnp.concatenate([jnp.full((1,), -jnp.inf, dtype), log_e[:-1] - energy])
            return jnp.logaddexp(log_e, shifted), None

        log_e, _ = lax.scan(add, start, self._energies())
        return log_e[self.set_size]

    def top_log_reward(self) -> jax.Array:
        """The largest `log R(x)`: minus the sum of the `k` smallest energies."""
        return -jnp.sum(jnp.sort(self._energies())[: self.set_size])

    def top_log_rewards(self, num_top: int = 100) -> jax.Array:
        """The `num_top` largest log rewards over all `C(U, k)` sets, exactly, descending.

        Each value appears once per set that attains it (sets with equal energies are
        distinct sets), so `jnp.exp(env.top_log_rewards(100)).mean()` is the best possible
        value of `top_k_reward(env, states, 100)` (the FL paper's top-100 metric): the
        exact optimum that a sampler's distinct top-100 sets can reach. With fewer than
        `num_top` sets, all of them.

        Computed on the host in float64 without enumerating sets: equal energies are
        grouped into levels (value `v`, `c_v` elements); a set is then a vector of counts
        `n_v` (with `Σ n_v = k`, `C(c_v, n_v)` sets each, energy `Σ n_v v`), and a
        depth-first search lists every count vector whose energy is within `δ` of the
        optimum, pruned by the greedy lower bound of the remaining elements; `δ` doubles
        until these vectors cover `num_top` sets.

        Args:
            num_top: `k >= 1`, the number of best sets.

        Raises:
            ValueError: `num_top` is not an int >= 1.

        Example:
            >>> from ppl_ext.gfn import SetGeneration
            >>> env = SetGeneration((0.5, -1.0, 0.5, 2.0), set_size=2)
            >>> [round(v, 3) for v in env.top_log_rewards(4).tolist()]  # {1,0}, {1,2}, {0,2}, ...
            [0.5, 0.5, -1.0, -1.0]
        """
        if isinstance(num_top, bool) or not isinstance(num_top, (int, np.integer)) \
                or num_top < 1:
            raise ValueError(f"SetGeneration.top_log_rewards: num_top must be an int >= 1, "
                             f"got {num_top!r}.")
        values, counts = np.unique(np.asarray(self.energies, np.float64), return_counts=True)
        counts = [int(c) for c in counts]
        k, num_levels = self.set_size, len(values)
        wanted = min(int(num_top), math.comb(self.universe_size, k))
        # bound[v][r]: the least energy of r elements from levels v, v + 1, ... (greedy)
        bound = np.full((num_levels + 1, k + 1), np.inf)
        bound[num_levels, 0] = 0.0
        for v in range(num_levels - 1, -1, -1):
            for r in range(k + 1):
                n = min(counts[v], r)
                bound[v, r] = n * values[v] + bound[v + 1, r - n]
        best = bound[0, k]
        scale = max(1.0, float(np.abs(values).max()) * k)
        delta = 1e-9 * scale

        def search(threshold):
            found = []

            def visit(v, r, energy, multiplicity):
                if r == 0:
                    found.append((energy, multiplicity))
                    return
                for n in range(min(counts[v], r), -1, -1):
                    if energy + n * values[v] + bound[v + 1, r - n] <= threshold:
                        visit(v + 1, r - n, energy + n * values[v],
                              multiplicity * math.comb(counts[v], n))

            visit(0, k, 0.0, 1)
            return found

        while True:
            found = search(best + delta)
            if sum(m for _, m in found) >= wanted:
                break
            delta *= 2.0
        found.sort(key=lambda item: item[0])
        out = []
        for energy, multiplicity in found:
            out.extend([-energy] * min(multiplicity, wanted - len(out)))
            if len(out) == wanted:
                break
        return jnp.asarray(np.asarray(out, np.float64), jnp.result_type(float))

    def encode(self, state: jax.Array) -> jax.Array:
        """The membership vector as floats, `(U,)`."""
        return self._check_state(state, "encode").astype(jnp.result_type(float))

    def _check_enumerable(self, who):
        count = _num_states(self.universe_size, self.set_size)
        if count > MAX_ENUMERATED_STATES:
            raise ValueError(
                f"SetGeneration.{who}: U = {self.universe_size}, k = {self.set_size} has "
                f"{count} states (all sets of size <= k), more than MAX_ENUMERATED_STATES = "
                f"{MAX_ENUMERATED_STATES}, so exact evaluation by enumeration is not "
                f"possible; use log_partition (exact at any size) and the empirical "
                f"metrics (top_k_reward, num_modes_found with is_mode) instead.")
        return count

    def _binomials(self) -> np.ndarray:
        table = np.zeros((self.universe_size + 1, self.set_size + 2), np.int64)
        for c in range(self.universe_size + 1):
            for i in range(self.set_size + 2):
                table[c, i] = math.comb(c, i)
        return table

    def all_states(self) -> jax.Array:
        """Every set of size `≤ k`, int32 `(Σ_{j≤k} C(U, j), U)`, by size, then colex.

        Raises:
            ValueError: more than `MAX_ENUMERATED_STATES` states.
        """
        count = self._check_enumerable("all_states")
        binomials = self._binomials()
        states = np.zeros((count, self.universe_size), np.int32)
        offset = 0
        for size in range(self.set_size + 1):
            for members in itertools.combinations(range(self.universe_size), size):
                rank = sum(binomials[c, i + 1] for i, c in enumerate(members))
                states[offset + rank, list(members)] = 1
            offset += math.comb(self.universe_size, size)
        return jnp.asarray(states)

    def state_index(self, state: jax.Array) -> jax.Array:
        """`Σ_{j<|s|} C(U, j)` plus the colex rank `Σ_m C(c_m, m)` of the members
        `c_1 < c_2 < ...` (`m` from 1).

        Raises:
            ValueError: more than `MAX_ENUMERATED_STATES` states.
        """
        state = self._check_state(state, "state_index")
        self._check_enumerable("state_index")
        binomials = jnp.asarray(self._binomials().astype(np.int32))
        offsets = jnp.asarray(np.cumsum([0] + [math.comb(self.universe_size, j)
                                               for j in range(self.set_size + 1)],
                                              dtype=np.int64)[:-1].astype(np.int32))
        position = jnp.clip(jnp.cumsum(state), 0, self.set_size + 1)  # m for each member
        terms = binomials[jnp.arange(self.universe_size), position]
        size = jnp.clip(jnp.sum(state), 0, self.set_size)
        return offsets[size] + jnp.sum(jnp.where(state == 1, terms, 0))
