"""The tiny pretrain run the CLI tests share: configs/pretrain_tiny.yaml shrunk to a few seconds per run on 2
cores, on the same code paths as the demo. `fast(key=value, ...)` gives the overrides with some replaced or
added (keys with dots: pass them as **{"train.max_steps": 6})."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain_tiny.yaml"
FAST = [
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_hidden_size=128",
    "data.seq_len=32",
    "data.synthetic.n_train=2000",
    "data.synthetic.n_eval=50",
    "eval.num_problems=20",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.progress_bar=false",
    "optim.warmup_steps=2",
]


def fast(**changes: Any) -> list[str]:
    """FAST with the given keys set (replaced where FAST has them, appended otherwise)."""
    out = [item for item in FAST if item.split("=", 1)[0] not in changes]
    return out + [f"{key}={value}" for key, value in changes.items()]
