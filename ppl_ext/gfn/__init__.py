"""GFlowNets: environments, policies, balance objectives and exact evaluation.

A first increment of issue 12: the environment protocol and the hypergrid, MLP policies
(forward, learned or uniform backward, log Z, log state flow), trajectory and detailed
balance as `px.expectation` programs trained with `px.fit`, and exact evaluation by
dynamic programming over the state DAG.
"""

from ._env import AbstractEnvironment as AbstractEnvironment, Hypergrid as Hypergrid
from ._evaluate import (
    EvaluationInfo as EvaluationInfo,
    empirical_terminal_distribution as empirical_terminal_distribution,
    evaluate as evaluate,
    log_partition as log_partition,
    reward_distribution as reward_distribution,
    terminal_distribution as terminal_distribution,
)
from ._objectives import (
    Trajectories as Trajectories,
    detailed_balance as detailed_balance,
    sample_trajectories as sample_trajectories,
    trajectory_balance as trajectory_balance,
)
from ._policy import AbstractPolicy as AbstractPolicy, MLPPolicy as MLPPolicy

__all__ = [
    "AbstractEnvironment",
    "AbstractPolicy",
    "EvaluationInfo",
    "Hypergrid",
    "MLPPolicy",
    "Trajectories",
    "detailed_balance",
    "empirical_terminal_distribution",
    "evaluate",
    "log_partition",
    "reward_distribution",
    "sample_trajectories",
    "terminal_distribution",
    "trajectory_balance",
]
