"""Mistral: Llama with (optionally) sliding-window attention."""

from __future__ import annotations

from typing import Any

from core.models.base import Architecture
from core.models.llama import (
    LLAMA_DEFAULTS,
    LLAMA_FAMILY_IGNORE,
    expect,
    llama_family_config,
    llama_family_hf_config,
    llama_family_maps,
)
from core.transformer.config import TransformerConfig

MISTRAL_DEFAULTS: dict[str, Any] = {
    **LLAMA_DEFAULTS,
    "max_position_embeddings": 4096 * 32,
    "num_key_value_heads": 8,
    "sliding_window": 4096,
}


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    # A config.json with "sliding_window": null means no window; only a missing key takes the default.
    window = hf["sliding_window"] if "sliding_window" in hf else MISTRAL_DEFAULTS["sliding_window"]
    return llama_family_config(hf, "mistral", MISTRAL_DEFAULTS, sliding_window=window, qkv_bias=False)


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    expect(
        config, "mistral", qkv_bias=False, attn_out_bias=False, mlp_bias=False, qk_norm=False, num_experts=0
    )
    return {
        **llama_family_hf_config(config, "MistralForCausalLM", "mistral"),
        "sliding_window": config.sliding_window,
    }


ARCH = Architecture(
    name="mistral",
    hf_architecture="MistralForCausalLM",
    model_type="mistral",
    config_from_hf=config_from_hf,
    hf_config_from=hf_config_from,
    param_maps=llama_family_maps,
    hf_base_prefix="model.",
    ignore_hf=LLAMA_FAMILY_IGNORE,
)


def mistral_tiny() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128,
        sliding_window=8,
    )


def mistral_7b() -> TransformerConfig:
    """Mistral 7B v0.3 (no sliding window)."""
    return TransformerConfig(
        vocab_size=32768,
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    )
