"""Critic and reward-model workers: one rank of a training layout hosting an algorithms.critic model.

As the policy workers (rl/workers/policy.py): every rank of the group is called together (WorkerGroup
dispatch "dp" for batches, "all" otherwise), the model runs the collectives, the worker adds only the LR
schedule and checkpoint paths. Checkpoint layout: path/model (torch.distributed.checkpoint, any layout)
and path/schedule.pt (rank 0); a RewardModelWorker can `load` a critic's path/model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from algorithms.critic import CriticModel, RewardModel, init_value_model
from rl.cluster.worker import Worker
from rl.workers.specs import CriticSpec, RewardModelSpec
from rl.workers.trainable import TrainedModelMixin


class CriticWorker(TrainedModelMixin, Worker):
    """The trained critic: values, train (one optimizer step + LR schedule step), save / load."""

    role = "critic"

    def __init__(self, spec: CriticSpec) -> None:
        self.spec = spec
        self.model: CriticModel | None = None
        self.scheduler: Any = None

    def setup(self) -> None:
        from algorithms.schedules import build_scheduler
        from core.utils.device import param_dtype

        self.model = None  # a restart rebuilds on the new groups
        torch.manual_seed(self.spec.seed)
        config, state = init_value_model(self.spec.init_from, self.spec.seed, from_lm=True)
        self.model = CriticModel.build(
            config,
            state,
            self.groups,
            loss=self.spec.loss,
            optim=self.spec.optim,
            micro_batch_size=self.spec.micro_batch_size,
            parallel=self.spec.parallel,
            device=self.device,
            param_dtype=param_dtype(self.spec.precision, self.device),
        )
        self.scheduler = build_scheduler(
            self.model.engine.optimizer, self.spec.total_optimizer_steps, self.spec.optim
        )

    def values(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.values(batch)


class RewardModelWorker(Worker):
    """A frozen reward model: scores (B,) per sequence."""

    role = "reward_model"

    def __init__(self, spec: RewardModelSpec) -> None:
        self.spec = spec
        self.model: RewardModel | None = None

    def setup(self) -> None:
        from core.utils.device import param_dtype

        self.model = None
        config, state = init_value_model(self.spec.init_from, 0, from_lm=False)
        self.model = RewardModel.build(
            config,
            state,
            self.groups,
            micro_batch_size=self.spec.micro_batch_size,
            pad_id=self.spec.pad_id,
            parallel=self.spec.parallel,
            device=self.device,
            param_dtype=param_dtype(self.spec.precision, self.device),
        )

    def scores(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.scores(batch)

    def load(self, path: str) -> None:
        """A critic checkpoint's weights (path/model, as CriticWorker.save writes). Collective."""
        self.model.load(Path(path) / "model")
