"""A single-process `Policy` / `Reference` over core.engine.ModelEngine, for `rl grpo` and its tests.

Stand-in for algorithms/policy.py's PolicyModel (written in parallel); the loop only relies on the
interfaces of algorithms/interfaces.py, so swapping one for the other touches `build_policy` alone.

Loss per token (verl / GRPO): policy loss from POLICY_LOSSES (ppo_clip by default) on old_logprobs and
advantages, + kl_coef * KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs) - entropy_coef * entropy,
each aggregated by agg_mode over the step's global count, so micro-batch gradients sum to the step's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from algorithms.losses import KL_ESTIMATORS, POLICY_LOSSES, aggregate, loss_count, masked_mean
from algorithms.schedules import build_scheduler
from core.config import OptimConfig, ParallelConfig, Schema
from core.engine import ModelEngine
from core.tensor_parallel import vocab_parallel_logprobs
from core.transformer.model import GPTModel

Batch = dict[str, torch.Tensor]


class PolicyLossConfig(Schema):
    name: str = Field("ppo_clip", description="POLICY_LOSSES entry: ppo_clip, gspo, reinforce")
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0, description="> clip_low: DAPO's clip-higher")
    dual_clip: float | None = Field(None, gt=1)
    agg_mode: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"
    kl_coef: float = Field(0.0, ge=0, description="KL(policy || reference) penalty; > 0 builds a reference")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus")


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) token-aligned: [:, t] = log p(input_ids[:, t] | prefix); column 0 is 0."""
    lps = vocab_parallel_logprobs(logits[:, :-1].float(), input_ids[:, 1:], None)  # (B, T-1)
    return torch.cat([torch.zeros_like(lps[:, :1]), lps], dim=1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) token-aligned entropy of the distribution each token was drawn from; column 0 is 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.cat([torch.zeros_like(ent[:, :1]), ent], dim=1)


class InProcessPolicy:
    """Policy (and, with train never called, Reference) on one process: ModelEngine with groups=None."""

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
        self.model_config, self.loss, self.micro_batch_size = model.config, loss, micro_batch_size
        self.clip_grad = optim.clip_grad
        self.engine = ModelEngine(
            model.config, ParallelConfig(), optim, None, device, model.state_dict(), param_dtype
        )
        self.scheduler = build_scheduler(self.engine.optimizer, total_optimizer_steps, optim)
        self.device = device

    def generation_model(self) -> GPTModel:
        """The training model itself (colocated generation reads these parameters in place)."""
        return self.engine.chunks[0]

    def _micro_batches(self, batch: Batch) -> list[Batch]:
        B = batch["input_ids"].shape[0]
        return [
            {k: v[i : i + self.micro_batch_size].to(self.device) for k, v in batch.items()}
            for i in range(0, B, self.micro_batch_size)
        ]

    @torch.no_grad()
    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        def collect(logits: torch.Tensor, mb: Batch):
            out = {"logprobs": token_logprobs(logits, mb["input_ids"])}
            if with_entropy:
                out["entropy"] = token_entropy(logits)
            return torch.zeros(()), out

        per_mb = self.engine.forward_collect(self._micro_batches({"input_ids": batch["input_ids"]}), collect)
        return {k: torch.cat([m[k] for m in per_mb]).cpu() for k in per_mb[0]}

    def train(self, batch: Batch) -> dict[str, float]:
        """One optimizer step over the batch's micro-batches (and one LR scheduler step)."""
        cfg = self.loss
        count = loss_count(batch["response_mask"], cfg.agg_mode)
        records: list[tuple[float, dict[str, torch.Tensor]]] = []

        def loss_fn(logits: torch.Tensor, mb: Batch):
            mask = mb["response_mask"]
            logprobs = token_logprobs(logits, mb["input_ids"])
            loss, metrics = POLICY_LOSSES.get(cfg.name)(
                logprobs,
                mb["old_logprobs"],
                mb["advantages"],
                mask,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                dual_clip=cfg.dual_clip,
                agg_mode=cfg.agg_mode,
                global_count=count,
            )
            metrics = {"pg_loss": loss.detach(), **metrics}
            if "ref_logprobs" in mb:
                kl = KL_ESTIMATORS.get(cfg.kl_estimator)(logprobs, mb["ref_logprobs"])
                loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.agg_mode, count)
                metrics["kl"] = masked_mean(kl.detach(), mask)
            entropy = token_entropy(logits.detach() if cfg.entropy_coef == 0 else logits)
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * aggregate(entropy, mask, cfg.agg_mode, count)
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
            records.append((float(mask.sum()), metrics))
            return loss, {"loss_sum": loss.detach(), **metrics}

        lr = self.scheduler.get_last_lr()[0]
        result = self.engine.train_step(self._micro_batches(batch), loss_fn, self.clip_grad)
        self.scheduler.step()
        tokens = sum(n for n, _ in records) or 1.0
        out = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": lr}
        for key in records[0][1]:
            values = [float(m[key]) for _, m in records]
            if key.endswith("_max"):
                out[key] = max(values)
            elif key.endswith("_min"):
                out[key] = min(values)
            else:
                out[key] = sum(n * float(m[key]) for n, m in records) / tokens
        return out

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from rollout.refit import training_weights_to_hf

        return training_weights_to_hf(self.engine.chunks, None, self.model_config)

    def save(self, path: str | Path) -> None:
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dcp.save(self.engine.sharded_state(), checkpoint_id=str(path / "model"))
        torch.save({"scheduler": self.scheduler.state_dict()}, path / "schedule.pt")

    def load(self, path: str | Path) -> None:
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        template = self.engine.load_template(path / "model")
        dcp.load(template, checkpoint_id=str(path / "model"))
        self.engine.finish_load(template)
        self.scheduler.load_state_dict(torch.load(path / "schedule.pt", weights_only=False)["scheduler"])
