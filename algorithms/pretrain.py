"""Pretraining: next-token cross-entropy on packed token sequences, from scratch or from a checkpoint.

A loop on the shared EngineTrainer (algorithms/engine_trainer.py): it supplies the data (packed documents,
or the embedded arithmetic task generated into the run directory), the initial model (from scratch, or any
`model.init_from`), the next-token step and the held-out evaluation; the trainer owns the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from algorithms.engine_trainer import PackedLMTrainer, run_spmd
from algorithms.model_config import ModelConfig
from algorithms.trainer import LoopConfig, check_resume
from core.config import InputPath, PrecisionConfig, RunConfig, Schema
from core.engine import check_compile_layout
from core.errors import InputError
from core.transformer.model import GPTModel


class DatasetSpec(Schema):
    path: InputPath = Field(description="prefix of a .bin/.idx pair written by `rl data tokenize`")
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
    tokenizer: InputPath | None = Field(
        None, description="local tokenizer directory (generated for synthetic)"
    )
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


class PretrainConfig(LoopConfig):
    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/pretrain"))
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(synthetic=SyntheticConfig()))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    precision: PretrainPrecision = Field(default_factory=PretrainPrecision)


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


def build_full_model(cfg: PretrainConfig, vocab_size: int) -> tuple[GPTModel, Any]:
    """The whole model on the CPU in fp32, seeded: every layout starts from these exact weights."""
    torch.manual_seed(cfg.train.seed)
    model, arch = cfg.model.initial_model(vocab_size)
    if model.config.vocab_size < vocab_size:
        raise InputError(
            f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return model, arch


class PretrainTrainer(PackedLMTrainer):
    """One rank of a pretraining run. A single process runs with groups=None; `rl pretrain` with
    parallel.* > 1 starts one per rank."""

    stage: ClassVar[str] = "pretrain"
    shown: ClassVar[tuple[str, ...]] = ("train/loss", "train/lr", "eval/accuracy")
    plotted: ClassVar[tuple[str, ...]] = ("train/loss", "eval/loss", "train/lr", "eval/accuracy")
    config_schema: ClassVar[type] = PretrainConfig

    def prepare(self) -> None:
        self.data = prepare_data(self.cfg, self.run_dir)
        self.tokenizer = self.data.tokenizer

    def initial_model(self) -> tuple[GPTModel, Any]:
        return build_full_model(self.cfg, len(self.data.tokenizer))

    def build_engine(self, full: GPTModel):
        engine = super().build_engine(full)
        self.setup_batches(self.data.dataset, self.cfg.data.seq_len)
        return engine

    @property
    def tokenizer_dir(self) -> str:
        return self.data.tokenizer_dir

    @property
    def has_eval(self) -> bool:
        return bool(self.data.eval_problems)

    def step(self) -> dict[str, float]:
        return self.packed_step(self.batches, drop_packing=not self.cfg.data.reset_attention_mask)

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and greedy accuracy (native engine), at every layout."""
        if not self.data.eval_problems:
            return {}
        tok = self.tokenizer
        problems = self.data.eval_problems
        rows, masks = [], []
        for p in problems:
            ids = tok(p["prompt"] + p["answer"])["input_ids"] + [tok.eos_token_id]
            rows.append(ids)
            masks.append([1] * len(ids))
        metrics = {"eval/loss": self.held_out_loss(rows, masks)}
        acc = self.answer_accuracy(problems, self.cfg.eval.max_new_tokens, arithmetic=True)
        if acc is not None:
            metrics["eval/accuracy"] = acc
        return metrics

    def loop_state(self) -> dict[str, Any]:
        return {**super().loop_state(), "skipped_steps": self.skipped_steps}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        super().load_loop_state(state)
        self.skipped_steps = int(state.get("skipped_steps", 0))  # absent in older checkpoints


Trainer = PretrainTrainer  # the name tests and scripts import


def validate_layout(cfg: PretrainConfig, config) -> None:
    """The layout is checked against the model before any rank starts."""
    par = cfg.parallel
    par.check_model(config)
    cfg.train.grad_accum_steps(par.dp)
    if cfg.train.compile:
        check_compile_layout(par)
    if cfg.data.seq_len % (2 * par.cp):
        fits = cfg.data.seq_len // (2 * par.cp) * 2 * par.cp or 2 * par.cp
        raise InputError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by 2 * parallel.cp = {2 * par.cp} (context "
            f"parallelism splits every sequence into 2*cp chunks): set data.seq_len={fits} or change cp"
        )


def check_pretrain(cfg: PretrainConfig) -> None:
    """Every input and the layout, before anything is written (the data is generated afterwards, once)."""
    check_inputs(cfg)
    # The vocabulary is rounded up to a multiple of 64, so only an explicit model.vocab_size can still fail
    # the later, exact check.
    validate_layout(cfg, cfg.model.transformer_config(64 * cfg.parallel.tp))


def check_for_run(cfg: PretrainConfig) -> None:
    """Every input and the layout; then the embedded data is generated once, before any rank starts, and
    the model checked against the tokenizer."""
    check_pretrain(cfg)
    data = prepare_data(cfg, Path(cfg.run.dir))
    config = cfg.model.transformer_config(len(data.tokenizer))
    if config.vocab_size < len(data.tokenizer):
        raise InputError(
            f"model vocab_size={config.vocab_size} is smaller than the tokenizer's {len(data.tokenizer)}"
        )
    validate_layout(cfg, config)
    check_resume(cfg.run.dir, PretrainTrainer.stage, config)


def run_pretrain(cfg: PretrainConfig) -> dict[str, float]:
    """Checks every input, then trains to train.max_steps (resuming from run.dir) and exports hf/.

    With parallel.* asking for several ranks it starts them itself (gloo on CPU, NCCL on GPU).
    """
    check_for_run(cfg)
    return run_spmd(PretrainTrainer, cfg)
