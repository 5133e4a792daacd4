"""Typed config sections shared by every training command.

Schemas are pydantic models that forbid unknown keys; YAML files and command-line overrides only fill
them (rl/config.py). Defaults live here, once. Keys users and scripts rely on: `run.dir`,
`train.max_steps`, `train.seed`, `parallel.tp/pp/cp/ep/dp`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import InputError


class Schema(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Schema):
    dir: str = Field("runs/default", description="run directory: config, metrics, checkpoints, exports")
    name: str | None = Field(None, description="a label for dashboards; defaults to the directory name")


class TrainConfig(Schema):
    max_steps: int = Field(100, ge=1, description="optimizer steps to run in total (resume continues to it)")
    seed: int = Field(1234, ge=0)
    global_batch_size: int = Field(32, ge=1, description="sequences per optimizer step, over all dp ranks")
    micro_batch_size: int = Field(
        8,
        ge=1,
        description="sequences per forward/backward on one data-parallel rank; accumulation fills the rest",
    )
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    save_every: int = Field(0, ge=0, description="0: save only at the end")
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk")
    progress_bar: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(
        False,
        description="torch.compile each transformer layer (Inductor: fused norms, RoPE, SwiGLU and their "
        "backward); the first steps pay the compilation",
    )

    def grad_accum_steps(self, dp: int) -> int:
        """Micro-batches per step on each dp rank (Megatron's convention: gbs = mbs * dp * accumulation)."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise InputError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size * parallel.dp = {per_step}"
            )
        return self.global_batch_size // per_step


class OptimConfig(Schema):
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    clip_grad: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")

    @model_validator(mode="after")
    def _min_below_max(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is larger than lr={self.lr}")
        return self


class ParallelConfig(Schema):
    tp: int = Field(1, ge=1, description="tensor-parallel size")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")
    cp: int = Field(1, ge=1, description="context-parallel size")
    ep: int = Field(1, ge=1, description="expert-parallel size (carved out of dp x cp)")
    dp: int = Field(1, ge=1, description="data-parallel size")
    vpp: int = Field(1, ge=1, description="virtual pipeline stages per rank (interleaved schedule)")
    sequence_parallel: bool = False
    distributed_optimizer: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


class PrecisionConfig(Schema):
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device supports it, fp32 on CPU"
    )


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically) so that a run records what it ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
