"""Layout transforms between our fused parameters and HF's separate ones.

Each works on a whole tensor or on any contiguous tensor-parallel shard of it (the fused layouts are
TP-invariant, see core/transformer/attention.py and mlp.py), along dim 0 for weights and biases alike.
"""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q (n_heads * d, ...), k/v (n_kv * d, ...) -> group-interleaved [q_g..., k_g, v_g] per kv group g."""
    n_kv = k.shape[0] // head_dim
    groups = [t.reshape(n_kv, -1, *t.shape[1:]) for t in (q, k, v)]  # (n_kv, rows per group, ...)
    return torch.cat(groups, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(
    qkv: torch.Tensor, head_dim: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv; group_size = n_heads // n_kv."""
    rows = (group_size + 2) * head_dim
    grouped = qkv.reshape(-1, rows, *qkv.shape[1:])  # (n_kv, rows, ...)
    q, k, v = grouped.split([group_size * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """gate/up (..., F at dim, ...) -> (..., 2F, ...) with rows pairwise-interleaved [g0, u0, g1, u1, ...]."""
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


def split_gate_up(gate_up: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of fuse_gate_up."""
    gate, up = gate_up.unflatten(dim, (-1, 2)).unbind(dim + 1)
    return gate, up
