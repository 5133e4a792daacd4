"""`rl bench grpo --async`: seconds per GRPO step on Ray with the engines on workers of their own, the
synchronous loop (baseline) next to rollout.asynchronous (max_staleness 1: the engines generate step k+1
while the policy trains step k), measured in the same process on the same local Ray cluster.

Both runs are the real `rl grpo` on Ray (rl.grpo_cluster.ClusterRun, placement disaggregated: one policy
worker, one engine worker, refit over a gloo transport each step) on random weights of a model preset,
the char tokenizer and the embedded arithmetic task; the same config but for rollout.asynchronous.
time/step comes from the loop's own metrics; the first `warmup` steps are not counted. The async row
also shows how long a step waited for its samples (generate) and how long generating them took in the
background: the overlap is the difference.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINE = "synchronous (baseline)"
COLUMNS = ("generate", "generate_background", "logprobs", "train", "refit")


@dataclass
class AsyncShape:
    preset: str = "llama_tiny"
    prompts: int = 8
    n: int = 8
    new_tokens: int = 24
    micro_batch_size: int = 16
    steps: int = 4
    warmup: int = 1
    max_staleness: int = 1


@dataclass
class AsyncResult:
    name: str
    step_s: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


def random_hf_model(preset_name: str, root: Path) -> Path:
    """Random weights of a preset (vocabulary at least the char tokenizer's) as an HF directory."""
    import torch

    from core.bridge import save_hf
    from core.data.synthetic import save_char_tokenizer
    from core.models import preset
    from core.transformer.model import GPTModel

    tokenizer_dir = save_char_tokenizer(root / "tokenizer")
    config = preset(preset_name)
    torch.manual_seed(0)
    save_hf(GPTModel(config), root / "hf", tokenizer_dir=tokenizer_dir)
    return root / "hf"


def bench_config(shape: AsyncShape, hf_dir: Path, run_dir: Path, asynchronous: bool) -> Any:
    from rl.grpo_cluster import ClusterGRPOConfig

    return ClusterGRPOConfig.model_validate(
        {
            "run": {"dir": str(run_dir)},
            "model": {"init_from": str(hf_dir)},
            "train": {
                "max_steps": shape.warmup + shape.steps,
                "global_batch_size": shape.prompts * shape.n,
                "micro_batch_size": shape.micro_batch_size,
                "log_every": 1,
                "eval_every": 0,
                "save_every": 0,
                "progress_bar": False,
                "device": "cpu",
            },
            "optim": {"lr": 1e-5, "min_lr": 1e-5, "warmup_steps": 0},
            "data": {"synthetic": {"n_train": 512, "n_eval": 4}},
            "rollout": {
                "prompts_per_step": shape.prompts,
                "n": shape.n,
                "max_tokens": shape.new_tokens,
                "asynchronous": {"enabled": asynchronous, "max_staleness": shape.max_staleness},
            },
            "algorithm": {"loss": {"tis_cap": 2.0, "entropy_coef": 0.01}},
            "placement": {"mode": "disaggregated", "pools": {"policy": 1, "generation": 1}},
        }
    )


def run_one(shape: AsyncShape, hf_dir: Path, run_dir: Path, asynchronous: bool) -> AsyncResult:
    from core.utils.metrics import read_metrics
    from rl.grpo_cluster import ClusterRun

    ClusterRun(bench_config(shape, hf_dir, run_dir, asynchronous)).run()
    rows = [r for r in read_metrics(run_dir) if "time/step" in r][shape.warmup :]
    name = f"asynchronous (staleness {shape.max_staleness})" if asynchronous else BASELINE
    result = AsyncResult(name, [r["time/step"] for r in rows])
    for column in COLUMNS:
        values = [r[f"time/{column}"] for r in rows if f"time/{column}" in r]
        if values:
            result.phases[column] = statistics.median(values)
    return result


def run_async_bench(shape: AsyncShape) -> list[AsyncResult]:
    """Both runs on one local Ray cluster (started here unless this process already has one)."""
    import ray

    from rl.cluster import init_ray, shutdown_ray

    owns = not ray.is_initialized()
    if owns:
        init_ray(num_cpus=4, object_store_memory=256 << 20, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            hf_dir = random_hf_model(shape.preset, root)
            return [
                run_one(shape, hf_dir, root / "sync", asynchronous=False),
                run_one(shape, hf_dir, root / "async", asynchronous=True),
            ]
    finally:
        if owns:
            shutdown_ray()


def format_table(results: list[AsyncResult]) -> str:
    base = next(r for r in results if r.name == BASELINE)
    head = f"{'loop':<28} {'s/step':>8} {'speedup':>8}  " + " ".join(f"{c:>10.10}" for c in COLUMNS)
    lines = [head]
    for r in results:
        phases = " ".join(f"{r.phases[c]:10.3f}" if c in r.phases else f"{'-':>10}" for c in COLUMNS)
        lines.append(f"{r.name:<28} {r.median_s:8.3f} {base.median_s / r.median_s:7.2f}x  {phases}")
    return "\n".join(lines)
