"""The `model:` config section shared by training commands: an architecture preset plus typed overrides,
or a local Hugging Face checkpoint to start from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from core.config import InputPath, Schema
from core.errors import InputError

Arch = Literal["llama", "qwen2", "qwen3", "mistral", "mixtral", "gpt2"]


class ModelConfig(Schema):
    arch: Arch = Field("llama", description="architecture preset: norms, activation, positions, biases")
    init_from: InputPath | None = Field(
        None,
        description="start from these weights (architecture included): an HF directory, a run directory of "
        "any stage, or one of its checkpoints/step_N",
    )
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
        if self.init_from is not None:
            from algorithms.rl_inputs import resolve_init

            resolve_init(self.init_from)

    def transformer_config(self, vocab_size: int):
        """The preset's architecture (norms, positions, biases) with the dimensions the config sets, or the
        architecture of model.init_from."""
        import dataclasses

        from core.models import preset

        if self.init_from is not None:
            from algorithms.rl_inputs import init_config, resolve_init

            return init_config(resolve_init(self.init_from))
        fields = self.overrides()
        fields.setdefault("vocab_size", -(-vocab_size // 64) * 64)
        for key in ("num_kv_heads", "head_dim", "ffn_hidden_size"):
            fields.setdefault(key, None)
        try:
            return dataclasses.replace(preset(f"{self.arch}_tiny"), **fields)
        except (ValueError, TypeError) as e:
            raise InputError(f"model: {e}") from None

    def initial_model(self, vocab_size: int):
        """(the whole initial model, fp32 on the CPU, its HF architecture or None): fresh weights from the
        current torch seed, or model.init_from's."""
        from core.transformer.model import GPTModel

        if self.init_from is not None:
            from algorithms.rl_inputs import load_init, resolve_init

            return load_init(resolve_init(self.init_from))
        return GPTModel(self.transformer_config(vocab_size)), None


class SourceModelConfig(Schema):
    """`model:` of a loop that starts from trained weights (sft, dpo, rm, grpo, ...). Architecture fields
    are optional; when given they must match the source's (a mismatch stops before any work)."""

    init_from: InputPath = Field(
        description="an HF directory, a converted (native) directory, a run directory of any stage (its hf/ "
        "or newest checkpoint) or one of its checkpoints/step_N"
    )
    tokenizer: InputPath | None = Field(
        None, description="tokenizer dir; default: the one next to the weights"
    )
    arch: Arch | None = Field(None, description="if set: must be the source's architecture family")
    hidden_size: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    vocab_size: int | None = Field(None, ge=1)

    def check_source(self, config: Any, arch_name: str | None) -> None:
        """InputError when a set architecture field differs from the source model's."""
        for key in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "vocab_size"):
            want = getattr(self, key)
            have = getattr(config, key, None)
            if key == "num_kv_heads" and have is None:
                have = config.num_attention_heads
            if want is not None and want != have:
                raise InputError(
                    f"model.{key}={want} but model.init_from ({self.init_from}) has {key}={have}: drop "
                    f"model.{key} or start from a matching model"
                )
        if self.arch is not None and arch_name is not None and not arch_name.lower().startswith(self.arch):
            raise InputError(
                f"model.arch={self.arch} but model.init_from ({self.init_from}) is a {arch_name} model"
            )
