"""Losses over vocab-sharded logits (B, T, V / tp) that never gather the full vocabulary.

Each rank holds the logits of vocab ids [rank * V/tp, (rank + 1) * V/tp). Per token only (B, T)-sized
statistics cross the wire: the max (all-reduce MAX), then one all-reduce SUM of stacked sums.
Numerics: all math in fp32 whatever the logits dtype; results are fp32 (B, T); gradients come back in
the logits dtype. Memory: the backward recomputes the softmax from the saved input logits instead of
saving an fp32 softmax (one extra exp pass, no fp32 copy kept for bf16 logits).
With tp_group=None (or size 1) the collectives are skipped: the same math on full logits.
"""

from __future__ import annotations

import math

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


# ---- distillation: divergences between a student's and a frozen teacher's vocab-sharded logits ------------
#
# p = softmax(teacher / tau), q = softmax(student / tau), both over the full vocabulary (or, with top_k, over
# the teacher's k largest logits, both renormalised there). Per token (B, T) fp32, scaled by tau^2 (Hinton):
#   forward KL(p || q) = sum p (log p - log q)
#   reverse KL(q || p) = sum q (log q - log p)
#   jsd(beta)          = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD's)
# Communication: all-reduce MAX of (..., 2) maxima, SUM of (..., 2) normalisers, SUM of (..., 2) loss sums;
# with top_k also an all-gather of (..., k) teacher values per rank (the threshold). Never the vocabulary.
# Backward (local, no communication): every divergence here is L(q) with dL/dq_j = g_j, so through the
# softmax dL/ds_k = q_k (g_k - sum_j q_j g_j), and sum_j q_j g_j is a saved (B, T) statistic:
#   forward: g = -p/q       -> q - p
#   reverse: g = log q/p + 1 -> q (log q - log p - KL(q || p))
#   jsd:     g = (1 - beta) log q/m -> q (1 - beta) (log q - log m - KL(q || m))

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _topk_threshold(teacher_local: torch.Tensor, k: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The k-th largest teacher logit over the full vocab: (...). Gathers k values per rank, not the vocab."""
    from core.parallel.collectives import all_gather_along_dim

    local = teacher_local.float().topk(min(k, teacher_local.shape[-1]), dim=-1).values  # (..., k')
    pooled = all_gather_along_dim(local, local.dim() - 1, group)  # (..., k' * tp)
    return pooled.topk(k, dim=-1).values[..., -1]


def _divergence_logprobs(
    student_local: torch.Tensor,
    teacher_local: torch.Tensor,
    tau: float,
    threshold: torch.Tensor | None,
    group: dist.ProcessGroup | None,
    log_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(log q, log p, keep mask, log normalisers (..., 2)) on this shard, fp32 (..., V/tp); log q = log p =
    -inf outside the kept ids (the teacher's top k). log_norms given (backward): no communication."""
    s = student_local.float() / tau
    t = teacher_local.float() / tau
    keep = teacher_local.float() >= threshold.unsqueeze(-1) if threshold is not None else None
    if keep is not None:
        s, t = s.masked_fill(~keep, float("-inf")), t.masked_fill(~keep, float("-inf"))
    if log_norms is None:
        vmax = all_reduce(torch.stack([s.amax(-1), t.amax(-1)], -1), group, op=dist.ReduceOp.MAX)  # (..., 2)
        sums = torch.stack(
            [(s - vmax[..., :1]).exp().sum(-1), (t - vmax[..., 1:]).exp().sum(-1)], -1
        )  # (..., 2)
        log_norms = vmax + all_reduce(sums, group).log()
    return s - log_norms[..., :1], t - log_norms[..., 1:], keep, log_norms


def _kept(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x with the dropped ids (0 * -inf there) set to 0."""
    return x if keep is None else x.masked_fill(~keep, 0.0)


def _log_mixture(logq: torch.Tensor, logp: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta p + (1 - beta) q), elementwise."""
    return torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))


class _VocabParallelDivergence(torch.autograd.Function):
    """forward: divergence via all-reduce MAX + SUM of (B, T) statistics | backward: local"""

    @staticmethod
    def forward(ctx, student_local, teacher_local, kind, tau, beta, threshold, group):  # (..., V/tp) -> (...)
        logq, logp, keep, log_norms = _divergence_logprobs(
            student_local, teacher_local, tau, threshold, group
        )
        q, p = logq.exp(), logp.exp()
        if kind == "forward_kl":
            first, second = _kept(p * (logp - logq), keep), torch.zeros_like(p)
        elif kind == "reverse_kl":
            first, second = _kept(q * (logq - logp), keep), torch.zeros_like(q)
        else:
            logm = _log_mixture(logq, logp, beta)
            first, second = _kept(p * (logp - logm), keep), _kept(q * (logq - logm), keep)
        local = torch.stack([first.sum(-1), second.sum(-1)], -1)  # (..., 2); jsd: KL(p || m), KL(q || m)
        sums = all_reduce(local, group)  # (..., 2)
        loss = sums[..., 0] if kind != "jsd" else beta * sums[..., 0] + (1 - beta) * sums[..., 1]
        ctx.save_for_backward(student_local, teacher_local, threshold, log_norms, sums)
        ctx.kind, ctx.tau, ctx.beta, ctx.has_threshold = kind, tau, beta, threshold is not None
        return loss * tau**2

    @staticmethod
    def backward(ctx, grad_loss):  # (...) -> (..., V/tp)
        student_local, teacher_local, threshold, log_norms, sums = ctx.saved_tensors
        threshold = threshold if ctx.has_threshold else None
        logq, logp, keep, _ = _divergence_logprobs(
            student_local, teacher_local, ctx.tau, threshold, None, log_norms
        )
        q = logq.exp()
        if ctx.kind == "forward_kl":
            grad = q - logp.exp()
        elif ctx.kind == "reverse_kl":
            grad = q * _kept(logq - logp - sums[..., :1], keep)
        else:
            logm = _log_mixture(logq, logp, ctx.beta)
            grad = q * (1 - ctx.beta) * _kept(logq - logm - sums[..., 1:], keep)
        grad = grad * (ctx.tau * grad_loss.float()).unsqueeze(-1)  # d(s / tau) and the tau^2 scale
        return grad.to(student_local.dtype), None, None, None, None, None, None


def vocab_parallel_divergence(
    student_local: torch.Tensor,
    teacher_local: torch.Tensor,
    kind: str,
    tp_group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-token distillation loss (B, T) fp32 (times temperature^2) from vocab-sharded student and teacher
    logits (B, T, V/tp) of the same vocabulary: kind forward_kl, reverse_kl or jsd (beta in (0, 1): the
    teacher's weight in the mixture). top_k: only the teacher's k largest logits per token (ties at the
    k-th included), both distributions renormalised over them. Gradients flow to the student only."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choices: {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (0: forward_kl, 1: reverse_kl)")
    teacher_local = teacher_local.detach()
    threshold = _topk_threshold(teacher_local, top_k, tp_group) if top_k is not None else None
    return _VocabParallelDivergence.apply(
        student_local, teacher_local, kind, float(temperature), float(beta), threshold, tp_group
    )
