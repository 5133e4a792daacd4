"""Tiny random HF checkpoints of every supported architecture, built locally (no hub access).

Weights are re-drawn so that no mapping bug can hide behind HF's init: biases are non-zero and norm scales
are not all ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 128, 64, 4, 2, 16, 96, 2

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # tiny, so that all three frequency bands occur at head_dim 16
}

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    max_position_embeddings=128,
)

# name -> (config class, kwargs). The names are the test ids.
CASES: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, _COMMON),
    "llama3_rope": (transformers.LlamaConfig, {**_COMMON, "rope_parameters": LLAMA3_ROPE}),
    "qwen2": (transformers.Qwen2Config, {**_COMMON, "tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, {**_COMMON, "head_dim": 32, "tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, {**_COMMON, "sliding_window": 8}),
    "mixtral": (
        transformers.MixtralConfig,
        {**_COMMON, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "gpt2": (
        transformers.GPT2Config,
        dict(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in name or ".ln_" in name):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # scales in [0.5, 1.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def build_hf_model(
    case: str, out_dir: Path | None = None, seed: int = 0, **overrides: Any
) -> transformers.PreTrainedModel:
    """A random fp32 HF causal LM in eval mode; saved (safetensors) to out_dir when given."""
    config_cls, kwargs = CASES[case]
    config = config_cls(**{**kwargs, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model
