"""Finish a step's gradients (Megatron's finalize_model_grads): the data-parallel reduction (started
during the last backward of each chunk, waited for here), the tied-embedding sum over the first and last
pipeline stage, then the tensor-parallel sum of the sequence-parallel parameters' main_grads.

The tied-embedding sum runs AFTER the dp reduction, so the reduction can overlap backward at any pp. With
the distributed optimizer the reduce-scatter leaves each rank the dp-sum of its own chunk of every bucket
only; the engine gives the tied weight a bucket of its own (DistributedDataParallel(isolated_params=...)),
so its chunks depend only on its shape and a rank owns the same chunk of the embedding (first stage) as its
embedding-group peer owns of the output copy (last stage, same dp rank): summing the whole main_grad over
the pair makes every owned chunk exact (the unowned rest is never read). With a plain all-reduce either
order is exact: sums commute.

Under sequence parallelism each tp rank runs the norms (and row-parallel biases) on its own T/tp tokens,
so those replicated parameters (`sequence_parallel = True`) hold partial gradients that must be summed
over tp. DDP moves grads into main_grad during backward, so this works on main_grad (the tensor-parallel
package's allreduce_sequence_parallel_grads works on p.grad, for models not wrapped in DDP). The two
sums commute, so doing tp after dp is exact; with the distributed optimizer only each rank's shard is
meaningful before and after, which the sum over tp preserves (tp ranks share one buffer layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from core.distributed.buffers import group_size
from core.distributed.ddp import DistributedDataParallel
from core.pipeline.layout import allreduce_tied_embedding_grads, tied_embedding_weight


@torch.no_grad()
def allreduce_sequence_parallel_main_grads(
    ddp: DistributedDataParallel, tp_group: dist.ProcessGroup | None
) -> None:
    """Sum over tp the main_grads of params marked `sequence_parallel` (one all-reduce per dtype)."""
    if group_size(tp_group) == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in ddp.module.parameters():
        if getattr(p, "sequence_parallel", False) and hasattr(p, "main_grad"):
            by_dtype.setdefault(p.main_grad.dtype, []).append(p.main_grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=tp_group)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(summed.view_as(g))


def _model_chunks(ddp: DistributedDataParallel) -> list[nn.Module]:
    """The model chunks a DDP wraps: one module, or the chunks of an nn.ModuleList (ModelEngine)."""
    return list(ddp.module) if isinstance(ddp.module, nn.ModuleList) else [ddp.module]


def _allreduce_tied_embedding_main_grads(
    model_chunks: Sequence[DistributedDataParallel], embedding_group: dist.ProcessGroup | None
) -> None:
    chunks = [c for ddp in model_chunks for c in _model_chunks(ddp)]
    weight = tied_embedding_weight(chunks)
    if weight is None or embedding_group is None:
        return
    ddp = next(d for d in model_chunks if any(weight is p for p in d.module.parameters()))
    if ddp.use_distributed_optimizer and ddp.grad_buffer_of(weight).bucket_of[weight].params != [weight]:
        raise RuntimeError(
            "the tied embedding shares a gradient bucket under the distributed optimizer: its reduced chunks "
            "would not line up between the first and last stage; build the DDP with isolated_params=(weight,)"
        )
    allreduce_tied_embedding_grads(chunks, embedding_group)


def finalize_model_grads(
    model_chunks: Sequence[DistributedDataParallel],
    tp_group: dist.ProcessGroup | None = None,
    *,
    embedding_group: dist.ProcessGroup | None = None,
) -> None:
    """After the last micro-batch's backward: every chunk's dp sync, the tied-embedding sum over
    `embedding_group` (build_embedding_group; None at pp = 1 or off the first/last stage), then the
    sequence-parallel tp sum. With a distributed optimizer the tied weight must sit in its own bucket."""
    for chunk in model_chunks:
        chunk.finish_grad_sync()
    _allreduce_tied_embedding_main_grads(model_chunks, embedding_group)
    for chunk in model_chunks:
        allreduce_sequence_parallel_main_grads(chunk, tp_group)
