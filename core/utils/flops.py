"""Model FLOPs per token and device peaks, for MFU (the bench, and the training loops' perf metrics).

FLOPs per token follow the PaLM/Megatron accounting: 6 * (non-embedding params + output head) for the
matmuls plus 6 * num_layers * seq_len * hidden for causal attention scores and values (12*L*T*H halved by
the causal mask).
"""

from __future__ import annotations

import torch

from core.transformer.config import TransformerConfig

# Dense bf16 peak (datasheet, SXM) by device-name fragment; MFU is left blank for unknown devices.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    h, L = config.hidden_size, config.num_layers
    q = config.num_attention_heads * config.head_dim
    kv = 2 * config.num_kv_heads * config.head_dim
    ffn = config.moe_ffn_hidden_size * config.moe_top_k if config.is_moe else config.ffn_hidden_size
    mlp = (3 if config.activation == "swiglu" else 2) * h * ffn
    per_layer = h * (q + kv) + q * h + mlp
    matmul_params = L * per_layer + h * config.vocab_size
    return 6.0 * matmul_params + 6.0 * L * seq_len * q
