"""Llama (1, 2, 3.x) and the shared Llama-family pieces used by Qwen2, Qwen3, Mistral and Mixtral.

HF <-> ours, per layer i (HF prefix model.layers.{i}.):
    self_attn.{q,k,v}_proj.{weight,bias}   <-> self_attention.linear_qkv.{weight,bias}   (fuse_qkv)
    self_attn.o_proj.{weight,bias}         <-> self_attention.linear_proj.{weight,bias}
    self_attn.{q,k}_norm.weight            <-> self_attention.{q,k}_norm.weight          (Qwen3)
    mlp.{gate,up}_proj.{weight,bias}       <-> mlp.linear_fc1.{weight,bias}              (fuse_gate_up)
    mlp.down_proj.{weight,bias}            <-> mlp.linear_fc2.{weight,bias}
    block_sparse_moe.gate.weight           <-> mlp.router.weight                         (Mixtral)
    block_sparse_moe.experts.{e}.w1/w3     <-> mlp.experts.w_gate_up[e]                  (fuse_gate_up)
    block_sparse_moe.experts.{e}.w2        <-> mlp.experts.w_down[e]
    input_layernorm / post_attention_layernorm <-> input_norm / pre_mlp_norm
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from core.errors import InputError
from core.models.base import Architecture, ParamMap, hf_rope, hf_rope_parameters, require
from core.models.layouts import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from core.transformer.config import TransformerConfig

# HF LlamaConfig defaults for the keys a checkpoint may omit.
LLAMA_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
}


def llama_family_config(
    hf: dict[str, Any], arch: str, defaults: dict[str, Any], **fixed: Any
) -> TransformerConfig:
    """TransformerConfig from a Llama-family config.json; `fixed` sets the fields the architecture implies."""
    require(hf, "hidden_act", ("silu",), arch)
    get = {**defaults, **{k: v for k, v in hf.items() if v is not None}}.get
    theta, scaling = hf_rope(hf, get("rope_theta"))
    heads = hf["num_attention_heads"]
    bias = bool(get("attention_bias", False))
    kwargs: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=get("num_key_value_heads", heads),
        head_dim=get("head_dim", hf["hidden_size"] // heads),
        ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=get("max_position_embeddings"),
        norm="rmsnorm",
        norm_eps=get("rms_norm_eps"),
        activation="swiglu",
        position_embedding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bool(get("mlp_bias", False)),
        tie_embeddings=get("tie_word_embeddings"),
        init_std=get("initializer_range"),
    )
    return TransformerConfig(**{**kwargs, **fixed})


def expect(config: TransformerConfig, arch: str, **fields: Any) -> None:
    """InputError unless the config has these field values (those the HF architecture cannot express)."""
    wrong = {k: getattr(config, k) for k, v in fields.items() if getattr(config, k) != v}
    if wrong:
        raise InputError(f"{arch} cannot express {wrong} (it needs { ({k: fields[k] for k in wrong}) })")


def llama_family_hf_config(
    config: TransformerConfig, hf_architecture: str, model_type: str
) -> dict[str, Any]:
    """The config.json keys every Llama-family architecture shares."""
    expect(config, model_type, norm="rmsnorm", activation="swiglu", position_embedding="rope")
    return {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": hf_rope_parameters(config),
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
    }


def _qkv_to_hf(t: torch.Tensor, head_dim: int, group_size: int) -> tuple[torch.Tensor, ...]:
    return split_qkv(t, head_dim, group_size)


def _qkv_from_hf(ts: tuple[torch.Tensor, ...], head_dim: int) -> torch.Tensor:
    return fuse_qkv(*ts, head_dim=head_dim)


def _gate_up_from_hf(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return fuse_gate_up(*ts)


def _experts_gate_up_to_hf(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    gate, up = split_gate_up(t, dim=1)  # (E, F, H) each
    return (*gate.unbind(0), *up.unbind(0))


def _experts_gate_up_from_hf(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    n = len(ts) // 2
    return fuse_gate_up(torch.stack(ts[:n]), torch.stack(ts[n:]), dim=1)


def _experts_down_to_hf(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return t.unbind(0)


def _experts_down_from_hf(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack(ts)


def _attention_maps(config: TransformerConfig) -> list[ParamMap]:
    ours, hf = "layers.{i}.self_attention.", "model.layers.{i}.self_attn."
    group_size = config.num_attention_heads // config.num_kv_heads
    to_hf = partial(_qkv_to_hf, head_dim=config.head_dim, group_size=group_size)
    from_hf = partial(_qkv_from_hf, head_dim=config.head_dim)
    kinds = ["weight", "bias"] if config.qkv_bias else ["weight"]
    maps = [
        ParamMap(f"{ours}linear_qkv.{kind}", tuple(f"{hf}{p}_proj.{kind}" for p in "qkv"), to_hf, from_hf)
        for kind in kinds
    ]
    maps.append(ParamMap(f"{ours}linear_proj.weight", (f"{hf}o_proj.weight",)))
    if config.attn_out_bias:
        maps.append(ParamMap(f"{ours}linear_proj.bias", (f"{hf}o_proj.bias",)))
    if config.qk_norm:
        maps += [ParamMap(f"{ours}{n}_norm.weight", (f"{hf}{n}_norm.weight",)) for n in "qk"]
    return maps


def _dense_mlp_maps(config: TransformerConfig) -> list[ParamMap]:
    ours, hf = "layers.{i}.mlp.", "model.layers.{i}.mlp."
    maps = []
    for kind in ["weight", "bias"] if config.mlp_bias else ["weight"]:
        gate_up = (f"{hf}gate_proj.{kind}", f"{hf}up_proj.{kind}")
        maps.append(ParamMap(f"{ours}linear_fc1.{kind}", gate_up, split_gate_up, _gate_up_from_hf))
        maps.append(ParamMap(f"{ours}linear_fc2.{kind}", (f"{hf}down_proj.{kind}",)))
    return maps


def _moe_maps(config: TransformerConfig) -> list[ParamMap]:
    ours, hf = "layers.{i}.mlp.", "model.layers.{i}.block_sparse_moe."
    experts = range(config.num_experts)
    gate_up = tuple(f"{hf}experts.{e}.{w}.weight" for w in ("w1", "w3") for e in experts)
    down = tuple(f"{hf}experts.{e}.w2.weight" for e in experts)
    return [
        ParamMap(f"{ours}router.weight", (f"{hf}gate.weight",)),
        ParamMap(f"{ours}experts.w_gate_up", gate_up, _experts_gate_up_to_hf, _experts_gate_up_from_hf),
        ParamMap(f"{ours}experts.w_down", down, _experts_down_to_hf, _experts_down_from_hf),
    ]


def llama_family_maps(config: TransformerConfig) -> list[ParamMap]:
    maps = [
        ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        ParamMap("layers.{i}.input_norm.weight", ("model.layers.{i}.input_layernorm.weight",)),
        ParamMap("layers.{i}.pre_mlp_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
        *_attention_maps(config),
        *(_moe_maps(config) if config.is_moe else _dense_mlp_maps(config)),
        ParamMap("final_norm.weight", ("model.norm.weight",)),
    ]
    if config.tie_embeddings:
        maps.append(ParamMap("output_layer.weight", ("model.embed_tokens.weight",), export=False))
    else:
        maps.append(ParamMap("output_layer.weight", ("lm_head.weight",)))
    return maps


LLAMA_FAMILY_IGNORE = (r"lm_head\.weight", r".*\.rotary_emb\.inv_freq")


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    return llama_family_config(hf, "llama", LLAMA_DEFAULTS)


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    expect(config, "llama", qk_norm=False, num_experts=0, sliding_window=None, attn_out_bias=config.qkv_bias)
    return {
        **llama_family_hf_config(config, "LlamaForCausalLM", "llama"),
        "attention_bias": config.qkv_bias,
        "mlp_bias": config.mlp_bias,
    }


ARCH = Architecture(
    name="llama",
    hf_architecture="LlamaForCausalLM",
    model_type="llama",
    config_from_hf=config_from_hf,
    hf_config_from=hf_config_from,
    param_maps=llama_family_maps,
    hf_base_prefix="model.",
    ignore_hf=LLAMA_FAMILY_IGNORE,
)


def llama_tiny() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128,
    )


def llama_370m() -> TransformerConfig:
    """The 0.37B Llama-like shape of the TRL GRPO baseline in ENVIRONMENT.md (`rl bench grpo`)."""
    return TransformerConfig(
        vocab_size=32000,
        hidden_size=1024,
        num_layers=24,
        num_attention_heads=16,
        num_kv_heads=16,
        ffn_hidden_size=2816,
        max_position_embeddings=4096,
    )


def llama_1b() -> TransformerConfig:
    """The ~1B Llama-like shape of the GPU baseline in ENVIRONMENT.md (multi-head attention)."""
    return TransformerConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_attention_heads=16,
        num_kv_heads=16,
        ffn_hidden_size=5632,
        max_position_embeddings=4096,
    )


def llama3_8b() -> TransformerConfig:
    """Llama 3.1 8B."""
    return TransformerConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
