"""Typed config sections shared by every training command.

Schemas are pydantic models that forbid unknown keys; YAML files and command-line overrides only fill
them (rl/config.py). Defaults live here, once. Keys users and scripts rely on: `run.dir`,
`train.max_steps`, `train.seed`, `parallel.tp/pp/cp/ep/dp`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import InputError

if TYPE_CHECKING:
    from core.parallel.dims import ModelLayout, ParallelDims


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

    def dims(self) -> ParallelDims:
        """The process-group layout these sizes describe (ep is carved out of dp x cp)."""
        from core.parallel.dims import ParallelDims

        return ParallelDims(
            tp=self.tp, cp=self.cp, ep=self.ep, dp=self.dp, pp=self.pp, world_size=self.world_size
        )

    def check_model(self, config: ModelLayout) -> None:
        """InputError (one line: what to change) if the model cannot be split this way."""
        from core.parallel.dims import validate_model_layout

        validate_model_layout(self.dims(), config, self.vpp)


class PrecisionConfig(Schema):
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device supports it, fp32 on CPU"
    )


# ---- where a run goes: in this process (no placement) or on Ray worker groups --------------------------

Strategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]


class Placement(Schema):
    """How roles map onto devices (config section `placement`)."""

    mode: Literal["colocated", "disaggregated"] = Field(
        "colocated", description="colocated: all roles share one pool; disaggregated: one pool per role"
    )
    num_bundles: int = Field(1, ge=1, description="colocated: bundles of the shared pool")
    pools: dict[str, int] = Field(
        default_factory=dict, description="disaggregated: bundles per role, e.g. {policy: 4, generation: 2}"
    )
    gpus_per_bundle: Literal[0, 1] = Field(0, description="1: one bundle per GPU; 0: CPU-only bundles")
    cpus_per_bundle: float = Field(1.0, gt=0, description="CPUs reserved with each bundle")
    strategy: Strategy = "PACK"
    ready_timeout_s: float = Field(120.0, gt=0, description="how long to wait for the cluster to fit a pool")

    @model_validator(mode="after")
    def _pools_match_mode(self) -> Placement:
        if self.mode == "colocated" and self.pools:
            raise ValueError(
                "placement.pools is for mode=disaggregated; colocated uses placement.num_bundles"
            )
        if self.mode == "disaggregated" and not self.pools:
            raise ValueError("mode=disaggregated needs placement.pools, e.g. {policy: 1, generation: 1}")
        bad = {role: n for role, n in self.pools.items() if n < 1}
        if bad:
            raise ValueError(f"placement.pools sizes must be >= 1, got {bad}")
        return self

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_bundle}
        if self.gpus_per_bundle:
            bundle["GPU"] = float(self.gpus_per_bundle)
        return bundle


class RayOptions(Schema):
    address: str | None = Field(
        None, description='attach to a running cluster ("auto", "host:port"); None: start a local one'
    )
    num_cpus: int | None = Field(None, ge=1, description="local cluster: logical CPUs (default: all)")
    num_gpus: int | None = Field(None, ge=0, description="local cluster: GPUs (default: all)")
    namespace: str | None = None


class FailureConfig(Schema):
    max_restarts: int = Field(0, ge=0, description="worker failures to recover from (restart + resume)")
    call_timeout_s: float = Field(600.0, gt=0, description="deadline of every worker call")
    restart_timeout_s: float = Field(300.0, gt=0, description="how long a restart may take per group")


LoraTarget = Literal["qkv", "proj", "fc1", "fc2"]


class LoraConfig(Schema):
    """Low-rank adapters y = W x + (alpha / rank) * B A x on the attention and dense-MLP linears (W frozen).

    alpha defaults to 16, the usual r=8 / alpha=16 recipe (scale 2); PEFT's own default is alpha=8.
    """

    rank: int = Field(8, description="r: the adapters' inner dimension")
    alpha: float = Field(16.0, gt=0, description="the low-rank term is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (training only)")
    targets: list[LoraTarget] = Field(
        default_factory=lambda: ["qkv", "proj", "fc1", "fc2"],
        description="qkv, proj: attention in/out projections; fc1, fc2: dense MLP (not MoE experts)",
    )

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, rank: int) -> int:
        if rank <= 0:
            raise ValueError(f"lora rank must be a positive integer, got {rank}")
        return rank

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: list[str]) -> list[str]:
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(f"lora targets must be a non-empty list without repeats, got {targets}")
        return targets


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically) so that a run records what it ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
