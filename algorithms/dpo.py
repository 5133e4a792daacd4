"""Direct preference optimisation and its variants: DPO (sigmoid), conservative DPO (label smoothing),
robust DPO, IPO, SLiC hinge, SimPO (reference-free, length-normalised) and an optional RPO NLL term.

A loop on the shared EngineTrainer. Data: preference pairs (prompt, chosen, rejected) as text or chat
messages (core/data/alignment.py). A micro-batch holds whole pairs, rows interleaved [chosen_0,
rejected_0, chosen_1, ...]; the loss (algorithms/preference_losses.py, by name) runs on the sums of
response-token logprobs, normalised by the step's global pair count, so every layout takes the
single-process step. The reference is the initial model:
  reference: precompute   its logprobs of every pair are computed once, before the first step, with the
                          initial weights (TRL's precompute_ref_log_probs), and kept in the checkpoints
  reference: batch        a frozen copy computes them for each batch; with LoRA the same weights with the
                          adapters disabled (no second copy)
  reference_free: true    none (SimPO always is)
Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected (train/ and eval/ prefixed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from algorithms.alignment_inputs import (
    PairDataConfig,
    PairSyntheticConfig,
    pair_paths,
    source_tokenizer,
    synthesize_pairs,
)
from algorithms.engine_trainer import PairTrainer
from algorithms.model_config import SourceModelConfig
from algorithms.preference_losses import PREFERENCE_LOSSES, REFERENCE_FREE, nll_loss
from algorithms.qat import QATConfig
from algorithms.trainer import LoopConfig, check_resume
from core.config import LoraConfig, RunConfig, Schema
from core.errors import InputError
from core.transformer.model import GPTModel

PAIR_SUMS = (
    "loss_sum",
    "chosen_rewards",
    "rejected_rewards",
    "correct",
    "chosen_logps",
    "rejected_logps",
    "pairs",
)


class DPOAlgorithmConfig(Schema):
    loss: str = Field("sigmoid", description="a PREFERENCE_LOSSES name: sigmoid, robust, ipo, hinge, simpo")
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid: conservative DPO; robust: noise")
    gamma: float = Field(0.0, ge=0, description="simpo: the target reward margin")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of the NLL of the chosen responses (RPO)")
    reference_free: bool = False
    reference: Literal["precompute", "batch"] = "precompute"

    @field_validator("loss")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {name!r}; choices: {PREFERENCE_LOSSES.names()}")
        return name

    @property
    def uses_reference(self) -> bool:
        return not self.reference_free and self.loss not in REFERENCE_FREE


class DPOEvalConfig(Schema):
    num_pairs: int = Field(200, ge=1)
    max_new_tokens: int = Field(8, ge=1, description="greedy task accuracy on the held-out prompts")


class DPOConfig(LoopConfig):
    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/dpo"))
    model: SourceModelConfig
    data: PairDataConfig = Field(default_factory=lambda: PairDataConfig(synthetic=PairSyntheticConfig()))
    algorithm: DPOAlgorithmConfig = Field(default_factory=DPOAlgorithmConfig)
    eval: DPOEvalConfig = Field(default_factory=DPOEvalConfig)
    lora: LoraConfig | None = Field(None, description="train LoRA adapters only (none: full fine-tuning)")
    quantize: QATConfig | None = Field(None, description="quantization-aware training (algorithms/qat.py)")

    @model_validator(mode="after")
    def _layout(self) -> DPOConfig:
        if self.parallel.cp > 1:
            raise ValueError("parallel.cp > 1: preference training does not split sequences over cp yet")
        if self.train.micro_batch_size > self.train.global_batch_size:
            raise ValueError("train.micro_batch_size (pairs) exceeds train.global_batch_size (pairs)")
        return self


def check_for_run(cfg: DPOConfig) -> None:
    """Every input before the run starts (bad rows named by file:line); the synthetic pairs are sampled
    here, once, from the initial model."""
    from algorithms.rl_inputs import init_config
    from core.data.alignment import build_preference_examples, read_rows
    from core.engine import check_compile_layout

    source, tokenizer, _ = source_tokenizer(cfg.model)
    cfg.parallel.check_model(init_config(source))
    check_resume(cfg.run.dir, DPOTrainer.stage, init_config(source))
    cfg.train.grad_accum_steps(cfg.parallel.dp)
    if cfg.train.compile:
        check_compile_layout(cfg.parallel)
    if cfg.data.synthetic is not None:
        synthesize_pairs(cfg, source, tokenizer)
    train, held_out = pair_paths(cfg)
    examples = build_preference_examples(read_rows(train), tokenizer, cfg.data.max_len, cfg.data.truncation)
    if len(examples) < cfg.train.global_batch_size:
        raise InputError(
            f"{train}: {len(examples)} pairs, fewer than train.global_batch_size={cfg.train.global_batch_size}"
        )
    if held_out is not None:
        build_preference_examples(read_rows(held_out), tokenizer, cfg.data.max_len, cfg.data.truncation)
    check_resume(cfg.run.dir, DPOTrainer.stage, init_config(source), rows=len(examples))


# ------------------------------------------------------------------------------------------------- loop


class DPOTrainer(PairTrainer):
    """One rank of a preference-optimisation run (see the module docstring)."""

    stage: ClassVar[str] = "dpo"
    shown: ClassVar[tuple[str, ...]] = ("train/loss", "train/rewards/accuracies", "eval/rewards/accuracies")
    plotted: ClassVar[tuple[str, ...]] = (
        "train/loss",
        "train/rewards/margins",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/accuracy",
    )
    config_schema: ClassVar[type] = DPOConfig

    def prepare(self) -> None:
        super().prepare()
        self.ref_logps: dict[str, torch.Tensor] = {}  # "train" / "eval": (N, 2) chosen, rejected
        self._reference: Any = None

    def build_engine(self, full: GPTModel):
        engine = super().build_engine(full)
        algo = self.cfg.algorithm
        if algo.uses_reference and algo.reference == "batch" and self.cfg.lora is None:
            # A frozen copy on the same layout (forward only; its optimizer is never stepped).
            self._reference = super().build_engine(full)
        return engine

    # ---- reference logprobs -----------------------------------------------------------------------------

    @contextmanager
    def reference_weights(self) -> Iterator[Any]:
        """The engine that computes reference logprobs: the frozen copy, or the policy with its LoRA
        adapters disabled, or (precompute, before the first step) the policy itself."""
        if self._reference is not None:
            yield self._reference
        elif self.cfg.lora is not None:
            with self.engine.adapters_disabled():
                yield self.engine
        else:
            yield self.engine

    def pair_logps(self, engine: Any, examples: list[Any]) -> torch.Tensor:
        """(N, 2) summed response logprobs (chosen, rejected) of the pairs, forward only, on every rank."""
        out = []
        for start in range(0, len(examples), self.cfg.train.micro_batch_size):
            mb = self.micro_batch(examples[start : start + self.cfg.train.micro_batch_size])
            collected = engine.forward_collect([mb], self._collect_logps)
            seq = (
                collected[0]["seq_logps"]
                if collected
                else torch.zeros(mb["input_ids"].shape[0], device=self.device)
            )
            seq = self.broadcast_from_last_stage(seq)
            out.append(seq.view(-1, 2).cpu())
        return torch.cat(out) if out else torch.zeros(0, 2)

    def _collect_logps(self, logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        from algorithms.policy import token_logprobs

        logps = token_logprobs(logits, mb["input_ids"], self.tp_group)
        return logits.new_zeros(()), {"seq_logps": (logps * mb["response_mask"]).sum(-1)}

    def broadcast_from_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups is not None and self.groups.pp_size > 1:
            import torch.distributed as dist

            x = x.to(self.device).contiguous()
            dist.broadcast(x, src=self.groups.ranks["pp"][-1], group=self.groups.pp_group)
        return x

    def precompute_reference(self) -> None:
        """Reference logprobs of every train and held-out pair with the initial weights (step 0 only; a
        resumed run reads them from its checkpoint)."""
        if not self.cfg.algorithm.uses_reference:
            return
        with self.reference_weights() as engine:
            self.ref_logps = {
                "train": self.pair_logps(engine, self.examples),
                "eval": self.pair_logps(engine, self.eval_examples),
            }

    def maybe_resume(self) -> bool:
        resumed = super().maybe_resume()
        if not resumed and self.cfg.algorithm.reference == "precompute":
            self.precompute_reference()
        return resumed

    def ref_of(self, split: str, indices: list[int], examples: list[Any]) -> torch.Tensor | None:
        """(b, 2) reference logprobs of these pairs, or None when reference-free."""
        algo = self.cfg.algorithm
        if not algo.uses_reference:
            return None
        if algo.reference == "precompute":
            return self.ref_logps[split][indices]
        with self.reference_weights() as engine:
            return self.pair_logps(engine, examples)

    # ---- the step ---------------------------------------------------------------------------------------

    def micro_batch(self, examples: list[Any], ref: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from core.data.alignment import preference_batch

        batch = preference_batch(examples, self.tokenizer.pad_token_id or 0)
        if ref is not None:
            batch["ref_logps"] = ref.reshape(-1, 1).to(torch.float32)  # (2b, 1): chosen, rejected interleaved
        return {k: v.to(self.device) for k, v in batch.items()}

    def pair_loss(self, n_pairs: torch.Tensor, n_chosen_tokens: torch.Tensor):
        """loss_fn over a micro-batch of pairs: its share of the step's mean pair loss (+ rpo_alpha * the
        step's chosen-token NLL), and per-pair sums for the metrics."""
        from algorithms.policy import token_logprobs

        algo = self.cfg.algorithm
        fn = PREFERENCE_LOSSES.get(algo.loss)
        knobs: dict[str, Any] = {"beta": algo.beta}
        if algo.loss in ("sigmoid", "robust", "simpo"):
            knobs["label_smoothing"] = algo.label_smoothing
        if algo.loss == "simpo":
            knobs["gamma"] = algo.gamma

        def loss_fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
            mask = mb["response_mask"]
            seq = (token_logprobs(logits, mb["input_ids"], self.tp_group) * mask).sum(-1)  # (2b,)
            lengths = mask.sum(-1)
            chosen, rejected = seq[0::2], seq[1::2]
            ref = mb["ref_logps"][:, 0] if "ref_logps" in mb else None
            losses, chosen_rewards, rejected_rewards = fn(
                chosen,
                rejected,
                ref[0::2] if ref is not None else None,
                ref[1::2] if ref is not None else None,
                chosen_lengths=lengths[0::2],
                rejected_lengths=lengths[1::2],
                **knobs,
            )
            loss = losses.sum() / n_pairs
            if algo.rpo_alpha > 0:
                loss = loss + algo.rpo_alpha * nll_loss(chosen, lengths[0::2], global_count=n_chosen_tokens)
            sums = {
                "loss_sum": loss.detach() * n_pairs,
                "chosen_rewards": chosen_rewards.sum(),
                "rejected_rewards": rejected_rewards.sum(),
                "correct": (chosen_rewards > rejected_rewards).float().sum(),
                "chosen_logps": chosen.detach().sum(),
                "rejected_logps": rejected.detach().sum(),
                "pairs": torch.tensor(float(chosen.shape[0]), device=chosen.device),
            }
            return loss, sums

        return loss_fn

    def step(self) -> dict[str, float]:
        n, chunks = self.next_micro_batches()
        micro_batches = []
        for chunk in chunks:
            examples = [self.examples[i] for i in chunk]
            micro_batches.append(self.micro_batch(examples, self.ref_of("train", chunk, examples)))
        n_pairs = torch.tensor(float(n), device=self.device)
        chosen_tokens = sum(float(mb["response_mask"][0::2].sum()) for mb in micro_batches)
        n_chosen = self.all_reduce(torch.tensor(chosen_tokens, dtype=torch.float64, device=self.device))
        lr = self.lr
        loss_fn = self.pair_loss(n_pairs, n_chosen.float())
        sums, grad_norm, _ = self.train_step(micro_batches, loss_fn, PAIR_SUMS)
        return {**pair_metrics("train", sums), "train/grad_norm": grad_norm, "train/lr": lr}

    def evaluate(self) -> dict[str, float]:
        """Held-out pairs (loss, rewards, accuracies, margins) and greedy task accuracy on their prompts."""
        if not self.eval_examples:
            return {}
        n = len(self.eval_examples)
        ref = self.ref_of("eval", list(range(n)), self.eval_examples)
        mbs = [
            self.micro_batch([self.eval_examples[i] for i in chunk], ref[chunk] if ref is not None else None)
            for chunk in self.eval_chunks()
        ]
        n_pairs = torch.tensor(float(n), device=self.device)
        n_chosen = torch.tensor(sum(float(mb["response_mask"][0::2].sum()) for mb in mbs), device=self.device)
        # forward_only sums over dp ranks, which all see the same pairs: divide by dp.
        dp = self.groups.dp_size if self.groups else 1
        with torch.no_grad():
            sums = {
                k: self.engine.forward_only(mbs, self.pair_loss(n_pairs, n_chosen), k) / dp for k in PAIR_SUMS
            }
        metrics = pair_metrics("eval", sums)
        rows = [r for r, _ in self.eval_rows]
        acc = self.answer_accuracy(rows, self.cfg.eval.max_new_tokens, self.cfg.data.synthetic is not None)
        if acc is not None:
            metrics["eval/accuracy"] = acc
        return metrics

    # ---- state ------------------------------------------------------------------------------------------

    def loop_state(self) -> dict[str, Any]:
        return {**super().loop_state(), "ref_logps": self.ref_logps}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        super().load_loop_state(state)
        self.ref_logps = state.get("ref_logps", {})
        if (
            self.cfg.algorithm.uses_reference
            and self.cfg.algorithm.reference == "precompute"
            and not self.ref_logps
        ):
            raise InputError(
                "the checkpoint has no precomputed reference logprobs (written by another loop?)"
            )


def pair_metrics(prefix: str, sums: dict[str, float]) -> dict[str, float]:
    """TRL's preference metrics from the step's sums over pairs."""
    n = max(sums["pairs"], 1.0)
    chosen, rejected = sums["chosen_rewards"] / n, sums["rejected_rewards"] / n
    return {
        f"{prefix}/loss": sums["loss_sum"] / n,
        f"{prefix}/rewards/chosen": chosen,
        f"{prefix}/rewards/rejected": rejected,
        f"{prefix}/rewards/accuracies": sums["correct"] / n,
        f"{prefix}/rewards/margins": chosen - rejected,
        f"{prefix}/logps/chosen": sums["chosen_logps"] / n,
        f"{prefix}/logps/rejected": sums["rejected_logps"] / n,
    }


def run_dpo(cfg: DPOConfig) -> dict[str, float]:
    from algorithms.engine_trainer import run_spmd

    check_for_run(cfg)
    return run_spmd(DPOTrainer, cfg)
