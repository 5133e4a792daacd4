"""What every worker that trains a model with an LR schedule shares: the step and its checkpoint layout."""

from __future__ import annotations

from pathlib import Path

import torch


class TrainedModelMixin:
    """train / save / load for a worker holding `self.model` (PolicyModel or CriticModel: train, save, load),
    `self.scheduler` (stepped once per train call) and `self.rank`.

    Checkpoint layout under `path`: model/ (the model's sharded DCP state) and schedule.pt (rank 0)."""

    def train(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = self.model.train(batch)
        self.scheduler.step()
        return metrics

    def save(self, path: str) -> None:
        """Collective. The caller makes `path` atomic (GRPOTrainer writes under a temporary name)."""
        path_ = Path(path)
        path_.mkdir(parents=True, exist_ok=True)
        self.model.save(path_ / "model")
        if self.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, path_ / "schedule.pt")

    def load(self, path: str) -> None:
        path_ = Path(path)
        self.model.load(path_ / "model")
        state = torch.load(path_ / "schedule.pt", weights_only=True)
        self.scheduler.load_state_dict(state["scheduler"])
