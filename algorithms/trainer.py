"""The shared trainer: what every loop (pretrain, sft, dpo, rm, grpo, ...) gets without writing it.

A loop is a subclass that supplies
    step()          one optimizer step (or one RL step) -> metrics
    evaluate()      held-out metrics -> {} when there is nothing to evaluate
    save_model(dir) / load_model(dir)   its model state under a checkpoint directory (collective)
    write_hf(dir)   the model as a Hugging Face checkpoint (collective; rank 0 writes)
    loop_state() / load_loop_state(state)   what else a resume needs (data position, scheduler, ...)
    meta()          the architecture and tokenizer recorded with every checkpoint
and the base owns the rest:
    fit             the step loop, the step-0 evaluation, the eval / save / log cadence, the metrics
                    logger (metrics.jsonl + TensorBoard), the progress bar, clean-up on error
    save / resume   checkpoints/step_N through one CheckpointManager (atomic, with meta.json)
    export          hf/ published atomically (written under .tmp-hf, then renamed)

Every rank of an SPMD run (a torch.distributed world: `rl pretrain parallel.tp=2`, or a Ray worker
group) runs its own Trainer; `is_logger` is rank 0. A Ray driver (GRPO) runs one Trainer whose model
methods call worker groups.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from core.checkpoint.checkpointer import CheckpointManager, set_rng_state
from core.config import (
    FailureConfig,
    OptimConfig,
    ParallelConfig,
    Placement,
    PrecisionConfig,
    RayOptions,
    RunConfig,
    Schema,
    TrainConfig,
)


class LoopConfig(Schema):
    """Sections every training command shares. No `placement`: the run happens in this process (and the
    ranks it spawns itself for parallel.* > 1); a `placement`: on Ray worker groups built from the same
    config. `failure` is the restart-from-checkpoint policy of both."""

    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    placement: Placement | None = Field(None, description="Ray placement; none: run in this process")
    failure: FailureConfig = Field(default_factory=FailureConfig)
    ray: RayOptions | None = Field(None, description="the Ray cluster to use (with a placement)")

    @property
    def on_ray(self) -> bool:
        return self.placement is not None or self.ray is not None


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """times[f"time/{name}"] = seconds the block took."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[f"time/{name}"] = time.perf_counter() - start


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def publish_dir(final: Path, write: Any, is_writer: bool = True) -> Path:
    """Write a directory under a temporary name next to `final`, then swap it in (never half-written).
    `write(tmp)` is called on every rank (it may be collective); `is_writer` does the renaming."""
    tmp = final.parent / f".tmp-{final.name}"
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if is_writer:
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    return final


class RunDiverged(RuntimeError):
    """A step's loss or gradient norm is not finite: the run stops (exit 3) before that state reaches a
    checkpoint or hf/ (the checkpoints on disk stay the good ones). Not restarted: it would diverge again."""


class Trainer:
    """The fit loop, checkpoints and exports of one rank (see the module docstring)."""

    stage: ClassVar[str] = "train"
    shown: ClassVar[tuple[str, ...]] = ()  # metrics on the progress bar
    plotted: ClassVar[tuple[str, ...]] = ()  # curves in metrics.png

    def __init__(self, cfg: LoopConfig, *, is_logger: bool = True, distributed: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.is_logger = is_logger
        self.distributed = distributed  # every rank of a torch.distributed world runs this trainer
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last)
        self.step_count = 0

    # ---- what a loop supplies ---------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def save_model(self, path: Path) -> None:
        raise NotImplementedError

    def load_model(self, path: Path) -> None:
        raise NotImplementedError

    def write_hf(self, path: Path) -> None:
        raise NotImplementedError

    def loop_state(self) -> dict[str, Any]:
        return {}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        pass

    def meta(self) -> dict[str, Any]:
        """{"arch": HF architecture name, "model_config": TransformerConfig.to_dict()} (see model_meta)."""
        raise NotImplementedError

    @property
    def tokenizer_dir(self) -> str | Path | None:
        return None

    @property
    def has_eval(self) -> bool:
        return True

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self) -> Path:
        state = {"step": self.step_count, **self.loop_state()}
        meta = {"stage": self.stage, **self.meta()}
        return self.checkpoints.save(self.step_count, self.save_model, state, meta, self.tokenizer_dir)

    def maybe_resume(self) -> bool:
        """Restore model, optimizer, loop state and RNG from the newest complete checkpoint in run.dir."""
        path = self.checkpoints.latest()
        if path is None:
            return False
        self.load_model(path)
        state = CheckpointManager.load_state(path)
        self.step_count = int(state["step"])
        self.load_loop_state(state)
        if "rng" in state:
            set_rng_state(state["rng"])
        return True

    def export(self) -> Path:
        """hf/: the trained model as a Hugging Face checkpoint (+ tokenizer), published atomically."""
        return publish_dir(self.run_dir / "hf", self.write_hf, self.is_logger)

    # ---- the loop ---------------------------------------------------------------------------------------

    def advance(self) -> dict[str, float]:
        """One step of the loop, counted. RunDiverged when its loss or gradient norm is not finite."""
        metrics = self.step()
        self.step_count += 1
        bad = [k for k, v in metrics.items() if k.endswith(("loss", "grad_norm")) and not math.isfinite(v)]
        if bad:
            latest = self.checkpoints.latest()
            kept = f"{latest} is the newest good checkpoint" if latest else "no checkpoint was written"
            raise RunDiverged(
                f"{bad[0]}={metrics[bad[0]]} at step {self.step_count}: the run diverged and stopped before "
                f"saving it; {kept} (lower optim.lr or raise optim.warmup_steps, then rerun to resume)"
            )
        return metrics

    def due(self, every: int) -> bool:
        return (every > 0 and self.step_count % every == 0) or self.step_count == self.cfg.train.max_steps

    def fit(self) -> dict[str, float]:
        """Train to train.max_steps from wherever the run is; returns the last logged metrics."""
        from core.utils.metrics import MetricsLogger

        tcfg = self.cfg.train
        logger = MetricsLogger(self.run_dir, resume_step=self.step_count) if self.is_logger else None
        bar = progress_bar(tcfg.max_steps, self.step_count, tcfg.progress_bar and self.is_logger, self.stage)
        last: dict[str, float] = {}
        shown: dict[str, str] = {}
        try:
            if self.step_count == 0 and tcfg.eval_every > 0 and self.has_eval:
                first = self.evaluate()  # the starting point of the validation curve
                if logger is not None and first:
                    logger.log(0, first)
            while self.step_count < tcfg.max_steps:
                metrics = self.advance()
                if self.due(tcfg.save_every):
                    with timed(metrics, "save"):
                        self.save()
                if self.due(tcfg.eval_every) and self.has_eval:
                    with timed(metrics, "eval"):
                        metrics.update(self.evaluate())
                if self.due(tcfg.log_every) or "time/eval" in metrics:
                    metrics.update(self.log_extras())
                    if logger is not None:
                        logger.log(self.step_count, metrics)
                    last = metrics
                    # the newest value of each shown metric (an eval metric stays until the next eval)
                    shown.update({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in self.shown if k in metrics})
                    bar.set_postfix(shown)
                bar.update(1)
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        return last

    def log_extras(self) -> dict[str, float]:
        """Metrics computed only at logging steps (throughput over the logging window, ...)."""
        return {}

    def close(self) -> None:
        """Release what the loop holds beyond the process (engines, ...)."""

    def plot(self) -> None:
        if self.is_logger:
            self.plot_run(self.run_dir)

    @classmethod
    def plot_run(cls, run_dir: Path) -> None:
        """metrics.png of the loop's main curves, from metrics.jsonl."""
        from core.utils.metrics import plot_metrics

        if cls.plotted:
            plot_metrics(run_dir, list(cls.plotted))


def model_meta(config: Any, arch: Any = None) -> dict[str, Any]:
    """The architecture part of a checkpoint's meta.json: our TransformerConfig and its HF architecture."""
    from core.bridge.convert import resolve_architecture

    return {
        "arch": resolve_architecture(arch, config).name,
        "model_config": config.to_dict() | {"fp8": "off"},  # fp8 is a compute choice, not the architecture
    }


ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "num_experts",
    "head",
)


def check_resume(run_dir: str | Path, stage: str, config: Any, rows: int | None = None) -> None:
    """InputError (before anything is written) when run.dir already holds checkpoints this run cannot
    resume: another stage's, a model of another shape than the config asks for, or (rows: the number of
    prompts / pairs the loop walks) a data position saved over other data."""
    from core.checkpoint.checkpointer import latest_checkpoint, read_meta
    from core.errors import InputError

    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    meta = read_meta(latest) if latest is not None else None
    if meta is None:
        return
    where = f"run.dir={run_dir} holds checkpoints/{latest.name}"
    if meta["stage"] != stage:
        raise InputError(
            f"{where} of an `rl {meta['stage']}` run: resume it with rl {meta['stage']}, or pick another run.dir"
        )
    have, want = meta["model_config"], config.to_dict()
    for key in ARCHITECTURE_KEYS:
        if have.get(key) != want.get(key):
            raise InputError(
                f"{where} of a model with {key}={have.get(key)}, but the config makes {key}={want.get(key)}: "
                "pick another run.dir to train a different model"
            )
    if rows is not None:
        from algorithms.rl_inputs import PromptLoader
        from core.checkpoint.checkpointer import CheckpointManager

        data = CheckpointManager.load_state(latest).get("data", {})
        try:
            PromptLoader(list(range(rows)), 1, 0).load_state_dict(data)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
