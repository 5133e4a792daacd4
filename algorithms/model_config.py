"""The `model:` config section shared by training commands: an architecture preset plus typed overrides,
or a local Hugging Face checkpoint to start from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from core.config import Schema
from core.errors import InputError

Arch = Literal["llama", "qwen2", "qwen3", "mistral", "mixtral", "gpt2"]


class ModelConfig(Schema):
    arch: Arch = Field("llama", description="architecture preset: norms, activation, positions, biases")
    init_from: str | None = Field(None, description="local HF checkpoint directory to start from")
    vocab_size: int | None = Field(None, ge=1, description="None: the tokenizer's size, rounded up to 64")
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="None: same as num_attention_heads")
    head_dim: int | None = Field(None, ge=1, description="None: hidden_size // num_attention_heads")
    ffn_hidden_size: int | None = Field(None, ge=1, description="None: the preset's default")
    max_position_embeddings: int = Field(512, ge=1)
    tie_embeddings: bool | None = None
    rope_theta: float | None = Field(None, gt=0)
    num_experts: int | None = Field(None, ge=0)
    moe_top_k: int | None = Field(None, ge=1)
    moe_ffn_hidden_size: int | None = Field(None, ge=1)

    def overrides(self) -> dict:
        """The architecture fields the user set (None means: the preset's default)."""
        skip = {"arch", "init_from"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}

    def check_paths(self) -> None:
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise InputError(f"model.init_from: no HF checkpoint (config.json) at {self.init_from}")
