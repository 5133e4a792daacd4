"""Export LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(hf_model, path)` loads onto the transformers model of our architecture.

A fused layer of ours stands for several HF linears (core/bridge/convert.py). Its update B A splits by rows
of W like W itself, so each HF linear gets the whole (shared) A and its own rows of B:
    linear_qkv  -> q_proj, k_proj, v_proj   lora_A = A for each, lora_B = the q / k / v rows of B
    linear_fc1  -> gate_proj, up_proj       lora_A = A for each, lora_B = the gate / up rows of B
    linear_proj -> o_proj, linear_fc2 -> down_proj: A and B as they are
The row split is the bridge's own to_hf of the layer's weight applied to B (out, r): the fused layouts are row
permutations and splits (core/models/layouts.py) and act on B's rows as on W's. Architectures whose HF
linears are stored transposed (GPT-2's Conv1D) are refused. PEFT's scale is lora_alpha / r, as ours.
Saved keys: base_model.model.<HF module>.lora_A.weight and .lora_B.weight (PEFT drops the adapter name).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from core.bridge.convert import NameMap, resolve_architecture
from core.errors import InputError
from core.models import Architecture
from core.parallel.collectives import group_size
from core.tensor_parallel.lora import lora_layers, lora_state
from core.transformer.config import TransformerConfig

if TYPE_CHECKING:
    from core.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _full_adapter_state(
    source: nn.Module | Sequence[nn.Module] | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    if any(group_size(layer.tp_group) > 1 for layer in lora_layers(source)):
        raise ValueError(
            "save_peft_adapter got tensor-parallel shards: pass lora_state(chunks, tp_group) (gathered) instead"
        )
    return lora_state(source)


def peft_adapter_tensors(
    adapters: Mapping[str, torch.Tensor], config: TransformerConfig, arch: Architecture | str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(PEFT-named tensors, HF target module names) of full adapter factors {our layer.lora_A/B: tensor}."""
    arch = resolve_architecture(arch, config)
    names = NameMap(config, arch)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for layer in sorted({k.rpartition(".")[0] for k in adapters}):
        A, B = adapters[f"{layer}.lora_A"], adapters[f"{layer}.lora_B"]  # (r, in), (out, r)
        param_map, hf_weights = names.lookup(f"{layer}.weight")
        b_parts = param_map.to_hf(B.detach())
        rank = A.shape[0]
        if len(b_parts) != len(hf_weights) or any(b.dim() != 2 or b.shape[1] != rank for b in b_parts):
            raise InputError(
                f"{arch.name}: {layer} does not map to HF linears stored (out, in); PEFT export supports the "
                "Llama-style architectures (llama, mistral, qwen2, qwen3, mixtral attention)"
            )
        for hf_weight, b in zip(hf_weights, b_parts, strict=True):
            module = hf_weight.removesuffix(".weight")
            # clone: safetensors refuses tensors sharing storage (A is shared by q/k/v, B's parts are views).
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.detach().cpu().clone()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.cpu().contiguous().clone()
            targets.add(module.rpartition(".")[2])
    return tensors, sorted(targets)


def peft_adapter_config(
    lora_cfg: LoraConfig, target_modules: list[str], base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """adapter_config.json for peft.LoraConfig (keys PEFT reads; the rest take PEFT's defaults)."""
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft_adapter(
    source: nn.Module | Sequence[nn.Module] | Mapping[str, torch.Tensor],
    config: TransformerConfig,
    arch: Architecture | str | None,
    path: str | Path,
    lora_cfg: LoraConfig,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors under path; returns path.

    source: the adapted model (tp = 1 chunks: one GPTModel, or the pp stages' chunks together), or the FULL
    adapter state {layer.lora_A / lora_B: tensor} of the whole model, e.g. lora_state(chunks, tp_group) of
    every pp stage merged on one rank. arch: None picks the simplest HF architecture for config.
    """
    adapters = _full_adapter_state(source)
    if not adapters:
        raise ValueError("save_peft_adapter: the source holds no LoRA adapters")
    tensors, targets = peft_adapter_tensors(adapters, config, arch)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapter_config = peft_adapter_config(lora_cfg, targets, base_model_name_or_path)
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return path


def write_peft_adapter(
    chunks: Sequence[nn.Module],
    groups: Any,
    config: TransformerConfig,
    arch: Architecture | str | None,
    path: str | Path,
    lora_cfg: LoraConfig,
) -> Path | None:
    """save_peft_adapter from a training layout (collective): every tp rank gathers its stage's adapters,
    the pp stages send theirs to pp rank 0, and global rank 0 writes. Returns the path there, else None."""
    import dataclasses

    import torch.distributed as dist

    from core.tensor_parallel.lora import lora_state

    tp_group = groups.tp_group if groups is not None else None
    state = {k: v.float().cpu() for k, v in lora_state(chunks, tp_group).items()}
    if groups is not None and groups.pp_size > 1:
        parts: list[Any] | None = [None] * groups.pp_size if groups.pp_rank == 0 else None
        dist.gather_object(state, parts, dst=groups.ranks["pp"][0], group=groups.pp_group)
        state = {k: v for part in parts or [] for k, v in part.items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return save_peft_adapter(state, dataclasses.replace(config, fp8="off"), arch, path, lora_cfg)
