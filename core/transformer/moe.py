"""Mixture of experts (Mixtral): softmax router, top-k, SwiGLU experts, load-balancing aux loss.

Experts are stacked parameters marked `ep_dim = 0`. With an expert-parallel group of size P, ep rank r holds
experts [r * E/P, (r + 1) * E/P) (params (E/P, ...)) and tokens travel to them by all-to-all
(core.transformer.token_dispatch); the router is replicated. Initialisation draws the full (E, ...) weight on
every rank and keeps the ep shard, so a seed gives the same full experts at any ep (and any tp).

Tensor parallelism: experts are not tp-sharded (tp_dim=None, Megatron's expert-tensor-parallel size 1). The
MoE input is replicated over tp, so every tp rank routes the same tokens, runs the same dispatch inside its own
ep group (ep groups pair equal tp ranks) and computes identical outputs; expert and router gradients are
therefore identical on every tp rank and need no tp reduction. Sharding experts over tp is a later
optimisation (it removes the tp-fold duplicate expert compute).

Gradient reduction contract (what DDP's expert_dp_group does): dense params, router included, are summed over
dp x cp like any dense param; expert params are summed over expert-data-parallel (edp) only. Each expert's
gradient already holds the contributions of every token its ep group routed to it (the all-to-all backward
brings them home), so it must NOT be reduced over ep.

Expert compute is a loop over local experts with index_select/index_add: simple and exact, not fast (a
grouped GEMM would take the received rows sorted by expert).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.parallel.collectives import group_size
from core.tensor_parallel import InitMethod, init_sharded_, init_tp_param_, normal_init, scaled_normal_init
from core.transformer.config import TransformerConfig
from core.transformer.mlp import swiglu
from core.transformer.token_dispatch import combine, dispatch, plan_dispatch


def _replicated_param(shape: tuple[int, ...], init_method: InitMethod) -> nn.Parameter:
    """A parameter replicated over tp and ep (tp_dim=None), drawn as init_tp_param_ draws (fp32 on CPU)."""
    p = nn.Parameter(torch.empty(shape))
    p.tp_dim = None
    init_tp_param_(p, init_method, tp_group=None)
    return p


def _expert_param(
    full_shape: tuple[int, ...], init_method: InitMethod, ep_group: dist.ProcessGroup | None
) -> nn.Parameter:
    """This ep rank's contiguous dim-0 shard (E/P, ...) of a full (E, ...) weight drawn on every rank."""
    local_shape = (full_shape[0] // group_size(ep_group), *full_shape[1:])
    p = nn.Parameter(torch.empty(local_shape))
    p.tp_dim, p.ep_dim = None, 0
    init_sharded_(p, full_shape, 0, ep_group, init_method)
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
        E, H = config.num_experts, config.hidden_size
        self.weight = _replicated_param((E, H), normal_init(config.init_std))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> probs (N, E) fp32, top_weights (N, k) fp32, top_idx (N, k)."""
        probs = F.linear(x, self.weight).float().softmax(dim=-1)
        top_weights, top_idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return probs, top_weights, top_idx


class Experts(nn.Module):
    """This ep rank's E/P SwiGLU experts: w_gate_up (E/P, 2F, H), w_down (E/P, H, F)."""

    def __init__(self, config: TransformerConfig, ep_group: dist.ProcessGroup | None = None):
        super().__init__()
        E, H, F_ = config.num_experts, config.hidden_size, config.moe_ffn_hidden_size
        if E % group_size(ep_group):
            raise ValueError(f"num_experts={E} is not divisible by the ep group size {group_size(ep_group)}")
        # w_gate_up rows are pairwise-interleaved gate/up, as in mlp.py.
        std = config.init_std
        self.w_gate_up = _expert_param((E, 2 * F_, H), normal_init(std), ep_group)
        self.w_down = _expert_param((E, H, F_), scaled_normal_init(std, config.num_layers), ep_group)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x (M, H) rows, expert_ids (M,) local expert of each row -> expert(row) (M, H).

        Every local expert runs, even on zero rows, so each expert param gets a gradient (zeros if unused):
        DDP's per-param grad hooks must fire on every rank.
        """
        out = torch.zeros_like(x)
        for e in range(self.w_gate_up.shape[0]):
            rows = (expert_ids == e).nonzero(as_tuple=True)[0]  # (m_e,)
            h = swiglu(F.linear(x.index_select(0, rows), self.w_gate_up[e]))  # (m_e, F)
            out.index_add_(0, rows, F.linear(h, self.w_down[e]))  # (m_e, H)
        return out


class MoE(nn.Module):
    """After each forward, `aux_loss` holds the unscaled load-balancing loss of this layer's tokens.

    tp_group: experts are replicated over tp (see the module docstring), so the block communicates nothing
    over it; it is taken so that MoE and MLP are built alike. ep_group: the expert-parallel group
    (Groups.ep_group); None or size 1 keeps all experts on this rank.
    """

    def __init__(
        self,
        config: TransformerConfig,
        tp_group: dist.ProcessGroup | None = None,
        ep_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        self.num_experts = config.num_experts
        self.ep_group = ep_group
        self.router = Router(config)
        self.experts = Experts(config, ep_group)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); token_mask (B, T) 1 = token, 0 = padding (left out of the aux loss)."""
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        probs, top_weights, top_idx = self.router(flat)
        # Local tokens only: under dp/ep each rank balances its own micro-batch (Megatron's default). The
        # global-batch loss would compute f_e and P_e over all dp x cp tokens; since it is a product of two
        # means, it is not the mean of the per-rank losses (equal only if every rank routes alike).
        keep = slice(None) if token_mask is None else token_mask.reshape(-1).bool()
        self.aux_loss = load_balancing_loss(probs[keep], top_idx[keep], self.num_experts)
        plan = plan_dispatch(top_weights, top_idx, self.num_experts, self.ep_group)
        expert_out = self.experts(dispatch(flat, plan, self.ep_group), plan.recv_expert)  # (M, H)
        return combine(expert_out, plan, B * T, self.ep_group).view(B, T, H)
