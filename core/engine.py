"""ModelEngine: one rank's share of a GPTModel in any (tp, cp, ep, dp, pp, vpp) layout, with its optimizer.

It composes the core's pieces into what a training loop needs: build the chunks with layout-invariant
weights, wrap them for data parallelism (DDP on fp32 main grads; replicated AdamW or ZeRO-1), run one
optimizer step over micro-batches through the pipeline schedule with a caller-given loss, and save/load
checkpoints that reshard. A single process (groups=None) runs the same code with no communication, so
every layout is checked against it by the parity tests.

Step contract (as in Megatron): loss_fn returns the micro-batch's share of the step loss already
normalised by the GLOBAL number of loss tokens, so gradients are SUMmed over data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from core.config import OptimConfig, ParallelConfig
from core.distributed import DistributedDataParallel, build_optimizer, finalize_model_grads
from core.parallel.dims import Groups
from core.pipeline.layout import allreduce_tied_embedding_grads, build_embedding_group, build_stage_modules
from core.pipeline.schedules import get_schedule
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

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


@dataclass
class StepResult:
    loss: float  # mean loss over the step's loss tokens (all dp ranks, all micro-batches)
    grad_norm: float
    metrics: dict[str, float]


class ModelEngine:
    """Holds the chunks (DDP-wrapped), optimizer and groups of one rank; see the module docstring."""

    def __init__(
        self,
        config: TransformerConfig,
        parallel: ParallelConfig,
        optim: OptimConfig,
        groups: Groups | None,
        device: torch.device,
        full_state: dict[str, torch.Tensor],
        param_dtype: torch.dtype = torch.float32,
    ):
        self.config, self.parallel, self.groups, self.device = config, parallel, groups, device
        self.embedding_group = build_embedding_group(groups) if groups is not None else None
        self.chunks = self._build_chunks()
        load_full_weights(self.chunks, full_state, groups)
        for chunk in self.chunks:
            chunk.to(device=device, dtype=param_dtype)
        self.ddp = DistributedDataParallel(
            nn.ModuleList(self.chunks),
            groups.dp_cp_group if groups else None,
            expert_dp_group=groups.edp_group if groups else None,
            use_distributed_optimizer=parallel.distributed_optimizer,
        )
        self.optimizer = build_optimizer(self.ddp, optim, distributed=parallel.distributed_optimizer)
        self.schedule = get_schedule(parallel.pp, parallel.vpp)
        self._ckpt_names = checkpoint_names(self.chunks)

    def _build_chunks(self) -> list[GPTModel]:
        if self.groups is None:
            return [GPTModel(self.config)]
        return build_stage_modules(
            self.config, self.groups, self.parallel.vpp, self.groups.tp_group, self.embedding_group
        )

    # ---- training ---------------------------------------------------------------------------------------

    def train_step(
        self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, clip_grad: float
    ) -> StepResult:
        """Forward/backward over the micro-batches (pipelined), gradient sync, clipping, optimizer step."""
        self.optimizer.zero_grad()
        kwargs = {} if self.groups is None else {"groups": self.groups}
        # Reductions start once, after the last backward (DDP over all chunks; overlap within pp = 1 would
        # need per-chunk wrappers, see core/distributed).
        with self.ddp.no_sync():
            per_mb = self.schedule(
                model_chunks=self.chunks, micro_batches=list(micro_batches), loss_fn=loss_fn, **kwargs
            )
        self.ddp.finish_grad_sync()
        tp_group = self.groups.tp_group if self.groups else None
        finalize_model_grads([self.ddp], tp_group)
        allreduce_tied_embedding_grads(self.chunks, self.embedding_group)
        grad_norm = self.optimizer.clip_grad_norm_(
            clip_grad if clip_grad > 0 else 0.0,
            tp_group=tp_group,
            pp_group=self.groups.pp_group if self.groups else None,
            ep_group=self.groups.ep_group if self.groups else None,
        )
        self.optimizer.step()
        return StepResult(self._reduce_metric(per_mb, "loss_sum"), float(grad_norm), {})

    def _reduce_metric(self, per_mb: list[dict[str, torch.Tensor]], key: str) -> float:
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
        kwargs = {} if self.groups is None else {"groups": self.groups}
        for c in self.chunks:
            c.eval()
        per_mb = self.schedule(
            model_chunks=self.chunks,
            micro_batches=list(micro_batches),
            loss_fn=loss_fn,
            forward_only=True,
            **kwargs,
        )
        for c in self.chunks:
            c.train()
        return self._reduce_metric(per_mb, key)

    @torch.no_grad()
    def forward_collect(
        self, micro_batches: Sequence[MicroBatch], fn: LossFn
    ) -> list[dict[str, torch.Tensor]]:
        """Per-micro-batch outputs of fn(logits, micro_batch) -> (unused, {name: tensor}), in order.

        Outputs come back on the ranks of the last pipeline stage; other stages get an empty list. With tp
        they are whatever fn makes of the vocab-parallel logits (e.g. vocab_parallel_logprobs: full per
        token on every tp rank). This is how RL reads token logprobs, entropies or values out of any layout.
        """
        kwargs = {} if self.groups is None else {"groups": self.groups}
        for c in self.chunks:
            c.eval()
        try:
            return self.schedule(
                model_chunks=self.chunks,
                micro_batches=list(micro_batches),
                loss_fn=fn,
                forward_only=True,
                **kwargs,
            )
        finally:
            for c in self.chunks:
                c.train()

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
        by_opt_name = {self.optimizer.param_name[p]: self._ckpt_names[p] for p in self._ckpt_names}
        state = {by_opt_name[n]: e for n, e in full["state"].items()}  # master_param included: fp32 masters
        groups = [{**g, "params": [by_opt_name[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_template(self, path: str | Path) -> dict[str, Any]:
        shards = model_named_shards(self.chunks)
        return sharded_model_state(shards, self.groups) | optimizer_state_template(path, shards, self.groups)

    def finish_load(self, template: dict[str, Any]) -> None:
        """After dcp.load filled `template` (from load_template): push the optimizer state in."""
        named = named_state_from_template({k: v for k, v in template.items() if k.startswith("optim.")})
        to_opt = {self._ckpt_names[p]: self.optimizer.param_name[p] for p in self._ckpt_names}
        state = {to_opt[n]: e for n, e in named["state"].items()}
        groups = [{**g, "params": []} for g in named["param_groups"]] or [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        if state:
            self.optimizer.load_full_state_dict({"state": state, "param_groups": groups})
