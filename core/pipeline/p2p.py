"""Point-to-point transfers between neighbouring pipeline stages (dist.batch_isend_irecv).

Two streams cross each link: activations flow forward (stage r -> r+1) and their gradients flow
backward (r+1 -> r). `pp_prev_rank`/`pp_next_rank` wrap around, so the interleaved schedule's hop from
the last stage's chunk v to the first stage's chunk v+1 is an ordinary "next" transfer.

Ragged micro-batches (RL batches have a different T per micro-batch): every activation is preceded by a
fixed-size int64 header [dtype code, ndim, *shape] in a first batch of ops; the payload follows in a
second batch. Gradients need no header: the gradient of an activation has that activation's shape and
dtype, and the stage receiving it kept the activation (`recv_next_like`).

Matching: NCCL pairs the sends and receives between two ranks in issue order (tags are ignored). With
pp = 2 the previous and the next stage are the same rank, so every batch issues activation ops before
gradient ops on both ends: rank a's [send act, send grad] to b then meet b's [recv act, recv grad].
NCCL: the current CUDA device must be set (torch.cuda.set_device) and the pp group's communicator must
exist before the first batch that leaves a rank out; the schedules run one pp all-reduce first for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from core.parallel.dims import Groups

# Header: [dtype code, ndim, d0, ..., d5]; activations are (B, T, H), 6 dims leave room.
_MAX_DIMS = 6
_HEADER_LEN = 2 + _MAX_DIMS
_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _encode_header(x: torch.Tensor) -> torch.Tensor:
    """(8,) int64 on x's device: dtype code, ndim, shape padded with zeros."""
    if x.dtype not in _DTYPES or x.dim() > _MAX_DIMS:
        raise ValueError(f"cannot send a {x.dtype} tensor of shape {tuple(x.shape)} between pipeline stages")
    dims = list(x.shape) + [0] * (_MAX_DIMS - x.dim())
    return torch.tensor([_DTYPES.index(x.dtype), x.dim(), *dims], dtype=torch.int64, device=x.device)


def _decode_header(header: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    code, ndim, *dims = header.tolist()  # one device->host copy per received activation
    return _DTYPES[code], tuple(dims[:ndim])


def _run(ops: list[dist.P2POp]) -> None:
    """Issue one batch of ops and wait for all of them."""
    if not ops:
        return
    for req in dist.batch_isend_irecv(ops):
        req.wait()


@dataclass(frozen=True)
class StageLinks:
    """This rank's two pipeline neighbours (global ranks) and the pp group the transfers run in."""

    prev_rank: int
    next_rank: int
    group: dist.ProcessGroup
    device: torch.device

    @classmethod
    def from_groups(cls, groups: Groups, device: torch.device) -> StageLinks:
        return cls(groups.pp_prev_rank, groups.pp_next_rank, groups.pp_group, device)

    def communicate(
        self,
        *,
        send_next: torch.Tensor | None = None,
        send_prev: torch.Tensor | None = None,
        recv_prev: bool = False,
        recv_next_like: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send an activation forward and/or a gradient backward; receive an activation from the previous
        stage and/or the gradient (shaped like `recv_next_like`) from the next one, all in one batch.

        Returns (activation from prev or None, gradient from next or None). The peers must issue the
        mirror call (their recv for each of our sends) at the same point of their schedules.
        """
        act_shape = self._exchange_headers(send_next, recv_prev)
        ops: list[dist.P2POp] = []
        act = grad = None
        if send_next is not None:  # activation stream first (see the module docstring)
            ops.append(self._op(dist.isend, send_next.detach().contiguous(), self.next_rank))
        if act_shape is not None:
            dtype, shape = act_shape
            act = torch.empty(shape, dtype=dtype, device=self.device)
            ops.append(self._op(dist.irecv, act, self.prev_rank))
        if send_prev is not None:
            ops.append(self._op(dist.isend, send_prev.contiguous(), self.prev_rank))
        if recv_next_like is not None:
            grad = torch.empty_like(recv_next_like, memory_format=torch.contiguous_format)
            ops.append(self._op(dist.irecv, grad, self.next_rank))
        _run(ops)
        return act, grad

    def _exchange_headers(
        self, send_next: torch.Tensor | None, recv_prev: bool
    ) -> tuple[torch.dtype, tuple[int, ...]] | None:
        """Send our activation's header forward, receive the previous stage's: its (dtype, shape)."""
        ops: list[dist.P2POp] = []
        if send_next is not None:
            ops.append(self._op(dist.isend, _encode_header(send_next), self.next_rank))
        header = None
        if recv_prev:
            header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
            ops.append(self._op(dist.irecv, header, self.prev_rank))
        _run(ops)
        return None if header is None else _decode_header(header)

    def _op(self, fn: Callable[..., Any], tensor: torch.Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(fn, tensor, peer, group=self.group)
