"""Preallocated KV cache: one fixed-size slot per running sequence, for continuous batching.

Layout per layer: k and v are (num_slots, n_kv_local, max_len, head_dim), the (B, heads, L, d) layout
SDPA reads, so the decode step attends to a plain view `k[:b, :, :L]` of the first b slots without any
gather. Memory: 2 * layers * num_slots * max_len * n_kv_local * head_dim * dtype size, allocated once.

Slots are handed out lowest index first, so the running sequences stay packed at the low end and a
decode step over slots [0, b) wastes little. Positions a sequence has not written yet may hold stale
values of an earlier occupant: every reader masks by the sequence's own length.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch


class SlotAllocator:
    """Free slot ids, lowest first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache: no free slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise RuntimeError(f"KV cache: slot {slot} is not allocated")
        heapq.heappush(self._free, slot)

    def reset(self) -> None:
        self._free = list(range(self.num_slots))


class KVCache:
    """K/V of every layer (keyed like GPTModel.layers) for num_slots sequences of up to max_len tokens."""

    def __init__(
        self,
        layer_keys: Iterable[str],
        num_slots: int,
        max_len: int,
        n_kv_local: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_slots, self.max_len = num_slots, max_len
        shape = (num_slots, n_kv_local, max_len, head_dim)
        # Zeros, not empty: slots that are read before ever being written (padding rows of a decode
        # batch) must hold finite values.
        self.k = {key: torch.zeros(shape, dtype=dtype, device=device) for key in layer_keys}
        self.v = {key: torch.zeros(shape, dtype=dtype, device=device) for key in layer_keys}
        self._rows = torch.arange(num_slots, device=device)
        self._heads = torch.arange(n_kv_local, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def write_prompt(self, layer: str, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots (B,), k/v (B, n_kv_local, T, d): positions [0, T) of each slot (padding included)."""
        T = k.shape[2]
        self.k[layer][:, :, :T].index_copy_(0, slots, k)
        self.v[layer][:, :, :T].index_copy_(0, slots, v)

    def token_index(self, positions: torch.Tensor, n_kv: int) -> torch.Tensor:
        """positions (b,) -> (b * n_kv,) rows of (slot i, head h, position positions[i]) in the flat
        (num_slots * n_kv * max_len, d) view of a layer's cache; the same for every layer."""
        b = positions.shape[0]
        heads = self._rows[:b, None] * n_kv + self._heads[None, :n_kv]  # (b, n_kv)
        return (heads * self.max_len + positions[:, None]).reshape(-1)

    def flat(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's k, v as (num_slots * n_kv * max_len, d) views (token_index's rows)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1])

    def write_token(self, layer: str, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """positions (b,), k/v (b, n_kv_local, 1, d): slot i gets its token at positions[i], i < b.
        No host sync (an index_put), so it can run inside a CUDA graph."""
        b, n_kv, _, d = k.shape
        # One plain index_copy_ per tensor (an advanced-index put with two index tensors is ~2x slower on GPU).
        index = self.token_index(positions, n_kv)
        k_flat, v_flat = self.flat(layer)
        k_flat.index_copy_(0, index, k.reshape(b * n_kv, d))
        v_flat.index_copy_(0, index, v.reshape(b * n_kv, d))

    def view(self, layer: str, num_rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of slots [0, num_rows) and positions [0, length): (num_rows, n_kv_local, length, d) views."""
        return self.k[layer][:num_rows, :, :length], self.v[layer][:num_rows, :, :length]

    def copy_prefix(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy positions [0, length) of slots src (n,) into slots dst (n,): the n samples of one prompt
        share its prefill."""
        for cache in (*self.k.values(), *self.v.values()):
            prefix = cache[:, :, :length]
            prefix.index_copy_(0, dst, prefix.index_select(0, src))
