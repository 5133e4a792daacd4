"""PPO with a critic (RLHF): GRPO's step plus a value model, GAE and several epochs of mini-batches.

One step (DESIGN.md "One GRPO step", the flow every RL loop follows), phases as methods:
    prompts -> refit -> generate -> score -> logprobs (old, ref) -> values (critic) -> advantages (token
    rewards with the KL penalty, GAE) -> train (ppo_epochs x mini-batches: critic, then policy) -> log/...
PPOTrainer is GRPOTrainer with the `values` phase added (GRPOTrainer.batch_phases), `advantages` replaced
and the critic's step added to each mini-batch of GRPO's `train` (its epochs x mini-batches); prompts,
refit, generation, scoring (dynamic sampling, overlong shaping), evaluation and export are GRPO's.

Reward: the environment's score of each response (a verifier, a reward model trained with `rl rm`, or a
verifier plus a weighted reward model: `environment.reward_model`) on the response's last token, minus
beta * KL(policy || reference) on every response token when algorithm.kl_in_reward.coef = beta > 0
(Ziegler et al. 2019; verl's and OpenRLHF's use_kl_in_reward). beta is fixed, or adaptive with a target
KL (kl_in_reward.target, .horizon). The KL can also (or instead) be a loss term: algorithm.loss.kl_coef,
as in GRPO.

Advantages: GAE (algorithms.advantages "gae", gamma and lam) on the critic's values V(state before token t),
which the rollout's weights saw; returns = advantages + values are the critic's targets. Train: each of
algorithm.ppo_epochs passes shuffles the rollout's sequences and takes one optimizer step per mini-batch of
train.global_batch_size sequences, for the critic (clipped value loss around the rollout's values) and the
policy (algorithm.loss, ratio to the rollout's logprobs): from the second mini-batch on the ratio leaves 1
and clipping acts (train/clip_frac, critic/vf_clip_frac). The first critic.warmup steps train only the
critic (the policy keeps its weights and still samples).

Checkpoint: GRPO's (the policy under model/ with schedule.pt) plus critic/ (model/ and schedule.pt, as
rl/workers' CriticWorker writes it) and beta in trainer.pt, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import Field, field_validator, model_validator

from algorithms.critic import ValueLossConfig
from algorithms.grpo import Components, GRPOConfig, GRPOTrainer, Inputs
from algorithms.grpo_config import EnvironmentConfig, PolicyUpdateConfig
from algorithms.interfaces import Batch
from algorithms.rl_inputs import Row
from core.config import InputPath, OptimConfig, RunConfig, Schema
from core.errors import InputError
from rollout.environments import Completion, Score

# ---------------------------------------------------------------------------------------------- config


class RewardModelTermConfig(Schema):
    path: InputPath = Field(description="an `rl rm` run directory or its reward_model/")
    weight: float = Field(
        1.0, description="reward = the verifier's reward + weight x the reward model's score"
    )


class PPOEnvironmentConfig(EnvironmentConfig):
    """GRPO's environment section, plus `reward_model`: a verifier (name) and a reward model together."""

    reward_model: RewardModelTermConfig | None = Field(
        None,
        description="add weight x this reward model's score to the verifier's reward (`name` is the "
        "verifier: it also reports correct); name=reward_model alone scores with a reward model only",
    )

    @model_validator(mode="after")
    def _one_reward_model(self) -> PPOEnvironmentConfig:
        if self.name == "reward_model" and self.reward_model is not None:
            raise ValueError(
                "environment.reward_model adds a reward model to a verifier: set environment.name to the "
                "verifier (arithmetic, exact_match, math) or plugin, or drop environment.reward_model"
            )
        return self

    @property
    def uses_reward_model(self) -> bool:
        return self.name == "reward_model" or self.reward_model is not None

    def build(self, tokenizer: Any = None, scorer: Any = None) -> Any:
        """scorer: what scores sequences for the reward model (None: a RewardModel in this process)."""
        if self.reward_model is None:
            return super().build(tokenizer, scorer)
        from algorithms.reward_env import RewardModelEnvironment

        model = RewardModelEnvironment(self.reward_model.path, tokenizer, scorer=scorer)
        return VerifierPlusRewardModel(super().build(tokenizer), model, self.reward_model.weight)


class KLInRewardConfig(Schema):
    """The KL to the reference as a per-token reward: r_t -= coef * KL_t on every response token."""

    coef: float = Field(0.0, ge=0, description="beta (its start value when adaptive); 0: no KL in the reward")
    estimator: str = Field(
        "k1", description="a KL_ESTIMATORS name; k1 = log pi - log pi_ref (verl's default)"
    )
    target: float | None = Field(
        None, gt=0, description="adaptive beta (Ziegler et al.): the KL it steers towards; none: beta fixed"
    )
    horizon: int = Field(10000, ge=1, description="adaptive beta: samples over which it moves by up to 20%")

    @field_validator("estimator")
    @classmethod
    def _known_kl(cls, name: str) -> str:
        from algorithms.losses import KL_ESTIMATORS

        if name not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {name!r}; choices: {KL_ESTIMATORS.names()}")
        return name

    @model_validator(mode="after")
    def _adaptive_needs_a_start(self) -> KLInRewardConfig:
        if self.target is not None and self.coef == 0:
            raise ValueError("algorithm.kl_in_reward.target needs coef > 0 (the adaptive beta scales it)")
        return self


class PPOAlgorithmConfig(PolicyUpdateConfig):
    """GRPO's ppo_epochs, loss and overlong, plus GAE's settings and the KL in the reward."""

    gamma: float = Field(1.0, ge=0, le=1, description="GAE's discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda (1: Monte-Carlo returns minus values)")
    whiten_advantages: bool = Field(True, description="advantages whitened over the step's response tokens")
    kl_in_reward: KLInRewardConfig = Field(default_factory=KLInRewardConfig)


class CriticConfig(Schema):
    init_from: InputPath | None = Field(
        None,
        description="a value model (an `rl rm` run: the critic starts as the reward model) or an LM (its "
        "output layer replaced by a fresh value head); none: model.init_from",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: ValueLossConfig = Field(default_factory=ValueLossConfig)
    warmup: int = Field(
        0, ge=0, description="the first N steps train only the critic (the policy keeps its weights)"
    )


class PPOConfig(GRPOConfig):
    """PPO with a critic, in this process (Ray: rl/ppo_cluster.py)."""

    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/ppo"))
    environment: PPOEnvironmentConfig = Field(default_factory=PPOEnvironmentConfig)
    algorithm: PPOAlgorithmConfig = Field(default_factory=PPOAlgorithmConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)

    @model_validator(mode="after")
    def _batch_sizes(self) -> PPOConfig:  # replaces GRPOConfig's (no group estimator here)
        sequences = self.rollout.prompts_per_step * self.rollout.n
        if sequences % self.train.global_batch_size:
            raise ValueError(
                f"rollout.prompts_per_step * rollout.n = {sequences} sequences per step must be a multiple of "
                f"train.global_batch_size={self.train.global_batch_size} (the mini-batch: one optimizer step)"
            )
        if self.critic.warmup >= self.train.max_steps:
            raise ValueError(
                f"critic.warmup={self.critic.warmup} steps leave none of train.max_steps="
                f"{self.train.max_steps} to train the policy"
            )
        return self

    @property
    def policy_optimizer_steps(self) -> int:
        return (self.train.max_steps - self.critic.warmup) * self.optimizer_steps_per_step

    @property
    def critic_optimizer_steps(self) -> int:
        return self.train.max_steps * self.optimizer_steps_per_step

    @property
    def uses_reference(self) -> bool:
        return self.algorithm.loss.kl_coef > 0 or self.algorithm.kl_in_reward.coef > 0


# ---------------------------------------------------------------------------------------------- rewards


class VerifierPlusRewardModel:
    """reward = the verifier's reward + weight x the reward model's score; correct and well_formed are the
    verifier's (a learned score never makes a wrong answer correct)."""

    def __init__(self, verifier: Any, reward_model: Any, weight: float) -> None:
        self.verifier, self.reward_model, self.weight = verifier, reward_model, weight

    @property
    def source(self) -> Any:
        """The reward model's weights (rl/grpo_cluster.py starts its RewardModelWorker from them)."""
        return self.reward_model.source

    def check_row(self, row: Any, where: str) -> None:
        self.verifier.check_row(row, where)

    def score(self, completions: Sequence[Completion]) -> list[Score]:
        judged, scored = self.verifier.score(completions), self.reward_model.score(completions)
        return [
            Score(v.reward + self.weight * m.reward, v.correct, v.well_formed, v.metrics)
            for v, m in zip(judged, scored, strict=True)
        ]


class KLController:
    """beta of the KL in the reward: fixed, or adaptive (algorithms.losses.adaptive_kl_coef) after every
    step. Its value is part of every checkpoint."""

    def __init__(self, cfg: KLInRewardConfig) -> None:
        self.cfg, self.value = cfg, cfg.coef

    def update(self, current_kl: float, n_steps: int) -> None:
        from algorithms.losses import adaptive_kl_coef

        if self.cfg.target is not None:
            self.value = adaptive_kl_coef(self.value, current_kl, self.cfg.target, self.cfg.horizon, n_steps)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def token_rewards(
    batch: Batch, kl_cfg: KLInRewardConfig, coef: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """(B, T) token rewards: each row's score on its last response token, minus coef * KL_t (the configured
    estimator of the rollout policy vs the reference) on every response token when coef > 0; and the KL
    metrics: reward/kl (the mean over rows of each row's mean KL per token, what the adaptive beta steers;
    verl's reward_kl_penalty) and reward/kl_coef (the beta used)."""
    from algorithms.advantages import kl_penalized_rewards, scores_to_token_rewards
    from algorithms.losses import KL_ESTIMATORS

    mask = batch["response_mask"]
    if kl_cfg.coef == 0:
        return scores_to_token_rewards(batch["rewards"], mask), {}
    kl = KL_ESTIMATORS.get(kl_cfg.estimator)(batch["old_logprobs"], batch["ref_logprobs"])
    kl = torch.where(mask.bool(), kl, 0.0)
    per_row = kl.sum(-1) / mask.sum(-1).clamp(min=1)
    rewards = kl_penalized_rewards(batch["rewards"], mask, kl, coef)
    return rewards, {"reward/kl": float(per_row.mean()), "reward/kl_coef": coef}


# ------------------------------------------------------------------------------------------------- loop


class Critic(Protocol):
    """The value model being trained (algorithms.critic.InProcessCritic; rl.workers.RayCritic on Ray)."""

    def values(self, batch: Batch) -> dict[str, torch.Tensor]: ...

    def train(self, batch: Batch) -> dict[str, float]: ...

    def save(self, path: str | Path) -> None: ...

    def load(self, path: str | Path) -> None: ...


@dataclass
class PPOComponents(Components):
    """GRPO's components plus the critic."""

    critic: Critic | None = None


CRITIC_KEYS = ("input_ids", "response_mask", "returns", "old_values")
CRITIC_ONLY_KEYS = ("returns", "old_values")


class PPOTrainer(GRPOTrainer):
    """GRPOTrainer with a critic: the `values` phase, GAE `advantages`, and the critic's step before the
    policy's in every mini-batch of GRPO's epochs x mini-batches `train`."""

    stage: ClassVar[str] = "ppo"
    shown: ClassVar[tuple[str, ...]] = ("reward/mean", "eval/accuracy", "critic/vf_loss", "train/clip_frac")
    plotted: ClassVar[tuple[str, ...]] = (
        "reward/mean",
        "eval/accuracy",
        "eval/sampled_accuracy",
        "critic/vf_loss",
        "critic/explained_variance",
        "train/clip_frac",
        "critic/vf_clip_frac",
        "reward/kl",
    )
    batch_phases: ClassVar[tuple[str, ...]] = ("logprobs", "values", "advantages", "train")

    def __init__(
        self, cfg: PPOConfig, parts: PPOComponents, train_rows: list[Row], eval_rows: list[Row]
    ) -> None:
        if parts.critic is None:
            raise ValueError("PPOTrainer needs a critic (PPOComponents.critic)")
        self.kl_controller = KLController(cfg.algorithm.kl_in_reward)  # before super() resumes into it
        super().__init__(cfg, parts, train_rows, eval_rows)

    def values(self, batch: Batch) -> None:
        """The critic's values V(state before token t) (B, T) under the rollout's weights: GAE's baseline
        and the centre of the value clip."""
        batch["values"] = self.parts.critic.values(batch)["values"]

    def advantages(self, batch: Batch) -> dict[str, float]:
        """Token rewards (the KL penalty in them, then beta's update) and GAE: batch["advantages"] and
        batch["returns"] (the critic's targets)."""
        from algorithms.advantages import compute_advantages
        from algorithms.losses import explained_variance, masked_mean

        algo, mask = self.cfg.algorithm, batch["response_mask"]
        rewards, metrics = token_rewards(batch, algo.kl_in_reward, self.kl_controller.value)
        if "reward/kl" in metrics:
            self.kl_controller.update(metrics["reward/kl"], n_steps=mask.shape[0])
        advantages, returns = compute_advantages(
            "gae",
            rewards,
            mask,
            values=batch["values"],
            gamma=algo.gamma,
            lam=algo.lam,
            whiten=algo.whiten_advantages,
        )
        batch["advantages"], batch["returns"] = advantages, returns
        metrics["critic/returns_mean"] = float(masked_mean(returns, mask))
        metrics["critic/explained_variance"] = float(explained_variance(batch["values"], returns, mask))
        return metrics

    def train_inputs(self, batch: Batch) -> Batch:
        """GRPO's (the policy's inputs) plus the critic's targets and the values the rollout saw."""
        return super().train_inputs(batch) | {"returns": batch["returns"], "old_values": batch["values"]}

    def train_mini_batch(self, mb: Batch) -> dict[str, float]:
        """One optimizer step of the critic (critic/*), then, after critic.warmup steps, of the policy
        (GRPO's: train/*). `train` (GRPO's) runs the ppo_epochs passes of mini-batches."""
        critic = self.parts.critic.train({k: mb[k] for k in CRITIC_KEYS})
        row = {f"critic/{k}": v for k, v in critic.items()}
        if self.step_count >= self.cfg.critic.warmup:
            row |= super().train_mini_batch({k: v for k, v in mb.items() if k not in CRITIC_ONLY_KEYS})
        return row

    # ---- checkpoints: the policy (GRPO's), the critic and beta --------------------------------------------

    def save_model(self, path: Path) -> None:
        super().save_model(path)
        self.parts.critic.save(path / "critic")

    def load_model(self, path: Path) -> None:
        super().load_model(path)
        self.parts.critic.load(path / "critic")

    def loop_state(self) -> dict[str, Any]:
        return {**super().loop_state(), "kl_controller": self.kl_controller.state_dict()}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        super().load_loop_state(state)
        self.kl_controller.load_state_dict(state["kl_controller"])


# ------------------------------------------------------------------------------------------------ build


def critic_source(cfg: PPOConfig) -> str:
    return cfg.critic.init_from or cfg.model.init_from


def check_for_run(cfg: PPOConfig) -> Inputs:
    """GRPO's checks (model, tokenizer, environment, prompts, layout, run.dir) and the critic's start: a
    model whose vocabulary holds the tokenizer's ids."""
    from algorithms import grpo
    from algorithms.rl_inputs import init_config, resolve_init

    inputs = grpo.check_for_run(cfg, PPOTrainer.stage)
    if cfg.critic.init_from is not None:
        try:
            source = resolve_init(cfg.critic.init_from)
        except InputError as e:
            raise InputError(str(e).replace("model.init_from", "critic.init_from", 1)) from None
        vocab = init_config(source).vocab_size
        if vocab < len(inputs.tokenizer):
            raise InputError(
                f"critic.init_from: {cfg.critic.init_from} has vocab_size={vocab}, fewer than the "
                f"tokenizer's {len(inputs.tokenizer)} tokens (it reads the policy's token ids)"
            )
    return inputs


def build_critic(cfg: PPOConfig, device: torch.device) -> Any:
    """An InProcessCritic from critic.init_from (a value model as is, or an LM with a fresh value head)."""
    from algorithms.critic import CriticModel, InProcessCritic, init_value_model
    from core.utils.device import param_dtype

    config, state = init_value_model(critic_source(cfg), seed=cfg.train.seed, from_lm=True)
    model = CriticModel.build(
        config,
        state,
        loss=cfg.critic.loss,
        optim=cfg.critic.optim,
        micro_batch_size=cfg.train.micro_batch_size,
        device=device,
        param_dtype=param_dtype(cfg.precision, device),
        compile_layers=cfg.train.compile,
    )
    return InProcessCritic(model, cfg.critic.optim, cfg.critic_optimizer_steps)


def build_components(cfg: PPOConfig, inputs: Inputs, device: torch.device) -> PPOComponents:
    """GRPO's in-process components (policy, reference, generator, environment) and the critic."""
    from algorithms import grpo

    parts, _ = grpo.build_components(cfg, inputs, device)
    shared = {f.name: getattr(parts, f.name) for f in fields(parts)}
    return PPOComponents(**shared, critic=build_critic(cfg, device))


def run_ppo(cfg: PPOConfig) -> dict[str, float]:
    """`rl ppo` in this process: GRPO's run_rl with PPO's trainer, checks and components (the critic);
    exports hf/ (the policy)."""
    from algorithms.grpo import run_rl

    return run_rl(cfg, PPOTrainer, check_for_run, build_components)
