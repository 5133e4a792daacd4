"""Pretraining: next-token cross-entropy on packed token sequences, from scratch or from a checkpoint.

The loop is a composition of small phases (build, train step, evaluate, save) so that the parallel core
can swap the single-process forward/backward for a pipelined or data-parallel one without touching it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from algorithms.model_config import ModelConfig
from algorithms.schedules import build_adamw, build_scheduler
from core.checkpoint.checkpointer import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from core.config import OptimConfig, ParallelConfig, PrecisionConfig, RunConfig, Schema, TrainConfig
from core.errors import InputError
from core.utils.metrics import MetricsLogger, plot_metrics


class DatasetSpec(Schema):
    path: str = Field(description="prefix of a .bin/.idx pair written by `rl data tokenize`")
    weight: float = Field(1.0, gt=0)


class SyntheticConfig(Schema):
    n_train: int = Field(20000, ge=1)
    n_eval: int = Field(200, ge=1)
    max_operand: int = Field(99, ge=1)
    seed: int = 0


class DataConfig(Schema):
    synthetic: SyntheticConfig | None = Field(
        None, description="generate the embedded arithmetic task into the run directory"
    )
    datasets: list[DatasetSpec] = Field(default_factory=list, description="blended indexed datasets")
    tokenizer: str | None = Field(None, description="local tokenizer directory (generated for synthetic)")
    seq_len: int = Field(64, ge=2)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.synthetic is None) == (not self.datasets):
            raise ValueError("set exactly one of data.synthetic or data.datasets")
        if self.datasets and not self.tokenizer:
            raise ValueError("data.tokenizer is required with data.datasets")
        return self


class EvalConfig(Schema):
    max_new_tokens: int = Field(8, ge=1)
    num_problems: int = Field(200, ge=1, description="held-out arithmetic problems scored at each evaluation")


class PretrainConfig(Schema):
    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(synthetic=SyntheticConfig()))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)


@dataclass
class TrainerState:
    step: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(precision: PrecisionConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it; fp32 (None) on CPU unless asked otherwise."""
    if precision.dtype == "fp32":
        return None
    if precision.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return torch.bfloat16 if precision.dtype == "bf16" else torch.float16


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn) -> torch.Tensor:
    """Sum over tokens of the masked next-token loss for one micro-batch."""
    logits = model(
        batch["input_ids"], position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids")
    )  # (B, T, V_local)
    per_token = loss_fn(logits.float(), batch["labels"])  # (B, T)
    loss = (per_token * batch["loss_mask"]).sum()
    aux = getattr(model, "aux_loss", None)
    return loss, aux


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn,
    clip_grad: float,
    amp_dtype: torch.dtype | None,
) -> dict[str, float]:
    """One optimizer step over gradient-accumulation micro-batches; the loss is the mean over all tokens."""
    n_tokens = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)
    device_type = micro_batches[0]["input_ids"].device.type
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro_batches:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss_sum, aux = token_loss_sum(model, mb, loss_fn)
            loss = loss_sum / max(n_tokens, 1.0)
            if aux is not None:
                loss = loss + aux / len(micro_batches)
        loss.backward()
        total += float(loss_sum.detach())
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip_grad if clip_grad > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    return {"train/loss": total / max(n_tokens, 1.0), "train/grad_norm": grad_norm, "tokens": n_tokens}


def save_hf_export(model: torch.nn.Module, out_dir: Path, tokenizer_dir: str | None) -> None:
    from core.bridge import save_hf

    save_hf(model, out_dir, tokenizer_dir=tokenizer_dir)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="pretrain", unit="step", dynamic_ncols=True)


def format_eta(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if math.isfinite(seconds) else "?"


def checkpoint_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def restore_states(model, optimizer, model_state, optim_state) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def save(run_dir: Path, model, optimizer, scheduler, state: TrainerState, data_state: dict, keep_last: int) -> None:
    model_state, optim_state = checkpoint_states(model, optimizer)
    trainer_state: dict[str, Any] = {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "tokens_seen": state.tokens_seen,
        "scheduler": scheduler.state_dict(),
        "data": data_state,
    }
    save_checkpoint(run_dir / "checkpoints", state.step, {"model": model_state}, {"optim": optim_state},
                    trainer_state, keep_last=keep_last)


def maybe_resume(run_dir: Path, model, optimizer, scheduler) -> tuple[TrainerState, dict | None]:
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        return TrainerState(), None
    model_state, optim_state = checkpoint_states(model, optimizer)
    wrapped_model, wrapped_optim = {"model": model_state}, {"optim": optim_state}
    trainer_state = load_checkpoint(path, wrapped_model, wrapped_optim)
    restore_states(model, optimizer, wrapped_model["model"], wrapped_optim["optim"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    if "rng" in trainer_state:
        set_rng_state(trainer_state["rng"])
    state = TrainerState(trainer_state["step"], trainer_state["consumed_samples"], trainer_state["tokens_seen"])
    return state, trainer_state.get("data")
