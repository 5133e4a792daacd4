"""TP-aware initialisation: the same FULL weight whatever the tensor-parallel size.

Every rank draws the full master weight (fp32, CPU) from the same generator and keeps its shard.
That costs a transient full-size tensor per rank at init, and buys exact parity: a tp=k model built
after the same `torch.manual_seed` has, shard by shard, the weights of the tp=1 model, and the
generator advances identically whatever k is (so later layers match too).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from core.parallel.collectives import group_rank, group_size

# init_method(full_weight, generator) fills the full (unsharded) fp32 CPU weight in place.
InitMethod = Callable[[torch.Tensor, torch.Generator | None], object]


def normal_init(std: float = 0.02) -> InitMethod:
    def init(weight: torch.Tensor, generator: torch.Generator | None) -> None:
        nn.init.normal_(weight, mean=0.0, std=std, generator=generator)

    return init


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """GPT-2 / Megatron output-projection init: std / sqrt(2 * num_layers)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def shard(full: torch.Tensor, tp_dim: int | None, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous chunk of `full` along tp_dim (the whole tensor if tp_dim is None)."""
    if tp_dim is None or group_size(group) == 1:
        return full
    return full.chunk(group_size(group), dim=tp_dim)[group_rank(group)]


@torch.no_grad()
def init_sharded_(
    param: torch.Tensor,
    full_shape: tuple[int, ...],
    tp_dim: int | None,
    tp_group: dist.ProcessGroup | None,
    init_method: InitMethod,
    generator: torch.Generator | None = None,
) -> None:
    """Fill `param` with its shard of a full weight drawn by init_method. Meta tensors are skipped
    (deferred init); `generator` must be a CPU generator (None: torch's default one)."""
    if param.is_meta:
        return
    full = torch.empty(full_shape, dtype=torch.float32)
    init_method(full, generator)
    local = shard(full, tp_dim, tp_group)
    if local.shape != param.shape:
        raise ValueError(f"shard shape {tuple(local.shape)} != parameter shape {tuple(param.shape)}")
    param.copy_(local)


def full_shape(param: torch.Tensor, tp_group: dist.ProcessGroup | None) -> tuple[int, ...]:
    """The unsharded shape of a parameter: its `tp_dim` (if any) times the tp size."""
    shape = list(param.shape)
    tp_dim = getattr(param, "tp_dim", None)
    if tp_dim is not None:
        shape[tp_dim] *= group_size(tp_group)
    return tuple(shape)


def init_tp_param_(
    param: torch.Tensor,
    init_method: InitMethod,
    tp_group: dist.ProcessGroup | None,
    generator: torch.Generator | None = None,
) -> None:
    """Drop-in for `init_method(param)` on a possibly tp-sharded parameter (reads `param.tp_dim`):
    the same full weight at every tp. Use it in a model's reset_parameters loop."""
    init_sharded_(
        param, full_shape(param, tp_group), getattr(param, "tp_dim", None), tp_group, init_method, generator
    )
