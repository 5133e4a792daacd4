"""Data parallelism: DDP with bucketed, overlapped gradient reduction into fp32 main_grad buffers;
AdamW on fp32 master weights (replicated, or ZeRO-1 sharded over dp); global grad-norm clipping;
dynamic loss scaling for fp16."""

from core.distributed.clip import clip_grad_norm_, global_grad_norm
from core.distributed.ddp import DistributedDataParallel
from core.distributed.finalize import allreduce_sequence_parallel_main_grads, finalize_model_grads
from core.distributed.grad_scaler import DynamicGradScaler
from core.distributed.optimizer import (
    DistributedOptimizer,
    MainGradAdamW,
    build_optimizer,
    weight_decay_groups,
)

__all__ = [
    "DistributedDataParallel",
    "DistributedOptimizer",
    "DynamicGradScaler",
    "MainGradAdamW",
    "allreduce_sequence_parallel_main_grads",
    "build_optimizer",
    "clip_grad_norm_",
    "finalize_model_grads",
    "global_grad_norm",
    "weight_decay_groups",
]
