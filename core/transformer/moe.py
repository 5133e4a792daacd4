"""Mixture of experts (Mixtral): softmax router, top-k, SwiGLU experts, load-balancing aux loss.

Experts are stacked parameters marked `ep_dim = 0` (expert parallelism shards that dim). They are not
tensor-parallel (tp_dim=None, Megatron's expert-tensor-parallel size 1): every TP rank holds whole experts,
so the block needs no TP communication. Expert compute is a loop over experts with index_select/index_add:
simple and exact, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.tensor_parallel import InitMethod, init_tp_param_, normal_init, scaled_normal_init
from core.transformer.config import TransformerConfig
from core.transformer.mlp import swiglu


def _param(shape: tuple[int, ...], init_method: InitMethod, ep_dim: int | None = None) -> nn.Parameter:
    """A parameter replicated over tp (tp_dim=None), drawn as init_tp_param_ draws (fp32 on CPU)."""
    p = nn.Parameter(torch.empty(shape))
    p.tp_dim = None
    if ep_dim is not None:
        p.ep_dim = ep_dim
    init_tp_param_(p, init_method, tp_group=None)
    return p


def load_balancing_loss(router_probs: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral aux loss: E * sum_e f_e * P_e over the tokens given.

    router_probs (N, E) softmax over all experts; top_idx (N, k) chosen experts. f_e is the fraction of tokens
    that have e among their top-k and P_e the mean router probability of e, so a uniform router gives k, as
    HF Mixtral's load_balancing_loss_func does for one layer.
    """
    chosen = F.one_hot(top_idx, num_experts).sum(1).float()  # (N, E), 1 where e is in the token's top-k
    return num_experts * (chosen.mean(0) * router_probs.mean(0)).sum()


class Router(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.top_k = config.moe_top_k
        self.norm_topk_prob = config.moe_norm_topk_prob
        self.weight = _param((config.num_experts, config.hidden_size), normal_init(config.init_std))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> probs (N, E) fp32, top_weights (N, k) fp32, top_idx (N, k)."""
        probs = F.linear(x, self.weight).float().softmax(dim=-1)
        top_weights, top_idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return probs, top_weights, top_idx


class Experts(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        E, H, F_ = config.num_experts, config.hidden_size, config.moe_ffn_hidden_size
        # w_gate_up rows are pairwise-interleaved gate/up, as in mlp.py.
        self.w_gate_up = _param((E, 2 * F_, H), normal_init(config.init_std), ep_dim=0)
        self.w_down = _param((E, H, F_), scaled_normal_init(config.init_std, config.num_layers), ep_dim=0)

    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """x (N, H), top_weights/top_idx (N, k) -> sum over chosen experts of weight * expert(x), (N, H)."""
        out = torch.zeros_like(x)
        for e in range(self.w_gate_up.shape[0]):
            token, slot = (top_idx == e).nonzero(as_tuple=True)  # (n_e,) each
            h = swiglu(F.linear(x.index_select(0, token), self.w_gate_up[e]))  # (n_e, F)
            y = F.linear(h, self.w_down[e]) * top_weights[token, slot, None].to(x.dtype)  # (n_e, H)
            out.index_add_(0, token, y)
        return out


class MoE(nn.Module):
    """After each forward, `aux_loss` holds the unscaled load-balancing loss of this layer's tokens."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = Router(config)
        self.experts = Experts(config)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); token_mask (B, T) 1 = token, 0 = padding (left out of the aux loss)."""
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        probs, top_weights, top_idx = self.router(flat)
        keep = slice(None) if token_mask is None else token_mask.reshape(-1).bool()
        self.aux_loss = load_balancing_loss(probs[keep], top_idx[keep], self.num_experts)
        return self.experts(flat, top_weights, top_idx).view(B, T, H)
