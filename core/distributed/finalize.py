"""Finish a step's gradients: data-parallel reduction, then the tensor-parallel sum of the
sequence-parallel parameters' main_grads.

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

from core.distributed.buffers import group_size
from core.distributed.ddp import DistributedDataParallel


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


def finalize_model_grads(
    model_chunks: Sequence[DistributedDataParallel], tp_group: dist.ProcessGroup | None = None
) -> None:
    """After the last micro-batch's backward: every chunk's dp sync, then the sequence-parallel tp sum."""
    for chunk in model_chunks:
        chunk.finish_grad_sync()
    for chunk in model_chunks:
        allreduce_sequence_parallel_main_grads(chunk, tp_group)
