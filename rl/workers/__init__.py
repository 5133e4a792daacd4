"""Ray workers of an RL run (thin: logic lives in algorithms/ and rollout/) and the adapters that give
GRPOTrainer the algorithms.interfaces Protocols over their worker groups."""

from rl.workers.adapters import (
    ColocatedWeightSync,
    RayGenerator,
    RayPolicy,
    RayReference,
    TransportWeightSync,
    get_together,
)
from rl.workers.generation import GenerationWorker
from rl.workers.policy import PolicyWorker, ReferenceWorker
from rl.workers.specs import EngineSpec, PolicySpec

__all__ = [
    "ColocatedWeightSync",
    "EngineSpec",
    "GenerationWorker",
    "PolicySpec",
    "PolicyWorker",
    "RayGenerator",
    "RayPolicy",
    "RayReference",
    "ReferenceWorker",
    "TransportWeightSync",
    "get_together",
]
