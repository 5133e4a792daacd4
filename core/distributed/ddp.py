"""Data parallelism in the Megatron style: flat fp32 gradient buffers, bucketed reduction overlapped
with backward.

Numerics and contract
- `param.main_grad` (grad_dtype, fp32 by default, even for bf16/fp16 params) accumulates the gradient
  over micro-batches; `param.grad` is moved into it by a post-accumulate-grad hook and freed, so after
  backward `p.grad is None` and the optimizer reads `main_grad`.
- The reduction is a SUM over the data-parallel group: the training loop normalises its loss by the
  GLOBAL token count (all micro-batches, all dp ranks), so the sum of the ranks' gradients is the
  gradient of the global-batch loss. `average=True` divides by the dp size instead (for losses that are
  per-rank means). Expert params (`ep_dim`) are summed over `expert_dp_group`; with average=True they
  are also divided by the size of `dp_group` (each expert already saw the tokens of its ep peers).
- Under context parallelism pass the dp x cp group as `dp_group` (every cp rank saw other tokens).
- Communication: when the last grad of a bucket arrives (buckets in reverse parameter order), its
  async all-reduce (or, with `use_distributed_optimizer`, reduce-scatter: each rank then holds the sum
  only for its chunk of every bucket) is launched while backward continues; `finish_grad_sync()` waits.

Use: zero_grad_buffer(); backward of micro-batches 1..n-1 under no_sync(); backward of micro-batch n
(launches the buckets); finish_grad_sync(); optimizer step on main_grad.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from core.distributed.buffers import GradBuffer, group_size, is_expert


class DistributedDataParallel(nn.Module):
    """Wraps `module`; forward is the module's. state_dict/load_state_dict are the module's (no prefix)."""

    def __init__(
        self,
        module: nn.Module,
        dp_group: dist.ProcessGroup | None,
        *,
        expert_dp_group: dist.ProcessGroup | None = None,
        bucket_size_mb: float = 25.0,
        grad_dtype: torch.dtype = torch.float32,
        overlap: bool = True,
        average: bool = False,
        use_distributed_optimizer: bool = False,
        isolated_params: tuple[nn.Parameter, ...] = (),
    ):
        """isolated_params: each gets a gradient bucket of its own (the tied embedding at pp > 1, whose
        reduced chunks the first and last stage then sum pairwise; see core/distributed/finalize.py)."""
        super().__init__()
        self.module = module
        self.dp_group = dp_group
        self.expert_dp_group = expert_dp_group
        self.overlap = overlap
        self.use_distributed_optimizer = use_distributed_optimizer
        bucket_numel = int(bucket_size_mb * 2**20) // grad_dtype.itemsize
        self.grad_buffers = self._build_buffers(bucket_numel, grad_dtype, average, frozenset(isolated_params))
        self._buffer_of = {p: buf for buf in self.grad_buffers for p in buf.params}
        self._sync_enabled = True
        self._synced = False  # grads reduced and not zeroed since: a new backward would double-count
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._buffer_of]

    def _build_buffers(
        self, bucket_numel: int, grad_dtype: torch.dtype, average: bool, isolated: frozenset[nn.Parameter]
    ) -> list[GradBuffer]:
        """One buffer per (dense | expert, param dtype); params in reverse module order."""
        by_key: dict[tuple[bool, torch.dtype], list[nn.Parameter]] = {}
        for p in self.module.parameters():  # deduplicated: a tied weight appears once
            if not p.requires_grad:
                continue
            if not p.is_contiguous():
                raise ValueError(f"DDP needs contiguous parameters, got one with stride {p.stride()}")
            by_key.setdefault((is_expert(p), p.dtype), []).append(p)
        has_experts = any(expert for expert, _ in by_key)
        if has_experts and self.expert_dp_group is None and self.dp_group is not None:
            raise ValueError(
                "the module has expert parameters (ep_dim): pass expert_dp_group (Groups.edp_group)"
            )
        scale = 1.0 / group_size(self.dp_group) if average else 1.0
        return [
            GradBuffer(
                list(reversed(params)),
                self.expert_dp_group if expert else self.dp_group,
                grad_dtype=grad_dtype,
                bucket_numel=max(1, bucket_numel),
                reduce_scatter=self.use_distributed_optimizer,
                scale=scale,
                isolated=isolated,
            )
            for (expert, _), params in by_key.items()
        ]

    def grad_buffer_of(self, p: nn.Parameter) -> GradBuffer:
        if p not in self._buffer_of:
            raise KeyError(
                "parameter has no gradient buffer: not in this DDP's module, or requires_grad=False"
            )
        return self._buffer_of[p]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook: fold p.grad into the fp32 main_grad, free it, maybe launch a bucket."""
        if self._synced:
            raise RuntimeError(
                "backward after finish_grad_sync() without zero_grad_buffer(): the reduced gradients would "
                "be reduced again; call optimizer.zero_grad() (or ddp.zero_grad_buffer()) first"
            )
        p.main_grad.add_(p.grad)
        p.grad = None
        if self._sync_enabled:
            self._buffer_of[p].mark_ready(p, launch=self.overlap)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside only accumulates into main_grad (the non-final micro-batches)."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def finish_grad_sync(self) -> None:
        """Launch what backward did not (all of it with overlap=False) and wait: main_grad is reduced
        (with the distributed optimizer, only each rank's chunk of every bucket). Idempotent."""
        if self._synced:
            return
        for buf in self.grad_buffers:
            buf.finish()
        for buf in self.grad_buffers:
            buf.reset()
        self._synced = True

    def zero_grad_buffer(self) -> None:
        """Zero every main_grad (and p.grad) before the first micro-batch of a step."""
        for buf in self.grad_buffers:
            for bucket in buf.buckets:
                if bucket.handle is not None:
                    bucket.handle.wait()  # never zero under an in-flight collective
            buf.reset()
            buf.data.zero_()
        for p in self._buffer_of:
            p.grad = None
        self._synced = False

    @property
    def num_buckets(self) -> int:
        return sum(len(buf.buckets) for buf in self.grad_buffers)

    @property
    def num_buckets_launched(self) -> int:
        """Buckets whose reduction has started in the current backward (0 again after a sync)."""
        return sum(buf.num_launched for buf in self.grad_buffers)
