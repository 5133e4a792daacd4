"""Device and parameter dtype of a training rank: what every loop (and the workers hosting one) resolves
from `train.device` and `precision.dtype`."""

from __future__ import annotations

import torch

from core.config import PrecisionConfig
from core.errors import InputError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto": CUDA when present, else the CPU; ranks of one host take GPUs round-robin."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def param_dtype(precision: PrecisionConfig, device: torch.device, allow_fp16: bool = False) -> torch.dtype:
    """Parameter dtype: bf16 (with fp32 master weights and main grads) where the device supports it, else
    fp32 (CPU default). fp16 needs a loss scaler in the caller's loop: refused unless `allow_fp16` (the
    loops on the shared trainer pass a DynamicGradScaler to their ModelEngine)."""
    if precision.dtype == "fp16":
        if allow_fp16:
            return torch.float16
        raise InputError("precision.dtype=fp16 is not supported by this command yet: use bf16 or fp32")
    if precision.dtype == "bf16" or (
        precision.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return torch.float32
