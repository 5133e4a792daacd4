"""Context parallelism (CP): each rank of the cp group holds a slice of the sequence.

Layout (load-balanced, Megatron's): the global sequence of length T is cut into 2 * cp equal chunks and
cp rank r holds chunks r and 2 * cp - 1 - r, concatenated in that order, so every rank holds T / cp tokens.
Under a causal mask the early chunk is cheap and the late one expensive, so each rank does the same work.
With cp = 2, T = 8: rank 0 holds global tokens [0 1 6 7], rank 1 holds [2 3 4 5].

Every (B, T, ...) input of the model (input_ids, position_ids, attention_mask, segment_ids) and every
per-token target (labels, loss_mask) is split with `split_for_cp` on its sequence dim. Position ids are
GLOBAL positions (`split_for_cp` of the full row's position ids, or `cp_positions` for a plain row), so
RoPE and learned positions see the same angles as without CP. Labels must be shifted before the split
(the local chunks are not contiguous).

Attention: queries stay local; K and V (after RoPE) are all-gathered over the cp group into global order,
and the mask is built from the global indices of the local queries and of all keys (query i sees key j
iff j <= i, same document, key not padding). Memory per rank is O(T) for K/V and O(T / cp * T) for the
mask; the all-gather is not overlapped with compute.
Future work: a ring (send/recv) variant that overlaps the K/V exchange with attention on the previous
chunk and skips fully masked chunk pairs, and a flash kernel with per-document varlen instead of a mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from core.parallel.collectives import (
    all_gather_along_dim,
    group_rank,
    group_size,
    reduce_scatter_along_dim,
)


def _rank_major_chunks(cp: int) -> list[int]:
    """Global chunk ids in the order an all-gather of the local slices lays them out: (0, 2cp-1, 1, ...)."""
    return [chunk for rank in range(cp) for chunk in (rank, 2 * cp - 1 - rank)]


def _check_divisible(x: torch.Tensor, dim: int, cp: int) -> None:
    if x.shape[dim] % (2 * cp):
        raise ValueError(
            f"context parallelism needs the sequence length (dim {dim} of shape {tuple(x.shape)}) to be "
            f"divisible by 2 * cp = {2 * cp}: pad the batch to a multiple of {2 * cp}"
        )


def _reorder_chunks(x: torch.Tensor, dim: int, order: list[int]) -> torch.Tensor:
    """Cut x into len(order) chunks along dim and concatenate them as chunks[order[0]], chunks[order[1]], ..."""
    chunks = x.chunk(len(order), dim=dim)
    return torch.cat([chunks[i] for i in order], dim=dim)


def _to_global_order(x: torch.Tensor, dim: int, cp: int) -> torch.Tensor:
    """Rank-major (all-gathered) chunk order -> global order."""
    position = {chunk: i for i, chunk in enumerate(_rank_major_chunks(cp))}
    return _reorder_chunks(x, dim, [position[chunk] for chunk in range(2 * cp)])


def _to_rank_major(x: torch.Tensor, dim: int, cp: int) -> torch.Tensor:
    """Global chunk order -> rank-major order (rank 0's two chunks first), what reduce-scatter splits."""
    return _reorder_chunks(x, dim, _rank_major_chunks(cp))


# ---- layout helpers (no autograd through the collectives) ---------------------------------------------


def split_for_cp(x: torch.Tensor, dim: int, cp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """(..., T, ...) -> (..., T / cp, ...) along `dim`: this rank's chunks r and 2cp-1-r; identity for cp=1.

    A pure slice (differentiable, no communication): split batches and their global position ids with it.
    """
    cp = group_size(cp_group)
    if cp == 1:
        return x
    _check_divisible(x, dim, cp)
    rank = group_rank(cp_group)
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=dim)


def gather_from_cp(x: torch.Tensor, dim: int, cp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """(..., T / cp, ...) -> (..., T, ...) in global order: the inverse of split_for_cp (collective).

    Not differentiable (for masks, logits in tests, evaluation); inside the model use all_gather_kv_for_cp.
    """
    cp = group_size(cp_group)
    if cp == 1:
        return x
    return _to_global_order(all_gather_along_dim(x, dim, cp_group), dim, cp)


def cp_positions(
    seq_len: int, cp_group: dist.ProcessGroup | None, device: torch.device | None = None
) -> torch.Tensor:
    """(T / cp,) global indices of this rank's tokens in a row of global length seq_len."""
    return split_for_cp(torch.arange(seq_len, device=device), 0, cp_group)


# ---- K/V all-gather ------------------------------------------------------------------------------------


class _AllGatherFromCP(torch.autograd.Function):
    """forward: all-gather dim `dim` into global chunk order | backward: reduce-scatter dim `dim`"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return gather_from_cp(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Each rank's queries contribute a partial gradient to every key: sum them, keep our own chunks.
        grad = _to_rank_major(grad, ctx.dim, group_size(ctx.group))
        return reduce_scatter_along_dim(grad, ctx.dim, ctx.group), None, None


def all_gather_kv_for_cp(
    k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, n_kv, T / cp, d) local -> (B, n_kv, T, d) every key in global order; identity for cp=1.

    One collective for both (stacked on the head dim); the backward reduce-scatters their gradients.
    """
    if group_size(cp_group) == 1:
        return k, v
    kv = torch.cat([k, v], dim=1)  # (B, 2 * n_kv, T / cp, d)
    kv = _AllGatherFromCP.apply(kv, 2, cp_group)  # (B, 2 * n_kv, T, d)
    k, v = kv.chunk(2, dim=1)
    return k, v


# ---- attention mask ------------------------------------------------------------------------------------


def build_cp_attention_mask(
    local_len: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    sliding_window: int | None,
    cp_group: dist.ProcessGroup | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T / cp, T), True = may attend: local queries against all keys (collective).

    attention_mask, segment_ids (B, T / cp) are this rank's split; they are gathered for the keys. Same
    contract as attention.build_attention_mask, in global positions: causal, sliding window, no attention
    to padding or across documents, and every query sees itself (padding rows stay finite).
    """
    cp = group_size(cp_group)
    q = cp_positions(local_len * cp, cp_group, device)[:, None]  # (T / cp, 1)
    k = torch.arange(local_len * cp, device=device)[None, :]  # (1, T)
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (q - k < sliding_window)
    mask = mask[None, None]  # (1, 1, T / cp, T)
    if attention_mask is not None:
        keys_valid = gather_from_cp(
            attention_mask.to(torch.uint8), 1, cp_group
        ).bool()  # (B, T); gloo has no bool
        mask = mask & keys_valid[:, None, None, :]
    if segment_ids is not None:
        key_segments = gather_from_cp(segment_ids, 1, cp_group)  # (B, T)
        mask = mask & (segment_ids[:, None, :, None] == key_segments[:, None, None, :])
    return mask | (k == q)
