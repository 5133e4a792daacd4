"""ModelEngine: one rank's share of a GPTModel in any (tp, cp, ep, dp, pp, vpp) layout, with its optimizer.

It composes the core's pieces into what a training loop needs: build the chunks with layout-invariant
weights, wrap them for data parallelism (DDP on fp32 main grads; replicated AdamW or ZeRO-1), run one
optimizer step over micro-batches through the pipeline schedule with a caller-given loss, and save/load
checkpoints that reshard. A single process (groups=None) runs the same code with no communication, so
every layout is checked against it by the parity tests.

Step contract (as in Megatron): loss_fn returns the micro-batch's share of the step loss already
normalised by the GLOBAL number of loss tokens, so gradients are SUMmed over data-parallel ranks.

Context parallelism: callers pass FULL micro-batches (every cp rank of a dp rank the same ones); the
engine gives each cp rank its load-balanced 2*cp-chunk split (global position ids included, see
core/transformer/context_parallel.py), so loss_fn sees this rank's tokens only and the global token count
it divides by stays the caller's. Gradients are summed over dp x cp, metrics too.
MoE: each rank's load-balancing loss covers its own tokens (Megatron's default); the engine scales it by
1 / (dp * cp) so that the summed gradient is the mean over ranks, the same coefficient at every layout.
LoRA (lora=LoraConfig): adapters are put on the chunks after the base weights are loaded and every base
parameter is frozen, so DDP's gradient buffers, the optimizer and its checkpoint state hold the adapters
only; the model part of a checkpoint holds base weights and adapters. `merged_weights()` gives refit/export
the merged model, `adapters_disabled()` the base model (core/tensor_parallel/lora.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from core.checkpoint.sharded import (
    checkpoint_names,
    model_named_shards,
    named_state_from_template,
    optimizer_state_template,
    sharded_model_state,
    sharded_named_optimizer_state,
)
from core.config import LoraConfig, OptimConfig, ParallelConfig
from core.distributed import (
    DistributedDataParallel,
    DynamicGradScaler,
    build_optimizer,
    finalize_model_grads,
)
from core.errors import InputError
from core.parallel.collectives import group_size
from core.parallel.dims import Groups
from core.pipeline.layout import build_embedding_group, build_stage_modules, tied_embedding_weight
from core.pipeline.schedules import get_schedule
from core.tensor_parallel.lora import adapters_disabled, apply_lora, merged_weights
from core.transformer.attention import position_ids_from_segments
from core.transformer.config import TransformerConfig
from core.transformer.context_parallel import gather_from_cp, split_for_cp
from core.transformer.model import GPTModel
from core.transformer.recompute import Recompute

MicroBatch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def shard_of(full: torch.Tensor, param: nn.Parameter, groups: Groups | None) -> torch.Tensor:
    """This rank's piece of a full (global) tensor, by the parameter's tp_dim and ep_dim."""
    out = full
    if groups is None:
        return out
    tp_dim, ep_dim = getattr(param, "tp_dim", None), getattr(param, "ep_dim", None)
    if ep_dim is not None and groups.ep_size > 1:
        out = out.chunk(groups.ep_size, dim=ep_dim)[groups.ep_rank]
    if tp_dim is not None and groups.tp_size > 1:
        out = out.chunk(groups.tp_size, dim=tp_dim)[groups.tp_rank]
    return out


def _scaled_loss_fn(loss_fn: LossFn, scale: float) -> LossFn:
    """loss_fn whose loss (not its metrics) is multiplied by the fp16 loss scale."""

    def scaled(logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = loss_fn(logits, mb)
        return loss * scale, metrics

    return scaled


@torch.no_grad()
def load_full_weights(
    chunks: Sequence[nn.Module], full_state: dict[str, torch.Tensor], groups: Groups | None
) -> None:
    """Copies each chunk parameter's shard out of a full single-process state dict (same global names)."""
    names = checkpoint_names(chunks)
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = names[p]
            if key not in full_state:
                raise KeyError(f"full state has no {key!r} (parameter {name})")
            p.copy_(shard_of(full_state[key], p, groups))


def split_micro_batch_for_cp(mb: MicroBatch, cp_group: dist.ProcessGroup | None) -> MicroBatch:
    """This cp rank's share of a full micro-batch: every (B, T, ...) tensor split on dim 1 into chunks r and
    2cp-1-r; position_ids (GLOBAL positions, per document when segment_ids are given) made first if
    missing. Other tensors ((B,) rewards, scalars) are kept whole. Identity for cp = 1."""
    if group_size(cp_group) == 1:
        return mb
    B, T = mb["input_ids"].shape
    full = dict(mb)
    if "position_ids" not in full:
        segments = full.get("segment_ids")
        full["position_ids"] = (
            position_ids_from_segments(segments)
            if segments is not None
            else torch.arange(T, device=mb["input_ids"].device).expand(B, T)
        )
    return {
        k: split_for_cp(v, 1, cp_group) if v.dim() >= 2 and tuple(v.shape[:2]) == (B, T) else v
        for k, v in full.items()
    }


def check_compile_layout(parallel: ParallelConfig) -> None:
    """InputError unless compiled layers are validated for the layout: tp, dp and pp are; cp and ep are not."""
    if max(parallel.cp, parallel.ep) > 1:
        raise InputError(
            f"train.compile=true needs parallel.cp = ep = 1 (got cp={parallel.cp}, ep={parallel.ep}): compiled "
            "context- and expert-parallel layers are not validated yet; use tp/dp/pp, or train.compile=false"
        )


def compile_transformer_layers(chunk: GPTModel) -> None:
    """torch.compile every transformer layer in place (torchtitan's per-block compile): parameter names,
    hooks and the DDP/optimizer wiring are unchanged; all layers share one compiled graph (same code,
    parameters as graph inputs). tp collectives inside a layer are traced as functional collectives
    (core.parallel.collectives); cp and ep layers are not validated compiled, so the engine refuses them."""
    for layer in chunk.layers.values():
        layer.compile()


@dataclass
class StepResult:
    loss: float  # mean loss over the step's loss tokens (all dp ranks, all micro-batches)
    grad_norm: float
    metrics: dict[str, float]


class ModelEngine:
    """Holds the chunks (DDP-wrapped), optimizer and groups of one rank; see the module docstring.

    grad_scaler (fp16 parameters): the loss (and MoE aux loss) is multiplied by its scale before backward,
    the main_grads are unscaled and checked for inf/nan over the whole world after the reduction, and an
    overflowing step is skipped on every rank (StepResult.metrics: loss_scale, skipped).
    """

    def __init__(
        self,
        config: TransformerConfig,
        parallel: ParallelConfig,
        optim: OptimConfig,
        groups: Groups | None,
        device: torch.device,
        full_state: dict[str, torch.Tensor],
        param_dtype: torch.dtype = torch.float32,
        grad_scaler: DynamicGradScaler | None = None,
        bucket_size_mb: float = 25.0,
        compile_layers: bool = False,
        lora: LoraConfig | None = None,
        lora_seed: int = 0,
        recompute: Recompute = "none",
    ):
        """lora: train low-rank adapters on a frozen base (lora_seed draws their A factors, the same full
        values at every layout); None trains every parameter. recompute: activation recompute of every
        transformer layer (core/transformer/recompute.py)."""
        self.config, self.parallel, self.groups, self.device = config, parallel, groups, device
        if compile_layers:
            check_compile_layout(parallel)
        self.grad_scaler = grad_scaler
        self.embedding_group = build_embedding_group(groups) if groups is not None else None
        self.chunks = self._build_chunks()
        load_full_weights(self.chunks, full_state, groups)
        self.lora = lora
        for chunk in self.chunks:
            if lora is not None:
                apply_lora(chunk, lora, lora_seed)
            chunk.to(device=device, dtype=param_dtype)
            if config.is_moe:
                chunk.register_forward_hook(self._scale_aux_loss)
            for layer in chunk.layers.values():
                layer.recompute = recompute
            if compile_layers:
                compile_transformer_layers(chunk)
        tied = tied_embedding_weight(self.chunks)  # pp > 1 first/last stage: summed over the pair later
        # A frozen tied embedding (LoRA) has no gradient to sum over the first and last stage.
        self._tied_grad_group = self.embedding_group if tied is not None and tied.requires_grad else None
        self.ddp = DistributedDataParallel(
            nn.ModuleList(self.chunks),
            groups.dp_cp_group if groups else None,
            expert_dp_group=groups.edp_group if groups else None,
            use_distributed_optimizer=parallel.distributed_optimizer,
            bucket_size_mb=bucket_size_mb,
            isolated_params=(tied,) if tied is not None else (),
        )
        self.optimizer = build_optimizer(self.ddp, optim, distributed=parallel.distributed_optimizer)
        self.schedule = get_schedule(parallel.pp, parallel.vpp)
        self._ckpt_names = checkpoint_names(self.chunks)
        self._loss_scale = 1.0  # the grad scaler's scale while a step's backward runs, else 1

    def _build_chunks(self) -> list[GPTModel]:
        if self.groups is None:
            return [GPTModel(self.config)]
        return build_stage_modules(
            self.config,
            self.groups,
            self.parallel.vpp,
            self.groups.tp_group,
            self.embedding_group,
            cp_group=self.groups.cp_group,
            ep_group=self.groups.ep_group,
        )

    def _scale_aux_loss(self, chunk: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: the chunk's MoE aux loss becomes this rank's share (1 / (dp * cp)), loss-scaled."""
        dp_cp = self.groups.dp_cp_size if self.groups else 1
        if chunk.aux_loss is not None:
            chunk.aux_loss = chunk.aux_loss * (self._loss_scale / dp_cp)

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.groups.cp_group if self.groups else None

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.groups.tp_group if self.groups else None

    def _run_schedule(
        self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, forward_only: bool, **hooks: Any
    ) -> list[dict[str, torch.Tensor]]:
        kwargs = hooks if self.groups is None else hooks | {"groups": self.groups}
        return self.schedule(
            model_chunks=self.chunks,
            micro_batches=[split_micro_batch_for_cp(mb, self.cp_group) for mb in micro_batches],
            loss_fn=loss_fn,
            forward_only=forward_only,
            **kwargs,
        )

    # ---- training: a step is forward_backward -> finalize_grads -> optimizer_step -----------------------

    def train_step(
        self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, clip_grad: float
    ) -> StepResult:
        """Forward/backward over the micro-batches (pipelined), gradient sync, clipping, optimizer step
        (skipped on every rank when the step's loss or gradient norm is not finite: see optimizer_step)."""
        per_mb = self.forward_backward(micro_batches, loss_fn)
        self.finalize_grads()
        loss = self.reduce_metric(per_mb, "loss_sum")
        grad_norm, metrics = self.optimizer_step(clip_grad, loss)
        return StepResult(loss, grad_norm, metrics)

    def forward_backward(
        self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn
    ) -> list[dict[str, torch.Tensor]]:
        """Zero the main grads, then forward/backward every micro-batch. The dp reduction of each gradient
        bucket has started in its chunk's last backward; finalize_grads waits for it."""
        self.optimizer.zero_grad()
        scale = self.grad_scaler.scale if self.grad_scaler is not None else 1.0
        if scale != 1.0:
            loss_fn = _scaled_loss_fn(loss_fn, scale)
        self._loss_scale = scale
        try:
            # Overlap: each chunk's last backward runs with sync on, so each gradient bucket starts its dp
            # reduction as soon as its last grad arrives, while backward (and the pipeline) continues. The
            # tied-embedding sum (pp > 1) follows the reduction in finalize_grads.
            return self._run_schedule(
                micro_batches, loss_fn, forward_only=False, no_sync_func=lambda c: self.ddp.no_sync()
            )
        finally:
            self._loss_scale = 1.0

    def finalize_grads(self) -> None:
        """Tied-embedding sum over first/last stage, dp x cp reduction, sequence-parallel tp sum."""
        finalize_model_grads([self.ddp], self.tp_group, embedding_group=self._tied_grad_group)

    def optimizer_step(self, clip_grad: float, loss: float | None = None) -> tuple[float, dict[str, float]]:
        """(Unscale and skip on overflow,) clip and step; returns the grad norm before clipping and metrics.

        Numerical fault policy (Megatron's check of every step): a non-finite gradient norm, or a non-finite
        `loss` (the step loss reduced over the world, as reduce_metric gives it), skips the step: no update,
        no Adam moment change, the gradients dropped; metrics["nonfinite"] = 1 (absent on a good step). The norm is the all-reduced
        global norm and the loss the all-reduced sum, so every rank takes the same decision. The caller
        (Trainer.advance) counts such steps and stops the run after train.max_bad_steps in a row.
        """
        metrics: dict[str, float] = {}
        if self.grad_scaler is not None:
            metrics["loss_scale"] = self.grad_scaler.scale
            found_inf = self.grad_scaler.unscale_(self.optimizer.main_grads(), self._world_groups())
            self.grad_scaler.update(found_inf)
            metrics["skipped"] = float(found_inf)
            if found_inf:
                return float("inf"), metrics
        grad_norm = float(
            self.optimizer.clip_grad_norm_(
                clip_grad if clip_grad > 0 else 0.0,
                tp_group=self.tp_group,
                pp_group=self.groups.pp_group if self.groups else None,
                ep_group=self.groups.ep_group if self.groups else None,
            )
        )
        if not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(loss)):
            self.optimizer.zero_grad()
            return grad_norm, metrics | {"nonfinite": 1.0}
        self.optimizer.step()
        return grad_norm, metrics

    @torch.no_grad()
    def state_finite(self) -> bool:
        """True when every parameter, fp32 master and optimizer moment on every rank is finite (collective:
        one flag reduced over the world, so every rank decides alike). Checked before a checkpoint or an
        export is written: neither is ever made from non-finite weights."""
        tensors = [p for chunk in self.chunks for p in chunk.parameters()]
        for s in self.optimizer.shards:
            tensors.append(s.master)
            tensors += [
                v for k, v in self.optimizer.state[s.master].items() if k != "step" and torch.is_tensor(v)
            ]
        flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
        bad = (~torch.stack(flags)).any().to(torch.float32) if flags else torch.zeros((), device=self.device)
        for group in self._world_groups():
            if group_size(group) > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        return not bool(bad.item())

    def owned_main_grads(self) -> list[tuple[str, int, int, torch.Tensor]]:
        """(checkpoint name, lo, hi, gradient) for every range [lo, hi) of a flattened local parameter that
        this rank's optimizer updates: after finalize_grads, the reduced gradient there (parity tests)."""
        return [(self._ckpt_names[s.param], s.lo, s.hi, s.main_grad) for s in self.optimizer.shards]

    def _world_groups(self) -> list[dist.ProcessGroup]:
        """tp x pp, then dp x cp: together every rank (an inf anywhere skips the step everywhere)."""
        return [] if self.groups is None else [self.groups.mp_group, self.groups.dp_cp_group]

    def reduce_metric(self, per_mb: list[dict[str, torch.Tensor]], key: str) -> float:
        """Sum of a last-stage metric over micro-batches, pp stages and dp x cp ranks."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in per_mb:
            total += m[key].to(torch.float64)
        if self.groups is not None:
            dist.all_reduce(total, group=self.groups.pp_group)
            dist.all_reduce(total, group=self.groups.dp_cp_group)
        return float(total)

    @torch.no_grad()
    def forward_only(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, key: str) -> float:
        """Sum of metric `key` over micro-batches and ranks, without gradients."""
        for c in self.chunks:
            c.eval()
        try:
            per_mb = self._run_schedule(micro_batches, loss_fn, forward_only=True)
        finally:
            for c in self.chunks:
                c.train()
        return self.reduce_metric(per_mb, key)

    @torch.no_grad()
    def forward_collect(
        self, micro_batches: Sequence[MicroBatch], fn: LossFn
    ) -> list[dict[str, torch.Tensor]]:
        """Per-micro-batch outputs of fn(logits, micro_batch) -> (unused, {name: tensor}), in order.

        Outputs come back on the ranks of the last pipeline stage; other stages get an empty list. With tp
        they are whatever fn makes of the vocab-parallel logits (e.g. vocab_parallel_logprobs: full per
        token on every tp rank). This is how RL reads token logprobs, entropies or values out of any layout.
        Under cp, fn sees this rank's split; per-token outputs (B, T/cp, ...) come back gathered to (B, T, ...)
        in global order, other outputs are this cp rank's own.
        """
        for c in self.chunks:
            c.eval()
        try:
            outputs = self._run_schedule(micro_batches, fn, forward_only=True)
        finally:
            for c in self.chunks:
                c.train()
        if group_size(self.cp_group) == 1:
            return outputs
        cp = group_size(self.cp_group)
        gathered = []
        for mb, out in zip(micro_batches, outputs, strict=True):
            B, T = mb["input_ids"].shape
            gathered.append(
                {
                    k: gather_from_cp(v, 1, self.cp_group)
                    if v.dim() >= 2 and tuple(v.shape[:2]) == (B, T // cp)
                    else v
                    for k, v in out.items()
                }
            )
        return gathered

    def is_last_stage(self) -> bool:
        return self.groups is None or self.groups.pp_rank == self.groups.pp_size - 1

    # ---- checkpoints ------------------------------------------------------------------------------------

    def sharded_state(self) -> dict[str, Any]:
        """Model and optimizer state in checkpoint form (global names and offsets): loads at any layout."""
        shards = model_named_shards(self.chunks)
        state = sharded_model_state(shards, self.groups)
        return state | sharded_named_optimizer_state(self._named_optimizer_state(), shards, self.groups)

    def _named_optimizer_state(self) -> dict[str, Any]:
        full = self.optimizer.full_state_dict(device=self.device)
        trained = self.optimizer.param_name  # frozen (LoRA base) parameters have no optimizer state
        by_opt_name = {trained[p]: self._ckpt_names[p] for p in self._ckpt_names if p in trained}
        state = {by_opt_name[n]: e for n, e in full["state"].items()}  # master_param included: fp32 masters
        groups = [{**g, "params": [by_opt_name[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_template(self, path: str | Path) -> dict[str, Any]:
        shards = model_named_shards(self.chunks)
        return sharded_model_state(shards, self.groups) | optimizer_state_template(path, shards, self.groups)

    def finish_load(self, template: dict[str, Any]) -> None:
        """After dcp.load filled `template` (from load_template): push the optimizer state in."""
        named = named_state_from_template({k: v for k, v in template.items() if k.startswith("optim.")})
        trained = self.optimizer.param_name
        to_opt = {self._ckpt_names[p]: trained[p] for p in self._ckpt_names if p in trained}
        state = {to_opt[n]: e for n, e in named["state"].items()}
        groups = [{**g, "params": []} for g in named["param_groups"]] or [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        if state:
            self.optimizer.load_full_state_dict({"state": state, "param_groups": groups})

    # ---- LoRA views of the same weights -----------------------------------------------------------------

    @contextmanager
    def merged_weights(self) -> Iterator[None]:
        """Inside, the chunks hold merged weights W + (alpha / r) B A under the base names and show no adapter
        parameters: run a refit / export stream (rollout.refit.training_weights_to_hf, core.bridge.save_hf)
        to completion inside. W is restored exactly on exit. A no-op without LoRA. Local, no communication."""
        with merged_weights(self.chunks):
            yield

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Inside, forward_collect / forward_only compute the base model (the frozen reference policy)."""
        with adapters_disabled(self.chunks):
            yield
