"""Autograd-aware collectives: one torch.autograd.Function per forward/backward pair.

Activations are (B, T, H): the tensor-parallel dim is the last one, the sequence dim is 1.
Every function takes its process group explicitly; a group of None or of size 1 makes it the identity
(so a tp=1 model runs these as no-ops and never touches the default group).

Under torch.compile the building blocks switch to torch's functional collectives (they return new tensors,
so Dynamo/AOTAutograd trace them with explicit waits, also inside a compiled backward); eager code keeps
the in-place c10d calls.

The sequence-parallel pair follows Megatron: inside a column-parallel region each rank computes a
different output shard from the gathered sequence, so the gradient of the all-gather is a
reduce-scatter (the partial input-gradients of all ranks are summed, each rank keeps its chunk).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

SEQ_DIM = 1

# torch >= 2.13 renamed the single-tensor collectives; fall back to the old names on older torch.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: dist.ProcessGroup | None) -> int:
    """None means 'no group': a single process, every collective is the identity."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---- plain (non-autograd) building blocks ------------------------------------------------------------

_FUNCOL_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def all_reduce(
    x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Reduce (sum by default) over the group into a new contiguous tensor (x is left untouched)."""
    if group_size(group) == 1:
        return x
    if _compiling():
        return funcol.all_reduce(x.contiguous(), _FUNCOL_OPS[op], group)
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def split_along_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's chunk of x along `dim` (size must divide); contiguous."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dim {dim} of shape {tuple(x.shape)} is not divisible by group size {size}")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def all_gather_along_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's x along `dim` (rank order)."""
    size = group_size(group)
    if size == 1:
        return x
    x_front = x.movedim(dim, 0).contiguous()  # (n, ...)
    if _compiling():
        return funcol.all_gather_tensor(x_front, 0, group).movedim(0, dim).contiguous()
    out = torch.empty((size * x_front.shape[0], *x_front.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x_front, group=group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum x over the group and keep this rank's chunk along `dim` (size must divide)."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dim {dim} of shape {tuple(x.shape)} is not divisible by group size {size}")
    x_front = x.movedim(dim, 0).contiguous()  # (size * n, ...)
    if _compiling():
        return funcol.reduce_scatter_tensor(x_front, "sum", 0, group).movedim(0, dim).contiguous()
    out = torch.empty((x_front.shape[0] // size, *x_front.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x_front, group=group)
    return out.movedim(0, dim).contiguous()


# ---- autograd functions ------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    """forward: identity | backward: all-reduce"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce | backward: identity"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """forward: split last dim | backward: all-gather last dim"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return split_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_along_dim(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather last dim | backward: split last dim"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return split_along_dim(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """forward: split dim T | backward: all-gather dim T"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return split_along_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_along_dim(grad, SEQ_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """forward: all-gather dim T | backward: reduce-scatter dim T"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_along_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return reduce_scatter_along_dim(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """forward: reduce-scatter dim T | backward: all-gather dim T"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_along_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_along_dim(grad, SEQ_DIM, ctx.group), None


# ---- public entry points (identity when the group is None or of size 1) ------------------------------


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region with a replicated input: (..., H) -> (..., H)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region by summing partial outputs: (..., H) -> (..., H)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(..., H) -> (..., H / tp): keep this rank's slice of the last dim."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(..., H / tp) -> (..., H): concatenate the last dim over ranks."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, T, H) replicated -> (B, T / tp, H): enter a sequence-parallel region."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, T / tp, H) -> (B, T, H) feeding a TP region (its gradient is summed over ranks)."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, T, H) partial sums -> (B, T / tp, H) summed: leave a TP region into a sequence-parallel one."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
