"""Tensor-parallel layers. With tp_group=None (or a group of size 1) each is the plain layer.

Contract used by the model code (it never branches on tp):
- ColumnParallelLinear(in, out): weight (out // tp, in); output (..., out // tp) unless gather_output.
- RowParallelLinear(in, out): weight (out, in // tp); input (..., in // tp); output all-reduced (..., out).
- VocabParallelEmbedding(vocab, dim): weight (vocab // tp, dim); output (..., dim) all-reduced.
- allreduce_sequence_parallel_grads(model, tp_group) after backward when sequence_parallel is on.
- Column/RowParallelLinear(fp8="torch" | "te") run their GEMM in fp8 (core.tensor_parallel.fp8); the
  mode is checked when the layer is built. fp8="off" (default) is the plain F.linear.
Parameters carry `tp_dim` (the dim that is sharded, or None) so that checkpoints and the bridge can
gather or shard them without knowing the layer type.

Sequence parallelism (activations outside TP regions are (B, T / tp, H), split on dim 1):
- ColumnParallelLinear all-gathers its input over T (backward: reduce-scatter);
- RowParallelLinear and VocabParallelEmbedding reduce-scatter their output over T (backward: all-gather).
Parameters that see only this rank's sequence shard but are replicated over tp (norm weights, the
row-parallel bias) carry `sequence_parallel = True`: call allreduce_sequence_parallel_grads after
backward to sum their gradients over tp.

Initialisation draws the full weight and keeps this rank's shard (see core.tensor_parallel.init), so
the same seed gives the same full weights at every tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.parallel.collectives import (
    all_reduce,
    copy_to_tp,
    gather_from_sequence,
    gather_from_tp,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    scatter_to_tp,
)
from core.tensor_parallel.fp8 import Fp8Mode, check_fp8_mode, fp8_linear
from core.tensor_parallel.init import InitMethod, init_sharded_, normal_init


def tp_size(group: dist.ProcessGroup | None) -> int:
    return group_size(group)


def tp_rank(group: dist.ProcessGroup | None) -> int:
    return group_rank(group)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {d}")
    return n // d


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split over output features: each rank computes out_features // tp outputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp_group: dist.ProcessGroup | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        fp8: Fp8Mode = "off",
    ):
        super().__init__()
        check_fp8_mode(fp8)
        self.fp8 = fp8 != "off"  # the GEMM runs in fp8 (core.tensor_parallel.fp8)
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.init_method = init_method or normal_init(0.02)
        out_local = _divide(out_features, tp_size(tp_group), "out_features")
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        self.weight.tp_dim = 0
        self.bias = nn.Parameter(torch.zeros(out_local)) if bias else None
        if self.bias is not None:
            self.bias.tp_dim = 0
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_sharded_(
            self.weight, (self.out_features, self.in_features), 0, self.tp_group, self.init_method, generator
        )
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence(x, self.tp_group)  # (B, T / tp, in) -> (B, T, in)
        else:
            x = copy_to_tp(x, self.tp_group)  # (..., in), gradient all-reduced over tp
        linear = fp8_linear if self.fp8 else F.linear
        y = linear(x, self.weight, self.bias)  # (..., out / tp)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split over input features: partial products are summed over tp ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp_group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        fp8: Fp8Mode = "off",
    ):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence_parallel=True needs input_is_parallel=True")
        check_fp8_mode(fp8)
        self.fp8 = fp8 != "off"  # the GEMM runs in fp8 (core.tensor_parallel.fp8)
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.init_method = init_method or normal_init(0.02)
        in_local = _divide(in_features, tp_size(tp_group), "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.weight.tp_dim = 1
        # The bias is added once, after the reduction, so it is replicated.
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None:
            self.bias.tp_dim = None
            # Under SP each rank adds it to its own sequence shard: its gradient is a partial sum.
            self.bias.sequence_parallel = sequence_parallel
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_sharded_(
            self.weight, (self.out_features, self.in_features), 1, self.tp_group, self.init_method, generator
        )
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)  # (..., in) -> (..., in / tp)
        linear = fp8_linear if self.fp8 else F.linear
        y = linear(x, self.weight)  # (B, T, out), a partial sum over this rank's input features
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(y, self.tp_group)  # (B, T / tp, out)
        else:
            y = reduce_from_tp(y, self.tp_group)  # (..., out)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp: each rank looks up the ids in its range, zeros the
    rest, and the partial embeddings are summed over tp (reduce-scattered over T under SP)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
    ):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.init_method = init_method or normal_init(0.02)
        n_local = _divide(num_embeddings, tp_size(tp_group), "vocab_size")
        self.vocab_start = tp_rank(tp_group) * n_local
        self.vocab_end = self.vocab_start + n_local
        self.weight = nn.Parameter(torch.empty(n_local, embedding_dim))
        self.weight.tp_dim = 0
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        full_shape = (self.num_embeddings, self.embedding_dim)
        init_sharded_(self.weight, full_shape, 0, self.tp_group, self.init_method, generator)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size(self.tp_group) == 1:
            return F.embedding(input_ids, self.weight)  # (B, T, dim); under SP with tp=1 T is whole
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # (B, T)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        y = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, dim)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(y, self.tp_group)  # (B, T / tp, dim)
        return reduce_from_tp(y, self.tp_group)  # (B, T, dim)


@torch.no_grad()
def allreduce_sequence_parallel_grads(model: nn.Module, tp_group: dist.ProcessGroup | None) -> None:
    """Sum over tp the gradients of parameters marked `sequence_parallel = True` (one all-reduce per
    dtype). Call after backward and before the data-parallel gradient reduction."""
    if tp_size(tp_group) == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), tp_group)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(summed.view_as(g))
