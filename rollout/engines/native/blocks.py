"""Host-side bookkeeping of the paged KV cache: which blocks each row (a running sequence) holds.

The cache's memory is a pool of fixed-size blocks of `block_size` token positions; a sequence holds the
blocks its tokens so far need, listed in order in its row of the block table (position p lives in entry
p // block_size at offset p % block_size). So memory follows the tokens actually held, not max_model_len.

Sharing: the n samples of one prompt hold the same prompt blocks, each block refcounted. A sample that is
about to write into a block others also hold first gets its own copy (copy-on-write): in practice only the
prompt's last, partly filled block is ever copied (once per sample that writes its first generated token
there, the last holder writing in place), full prompt blocks stay shared until their last holder frees them.

Block 0 is the null block, never handed out: table entries beyond a row's blocks point to it, so the
writes that padding makes (right-padded prefill rows, idle rows of a decode batch) land there and touch no
sequence's keys. Nothing reads it unmasked.
"""

from __future__ import annotations

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """The pool has no free block: the scheduler preempts a sequence and retries."""


class BlockAllocator:
    """Refcounted block ids 1 .. num_blocks - 1 (0 is the null block); lowest ids first on a fresh pool."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a paged KV cache needs >= 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack: pop() gives the lowest id first
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("KV cache: no free block")
        block = self._free.pop()
        self.refcount[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def share(self, block: int) -> None:
        """One more holder of an allocated block."""
        if self.refcount[block] < 1:
            raise RuntimeError(f"KV cache: block {block} is not allocated")
        self.refcount[block] += 1

    def free(self, block: int) -> None:
        """One holder fewer; the block returns to the pool with its last holder."""
        if block == NULL_BLOCK or self.refcount[block] < 1:
            raise RuntimeError(f"KV cache: block {block} is not allocated")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)


class BlockTable:
    """Each row's block ids (host lists), a block allocator, and the rows whose device copy is stale.

    The device table (KVCache.block_table) is written from `rows` by KVCache.sync_table before every
    forward that reads it; rows that hold no sequence are all NULL_BLOCK there."""

    def __init__(self, num_blocks: int, block_size: int, num_rows: int, max_blocks_per_row: int):
        self.allocator = BlockAllocator(num_blocks)
        self.block_size, self.max_blocks_per_row = block_size, max_blocks_per_row
        self.rows: list[list[int]] = [[] for _ in range(num_rows)]
        self.dirty: set[int] = set()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, row: int, num_tokens: int) -> None:
        """Give an empty row fresh blocks for positions [0, num_tokens). All or nothing."""
        needed = self.blocks_for(num_tokens)
        if self.rows[row]:
            raise RuntimeError(f"KV cache: row {row} already holds blocks")
        if needed > self.max_blocks_per_row:
            raise RuntimeError(
                f"KV cache: {num_tokens} tokens exceed a row's {self.max_blocks_per_row} blocks"
            )
        if needed > self.allocator.num_free:
            raise OutOfBlocks(f"KV cache: {needed} blocks needed, {self.allocator.num_free} free")
        self.rows[row] = [self.allocator.allocate() for _ in range(needed)]
        self.dirty.add(row)

    def share(self, src: int, dst: int) -> None:
        """Empty row dst holds the same blocks as row src (a sample of src's prompt)."""
        if self.rows[dst]:
            raise RuntimeError(f"KV cache: row {dst} already holds blocks")
        for block in self.rows[src]:
            self.allocator.share(block)
        self.rows[dst] = list(self.rows[src])
        self.dirty.add(dst)

    def prepare_write(self, row: int, position: int) -> tuple[int, int] | None:
        """Make `position` of `row` writable: append a block when it starts a new one, copy a shared block
        (copy-on-write). Returns the (src, dst) block copy to make on the device, if any. Raises
        OutOfBlocks (nothing changed) when a block is needed and none is free."""
        blocks = self.rows[row]
        index = position // self.block_size
        if index > len(blocks):
            raise RuntimeError(f"KV cache: row {row} writes position {position} past its blocks")
        if index == len(blocks):
            blocks.append(self.allocator.allocate())
            self.dirty.add(row)
            return None
        shared = blocks[index]
        if self.allocator.refcount[shared] == 1:
            return None
        own = self.allocator.allocate()
        self.allocator.free(shared)  # only drops this row's reference: others still hold it
        blocks[index] = own
        self.dirty.add(row)
        return shared, own

    def free(self, row: int) -> None:
        """Release a row's blocks (each returns to the pool with its last holder)."""
        for block in self.rows[row]:
            self.allocator.free(block)
        self.rows[row] = []
        self.dirty.add(row)

    def take_dirty(self) -> list[tuple[int, list[int]]]:
        """(row, blocks) of every row changed since the last call."""
        out = [(row, self.rows[row]) for row in sorted(self.dirty)]
        self.dirty.clear()
        return out
