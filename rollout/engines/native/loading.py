"""How a NativeEngine is built: argument checks, loading an HF checkpoint directory onto a GPTModel (any TP
layout), and resolving its tokenizer and EOS ids."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.bridge.hf import SafetensorsCheckpoint, default_dtype, read_hf_config
from core.errors import InputError
from core.models import Architecture
from core.transformer.model import GPTModel
from rollout.engines.native.weights import HFWeightLoader

PathLike = str | os.PathLike[str]


def check_sizes(
    max_model_len: int, max_num_seqs: int, max_prefill_tokens: int, kv_cache_tokens: int, block_size: int
) -> None:
    sizes = {
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "max_prefill_tokens": max_prefill_tokens,
        "kv_cache_tokens": kv_cache_tokens,
        "block_size": block_size,
    }
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"NativeEngine: {name} must be an int >= 1, got {value!r}")
    if block_size & (block_size - 1):
        raise InputError(f"NativeEngine: block_size must be a power of two, got {block_size}")
    if kv_cache_tokens < max_model_len:
        raise InputError(
            f"NativeEngine: kv_cache_tokens={kv_cache_tokens} < max_model_len={max_model_len}: "
            "the KV pool must hold at least one whole sequence"
        )


def device_of(model: GPTModel) -> torch.device:
    return next(model.parameters()).device


def empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_given_model(
    model: GPTModel,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    tp_group: dist.ProcessGroup | None,
) -> None:
    """A given model is used as is (no copy): device, dtype and tp_group must be its own."""
    if not isinstance(model, GPTModel):
        raise InputError(f"model must be a core.transformer.model.GPTModel, got {type(model).__name__}")
    param = next(model.parameters())
    if device is not None and torch.device(device) != param.device:
        raise InputError(f"device={device} but the model is on {param.device}; the engine does not copy it")
    if dtype is not None and dtype != param.dtype:
        raise InputError(f"dtype={dtype} but the model is {param.dtype}; the engine does not cast it")
    if tp_group is not None and tp_group is not model.output_layer.tp_group:
        raise InputError("tp_group differs from the one the model was built with")


def load_model_dir(
    path: Path, device: str | torch.device | None, dtype: torch.dtype, tp_group: dist.ProcessGroup | None
) -> tuple[GPTModel, Architecture]:
    """Build GPTModel(config, tp_group) on `device` and load this rank's shards of the checkpoint."""
    arch, config = read_hf_config(path)
    target = torch.device(device) if device is not None else default_device()
    with default_dtype(dtype):
        model = GPTModel(config, tp_group=tp_group).to(target).eval()
    checkpoint = SafetensorsCheckpoint(path, arch.hf_base_prefix)
    try:
        HFWeightLoader(model, arch, tp_group).load((name, checkpoint.get(name)) for name in checkpoint.keys())
    finally:
        checkpoint.close()
    return model, arch


def default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def resolve_tokenizer(tokenizer: Any | None, model_dir: PathLike | None) -> Any | None:
    from core.data.tokenizer import load_tokenizer

    if isinstance(tokenizer, str | os.PathLike):
        return load_tokenizer(tokenizer)
    if tokenizer is None and model_dir is not None:
        has_files = any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return load_tokenizer(model_dir) if has_files else None
    return tokenizer


def resolve_eos(
    eos_token_ids: Sequence[int] | None, model_dir: PathLike | None, tokenizer: Any | None
) -> frozenset[int]:
    """Explicit ids, else generation_config.json's, else config.json's (what HF generate stops at),
    else the tokenizer's eos_token_id, else none."""
    if eos_token_ids is not None:
        return frozenset(int(t) for t in eos_token_ids)
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name if model_dir is not None else None
        if path is not None and path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset(eos if isinstance(eos, list) else [eos])
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos])
