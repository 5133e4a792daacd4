"""Forward/backward schedules over micro-batches: no pipelining, 1F1B, and interleaved 1F1B.

Contract shared by every schedule (call the one get_schedule returns with keyword arguments):
- micro_batches: the same list on every pp rank, each a dict with input_ids, labels, loss_mask,
  position_ids, segment_ids (attention_mask optional), all (B, T); T may differ between micro-batches.
  The first stage embeds input_ids; every stage reads position_ids / segment_ids / attention_mask.
- loss_fn(logits (B, T, V/tp), micro_batch) -> (loss, metrics): runs on the last stage only. The caller
  normalises (e.g. sum of token losses / global token count): the schedule backprops the loss as is.
- MoE: each chunk's `aux_loss` (its share of the load-balancing loss) is scaled by 1 / num_micro_batches
  and backpropagated on the rank that computed it, together with the chunk's output.
- Gradients accumulate over micro-batches in param.grad (or main_grad under a DDP wrapper). Hooks for a
  DDP wrapper: every backward of chunk c but its last runs inside no_sync_func(c); on_last_backward(c)
  is called right after the last one (e.g. to start or finish that chunk's gradient reduction).
- forward_only: forwards under torch.no_grad, no backward. Returns the per-micro-batch metrics on the
  last stage (in micro-batch order), [] on other stages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from core.parallel.dims import Groups
from core.pipeline.layout import unwrap_model
from core.pipeline.p2p import StageLinks

MicroBatch = Mapping[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, Metrics]]
NoSyncFunc = Callable[[int], AbstractContextManager[Any]]
Schedule = Callable[..., list[Metrics]]

_STAGE_INPUTS = ("position_ids", "attention_mask", "segment_ids")


@dataclass
class _Stash:
    """One micro-batch in flight through one chunk, kept from its forward to its backward."""

    input: torch.Tensor | None  # received activation (B, T, H), requires grad; None on the embedding chunk
    output: torch.Tensor  # activation (B, T, H) sent on, or the scalar loss on the head chunk
    aux: torch.Tensor | None  # the chunk's MoE aux loss / num_micro_batches, if it has a graph


class _ChunkRunner:
    """Forward and backward of one micro-batch through one chunk, with metrics and DDP hooks."""

    def __init__(
        self,
        model_chunks: Sequence[nn.Module],
        micro_batches: Sequence[MicroBatch],
        loss_fn: LossFn,
        forward_only: bool,
        no_sync_func: NoSyncFunc | None,
        on_last_backward: Callable[[int], None] | None,
    ):
        if not micro_batches:
            raise ValueError("a schedule needs at least one micro-batch")
        self.chunks, self.micro_batches, self.loss_fn = model_chunks, micro_batches, loss_fn
        self.forward_only = forward_only
        self.no_sync_func, self.on_last_backward = no_sync_func, on_last_backward
        self.models = [unwrap_model(chunk) for chunk in model_chunks]
        self.metrics: list[Metrics] = []
        self._backwards_done = [0] * len(model_chunks)

    def is_embedding(self, c: int) -> bool:
        return self.models[c].pre_process

    def is_head(self, c: int) -> bool:
        return self.models[c].post_process

    def forward(self, c: int, i: int, hidden_states: torch.Tensor | None) -> _Stash:
        """Micro-batch i through chunk c; the head chunk's output is loss_fn's loss."""
        mb = self.micro_batches[i]
        stage_inputs = {k: mb.get(k) for k in _STAGE_INPUTS}
        with torch.no_grad() if self.forward_only else nullcontext():
            if self.is_embedding(c):
                output = self.chunks[c](input_ids=mb["input_ids"], **stage_inputs)
            else:
                output = self.chunks[c](hidden_states=hidden_states, **stage_inputs)
            if self.is_head(c):
                output, metrics = self.loss_fn(output, mb)
                self.metrics.append(metrics)
        return _Stash(hidden_states, output, self._scaled_aux_loss(c))

    def _scaled_aux_loss(self, c: int) -> torch.Tensor | None:
        aux = self.models[c].aux_loss
        if self.forward_only or aux is None or not aux.requires_grad:
            return None  # dense chunks: a constant zero, nothing to backprop
        return aux / len(self.micro_batches)

    def backward(self, c: int, stash: _Stash, output_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backprop the chunk's output (grad from the next stage, or ones for the loss) plus its aux
        loss; returns the gradient of its input activation (None on the embedding chunk)."""
        tensors, grads = [stash.output], [output_grad]
        if stash.aux is not None:
            tensors.append(stash.aux)
            grads.append(None)  # scalar: implicit ones
        is_last = self._backwards_done[c] == len(self.micro_batches) - 1
        self._backwards_done[c] += 1
        no_sync = self.no_sync_func is not None and not is_last
        with self.no_sync_func(c) if no_sync else nullcontext():  # type: ignore[misc]
            torch.autograd.backward(tensors, grads)
        if is_last and self.on_last_backward is not None:
            self.on_last_backward(c)
        return None if stash.input is None else stash.input.grad


def _model_device(model_chunks: Sequence[nn.Module]) -> torch.device:
    return next(model_chunks[0].parameters()).device


def _check_micro_batch_count(n: int, groups: Groups, device: torch.device) -> None:
    """All pp ranks must run the same number of micro-batches (else the schedule would hang).

    Runs before any other check, so that every rank raises the same error or none does. This all-reduce
    is also the pp group's first collective of the step: it creates the NCCL communicator on every stage
    before the first p2p batch, which may leave stages out.
    """
    counts = torch.tensor([n, -n], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=groups.pp_group)
    most, fewest = counts[0].item(), -counts[1].item()
    if most != fewest:
        raise ValueError(f"pipeline ranks disagree on the number of micro-batches: {fewest} to {most}")


class _Pipe:
    """StageLinks that drop the transfers a stage has no peer for.

    1F1B: the first stage has no previous stage and the last no next one (wrap_around=False). The
    interleaved schedule sends from the last stage to the first (chunk v to chunk v + 1) and decides
    itself which transfers happen (wrap_around=True).
    """

    def __init__(self, groups: Groups, device: torch.device, forward_only: bool, wrap_around: bool):
        self.links = StageLinks.from_groups(groups, device)
        self.no_prev = groups.is_first_stage and not wrap_around
        self.no_next = groups.is_last_stage and not wrap_around
        self.forward_only = forward_only

    def exchange(
        self,
        *,
        send_forward: torch.Tensor | None = None,
        send_backward: torch.Tensor | None = None,
        recv_forward: bool = False,
        recv_backward_like: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One batch of transfers; returns (activation received, gradient received)."""
        act, grad = self.links.communicate(
            send_next=None if self.no_next else send_forward,
            send_prev=None if self.no_prev else send_backward,
            recv_prev=recv_forward and not self.no_prev,
            recv_next_like=None if self.no_next else recv_backward_like,
        )
        if act is not None and not self.forward_only:
            act.requires_grad_()
        return act, grad


def forward_backward_no_pipelining(
    model_chunks: Sequence[nn.Module],
    micro_batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    forward_only: bool = False,
    *,
    groups: Groups | None = None,
    no_sync_func: NoSyncFunc | None = None,
    on_last_backward: Callable[[int], None] | None = None,
) -> list[Metrics]:
    """pp = 1: forward and backward of each micro-batch in turn (groups is accepted and unused)."""
    if len(model_chunks) != 1:
        raise ValueError(f"without pipelining the model is one chunk, got {len(model_chunks)}")
    runner = _ChunkRunner(model_chunks, micro_batches, loss_fn, forward_only, no_sync_func, on_last_backward)
    for i in range(len(micro_batches)):
        stash = runner.forward(0, i, None)
        if not forward_only:
            runner.backward(0, stash, None)
    return runner.metrics


def forward_backward_1f1b(
    model_chunks: Sequence[nn.Module],
    micro_batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    groups: Groups,
    forward_only: bool = False,
    *,
    no_sync_func: NoSyncFunc | None = None,
    on_last_backward: Callable[[int], None] | None = None,
) -> list[Metrics]:
    """One chunk per rank: pp - rank - 1 warmup forwards, then one forward / one backward, then the
    remaining backwards. At most pp - rank micro-batches are in flight on rank `rank`."""
    if len(model_chunks) != 1:
        raise ValueError(
            f"1F1B runs one chunk per rank, got {len(model_chunks)}: use the interleaved schedule"
        )
    device = _model_device(model_chunks)
    n = len(micro_batches)
    _check_micro_batch_count(n, groups, device)
    runner = _ChunkRunner(model_chunks, micro_batches, loss_fn, forward_only, no_sync_func, on_last_backward)
    pipe = _Pipe(groups, device, forward_only, wrap_around=False)
    num_warmup = min(groups.pp_size - groups.pp_rank - 1, n)
    in_flight: deque[_Stash] = deque()

    for i in range(num_warmup):
        stash = runner.forward(0, i, pipe.exchange(recv_forward=True)[0])
        pipe.exchange(send_forward=stash.output)
        if not forward_only:
            in_flight.append(stash)

    hidden = pipe.exchange(recv_forward=True)[0] if num_warmup < n else None
    for i in range(num_warmup, n):
        more = i < n - 1
        stash = runner.forward(0, i, hidden)
        if forward_only:
            pipe.exchange(send_forward=stash.output)
            hidden = pipe.exchange(recv_forward=more)[0]
            continue
        in_flight.append(stash)
        oldest = in_flight.popleft()  # the micro-batch whose gradient the next stage sends now
        grad = pipe.exchange(send_forward=stash.output, recv_backward_like=oldest.output)[1]
        input_grad = runner.backward(0, oldest, grad)
        hidden = pipe.exchange(send_backward=input_grad, recv_forward=more)[0]

    while in_flight:
        oldest = in_flight.popleft()
        grad = pipe.exchange(recv_backward_like=oldest.output)[1]
        pipe.exchange(send_backward=runner.backward(0, oldest, grad))
    return runner.metrics if groups.is_last_stage else []


@dataclass(frozen=True)
class _InterleavedOrder:
    """Megatron's interleaved order. Virtual micro-batch k (0 <= k < n * V) runs, in groups of pp
    micro-batches, chunk 0 on micro-batches 0..pp-1, chunk 1 on the same ones, ..., then the next pp."""

    num_micro_batches: int
    num_chunks: int
    pp_size: int
    pp_rank: int

    @property
    def total(self) -> int:
        return self.num_micro_batches * self.num_chunks

    def chunk(self, k: int, forward: bool) -> int:
        c = (k % (self.pp_size * self.num_chunks)) // self.pp_size
        return c if forward else self.num_chunks - 1 - c

    def micro_batch(self, k: int) -> int:
        group_size = self.pp_size * self.num_chunks
        return (k // group_size) * self.pp_size + k % self.pp_size

    def num_warmup(self, forward_only: bool) -> int:
        """Forwards before the first backward; every one of them when n == pp (no steady state)."""
        if forward_only or self.num_micro_batches == self.pp_size:
            return self.total
        warmup = (self.pp_size - self.pp_rank - 1) * 2 + (self.num_chunks - 1) * self.pp_size
        return min(warmup, self.total)


class _InterleavedState:
    """Per-chunk queues of the interleaved schedule: received inputs, stashes, received output grads."""

    def __init__(self, runner: _ChunkRunner, order: _InterleavedOrder, pipe: _Pipe):
        self.runner, self.order, self.pipe = runner, order, pipe
        chunks = range(order.num_chunks)
        self.inputs: list[deque[torch.Tensor]] = [deque() for _ in chunks]
        self.stashes: list[deque[_Stash]] = [deque() for _ in chunks]
        self.output_grads: list[deque[torch.Tensor]] = [deque() for _ in chunks]

    def forward(self, k: int) -> torch.Tensor | None:
        """Virtual forward k; returns the activation to send on (None from the head chunk)."""
        c = self.order.chunk(k, forward=True)
        hidden = None if self.runner.is_embedding(c) else self.inputs[c].popleft()
        stash = self.runner.forward(c, self.order.micro_batch(k), hidden)
        if not self.runner.forward_only:
            self.stashes[c].append(stash)
        return None if self.runner.is_head(c) else stash.output

    def backward(self, k: int) -> torch.Tensor | None:
        """Virtual backward k; returns the input gradient to send back (None from the embedding chunk)."""
        c = self.order.chunk(k, forward=False)
        grad = None if self.runner.is_head(c) else self.output_grads[c].popleft()
        return self.runner.backward(c, self.stashes[c].popleft(), grad)

    def grad_like(self, c: int) -> torch.Tensor:
        """The activation whose gradient chunk c receives next (its oldest one without a gradient)."""
        return self.stashes[c][len(self.output_grads[c])].output

    def exchange(
        self,
        send_forward: torch.Tensor | None,
        send_backward: torch.Tensor | None,
        recv_forward_chunk: int | None,
        recv_backward_chunk: int | None,
    ) -> None:
        """One batch of transfers; received tensors are queued on the chunks that consume them."""
        like = None if recv_backward_chunk is None else self.grad_like(recv_backward_chunk)
        act, grad = self.pipe.exchange(
            send_forward=send_forward,
            send_backward=send_backward,
            recv_forward=recv_forward_chunk is not None,
            recv_backward_like=like,
        )
        if act is not None:
            self.inputs[recv_forward_chunk].append(act)  # type: ignore[index]
        if grad is not None:
            self.output_grads[recv_backward_chunk].append(grad)  # type: ignore[index]


def forward_backward_interleaved(
    model_chunks: Sequence[nn.Module],
    micro_batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    groups: Groups,
    forward_only: bool = False,
    *,
    no_sync_func: NoSyncFunc | None = None,
    on_last_backward: Callable[[int], None] | None = None,
) -> list[Metrics]:
    """Virtual stages (Megatron's interleaved 1F1B): rank r holds V chunks; the bubble shrinks by V.
    Needs num_micro_batches % pp_size == 0 (micro-batches go through each chunk in groups of pp)."""
    n, pp = len(micro_batches), groups.pp_size
    device = _model_device(model_chunks)
    _check_micro_batch_count(n, groups, device)
    if n % pp:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches ({n}) to be a multiple of "
            f"pp_size ({pp}): use {max(pp, n - n % pp)} or {n + pp - n % pp} micro-batches"
        )
    runner = _ChunkRunner(model_chunks, micro_batches, loss_fn, forward_only, no_sync_func, on_last_backward)
    order = _InterleavedOrder(n, len(model_chunks), pp, groups.pp_rank)
    state = _InterleavedState(runner, order, _Pipe(groups, device, forward_only, wrap_around=True))
    num_warmup = order.num_warmup(forward_only)
    _interleaved_warmup(state, num_warmup, groups)
    if not forward_only:
        _interleaved_steady(state, num_warmup, groups)
        _interleaved_cooldown(state, num_warmup, groups)
    return runner.metrics if groups.is_last_stage else []


def _interleaved_warmup(state: _InterleavedState, num_warmup: int, groups: Groups) -> None:
    """Forwards 0..num_warmup-1; the last one also receives the first output gradient."""
    order, last_chunk = state.order, state.order.num_chunks - 1
    starts_steady = not state.runner.forward_only and num_warmup < order.total
    state.exchange(None, None, None if groups.is_first_stage else 0, None)
    for k in range(num_warmup):
        output = state.forward(k)
        next_chunk: int | None = order.chunk(k + 1, forward=True)
        if (groups.is_first_stage and next_chunk == 0) or k == order.total - 1:
            next_chunk = None  # the first chunk reads input_ids; or nothing left to run
        grad_chunk = (
            last_chunk if starts_steady and k == num_warmup - 1 and not groups.is_last_stage else None
        )
        state.exchange(output, None, next_chunk, grad_chunk)


def _interleaved_steady(state: _InterleavedState, num_warmup: int, groups: Groups) -> None:
    """One forward (k + num_warmup) and one backward (k) per step, their transfers in one batch."""
    order = state.order
    remaining = order.total - num_warmup
    for k in range(remaining):
        forward_k = k + num_warmup
        output = state.forward(forward_k)
        input_grad = state.backward(k)
        state.exchange(
            output,
            input_grad,
            None if k == remaining - 1 else _next_forward_chunk(order, forward_k, groups),
            _next_backward_chunk(order, k, groups),
        )


def _next_forward_chunk(order: _InterleavedOrder, forward_k: int, groups: Groups) -> int | None:
    """The chunk that consumes the activation received after forward `forward_k` (None: none comes)."""
    if not groups.is_first_stage:
        return order.chunk(forward_k + 1, forward=True)
    # The first stage receives from the last one, which is pp - 1 virtual steps behind it.
    sender = order.chunk(forward_k - (order.pp_size - 1), forward=True)
    return None if sender == order.num_chunks - 1 else sender + 1


def _next_backward_chunk(order: _InterleavedOrder, backward_k: int, groups: Groups) -> int | None:
    """The chunk that consumes the gradient received after backward `backward_k` (None: none comes)."""
    if not groups.is_last_stage:
        return order.chunk(backward_k + 1, forward=False)
    # The last stage receives from the first one, which is pp - 1 virtual steps behind it.
    sender = order.chunk(backward_k - (order.pp_size - 1), forward=False)
    return None if sender == 0 else sender - 1


def _interleaved_cooldown(state: _InterleavedState, num_warmup: int, groups: Groups) -> None:
    """The backwards left after the last forward."""
    order = state.order
    if num_warmup == order.total and not groups.is_last_stage:  # n == pp: no steady state
        state.exchange(None, None, None, order.num_chunks - 1)
    for k in range(order.total - num_warmup, order.total):
        input_grad = state.backward(k)
        next_chunk: int | None = order.chunk(k + 1, forward=False)
        if (groups.is_last_stage and next_chunk == order.num_chunks - 1) or k == order.total - 1:
            next_chunk = None  # the head chunk's gradient comes from its loss; or nothing left
        state.exchange(None, input_grad, None, next_chunk)


def get_schedule(pp_size: int, vpp_size: int = 1) -> Schedule:
    """The schedule for a layout; call it as schedule(model_chunks, micro_batches, loss_fn, groups=groups,
    forward_only=..., no_sync_func=..., on_last_backward=...)."""
    if pp_size < 1 or vpp_size < 1:
        raise ValueError(f"pp_size={pp_size} and vpp_size={vpp_size} must be >= 1")
    if pp_size == 1:
        if vpp_size > 1:
            raise ValueError(f"vpp_size={vpp_size} needs pp_size > 1")
        return forward_backward_no_pipelining
    return forward_backward_interleaved if vpp_size > 1 else forward_backward_1f1b
