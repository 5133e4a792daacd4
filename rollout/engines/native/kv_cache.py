"""Paged KV cache: a pool of fixed-size blocks per layer, read and written through a block table.

Layout per layer: k and v are (num_blocks, n_kv_local, block_size, head_dim); the block table is
(num_rows, max_blocks_per_row) int32 on the device, row r listing the blocks of the sequence in row r
(a KV-cache "slot" of continuous batching; blocks.py keeps the host side). Position p of row r lives at
(table[r, p // block_size], :, p % block_size). Memory: 2 * layers * num_blocks * block_size * n_kv_local *
head_dim * dtype size, allocated once; a sequence holds only the blocks its tokens need.

Every index a forward uses is computed on the device from the table (no host sync), so a decode step reads
the table in place inside a CUDA graph; the host changes it between steps with one small copy
(`sync_table`). Positions a sequence has not written yet may hold stale values: every reader masks by the
sequence's own length.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

import torch

from rollout.engines.native.blocks import NULL_BLOCK


class SlotAllocator:
    """Free row ids, lowest first."""

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


class KVCache:
    """K/V blocks of every layer (keyed like GPTModel.layers) and the device block table of num_rows rows."""

    def __init__(
        self,
        layer_keys: Iterable[str],
        num_blocks: int,
        block_size: int,
        num_rows: int,
        max_blocks_per_row: int,
        n_kv_local: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_blocks, self.block_size, self.num_rows = num_blocks, block_size, num_rows
        self.max_len = max_blocks_per_row * block_size  # the longest sequence a row can hold
        shape = (num_blocks, n_kv_local, block_size, head_dim)
        # Zeros, not empty: the null block and unwritten positions are read (masked) and must be finite.
        self.k = {key: torch.zeros(shape, dtype=dtype, device=device) for key in layer_keys}
        self.v = {key: torch.zeros(shape, dtype=dtype, device=device) for key in layer_keys}
        self.block_table = torch.full(
            (num_rows, max_blocks_per_row), NULL_BLOCK, dtype=torch.int32, device=device
        )
        self._rows = torch.arange(num_rows, device=device)
        self._heads = torch.arange(n_kv_local, device=device)

    @property
    def device(self) -> torch.device:
        return self.block_table.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers, k and v."""
        return self.nbytes // self.num_blocks

    # ---- host -> device bookkeeping -----------------------------------------------------------

    def reset_table(self) -> None:
        self.block_table.fill_(NULL_BLOCK)

    def sync_table(self, rows: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Write the block lists of changed rows into the device table (NULL_BLOCK-padded), one copy."""
        if not rows:
            return
        width = self.block_table.shape[1]
        padded = [[row, *blocks] + [NULL_BLOCK] * (width - len(blocks)) for row, blocks in rows]
        new = to_device(torch.tensor(padded, dtype=torch.int32), self.device)  # (n, 1 + width)
        self.block_table.index_copy_(0, new[:, 0].long(), new[:, 1:])

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block src's K/V into block dst in every layer, for each (src, dst)."""
        if not copies:
            return
        pairs = to_device(torch.tensor(copies, dtype=torch.int64), self.device)  # (n, 2)
        src, dst = pairs[:, 0], pairs[:, 1]
        for cache in (*self.k.values(), *self.v.values()):
            cache.index_copy_(0, dst, cache.index_select(0, src))  # gathered first: a src may be a dst too

    # ---- device index math (no host sync) -----------------------------------------------------

    def token_index(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (b,) of rows [0, b) -> (b * n_kv,) rows of (block, head, offset) in a layer's flat
        (num_blocks * n_kv * block_size, d) view (`flat`); the same for every layer. A negative position
        (a row that sits the step out) writes to the null block."""
        b, bs = positions.shape[0], self.block_size
        clamped = positions.clamp(min=0)
        blocks = self.block_table[self._rows[:b], clamped // bs].long()  # (b,)
        blocks = torch.where(positions >= 0, blocks, NULL_BLOCK)
        heads = blocks[:, None] * self._heads.shape[0] + self._heads[None, :]  # (b, n_kv)
        return (heads * bs + (clamped % bs)[:, None]).reshape(-1)

    def chunk_index(self, rows: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """rows (B,), positions [start, start + length) -> (B * n_kv * length,) flat rows, ordered as a
        (B, n_kv, length, d) tensor's rows. Positions past a row's blocks map to the null block."""
        bs = self.block_size
        positions = torch.arange(start, start + length, device=rows.device)  # (T,)
        blocks = self.block_table.index_select(0, rows)[:, positions // bs].long()  # (B, T)
        heads = blocks[:, None, :] * self._heads.shape[0] + self._heads[None, :, None]  # (B, n_kv, T)
        return (heads * bs + (positions % bs)[None, None, :]).reshape(-1)

    def flat(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's k, v as (num_blocks * n_kv * block_size, d) views (token_index's rows)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1])

    def write(self, layer: str, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v (..., d) with index.numel() rows (token_index / chunk_index order) into the cache."""
        k_flat, v_flat = self.flat(layer)
        d = k_flat.shape[-1]
        k_flat.index_copy_(0, index, k.reshape(-1, d))
        v_flat.index_copy_(0, index, v.reshape(-1, d))

    def gather(self, layer: str, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of `rows` (b,) at positions [0, length) read through the table: (b, n_kv, length, d)
        copies (the SDPA path; the Triton kernel reads the blocks in place)."""
        return self.read(layer, self.chunk_index(rows, 0, length), rows.shape[0])

    def read(self, layer: str, index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v at `index` (chunk_index of num_rows rows) -> (num_rows, n_kv, L, d): one gather copy each,
        already in attention's layout. A decode step computes the index once and reads every layer with it."""
        k_flat, v_flat = self.flat(layer)
        shape = (num_rows, self._heads.shape[0], -1, k_flat.shape[-1])
        return k_flat.index_select(0, index).view(shape), v_flat.index_select(0, index).view(shape)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync (pinned, queued behind the stream's work)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
