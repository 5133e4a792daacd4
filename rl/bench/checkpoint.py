"""`rl bench checkpoint`: how long saving a checkpoint stalls training, sync vs async.

Both modes save the same ModelEngine (model + fp32 masters + AdamW moments, a step taken first) through
CheckpointManager, as `rl pretrain` does, into one directory (keep_last=1), in the same process:
    sync   dcp.save: the step waits for the whole write (baseline)
    async  train.async_save: the step waits for the copy of the state to CPU memory; a background thread
           writes it while the next step runs, and the checkpoint is complete once it has finished
Columns: stall (save() returning: what the training step pays), next step (the following training step,
slowed by the background write competing for CPU / memory bandwidth; the no-save row is the plain step),
complete (from the save call until COMPLETE and the rename), the checkpoint's size and the stall
speed-up over sync. Means over --repeats saves after one untimed save per mode.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.checkpoint.checkpointer import CheckpointManager


@dataclass
class SaveResult:
    name: str
    stall_s: float
    next_step_s: float
    complete_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_engine(config: Any, device: torch.device, dtype: torch.dtype):
    """A single-process ModelEngine of the preset and a function that runs one training step on it."""
    from core.config import OptimConfig, ParallelConfig
    from core.engine import ModelEngine
    from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    from core.transformer.model import GPTModel

    full_state = GPTModel(config).state_dict()
    engine = ModelEngine(config, ParallelConfig(), OptimConfig(), None, device, full_state, dtype)
    del full_state
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, 129), generator=g).to(device)
    micro_batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def loss_fn(logits, mb):
        loss_sum = vocab_parallel_cross_entropy(logits, mb["labels"], None).sum()
        return loss_sum / mb["labels"].numel(), {"loss_sum": loss_sum.detach()}

    def step() -> None:
        engine.train_step([micro_batch], loss_fn, clip_grad=1.0)
        _sync(device)

    return engine, step


def _timed_save(manager: CheckpointManager, engine: Any, step: int, train_step: Any, device) -> SaveResult:
    def write_model(tmp: Path) -> None:
        manager.write_state(engine.sharded_state(), tmp / "model")

    _sync(device)
    start = time.perf_counter()
    manager.save(step, write_model, {"step": step}, {"stage": "bench"})
    stall = time.perf_counter() - start
    train_step()  # runs while an async write is still going
    next_step = time.perf_counter() - start - stall
    manager.wait()
    return SaveResult("", stall, next_step, time.perf_counter() - start)


def run_checkpoint_bench(
    config: Any, device: torch.device, dtype: torch.dtype, workdir: Path, repeats: int
) -> tuple[list[SaveResult], int]:
    """([no save, sync, async] results, bytes of one checkpoint)."""
    engine, train_step = build_engine(config, device, dtype)
    train_step()  # AdamW state exists: the checkpoint has its full size
    start = time.perf_counter()
    for _ in range(repeats):
        train_step()
    plain = (time.perf_counter() - start) / repeats
    results = [SaveResult("no save (step only)", 0.0, plain, 0.0)]
    step = 0
    for name, async_save in (("sync dcp.save (baseline)", False), ("async_save", True)):
        manager = CheckpointManager(workdir, keep_last=1, async_save=async_save)
        runs = []
        for i in range(repeats + 1):
            step += 1
            result = _timed_save(manager, engine, step, train_step, device)
            if i > 0:  # the first save of a mode is untimed (allocations, thread start)
                runs.append(result)
        results.append(
            SaveResult(
                name,
                sum(r.stall_s for r in runs) / repeats,
                sum(r.next_step_s for r in runs) / repeats,
                sum(r.complete_s for r in runs) / repeats,
            )
        )
        gc.collect()
    size = _tree_bytes(workdir / f"step_{step}")
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, size


def format_table(results: list[SaveResult], size: int) -> str:
    sync = next(r for r in results if r.name.startswith("sync"))
    lines = [
        f"{'implementation':<28} {'stall s':>9} {'next step s':>12} {'complete s':>11} {'GiB':>7} {'vs sync':>8}"
    ]
    for r in results:
        saved = r.name != results[0].name
        ratio = f"{sync.stall_s / max(r.stall_s, 1e-9):7.2f}x" if saved else "       -"
        gib = f"{size / 2**30:7.3f}" if saved else "      -"
        complete = f"{r.complete_s:11.3f}" if saved else "          -"
        lines.append(f"{r.name:<28} {r.stall_s:9.3f} {r.next_step_s:12.3f} {complete} {gib} {ratio}")
    return "\n".join(lines)
