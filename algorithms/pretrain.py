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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator

from algorithms.evaluation import accuracy
from algorithms.model_config import ModelConfig
from algorithms.schedules import build_scheduler, lr_at
from core.checkpoint.checkpointer import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from core.checkpoint.sharded import load_full_state
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
from core.distributed import DynamicGradScaler
from core.engine import ModelEngine, check_compile_layout
from core.errors import InputError
from core.parallel.dims import Groups, ParallelDims, build_groups, validate_model_layout
from core.parallel.launch import launch
from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from core.transformer.model import GPTModel
from core.utils.flops import flops_per_token, peak_flops
from core.utils.metrics import MetricsLogger, plot_metrics, read_metrics


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
            raise ValueError(
                f"n_train + n_eval = {self.n_train + self.n_eval} but only {distinct} distinct problems exist"
            )
        return self


class DataConfig(Schema):
    synthetic: SyntheticConfig | None = Field(
        None, description="generate the embedded arithmetic task into the run directory"
    )
    datasets: list[DatasetSpec] = Field(default_factory=list, description="blended indexed datasets")
    tokenizer: str | None = Field(None, description="local tokenizer directory (generated for synthetic)")
    seq_len: int = Field(64, ge=2)
    reset_attention_mask: bool = Field(
        True,
        description="attention and positions restart at every packed document (a block-diagonal mask: SDPA's "
        "masked kernel); false: plain causal attention over the whole packed row, positions 0..seq_len-1 "
        "(Megatron's default; the flash kernel, faster at long sequences)",
    )

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


class PretrainPrecision(PrecisionConfig):
    """precision.dtype plus the dynamic loss scaler that fp16 parameters need (ignored otherwise)."""

    initial_loss_scale: float = Field(2.0**16, gt=0, description="fp16: the loss scale to start from")
    loss_scale_window: int = Field(
        1000, ge=1, description="fp16: consecutive steps without overflow before the scale doubles"
    )
    fp8: Literal["off", "torch", "te"] = Field(
        "off",
        description="FP8 GEMMs in the attention/MLP linears (per-tensor scaling): torch = torch._scaled_mm on "
        "GPUs with compute capability >= 8.9, te = Transformer Engine (must be installed)",
    )

    @field_validator("fp8", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class PretrainConfig(Schema):
    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(synthetic=SyntheticConfig()))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: PretrainPrecision = Field(default_factory=PretrainPrecision)


@dataclass
class TrainerState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # fp16: steps whose gradients overflowed (no update, the loss scale backed off)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def param_dtype(precision: PrecisionConfig, device: torch.device) -> torch.dtype:
    """Parameter dtype: bf16 (with fp32 master weights and main grads) where the device supports it, else
    fp32 (CPU default). fp16 needs a loss scaler in the caller's loop: refused here (rl pretrain's Trainer
    handles fp16 itself)."""
    if precision.dtype == "fp16":
        raise InputError("precision.dtype=fp16 is not supported by this command yet: use bf16 or fp32")
    if precision.dtype == "bf16" or (
        precision.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return torch.float32


def build_grad_scaler(precision: PretrainPrecision) -> DynamicGradScaler:
    return DynamicGradScaler(precision.initial_loss_scale, growth_interval=precision.loss_scale_window)


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
    from core.tensor_parallel.fp8 import check_fp8_mode

    check_fp8_mode(cfg.precision.fp8)  # fp8 on a machine without it: one line now, not at the first step
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
    from core.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
    from core.data.synthetic import write_arithmetic_corpus
    from core.data.tokenizer import load_tokenizer

    prefix = data_dir / "train"
    stamp = data_dir / "synthetic.json"
    want = json.dumps(syn.model_dump(), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want and Path(f"{prefix}.idx").is_file():
        return str(prefix), data_dir / "tokenizer", data_dir / "eval.jsonl"
    corpus = write_arithmetic_corpus(data_dir, syn.n_train, syn.n_eval, syn.seed, syn.digits, tuple(syn.ops))
    # Our own generated rows need no `datasets` round trip (`rl data tokenize` is the general path).
    tokenizer = load_tokenizer(corpus.tokenizer)
    texts = [json.loads(line)["text"] for line in corpus.train.read_text().splitlines()]
    with IndexedDatasetBuilder(prefix, best_fitting_dtype(len(tokenizer))) as builder:
        for ids in tokenizer(texts)["input_ids"]:
            builder.add_document([*ids, tokenizer.eos_token_id])
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


def build_full_model(cfg: PretrainConfig, vocab_size: int) -> GPTModel:
    """The whole model on the CPU in fp32, seeded: every layout starts from these exact weights."""
    from core.bridge import load_hf

    torch.manual_seed(cfg.train.seed)
    model = (
        load_hf(cfg.model.init_from)
        if cfg.model.init_from
        else GPTModel(transformer_config(cfg.model, vocab_size))
    )
    if model.config.vocab_size < vocab_size:
        raise InputError(
            f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return model


def next_token_loss(tp_group, n_tokens: torch.Tensor):
    """loss_fn for the schedules: the micro-batch's token-loss sum over the step's global token count."""

    def loss_fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        per_token = vocab_parallel_cross_entropy(logits, mb["labels"], tp_group)  # (B, T) fp32
        loss_sum = (per_token * mb["loss_mask"]).sum()
        return loss_sum / n_tokens, {"loss_sum": loss_sum.detach(), "tokens": mb["loss_mask"].sum()}

    return loss_fn


# ------------------------------------------------------------------------------------------------ run


class Trainer:
    """One rank of a pretraining run: phases `step`, `evaluate`, `save`, composed by `fit`.

    A single process runs with groups=None; `rl pretrain` with parallel.* > 1 starts one Trainer per rank.
    """

    def __init__(self, cfg: PretrainConfig, groups: Groups | None = None, rank: int = 0):
        self.cfg, self.groups, self.rank = cfg, groups, rank
        self.is_logger = rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.device = resolve_device(cfg.train.device, rank)
        self.data = prepare_data(cfg, self.run_dir)
        full = build_full_model(cfg, len(self.data.tokenizer))
        # FP8 is how the training chunks compute, not part of the architecture: the full CPU model, the
        # checkpoints and the exports stay fp8="off".
        self.config = dataclasses.replace(full.config, fp8=cfg.precision.fp8)
        fp16 = cfg.precision.dtype == "fp16"
        dtype = torch.float16 if fp16 else param_dtype(cfg.precision, self.device)
        self.engine = ModelEngine(
            self.config,
            cfg.parallel,
            cfg.optim,
            groups,
            self.device,
            full.state_dict(),
            dtype,
            grad_scaler=build_grad_scaler(cfg.precision) if fp16 else None,
            compile_layers=cfg.train.compile,
        )
        del full
        self.scheduler = build_scheduler(self.engine.optimizer, cfg.train.max_steps, cfg.optim)
        dp_rank, dp_size = (groups.dp_rank, groups.dp_size) if groups else (0, 1)
        self.grad_accum = cfg.train.grad_accum_steps(dp_size)
        self.batches = PretrainBatches(
            self.data.dataset, cfg.train.micro_batch_size, cfg.train.seed, dp_rank=dp_rank, dp_size=dp_size
        )
        # MFU on GPUs with a known peak: model FLOPs of the tokens trained over every GPU's peak.
        world = groups.mp_size * groups.dp_cp_size if groups else 1  # tp * pp * dp * cp ranks
        peak = peak_flops(self.device)
        self._flops_per_token = flops_per_token(self.config, cfg.data.seq_len)
        self._peak_total = peak * world if peak else None
        torch.manual_seed(cfg.train.seed + rank)
        self.state = TrainerState()
        self.maybe_resume()

    @property
    def tp_group(self):
        return self.groups.tp_group if self.groups else None

    def _all_reduce(self, x: torch.Tensor, group_name: str) -> torch.Tensor:
        if self.groups is not None:
            dist.all_reduce(x, group=getattr(self.groups, group_name))
        return x

    def step(self) -> dict[str, float]:
        # Without per-document attention the model builds positions itself and runs plain causal attention.
        dropped = () if self.cfg.data.reset_attention_mask else ("segment_ids", "position_ids")
        micro_batches = [
            {k: v.to(self.device) for k, v in next(self.batches).items() if k not in dropped}
            for _ in range(self.grad_accum)
        ]
        n_tokens = torch.stack([mb["loss_mask"].sum() for mb in micro_batches]).sum().to(torch.float64)
        n_tokens = self._all_reduce(n_tokens, "dp_group").clamp(min=1.0)
        lr = self.scheduler.get_last_lr()[0]
        result = self.engine.train_step(
            micro_batches, next_token_loss(self.tp_group, n_tokens.float()), self.cfg.optim.clip_grad
        )
        # An fp16 step skipped on overflow still advances the LR schedule: the LR stays a function of the
        # step (what a resume recomputes). torch warns when that happens before any optimizer.step().
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += int(n_tokens)
        metrics = {"train/loss": result.loss / float(n_tokens), "train/lr": lr}
        if "loss_scale" in result.metrics:
            self.state.skipped_steps += int(result.metrics["skipped"])
            metrics |= {
                "train/loss_scale": result.metrics["loss_scale"],
                "train/skipped_steps": self.state.skipped_steps,
            }
        if not result.metrics.get("skipped"):  # an overflowed step has no finite gradient norm
            metrics["train/grad_norm"] = result.grad_norm
        return metrics

    def eval_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The held-out problems' full texts, right-padded (loss_mask 0 on padding, which causal attention
        never lets earlier tokens see), split into pp micro-batches so any schedule can run them."""
        tok = self.data.tokenizer
        rows = [
            tok(p["prompt"] + p["answer"])["input_ids"] + [tok.eos_token_id] for p in self.data.eval_problems
        ]
        # cp splits every row into 2 * cp chunks: pad to a multiple (padding is never attended nor scored).
        width = round_up(max(map(len, rows)) - 1, 2 * self.cfg.parallel.cp) + 1
        ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(rows), width - 1)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r) - 1] = 1.0
        B, T = ids.shape[0], width - 1
        batch = {
            "input_ids": ids[:, :-1],
            "labels": ids[:, 1:],
            "loss_mask": mask,
            "position_ids": torch.arange(T).expand(B, T),
            "segment_ids": torch.zeros(B, T, dtype=torch.long),
        }
        parts = min(B, self.cfg.parallel.pp)
        return [
            {k: v[idx].to(self.device) for k, v in batch.items()}
            for idx in torch.arange(B).tensor_split(parts)
        ]

    def evaluate(self) -> dict[str, float]:
        """Held-out loss (every layout) and greedy accuracy (on the whole model, rank 0)."""
        if not self.data.eval_problems:
            return {}
        mbs = self.eval_micro_batches()
        # Every dp rank evaluates the same problems: divide the dp-summed loss by dp as well.
        total = sum(float(mb["loss_mask"].sum()) for mb in mbs) * (self.groups.dp_size if self.groups else 1)
        loss_sum = self.engine.forward_only(
            mbs, next_token_loss(self.tp_group, torch.tensor(1.0)), "loss_sum"
        )
        metrics = {"eval/loss": loss_sum / total}
        model = self.whole_model()
        if model is not None:
            from core.data.synthetic import score_arithmetic

            metrics["eval/accuracy"] = accuracy(
                model,
                self.data.tokenizer,
                self.data.eval_problems,
                score_arithmetic,
                self.cfg.eval.max_new_tokens,
                self.device,
            )
        return metrics

    def whole_model(self) -> GPTModel | None:
        """The full model for greedy decoding: the single chunk when unsharded, else read back on rank 0 from
        the newest checkpoint (so evaluation of sharded layouts runs at checkpoints)."""
        if self.groups is None:
            return self.engine.chunks[0]
        if self.rank != 0:
            return None
        path = latest_checkpoint(self.run_dir / "checkpoints")
        state = load_full_state(path / "model")
        model = GPTModel(self.config)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("optim.")}, strict=False)
        return model.to(self.device)

    # ---- checkpoints --------------------------------------------------------------------------------

    def save(self) -> None:
        trainer_state: dict[str, Any] = {
            **dataclasses.asdict(self.state),
            "data": self.batches.state_dict(),
        }
        if self.engine.grad_scaler is not None:
            trainer_state["grad_scaler"] = self.engine.grad_scaler.state_dict()
        save_checkpoint(
            self.run_dir / "checkpoints",
            self.state.step,
            self.engine.sharded_state(),
            None,
            trainer_state,
            self.cfg.train.keep_last,
        )

    def maybe_resume(self) -> None:
        """Restores model, optimizer, scheduler, RNG and data position from the newest complete checkpoint
        (written at any parallel layout)."""
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return
        template = self.engine.load_template(path / "model")
        trainer_state = load_checkpoint(path, template, None)
        self.engine.finish_load(template)
        # The LR follows the current config's schedule at the restored step (Megatron does the same), so a
        # run resumed with a larger train.max_steps continues on the new schedule, not the stored one.
        lr = lr_at(trainer_state["step"], self.cfg.train.max_steps, self.cfg.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.scheduler.last_epoch = trainer_state["step"]
        self.scheduler._last_lr = [lr for _ in self.engine.optimizer.param_groups]
        if "rng" in trainer_state:
            set_rng_state(trainer_state["rng"])
        # Fields added later (skipped_steps) take their default when an older checkpoint lacks them.
        self.state = TrainerState(
            **{
                f.name: trainer_state[f.name]
                for f in dataclasses.fields(TrainerState)
                if f.name in trainer_state
            }
        )
        self.batches.load_state_dict(trainer_state["data"])
        if self.engine.grad_scaler is not None and "grad_scaler" in trainer_state:
            self.engine.grad_scaler.load_state_dict(trainer_state["grad_scaler"])

    def export(self) -> Path | None:
        """hf/ on rank 0: the whole model as a Hugging Face checkpoint, written under a temporary name."""
        model = self.whole_model()
        if model is None:
            return None
        from core.bridge import save_hf

        out, tmp = self.run_dir / "hf", self.run_dir / ".tmp-hf"
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(model.float(), tmp, tokenizer_dir=self.data.tokenizer_dir)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    # ---- loop ---------------------------------------------------------------------------------------

    def _due(self, every: int) -> bool:
        return (every > 0 and self.state.step % every == 0) or self.state.step == self.cfg.train.max_steps

    def fit(self) -> dict[str, float]:
        tcfg = self.cfg.train
        logger = MetricsLogger(self.run_dir, resume_step=self.state.step) if self.is_logger else None
        bar = _progress(tcfg.max_steps, self.state.step, tcfg.progress_bar and self.is_logger)
        last: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        while self.state.step < tcfg.max_steps:
            tokens_before = self.state.tokens_seen
            metrics = self.step()
            window_tokens += self.state.tokens_seen - tokens_before
            saved = self._due(tcfg.save_every)
            if saved:
                self.save()
            # Sharded layouts evaluate from checkpoints; a single process whenever asked.
            if self._due(tcfg.eval_every) and (saved or self.groups is None):
                metrics.update(self.evaluate())
            if self._due(tcfg.log_every) or "eval/loss" in metrics:
                elapsed = time.perf_counter() - window_start
                metrics["perf/tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                if self._peak_total:
                    metrics["perf/mfu"] = (
                        metrics["perf/tokens_per_s"] * self._flops_per_token / self._peak_total
                    )
                metrics["train/tokens_seen"] = self.state.tokens_seen
                window_tokens, window_start = 0, time.perf_counter()
                if logger is not None:
                    logger.log(self.state.step, metrics)
                last = metrics
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k in SHOWN})
            bar.update(1)
        bar.close()
        if logger is not None:
            logger.close()
        return last


SHOWN = ("train/loss", "train/lr", "eval/accuracy")


def validate_layout(cfg: PretrainConfig, config) -> ParallelDims:
    """The layout is checked against the model before any rank starts."""
    par = cfg.parallel
    dims = _dims(cfg)
    validate_model_layout(dims, _LayoutView(config, par.vpp))
    cfg.train.grad_accum_steps(par.dp)
    if cfg.train.compile:
        check_compile_layout(par)
    if cfg.data.seq_len % (2 * par.cp):
        fits = cfg.data.seq_len // (2 * par.cp) * 2 * par.cp or 2 * par.cp
        raise InputError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by 2 * parallel.cp = {2 * par.cp} (context "
            f"parallelism splits every sequence into 2*cp chunks): set data.seq_len={fits} or change cp"
        )
    return dims


@dataclass
class _LayoutView:
    config: Any
    virtual_pipeline_size: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.config, name)


def _rank_main(rank: int, world_size: int, cfg_dict: dict[str, Any]) -> None:
    cfg = PretrainConfig.model_validate(cfg_dict)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    groups = build_groups(_dims(cfg), rank)
    trainer = Trainer(cfg, groups, rank)
    trainer.fit()
    trainer.export()
    dist.barrier()


def _dims(cfg: PretrainConfig) -> ParallelDims:
    par = cfg.parallel
    return ParallelDims(tp=par.tp, cp=par.cp, ep=par.ep, dp=par.dp, pp=par.pp, world_size=par.world_size)


def run_pretrain(cfg: PretrainConfig) -> dict[str, float]:
    """Checks every input, then trains to train.max_steps (resuming from run.dir) and exports hf/.

    With parallel.* asking for several ranks it starts them itself (gloo on CPU, NCCL on GPU).
    """
    check_inputs(cfg)
    # The layout is checked before anything is written (the vocabulary is rounded up to a multiple of 64,
    # so only an explicit model.vocab_size can still fail the later, exact check).
    validate_layout(cfg, transformer_config_for(cfg, 64 * cfg.parallel.tp))
    run_dir = Path(cfg.run.dir)
    data = prepare_data(cfg, run_dir)  # generated once, before any rank starts
    validate_layout(cfg, transformer_config_for(cfg, len(data.tokenizer)))
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    metrics: dict[str, float] = {}
    if cfg.parallel.world_size == 1:
        trainer = Trainer(cfg)
        metrics = trainer.fit()
        trainer.export()
    else:
        launch(_rank_main, cfg.parallel.world_size, cfg.model_dump(mode="json"))
        metrics = read_metrics(run_dir)[-1]
    plot_metrics(run_dir, ["train/loss", "eval/loss", "train/lr", "eval/accuracy"])
    return metrics


def transformer_config_for(cfg: PretrainConfig, vocab_size: int):
    if cfg.model.init_from:
        from core.bridge.hf import read_hf_config

        return read_hf_config(cfg.model.init_from)[1]
    return transformer_config(cfg.model, vocab_size)
