"""Causal self-attention with GQA, RoPE, optional qk-norm and biases, padding and packed-document masks.

Fused QKV layout (Megatron's group-interleaved layout). linear_qkv.weight has rows
    for g in range(num_kv_heads): [q heads of group g (num_attention_heads // num_kv_heads of them), k_g, v_g]
each head head_dim rows (the bias follows the same order). A contiguous row shard of size 1/tp holds whole
groups, so with num_kv_heads % tp == 0 every rank's shard is itself a valid fused QKV of num_kv_heads // tp
groups: the layout does not depend on tp, and neither does the code below.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    normal_init,
    scaled_normal_init,
    tp_size,
)
from core.transformer.config import TransformerConfig
from core.transformer.context_parallel import all_gather_kv_for_cp
from core.transformer.norm import RMSNorm
from core.transformer.rope import apply_rope

RopeCache = tuple[torch.Tensor, torch.Tensor]  # cos, sin each (B, 1, T, head_dim)

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the install
    BlockMask = None


def position_ids_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> position_ids (B, T) that restart at 0 wherever the segment id changes."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    return idx - start_idx


def build_attention_mask(
    seq_len: int,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, T), True = may attend; None when plain causal attention is exact.

    attention_mask (B, T): 1 = token, 0 = padding. segment_ids (B, T): document ids of packed rows; a query
    sees only keys of its own document. Every query also sees itself, so that padding rows (which see no
    token) give finite garbage instead of NaN; their outputs are meaningless and must be masked downstream.
    """
    window_matters = sliding_window is not None and sliding_window < seq_len
    if attention_mask is None and segment_ids is None and not window_matters:
        return None
    q = torch.arange(seq_len, device=device)[:, None]
    k = torch.arange(seq_len, device=device)[None, :]
    mask = k <= q  # (T, T)
    if window_matters:
        mask = mask & (q - k < sliding_window)
    mask = mask[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask | torch.eye(seq_len, dtype=torch.bool, device=device)


def flex_available(device: torch.device) -> bool:
    """Packed documents go through flex_attention on CUDA (a compiled flash-style kernel that skips the
    blocks no query of the document attends to); elsewhere through SDPA with a dense mask."""
    return BlockMask is not None and device.type == "cuda"


def document_block_mask(segment_ids: torch.Tensor, sliding_window: int | None = None) -> BlockMask:
    """flex_attention's BlockMask for packed rows: causal, same document (and within the window). The same
    attention as build_attention_mask(T, None, segment_ids, sliding_window), without a (B, 1, T, T) tensor."""
    B, T = segment_ids.shape

    def mask_mod(b, h, q, k):  # noqa: ANN001, ARG001
        keep = (k <= q) & (segment_ids[b, q] == segment_ids[b, k])
        return keep & (q - k < sliding_window) if sliding_window is not None else keep

    return create_block_mask(mask_mod, B, None, T, T, device=segment_ids.device)


_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """flex_attention, compiled once (eager flex is a slow reference that materialises the scores)."""
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


class SelfAttention(nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        tp_group: dist.ProcessGroup | None = None,
        cp_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        tp = tp_size(tp_group)
        self.cp_group = cp_group  # context parallel: local queries attend to K/V gathered over cp
        if config.num_kv_heads % tp:
            raise ValueError(
                f"num_kv_heads={config.num_kv_heads} is not divisible by tensor-parallel size {tp}"
            )
        self.head_dim = config.head_dim
        self.group_size = config.num_attention_heads // config.num_kv_heads  # q heads per kv head
        self.n_kv_local = config.num_kv_heads // tp
        self.n_heads_local = self.n_kv_local * self.group_size
        qkv_out = config.num_kv_heads * (self.group_size + 2) * config.head_dim
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size,
            qkv_out,
            bias=config.qkv_bias,
            tp_group=tp_group,
            init_method=normal_init(config.init_std),
            fp8=config.fp8,
        )
        self.linear_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            bias=config.attn_out_bias,
            tp_group=tp_group,
            init_method=scaled_normal_init(config.init_std, config.num_layers),
            fp8=config.fp8,
        )
        if config.qk_norm:
            # Each rank normalises only its own heads: the norm weights' gradients are summed over tp.
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps, partial_over=tp_group)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps, partial_over=tp_group)
        self.qk_norm = config.qk_norm

    def project_qkv(
        self, x: torch.Tensor, rope: RopeCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> q (B, n_heads_local, T, d), k and v (B, n_kv_local, T, d): projected, qk-normed
        and rotated, ready for attention. Generation engines call it to fill their KV cache."""
        B, T, _ = x.shape
        qkv = self.linear_qkv(x)  # (B, T, n_kv_local * (group_size + 2) * head_dim)
        qkv = qkv.view(B, T, self.n_kv_local, self.group_size + 2, self.head_dim)
        q, k, v = qkv.split([self.group_size, 1, 1], dim=3)
        q = q.reshape(B, T, self.n_heads_local, self.head_dim).transpose(1, 2)  # (B, n_heads_local, T, d)
        k = k.reshape(B, T, self.n_kv_local, self.head_dim).transpose(1, 2)  # (B, n_kv_local, T, d)
        v = v.reshape(B, T, self.n_kv_local, self.head_dim).transpose(1, 2)  # (B, n_kv_local, T, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(
        self, x: torch.Tensor, rope: RopeCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); mask from build_attention_mask (None: causal) or document_block_mask
        (a flex BlockMask), under CP from context_parallel.build_cp_attention_mask (B or 1, 1, T, T * cp),
        never None."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, rope)
        k, v = all_gather_kv_for_cp(k, v, self.cp_group)  # (B, n_kv_local, T * cp, d); identity for cp=1
        if mask is None:
            # Query head h reads kv head h // group_size (the fused layout above); flash attention does GQA.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif BlockMask is not None and isinstance(mask, BlockMask):
            out = _flex(q, k, v, mask)  # packed documents (document_block_mask)
        else:
            # CUDA's memory-efficient kernel (the one that takes a mask) has no GQA: repeat kv heads instead.
            k, v = k.repeat_interleave(self.group_size, dim=1), v.repeat_interleave(self.group_size, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_heads_local, T, d)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads_local * self.head_dim)
        return self.linear_proj(out)
