"""What an architecture preset provides: HF config <-> TransformerConfig, and a per-parameter map.

A ParamMap ties ONE of our parameters (name template with {i} = global layer index) to the HF tensors it is
made of, with the layout transforms both ways. Every conversion is one parameter at a time, so a refit can
stream parameters gathered (or sharded: the fused layouts are TP-invariant) from any training layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import InputError
from core.transformer.config import LLAMA3_ROPE_KEYS, TransformerConfig

ToHF = Callable[[torch.Tensor], Sequence[torch.Tensor]]
FromHF = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _single(t: torch.Tensor) -> Sequence[torch.Tensor]:
    return (t,)


def _only(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return ts[0]


@dataclass(frozen=True)
class ParamMap:
    ours: str  # e.g. "layers.{i}.self_attention.linear_qkv.weight"
    hf: tuple[str, ...]  # HF names, same {i}; to_hf returns the tensors in this order
    to_hf: ToHF = _single
    from_hf: FromHF = _only
    export: bool = True  # False: load-only alias (a tied output head is read from the embedding)


@dataclass(frozen=True)
class Architecture:
    name: str  # our preset name, e.g. "llama"
    hf_architecture: str  # config.json architectures[0], e.g. "LlamaForCausalLM"
    model_type: str  # config.json model_type
    config_from_hf: Callable[[dict[str, Any]], TransformerConfig]
    hf_config_from: Callable[[TransformerConfig], dict[str, Any]]
    param_maps: Callable[[TransformerConfig], list[ParamMap]]
    hf_base_prefix: str  # prefix of the base model's weights ("model."); some checkpoints omit it
    ignore_hf: tuple[str, ...] = ()  # regexes of checkpoint keys that hold no weights


def hf_rope(hf: dict[str, Any], default_theta: float) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 rope_scaling or None) from a v5 `rope_parameters` or legacy rope_theta/rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, {k: float(params[k]) for k in LLAMA3_ROPE_KEYS}
    raise InputError(f"rope_type {rope_type!r} is not supported (supported: default, llama3)")


def hf_rope_parameters(config: TransformerConfig) -> dict[str, Any]:
    """The v5 `rope_parameters` entry of config.json."""
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {"rope_type": "llama3", "rope_theta": config.rope_theta, **config.rope_scaling}


def require(hf: dict[str, Any], key: str, allowed: Sequence[Any], arch: str) -> None:
    """InputError unless hf[key] (when present) is one of `allowed` (features we do not implement)."""
    if key in hf and hf[key] not in allowed:
        raise InputError(f"{arch}: {key}={hf[key]!r} is not supported (supported: {list(allowed)})")
