"""Architecture presets: HF config <-> TransformerConfig, per-parameter HF name maps, and named sizes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.errors import InputError
from core.models import gpt2, llama, mistral, mixtral, qwen2, qwen3
from core.models.base import Architecture, ParamMap
from core.transformer.config import TransformerConfig

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (llama.ARCH, qwen2.ARCH, qwen3.ARCH, mistral.ARCH, mixtral.ARCH, gpt2.ARCH)
}

PRESETS: dict[str, Callable[[], TransformerConfig]] = {
    "llama_tiny": llama.llama_tiny,
    "llama_370m": llama.llama_370m,
    "llama_1b": llama.llama_1b,
    "llama3_8b": llama.llama3_8b,
    "qwen2_tiny": qwen2.qwen2_tiny,
    "qwen3_tiny": qwen3.qwen3_tiny,
    "qwen3_0_6b": qwen3.qwen3_0_6b,
    "mistral_tiny": mistral.mistral_tiny,
    "mistral_7b": mistral.mistral_7b,
    "mixtral_tiny": mixtral.mixtral_tiny,
    "gpt2_tiny": gpt2.gpt2_tiny,
    "gpt2_small": gpt2.gpt2_small,
}


def get_architecture(key: str) -> Architecture:
    """By our name ("llama"), HF architectures[0] ("LlamaForCausalLM") or HF model_type."""
    for arch in ARCHITECTURES.values():
        if key in (arch.name, arch.hf_architecture, arch.model_type):
            return arch
    raise InputError(f"unknown architecture {key!r} (supported: {sorted(ARCHITECTURES)})")


def architecture_of_hf_config(hf: dict[str, Any]) -> Architecture:
    """The preset for a config.json: by architectures[0], else model_type."""
    keys = [*(hf.get("architectures") or [])[:1], hf.get("model_type")]
    for key in filter(None, keys):
        try:
            return get_architecture(key)
        except InputError:
            continue
    raise InputError(f"unsupported architecture {keys} (supported: {sorted(ARCHITECTURES)})")


def infer_architecture(config: TransformerConfig) -> Architecture:
    """The simplest HF architecture that can express `config` (Mistral is Llama plus a sliding window)."""
    if config.position_embedding == "learned":
        return ARCHITECTURES["gpt2"]
    if config.is_moe:
        return ARCHITECTURES["mixtral"]
    if config.qk_norm:
        return ARCHITECTURES["qwen3"]
    if config.qkv_bias and not config.attn_out_bias:
        return ARCHITECTURES["qwen2"]
    return ARCHITECTURES["mistral" if config.sliding_window is not None else "llama"]


def preset(name: str) -> TransformerConfig:
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r} (known: {sorted(PRESETS)})")
    return PRESETS[name]()


__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Architecture",
    "ParamMap",
    "architecture_of_hf_config",
    "get_architecture",
    "infer_architecture",
    "preset",
]
