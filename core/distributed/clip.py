"""Global gradient-norm clipping across tensor, pipeline, expert and (sharded) data parallelism.

The global norm is that of the single-process model's gradient: every element counted exactly once.
- tp: a param sharded over tp (`tp_dim` set) has a different slice on each tp rank: summed over tp. A
  param replicated over tp (`tp_dim` None or absent; its grad is identical on every tp rank) is counted
  on tp rank 0 only, then the same sum over tp includes it once.
- pp: each stage holds different layers: summed over pp.
- ep: expert params (`ep_dim`) hold different experts per ep rank: summed over ep; dense params are
  replicated over ep and not summed.
- dp: after an all-reduce every dp rank has the same grads: not summed. With the distributed optimizer
  each rank passes only its disjoint shard: pass dp_group (dense) and expert_dp_group (experts) to sum.
A group of None (or of size 1) is the identity. Every rank must call this (it is collective).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from core.distributed.buffers import group_rank, group_size, is_expert


def _sum_over(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squared elements in fp32 (a () tensor on device)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    return torch.stack(norms).square().sum()


def global_grad_norm(
    params: Sequence[nn.Parameter],
    grads: Sequence[torch.Tensor],
    *,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    expert_dp_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """L2 norm of the whole model's gradient; grads[i] is (this rank's part of) params[i]'s gradient."""
    device = device or (grads[0].device if grads else torch.device("cpu"))
    counted_on_this_tp_rank = group_rank(tp_group) == 0
    dense: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    for p, g in zip(params, grads, strict=True):
        if getattr(p, "tp_dim", None) is None and not counted_on_this_tp_rank:
            continue
        if getattr(p, "pipeline_tied_copy", False):  # the last stage's copy of a tied embedding: counted once
            continue
        (expert if is_expert(p) else dense).append(g)
    dense_sq = _sum_over(_sum_of_squares(dense, device), dp_group)
    expert_sq = _sum_over(_sum_over(_sum_of_squares(expert, device), expert_dp_group), ep_group)
    total_sq = _sum_over(_sum_over(dense_sq + expert_sq, tp_group), pp_group)
    return total_sq.sqrt()


def _grad_of(p: nn.Parameter) -> torch.Tensor | None:
    return p.main_grad if hasattr(p, "main_grad") else p.grad


@torch.no_grad()
def clip_grad_norm_(
    params: Sequence[nn.Parameter],
    max_norm: float,
    *,
    grads: Sequence[torch.Tensor] | None = None,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    expert_dp_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Scale grads in place so the global norm is at most max_norm; return the norm before clipping.

    grads defaults to each param's main_grad (DDP) or .grad. Same rule as torch.nn.utils.clip_grad_norm_:
    multiply by min(1, max_norm / (norm + 1e-6)), without a host sync. max_norm <= 0 only measures.
    A non-finite norm (inf/nan grads) propagates into the grads: skip such a step (see grad_scaler).
    """
    if grads is None:
        with_grad = [(p, _grad_of(p)) for p in params]
        params = [p for p, g in with_grad if g is not None]
        grads = [g for _, g in with_grad if g is not None]
    params, grads = list(params), list(grads)
    norm = global_grad_norm(
        params,
        grads,
        tp_group=tp_group,
        pp_group=pp_group,
        ep_group=ep_group,
        dp_group=dp_group,
        expert_dp_group=expert_dp_group,
        device=device,
    )
    if max_norm > 0 and grads:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm
