"""Qwen2 / Qwen2.5: Llama with q/k/v biases (no o_proj bias). Sliding-window layers are not supported."""

from __future__ import annotations

from typing import Any

from core.errors import InputError
from core.models.base import Architecture
from core.models.llama import (
    LLAMA_FAMILY_IGNORE,
    expect,
    llama_family_config,
    llama_family_hf_config,
    llama_family_maps,
)
from core.transformer.config import TransformerConfig

QWEN_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
    "num_key_value_heads": 32,
}


def require_full_attention(hf: dict[str, Any], arch: str) -> None:
    """Qwen configs carry a sliding window that is off unless use_sliding_window (then per layer_types)."""
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if hf.get("use_sliding_window") or layer_types != {"full_attention"}:
        raise InputError(f"{arch}: sliding-window attention layers are not supported")


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    require_full_attention(hf, "qwen2")
    return llama_family_config(hf, "qwen2", QWEN_DEFAULTS, qkv_bias=True, attn_out_bias=False, mlp_bias=False)


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    expect(config, "qwen2", qkv_bias=True, attn_out_bias=False, mlp_bias=False, qk_norm=False, num_experts=0)
    expect(config, "qwen2", sliding_window=None)
    return {**llama_family_hf_config(config, "Qwen2ForCausalLM", "qwen2"), "use_sliding_window": False}


ARCH = Architecture(
    name="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    config_from_hf=config_from_hf,
    hf_config_from=hf_config_from,
    param_maps=llama_family_maps,
    hf_base_prefix="model.",
    ignore_hf=LLAMA_FAMILY_IGNORE,
)


def qwen2_tiny() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128,
        qkv_bias=True,
        tie_embeddings=True,
        rope_theta=1000000.0,
        norm_eps=1e-6,
    )
