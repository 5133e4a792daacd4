"""Activation recompute for transformer layers: trade backward compute for activation memory.

    none       every activation the backward needs is kept (fastest, most memory)
    selective  the layer runs under torch's selective activation checkpointing: the outputs of the matmuls,
               of the attention kernels and of tp collectives are kept; everything else (norms, RoPE, the
               SwiGLU/GELU activation, residual adds, casts) is recomputed in backward from them. The
               recomputed ops are elementwise, so the cost is a few memory-bound kernels per layer, while the
               activation's (B, T, ffn) output and the norms' (B, T, H) outputs are no longer stored (what
               torchtitan calls op-level selective AC, and Megatron's layernorm/activation recompute).
    full       only the layer's input is kept and the whole layer is recomputed in backward (~1/3 more
               compute; activation memory of one layer at a time).

Recompute replays the same ops on the same inputs (RNG state restored), so losses and gradients equal the
`none` run's exactly on the same device.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

Recompute = Literal["none", "selective", "full"]


def _saved_ops() -> set[Any]:
    aten = torch.ops.aten
    ops = {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.higher_order.flex_attention,
    }
    c10d = torch.ops._c10d_functional
    ops |= {c10d.all_reduce.default, c10d.reduce_scatter_tensor.default, c10d.all_gather_into_tensor.default}
    ops |= {c10d.wait_tensor.default}
    return ops


_SAVED: set[Any] | None = None


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def run_layer(mode: Recompute, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """fn(*args) with the given recompute mode (a no-op without autograd)."""
    global _SAVED
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if _SAVED is None:
        _SAVED = _saved_ops()
    context = partial(create_selective_checkpoint_contexts, _policy)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context)
