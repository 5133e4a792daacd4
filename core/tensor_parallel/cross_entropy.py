"""Losses over vocab-sharded logits (B, T, V / tp) that never gather the full vocabulary.

Each rank holds the logits of vocab ids [rank * V/tp, (rank + 1) * V/tp). Per token only (B, T)-sized
statistics cross the wire: the max (all-reduce MAX), then one all-reduce SUM of stacked sums.
Numerics: all math in fp32 whatever the logits dtype; results are fp32 (B, T); gradients come back in
the logits dtype. Memory: the backward recomputes the softmax from the saved input logits instead of
saving an fp32 softmax (one extra exp pass, no fp32 copy kept for bf16 logits).
With tp_group=None (or size 1) the collectives are skipped: the same math on full logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from core.parallel.collectives import all_reduce, group_rank

_FP32_MIN = torch.finfo(torch.float32).min


def _log_normalizer(logits_local: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """Shifted fp32 logits z = logits - max (..., V/tp) and the max (...,) over the full vocab."""
    z = logits_local.to(torch.float32, copy=True)
    vmax = all_reduce(z.max(dim=-1).values, group, op=dist.ReduceOp.MAX)  # (...)
    z.sub_(vmax.unsqueeze(-1))
    return z, vmax


def _local_target(
    target: torch.Tensor, v_local: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, ...]:
    """(index into this rank's vocab shard, mask of tokens whose target is in the shard), both (...)."""
    local = target - group_rank(group) * v_local
    inside = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), inside


def _target_logit(z: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """z[..., target] where this rank holds target, else 0: (...). Summed over tp it is the full pick."""
    index, inside = _local_target(target, z.shape[-1], group)
    return z.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """forward: logsumexp - logit[target] via all-reduce MAX + one all-reduce SUM of (B, T) | backward: local"""

    @staticmethod
    def forward(ctx, logits_local, target, group, ignore_index):  # (..., V/tp), (...) -> (...)
        z, vmax = _log_normalizer(logits_local, group)
        picked = _target_logit(z, target, group)  # (...)
        sums = torch.stack([z.exp_().sum(dim=-1), picked], dim=-1)  # (..., 2); z now holds exp(z)
        sum_exp, picked = all_reduce(sums, group).unbind(-1)
        loss = sum_exp.log() - picked
        ignored = (
            target == ignore_index if ignore_index is not None else torch.zeros_like(target, dtype=torch.bool)
        )
        ctx.save_for_backward(logits_local, target, vmax + sum_exp.log(), ignored)
        ctx.group = group
        return loss.masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):  # (...) -> (..., V/tp)
        logits_local, target, log_norm, ignored = ctx.saved_tensors
        g = grad_loss.float().masked_fill(ignored, 0.0)  # (...)
        grad = (logits_local.float() - log_norm.unsqueeze(-1)).exp_().mul_(g.unsqueeze(-1))  # softmax * g
        index, inside = _local_target(target, logits_local.shape[-1], ctx.group)
        grad.scatter_add_(-1, index.unsqueeze(-1), -(g * inside).unsqueeze(-1))  # - onehot * g
        return grad.to(logits_local.dtype), None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """forward: H = logZ - E_p[z] via all-reduce MAX + one all-reduce SUM of (B, T) | backward: local"""

    @staticmethod
    def forward(ctx, logits_local, group):  # (..., V/tp) -> (...)
        z, vmax = _log_normalizer(logits_local, group)
        z.clamp_(min=_FP32_MIN)  # -inf logits (masked ids) would make 0 * -inf = nan below
        e = z.exp()  # (..., V/tp)
        sums = torch.stack([e.sum(dim=-1), z.mul_(e).sum(dim=-1)], dim=-1)  # (..., 2): sum e, sum e*z
        sum_exp, sum_ez = all_reduce(sums, group).unbind(-1)
        entropy = sum_exp.log() - sum_ez / sum_exp
        ctx.save_for_backward(logits_local, vmax + sum_exp.log(), entropy)
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy):  # (...) -> (..., V/tp)
        logits_local, log_norm, entropy = ctx.saved_tensors
        # dH/dlogit_k = -p_k (log p_k + H)
        logp = (logits_local.float() - log_norm.unsqueeze(-1)).clamp_(min=_FP32_MIN)
        grad = logp.exp().mul_(logp.add_(entropy.unsqueeze(-1))).mul_(-grad_entropy.float().unsqueeze(-1))
        return grad.to(logits_local.dtype), None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    ignore_index: int | None = -100,
) -> torch.Tensor:
    """Per-token cross entropy (B, T) fp32 from vocab-sharded logits (B, T, V/tp) and targets (B, T) of
    full-vocab ids. Tokens with target == ignore_index get loss 0 and no gradient (like torch's)."""
    return _VocabParallelCrossEntropy.apply(logits_local, target, tp_group, ignore_index)


def vocab_parallel_logprobs(
    logits_local: torch.Tensor, target: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """log softmax(logits)[target]: (B, T) fp32, differentiable. Targets of -100 give 0."""
    return -vocab_parallel_cross_entropy(logits_local, target, tp_group)


def vocab_parallel_entropy(logits_local: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Entropy of softmax(logits) over the full vocabulary: (B, T) fp32, differentiable."""
    return _VocabParallelEntropy.apply(logits_local, tp_group)


@torch.no_grad()
def vocab_parallel_token_correct(
    logits_local: torch.Tensor, target: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """1.0 where the target is the argmax of the full-vocabulary logits, else 0.0: (B, T) fp32. Only (B, T)
    statistics cross the tp group (one MAX, one SUM). A tie with another token counts as correct. Reads the
    logits in their own dtype (no fp32 copy of the vocabulary: a training step logs it every micro-batch)."""
    vmax = all_reduce(logits_local.max(dim=-1).values.float(), tp_group, op=dist.ReduceOp.MAX)  # (...)
    index, inside = _local_target(target, logits_local.shape[-1], tp_group)
    picked = logits_local.gather(-1, index.unsqueeze(-1)).squeeze(-1).float().masked_fill(~inside, 0.0)
    return (all_reduce(picked, tp_group) >= vmax).to(torch.float32)
