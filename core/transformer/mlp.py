"""Dense MLP: SwiGLU (Llama family) or GELU (GPT-2).

Fused gate/up layout (SwiGLU). linear_fc1.weight is (2 * ffn, H) with rows interleaved pairwise:
    [gate_0, up_0, gate_1, up_1, ..., gate_{ffn-1}, up_{ffn-1}]
so any contiguous row shard of 1/tp holds matching gate and up rows, and a rank's shard is a valid fused
gate/up of ffn // tp channels: the layout does not depend on tp. The bias (if any) is interleaved alike.
The experts of an MoE layer use the same layout along their second dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, normal_init, scaled_normal_init
from core.transformer.config import TransformerConfig


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2 * F) pairwise-interleaved gate/up -> silu(gate) * up (..., F)."""
    gate, up = gate_up.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF's gelu_new: the tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig, tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        ffn = config.ffn_hidden_size
        self.gated = config.activation == "swiglu"
        fc1_out = 2 * ffn if self.gated else ffn
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size,
            fc1_out,
            bias=config.mlp_bias,
            tp_group=tp_group,
            init_method=normal_init(config.init_std),
            fp8=config.fp8,
        )
        self.linear_fc2 = RowParallelLinear(
            ffn,
            config.hidden_size,
            bias=config.mlp_bias,
            tp_group=tp_group,
            init_method=scaled_normal_init(config.init_std, config.num_layers),
            fp8=config.fp8,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H)."""
        h = self.linear_fc1(x)  # (B, T, 2 * ffn_local) gated, else (B, T, ffn_local)
        h = swiglu(h) if self.gated else gelu_tanh(h)  # (B, T, ffn_local)
        return self.linear_fc2(h)
