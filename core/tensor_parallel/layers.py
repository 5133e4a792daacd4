"""Tensor-parallel layers. With tp_group=None (or a group of size 1) each is the plain layer.

Contract used by the model code (it never branches on tp):
- ColumnParallelLinear(in, out): weight (out // tp, in); output (..., out // tp) unless gather_output.
- RowParallelLinear(in, out): weight (out, in // tp); input (..., in // tp); output all-reduced (..., out).
- VocabParallelEmbedding(vocab, dim): weight (vocab // tp, dim); output (..., dim) all-reduced.
Parameters carry `tp_dim` (the dim that is sharded, or None) so that checkpoints and the bridge can
gather or shard them without knowing the layer type.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {d}")
    return n // d


class ColumnParallelLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp_group: dist.ProcessGroup | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        out_local = _divide(out_features, tp_size(tp_group), "out_features")
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        self.weight.tp_dim = 0
        self.bias = nn.Parameter(torch.zeros(out_local)) if bias else None
        if self.bias is not None:
            self.bias.tp_dim = 0
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size(self.tp_group) == 1:
            return F.linear(x, self.weight, self.bias)
        raise NotImplementedError("tensor parallelism > 1 is not implemented yet")


class RowParallelLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        tp_group: dist.ProcessGroup | None = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        in_local = _divide(in_features, tp_size(tp_group), "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.weight.tp_dim = 1
        # The bias is added once, after the reduction, so it is replicated.
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None:
            self.bias.tp_dim = None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size(self.tp_group) == 1:
            return F.linear(x, self.weight, self.bias)
        raise NotImplementedError("tensor parallelism > 1 is not implemented yet")


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.tp_group = tp_group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        n_local = _divide(num_embeddings, tp_size(tp_group), "vocab_size")
        self.vocab_start = tp_rank(tp_group) * n_local
        self.weight = nn.Parameter(torch.empty(n_local, embedding_dim))
        self.weight.tp_dim = 0
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size(self.tp_group) == 1:
            return F.embedding(input_ids, self.weight)
        raise NotImplementedError("tensor parallelism > 1 is not implemented yet")
