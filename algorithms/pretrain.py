"""Pretraining: next-token cross-entropy on packed token sequences, from scratch or from a checkpoint.

The loop is a composition of small phases (build, train step, evaluate, save) so that the parallel core
can swap the single-process forward/backward for a pipelined or data-parallel one without touching it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from algorithms.evaluation import accuracy
from algorithms.model_config import ModelConfig
from algorithms.schedules import build_adamw, build_scheduler
from core.checkpoint.checkpointer import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from core.config import (
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    Schema,
    TrainConfig,
    dump_config,
)
from core.data.pretrain_dataset import PretrainBatches
from core.errors import InputError
from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from core.utils.metrics import MetricsLogger, plot_metrics


class DatasetSpec(Schema):
    path: str = Field(description="prefix of a .bin/.idx pair written by `rl data tokenize`")
    weight: float = Field(1.0, gt=0)


class SyntheticConfig(Schema):
    n_train: int = Field(9000, ge=1)
    n_eval: int = Field(500, ge=1)
    digits: int = Field(2, ge=1, le=6, description="operands have up to this many digits")
    ops: str = Field("+", pattern=r"^[+\-*]+$", description="operators to draw from, e.g. '+-'")
    seed: int = 0

    @model_validator(mode="after")
    def _enough_problems(self) -> SyntheticConfig:
        distinct = len(self.ops) * 100**self.digits
        if self.n_train + self.n_eval > distinct:
            raise ValueError(f"n_train + n_eval = {self.n_train + self.n_eval} but only {distinct} distinct problems exist")
        return self


class DataConfig(Schema):
    synthetic: SyntheticConfig | None = Field(
        None, description="generate the embedded arithmetic task into the run directory"
    )
    datasets: list[DatasetSpec] = Field(default_factory=list, description="blended indexed datasets")
    tokenizer: str | None = Field(None, description="local tokenizer directory (generated for synthetic)")
    seq_len: int = Field(64, ge=2)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.synthetic is None) == (not self.datasets):
            raise ValueError("set exactly one of data.synthetic or data.datasets")
        if self.datasets and not self.tokenizer:
            raise ValueError("data.tokenizer is required with data.datasets")
        return self


class EvalConfig(Schema):
    max_new_tokens: int = Field(8, ge=1)
    num_problems: int = Field(200, ge=1, description="held-out arithmetic problems scored at each evaluation")


class PretrainConfig(Schema):
    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(synthetic=SyntheticConfig()))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)


@dataclass
class TrainerState:
    step: int = 0
    tokens_seen: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(precision: PrecisionConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it; fp32 (None) on CPU unless asked otherwise."""
    if precision.dtype == "fp32":
        return None
    if precision.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return torch.bfloat16 if precision.dtype == "bf16" else torch.float16


def token_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over tokens of the masked next-token loss, MoE aux loss) for one micro-batch."""
    logits = model(
        batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]
    )  # (B, T, V/tp)
    per_token = vocab_parallel_cross_entropy(logits, batch["labels"], model_tp_group(model))  # (B, T)
    aux = model.aux_loss if model.aux_loss is not None else torch.zeros((), device=logits.device)
    return (per_token * batch["loss_mask"]).sum(), aux


def model_tp_group(model: torch.nn.Module):
    return model.output_layer.tp_group


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    clip_grad: float,
    amp_dtype: torch.dtype | None,
) -> dict[str, float]:
    """One optimizer step over gradient-accumulation micro-batches.

    The loss is the mean over all loss tokens of the step (not a mean of per-micro-batch means), so the
    result does not depend on how the global batch is split into micro-batches.
    """
    n_tokens = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)
    device_type = micro_batches[0]["input_ids"].device.type
    optimizer.zero_grad(set_to_none=True)
    loss_total, aux_total = 0.0, 0.0
    for mb in micro_batches:
        with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss_sum, aux = token_loss_sum(model, mb)
        (loss_sum / max(n_tokens, 1.0) + aux / len(micro_batches)).backward()
        loss_total += float(loss_sum.detach())
        aux_total += float(aux.detach()) / len(micro_batches)
    max_norm = clip_grad if clip_grad > 0 else float("inf")
    grad_norm = float(
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    )
    optimizer.step()
    metrics = {
        "train/loss": loss_total / max(n_tokens, 1.0),
        "train/grad_norm": grad_norm,
        "tokens": n_tokens,
    }
    if model.config.is_moe:
        metrics["train/moe_aux_loss"] = aux_total
    return metrics


# ------------------------------------------------------------------------------------- save / resume


def save(
    run_dir: Path, model, optimizer, scheduler, state: TrainerState, data_state: dict, keep_last: int
) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    trainer_state: dict[str, Any] = {
        **dataclasses.asdict(state),
        "scheduler": scheduler.state_dict(),
        "data": data_state,
    }
    save_checkpoint(
        run_dir / "checkpoints",
        state.step,
        {"model": model_state},
        {"optim": optim_state},
        trainer_state,
        keep_last,
    )


def maybe_resume(run_dir: Path, model, optimizer, scheduler) -> tuple[TrainerState, dict | None]:
    """Restores model, optimizer, scheduler, RNG and data position from the newest complete checkpoint."""
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        return TrainerState(), None
    model_state, optim_state = get_state_dict(model, optimizer)
    wrapped_model, wrapped_optim = {"model": model_state}, {"optim": optim_state}
    trainer_state = load_checkpoint(path, wrapped_model, wrapped_optim)
    set_state_dict(
        model, optimizer, model_state_dict=wrapped_model["model"], optim_state_dict=wrapped_optim["optim"]
    )
    scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    state = TrainerState(**{f.name: trainer_state[f.name] for f in dataclasses.fields(TrainerState)})
    return state, trainer_state["data"]


def save_hf_export(model: torch.nn.Module, out_dir: Path, tokenizer_dir: str | None) -> None:
    from core.bridge import save_hf

    save_hf(model, out_dir, tokenizer_dir=tokenizer_dir)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="pretrain", unit="step", dynamic_ncols=True
    )


# ---------------------------------------------------------------------------------------------- build


@dataclass
class PretrainData:
    dataset: Any  # PackedDataset | BlendedDataset
    tokenizer: Any
    tokenizer_dir: str
    eval_problems: list[dict[str, str]]  # held-out arithmetic problems (empty for other data)


def check_inputs(cfg: PretrainConfig) -> None:
    """Every path the run reads, checked before any work starts."""
    cfg.model.check_paths()
    if cfg.data.tokenizer is not None and not Path(cfg.data.tokenizer).exists():
        raise InputError(f"data.tokenizer: tokenizer path not found: {cfg.data.tokenizer}")
    for i, spec in enumerate(cfg.data.datasets):
        for suffix in (".bin", ".idx"):
            if not Path(spec.path + suffix).is_file():
                raise InputError(f"data.datasets[{i}].path: {spec.path}{suffix} not found")


def prepare_data(cfg: PretrainConfig, run_dir: Path) -> PretrainData:
    """Generates and tokenizes the embedded arithmetic task (idempotently) or opens the given datasets."""
    from core.data.pretrain_dataset import build_pretrain_dataset
    from core.data.tokenizer import load_tokenizer

    if cfg.data.synthetic is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        specs = [(d.path, d.weight) for d in cfg.data.datasets]
        dataset = build_pretrain_dataset(
            specs, cfg.data.seq_len, cfg.train.seed, eos_id=tokenizer.eos_token_id
        )
        return PretrainData(dataset, tokenizer, cfg.data.tokenizer, [])
    prefix, tokenizer_dir, eval_file = synthesize(cfg.data.synthetic, run_dir / "data")
    tokenizer = load_tokenizer(tokenizer_dir)
    dataset = build_pretrain_dataset(
        [(prefix, 1.0)], cfg.data.seq_len, cfg.train.seed, eos_id=tokenizer.eos_token_id
    )
    problems = [json.loads(line) for line in eval_file.read_text().splitlines()]
    return PretrainData(dataset, tokenizer, str(tokenizer_dir), problems[: cfg.eval.num_problems])


def synthesize(syn: SyntheticConfig, data_dir: Path) -> tuple[str, Path, Path]:
    """The arithmetic corpus, its tokenizer and train.bin/.idx under data_dir; reused when present."""
    from core.data.preprocess import tokenize_to_indexed
    from core.data.synthetic import write_arithmetic_corpus
    from core.data.tokenizer import load_tokenizer

    prefix = data_dir / "train"
    stamp = data_dir / "synthetic.json"
    want = json.dumps(syn.model_dump(), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want and Path(f"{prefix}.idx").is_file():
        return str(prefix), data_dir / "tokenizer", data_dir / "eval.jsonl"
    corpus = write_arithmetic_corpus(data_dir, syn.n_train, syn.n_eval, syn.seed, syn.digits, tuple(syn.ops))
    tokenize_to_indexed(
        [corpus.train], load_tokenizer(corpus.tokenizer), prefix, append_eos=True, progress=False
    )
    stamp.write_text(want)
    return str(prefix), corpus.tokenizer, corpus.eval


def transformer_config(model_cfg: ModelConfig, vocab_size: int):
    """The preset's architecture (norms, positions, biases) with the dimensions the config sets."""
    from core.bridge.hf import read_hf_config
    from core.models import preset

    if model_cfg.init_from is not None:
        return read_hf_config(model_cfg.init_from)[1]
    fields = model_cfg.overrides()
    fields.setdefault("vocab_size", round_up(vocab_size, 64))
    for key in ("num_kv_heads", "head_dim", "ffn_hidden_size"):
        fields.setdefault(key, None)
    try:
        return dataclasses.replace(preset(f"{model_cfg.arch}_tiny"), **fields)
    except (ValueError, TypeError) as e:
        raise InputError(f"model: {e}") from None


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_model(cfg: PretrainConfig, vocab_size: int, device: torch.device) -> torch.nn.Module:
    from core.bridge import load_hf
    from core.transformer.model import GPTModel

    torch.manual_seed(cfg.train.seed)
    if cfg.model.init_from is not None:
        model = load_hf(cfg.model.init_from)
    else:
        model = GPTModel(transformer_config(cfg.model, vocab_size))
    if model.config.vocab_size < vocab_size:
        raise InputError(
            f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return model.to(device)


# ------------------------------------------------------------------------------------------------ run


class Trainer:
    """One pretraining run in one process: phases `step`, `evaluate`, `save`, composed by `fit`."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.data = prepare_data(cfg, self.run_dir)
        self.model = build_model(cfg, len(self.data.tokenizer), self.device)
        params = list(self.model.parameters())
        self.optimizer = build_adamw(params, cfg.optim, fused=self.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, cfg.train.max_steps, cfg.optim)
        torch.manual_seed(cfg.train.seed)
        self.state, data_state = maybe_resume(self.run_dir, self.model, self.optimizer, self.scheduler)
        self.batches = PretrainBatches(self.data.dataset, cfg.train.micro_batch_size, cfg.train.seed)
        if data_state is not None:
            self.batches.load_state_dict(data_state)

    def step(self) -> dict[str, float]:
        micro_batches = [
            {k: v.to(self.device) for k, v in next(self.batches).items()}
            for _ in range(self.cfg.train.grad_accum_steps)
        ]
        lr = self.scheduler.get_last_lr()[0]
        metrics = train_step(
            self.model, self.optimizer, micro_batches, self.cfg.optim.clip_grad, self.amp_dtype
        )
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += int(metrics.pop("tokens"))
        metrics["train/lr"] = lr
        return metrics

    def evaluate(self) -> dict[str, float]:
        if not self.data.eval_problems:
            return {}
        from core.data.synthetic import score_arithmetic

        acc = accuracy(
            self.model,
            self.data.tokenizer,
            self.data.eval_problems,
            score_arithmetic,
            self.cfg.eval.max_new_tokens,
            self.device,
        )
        return {"eval/accuracy": acc, "eval/loss": self.eval_loss()}

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Teacher-forced loss on the held-out problems' full texts, batched by length."""
        tok = self.data.tokenizer
        rows = [tok(p["prompt"] + p["answer"])["input_ids"] + [tok.eos_token_id] for p in self.data.eval_problems]
        by_len: dict[int, list[list[int]]] = {}
        for ids in rows:
            by_len.setdefault(len(ids), []).append(ids)
        total, count = 0.0, 0
        self.model.eval()
        for group in by_len.values():
            ids = torch.tensor(group, device=self.device)  # (B, T+1)
            loss = vocab_parallel_cross_entropy(self.model(ids[:, :-1]).float(), ids[:, 1:], None)  # (B, T)
            total, count = total + float(loss.sum()), count + loss.numel()
        self.model.train()
        return total / max(count, 1)

    def save(self) -> None:
        save(
            self.run_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            self.state,
            self.batches.state_dict(),
            self.cfg.train.keep_last,
        )

    def fit(self) -> dict[str, float]:
        tcfg = self.cfg.train
        logger = MetricsLogger(self.run_dir, resume_step=self.state.step)
        bar = _progress(tcfg.max_steps, self.state.step, tcfg.progress_bar)
        last: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        while self.state.step < tcfg.max_steps:
            tokens_before = self.state.tokens_seen
            metrics = self.step()
            window_tokens += self.state.tokens_seen - tokens_before
            step = self.state.step
            if step % tcfg.log_every == 0 or step == tcfg.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics["perf/tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                metrics["train/tokens_seen"] = self.state.tokens_seen
                window_tokens, window_start = 0, time.perf_counter()
                if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.max_steps:
                    metrics.update(self.evaluate())
                logger.log(step, metrics)
                last = metrics
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k in SHOWN})
            if (tcfg.save_every and step % tcfg.save_every == 0) or step == tcfg.max_steps:
                self.save()
            bar.update(1)
        bar.close()
        logger.close()
        return last

    def export(self) -> Path:
        out = self.run_dir / "hf"
        tmp = self.run_dir / ".tmp-hf"
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf_export(self.model, tmp, self.data.tokenizer_dir)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out


SHOWN = ("train/loss", "train/lr", "eval/accuracy")


def run_pretrain(cfg: PretrainConfig) -> dict[str, float]:
    """Checks every input, then trains to train.max_steps (resuming from run.dir) and exports hf/."""
    check_inputs(cfg)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg)
    if trainer.state.step >= cfg.train.max_steps:
        print(f"run {run_dir} is already complete at step {trainer.state.step}")
    metrics = trainer.fit()
    trainer.export()
    plot_metrics(run_dir, ["train/loss", "eval/loss", "train/lr", "eval/accuracy"])
    return metrics
