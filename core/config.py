"""Typed config sections shared by every training command.

Schemas are pydantic models that forbid unknown keys; YAML files and command-line overrides only fill
them (rl/config.py). Defaults live here, once. Keys users and scripts rely on: `run.dir`,
`train.max_steps`, `train.seed`, `parallel.tp/pp/cp/ep/dp`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import InputError

if TYPE_CHECKING:
    from core.parallel.dims import ModelLayout, ParallelDims


class Schema(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputPathMarker:
    """Marks a config field whose value is a file or directory the run reads (weights, data, tokenizer, a
    reward model, a plugin). `rl submit` finds every such field (rl/job_files.py) and makes it name the
    same file inside the Ray job: absolute on a cluster on this machine, shipped with --upload, or refused
    on a remote cluster when it is relative and outside the upload."""

    def __repr__(self) -> str:
        return "InputPath"


INPUT_PATH = InputPathMarker()
InputPath = Annotated[str, INPUT_PATH]  # a str field read from disk: `path: InputPath | None = Field(None)`


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
    async_save: bool = Field(
        False,
        description="write checkpoints in a background thread (DCP async_save): a save stalls the step only "
        "for the copy of the state to CPU memory; a checkpoint counts (COMPLETE, keep_last) once written",
    )
    max_bad_steps: int = Field(
        3,
        ge=1,
        description="a step with a non-finite loss or gradient norm is skipped (no update); this many in a "
        "row stop the run (exit 3), keeping the newest good checkpoint",
    )
    loss_spike_factor: float = Field(
        0.0,
        ge=0,
        description="0: off; else a step whose train/loss exceeds this factor times the median of the last "
        "loss_spike_window losses is a loss spike (logged as train/loss_spike, counted)",
    )
    loss_spike_window: int = Field(20, ge=3, description="recent steps whose median loss_spike_factor uses")
    loss_spike_is_bad: bool = Field(
        False,
        description="count a loss spike as a bad step towards max_bad_steps (its update is not undone)",
    )
    progress_bar: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(
        False,
        description="torch.compile each transformer layer (Inductor: fused norms, RoPE, SwiGLU and their "
        "backward); the first steps pay the compilation",
    )
    recompute: Literal["none", "selective", "full"] = Field(
        "none",
        description="activation recompute per layer: selective keeps matmul/attention outputs and recomputes "
        "norms and activations in backward (less memory, a few elementwise kernels); full recomputes the layer",
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

    def bundles_of(self, role: str) -> int:
        """Bundles of the pool `role` runs on (disaggregated: its own pool, else the policy's)."""
        if self.mode == "colocated":
            return self.num_bundles
        return self.pools.get(role, self.pools.get("policy", 0))

    def check_world(self, role: str, world_size: int, every_bundle_used: bool = False) -> None:
        """InputError (one line) when `world_size` ranks of one torch.distributed group cannot be laid on
        the role's pool the way WorkerGroup lays them (rank r on bundle r // (world_size / bundles)):
        more ranks than bundles must divide evenly, and a GPU bundle holds one rank (NCCL needs a GPU per
        rank). every_bundle_used: also refuse bundles no rank would use (a group alone on its pool)."""
        bundles = self.bundles_of(role)
        where = "placement.num_bundles" if self.mode == "colocated" else f"placement.pools.{role}"
        ranks = f"parallel.world_size={world_size} ranks (tp x pp x cp x dp)"
        if world_size > bundles and self.gpus_per_bundle:
            raise InputError(
                f"{where}={bundles} GPU bundles for {ranks}: each rank needs a bundle (GPU) of its own; "
                f"set {where}={world_size}"
            )
        if world_size > bundles and world_size % bundles:
            raise InputError(
                f"{where}={bundles} bundles for {ranks}: the ranks must divide evenly over the bundles; "
                f"set {where} to a divisor of {world_size}, or to {world_size}"
            )
        if every_bundle_used and world_size < bundles:
            raise InputError(
                f"{where}={bundles} bundles for {ranks}: {bundles - world_size} would stay idle; "
                f"set {where}={world_size}"
            )


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
    hang_timeout_s: float | None = Field(
        300.0,
        gt=0,
        description="a rank whose process stops running, or whose training step makes no progress, for this "
        "long is hung: every rank is killed and the run stops (exit 1) or restarts (max_restarts); null: off",
    )
    long_phase_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="the no-progress limit of the legitimately long phases: start-up (data, model build, "
        "resume), a process's first step (compilation), saves, evaluations, the export",
    )


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
