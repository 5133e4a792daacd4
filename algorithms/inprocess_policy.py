"""`Policy` and `Reference` for a single process.

InProcessPolicy: algorithms.policy.PolicyModel plus the LR schedule the loop steps. PolicyModel runs one
optimizer step per `train` call at whatever LR the optimizer holds; the schedule (warmup/decay over all
optimizer steps of the run) lives here, steps once per `train`, and is saved and restored with the
checkpoint so that a resumed run continues on the same LR curve.

FrozenReference: the initial model, forward only (no optimizer state, no gradient buffers, parameters
with requires_grad=False), for the KL penalty.

Both compute logprobs at the sampling temperature T (logits / T, as verl does): the PPO ratio and the KL
then compare the distributions the samples were actually drawn from. At T = 1 these are raw logprobs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from algorithms.engine_model import last_position
from algorithms.policy import PolicyLossConfig, PolicyModel, token_entropy, token_logprobs
from algorithms.schedules import build_scheduler
from core.config import LoraConfig, OptimConfig
from core.transformer.model import GPTModel

Batch = dict[str, torch.Tensor]

__all__ = ["AdapterFreeReference", "FrozenReference", "InProcessPolicy", "PolicyLossConfig"]


class InProcessPolicy:
    """Satisfies algorithms.interfaces.Policy. temperature: logits are divided by it in `logprobs` and
    `train` (the rollout's sampling temperature)."""

    def __init__(
        self,
        model: GPTModel,
        optim: OptimConfig,
        loss: PolicyLossConfig,
        micro_batch_size: int,
        total_optimizer_steps: int,
        device: torch.device,
        param_dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
        compile_layers: bool = False,
        lora: LoraConfig | None = None,
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
            temperature=temperature,
            compile_layers=compile_layers,
            lora=lora,
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

    def quantizer_state(self) -> dict[str, torch.Tensor]:
        """QAT: every quantizer buffer by module name ({} without quantizers)."""
        from algorithms.qat import quantizer_state

        return quantizer_state(self.policy.engine.chunks)

    def refit_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What an engine fed by refit loads: hf_weights, fake-quantized under QAT (PolicyModel)."""
        return self.policy.refit_weights()

    def save_adapter(self, path: str | Path, lora: LoraConfig) -> None:
        self.policy.save_adapter(path, lora)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.policy.save(path / "model")
        torch.save({"scheduler": self.scheduler.state_dict()}, path / "schedule.pt")

    def load(self, path: str | Path) -> None:
        path = Path(path)
        self.policy.load(path / "model")
        self.scheduler.load_state_dict(torch.load(path / "schedule.pt", weights_only=True)["scheduler"])


class AdapterFreeReference:
    """Satisfies algorithms.interfaces.Reference for a LoRA policy: the base model is the policy with its
    adapters disabled (the same weights, no second copy)."""

    def __init__(self, policy: InProcessPolicy) -> None:
        self.policy = policy

    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        with self.policy.policy.engine.adapters_disabled():
            return self.policy.logprobs(batch, with_entropy)


class FrozenReference:
    """Satisfies algorithms.interfaces.Reference: a private copy of `model`, in eval mode, never trained.

    Micro-batches of `micro_batch_size` rows, each cut after its last response token (rows are
    right-padded and attention is causal, so the cut changes no kept logit), as PolicyModel does.
    """

    def __init__(
        self,
        model: GPTModel,
        micro_batch_size: int,
        device: torch.device,
        param_dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
    ) -> None:
        self.model = copy.deepcopy(model).to(device=device, dtype=param_dtype)  # as ModelEngine casts
        self.model.requires_grad_(False).eval()
        self.micro_batch_size, self.device, self.temperature = micro_batch_size, device, temperature

    @torch.no_grad()
    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """{"logprobs": (B, T) fp32 token-aligned [, "entropy": (B, T)]} at `temperature`; 0 at column 0 and
        after each micro-batch's last response token."""
        ids = batch["input_ids"]
        mask = batch.get("response_mask")
        B, T = ids.shape
        names = ("logprobs", "entropy") if with_entropy else ("logprobs",)
        out = {name: torch.zeros(B, T, dtype=torch.float32) for name in names}
        for start in range(0, B, self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            length = T if mask is None else max(2, last_position(mask[rows]) + 1)
            mb = ids[rows, :length].to(self.device)
            logits = self.model(mb)  # (b, length, V)
            out["logprobs"][rows, :length] = token_logprobs(logits, mb, None, self.temperature).float().cpu()
            if with_entropy:
                out["entropy"][rows, :length] = token_entropy(logits, None, self.temperature).float().cpu()
        return {name: t.to(ids.device) for name, t in out.items()}
