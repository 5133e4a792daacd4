"""Mixtral: Mistral attention with a sparse MoE of SwiGLU experts in every layer.

Checkpoints hold experts one by one (block_sparse_moe.experts.{e}.w1/w2/w3): that is what transformers 5.x
save_pretrained writes (it converts its in-memory fused mlp.experts.gate_up_proj back) and what vLLM reads.
"""

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

MIXTRAL_DEFAULTS: dict[str, Any] = {
    **LLAMA_DEFAULTS,
    "max_position_embeddings": 4096 * 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001,
}


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    get = {**MIXTRAL_DEFAULTS, **hf}.get
    return llama_family_config(
        hf,
        "mixtral",
        MIXTRAL_DEFAULTS,
        qkv_bias=False,
        mlp_bias=False,
        sliding_window=hf.get("sliding_window"),
        num_experts=get("num_local_experts"),
        moe_top_k=get("num_experts_per_tok"),
        moe_ffn_hidden_size=hf["intermediate_size"],
        moe_aux_loss_coeff=get("router_aux_loss_coef"),
        moe_norm_topk_prob=True,
    )


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    expect(config, "mixtral", qkv_bias=False, attn_out_bias=False, qk_norm=False, moe_norm_topk_prob=True)
    expect(config, "mixtral", is_moe=True)
    return {
        **llama_family_hf_config(config, "MixtralForCausalLM", "mixtral"),
        "intermediate_size": config.moe_ffn_hidden_size,
        "sliding_window": config.sliding_window,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.moe_top_k,
        "router_aux_loss_coef": config.moe_aux_loss_coeff,
    }


ARCH = Architecture(
    name="mixtral",
    hf_architecture="MixtralForCausalLM",
    model_type="mixtral",
    config_from_hf=config_from_hf,
    hf_config_from=hf_config_from,
    param_maps=llama_family_maps,
    hf_base_prefix="model.",
    ignore_hf=LLAMA_FAMILY_IGNORE,
)


def mixtral_tiny() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=64,
        num_experts=4,
        moe_top_k=2,
        moe_aux_loss_coeff=0.02,
        rope_theta=1000000.0,
    )
