"""Trajectory sampling and the balance objectives: trajectory, detailed and sub-trajectory
balance, their forward-looking variants, flow matching and the log-partition variance.

Flow-based objectives share one convention: along a trajectory that takes `L` actions
(the exit included), the flows are `log F(s0) = params["log_z"]`, the learned
`log F(s_t)` for `0 < t < L` (forward-looking: `log F̃(s_t) − E(s_t)/T`) and, after the
exit, the sink's `log R(x)/T`; every residual is written with these, so each objective is
exactly zero at the balanced flows under any sampling (on- or off-policy, replayed). A
state whose only valid action is the exit has its flow pinned to `log R(x)/T` (all of
its flow goes to the sink), not learned.

A batch of trajectories is a `lax.scan` of `env.max_length` steps, vmapped over the
batch; a trajectory that has exited stays where it is and its later steps are masked out.
Actions are drawn by inverse CDF from one uniform number per step, so the objectives are
`px.expectation` programs with a single sample site (the uniforms, which do not depend
on the parameters; replay adds two more of the same kind: the buffer picks and the
backward moves). The sampled trajectory is therefore never differentiated: gradients
flow through the log-probabilities of the sampled actions only, the usual on-policy
(and off-policy, with exploration) balance-objective gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax

from ..adev import Expectation, expectation, reinforce, sample
from ._policy import AbstractPolicy


class Trajectories(NamedTuple):
    """A batch of trajectories (leading axis: the batch; second: the step).

    Attributes:
        states: `(batch, max_length + 1, *state_shape)`, the states visited (a finished
            trajectory repeats its terminal state).
        actions: `(batch, max_length)` int32 forward actions (meaningless where not
            `active`).
        active: `(batch, max_length)` bool, the steps actually taken (exit included).
        log_pf: `(batch, max_length)`, `log P_F(a_t | s_t)` of the policy (0 where not
            active), differentiable in the parameters.
        log_pb: `(batch, max_length)`, `log P_B(s_t | s_{t+1})` (0 at the exit step and
            where not active).
        terminal_state: `(batch, *state_shape)`, the state each trajectory exited from.
        log_reward: `(batch,)`, `log R` of the terminal states.
    """

    states: jax.Array
    actions: jax.Array
    active: jax.Array
    log_pf: jax.Array
    log_pb: jax.Array
    terminal_state: jax.Array
    log_reward: jax.Array


def _check_common(policy, num_samples, exploration, who):
    if not isinstance(policy, AbstractPolicy):
        raise TypeError(f"{who} needs a policy (e.g. px.gfn.MLPPolicy), got "
                        f"{type(policy).__name__}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise ValueError(f"{who}: num_samples must be an int >= 1, got {num_samples!r}.")
    if not 0.0 <= float(exploration) <= 1.0:
        raise ValueError(f"{who}: exploration must be in [0, 1], got {exploration!r}.")


def _categorical(probs: jax.Array, uniform: jax.Array) -> jax.Array:
    """Inverse-CDF draw; never an action of probability 0 (strict comparison)."""
    cumulative = jnp.cumsum(probs)
    return jnp.argmax(cumulative > uniform * cumulative[-1]).astype(jnp.int32)


def _row_tiers(num_rows: int, min_rows: int = 0, factor: int = 2) -> list[int]:
    """Static row counts `_on_rows` may evaluate: `num_rows`, divided by `factor` while
    the result still holds `min_rows` and is at least `num_rows / 32` and 8 (each tier
    is compiled: fewer tiers compile faster, more waste less)."""
    floor = max(min_rows, num_rows // 32, 8)
    sizes, size = [num_rows], num_rows
    while -(-size // factor) >= floor and size > 1:
        size = -(-size // factor)
        sizes.append(size)
    return sorted(set(sizes))


def _on_rows(fn, rows, keep: jax.Array, min_rows: int = 0, factor: int = 2):
    """`jax.vmap(fn)(rows)` at the rows where `keep`, computed on those rows only.

    The kept rows are packed first (stable order) and `fn` runs on the smallest static
    tier of rows (`_row_tiers`) that holds them all, chosen by `lax.switch`, so the cost
    follows the number of kept rows (at most `factor` times it, or the smallest tier),
    not the padded batch; `min_rows` is a known lower bound on their number (no smaller
    tier). Outputs at other rows are unspecified (zeros or `fn` of some other row): mask
    them. Differentiable (reverse mode recomputes and differentiates the tier that ran).
    """
    num_rows = keep.shape[0]
    sizes = _row_tiers(num_rows, min_rows, factor)
    if len(sizes) == 1:
        return jax.vmap(fn)(rows)
    keep = keep.astype(bool)
    count = jnp.sum(keep, dtype=jnp.int32)
    kept_so_far = jnp.cumsum(keep, dtype=jnp.int32)
    positions = jnp.arange(num_rows, dtype=jnp.int32)
    # packed position of each row: kept rows first, then the others, both in order
    dest = jnp.where(keep, kept_so_far - 1, count + positions - kept_so_far)
    order = jnp.zeros((num_rows,), jnp.int32).at[dest].set(positions, unique_indices=True)
    packed = jax.tree.map(lambda r: r[order], rows)

    out_shapes = jax.eval_shape(jax.vmap(fn), rows)

    def tier(size):
        def run(packed):
            out = jax.vmap(fn)(jax.tree.map(lambda r: r[:size], packed))
            if size == num_rows:
                return out
            return jax.tree.map(
                lambda o, s: jnp.concatenate([o, jnp.zeros((num_rows - size,) + o.shape[1:],
                                                           s.dtype)]), out, out_shapes)
        return run

    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count)
    # rematerialised: reverse mode saves no activations of the tiers (a cond's branches
    # would all return zero-filled copies of every tier's activations)
    out = lax.switch(index, [jax.checkpoint(tier(size)) for size in sizes], packed)
    return jax.tree.map(lambda o: o[dest], out)


def _batch(policy: AbstractPolicy, params, uniforms: jax.Array,
           exploration: float) -> Trajectories:
    """`uniforms.shape[0]` trajectories from `s0`, each driven by a row of `uniforms`
    `(num, max_length)` (one inverse-CDF draw a step).

    Two passes. The rollout, a `lax.scan` over the steps of the whole batch, evaluates
    the forward policy at the (stop-gradient) parameters only at the trajectories still
    running (`_on_rows`), to draw the actions. Then `log P_F(a_t | s_t)` and
    `log P_B(s_t | s_{t+1})` are computed, differentiably, on the transitions actually
    taken, all steps at once (one batched evaluation of each network instead of one per
    step, and none on the padding after the exit).
    """
    env = policy.env
    frozen = lax.stop_gradient(params)
    num, length = uniforms.shape
    s0 = env.initial_state()
    exit_only = (jnp.arange(env.num_actions) == env.exit_action).astype(uniforms.dtype)

    def body(carry, uniform):
        state, done = carry
        running = ~done
        log_probs = _on_rows(lambda s: policy.forward_log_probs(frozen, s), state, running,
                             0, 4)
        probs = jnp.exp(log_probs)
        if exploration > 0.0:
            mask = jax.vmap(env.forward_mask)(state)
            probs = (1.0 - exploration) * probs \
                + exploration * mask / jnp.sum(mask, axis=-1, keepdims=True)
        probs = jnp.where(running[:, None], probs, exit_only)  # finished: exit, masked
        action = jax.vmap(_categorical)(probs, uniform)
        is_exit = action == env.exit_action
        child = jax.vmap(env.step)(state, action)
        stay = jnp.reshape(done | is_exit, (num,) + (1,) * (state.ndim - 1))
        return (jnp.where(stay, state, child), done | is_exit), (state, action, running)

    init = (jnp.broadcast_to(s0, (num, *s0.shape)), jnp.zeros((num,), bool))
    (last, _), (states, actions, active) = lax.scan(body, init, uniforms.T)
    states = jnp.concatenate([jnp.moveaxis(states, 0, 1), last[:, None]], axis=1)
    actions, active = actions.T, active.T

    state_shape = s0.shape
    parents = states[:, :-1].reshape((num * length, *state_shape))
    children = states[:, 1:].reshape((num * length, *state_shape))
    flat_actions = actions.reshape(-1)
    is_exit = actions == env.exit_action
    moving = active & ~is_exit

    def forward_term(row):
        state, action = row
        return policy.forward_log_probs(params, state)[action]

    def backward_term(row):
        parent, action, child = row
        backward = jnp.clip(jnp.where(action == env.exit_action, 0,
                                      env.to_backward_action(parent, action)),
                            0, env.num_backward_actions - 1)
        return policy.backward_log_probs(params, child)[backward]

    # every trajectory takes at least one step: never fewer than `num` rows
    # differentiated (each tier compiles a forward and a backward pass): tiers 4x apart
    log_pf = _on_rows(forward_term, (parents, flat_actions), active.reshape(-1), num, 4)
    log_pb = _on_rows(backward_term, (parents, flat_actions, children), moving.reshape(-1),
                      0, 4)
    log_pf = jnp.where(active, log_pf.reshape(num, length), 0.0)
    log_pb = jnp.where(moving, log_pb.reshape(num, length), 0.0)
    return Trajectories(states, actions, active, log_pf, log_pb, last,
                        jax.vmap(env.log_reward)(last))


def sample_trajectories(key: jax.Array, policy: AbstractPolicy, params: dict,
                        num_samples: int, exploration: float = 0.0) -> Trajectories:
    """Draw `num_samples` independent trajectories from the forward policy.

    With `exploration = ε`, each action is drawn from `(1 - ε) P_F(· | s) + ε U(valid)`;
    the recorded `log_pf` is always the policy's own.

    Args:
        key: a JAX PRNG key.
        policy: an `AbstractPolicy` (e.g. `MLPPolicy`).
        params: its parameters (`policy.init(key)`).
        num_samples: the number of trajectories.
        exploration: ε in [0, 1] (default 0: on-policy).

    Returns:
        `Trajectories`.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, sample_trajectories
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0))
        >>> batch = sample_trajectories(jax.random.key(1), policy, params, 5)
        >>> batch.terminal_state.shape, batch.active.shape
        ((5, 2), (5, 7))
    """
    _check_common(policy, num_samples, exploration, "sample_trajectories")
    return _sample_trajectories(key, policy, params, num_samples, float(exploration))


@eqx.filter_jit
def _sample_trajectories(key, policy, params, num_samples, exploration):
    uniforms = jax.random.uniform(key, (num_samples, policy.env.max_length))
    return _batch(policy, params, uniforms, exploration)


def _backward_rollout(policy: AbstractPolicy, params, terminal: jax.Array,
                      uniforms: jax.Array) -> Trajectories:
    """One trajectory sampled backward from `terminal` with `P_B`, in forward order.

    Driven by `uniforms` `(max_length - 1,)` (inverse-CDF draws of backward actions, from
    stop-gradient probabilities). The forward action undoing each backward move is found
    among the parent's valid forward actions by comparing children, so any environment
    obeying the protocol identity `backward_step(step(s, a), ...) == s` works.
    """
    env = policy.env
    num_moves = env.max_length - 1
    exit_action = env.exit_action

    def body(carry, uniform):
        state, done = carry
        mask = env.backward_mask(state)
        done = done | ~jnp.any(mask)  # at s0: nothing left to undo
        log_probs = policy.backward_log_probs(params, state)
        probs = lax.stop_gradient(jnp.where(mask, jnp.exp(log_probs), 0.0))
        backward = _categorical(probs + (~jnp.any(mask)), uniform)  # any index at s0
        parent = env.backward_step(state, backward)
        action = _forward_action(env, parent, state)
        log_pf = policy.forward_log_probs(params, parent)[action]
        active = ~done
        out = (jnp.where(active, parent, state), action, active,
               jnp.where(active, log_pf, 0.0), jnp.where(active, log_probs[backward], 0.0))
        return (jnp.where(active, parent, state), done), out

    init = (terminal, jnp.zeros((), bool))
    _, (parents, actions, active, log_pf, log_pb) = lax.scan(body, init, uniforms)
    exit_log_pf = policy.forward_log_probs(params, terminal)[exit_action]
    # append one row (the exit from the terminal state) so the gather below is never empty
    parents = jnp.concatenate([parents, terminal[None]], axis=0)
    actions = jnp.concatenate([actions, jnp.full((1,), exit_action, jnp.int32)])
    log_pf = jnp.concatenate([log_pf, exit_log_pf[None]])
    log_pb = jnp.concatenate([log_pb, jnp.zeros((1,), log_pb.dtype)])
    moves = jnp.sum(active)
    steps = jnp.arange(num_moves + 1)
    # forward step t < moves is backward move moves - 1 - t; step `moves` is the exit
    index = jnp.where(steps < moves, moves - 1 - steps, num_moves)
    is_move = steps < moves
    states = jnp.where(jnp.reshape(steps <= moves, (-1,) + (1,) * terminal.ndim),
                       parents[index], terminal[None])
    states = jnp.concatenate([states, terminal[None]], axis=0)
    return Trajectories(
        states, jnp.where(is_move, actions[index], exit_action), steps <= moves,
        jnp.where(steps <= moves, log_pf[index], 0.0), jnp.where(is_move, log_pb[index], 0.0),
        terminal, env.log_reward(terminal))


def _forward_action(env, parent: jax.Array, child: jax.Array) -> jax.Array:
    """The valid non-exit forward action taking `parent` to `child` (0 if there is none)."""
    actions = jnp.arange(env.num_actions, dtype=jnp.int32)
    children = jax.vmap(lambda a: env.step(parent, a))(actions)
    same = jnp.all(jnp.reshape(children == child[None], (env.num_actions, -1)), axis=1)
    same = same & env.forward_mask(parent) & (actions != env.exit_action)
    return jnp.argmax(same).astype(jnp.int32)


def _uniforms(policy, num_samples, length=None, name="uniforms"):
    """The objectives' sample sites: uniforms driving the inverse-CDF action draws.

    Their distribution does not depend on the parameters, so their score term is zero and
    the estimator adds nothing: the gradient is that of the loss with the trajectories held
    fixed. (A reparameterised site would be refused, rightly in general, because the
    actions are discontinuous functions of the uniforms.)
    """
    length = policy.env.max_length if length is None else length
    return sample(dist.Uniform(0.0, 1.0).expand((num_samples, length)).to_event(2),
                  reinforce, name=name)


def _check_options(who, temperature, num_replay_samples):
    temperature_ok = isinstance(temperature, (int, float, np.floating, np.integer)) \
        and not isinstance(temperature, bool) and np.isfinite(temperature) and temperature > 0
    if not temperature_ok:
        raise ValueError(f"{who}: temperature must be a finite number > 0 (the reward is "
                         f"R(x)^(1/temperature)), got {temperature!r}.")
    if isinstance(num_replay_samples, bool) or not isinstance(
            num_replay_samples, (int, np.integer)) or num_replay_samples < 0:
        raise ValueError(f"{who}: num_replay_samples must be an int >= 0, got "
                         f"{num_replay_samples!r}.")
    return float(temperature), int(num_replay_samples)


#: Where the flow objectives read `log F(s0)`.
INITIAL_FLOWS = ("log_z", "head")


def _check_initial_flow(who, initial_flow):
    if not isinstance(initial_flow, str) or initial_flow not in INITIAL_FLOWS:
        raise ValueError(f"{who}: initial_flow must be one of 'log_z', 'head', got "
                         f"{initial_flow!r}.")
    return initial_flow


def _check_energy(env, who):
    """Refuse, by name, an environment without an intermediate energy `log_energy`."""
    try:
        jax.eval_shape(env.log_energy, env.initial_state())
    except NotImplementedError as error:
        raise ValueError(
            f"{who} is a forward-looking objective: it needs the environment's intermediate "
            f"energy E(s) = env.log_energy(state), which {type(env).__name__} does not "
            f"define. Override log_energy in the environment, or use the objective without "
            f"'forward_looking' (detailed_balance, subtrajectory_balance).") from error


def _draw(policy, params, num_samples, exploration, num_replay_samples, buffer, who):
    """The batch an objective is computed on, and a `(batch,)` float mask of valid rows.

    `num_samples` forward trajectories of the exploring policy, then (with a buffer)
    `num_replay_samples` trajectories sampled backward with `P_B` from terminal states
    drawn uniformly from the buffer; those rows are masked out while the buffer is empty.
    """
    batch = _batch(policy, params, _uniforms(policy, num_samples), exploration)
    valid = jnp.ones((num_samples,), batch.log_reward.dtype)
    if buffer is None:
        if num_replay_samples:
            raise ValueError(f"{who}: num_replay_samples={num_replay_samples} but no replay "
                             f"buffer was passed; call loss(key, params, buffer) or train "
                             f"with px.gfn.ReplayBackend.")
        return batch, valid
    from ._training import ReplayBuffer

    if not isinstance(buffer, ReplayBuffer):
        raise TypeError(f"{who}: the third argument is a px.gfn.ReplayBuffer, got "
                        f"{type(buffer).__name__}.")
    if num_replay_samples == 0:
        raise ValueError(f"{who}: a replay buffer was passed but num_replay_samples is 0; "
                         f"build the loss with num_replay_samples >= 1.")
    env = policy.env
    picks = _uniforms(policy, num_replay_samples, 1, name="replay_picks")[:, 0]
    moves = _uniforms(policy, num_replay_samples, max(env.max_length - 1, 1),
                      name="replay_moves")[:, : env.max_length - 1]
    index = jnp.minimum(jnp.floor(picks * buffer.size).astype(jnp.int32),
                        jnp.maximum(buffer.size - 1, 0))
    terminals = buffer.states[index]
    replayed = jax.vmap(lambda x, u: _backward_rollout(policy, params, x, u))(terminals, moves)
    batch = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), batch, replayed)
    valid = jnp.concatenate([valid, jnp.full((num_replay_samples,), buffer.size > 0,
                                             valid.dtype)])
    # rows of an empty buffer (s0 placeholders, maybe not terminal) carry no terms at all
    row = valid > 0
    batch = batch._replace(
        active=batch.active & row[:, None],
        log_pf=jnp.where(row[:, None], batch.log_pf, 0.0),
        log_pb=jnp.where(row[:, None], batch.log_pb, 0.0),
        log_reward=jnp.where(row, batch.log_reward, 0.0))
    return batch, valid


def _state_flows(policy, params, batch, log_reward, energy, initial_flow="log_z"):
    """`(batch, max_length + 1)` log flows along each trajectory, the sink included.

    Position 0 is `log F(s0) = params["log_z"]` (`initial_flow="log_z"`) or the learned
    head at `s0` (`initial_flow="head"`, torchgfn's parametrisation); positions
    `1 .. L - 1` (L: the steps taken, exit included) the learned `log F(s_t)` (minus `E(s_t)` when `energy` is given: the
    forward-looking parametrisation); positions `L ..` the sink after the exit, whose
    flow is the (tempered) reward, `log R(x)`.

    A state whose only valid forward action is the exit (a full set, a finished bit
    sequence, the far corner of a hypergrid) sends all its flow to the sink, so its flow
    is exactly `R(x)` at balance: it is pinned to `log R(x)` (forward-looking:
    `F̃(x) = 1`, with `E(x) = −log R(x)`) instead of learned, as in the FL paper's
    reparameterisation and its authors' DB code (`set/gflownet.py`, which replaces the
    last flow by the reward). The exit residual there is then `log P_F(exit | x) = 0`.
    """
    env = policy.env
    num, positions = batch.states.shape[:2]
    steps = jnp.arange(positions)
    length = jnp.sum(batch.active, axis=-1, keepdims=True)
    states = batch.states.reshape((num * positions, *batch.states.shape[2:]))
    exit_mask = (jnp.arange(env.num_actions) == env.exit_action)
    exit_only = jax.vmap(lambda s: jnp.all(env.forward_mask(s) == exit_mask))(states)
    # the learned flows are read at positions 1 .. L - 1 only, and not at exit-only states
    first = 0 if initial_flow == "head" else 1
    inner = ((steps >= first) & (steps < length)).reshape(-1) & ~exit_only
    learned = _on_rows(lambda s: policy.log_flow(params, s), states, inner, 0, 4)
    if energy is not None:
        learned = learned - jax.vmap(energy)(states)
    learned = learned.reshape(num, positions)
    flows = learned if initial_flow == "head" else jnp.where(steps == 0, params["log_z"],
                                                             learned)
    pinned = (steps >= length) | ((steps >= 1) & exit_only.reshape(num, positions))
    return jnp.where(pinned, log_reward[:, None], flows)


def _weighted_mean(values, weights):
    return jnp.sum(weights * values) / jnp.sum(weights)


def _common(policy, num_samples, exploration, temperature, num_replay_samples, who):
    _check_common(policy, num_samples, exploration, who)
    temperature, num_replay_samples = _check_options(who, temperature, num_replay_samples)
    return float(exploration), temperature, num_replay_samples


_OPTIONS_DOC = """
        num_samples: forward trajectories per estimate (the batch size).
        exploration: ε in [0, 1]: actions are drawn from `(1 − ε) P_F + ε U(valid)`.
        temperature: T > 0: the objective targets `R(x)^(1/T)` (log rewards divided by T).
        num_replay_samples: trajectories drawn backward, with `P_B`, from terminal states
            picked uniformly in a `ReplayBuffer` passed as `loss(key, params, buffer)`
            (`ReplayBackend` does this inside `px.fit`); 0 (default) for none."""

_SUBTB_DOC = """
        lamda: λ > 0, the geometric weight of a sub-trajectory of length k, `λ^k`
            (torchgfn's default 0.9; λ → 0 approaches detailed balance, large λ
            trajectory balance).
        weighting: `"geometric_within"` (Madan et al.: per trajectory,
            `Σ_{i<j} λ^{j−i} r_ij² / Σ_{i<j} λ^{j−i}`, then the batch mean) or
            `"geometric"` (torchgfn: the mean of `r²` over the batch's sub-trajectories of
            each length k, combined with weights `λ^(k−1)` normalised over the lengths
            present)."""


_FLOWS_DOC = """
        initial_flow: where `log F(s0)` comes from: `"log_z"` (default), the scalar
            `params["log_z"]` (its own learning rate, as for trajectory balance), or
            `"head"`, the state-flow head at `s0`, as torchgfn's `DBGFlowNet` and
            `SubTBGFlowNet` have it (then `params["log_z"]` is unused and the estimate of
            log Z is `policy.log_flow(params, env.initial_state())`, to pass to
            `evaluate(..., log_z=...)`)."""


def _documented(fn):
    """Fill the shared argument descriptions into a docstring's placeholders."""
    fn.__doc__ = (fn.__doc__.replace("{options}", _OPTIONS_DOC).replace("{subtb}", _SUBTB_DOC)
                  .replace("{flows}", _FLOWS_DOC))
    return fn



@_documented
def trajectory_balance(policy: AbstractPolicy, num_samples: int = 128,
                       exploration: float = 0.0, temperature: float = 1.0,
                       num_replay_samples: int = 0) -> Expectation:
    """The trajectory-balance loss as an expectation program `loss(key, params[, buffer])`.

    For trajectories `τ = (s0 → ... → x)` drawn from the (exploring) forward policy,

        L(θ) = mean over the batch of (log Z + Σ_t log P_F(s_{t+1}|s_t) − log R(x)
                                        − Σ_t log P_B(s_t|s_{t+1}))²,

    with the trajectories held fixed (not differentiated). On-policy (`exploration = 0`,
    no replay), its expected gradient in the forward policy is the score-function
    gradient of KL(P_F ‖ P_B R / Z) with log Z acting as a baseline (Malkin et al. 2022).
    Off-policy (exploration or replayed trajectories) it is still a valid balance loss,
    zero exactly at the balanced policy and log Z, but its gradient is no longer that of
    the KL: it is the gradient of the squared residual under the behaviour distribution.

    Args:
        policy: an `AbstractPolicy`; `params` must hold `"forward"` and `"log_z"` (and
            `"backward"` for a learned backward policy).{options}

    Returns:
        A `px.Expectation`; minimise it with
        `px.fit(loss, params, optax.adam(1e-3), num_steps, key, maximize=False)`.

    Example:
        >>> import jax, optax
        >>> import ppl_ext as px
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, trajectory_balance, evaluate
        >>> env = Hypergrid(dimension=2, side=4)
        >>> policy = MLPPolicy(env, hidden_sizes=(32,), learned_backward=False)
        >>> params = policy.init(jax.random.key(0))
        >>> loss = trajectory_balance(policy, num_samples=16)
        >>> result = px.fit(loss, params, optax.adam(0.01), 300, jax.random.key(1),
        ...                 maximize=False, progress=False)
        >>> bool(evaluate(policy, result.params).l1_distance
        ...      < evaluate(policy, params).l1_distance)
        True

    Reference: Malkin, Jain, Bengio, Sun, Bengio (2022), "Trajectory balance: improved
    credit assignment in GFlowNets".
    """
    who = "trajectory_balance"
    exploration, temperature, num_replay = _common(policy, num_samples, exploration,
                                                   temperature, num_replay_samples, who)

    def trajectory_balance_loss(params, buffer=None):
        batch, valid = _draw(policy, params, num_samples, exploration, num_replay, buffer, who)
        residual = (params["log_z"] + jnp.sum(batch.log_pf, -1) - batch.log_reward / temperature
                    - jnp.sum(batch.log_pb, -1))
        return _weighted_mean(residual**2, valid)

    return expectation(trajectory_balance_loss)


def _detailed(policy, who, num_samples, exploration, temperature, num_replay, energy,
              initial_flow):
    initial_flow = _check_initial_flow(who, initial_flow)

    def loss(params, buffer=None):
        batch, valid = _draw(policy, params, num_samples, exploration, num_replay, buffer, who)
        flows = _state_flows(policy, params, batch, batch.log_reward / temperature, energy,
                             initial_flow)
        residual = flows[:, :-1] + batch.log_pf - flows[:, 1:] - batch.log_pb
        weights = valid[:, None] * batch.active
        return _weighted_mean(jnp.where(batch.active, residual, 0.0)**2, weights)

    return loss


@_documented
def detailed_balance(policy: AbstractPolicy, num_samples: int = 128,
                     exploration: float = 0.0, temperature: float = 1.0,
                     num_replay_samples: int = 0, initial_flow: str = "log_z") -> Expectation:
    """The detailed-balance loss as an expectation program `loss(key, params[, buffer])`.

    For every transition `s → s'` of sampled trajectories,
    `(log F(s) + log P_F(s'|s) − log F(s') − log P_B(s|s'))²`, and for the exit from a
    terminal `x`, `(log F(x) + log P_F(exit|x) − log R(x))²` (torchgfn's convention,
    where every state may be terminal); averaged over all transitions of the batch. At a
    state whose only valid action is the exit, `log F(x)` is `log R(x)` itself (pinned, as
    in the FL paper authors' DB code), not the learned head.
    `log F(s0)` is `params["log_z"]`, other flows are the `params["log_flow"]` head
    (`policy.init(key, log_flow=True)`). Trajectories are held fixed, as in
    `trajectory_balance`; the loss is valid off-policy.

    Args:
        policy: an `AbstractPolicy` with a state-flow head.{options}{flows}

    Returns:
        A `px.Expectation` to minimise with `px.fit(..., maximize=False)`.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, detailed_balance
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0), log_flow=True)
        >>> loss = detailed_balance(policy, num_samples=4)
        >>> bool(loss(jax.random.key(1), params) >= 0)
        True

    Reference: Bengio, Lahlou, Deleu, Hu, Tiwari, Bengio (2023), "GFlowNet foundations".
    """
    who = "detailed_balance"
    exploration, temperature, num_replay = _common(policy, num_samples, exploration,
                                                   temperature, num_replay_samples, who)
    loss = _detailed(policy, who, num_samples, exploration, temperature, num_replay, None,
                     initial_flow)
    loss.__name__ = loss.__qualname__ = "detailed_balance_loss"
    return expectation(loss)


@_documented
def forward_looking_detailed_balance(policy: AbstractPolicy, num_samples: int = 128,
                                     exploration: float = 0.0, temperature: float = 1.0,
                                     num_replay_samples: int = 0,
                                     initial_flow: str = "log_z") -> Expectation:
    """Forward-looking detailed balance (FL-DB), `loss(key, params[, buffer])`.

    The state flow is written `log F(s) = log F̃(s) − E(s)/T` with the environment's
    intermediate energy `E(s) = env.log_energy(s)` (`E(x) = −log R(x)` at terminal
    states) and only `log F̃` learned (the `params["log_flow"]` head). Detailed balance
    then reads, for a move `s → s'`,

        (log F̃(s) + log P_F(s'|s) − log F̃(s') − log P_B(s|s') + (E(s') − E(s))/T)²,

    so each transition receives the energy difference as local credit; the exit from `x`
    is `(log F̃(x) + log P_F(exit|x))²` (the sink's flow is `R(x)`, i.e. `F̃(sink) = 1`),
    and `log F(s0) = params["log_z"]` as in `detailed_balance`. Where the exit is the only
    valid action (a full set), `F̃(x) = 1` is pinned rather than learned: the terminal
    flow is the reward, as the FL reparameterisation requires. (The authors' set code
    leaves the network's `F̃(x)` free there, which lets the terminal law drift from
    `R`: with `F̃(x)` free, any `F̃(x) R(x)` balances.) Off-policy valid.

    Args:
        policy: an `AbstractPolicy` with a state-flow head, on an environment that
            defines `log_energy`.{options}{flows}

    Returns:
        A `px.Expectation` to minimise.

    Raises:
        ValueError: the environment defines no `log_energy`.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, forward_looking_detailed_balance
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0), log_flow=True)
        >>> loss = forward_looking_detailed_balance(policy, num_samples=4)
        >>> bool(loss(jax.random.key(1), params) >= 0)
        True

    Reference: Pan, Malkin, Zhang, Bengio (2023), "Better training of GFlowNets with local
    credit and incomplete trajectories" (ICML), eq. for FL-DB; code: ling-pan/FL-GFN.
    """
    who = "forward_looking_detailed_balance"
    exploration, temperature, num_replay = _common(policy, num_samples, exploration,
                                                   temperature, num_replay_samples, who)
    _check_energy(policy.env, who)
    env = policy.env

    def energy(state):
        return env.log_energy(state) / temperature

    loss = _detailed(policy, who, num_samples, exploration, temperature, num_replay, energy,
                     initial_flow)
    loss.__name__ = loss.__qualname__ = "forward_looking_detailed_balance_loss"
    return expectation(loss)


_WEIGHTINGS = ("geometric_within", "geometric")


def _check_subtb(who, lamda, weighting):
    if isinstance(lamda, bool) or not isinstance(lamda, (int, float, np.floating, np.integer)) \
            or not np.isfinite(lamda) or lamda <= 0:
        raise ValueError(f"{who}: lamda (λ) must be a finite number > 0, got {lamda!r}.")
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"{who}: unknown weighting {weighting!r}; choose one of "
                         f"{', '.join(map(repr, _WEIGHTINGS))}.")
    return float(lamda)


def _subtrajectory(policy, who, num_samples, exploration, temperature, num_replay, lamda,
                   weighting, energy, initial_flow):
    initial_flow = _check_initial_flow(who, initial_flow)
    log_lamda = float(np.log(lamda))

    def loss(params, buffer=None):
        batch, valid = _draw(policy, params, num_samples, exploration, num_replay, buffer, who)
        flows = _state_flows(policy, params, batch, batch.log_reward / temperature, energy,
                             initial_flow)
        increments = batch.log_pf - batch.log_pb
        cumulative = jnp.concatenate([jnp.zeros_like(increments[:, :1]),
                                      jnp.cumsum(increments, axis=-1)], axis=-1)
        anchored = flows - cumulative  # residual(i, j) = anchored_i − anchored_j
        residual = anchored[:, :, None] - anchored[:, None, :]
        positions = jnp.arange(flows.shape[1])
        span = positions[None, :] - positions[:, None]  # j − i
        length = jnp.sum(batch.active, axis=-1)
        pairs = (span[None] > 0) & (positions[None, None, :] <= length[:, None, None])
        pairs = pairs & (valid[:, None, None] > 0)
        squares = jnp.where(pairs, residual, 0.0) ** 2
        if weighting == "geometric_within":
            # Σ_{i<j} λ^{j−i} r_ij² / Σ_{i<j} λ^{j−i} per trajectory, then the batch mean;
            # the weights (parameter-free) are scaled by their largest, so no overflow
            log_weights = span[None] * log_lamda
            top = jnp.max(jnp.where(pairs, log_weights, -1e30), axis=(1, 2), keepdims=True)
            weights = jnp.where(pairs, jnp.exp(jnp.where(pairs, log_weights - top, 0.0)), 0.0)
            total = jnp.sum(weights, (1, 2))
            per = jnp.sum(weights * squares, (1, 2)) / jnp.where(total > 0, total, 1.0)
            return _weighted_mean(per, valid)
        # "geometric": mean of r² over all sub-trajectories of each length k in the batch,
        # combined with weights λ^(k−1) normalised over the lengths present (torchgfn)
        lengths = jnp.arange(1, flows.shape[1])
        of_length = pairs[None] & (span[None, None] == lengths[:, None, None, None])
        counts = jnp.sum(of_length, axis=(1, 2, 3))
        means = jnp.sum(jnp.where(of_length, squares[None], 0.0), axis=(1, 2, 3)) \
            / jnp.maximum(counts, 1)
        log_w = jnp.where(counts > 0, (lengths - 1) * log_lamda, -jnp.inf)
        return jnp.sum(jax.nn.softmax(log_w) * means)

    return loss





@_documented
def subtrajectory_balance(policy: AbstractPolicy, num_samples: int = 128,
                          lamda: float = 0.9, weighting: str = "geometric_within",
                          exploration: float = 0.0, temperature: float = 1.0,
                          num_replay_samples: int = 0, initial_flow: str = "log_z"
                          ) -> Expectation:
    """Sub-trajectory balance (SubTB(λ)), `loss(key, params[, buffer])`.

    With the flows along a trajectory `F_0 = Z, F_1, ..., F_{L−1}` (the learned
    `params["log_flow"]`) and `F_L = R(x)` (the sink after the exit), every
    sub-trajectory `i < j ≤ L` has the residual

        r_ij = log F_i + Σ_{t=i}^{j−1} (log P_F(s_{t+1}|s_t) − log P_B(s_t|s_{t+1})) − log F_j,

    (`r_{i,i+1}` is detailed balance, `r_{0,L}` trajectory balance), combined with geometric
    weights in λ. Trajectories are held fixed; off-policy valid.

    Args:
        policy: an `AbstractPolicy` with a state-flow head.{options}{subtb}{flows}

    Returns:
        A `px.Expectation` to minimise.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, subtrajectory_balance
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0), log_flow=True)
        >>> loss = subtrajectory_balance(policy, num_samples=4, lamda=0.9)
        >>> bool(loss(jax.random.key(1), params) >= 0)
        True

    Reference: Madan, Rector-Brooks, Korablyov, Bengio, Jain, Nica, Bosc, Bengio, Malkin
    (2023), "Learning GFlowNets from partial episodes for improved convergence and
    stability" (ICML); torchgfn's `SubTBGFlowNet`.
    """
    who = "subtrajectory_balance"
    exploration, temperature, num_replay = _common(policy, num_samples, exploration,
                                                   temperature, num_replay_samples, who)
    lamda = _check_subtb(who, lamda, weighting)
    loss = _subtrajectory(policy, who, num_samples, exploration, temperature, num_replay,
                          lamda, weighting, None, initial_flow)
    loss.__name__ = loss.__qualname__ = "subtrajectory_balance_loss"
    return expectation(loss)


@_documented
def forward_looking_subtrajectory_balance(
        policy: AbstractPolicy, num_samples: int = 128, lamda: float = 0.9,
        weighting: str = "geometric_within", exploration: float = 0.0,
        temperature: float = 1.0, num_replay_samples: int = 0,
        initial_flow: str = "log_z") -> Expectation:
    """Forward-looking sub-trajectory balance (FL-SubTB), `loss(key, params[, buffer])`.

    `subtrajectory_balance` with the forward-looking flow `log F(s) = log F̃(s) − E(s)/T`
    (see `forward_looking_detailed_balance`): `r_ij` gains the energy difference
    `(E(s_j) − E(s_i))/T`, with `F_0 = Z` and `F_L = R(x)` pinned. Off-policy valid.

    Args:
        policy: an `AbstractPolicy` with a state-flow head, on an environment that
            defines `log_energy`.{options}{subtb}{flows}

    Returns:
        A `px.Expectation` to minimise.

    Raises:
        ValueError: the environment defines no `log_energy`, λ ≤ 0 or an unknown weighting.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy
        >>> from ppl_ext.gfn import forward_looking_subtrajectory_balance as fl_subtb
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0), log_flow=True)
        >>> bool(fl_subtb(policy, num_samples=4)(jax.random.key(1), params) >= 0)
        True

    Reference: Pan, Malkin, Zhang, Bengio (2023), "Better training of GFlowNets with local
    credit and incomplete trajectories" (ICML).
    """
    who = "forward_looking_subtrajectory_balance"
    exploration, temperature, num_replay = _common(policy, num_samples, exploration,
                                                   temperature, num_replay_samples, who)
    lamda = _check_subtb(who, lamda, weighting)
    _check_energy(policy.env, who)
    env = policy.env

    def energy(state):
        return env.log_energy(state) / temperature

    loss = _subtrajectory(policy, who, num_samples, exploration, temperature, num_replay,
                          lamda, weighting, energy, initial_flow)
    loss.__name__ = loss.__qualname__ = "forward_looking_subtrajectory_balance_loss"
    return expectation(loss)


def _masked_logsumexp(values, mask):
    """logsumexp over `mask`; a finite stand-in where nothing is valid (then masked)."""
    return jax.nn.logsumexp(jnp.where(mask, values, -1e30), axis=-1)


@_documented
def flow_matching(policy: AbstractPolicy, num_samples: int = 128, exploration: float = 0.0,
                  temperature: float = 1.0, num_replay_samples: int = 0) -> Expectation:
    """The flow-matching loss (Bengio et al. 2021), `loss(key, params[, buffer])`.

    Edge flows are the policy's forward logits, `log F(s → a) = forward_logits(s)[a]`
    (so `P_F = softmax` of them is the flow's own forward policy). At every visited state
    `s ≠ s0`, inflow must equal outflow (the exit edge included),

        (log Σ_{(p, a) → s} F(p → a) − log Σ_{a valid at s} F(s → a))²,

    averaged over the visited states, plus the reward-matching term
    `(log F(x → exit) − log R(x))²` averaged over the terminal states (torchgfn's
    `FMGFlowNet` with α = 1). Parents are found with `backward_mask` / `backward_step`.
    Trajectories are held fixed; the loss is valid off-policy. `params["log_z"]` is not
    used (the learned `Z` is the outflow of `s0`).

    Args:
        policy: an `AbstractPolicy` implementing `forward_logits`.{options}

    Returns:
        A `px.Expectation` to minimise.

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, TabularPolicy, flow_matching
        >>> policy = TabularPolicy(Hypergrid(dimension=2, side=4))
        >>> params = policy.init(jax.random.key(0))
        >>> bool(flow_matching(policy, num_samples=4)(jax.random.key(1), params) >= 0)
        True

    Reference: Bengio, Jain, Korablyov, Precup, Bengio (2021), "Flow network based
    generative models for non-iterative diverse candidate generation"; Bengio et al.
    (2023), "GFlowNet foundations".
    """
    who = "flow_matching"
    exploration, temperature, num_replay = _common(policy, num_samples, exploration,
                                                   temperature, num_replay_samples, who)
    env = policy.env
    backward_actions = jnp.arange(env.num_backward_actions, dtype=jnp.int32)

    def inflow(params, state):
        def edge(b):
            parent = env.backward_step(state, b)
            return policy.forward_logits(params, parent)[_forward_action(env, parent, state)]

        return _masked_logsumexp(jax.vmap(edge)(backward_actions), env.backward_mask(state))

    def outflow(params, state):
        return _masked_logsumexp(policy.forward_logits(params, state), env.forward_mask(state))

    def flow_matching_loss(params, buffer=None):
        batch, valid = _draw(policy, params, num_samples, exploration, num_replay, buffer, who)
        states = batch.states[:, 1:-1]  # s_1 .. s_{T-1}: s_t is visited where t < L
        incoming = jax.vmap(jax.vmap(lambda s: inflow(params, s)))(states)
        outgoing = jax.vmap(jax.vmap(lambda s: outflow(params, s)))(states)
        visited = batch.active[:, 1:]
        residual = jnp.where(visited, incoming - outgoing, 0.0)
        weights = valid[:, None] * visited
        matching = jnp.sum(weights * residual**2) / jnp.maximum(jnp.sum(weights), 1.0)
        exit_flow = jax.vmap(lambda x: policy.forward_logits(params, x)[env.exit_action])(
            batch.terminal_state)
        reward = _weighted_mean((exit_flow - batch.log_reward / temperature) ** 2, valid)
        return matching + reward

    return expectation(flow_matching_loss)


@_documented
def log_partition_variance(policy: AbstractPolicy, num_samples: int = 128,
                           exploration: float = 0.0, temperature: float = 1.0,
                           num_replay_samples: int = 0) -> Expectation:
    """The log-partition variance loss (VarGrad), `loss(key, params[, buffer])`.

    Each trajectory gives a log-Z estimate `ζ(τ) = log R(x) + Σ_t log P_B − Σ_t log P_F`;
    the loss is their unbiased sample variance over the batch (divisor `batch − 1`),

        L(θ) = Σ_i (ζ_i − ζ̄)² / (B − 1),

    whose expectation is `Var[ζ]` under the sampling distribution. It is trajectory
    balance with log Z replaced by the batch mean, so no log Z is learned; it is zero iff
    `P_F(τ) ∝ R(x) P_B(τ | x)` on the sampled support. Trajectories are held fixed; valid
    off-policy. The mean `ζ̄` estimates `log Z` (biased low on-policy, by Jensen).

    Args:
        policy: an `AbstractPolicy`; `params` needs `"forward"` (and `"backward"` if
            learned); `"log_z"` is unused.{options}

    Returns:
        A `px.Expectation` to minimise.

    Raises:
        ValueError: `num_samples < 2` (a variance needs two trajectories).

    Example:
        >>> import jax
        >>> from ppl_ext.gfn import Hypergrid, MLPPolicy, log_partition_variance
        >>> policy = MLPPolicy(Hypergrid(dimension=2, side=4), hidden_sizes=(8,))
        >>> params = policy.init(jax.random.key(0))
        >>> bool(log_partition_variance(policy, num_samples=4)(jax.random.key(1), params) > 0)
        True

    Reference: Zhang, Rector-Brooks, Bengio, Malkin et al. (2023), "Robust scheduling with
    GFlowNets" (ICLR); Richter et al. (2020), "VarGrad".
    """
    who = "log_partition_variance"
    exploration, temperature, num_replay = _common(policy, num_samples, exploration,
                                                   temperature, num_replay_samples, who)
    if num_samples < 2:
        raise ValueError(f"{who}: num_samples must be >= 2 (a variance over the batch), got "
                         f"{num_samples!r}.")

    def log_partition_variance_loss(params, buffer=None):
        batch, valid = _draw(policy, params, num_samples, exploration, num_replay, buffer, who)
        estimates = (batch.log_reward / temperature + jnp.sum(batch.log_pb, -1)
                     - jnp.sum(batch.log_pf, -1))
        mean = _weighted_mean(estimates, valid)
        deviations = jnp.where(valid > 0, estimates - mean, 0.0)
        return jnp.sum(valid * deviations**2) / (jnp.sum(valid) - 1.0)

    return expectation(log_partition_variance_loss)
