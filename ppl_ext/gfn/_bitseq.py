"""Bit sequences: the non-autoregressive bit-sequence task.

Malkin, Jain, Bengio, Sun, Bengio (2022), "Trajectory balance: improved credit assignment
in GFlowNets" introduced generating `n`-bit strings word by word (`k` bits a word) with a
reward decreasing in the Hamming distance to a hidden set of modes; the
"non-autoregressive" version (Malkin et al. 2023, "GFlowNets and variational inference";
also gfnx's `BitseqEnvironment`) lets each action fill *any* empty word, so many orders
reach the same string and the state space is a DAG rather than a tree.
"""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._env import AbstractEnvironment, _check_action

#: Largest number of states `all_states` enumerates (exact evaluation by the DP).
MAX_ENUMERATED_STATES = 200_000

#: The TB paper's building blocks for the modes (8 bits each).
_TB_BLOCKS = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 1, 1, 1, 1, 0, 0],
], np.int32)


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


class BitSequence(AbstractEnvironment):
    """Non-autoregressive generation of an `n`-bit string in `L = n / k` words of `k` bits.

    A state is an int32 vector of `L` words, `−1` for an empty word and otherwise the
    word's value in `[0, 2^k)` (most significant bit first); it starts all empty. Forward
    action `a < L · 2^k` writes word `a mod 2^k` at position `a // 2^k` (valid where that
    position is empty); the exit action `L · 2^k` is valid exactly when no word is empty,
    so the terminal objects are the `2^n` full strings and every trajectory takes `L + 1`
    actions. Backward action `p` empties position `p` (valid where it is filled).

    With modes `M` (bit strings of length `n`) and `d` the Hamming distance,

        log R(x) = −min_{m ∈ M} d(x, m) / temperature,

    torchgfn's `BitSequence.log_reward` (temperature 1: the TB paper's `exp(−d)`).
    `log_reward` of a partial state counts every bit of an empty word as a mismatch (only
    its terminal values are rewards). The intermediate energy (`log_energy`) is the same
    distance restricted to the filled words, `E(s) = min_m d_filled(s, m) / temperature`,
    so `E(x) = −log R(x)` at full strings. The encoding is one-hot per word over
    `2^k + 1` values (empty included).

    Args:
        modes: the modes, 0/1 of shape `(num_modes, n)` (at least one).
        word_size: `k >= 1`, dividing `n`.
        temperature: `> 0`.

    Raises:
        ValueError: modes not a non-empty 2-D 0/1 array, `word_size` not dividing `n`,
            or `temperature <= 0`.

    Example:
        >>> import jax.numpy as jnp
        >>> from ppl_ext.gfn import BitSequence
        >>> env = BitSequence(modes=[[1, 0, 1, 1]], word_size=2)  # two words of 2 bits
        >>> s = env.step(env.initial_state(), jnp.int32(1 * 4 + 3))  # word 3 = 11 at 1
        >>> tuple(s.tolist()), float(env.log_energy(s))
        ((-1, 3), 0.0)
        >>> x = env.step(s, jnp.int32(0))  # word 0 = 00 at position 0: one mismatch
        >>> tuple(x.tolist()), float(env.log_reward(x)), bool(env.forward_mask(x)[-1])
        ((0, 3), -1.0, True)
    """

    modes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    word_size: int = eqx.field(static=True)
    temperature: float = eqx.field(static=True, default=1.0)

    def __init__(self, modes, word_size: int, temperature: float = 1.0):
        array = np.asarray(modes)
        if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
            raise ValueError(f"BitSequence needs modes of shape (num_modes, length) with at "
                             f"least one mode and one bit, got shape {array.shape}.")
        if not np.all((array == 0) | (array == 1)):
            raise ValueError("BitSequence modes must be 0/1 bits.")
        if not _is_int(word_size) or word_size < 1 or array.shape[1] % word_size:
            raise ValueError(f"BitSequence needs a word_size >= 1 dividing the length "
                             f"{array.shape[1]}, got {word_size!r}.")
        if not float(temperature) > 0:
            raise ValueError(f"BitSequence needs temperature > 0, got {temperature!r}.")
        self.modes = tuple(tuple(int(b) for b in row) for row in array)
        self.word_size = int(word_size)
        self.temperature = float(temperature)

    @classmethod
    def tb_paper(cls, key: jax.Array, length: int = 120, word_size: int = 8,
                 num_modes: int = 60, temperature: float = 1.0) -> "BitSequence":
        """Modes built as in the TB paper (and torchgfn, gfnx): each mode concatenates
        `length / 8` blocks drawn uniformly from five 8-bit blocks (`00000000`,
        `11111111`, `11110000`, `00001111`, `00111100`); the modes are distinct.

        Args:
            key: a JAX PRNG key.
            length: `n`, a multiple of 8 (the paper: 120).
            word_size: `k`, dividing `n` (the paper: 1 to 10, default 8 here).
            num_modes: `|M|`, at most `5^(n/8)` (the paper: 60).
            temperature: see the class.

        Raises:
            ValueError: `length` not a positive multiple of 8, or too many modes.
        """
        if not _is_int(length) or length < 8 or length % 8:
            raise ValueError(f"BitSequence.tb_paper needs a length that is a positive "
                             f"multiple of 8, got {length!r}.")
        num_blocks = length // 8
        if not _is_int(num_modes) or not 1 <= num_modes <= 5 ** num_blocks:
            raise ValueError(f"BitSequence.tb_paper needs 1 <= num_modes <= 5^(length/8) = "
                             f"{5 ** num_blocks}, got {num_modes!r}.")
        chosen: list[tuple[int, ...]] = []
        seen = set()
        while len(chosen) < num_modes:
            key, sub = jax.random.split(key)
            draws = np.asarray(jax.random.randint(sub, (num_modes, num_blocks), 0, 5))
            for row in map(tuple, draws.tolist()):
                if row not in seen and len(chosen) < num_modes:
                    seen.add(row)
                    chosen.append(row)
        modes = _TB_BLOCKS[np.array(chosen)].reshape(num_modes, length)
        return cls(modes, word_size, temperature)

    @property
    def length(self) -> int:
        """`n`, the number of bits."""
        return len(self.modes[0])

    @property
    def num_words(self) -> int:
        """`L = n / k`."""
        return self.length // self.word_size

    @property
    def num_actions(self) -> int:
        """`L · 2^k + 1`: write a word at a position, or exit."""
        return self.num_words * 2 ** self.word_size + 1

    @property
    def num_backward_actions(self) -> int:
        """`L`: empty one position."""
        return self.num_words

    @property
    def max_length(self) -> int:
        """`L + 1`: fill every word, then exit."""
        return self.num_words + 1

    @property
    def encoding_size(self) -> int:
        """`L (2^k + 1)`."""
        return self.num_words * (2 ** self.word_size + 1)

    def _check_state(self, state, name):
        state = jnp.asarray(state)
        if state.shape != (self.num_words,):
            raise ValueError(f"BitSequence.{name} takes one state of shape ({self.num_words},),"
                             f" got shape {state.shape}; vmap over a batch.")
        return state

    def _modes(self) -> jax.Array:
        return jnp.asarray(np.array(self.modes, np.int32))

    def bits(self, state: jax.Array) -> jax.Array:
        """The `n` bits of `state` (int32; `−1` for the bits of empty words)."""
        state = self._check_state(state, "bits")
        shifts = jnp.arange(self.word_size - 1, -1, -1, dtype=jnp.int32)
        bits = (jnp.maximum(state, 0)[:, None] >> shifts) & 1
        return jnp.where(state[:, None] < 0, -1, bits).reshape(-1)

    def mode_distances(self, state: jax.Array) -> jax.Array:
        """`(num_modes,)` Hamming distances to the modes (empty bits count as mismatches)."""
        return jnp.sum(self.bits(state)[None, :] != self._modes(), axis=1)

    def initial_state(self) -> jax.Array:
        """All words empty, int32 `(L,)` of `−1`."""
        return jnp.full((self.num_words,), -1, jnp.int32)

    def forward_mask(self, state: jax.Array) -> jax.Array:
        """Write any word at an empty position; exit when the string is full."""
        state = self._check_state(state, "forward_mask")
        empty = state < 0
        writes = jnp.repeat(empty, 2 ** self.word_size)
        return jnp.concatenate([writes, jnp.all(~empty)[None]])

    def backward_mask(self, state: jax.Array) -> jax.Array:
        """Empty a filled position."""
        return self._check_state(state, "backward_mask") >= 0

    def step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """Write word `action mod 2^k` at position `action // 2^k` (exit: unchanged)."""
        state = self._check_state(state, "step")
        action = _check_action(action, "BitSequence.step")
        position, word = action // 2 ** self.word_size, action % 2 ** self.word_size
        hit = (jnp.arange(self.num_words) == position) & (action != self.exit_action)
        return jnp.where(hit, word, state).astype(state.dtype)

    def backward_step(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """Empty position `action`."""
        state = self._check_state(state, "backward_step")
        action = _check_action(action, "BitSequence.backward_step")
        return jnp.where(jnp.arange(self.num_words) == action, -1, state).astype(state.dtype)

    def to_backward_action(self, state: jax.Array, action: jax.Array) -> jax.Array:
        """Writing at position `p` is undone by emptying `p`."""
        return _check_action(action, "BitSequence.to_backward_action") // 2 ** self.word_size

    def log_reward(self, state: jax.Array) -> jax.Array:
        """`−min_m d(x, m) / temperature`."""
        distance = jnp.min(self.mode_distances(state))
        return -distance.astype(jnp.result_type(float)) / self.temperature

    def log_energy(self, state: jax.Array) -> jax.Array:
        """`min_m d_filled(s, m) / temperature`, the distance over the filled words."""
        bits = self.bits(state)
        mismatch = (bits[None, :] != self._modes()) & (bits[None, :] >= 0)
        distance = jnp.min(jnp.sum(mismatch, axis=1))
        return distance.astype(jnp.result_type(float)) / self.temperature

    def num_modes_within(self, states: jax.Array, radius: int) -> jax.Array:
        """How many modes have a sampled string within Hamming distance `radius`.

        The TB paper's "modes found" count for this task.

        Args:
            states: a batch of terminal states, `(batch, L)`.
            radius: the distance `δ >= 0` (the paper uses it for `n = 120`).

        Returns:
            An integer scalar in `[0, num_modes]`.

        Raises:
            ValueError: `states` not of shape `(batch, L)` or `radius < 0`.
        """
        states = jnp.asarray(states)
        if states.ndim != 2 or states.shape[1] != self.num_words:
            raise ValueError(f"BitSequence.num_modes_within needs states of shape (batch, "
                             f"{self.num_words}), got {states.shape}.")
        if not _is_int(radius) or radius < 0:
            raise ValueError(f"BitSequence.num_modes_within needs an int radius >= 0, got "
                             f"{radius!r}.")
        distances = jax.vmap(self.mode_distances)(states)  # (batch, num_modes)
        return jnp.sum(jnp.min(distances, axis=0) <= radius)

    def encode(self, state: jax.Array) -> jax.Array:
        """One-hot per word over `2^k + 1` values (empty first), `(L (2^k + 1),)` floats."""
        state = self._check_state(state, "encode")
        return jax.nn.one_hot(state + 1, 2 ** self.word_size + 1).reshape(-1)

    def _check_enumerable(self, who):
        count = (2 ** self.word_size + 1) ** self.num_words
        if count > MAX_ENUMERATED_STATES:
            raise ValueError(
                f"BitSequence.{who}: n = {self.length}, k = {self.word_size} has {count} "
                f"states, more than MAX_ENUMERATED_STATES = {MAX_ENUMERATED_STATES}, so "
                f"exact evaluation by enumeration is not possible; use the sample-based "
                f"metrics (top_k_reward, num_modes_found with is_mode, num_modes_within) "
                f"instead.")
        return count

    def all_states(self) -> jax.Array:
        """All `(2^k + 1)^L` states, int32, in row-major order of the words (empty first).

        Raises:
            ValueError: more than `MAX_ENUMERATED_STATES` states.
        """
        self._check_enumerable("all_states")
        values = range(-1, 2 ** self.word_size)
        grid = list(itertools.product(values, repeat=self.num_words))
        return jnp.asarray(np.array(grid, np.int32).reshape(-1, self.num_words))

    def state_index(self, state: jax.Array) -> jax.Array:
        """`Σ_p (s_p + 1) (2^k + 1)^(L-1-p)`.

        Raises:
            ValueError: more than `MAX_ENUMERATED_STATES` states.
        """
        state = self._check_state(state, "state_index")
        self._check_enumerable("state_index")
        base = 2 ** self.word_size + 1
        weights = jnp.asarray([base ** p for p in range(self.num_words - 1, -1, -1)],
                              jnp.int32)
        return jnp.sum((state + 1) * weights)

