"""RMSNorm and LayerNorm. Their parameters are replicated across tensor-parallel ranks (tp_dim=None)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.parallel import copy_to_tp
from core.transformer.config import TransformerConfig


def _replicated(t: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(t)
    p.tp_dim = None
    return p


class RMSNorm(nn.Module):
    """y = w * x / rms(x), the statistic in fp32 (as HF Llama), the product in the input dtype.

    partial_over: a tp group whose ranks each apply this replicated norm to a different part of the data
    (qk-norm on the rank's own heads); the weight's gradient is then summed over it in backward.
    """

    def __init__(self, dim: int, eps: float, partial_over: dist.ProcessGroup | None = None):
        super().__init__()
        self.eps = eps
        self.partial_over = partial_over
        self.weight = _replicated(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return copy_to_tp(self.weight, self.partial_over) * x32.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _replicated(torch.ones(dim))
        self.bias = _replicated(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def build_norm(config: TransformerConfig, dim: int) -> RMSNorm | LayerNorm:
    cls = RMSNorm if config.norm == "rmsnorm" else LayerNorm
    return cls(dim, config.norm_eps)
