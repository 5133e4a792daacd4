"""Expert-parallel token dispatch: send each (token, expert) assignment to the ep rank owning the expert and
bring the expert outputs back.

With ep size P, ep rank r owns global experts [r * E/P, (r + 1) * E/P) (contiguous, like every `ep_dim` shard),
so sorting assignments by global expert also sorts them by destination rank. Dropless (no capacity factor):
the all-to-all splits are uneven and exchanged first, which costs one host sync per MoE layer (`.tolist()` of
the counts, as in Megatron's alltoall dispatcher). A rank may send or receive zero rows.

Flow for N local tokens and top-k routing (M = rows this rank receives, sum over sources):
    plan_dispatch  counts (E,) per global expert -> all-to-all -> counts (P, E/P) per (source, local expert)
    dispatch       x (N, H) -> copies sorted by expert (N*k, H) -> all-to-all -> (M, H), grouped by source
                   rank and, within a source, by local expert
    combine        expert outputs (M, H) -> all-to-all back -> (N*k, H) -> * router weight -> index_add (N, H)
Both all-to-alls are autograd functions, so gradients retrace the route: an expert's gradient holds the
contributions of every ep rank's tokens, and the router weights get theirs through `combine`.
With an ep group of None or size 1 the all-to-alls are the identity and the same code runs unsplit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.parallel.collectives import group_size


def all_to_all_rows(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Uneven all-to-all along dim 0 (not autograd): rows [sum(input_splits[:j]), ...+input_splits[j]) of
    x (sum(input_splits), ...) go to rank j; returns (sum(output_splits), ...), rank j's rows at offset
    sum(output_splits[:j])."""
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """forward: all-to-all dim 0 with (output_splits, input_splits) | backward: all-to-all with the splits swapped"""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return all_to_all_rows(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0: (sum(input_splits), ...) -> (sum(output_splits), ...)."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass(frozen=True)
class DispatchPlan:
    """Where this rank's N*k assignments go and what it receives (built by plan_dispatch)."""

    token_ids: torch.Tensor  # (N*k,) source token of each sent row; rows sorted by global expert (stable)
    weights: torch.Tensor  # (N*k,) router weight of each sent row, fp32, differentiable
    send_splits: list[int]  # (P,) rows sent to each ep rank
    recv_splits: list[int]  # (P,) rows received from each ep rank
    recv_expert: torch.Tensor  # (M,) local expert index (0 .. E/P - 1) of each received row


def _exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """send_counts (E,) rows for each global expert -> recv_counts (P, E/P): rows that source rank j sends to
    each of this rank's local experts."""
    P = group_size(group)
    if P == 1:
        return send_counts.view(1, -1)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # equal splits of E/P counts
    return recv_counts.view(P, -1)


def plan_dispatch(
    top_weights: torch.Tensor, top_idx: torch.Tensor, num_experts: int, ep_group: dist.ProcessGroup | None
) -> DispatchPlan:
    """top_weights (N, k) fp32, top_idx (N, k) global expert ids -> the plan (communicates the counts)."""
    N, k = top_idx.shape
    P = group_size(ep_group)
    if num_experts % P:
        raise ValueError(f"num_experts={num_experts} is not divisible by the ep group size {P}")
    expert = top_idx.reshape(-1)  # (N*k,), assignment i = token i // k, slot i % k
    order = expert.argsort(stable=True)  # (N*k,)
    send_counts = torch.bincount(expert, minlength=num_experts)  # (E,)
    recv_counts = _exchange_counts(send_counts, ep_group)  # (P, E/P)
    splits = torch.stack([send_counts.view(P, -1).sum(1), recv_counts.sum(1)]).tolist()  # one host sync
    local_experts = torch.arange(num_experts // P, device=top_idx.device).repeat(P)  # (P * E/P,)
    return DispatchPlan(
        token_ids=order // k,
        weights=top_weights.reshape(-1)[order],
        send_splits=splits[0],
        recv_splits=splits[1],
        recv_expert=local_experts.repeat_interleave(recv_counts.reshape(-1), output_size=sum(splits[1])),
    )


def dispatch(x: torch.Tensor, plan: DispatchPlan, ep_group: dist.ProcessGroup | None) -> torch.Tensor:
    """x (N, H) local tokens -> (M, H) the rows this rank's experts must process (plan.recv_expert says which)."""
    rows = x.index_select(0, plan.token_ids)  # (N*k, H), sorted by destination rank
    return all_to_all(rows, plan.recv_splits, plan.send_splits, ep_group)


def combine(
    expert_out: torch.Tensor, plan: DispatchPlan, num_tokens: int, ep_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """expert_out (M, H) -> (N, H): each token's sum over its k experts of router weight * expert output."""
    back = all_to_all(expert_out, plan.send_splits, plan.recv_splits, ep_group)  # (N*k, H)
    weighted = back * plan.weights.to(back.dtype).unsqueeze(-1)  # (N*k, H)
    out = back.new_zeros((num_tokens, back.shape[-1]))
    return out.index_add(0, plan.token_ids, weighted)  # (N, H)
