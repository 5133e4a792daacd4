"""Reward-model training: Bradley-Terry on preference pairs, with a value head on the language model.

A loop on the shared EngineTrainer. The model is the starting LM with its output layer replaced by the
value head (algorithms/critic.py value_model_from_lm: a fresh N(0, init_std) head); a pair's rows are
interleaved [chosen, rejected] and each row is scored by the head's output at its last token (the
response's EOS). The loss is algorithms/preference_losses.bradley_terry_loss, -log sigmoid(s_c - s_r -
margin) (a per-row "margin" field when data.margin_key names one, as in Llama 2), normalised by the step's
global pair count. Held-out: pairwise accuracy (eval/accuracy) and the mean margin.

The trained model is a value-head model: checkpoints/step_N (meta.json says head="value") and the
exported reward_model/ (our native format: model_config.json + model.safetensors) load into
RewardModel / RewardModelWorker, and GRPO scores rollouts with it (environment.name: reward_model).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from algorithms.alignment_inputs import (
    PairDataConfig,
    PairSyntheticConfig,
    pair_paths,
    source_tokenizer,
    synthesize_pairs,
)
from algorithms.engine_trainer import PairTrainer
from algorithms.model_config import SourceModelConfig
from algorithms.preference_losses import bradley_terry_loss
from algorithms.trainer import LoopConfig, check_resume, publish_dir
from core.config import RunConfig, Schema
from core.errors import InputError
from core.transformer.model import GPTModel

RM_SUMS = ("loss_sum", "correct", "margin", "chosen_scores", "rejected_scores", "pairs")


class RMAlgorithmConfig(Schema):
    margin_key: str | None = Field(None, description="a row field holding the pair's margin (Llama 2)")
    center_coef: float = Field(0.0, ge=0, description="weight of mean(s_c + s_r)^2, keeping scores centred")
    head_seed: int = Field(0, ge=0, description="seed of the fresh value head")


class RMEvalConfig(Schema):
    num_pairs: int = Field(200, ge=1)


class RMConfig(LoopConfig):
    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/rm"))
    model: SourceModelConfig
    data: PairDataConfig = Field(default_factory=lambda: PairDataConfig(synthetic=PairSyntheticConfig()))
    algorithm: RMAlgorithmConfig = Field(default_factory=RMAlgorithmConfig)
    eval: RMEvalConfig = Field(default_factory=RMEvalConfig)


def check_for_run(cfg: RMConfig) -> None:
    """Every input before the run starts; synthetic pairs are sampled here once from the starting model."""
    from algorithms.rl_inputs import init_config
    from core.data.alignment import build_preference_examples, read_rows

    if cfg.parallel.cp > 1:
        raise InputError("parallel.cp > 1: reward-model training does not split sequences over cp yet")
    source, tokenizer, _ = source_tokenizer(cfg.model)
    config = dataclasses.replace(init_config(source), head="value", tie_embeddings=False)
    cfg.parallel.check_model(config)
    check_resume(cfg.run.dir, RMTrainer.stage, config)
    cfg.train.grad_accum_steps(cfg.parallel.dp)
    if cfg.data.synthetic is not None:
        synthesize_pairs(cfg, source, tokenizer)
    train, held_out = pair_paths(cfg)
    rows = read_rows(train)
    examples = build_preference_examples(rows, tokenizer, cfg.data.max_len, cfg.data.truncation)
    if len(examples) < cfg.train.global_batch_size:
        raise InputError(
            f"{train}: {len(examples)} pairs, fewer than train.global_batch_size={cfg.train.global_batch_size}"
        )
    key = cfg.algorithm.margin_key
    for row, where in rows if key else []:
        if not isinstance(row.get(key), int | float):
            raise InputError(f"{where}: algorithm.margin_key={key!r} but the row has no number there")
    if held_out is not None:
        build_preference_examples(read_rows(held_out), tokenizer, cfg.data.max_len, cfg.data.truncation)
    check_resume(cfg.run.dir, RMTrainer.stage, config, rows=len(examples))


class RMTrainer(PairTrainer):
    """One rank of a reward-model run (see the module docstring)."""

    stage: ClassVar[str] = "rm"
    shown: ClassVar[tuple[str, ...]] = ("train/loss", "train/accuracy", "eval/accuracy")
    plotted: ClassVar[tuple[str, ...]] = ("train/loss", "train/accuracy", "eval/accuracy", "eval/margin")
    config_schema: ClassVar[type] = RMConfig

    def initial_model(self) -> tuple[GPTModel, Any]:
        from algorithms.critic import value_model_from_lm
        from algorithms.rl_inputs import load_init

        lm, arch = load_init(self.source)
        if lm.config.head == "value":  # continue training a reward model
            return lm, arch
        config, state = value_model_from_lm(lm.config, lm.state_dict(), self.cfg.algorithm.head_seed)
        model = GPTModel(config)
        model.load_state_dict(state, strict=False)
        return model, arch

    def micro_batch(
        self, indices: list[int], examples: list[Any], rows: list[Any]
    ) -> dict[str, torch.Tensor]:
        from core.data.alignment import preference_batch

        batch = preference_batch([examples[i] for i in indices], self.tokenizer.pad_token_id or 0)
        mask = batch["response_mask"]
        T = mask.shape[1]
        # the row's last response token (its EOS): the head's output there is the row's score
        batch["last"] = (T - 1 - mask.flip(1).argmax(dim=1)).to(torch.long)[:, None]  # (2b, 1)
        key = self.cfg.algorithm.margin_key
        if key:
            margins = torch.tensor([float(rows[i][0][key]) for i in indices])
            batch["margin"] = margins.repeat_interleave(2)[:, None]  # (2b, 1), chosen and rejected alike
        return {k: v.to(self.device) for k, v in batch.items()}

    def pair_loss(self, n_pairs: torch.Tensor):
        center = self.cfg.algorithm.center_coef

        def loss_fn(out: torch.Tensor, mb: dict[str, torch.Tensor]):
            head = out[..., 0].float()  # (2b, T)
            scores = head.gather(1, mb["last"])[:, 0]  # (2b,)
            chosen, rejected = scores[0::2], scores[1::2]
            margin = mb["margin"][0::2, 0] if "margin" in mb else None
            losses, _ = bradley_terry_loss(chosen, rejected, margin, center_coef=center)
            loss = losses.sum() / n_pairs
            diff = (chosen - rejected).detach()
            return loss, {
                "loss_sum": losses.detach().sum(),
                "correct": (diff > 0).float().sum(),
                "margin": diff.sum(),
                "chosen_scores": chosen.detach().sum(),
                "rejected_scores": rejected.detach().sum(),
                "pairs": torch.tensor(float(chosen.shape[0]), device=chosen.device),
            }

        return loss_fn

    def step(self) -> dict[str, float]:
        n, chunks = self.next_micro_batches()
        mbs = [self.micro_batch(chunk, self.examples, self.rows) for chunk in chunks]
        lr = self.lr
        n_pairs = torch.tensor(float(n), device=self.device)
        sums, grad_norm, _ = self.train_step(mbs, self.pair_loss(n_pairs), RM_SUMS)
        return {**rm_metrics("train", sums), "train/grad_norm": grad_norm, "train/lr": lr}

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        mbs = [self.micro_batch(chunk, self.eval_examples, self.eval_rows) for chunk in self.eval_chunks()]
        dp = self.groups.dp_size if self.groups else 1  # every dp rank sees the same pairs
        n_pairs = torch.tensor(float(len(self.eval_examples)), device=self.device)
        sums = {k: self.engine.forward_only(mbs, self.pair_loss(n_pairs), k) / dp for k in RM_SUMS}
        return rm_metrics("eval", sums)

    def export(self) -> Path:
        """reward_model/: the whole value-head model in our native format (what RewardModelWorker,
        `environment.name: reward_model` and model.init_from read), published atomically."""
        return publish_dir(self.run_dir / "reward_model", self.write_native, self.is_logger)

    def write_native(self, path: Path) -> None:
        from core.bridge import save_native
        from core.bridge.hf import copy_tokenizer_files

        model = self.whole_model()
        if model is not None:
            save_native(model, path, self.arch)
            copy_tokenizer_files(self._tokenizer_dir, path)


def rm_metrics(prefix: str, sums: dict[str, float]) -> dict[str, float]:
    n = max(sums["pairs"], 1.0)
    return {
        f"{prefix}/loss": sums["loss_sum"] / n,
        f"{prefix}/accuracy": sums["correct"] / n,
        f"{prefix}/margin": sums["margin"] / n,
        f"{prefix}/chosen_score": sums["chosen_scores"] / n,
        f"{prefix}/rejected_score": sums["rejected_scores"] / n,
    }
