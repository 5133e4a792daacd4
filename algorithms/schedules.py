"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay to min_lr."""

from __future__ import annotations

import math

import torch

from core.config import OptimConfig


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "linear":
        scale = 1.0 - progress
    else:
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * scale


def build_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, max_steps, cfg) / cfg.lr)
