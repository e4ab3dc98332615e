"""Flow matching, sub-trajectory balance (λ, two weightings), forward-looking DB / SubTB,
log-partition variance, temperature, exploration and replay: exact checks on small grids.

The balanced flows are built here by hand, without ppl_ext's evaluation code: with the
uniform backward policy `P_B(s | s') = 1 / #parents(s')`, the state flow solves
`F(s) = R(s) + Σ_{s → s'} F(s') P_B(s | s')` (backwards over the DAG), the edge flows are
`F(s → s') = F(s') P_B(s | s')` and `F(s → exit) = R(s)`, and the forward policy is
`P_F(s' | s) = F(s → s') / F(s)`; then `P_T(x) = R(x) / F(s0)`. Trajectory-level values
are sums over all trajectories, enumerated depth first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppl_ext as px
from ppl_ext import gfn
from tests.helpers import assert_unbiased, many

K_SE = 4


def balanced_flows(env, temperature=1.0):
    """(log edge flows `(S, A)` with -inf at invalid actions, log F `(S,)`), float64."""
    states = env.all_states()
    actions = jnp.arange(env.num_actions, dtype=jnp.int32)
    exit_action = env.exit_action
    forward_mask = np.asarray(jax.vmap(env.forward_mask)(states))
    num_parents = np.asarray(jax.vmap(env.backward_mask)(states)).sum(1)
    stepped = jax.vmap(lambda s: jax.vmap(lambda a: env.step(s, a))(actions))(states)
    children = np.asarray(jax.vmap(jax.vmap(env.state_index))(stepped))
    children = np.where(forward_mask & (np.arange(env.num_actions) != exit_action), children, -1)
    log_reward = np.asarray(jax.vmap(env.log_reward)(states), np.float64) / temperature
    reward = np.where(forward_mask[:, exit_action], np.exp(log_reward), 0.0)
    flow = reward.copy()
    for _ in range(env.max_length + 1):  # more sweeps than the longest path: exact
        inflow = np.where(children >= 0, flow[children] / np.maximum(num_parents[children], 1),
                          0.0)
        flow = reward + inflow.sum(1)
    edges = np.where(children >= 0, flow[children] / np.maximum(num_parents[children], 1), 0.0)
    edges[:, exit_action] = reward
    with np.errstate(divide="ignore"):
        return np.log(edges), np.log(flow)


def balanced_params(env, temperature=1.0, forward_looking=False):
    """TabularPolicy params at the balanced flows (uniform P_B)."""
    log_edges, log_flow = balanced_flows(env, temperature)
    s0 = int(env.state_index(env.initial_state()))
    log_z = log_flow[s0]
    if forward_looking:  # learned log F̃(s) = log F(s) + E(s) / T
        energy = np.asarray(jax.vmap(env.log_energy)(env.all_states()), np.float64)
        log_flow = log_flow + energy / temperature
    return {"forward": jnp.asarray(np.where(np.isfinite(log_edges), log_edges, 0.0),
                                   jnp.float32),
            "log_flow": jnp.asarray(log_flow, jnp.float32),
            "log_z": jnp.asarray(log_z, jnp.float32)}


OBJECTIVES = {
    "trajectory_balance": (gfn.trajectory_balance, {}),
    "detailed_balance": (gfn.detailed_balance, {}),
    "subtrajectory_balance": (gfn.subtrajectory_balance, {"lamda": 0.9}),
    "subtrajectory_balance(geometric)": (
        gfn.subtrajectory_balance, {"lamda": 0.9, "weighting": "geometric"}),
    "forward_looking_detailed_balance": (gfn.forward_looking_detailed_balance, {}),
    "forward_looking_subtrajectory_balance": (
        gfn.forward_looking_subtrajectory_balance, {"lamda": 0.5}),
    "flow_matching": (gfn.flow_matching, {}),
    "log_partition_variance": (gfn.log_partition_variance, {}),
}
FORWARD_LOOKING = ("forward_looking_detailed_balance", "forward_looking_subtrajectory_balance")
NAMES = pytest.mark.parametrize("name", list(OBJECTIVES))


def build(name, policy, num_samples, **options):
    make, extra = OBJECTIVES[name]
    return make(policy, num_samples, **extra, **options)


def test_balanced_flows_give_the_target():
    # the construction itself: P_T(x) = R(x) / Z, by multiplying P_F along all paths
    env = gfn.Hypergrid(2, 3)
    log_edges, log_flow = balanced_flows(env)
    total = {}
    for path, log_pf, x in enumerate_trajectories(env, log_edges - log_flow[:, None]):
        total[x] = total.get(x, 0.0) + np.exp(log_pf)
    rewards = np.exp(np.asarray(jax.vmap(env.log_reward)(env.all_states()), np.float64))
    np.testing.assert_allclose([total[i] for i in range(9)], rewards / rewards.sum(),
                               rtol=1e-10)


@NAMES
def test_zero_at_balanced_flows_and_positive_when_perturbed(name):
    # off-policy batches (ε = 0.5 exploration) at T = 1.5: every residual vanishes at the
    # balanced flows, whoever samples the trajectories
    env = gfn.Hypergrid(2, 4)
    policy = gfn.TabularPolicy(env)
    forward_looking = name in FORWARD_LOOKING
    params = balanced_params(env, 1.5, forward_looking)
    loss = build(name, policy, 32, temperature=1.5, exploration=0.5)
    keys = jax.random.split(jax.random.key(0), 3)
    # (values only: a sum of squares that vanishes has a vanishing gradient, which the
    # conformance tests, tests/conformance/test_gfn_objectives.py, also check)
    evaluate = jax.jit(jax.vmap(loss, in_axes=(0, None)))
    values = evaluate(keys, params)
    assert float(jnp.max(values)) < 1e-8, (name, values)
    # the flows balanced for T = 1 are not balanced for T = 1.5
    assert float(jnp.min(evaluate(keys, balanced_params(env, 1.0, forward_looking)))) > 1e-3
    noise = 0.3 * jax.random.normal(jax.random.key(2), params["forward"].shape)
    perturbed = dict(params, forward=params["forward"] + noise)
    assert float(jnp.min(evaluate(keys, perturbed))) > 1e-3
    if name not in ("trajectory_balance", "flow_matching", "log_partition_variance"):
        shifted = dict(params, log_flow=params["log_flow"].at[5].add(0.5))
        assert float(jnp.min(evaluate(keys, shifted))) > 1e-4


def test_zero_at_balanced_flows_with_replayed_trajectories():
    # replayed rows (backward from stored terminals) are balanced too; perturbed: positive
    env = gfn.Hypergrid(2, 4)
    policy = gfn.TabularPolicy(env)
    params = balanced_params(env)
    buffer = gfn.ReplayBuffer.empty(env, 8).add(jnp.array([[3, 3], [1, 2], [2, 0]]))
    loss = gfn.detailed_balance(policy, 4, num_replay_samples=16)
    evaluate = jax.jit(lambda p: loss(jax.random.key(0), p, buffer))
    assert float(evaluate(params)) < 1e-8
    # a flow error at (2, 0) (index 8), a state only replayed trajectories visit for sure
    assert float(evaluate(dict(params, log_flow=params["log_flow"].at[8].add(0.5)))) > 1e-3


def test_subtrajectory_balance_limits_and_weightings():
    # λ → 0 weighs only length-1 sub-trajectories (detailed balance's residuals, averaged per
    # trajectory); λ → ∞ only the longest, the whole trajectory (trajectory balance)
    env = gfn.Hypergrid(2, 3)
    policy = gfn.TabularPolicy(env)
    params = policy.init(jax.random.key(0), log_flow=True)
    params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(jax.random.key(3), p.shape),
                          params)
    key = jax.random.key(4)
    tb = gfn.trajectory_balance(policy, 1)(key, params)
    large = gfn.subtrajectory_balance(policy, 1, lamda=1e6)(key, params)
    np.testing.assert_allclose(float(large), float(tb), rtol=1e-4)
    db = gfn.detailed_balance(policy, 1)(key, params)  # one trajectory: the same average
    small = gfn.subtrajectory_balance(policy, 1, lamda=1e-6)(key, params)
    np.testing.assert_allclose(float(small), float(db), rtol=1e-4)


def test_subtrajectory_weightings_by_hand():
    # a deterministic policy: s0 -> (1, 0) -> (1, 1) -> exit, every trajectory of the batch;
    # P_F = 1 on the path, uniform P_B: log P_B = 0, -log 2, (exit) 0
    env = gfn.Hypergrid(2, 3)
    policy = gfn.TabularPolicy(env)
    forward = np.full((9, 3), -60.0)
    forward[0, 0] = forward[3, 1] = forward[4, 2] = 0.0  # rows: (0,0), (1,0), (1,1)
    log_flow = np.asarray(jax.random.normal(jax.random.key(7), (9,)), np.float64)
    params = {"forward": jnp.asarray(forward, jnp.float32),
              "log_flow": jnp.asarray(log_flow, jnp.float32), "log_z": jnp.asarray(0.3)}
    log_r = float(env.log_reward(jnp.array([1, 1])))
    flows = np.array([0.3, log_flow[3], log_flow[4], log_r])
    anchored = flows - np.array([0.0, 0.0, np.log(2.0), np.log(2.0)])  # minus Σ(log P_F - log P_B)
    lamda = 0.7
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    squares = {p: (anchored[p[0]] - anchored[p[1]]) ** 2 for p in pairs}
    within = sum(lamda ** (j - i) * squares[i, j] for i, j in pairs) / sum(
        lamda ** (j - i) for i, j in pairs)
    per_length = [np.mean([squares[i, j] for i, j in pairs if j - i == k]) for k in (1, 2, 3)]
    geometric = sum(lamda ** (k - 1) * m for k, m in zip((1, 2, 3), per_length)) / sum(
        lamda ** (k - 1) for k in (1, 2, 3))
    assert abs(within - geometric) > 1e-3  # the two weightings differ here
    key = jax.random.key(8)
    value = gfn.subtrajectory_balance(policy, 4, lamda=lamda)(key, params)
    np.testing.assert_allclose(float(value), within, rtol=1e-5)
    value = gfn.subtrajectory_balance(policy, 4, lamda=lamda, weighting="geometric")(key, params)
    np.testing.assert_allclose(float(value), geometric, rtol=1e-5)
    # forward-looking: the same with log F(s) = log F̃(s) - E(s), E = -log R, F_0, F_L pinned
    energy = -np.asarray(jax.vmap(env.log_reward)(env.all_states()), np.float64)
    fl_flows = np.array([0.3, log_flow[3] - energy[3], log_flow[4] - energy[4], log_r])
    fl_anchored = fl_flows - np.array([0.0, 0.0, np.log(2.0), np.log(2.0)])
    fl_squares = {p: (fl_anchored[p[0]] - fl_anchored[p[1]]) ** 2 for p in pairs}
    fl_within = sum(lamda ** (j - i) * fl_squares[i, j] for i, j in pairs) / sum(
        lamda ** (j - i) for i, j in pairs)
    value = gfn.forward_looking_subtrajectory_balance(policy, 4, lamda=lamda)(key, params)
    np.testing.assert_allclose(float(value), fl_within, rtol=1e-5)
    fl_db = np.mean([fl_squares[i, i + 1] for i in range(3)])
    value = gfn.forward_looking_detailed_balance(policy, 4)(key, params)
    np.testing.assert_allclose(float(value), fl_db, rtol=1e-5)


def enumerate_trajectories(env, log_pf_table):
    """Every trajectory of `env` as (actions, log P_F(τ), terminal index), depth first."""
    out = []

    def visit(state, actions, log_pf):
        i = int(env.state_index(state))
        mask = np.asarray(env.forward_mask(state))
        for a in np.flatnonzero(mask):
            lp = log_pf + log_pf_table[i, a]
            if a == env.exit_action:
                out.append((tuple(actions) + (int(a),), lp, i))
            else:
                visit(env.step(state, jnp.int32(a)), actions + [int(a)], lp)

    visit(env.initial_state(), [], 0.0)
    return out


def trajectory_terms(env, actions):
    """(log P_B(τ | x) under the uniform P_B, the visited states' indices)."""
    state, log_pb, visited = env.initial_state(), 0.0, [int(env.state_index(env.initial_state()))]
    for a in actions[:-1]:
        state = env.step(state, jnp.int32(a))
        log_pb -= np.log(np.asarray(env.backward_mask(state)).sum())
        visited.append(int(env.state_index(state)))
    return log_pb, visited


def test_on_policy_tb_gradient_is_twice_the_exact_kl_gradient():
    # E[∇ TB] = 2 ∇ KL(P_F(τ) ‖ P_B(τ | x) R(x) / Z) in the forward table (log Z a baseline),
    # and E[∂TB / ∂log Z] = 2 (log Z + E[log P_F − log P_B − log R]); all trajectories of the
    # 3 x 3 grid enumerated, 10^4 single-trajectory estimates, K_SE = 4
    env = gfn.Hypergrid(2, 3)
    policy = gfn.TabularPolicy(env)
    logits = 0.7 * jax.random.normal(jax.random.key(5), (9, 3))
    params = {"forward": logits, "log_z": jnp.asarray(0.4)}
    masks = jax.vmap(env.forward_mask)(env.all_states())
    trajectories = enumerate_trajectories(env, np.zeros((9, 3)))
    rewards = np.asarray(jax.vmap(env.log_reward)(env.all_states()), np.float64)
    log_z_true = np.log(np.exp(rewards).sum())
    steps = []
    for actions, _, x in trajectories:
        log_pb, visited = trajectory_terms(env, actions)
        steps.append((visited, actions, log_pb, rewards[x]))

    def kl(forward):
        log_pf_table = jnp.where(masks, jax.nn.log_softmax(jnp.where(masks, forward, -1e30)),
                                 0.0)
        total = 0.0
        for visited, actions, log_pb, log_r in steps:
            log_pf = sum(log_pf_table[s, a] for s, a in zip(visited, actions))
            total = total + jnp.exp(log_pf) * (log_pf - log_pb - log_r + log_z_true)
        return total

    def expected_residual(forward):
        log_pf_table = jnp.where(masks, jax.nn.log_softmax(jnp.where(masks, forward, -1e30)),
                                 0.0)
        total = 0.0
        for visited, actions, log_pb, log_r in steps:
            log_pf = sum(log_pf_table[s, a] for s, a in zip(visited, actions))
            total = total + jnp.exp(log_pf) * (log_pf - log_pb - log_r)
        return total

    assert float(kl(logits)) > 0.05  # a policy far from balance: the gradient is not zero
    exact_forward = 2 * jax.grad(kl)(logits)
    exact_log_z = 2 * (params["log_z"] + expected_residual(logits))
    loss = gfn.trajectory_balance(policy, num_samples=1)
    grads = many(lambda k: loss.grad(k, params))
    assert_unbiased(grads["forward"], exact_forward, k=K_SE, what="∇ forward vs 2 ∇KL")
    assert_unbiased(grads["log_z"], exact_log_z, k=K_SE, what="∂/∂log Z")
    assert float(jnp.max(jnp.abs(exact_forward))) > 0.05


def test_replayed_trajectories_follow_the_backward_policy():
    # one forward and one replayed trajectory (from the buffer's only state x): the TB value
    # averages to (E_{P_F} r² + E_{P_B(·|x)} r²) / 2, both sums over enumerated trajectories
    env = gfn.Hypergrid(2, 3)
    policy = gfn.TabularPolicy(env)
    logits = 0.7 * jax.random.normal(jax.random.key(6), (9, 3))
    params = {"forward": logits, "log_z": jnp.asarray(0.4)}
    masks = np.asarray(jax.vmap(env.forward_mask)(env.all_states()))
    log_pf_table = np.asarray(jnp.where(masks, jax.nn.log_softmax(
        jnp.where(masks, logits, -1e30)), 0.0), np.float64)
    rewards = np.asarray(jax.vmap(env.log_reward)(env.all_states()), np.float64)
    x = np.array([1, 2])
    x_index = int(env.state_index(jnp.asarray(x)))
    forward_part = backward_part = 0.0
    for actions, log_pf, i in enumerate_trajectories(env, log_pf_table):
        log_pb, _ = trajectory_terms(env, actions)
        square = (0.4 + log_pf - rewards[i] - log_pb) ** 2
        forward_part += np.exp(log_pf) * square
        if i == x_index:
            backward_part += np.exp(log_pb) * square
    buffer = gfn.ReplayBuffer.empty(env, 4).add(jnp.asarray(x)[None])
    loss = gfn.trajectory_balance(policy, num_samples=1, num_replay_samples=1)
    values = many(lambda k: loss(k, params, buffer))
    assert_unbiased(values, (forward_part + backward_part) / 2, k=K_SE, what="TB with replay")
    # an empty buffer contributes nothing: the value is the forward row's alone
    empty = gfn.ReplayBuffer.empty(env, 4)
    values = many(lambda k: loss(k, params, empty), seed=1)
    assert_unbiased(values, forward_part, k=K_SE, what="TB with an empty buffer")


def test_replay_buffer_is_first_in_first_out():
    env = gfn.Hypergrid(2, 4)
    buffer = gfn.ReplayBuffer.empty(env, 3)
    assert int(buffer.size) == 0
    buffer = buffer.add(jnp.array([[1, 1], [2, 2]]))
    assert int(buffer.size) == 2 and int(buffer.position) == 2
    buffer = buffer.add(jnp.array([[3, 3], [0, 1]]))
    assert int(buffer.size) == 3 and int(buffer.position) == 1
    assert buffer.states.tolist() == [[0, 1], [2, 2], [3, 3]]
    with pytest.raises(ValueError, match="capacity 3"):
        buffer.add(jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(ValueError, match="shape"):
        buffer.add(jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="capacity must be"):
        gfn.ReplayBuffer.empty(env, 0)


def tabular(name, env):
    policy = gfn.TabularPolicy(env)
    params = policy.init(jax.random.key(0), log_flow=True)
    if name in ("trajectory_balance", "log_partition_variance", "flow_matching"):
        del params["log_flow"]
    if name in ("log_partition_variance", "flow_matching"):
        del params["log_z"]  # not used: fit would warn
    return policy, params


def exact_l1(policy, params, target):
    params = dict(params)
    params.setdefault("log_z", jnp.zeros(()))
    return float(jnp.sum(jnp.abs(gfn.terminal_distribution(policy, params) - target)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in OBJECTIVES if n not in (
    "trajectory_balance", "detailed_balance")])  # those two: tests/gfn/test_objectives.py
def test_training_reaches_small_exact_l1(name):
    # measured (Hypergrid(2, 4), tabular, 300 Adam steps of 16 trajectories, lr 0.1): exact
    # L1 between 3e-6 (flow matching) and 6.4e-4 (log-partition variance), from 0.83 at the
    # uniform policy
    env = gfn.Hypergrid(2, 4)
    policy, params = tabular(name, env)
    target = gfn.reward_distribution(env)
    assert exact_l1(policy, params, target) > 0.5
    result = px.fit(build(name, policy, 16), params, optax.adam(0.1), 300, jax.random.key(1),
                    maximize=False, progress=False)
    assert exact_l1(policy, result.params, target) < 0.02


@pytest.mark.slow
def test_off_policy_training_with_replay_exploration_and_temperature():
    # FL-SubTB with ε = 0.3 exploration, a replay buffer and T = 2: the target is R^(1/2)/Z
    env = gfn.Hypergrid(2, 4)
    policy, params = tabular("forward_looking_subtrajectory_balance", env)
    log_r = jax.vmap(env.log_reward)(env.all_states()) / 2.0
    target = jax.nn.softmax(log_r)
    loss = gfn.forward_looking_subtrajectory_balance(
        policy, 16, exploration=0.3, temperature=2.0, num_replay_samples=8)
    backend = gfn.ReplayBackend(optax.adam(0.1), policy, num_samples=8, exploration=0.3)
    result = px.fit(loss, params, backend, 300, jax.random.key(1),
                    gfn.ReplayBuffer.empty(env, 64), maximize=False, progress=False)
    assert int(result.state.buffer.size) == 64
    assert exact_l1(policy, result.params, target) < 0.02
    # and not the untempered target
    assert exact_l1(policy, result.params, gfn.reward_distribution(env)) > 0.1


class NoEnergy(gfn.Hypergrid):
    def log_energy(self, state):
        return gfn.AbstractEnvironment.log_energy(self, state)


def test_bad_arguments():
    env = gfn.Hypergrid(2, 4)
    policy = gfn.TabularPolicy(env)
    for lamda in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lamda"):
            gfn.subtrajectory_balance(policy, lamda=lamda)
    with pytest.raises(ValueError, match="lamda"):
        gfn.forward_looking_subtrajectory_balance(policy, lamda=0.0)
    with pytest.raises(ValueError, match="unknown weighting 'geometric_whithin'"):
        gfn.subtrajectory_balance(policy, weighting="geometric_whithin")
    for make in (gfn.trajectory_balance, gfn.flow_matching, gfn.log_partition_variance):
        for temperature in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="temperature"):
                make(policy, temperature=temperature)
        for exploration in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="exploration"):
                make(policy, exploration=exploration)
        with pytest.raises(ValueError, match="num_replay_samples"):
            make(policy, num_replay_samples=-1)
    for make in (gfn.forward_looking_detailed_balance,
                 gfn.forward_looking_subtrajectory_balance):
        with pytest.raises(ValueError, match="NoEnergy does not define"):
            make(gfn.TabularPolicy(NoEnergy(2, 4)))
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        gfn.log_partition_variance(policy, num_samples=1)
    params = policy.init(jax.random.key(0), log_flow=True)
    tb_params = policy.init(jax.random.key(0))
    with pytest.raises(ValueError, match="no replay buffer"):
        gfn.subtrajectory_balance(policy, 4, num_replay_samples=2)(jax.random.key(0), params)
    buffer = gfn.ReplayBuffer.empty(env, 4)
    with pytest.raises(ValueError, match="num_replay_samples is 0"):
        gfn.detailed_balance(policy, 4)(jax.random.key(0), params, buffer)
    with pytest.raises(TypeError, match="ReplayBuffer"):
        gfn.detailed_balance(policy, 4, num_replay_samples=2)(jax.random.key(0), params, 3)
    with pytest.raises(TypeError, match="ReplayBackend wraps"):
        gfn.ReplayBackend("adam", policy)
    with pytest.raises(ValueError, match="capacity 4"):
        px.fit(gfn.trajectory_balance(policy, 4, num_replay_samples=2), tb_params,
               gfn.ReplayBackend(optax.adam(0.1), policy, num_samples=8), 2,
               jax.random.key(0), buffer, maximize=False, progress=False)
    with pytest.raises(TypeError, match="initial px.gfn.ReplayBuffer"):
        px.fit(gfn.trajectory_balance(policy, 4), tb_params,
               gfn.ReplayBackend(optax.adam(0.1), policy), 2, jax.random.key(0),
               maximize=False, progress=False)
    with pytest.raises(NotImplementedError, match="forward_logits"):
        gfn.flow_matching(_NoLogits(env), 4)(jax.random.key(0), params)


class _NoLogits(gfn.AbstractPolicy):
    env: gfn.AbstractEnvironment

    def init(self, key, log_flow=False):
        return {}

    def forward_log_probs(self, params, state):
        return jnp.where(self.env.forward_mask(state), 0.0, -jnp.inf)

    def backward_log_probs(self, params, state):
        return jnp.where(self.env.backward_mask(state), 0.0, -jnp.inf)



def test_mlp_forward_logits_are_the_policys_log_edge_flows():
    # flow matching reads forward_logits as log edge flows: their log-softmax is P_F
    env = gfn.Hypergrid(2, 4)
    policy = gfn.MLPPolicy(env, hidden_sizes=(8,))
    params = policy.init(jax.random.key(0))
    for state in (jnp.array([0, 0]), jnp.array([3, 1]), jnp.array([3, 3])):
        logits = policy.forward_logits(params, state)
        mask = env.forward_mask(state)
        assert bool(jnp.all(jnp.isneginf(logits) == ~mask))
        np.testing.assert_allclose(
            jnp.where(mask, jax.nn.log_softmax(jnp.where(mask, logits, -1e30)), 0.0),
            jnp.where(mask, policy.forward_log_probs(params, state), 0.0), atol=1e-6)


def test_exit_only_states_have_their_flow_pinned_to_the_reward():
    # a full set's only action is the exit, so F(x) = R(x) exactly: DB and FL-DB (and the
    # SubTB pair, through the same flows) read log R(x) there (forward-looking: F̃(x) = 1),
    # never the learned head, whose gradient is therefore zero at full sets and not at the
    # partial sets visited.
    # By hand on one deterministic trajectory {} -> {0} -> {0, 1} -> exit (uniform P_B).
    env = gfn.SetGeneration((0.3, -0.2, 0.5), set_size=2)
    policy = gfn.TabularPolicy(env)
    states = env.all_states()
    index = {tuple(np.asarray(s).tolist()): int(env.state_index(s)) for s in states}
    forward = np.full((len(states), env.num_actions), -60.0)
    forward[index[0, 0, 0], 0] = forward[index[1, 0, 0], 1] = forward[index[1, 1, 0], 3] = 0.0
    log_flow = np.asarray(jax.random.normal(jax.random.key(7), (len(states),)), np.float64)
    params = {"forward": jnp.asarray(forward, jnp.float32),
              "log_flow": jnp.asarray(log_flow, jnp.float32), "log_z": jnp.asarray(0.4)}
    log_r = -(0.3 - 0.2)  # log R({0, 1}) = −(e_0 + e_1)
    key = jax.random.key(1)
    # DB: flows (log Z, F({0}), R({0,1}), R), log P_B: 0, -log 2, exit 0
    residuals = [0.4 - log_flow[index[1, 0, 0]], log_flow[index[1, 0, 0]] - log_r + np.log(2),
                 0.0]
    np.testing.assert_allclose(float(gfn.detailed_balance(policy, 4)(key, params)),
                               np.mean(np.square(residuals)), rtol=1e-5)
    # FL-DB: log F({0}) = log F̃({0}) − E({0}), E({0}) = 0.3
    fl = [0.4 - (log_flow[index[1, 0, 0]] - 0.3),
          log_flow[index[1, 0, 0]] - 0.3 - log_r + np.log(2), 0.0]
    np.testing.assert_allclose(
        float(gfn.forward_looking_detailed_balance(policy, 4)(key, params)),
        np.mean(np.square(fl)), rtol=1e-5)
    # FL-SubTB, random policy, off-policy: no gradient into the flows of full sets
    params = policy.init(jax.random.key(0), log_flow=True)
    params = jax.tree.map(
        lambda p: p + 0.5 * jax.random.normal(jax.random.key(3), p.shape), params)
    sizes = np.asarray(states).sum(1)
    loss = gfn.forward_looking_subtrajectory_balance(policy, 4, exploration=0.5)
    grad = np.asarray(jax.jit(jax.grad(lambda p: loss(key, p)))(params)["log_flow"])
    assert np.all(grad[sizes == 2] == 0.0)  # (every trajectory ends at a full set)
    assert np.any(grad[(sizes > 0) & (sizes < 2)] != 0.0)
