"""GPT-2: LayerNorm, learned positions, GELU (tanh), biases everywhere, tied output head.

HF's Conv1D stores weights as (in, out), the transpose of nn.Linear; c_attn's output columns are [q; k; v].
HF <-> ours, per layer i (HF prefix transformer.h.{i}.):
    ln_1 / ln_2                 <-> input_norm / pre_mlp_norm
    attn.c_attn.{weight,bias}   <-> self_attention.linear_qkv.{weight,bias}   (transpose, fuse_qkv)
    attn.c_proj.{weight,bias}   <-> self_attention.linear_proj.{weight,bias}  (transpose)
    mlp.c_fc / mlp.c_proj       <-> mlp.linear_fc1 / mlp.linear_fc2           (transpose)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from core.models.base import Architecture, ParamMap, require
from core.models.layouts import fuse_qkv, split_qkv
from core.models.llama import expect
from core.transformer.config import TransformerConfig


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gpt2")
    require(hf, "scale_attn_weights", (True,), "gpt2")
    require(hf, "scale_attn_by_inverse_layer_idx", (False,), "gpt2")
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["n_embd"],
        num_layers=hf["n_layer"],
        num_attention_heads=hf["n_head"],
        ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
        max_position_embeddings=hf.get("n_positions", 1024),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation="gelu",
        position_embedding="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    expect(config, "gpt2", norm="layernorm", activation="gelu", position_embedding="learned", qk_norm=False)
    expect(
        config, "gpt2", qkv_bias=True, attn_out_bias=True, mlp_bias=True, num_experts=0, sliding_window=None
    )
    expect(
        config,
        "gpt2",
        num_kv_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
    )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_attention_heads,
        "n_inner": config.ffn_hidden_size,
        "n_positions": config.max_position_embeddings,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": "gelu_new",
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
    }


def _transposed(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ts[0].transpose(0, 1)


def _transpose(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t.transpose(0, 1),)


def _c_attn_from_hf(ts: tuple[torch.Tensor, ...], head_dim: int) -> torch.Tensor:
    """c_attn weight (H, 3H) or bias (3H,) -> our fused QKV (3H, H) or (3H,); MHA: group size 1."""
    w = ts[0].transpose(0, 1) if ts[0].dim() == 2 else ts[0]
    return fuse_qkv(*w.chunk(3, dim=0), head_dim=head_dim)


def _c_attn_to_hf(t: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
    w = torch.cat(split_qkv(t, head_dim, group_size=1), dim=0)  # (3H, ...) as [q; k; v]
    return (w.transpose(0, 1) if w.dim() == 2 else w,)


def gpt2_maps(config: TransformerConfig) -> list[ParamMap]:
    hf = "transformer.h.{i}."
    to_hf = partial(_c_attn_to_hf, head_dim=config.head_dim)
    from_hf = partial(_c_attn_from_hf, head_dim=config.head_dim)
    maps = [
        ParamMap("embedding.word_embeddings.weight", ("transformer.wte.weight",)),
        ParamMap("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
        ParamMap("layers.{i}.self_attention.linear_qkv.weight", (f"{hf}attn.c_attn.weight",), to_hf, from_hf),
        ParamMap("layers.{i}.self_attention.linear_qkv.bias", (f"{hf}attn.c_attn.bias",), to_hf, from_hf),
        ParamMap("layers.{i}.self_attention.linear_proj.bias", (f"{hf}attn.c_proj.bias",)),
        ParamMap("layers.{i}.mlp.linear_fc1.bias", (f"{hf}mlp.c_fc.bias",)),
        ParamMap("layers.{i}.mlp.linear_fc2.bias", (f"{hf}mlp.c_proj.bias",)),
    ]
    conv1d = {
        "self_attention.linear_proj": "attn.c_proj",
        "mlp.linear_fc1": "mlp.c_fc",
        "mlp.linear_fc2": "mlp.c_proj",
    }
    for ours, theirs in conv1d.items():
        maps.append(
            ParamMap(f"layers.{{i}}.{ours}.weight", (f"{hf}{theirs}.weight",), _transpose, _transposed)
        )
    norms = {
        "layers.{i}.input_norm": f"{hf}ln_1",
        "layers.{i}.pre_mlp_norm": f"{hf}ln_2",
        "final_norm": "transformer.ln_f",
    }
    for ours, theirs in norms.items():
        maps += [ParamMap(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]
    head = "transformer.wte.weight" if config.tie_embeddings else "lm_head.weight"
    maps.append(ParamMap("output_layer.weight", (head,), export=not config.tie_embeddings))
    return maps


ARCH = Architecture(
    name="gpt2",
    hf_architecture="GPT2LMHeadModel",
    model_type="gpt2",
    config_from_hf=config_from_hf,
    hf_config_from=hf_config_from,
    param_maps=gpt2_maps,
    hf_base_prefix="transformer.",
    # attn.bias / attn.masked_bias: causal-mask buffers that old checkpoints stored.
    ignore_hf=(r"lm_head\.weight", r"transformer\.h\.\d+\.attn\.(masked_)?bias"),
)


def gpt2_tiny() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        norm="layernorm",
        activation="gelu",
        position_embedding="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    )


def gpt2_small() -> TransformerConfig:
    """GPT-2 124M."""
    return TransformerConfig(
        vocab_size=50257,
        hidden_size=768,
        num_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
        norm="layernorm",
        activation="gelu",
        position_embedding="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    )
