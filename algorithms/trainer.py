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
    save / resume   checkpoints/step_N through one CheckpointManager (atomic, with meta.json; async
                    with train.async_save), never from non-finite weights
    export          hf/ published atomically (written under .tmp-hf, then renamed), from finite weights
    faults          the numerical fault policy (StepGuard: bad steps skipped, counted, max_bad_steps in a
                    row stop the run, exit 3) and storage faults (StorageError: one line, exit 1)

Every rank of an SPMD run (a torch.distributed world: `rl pretrain parallel.tp=2`, or a Ray worker
group) runs its own Trainer; `is_logger` is rank 0. A Ray driver (GRPO) runs one Trainer whose model
methods call worker groups.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import statistics
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from core.checkpoint.checkpointer import (
    WRITE_ERRORS,
    CheckpointManager,
    check_disk_space,
    list_checkpoints,
    set_rng_state,
    storage_error,
)
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
from core.parallel.heartbeat import beat


class WandbConfig(Schema):
    """Weights & Biases: every logged row (the metrics.jsonl row, numbers only) also goes to a W&B run."""

    project: str = Field(description="the W&B project")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online",
        description="offline: written under run.dir/wandb without network (`wandb sync` uploads it later)",
    )
    entity: str | None = Field(None, description="team or user; none: the account's default")
    group: str | None = Field(None, description="groups runs in the W&B UI (a pipeline's stages share one)")
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _installed(self) -> WandbConfig:
        # Checked when the config is loaded, so a run that asks for W&B stops before it writes anything.
        if self.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb is not installed: `pip install wandb` (or drop logging.wandb)")
        return self


class LoggingConfig(Schema):
    """Where metric rows go besides run.dir/metrics.jsonl and TensorBoard (always written)."""

    wandb: WandbConfig | None = Field(None, description="also log to Weights & Biases")


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
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def on_ray(self) -> bool:
        return self.placement is not None or self.ray is not None


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """times[f"time/{name}"] += seconds the block took (from 0: blocks of one name in a loop add up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"time/{name}"
        times[key] = times.get(key, 0.0) + time.perf_counter() - start


class RunLogger:
    """Where a run's metric rows go: metrics.jsonl + TensorBoard (MetricsLogger), and a W&B run with
    logging.wandb (its numbers, at the same step). Rank 0 only."""

    def __init__(self, cfg: LoopConfig, run_dir: Path, resume_step: int, stage: str) -> None:
        from core.utils.metrics import MetricsLogger

        self.files = MetricsLogger(run_dir, resume_step=resume_step)
        wandb_cfg = cfg.logging.wandb
        self.wandb = None
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self.wandb = open_wandb(cfg, wandb_cfg, run_dir, stage)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.files.log(step, metrics)
        if self.wandb is not None:
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            self.wandb.log({k: v for k, v in numbers.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.files.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_wandb(cfg: LoopConfig, wandb_cfg: WandbConfig, run_dir: Path, stage: str) -> Any:
    """wandb.init for this run directory. The run id is kept in run_dir/wandb_id, so a resumed run
    continues the same W&B run (W&B ignores the rows of steps it already has)."""
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        mode=wandb_cfg.mode,
        dir=str(run_dir),
        config=cfg.model_dump(mode="json"),
        name=cfg.run.name or run_dir.name,
        group=wandb_cfg.group,
        job_type=stage,
        tags=wandb_cfg.tags or None,
        id=run_id,
        resume="allow",
    )


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def publish_dir(final: Path, write: Any, is_writer: bool = True) -> Path:
    """Write a directory under a temporary name next to `final`, then swap it in (never half-written).
    `write(tmp)` is called on every rank (it may be collective); `is_writer` does the renaming. A failed
    write (no space, I/O error, permission) removes the temporary directory, keeps the previous `final` and
    raises StorageError."""
    tmp, old = final.parent / f".tmp-{final.name}", final.parent / f".old-{final.name}"
    try:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if is_writer:
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            try:
                tmp.rename(final)
            except OSError:
                if old.exists() and not final.exists():
                    old.rename(final)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except WRITE_ERRORS as e:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(e, "export", final) from e
    return final


class RunDiverged(RuntimeError):
    """train.max_bad_steps steps in a row had a non-finite loss or gradient norm, or the weights are not
    finite when a checkpoint or hf/ is due: the run stops (exit 3) before that state reaches a checkpoint or
    hf/ (the checkpoints on disk stay the good ones). Not restarted: it would diverge again. `metrics`: the
    row of the step that stopped the run (fit logs it)."""

    metrics: dict[str, float] | None = None


class StepGuard:
    """The numerical fault policy every loop shares (Megatron checks every step's loss and gradients).

    A step whose loss or gradient norm (a metric named *loss or *grad_norm) is not finite was skipped by
    the engine on every rank (ModelEngine.optimizer_step: no update, gradients dropped). Here it is counted:
    its row gets train/skipped_step = 1 and the running train/bad_steps, and train.max_bad_steps bad steps
    in a row stop the run (RunDiverged). Loss spikes (train.loss_spike_factor > 0): a finite train/loss
    above factor x the median of the previous loss_spike_window losses is logged (train/loss_spike = 1,
    running train/loss_spikes); with train.loss_spike_is_bad it is also a bad step (its update already
    happened: a spike is seen after the step, so it counts towards max_bad_steps but is not undone).
    Checkpoints are taken at good steps only (a save due at a bad step waits for the next good one).
    """

    def __init__(self, train: TrainConfig) -> None:
        self.max_bad_steps, self.spike_factor = train.max_bad_steps, train.loss_spike_factor
        self.spike_is_bad = train.loss_spike_is_bad
        self.recent: deque[float] = deque(maxlen=train.loss_spike_window)
        self.bad_steps = self.in_a_row = self.spikes = 0
        self.reason = ""  # what made the newest bad step bad

    def judge(self, metrics: dict[str, float]) -> bool:
        """Add the policy's metrics to a step's; True when the step is bad."""
        nonfinite = [
            k for k, v in metrics.items() if k.endswith(("loss", "grad_norm")) and not math.isfinite(v)
        ]
        spike = self._spike(metrics.get("train/loss"))
        bad = bool(nonfinite) or (spike and self.spike_is_bad)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.bad_steps += bad
        metrics["train/skipped_step"] = float(bool(nonfinite))
        metrics["train/bad_steps"] = float(self.bad_steps)
        if self.spike_factor > 0:
            metrics["train/loss_spike"] = float(spike)
            metrics["train/loss_spikes"] = float(self.spikes)
        if nonfinite:
            self.reason = f"{nonfinite[0]}={metrics[nonfinite[0]]}"
        elif bad:
            self.reason = f"train/loss={metrics['train/loss']:.4g} (a spike, train.loss_spike_factor)"
        return bad

    @property
    def diverged(self) -> bool:
        return self.in_a_row >= self.max_bad_steps

    def _spike(self, loss: float | None) -> bool:
        if self.spike_factor <= 0 or loss is None or not math.isfinite(loss):
            return False
        full = len(self.recent) == self.recent.maxlen
        spike = full and 0 < statistics.median(self.recent) * self.spike_factor < loss
        self.recent.append(loss)
        self.spikes += spike
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {
            "bad_steps": self.bad_steps,
            "in_a_row": self.in_a_row,
            "spikes": self.spikes,
            "recent": list(self.recent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_steps, self.in_a_row, self.spikes = state["bad_steps"], state["in_a_row"], state["spikes"]
        self.recent.clear()
        self.recent.extend(state["recent"])


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
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", cfg.train.keep_last, cfg.train.async_save
        )
        self.guard = StepGuard(cfg.train)
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

    def state_finite(self) -> bool:
        """Whether the weights and optimizer state are finite (collective); checked before every save and
        export. A loop whose model lives elsewhere checks where it writes (EngineModel.save)."""
        return True

    def checkpoint_bytes(self) -> int | None:
        """Estimated size of one checkpoint, for the disk check before training (None: not known)."""
        return None

    @property
    def tokenizer_dir(self) -> str | Path | None:
        return None

    @property
    def has_eval(self) -> bool:
        return True

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self) -> Path:
        """checkpoints/step_N (with train.async_save complete only after checkpoints.wait()); RunDiverged
        instead when the weights or optimizer state are not finite."""
        if not self.state_finite():
            raise self.diverged_error(f"the weights are not finite at step {self.step_count}: not saved")
        state = {"step": self.step_count, "faults": self.guard.state_dict(), **self.loop_state()}
        meta = {"stage": self.stage, **self.meta()}
        return self.checkpoints.save(self.step_count, self.save_model, state, meta, self.tokenizer_dir)

    def diverged_error(self, what: str) -> RunDiverged:
        """RunDiverged naming the newest good checkpoint (the one in flight finished first, collective)."""
        latest = self.checkpoints.wait() or self.checkpoints.latest()
        kept = f"{latest} is the newest good checkpoint" if latest else "no checkpoint was written"
        return RunDiverged(
            f"{what}: the run diverged and stopped; {kept} (lower optim.lr or raise optim.warmup_steps, "
            "then rerun to resume)"
        )

    def maybe_resume(self) -> bool:
        """Restore model, optimizer, loop state and RNG from the newest complete checkpoint in run.dir."""
        path = self.checkpoints.latest()
        if path is None:
            return False
        self.load_model(path)
        state = CheckpointManager.load_state(path)
        self.step_count = int(state["step"])
        if "faults" in state:
            self.guard.load_state_dict(state["faults"])
        self.load_loop_state(state)
        if "rng" in state:
            set_rng_state(state["rng"])
        return True

    def export(self) -> Path:
        """hf/: the trained model as a Hugging Face checkpoint (+ tokenizer), published atomically, from
        finite weights only (RunDiverged otherwise). Finishes a checkpoint in flight first."""
        self.checkpoints.wait()
        if not self.state_finite():
            raise self.diverged_error(
                f"the weights are not finite at step {self.step_count}: hf/ not exported"
            )
        return publish_dir(self.run_dir / "hf", self.write_hf, self.is_logger)

    # ---- the loop ---------------------------------------------------------------------------------------

    def advance(self) -> dict[str, float]:
        """One step of the loop, counted and judged by the fault policy (StepGuard): a bad step's metrics
        say so; RunDiverged after train.max_bad_steps bad steps in a row."""
        metrics = self.step()
        self.step_count += 1
        if self.guard.judge(metrics) and self.guard.diverged:
            error = self.diverged_error(
                f"{self.guard.reason} at step {self.step_count}, {self.guard.in_a_row} bad steps in a row "
                f"(train.max_bad_steps={self.guard.max_bad_steps})"
            )
            error.metrics = metrics
            raise error
        return metrics

    def due(self, every: int) -> bool:
        return (every > 0 and self.step_count % every == 0) or self.step_count == self.cfg.train.max_steps

    def fit(self) -> dict[str, float]:
        """Train to train.max_steps from wherever the run is; returns the last logged metrics."""
        tcfg = self.cfg.train
        self.check_disk()
        logger = RunLogger(self.cfg, self.run_dir, self.step_count, self.stage) if self.is_logger else None
        # run.name labels the bar (a pipeline names its stages there), else the loop's name
        desc = self.cfg.run.name or self.stage
        bar = progress_bar(tcfg.max_steps, self.step_count, tcfg.progress_bar and self.is_logger, desc)
        last: dict[str, float] = {}
        shown: dict[str, str] = {}
        try:
            if self.step_count == 0 and tcfg.eval_every > 0 and self.has_eval:
                beat("eval", 0)
                first = self.evaluate()  # the starting point of the validation curve
                if logger is not None and first:
                    logger.log(0, first)
            save_due = False
            save_times: dict[str, float] = {}  # the last save's time/save, logged with the next row
            step_times: list[float] = []  # this rank's, over the logging window (the straggler report)
            while self.step_count < tcfg.max_steps:
                beat("step", self.step_count + 1)
                started = time.perf_counter()
                metrics = self.advance()
                step_times.append(time.perf_counter() - started)
                if self.due(tcfg.eval_every) and self.has_eval:
                    beat("eval", self.step_count)
                    with timed(metrics, "eval"):
                        metrics.update(self.evaluate())
                # The row is logged before the step's checkpoint is written: a run stopped in between resumes
                # from the previous checkpoint and rewrites the rows after it, so no row is ever missing.
                if self.due(tcfg.log_every) or "time/eval" in metrics or self.guard.in_a_row:
                    beat("log", self.step_count)
                    metrics.update(self.log_extras())
                    metrics.update(self.step_time_spread(step_times))
                    metrics.update(save_times)
                    save_times = {}
                    if logger is not None:
                        logger.log(self.step_count, metrics)
                    last = metrics
                    # the newest value of each shown metric (an eval metric stays until the next eval)
                    shown.update({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in self.shown if k in metrics})
                    bar.set_postfix(shown)
                save_due = save_due or self.due(tcfg.save_every)
                if save_due and not self.guard.in_a_row:  # checkpoints of good steps only
                    beat("save", self.step_count)
                    with timed(save_times, "save"):
                        self.save()
                    save_due = False
                bar.update(1)
            beat("save", self.step_count)
            self.checkpoints.wait()  # the last checkpoint is complete when fit returns
        except BaseException as e:
            self.checkpoints.close()  # a checkpoint still in flight is dropped, never left to look complete
            if isinstance(e, RunDiverged) and e.metrics is not None and logger is not None:
                logger.log(self.step_count, e.metrics)  # the row of the step that stopped the run
            raise
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        return last

    def log_extras(self) -> dict[str, float]:
        """Metrics computed only at logging steps (throughput over the logging window, ...)."""
        return {}

    def step_time_spread(self, step_times: list[float]) -> dict[str, float]:
        """The straggler report of a torch.distributed world (collective, at logging steps; {} otherwise):
        perf/step_time_min / _max, every rank's mean step time over the logging window (s), and
        perf/slowest_rank, the rank with the max. One all_gather of a float per rank. In a synchronous world
        every rank's step waits for the slowest at its collectives, so the spread is the work a rank does
        outside them (input loading, host-side work, a slow disk); a rank that stays the slowest is the one
        to look at. Empties step_times."""
        if not self.distributed or not step_times:
            return {}
        import torch
        import torch.distributed as dist

        mean = sum(step_times) / len(step_times)
        step_times.clear()
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        times = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(times, torch.tensor([mean], dtype=torch.float64, device=device))
        spread = torch.cat(times).cpu()
        return {
            "perf/step_time_min": float(spread.min()),
            "perf/step_time_max": float(spread.max()),
            "perf/slowest_rank": float(spread.argmax()),
        }

    def check_disk(self) -> None:
        """StorageError before the first step when the disk under checkpoints/ clearly cannot hold
        train.keep_last + 1 checkpoints of checkpoint_bytes() (rank 0 checks; see check_disk_space)."""
        size = self.checkpoint_bytes()
        if size and self.is_logger:
            existing = len(list_checkpoints(self.checkpoints.root))
            check_disk_space(self.checkpoints.root, size, self.cfg.train.keep_last, existing=existing)

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
    from core.checkpoint.checkpointer import read_meta
    from core.errors import InputError

    latest = _resumable_checkpoint(run_dir, stage)
    meta = read_meta(latest) if latest is not None else None
    if meta is None:
        return
    where = f"run.dir={run_dir} holds checkpoints/{latest.name}"
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


def _resumable_checkpoint(run_dir: str | Path, stage: str) -> Path | None:
    """The newest complete checkpoint in run.dir, once every file of it is known to load as plain data
    (core/checkpoint/safe_load.py) and it is this stage's; None when there is none."""
    from core.checkpoint.checkpointer import latest_checkpoint, read_meta
    from core.checkpoint.safe_load import verify_checkpoint
    from core.errors import InputError

    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    if latest is None:
        return None
    verify_checkpoint(latest)
    meta = read_meta(latest)
    if meta is not None and meta["stage"] != stage:
        raise InputError(
            f"run.dir={run_dir} holds checkpoints/{latest.name} of an `rl {meta['stage']}` run: resume it "
            f"with rl {meta['stage']}, or pick another run.dir"
        )
    return latest


# Keys a resumed run may change: how long and how fast it trains (max_steps, lr), its cadence and
# reporting, evaluation, and where and how it runs (a checkpoint loads at any parallel layout). Every other
# key (the model, tokenizer, data and its order, seq_len, batch size, loss) is fixed by the first run.
MUTABLE_ON_RESUME = (
    "run.*",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.progress_bar",
    "train.async_save",
    "train.device",
    "train.compile",
    "train.recompute",
    "train.micro_batch_size",
    "train.max_bad_steps",
    "train.loss_spike_*",
    "optim.lr",
    "optim.min_lr",
    "optim.clip_grad",
    "parallel.*",
    "precision.*",
    "placement",
    "placement.*",
    "ray",
    "ray.*",
    "failure.*",
    "logging",
    "logging.*",
    "eval.*",
    "rollout.max_num_seqs",
    "rollout.kv_cache_gib",
    "weight_transport",
)


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key both configs hold with different values; a section
    set in one and null in the other is one change. Keys only one side has (a schema that gained or lost
    a key between the runs) are not compared. Two paths to the same existing file are the same value."""
    changes = []
    for key, value in new.items():
        if key not in old:
            continue
        name, before = f"{prefix}{key}", old[key]
        if isinstance(before, dict) and isinstance(value, dict):
            changes += config_changes(before, value, f"{name}.")
        elif before != value and not _same_path(before, value):
            changes.append((name, before, value))
    return changes


def _same_path(a: Any, b: Any) -> bool:
    both = isinstance(a, str) and isinstance(b, str)
    return both and Path(a).exists() and Path(a).resolve() == Path(b).resolve()


def check_resume_config(cfg: LoopConfig, stage: str) -> None:
    """InputError (one line, before anything is written) when run.dir holds a checkpoint to resume and
    the config changes keys a resume may not (MUTABLE_ON_RESUME lists those it may), naming each with its
    old and new value. The old config is the run's config.yaml; a checkpoint that does not load as plain
    data, or another stage's, is refused first."""
    import fnmatch

    import yaml

    from core.errors import InputError

    run_dir = Path(cfg.run.dir)
    latest = _resumable_checkpoint(run_dir, stage)
    if latest is None or not (run_dir / "config.yaml").is_file():
        return
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{run_dir / 'config.yaml'}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(old, dict):
        raise InputError(f"{run_dir / 'config.yaml'}: not a config (a mapping of keys)")
    fixed = [
        (key, a, b)
        for key, a, b in config_changes(old, cfg.model_dump(mode="json"))
        if not any(fnmatch.fnmatchcase(key, pattern) for pattern in MUTABLE_ON_RESUME)
    ]
    if fixed:
        shown = ", ".join(f"{key}: {_shown(a)} -> {_shown(b)}" for key, a, b in fixed)
        raise InputError(
            f"run.dir={run_dir} holds checkpoints/{latest.name} of a run with another config, and a resume "
            f"may not change {shown} (its config.yaml has the old values): put them back, or pick another "
            "run.dir for a new run"
        )


def _shown(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)
