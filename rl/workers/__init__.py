"""Ray workers of an RL run (thin: logic lives in algorithms/ and rollout/) and the adapters that give
GRPOTrainer the algorithms.interfaces Protocols over their worker groups."""

from rl.workers.adapters import (
    ColocatedWeightSync,
    RayBaseReference,
    RayCritic,
    RayGenerator,
    RayPolicy,
    RayReference,
    RayRewardModel,
    TransportWeightSync,
    get_together,
)
from rl.workers.critic import CriticWorker, RewardModelWorker
from rl.workers.generation import GenerationWorker
from rl.workers.policy import PolicyWorker, ReferenceWorker
from rl.workers.specs import CriticSpec, EngineSpec, PolicySpec, RewardModelSpec

__all__ = [
    "ColocatedWeightSync",
    "CriticSpec",
    "CriticWorker",
    "EngineSpec",
    "GenerationWorker",
    "PolicySpec",
    "PolicyWorker",
    "RayCritic",
    "RayGenerator",
    "RayPolicy",
    "RayReference",
    "RayBaseReference",
    "RayRewardModel",
    "ReferenceWorker",
    "RewardModelSpec",
    "RewardModelWorker",
    "TransportWeightSync",
    "get_together",
]
