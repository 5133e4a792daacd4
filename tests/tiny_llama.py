"""The RL tests' tiny Llama (the char tokenizer's 64 ids, hidden 64, 2 layers, 2 heads), in our GPTModel."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from core.models import preset
from core.transformer.config import TransformerConfig


def tiny_llama_config(num_kv_heads: int = 2, init_std: float | None = 0.1) -> TransformerConfig:
    """2 kv heads (the default) split over tp2; init_std None keeps the preset's init."""
    extra = {} if init_std is None else {"init_std": init_std}
    return dataclasses.replace(
        preset("llama_tiny"),
        vocab_size=64,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=2,
        num_kv_heads=num_kv_heads,
        head_dim=None,
        ffn_hidden_size=128,
        max_position_embeddings=32,
        **extra,
    )


def save_random_tiny_llama(path: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """tiny_llama_config() with weights drawn from `seed`, saved as an HF directory at path."""
    from core.bridge import save_hf
    from core.transformer.model import GPTModel

    torch.manual_seed(seed)
    save_hf(GPTModel(tiny_llama_config()), path, tokenizer_dir=tokenizer_dir)
    return path
