"""`Policy` for a single process: algorithms.policy.PolicyModel plus the LR schedule the loop steps.

PolicyModel runs one optimizer step per `train` call at whatever LR the optimizer holds; the schedule
(warmup/decay over all optimizer steps of the run) lives here, steps once per `train`, and is saved and
restored with the checkpoint so that a resumed run continues on the same LR curve.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from algorithms.policy import PolicyLossConfig, PolicyModel
from algorithms.schedules import build_scheduler
from core.config import OptimConfig
from core.transformer.model import GPTModel

Batch = dict[str, torch.Tensor]

__all__ = ["InProcessPolicy", "PolicyLossConfig"]


class InProcessPolicy:
    """Satisfies algorithms.interfaces.Policy (and Reference: only `logprobs` is used then)."""

    def __init__(
        self,
        model: GPTModel,
        optim: OptimConfig,
        loss: PolicyLossConfig,
        micro_batch_size: int,
        total_optimizer_steps: int,
        device: torch.device,
        param_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model_config = model.config
        self.policy = PolicyModel.build(
            model.config,
            model.state_dict(),
            None,
            loss=loss,
            optim=optim,
            micro_batch_size=micro_batch_size,
            device=device,
            param_dtype=param_dtype,
        )
        self.scheduler = build_scheduler(self.policy.engine.optimizer, total_optimizer_steps, optim)

    def generation_model(self) -> GPTModel:
        """The training model itself (colocated generation reads these parameters in place)."""
        return self.policy.engine.chunks[0]

    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        return self.policy.logprobs(batch, with_entropy)

    def train(self, batch: Batch) -> dict[str, float]:
        metrics = self.policy.train(batch)
        self.scheduler.step()
        return metrics

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.policy.hf_weights()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.policy.save(path / "model")
        torch.save({"scheduler": self.scheduler.state_dict()}, path / "schedule.pt")

    def load(self, path: str | Path) -> None:
        path = Path(path)
        self.policy.load(path / "model")
        self.scheduler.load_state_dict(torch.load(path / "schedule.pt", weights_only=False)["scheduler"])
