"""Supervised fine-tuning: next-token loss on the responses of chat or prompt/completion data.

A loop on the shared EngineTrainer: the data are SFT examples (core/data/alignment.py: chat rows rendered
with the tokenizer's template, loss on every assistant turn; or prompt + completion, loss on the
completion + EOS) packed into rows with per-document attention (or one example per row), the step is
pretraining's packed next-token step with the loss mask on response tokens, and the evaluation is the
held-out response loss plus task accuracy by greedy generation through the native engine (rows with an
"answer": the arithmetic verifier for the embedded task, exact match otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from algorithms.alignment_inputs import source_tokenizer
from algorithms.engine_trainer import PackedLMTrainer
from algorithms.model_config import SourceModelConfig
from algorithms.qat import QATConfig
from algorithms.trainer import LoopConfig, check_resume
from core.config import InputPath, LoraConfig, RunConfig, Schema
from core.errors import InputError
from core.transformer.model import GPTModel


class SFTSyntheticConfig(Schema):
    """The embedded arithmetic task as chats ("12+34=" -> "46"), some multi-turn."""

    n_train: int = Field(4000, ge=1)
    n_eval: int = Field(200, ge=1)
    digits: int = Field(2, ge=1, le=6)
    ops: str = Field("+", pattern=r"^[+\-*]+$")
    seed: int = 2
    multi_turn_frac: float = Field(0.25, ge=0, le=1)


class SFTDataConfig(Schema):
    path: InputPath | None = Field(
        None,
        description="chat ({messages}) or prompt/completion rows: .jsonl, .parquet "
        "or a save_to_disk directory",
    )
    eval_path: InputPath | None = Field(None, description="held-out rows, same formats (none: no evaluation)")
    synthetic: SFTSyntheticConfig | None = Field(None, description="the embedded arithmetic task as chats")
    seq_len: int = Field(64, ge=2, description="positions per packed training row")
    packing: bool = Field(True, description="pack several examples per row (per-document attention)")
    max_len: int | None = Field(None, ge=2, description="tokens per example; none: seq_len + 1")
    truncation: Literal["off", "right"] = Field(
        "off",
        description="off: a longer example stops the run before it starts; right: keep the first max_len",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SFTDataConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of data.path and data.synthetic")
        if self.max_len is not None and self.max_len > self.seq_len + 1:
            raise ValueError(f"data.max_len={self.max_len} exceeds data.seq_len + 1 = {self.seq_len + 1}")
        return self


class SFTEvalConfig(Schema):
    num_rows: int = Field(200, ge=1, description="held-out rows evaluated")
    max_new_tokens: int = Field(8, ge=1, description="greedy tokens per held-out answer")


class SFTConfig(LoopConfig):
    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/sft"))
    model: SourceModelConfig
    data: SFTDataConfig = Field(default_factory=lambda: SFTDataConfig(synthetic=SFTSyntheticConfig()))
    eval: SFTEvalConfig = Field(default_factory=SFTEvalConfig)
    lora: LoraConfig | None = Field(None, description="train LoRA adapters only (none: full fine-tuning)")
    quantize: QATConfig | None = Field(None, description="quantization-aware training (algorithms/qat.py)")


# ---------------------------------------------------------------------------------------------- inputs


def read_sft_rows(cfg: SFTConfig, run_dir: Path) -> tuple[list, list, bool]:
    """(train rows, held-out rows, synthetic?) as (record, where) pairs."""
    from core.data.alignment import read_rows

    data = cfg.data
    if data.synthetic is not None:
        from core.data.synthetic import write_sft_chat_data

        syn = data.synthetic
        corpus = write_sft_chat_data(
            run_dir / "data",
            syn.n_train,
            syn.n_eval,
            syn.seed,
            syn.digits,
            tuple(syn.ops),
            syn.multi_turn_frac,
        )
        return read_rows(corpus.train), read_rows(corpus.eval), True
    eval_rows = read_rows(data.eval_path) if data.eval_path else []
    return read_rows(data.path), eval_rows, False


def sft_data(cfg: Any, tokenizer: Any, run_dir: Path) -> tuple[list, Any, list, list, bool]:
    """The SFT data of cfg.data (SFT, distillation) with `tokenizer`: (training rows, SFTDataset of packed
    training rows, held-out rows (at most eval.num_rows), their examples, whether synthetic)."""
    from core.data.alignment import SFTDataset, build_sft_examples

    rows, eval_rows, synthetic = read_sft_rows(cfg, run_dir)
    max_len = cfg.data.max_len or cfg.data.seq_len + 1
    examples = build_sft_examples(rows, tokenizer, max_len, cfg.data.truncation)
    pad = tokenizer.pad_token_id or 0
    dataset = SFTDataset(examples, cfg.data.seq_len, cfg.train.seed, pad, cfg.data.packing)
    eval_rows = eval_rows[: cfg.eval.num_rows]
    eval_examples = build_sft_examples(eval_rows, tokenizer, max_len, cfg.data.truncation)
    return rows, dataset, eval_rows, eval_examples, synthetic


def check_for_run(cfg: SFTConfig) -> None:
    """Every input, before anything is written: the model source and its tokenizer, every row (each bad
    one named by file:line), the example lengths and the parallel layout."""
    from algorithms.rl_inputs import init_config

    source, tokenizer, _ = source_tokenizer(cfg.model)
    check_sft_data(cfg, tokenizer)
    cfg.parallel.check_model(init_config(source))
    check_resume(cfg.run.dir, SFTTrainer.stage, init_config(source))


def check_sft_data(cfg: Any, tokenizer: Any) -> None:
    """What SFT and distillation check alike: every row (each bad one named by file:line), the example
    lengths, the batch sizes against dp and the sequence length against cp."""
    from core.data.alignment import build_sft_examples
    from core.engine import check_compile_layout

    rows, eval_rows, _ = read_sft_rows(cfg, Path(cfg.run.dir))
    max_len = cfg.data.max_len or cfg.data.seq_len + 1
    build_sft_examples(rows, tokenizer, max_len, cfg.data.truncation)
    if eval_rows:
        build_sft_examples(eval_rows, tokenizer, max_len, cfg.data.truncation)
    cfg.train.grad_accum_steps(cfg.parallel.dp)
    if cfg.train.compile:
        check_compile_layout(cfg.parallel)
    if cfg.data.seq_len % (2 * cfg.parallel.cp):
        raise InputError(f"data.seq_len={cfg.data.seq_len} is not divisible by 2 * parallel.cp")


# ------------------------------------------------------------------------------------------------- loop


class SFTTrainer(PackedLMTrainer):
    """One rank of an SFT run (see the module docstring)."""

    stage: ClassVar[str] = "sft"
    shown: ClassVar[tuple[str, ...]] = ("train/loss", "train/token_accuracy", "eval/accuracy")
    plotted: ClassVar[tuple[str, ...]] = ("train/loss", "eval/loss", "train/token_accuracy", "eval/accuracy")
    config_schema: ClassVar[type] = SFTConfig

    def prepare(self) -> None:
        self.source, self.tokenizer, self._tokenizer_dir = source_tokenizer(self.cfg.model)
        self.dataset, self.eval_rows, self.eval_examples, self.synthetic = sft_data(
            self.cfg, self.tokenizer, self.run_dir
        )[1:]

    def initial_model(self) -> tuple[GPTModel, Any]:
        from algorithms.rl_inputs import load_init

        return load_init(self.source)

    def build_engine(self, full: GPTModel):
        engine = super().build_engine(full)
        self.setup_batches(self.dataset, self.cfg.data.seq_len)
        return engine

    @property
    def tokenizer_dir(self) -> Path:
        return self._tokenizer_dir

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_rows)

    def step(self) -> dict[str, float]:
        return self.packed_step(self.batches)

    def evaluate(self) -> dict[str, float]:
        """Held-out response loss; task accuracy by greedy generation for rows with an "answer"."""
        if not self.eval_rows:
            return {}
        rows = [e.input_ids for e in self.eval_examples]
        masks = [e.loss_mask for e in self.eval_examples]
        metrics = {"eval/loss": self.held_out_loss(rows, masks)}
        acc = self.answer_accuracy(
            [r for r, _ in self.eval_rows], self.cfg.eval.max_new_tokens, self.synthetic
        )
        if acc is not None:
            metrics["eval/accuracy"] = acc
        return metrics


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    """Checks every input, then fine-tunes to train.max_steps (resuming from run.dir) and exports hf/."""
    from algorithms.engine_trainer import run_spmd

    check_for_run(cfg)
    return run_spmd(SFTTrainer, cfg)
