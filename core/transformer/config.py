"""TransformerConfig: the one description of a decoder-only model that every layer is built from.

It carries architecture only (no parallel layout, no HF names); presets in core/models translate
HF configs to and from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import InputError

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class TransformerConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int | None = None  # None: num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 4096
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    # swiglu: silu(gate) * up (Llama family); gelu: tanh-approximate GELU, HF's gelu_new (GPT-2).
    activation: Literal["swiglu", "gelu"] = "swiglu"
    position_embedding: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    # None or Llama 3 scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}.
    rope_scaling: dict[str, float] | None = None
    # Each query sees at most this many keys, itself included (Mistral); None: full causal attention.
    sliding_window: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    num_experts: int = 0  # 0: dense MLP in every layer
    moe_top_k: int = 2
    moe_ffn_hidden_size: int | None = None  # None: ffn_hidden_size
    moe_aux_loss_coeff: float = 0.0
    moe_norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (Mixtral)
    init_std: float = 0.02
    # GEMMs of the attention and MLP linears: off (bf16), torch (per-tensor fp8 through torch._scaled_mm)
    # or te (needs transformer_engine); see core/tensor_parallel/fp8.py. Checked when the layers are built.
    fp8: Literal["off", "torch", "te"] = "off"
    # What the last stage outputs: lm = vocab-parallel logits (B, T, V/tp); value = one scalar per position
    # (B, T, 1) from a replicated nn.Linear(hidden, 1) "value_head" (critic / reward model). A value model
    # has no output_layer, so it cannot tie embeddings.
    head: Literal["lm", "value"] = "lm"

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        self._validate()

    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_kv_heads:
            raise InputError(
                f"TransformerConfig: num_attention_heads={self.num_attention_heads} is not divisible "
                f"by num_kv_heads={self.num_kv_heads}"
            )
        if self.norm not in ("rmsnorm", "layernorm"):
            raise InputError(f"TransformerConfig.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.activation not in ("swiglu", "gelu"):
            raise InputError(
                f"TransformerConfig.activation must be 'swiglu' or 'gelu', got {self.activation!r}"
            )
        if self.position_embedding not in ("rope", "learned"):
            raise InputError(
                f"TransformerConfig.position_embedding must be 'rope' or 'learned', got {self.position_embedding!r}"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise InputError(f"TransformerConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None and set(self.rope_scaling) != set(LLAMA3_ROPE_KEYS):
            raise InputError(
                f"TransformerConfig.rope_scaling must have exactly the keys {LLAMA3_ROPE_KEYS}, "
                f"got {sorted(self.rope_scaling)}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise InputError(f"TransformerConfig.sliding_window must be positive, got {self.sliding_window}")
        if self.head not in ("lm", "value"):
            raise InputError(f"TransformerConfig.head must be 'lm' or 'value', got {self.head!r}")
        if self.head == "value" and self.tie_embeddings:
            raise InputError(
                "TransformerConfig: head='value' has no output layer to tie; set tie_embeddings=False"
            )
        if self.num_experts < 0 or (self.num_experts and not 0 < self.moe_top_k <= self.num_experts):
            raise InputError(
                f"TransformerConfig: moe_top_k={self.moe_top_k} must be in [1, num_experts={self.num_experts}]"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"TransformerConfig: unknown fields {unknown}")
        return cls(**d)
