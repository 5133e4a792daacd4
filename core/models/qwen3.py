"""Qwen3 (dense): Llama with RMSNorm on q and k per head (qk-norm) and an explicit head_dim."""

from __future__ import annotations

from typing import Any

from core.models.base import Architecture
from core.models.llama import (
    LLAMA_FAMILY_IGNORE,
    expect,
    llama_family_config,
    llama_family_hf_config,
    llama_family_maps,
)
from core.models.qwen2 import QWEN_DEFAULTS, require_full_attention
from core.transformer.config import TransformerConfig

QWEN3_DEFAULTS: dict[str, Any] = {**QWEN_DEFAULTS, "head_dim": 128}


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    require_full_attention(hf, "qwen3")
    return llama_family_config(hf, "qwen3", QWEN3_DEFAULTS, qk_norm=True, mlp_bias=False)


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    expect(config, "qwen3", qk_norm=True, mlp_bias=False, num_experts=0, sliding_window=None)
    expect(config, "qwen3", attn_out_bias=config.qkv_bias)
    return {
        **llama_family_hf_config(config, "Qwen3ForCausalLM", "qwen3"),
        "attention_bias": config.qkv_bias,
        "use_sliding_window": False,
    }


ARCH = Architecture(
    name="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    config_from_hf=config_from_hf,
    hf_config_from=hf_config_from,
    param_maps=llama_family_maps,
    hf_base_prefix="model.",
    ignore_hf=LLAMA_FAMILY_IGNORE,
)


def qwen3_tiny() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=32,
        ffn_hidden_size=128,
        qk_norm=True,
        tie_embeddings=True,
        rope_theta=1000000.0,
        norm_eps=1e-6,
    )


def qwen3_0_6b() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=151936,
        hidden_size=1024,
        num_layers=28,
        num_attention_heads=16,
        num_kv_heads=8,
        head_dim=128,
        ffn_hidden_size=3072,
        max_position_embeddings=40960,
        qk_norm=True,
        tie_embeddings=True,
        rope_theta=1000000.0,
        norm_eps=1e-6,
    )
