"""Contiguous gradient buffers and their buckets: the memory and communication layout of DDP.

One GradBuffer holds the gradients of parameters that share a reduction group and a dtype:

    data (N,) grad_dtype:  [ bucket 0 | bucket 1 | ... ]

Buckets take parameters in REVERSE module order (the last layers' gradients are ready first in
backward), a parameter never straddles two buckets, and each `param.main_grad` is a view of its
slice. Every parameter starts on a multiple of ALIGN elements and every bucket is padded to a multiple
of ALIGN * dp, so a bucket splits into dp equal, aligned chunks: rank r of the reduction group owns
chunk r of every bucket (the distributed optimizer's shard). Padding is zero and stays zero.

A bucket is reduced with one collective: an all-reduce (every rank gets the sum), or with the
distributed optimizer an in-place reduce-scatter (only this rank's chunk holds the sum afterwards;
the rest of the bucket is stale partial sums that nobody reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

# Re-exported for the other core.distributed modules (one definition, in core.parallel.collectives).
from core.parallel.collectives import all_gather_single, group_rank, group_size, reduce_scatter_single  # noqa: F401

ALIGN = 64  # elements: 256 B for fp32, keeps every main_grad and every shard vector-aligned


def is_expert(p: nn.Parameter) -> bool:
    """Expert parameters (marked `ep_dim`) are sharded over ep and reduced over expert-data-parallel."""
    return getattr(p, "ep_dim", None) is not None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(eq=False)
class Bucket:
    """Parameters whose gradients are reduced by one collective: buffer elements [start, end)."""

    index: int
    params: list[nn.Parameter]
    start: int
    end: int  # padded: (end - start) % (ALIGN * dp) == 0
    data: torch.Tensor  # (end - start,) view of the buffer
    ready: set[nn.Parameter] = field(default_factory=set)  # grads accumulated in this backward
    launched: bool = False
    handle: dist.Work | None = None

    @property
    def numel(self) -> int:
        return self.end - self.start

    def chunk(self, rank: int, dp_size: int) -> tuple[int, int]:
        """Buffer offsets [lo, hi) of `rank`'s chunk of this bucket."""
        size = self.numel // dp_size
        return self.start + rank * size, self.start + (rank + 1) * size


class GradBuffer:
    """Flat gradient storage for `params` (given in bucket order) reduced over `group`.

    scale multiplies each bucket before its SUM collective (1/dp to average; 1.0 to sum).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        group: dist.ProcessGroup | None,
        *,
        grad_dtype: torch.dtype,
        bucket_numel: int,
        reduce_scatter: bool,
        scale: float = 1.0,
        isolated: frozenset[nn.Parameter] = frozenset(),
    ):
        self.params = params
        self.group = group
        self.dp_size, self.dp_rank = group_size(group), group_rank(group)
        self.param_dtype = params[0].dtype
        self.reduce_scatter = reduce_scatter
        self.scale = scale
        self.param_range: dict[nn.Parameter, tuple[int, int]] = {}  # buffer offsets [start, end)
        spans = self._layout(bucket_numel, isolated)
        self.data = torch.zeros(spans[-1][2] if spans else 0, dtype=grad_dtype, device=params[0].device)
        self.buckets = [
            Bucket(i, ps, start, end, self.data[start:end]) for i, (ps, start, end) in enumerate(spans)
        ]
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        for p, (start, end) in self.param_range.items():
            p.main_grad = self.data[start:end].view(p.shape)

    def _layout(
        self, bucket_numel: int, isolated: frozenset[nn.Parameter]
    ) -> list[tuple[list[nn.Parameter], int, int]]:
        """Place params (aligned) and close a bucket once it holds >= bucket_numel elements. An `isolated`
        param gets a bucket of its own, starting at the bucket start: its dp chunks then depend only on its
        shape, so ranks whose buffers differ elsewhere (first and last pipeline stage) own the same chunk."""
        pad_to = ALIGN * self.dp_size
        spans: list[tuple[list[nn.Parameter], int, int]] = []
        current: list[nn.Parameter] = []
        bucket_start = offset = 0
        for p in self.params:
            if p in isolated and current:  # close the open bucket first
                offset = _round_up(offset, pad_to)
                spans.append((current, bucket_start, offset))
                current, bucket_start = [], offset
            offset = _round_up(offset, ALIGN)
            self.param_range[p] = (offset, offset + p.numel())
            offset += p.numel()
            current.append(p)
            if offset - bucket_start >= bucket_numel or p in isolated:
                offset = _round_up(offset, pad_to)
                spans.append((current, bucket_start, offset))
                current, bucket_start = [], offset
        if current:
            offset = _round_up(offset, pad_to)
            spans.append((current, bucket_start, offset))
        return spans

    # ---- backward-time bookkeeping ----------------------------------------------------------------

    def mark_ready(self, p: nn.Parameter, launch: bool) -> None:
        """Record that p's gradient for this backward is in main_grad; launch its bucket when full."""
        bucket = self.bucket_of[p]
        if bucket.launched:
            raise RuntimeError(
                "a gradient arrived after its bucket was already reduced (parameter used in two backward "
                "passes of the synchronising micro-batch?): run the earlier ones under ddp.no_sync()"
            )
        bucket.ready.add(p)
        if launch and len(bucket.ready) == len(bucket.params):
            self.launch(bucket)

    def launch(self, bucket: Bucket) -> None:
        """Start the bucket's async SUM collective over the group (in place in the buffer)."""
        bucket.launched = True
        if self.scale != 1.0:
            bucket.data.mul_(self.scale)
        if self.dp_size == 1:
            return
        if self.reduce_scatter:
            lo, hi = bucket.chunk(self.dp_rank, self.dp_size)
            bucket.handle = reduce_scatter_single(
                self.data[lo:hi], bucket.data, group=self.group, async_op=True
            )
        else:
            bucket.handle = dist.all_reduce(bucket.data, group=self.group, async_op=True)

    def finish(self) -> None:
        """Launch the buckets not launched yet (unused params, overlap off) and wait for all."""
        for bucket in self.buckets:
            if not bucket.launched:
                self.launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.handle = None

    def reset(self) -> None:
        """Forget readiness/launch state (after a sync) without touching the gradients."""
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.launched = False
            bucket.handle = None

    @property
    def num_launched(self) -> int:
        return sum(b.launched for b in self.buckets)
