"""How a worker group splits a batch over its data-parallel ranks and joins their results (pure, no Ray).

A batch is split into `dp` contiguous shards. Every rank with the same dp rank (its tp/cp/pp peers) gets the
same shard: tp ranks need identical inputs, cp ranks split the sequence themselves, and pipeline stages all
see the micro-batch schedule. Each shard's result is read from one "output rank": tp rank 0, cp rank 0, last
pipeline stage (where the loss and logprobs live). Results are joined in dp order, so rows come back in the
order they went in.
"""

from __future__ import annotations

from typing import Any

import torch

from core.errors import InputError
from core.parallel.dims import ParallelDims, rank_coords


def batch_size(batch: Any) -> int:
    """Rows in a batch: a tensor (dim 0), a list/tuple, or a dict of those (all the same length)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, list | tuple):
        return len(batch)
    if isinstance(batch, dict):
        sizes = {key: batch_size(value) for key, value in batch.items()}
        if len(set(sizes.values())) != 1:
            raise InputError(f"a dp-dispatched batch needs one row count for every key, got {sizes}")
        return next(iter(sizes.values()))
    raise InputError(
        f"dp dispatch splits a tensor, a list or a dict of those along rows, got {type(batch).__name__}"
    )


def _shard_bounds(rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) per shard; the first `rows % num_shards` shards get one row more."""
    base, extra = divmod(rows, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _take(batch: Any, start: int, end: int) -> Any:
    if isinstance(batch, dict):
        return {key: _take(value, start, end) for key, value in batch.items()}
    return batch[start:end]


def split_batch(batch: Any, num_shards: int) -> list[Any]:
    """`num_shards` contiguous shards of `batch` (a tensor, list or dict of those), in order."""
    rows = batch_size(batch)
    if rows < num_shards:
        raise InputError(f"a batch of {rows} rows cannot be split over dp={num_shards} ranks")
    return [_take(batch, start, end) for start, end in _shard_bounds(rows, num_shards)]


def is_output_rank(dims: ParallelDims, rank: int) -> bool:
    c = rank_coords(dims, rank)
    return c.tp == 0 and c.cp == 0 and c.pp == dims.pp - 1


def output_ranks(dims: ParallelDims) -> list[int]:
    """One rank per dp shard, in dp order: the rank whose result stands for the shard."""
    ranks = [r for r in range(dims.world_size) if is_output_rank(dims, r)]
    return sorted(ranks, key=lambda r: rank_coords(dims, r).dp)


def dp_rank_of(dims: ParallelDims, rank: int) -> int:
    return rank_coords(dims, rank).dp


def concat_results(results: list[Any]) -> Any:
    """Join per-shard results in order: tensors along dim 0, lists end to end, dicts key by key;
    anything else (a float metric, None) comes back as the list of per-shard values."""
    first = results[0]
    if all(isinstance(r, torch.Tensor) and r.dim() > 0 for r in results):
        return torch.cat(results)
    if all(isinstance(r, list) for r in results):
        return [item for r in results for item in r]
    if all(isinstance(r, dict) for r in results) and all(r.keys() == first.keys() for r in results):
        return {key: concat_results([r[key] for r in results]) for key in first}
    return list(results)
