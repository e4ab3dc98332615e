"""GFlowNets: environments, policies, balance objectives and exact evaluation.

A first increment of issue 12: the environment protocol and the hypergrid, MLP policies
(forward, learned or uniform backward, log Z, log state flow), trajectory and detailed
balance as `px.expectation` programs trained with `px.fit`, and exact evaluation by
dynamic programming over the state DAG.
"""

from ._bitseq import BitSequence as BitSequence
from ._env import AbstractEnvironment as AbstractEnvironment, Hypergrid as Hypergrid
from ._evaluate import (
    EvaluationInfo as EvaluationInfo,
    empirical_terminal_distribution as empirical_terminal_distribution,
    evaluate as evaluate,
    jensen_shannon as jensen_shannon,
    kl_divergence as kl_divergence,
    log_partition as log_partition,
    num_modes_found as num_modes_found,
    reward_distribution as reward_distribution,
    terminal_distribution as terminal_distribution,
    top_k_reward as top_k_reward,
)
from ._objectives import (
    Trajectories as Trajectories,
    detailed_balance as detailed_balance,
    flow_matching as flow_matching,
    forward_looking_detailed_balance as forward_looking_detailed_balance,
    forward_looking_subtrajectory_balance as forward_looking_subtrajectory_balance,
    log_partition_variance as log_partition_variance,
    sample_trajectories as sample_trajectories,
    subtrajectory_balance as subtrajectory_balance,
    trajectory_balance as trajectory_balance,
)
from ._policy import (
    AbstractPolicy as AbstractPolicy,
    MLPPolicy as MLPPolicy,
    TabularPolicy as TabularPolicy,
)
from ._training import (
    ReplayBackend as ReplayBackend,
    ReplayBuffer as ReplayBuffer,
    ReplayState as ReplayState,
)
from ._sampler import (
    ForwardPolicySampler as ForwardPolicySampler,
    SampledObject as SampledObject,
)
from ._sets import SetGeneration as SetGeneration

__all__ = [
    "AbstractEnvironment",
    "AbstractPolicy",
    "BitSequence",
    "EvaluationInfo",
    "ForwardPolicySampler",
    "Hypergrid",
    "MLPPolicy",
    "ReplayBackend",
    "ReplayBuffer",
    "ReplayState",
    "SampledObject",
    "SetGeneration",
    "TabularPolicy",
    "Trajectories",
    "detailed_balance",
    "flow_matching",
    "forward_looking_detailed_balance",
    "forward_looking_subtrajectory_balance",
    "log_partition_variance",
    "subtrajectory_balance",
    "empirical_terminal_distribution",
    "evaluate",
    "jensen_shannon",
    "kl_divergence",
    "log_partition",
    "num_modes_found",
    "reward_distribution",
    "sample_trajectories",
    "terminal_distribution",
    "top_k_reward",
    "trajectory_balance",
]
