"""The configuration of GRPO (and of PPO, which extends it): prompts, rollout, environment, algorithm,
evaluation. Every section is a pydantic Schema; `GRPOConfig` checks the combinations before a run starts."""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from algorithms.async_rollout import AsyncRolloutConfig
from algorithms.inprocess_policy import PolicyLossConfig
from algorithms.model_config import SourceModelConfig
from algorithms.qat import QATConfig
from algorithms.trainer import LoopConfig
from core.config import InputPath, LoraConfig, Placement, RayOptions, RunConfig, Schema

GRPOModelConfig = SourceModelConfig  # the name older code imports
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")  # a baseline from the prompt's group


class ArithmeticPromptsConfig(Schema):
    n_train: int = Field(2000, ge=1)
    n_eval: int = Field(200, ge=1)
    digits: int = Field(2, ge=1, le=6)
    ops: str = Field("+", pattern=r"^[+\-*]+$")
    seed: int = 0


class PromptsConfig(Schema):
    path: InputPath | None = Field(None, description='JSONL of {"prompt": str, ...} rows (e.g. "answer")')
    eval_path: InputPath | None = Field(None, description="held-out JSONL, same format; none: no validation")
    prompt_key: str = "prompt"
    synthetic: ArithmeticPromptsConfig | None = Field(None, description="the embedded arithmetic task")
    shuffle: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> PromptsConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of data.path and data.synthetic")
        return self


class DynamicSamplingConfig(Schema):
    """DAPO's dynamic sampling (Yu et al. 2025): a group whose rewards are all equal has advantage 0 under a
    group-relative estimator and teaches nothing; it is dropped and more prompts are sampled instead."""

    enabled: bool = Field(
        False,
        description="drop the groups whose rewards are all equal (exactly, in fp64) and sample the next "
        "prompts of the loader until rollout.prompts_per_step groups remain",
    )
    max_rounds: int = Field(
        10,
        ge=1,
        description="rounds of rollout.prompts_per_step prompts a step may sample (verl's "
        "max_num_gen_batches); still short after that: the run stops with an error",
    )


class RolloutConfig(Schema):
    engine: Literal["native", "vllm"] = Field(
        "native", description="native: our engine on the training weights (no copy); vllm: refit each step"
    )
    prompts_per_step: int = Field(8, ge=1)
    n: int = Field(8, ge=1, description="samples per prompt (the GRPO group)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_tokens: int = Field(16, ge=1, description="new tokens per response at most")
    max_num_seqs: int = Field(64, ge=1, description="native: sequences decoded together")
    kv_cache_gib: float = Field(0.25, gt=0, description="vllm: KV cache size")
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    asynchronous: AsyncRolloutConfig = Field(
        default_factory=AsyncRolloutConfig,
        description="generate the next steps while this one trains (algorithms/async_rollout.py)",
    )


class EnvironmentConfig(Schema):
    name: str = Field(
        "arithmetic",
        description="a registered environment (arithmetic, exact_match, math, ...), reward_model, or plugin",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra keyword arguments of the environment (see its docstring), or of the plugin",
    )
    correct_reward: float = 1.0
    format_reward: float = Field(0.0, description="added for a well-formed response (answer + EOS)")
    function: str | None = Field(
        None,
        description="plugin: module:function or path/to/file.py:function, relative to the current "
        "directory (rollout/environments/plugin.py: what it is called with and returns)",
    )
    answer_key: str = Field("answer", description="exact_match / math: the row's reference field")
    path: InputPath | None = Field(
        None, description="reward_model: an `rl rm` run directory or its reward_model/"
    )
    verifier: str | None = Field(
        None,
        description="reward_model, plugin: what reports `correct` (accuracy metrics); none: score > 0 "
        "(plugin: its `correct`)",
    )

    @field_validator("name", "verifier")
    @classmethod
    def _known_environment(cls, name: str | None, info: Any) -> str | None:
        from rollout.environments import ENVIRONMENTS

        special = ("reward_model", "plugin") if info.field_name == "name" else ()
        if name is not None and name not in ENVIRONMENTS and name not in special:
            raise ValueError(
                f"unknown environment {name!r}; choices: {', '.join([*sorted(ENVIRONMENTS), *special])}"
            )
        return name

    @model_validator(mode="after")
    def _reward_model_path(self) -> EnvironmentConfig:
        if (self.name == "reward_model") != (self.path is not None):
            raise ValueError("environment.path is needed with name=reward_model, and only with it")
        return self

    @model_validator(mode="after")
    def _plugin_function(self) -> EnvironmentConfig:
        from rollout.environments.plugin import split_spec

        if (self.name == "plugin") != (self.function is not None):
            raise ValueError("environment.function is needed with name=plugin, and only with it")
        if self.function is not None:
            split_spec(self.function)
            if (self.correct_reward, self.format_reward) != (1.0, 0.0):
                raise ValueError(
                    "environment.correct_reward / format_reward do not apply to name=plugin: its function "
                    "returns the reward"
                )
        return self

    def build(self, tokenizer: Any = None, scorer: Any = None) -> Any:
        """scorer: reward_model only, what scores the sequences (None: a RewardModel in this process)."""
        from rollout.environments import ENVIRONMENTS, build_environment

        if self.name == "reward_model":
            from algorithms.reward_env import RewardModelEnvironment

            verifier = EnvironmentConfig(name=self.verifier).build() if self.verifier else None
            return RewardModelEnvironment(self.path, tokenizer, verifier=verifier, scorer=scorer)
        if self.name == "plugin":
            from rollout.environments.plugin import PluginEnvironment

            verifier = None
            if self.verifier is not None:
                verifier = EnvironmentConfig(name=self.verifier, answer_key=self.answer_key).build()
            return PluginEnvironment(self.function, self.options, verifier)
        kwargs: dict[str, Any] = {"correct_reward": self.correct_reward, "format_reward": self.format_reward}
        if "answer_key" in inspect.signature(ENVIRONMENTS[self.name]).parameters:
            kwargs["answer_key"] = self.answer_key
        return build_environment(self.name, **kwargs, **self.options)


class OverlongConfig(Schema):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) and overlong filtering."""

    buffer_len: int = Field(
        0,
        ge=0,
        description="L_c: a response of L tokens longer than rollout.max_tokens - L_c gets (max_tokens - L_c - "
        "L) / L_c * penalty_factor added to its reward (down to -penalty_factor); 0: no penalty",
    )
    penalty_factor: float = Field(1.0, ge=0, description="the penalty of a response of rollout.max_tokens")
    filter: bool = Field(
        False,
        description="mask truncated responses (finish_reason length) out of the loss; they still count in "
        "their group's baseline",
    )


class PolicyUpdateConfig(Schema):
    """What GRPO's and PPO's algorithm sections share: the reward shaping before the advantages and how the
    policy trains on a rollout."""

    ppo_epochs: int = Field(
        1,
        ge=1,
        description="passes over each rollout; every pass shuffles it and takes one optimizer step per "
        "mini-batch of train.global_batch_size sequences (all but the first are off-policy: the ratio "
        "leaves 1 and the clip acts)",
    )
    loss: PolicyLossConfig = Field(
        default_factory=PolicyLossConfig, description="the policy loss; loss.kl_coef: the KL as a loss term"
    )
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)


class AlgorithmConfig(PolicyUpdateConfig):
    advantage: str = Field(
        "grpo",
        description="an ADVANTAGES estimator: grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline "
        "(group mean subtracted, then whitened over the batch)",
    )
    norm_by_std: bool = Field(True, description="grpo: divide by the group's std (False: Dr. GRPO)")
    gamma: float = Field(1.0, ge=0, le=1, description="reinforce_plus_plus(_baseline): discount")

    @field_validator("advantage")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        from algorithms.advantages import ADVANTAGES

        if name not in ADVANTAGES:
            raise ValueError(f"unknown advantage estimator {name!r}; choices: {ADVANTAGES.names()}")
        if name == "gae":
            raise ValueError("advantage=gae needs a critic's values (PPO); GRPO trains without a critic")
        return name


class EvalConfig(Schema):
    num_prompts: int = Field(100, ge=1, description="held-out prompts scored greedily at each evaluation")
    max_tokens: int | None = Field(None, ge=1, description="None: rollout.max_tokens")
    samples: int = Field(
        0,
        ge=0,
        description="also sample this many responses per held-out prompt at rollout.temperature (the same "
        "seeds at every evaluation) and log eval/sampled_accuracy, the held-out twin of reward/accuracy "
        "without the per-step prompt noise; 0: greedy only",
    )


class GRPOConfig(LoopConfig):
    """GRPO, in this process or on Ray worker groups (a `placement`, or parallel.* > 1)."""

    run: RunConfig = Field(default_factory=lambda: RunConfig(dir="runs/grpo"))
    model: SourceModelConfig
    data: PromptsConfig = Field(default_factory=lambda: PromptsConfig(synthetic=ArithmeticPromptsConfig()))
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters only; the reference is the base (adapters disabled)"
    )
    quantize: QATConfig | None = Field(
        None, description="quantization-aware training of the policy, in one process (algorithms/qat.py)"
    )
    weight_transport: Literal["auto", "process_group", "shared_memory", "object_store"] = Field(
        "auto",
        description="Ray: refit of separate engines. auto: shared_memory when colocated, else process_group",
    )

    @property
    def on_ray(self) -> bool:
        return super().on_ray or self.parallel.world_size > 1

    @property
    def cluster_placement(self) -> Placement:
        """The placement a Ray run uses (colocated on one bundle when the config gives none)."""
        return self.placement or Placement()

    @property
    def cluster_ray(self) -> RayOptions:
        return self.ray or RayOptions()

    @property
    def colocated_engines(self) -> bool:
        """On Ray: the policy workers host the engines themselves."""
        return self.cluster_placement.mode == "colocated" and self.rollout.engine == "native"

    @model_validator(mode="after")
    def _cluster_layout(self) -> GRPOConfig:
        p, placement = self.parallel, self.cluster_placement
        if p.cp > 1:
            raise ValueError("parallel.cp > 1: the RL policy does not support context parallelism yet")
        if self.colocated_engines and p.pp > 1:
            raise ValueError(
                "placement.mode=colocated with rollout.engine=native generates on the policy's own "
                "parameters, which needs parallel.pp=1 (use mode=disaggregated for pipeline layouts)"
            )
        if placement.mode == "disaggregated":
            missing = [role for role in ("policy", "generation") if role not in placement.pools]
            if missing:
                raise ValueError(f"placement.pools needs a size for {missing} (mode=disaggregated)")
        return self

    @model_validator(mode="after")
    def _asynchronous(self) -> GRPOConfig:
        a = self.rollout.asynchronous
        if not a.enabled:
            return self
        if not self.on_ray or self.cluster_placement.mode != "disaggregated":
            raise ValueError(
                "rollout.asynchronous needs engines on workers of their own, generating while the policy "
                "trains: a placement with mode=disaggregated (and pools for policy and generation)"
            )
        if self.rollout.dynamic_sampling.enabled:
            raise ValueError("rollout.asynchronous and rollout.dynamic_sampling cannot be combined yet")
        if a.correction == "tis" and self.algorithm.loss.tis_cap is None:
            raise ValueError(
                "rollout.asynchronous.correction=tis weights tokens by min(exp(trainer - sampler), cap): "
                "set algorithm.loss.tis_cap (e.g. 2.0), or correction=behaviour"
            )
        if self.rollout.temperature != 1.0:
            raise ValueError(
                "rollout.asynchronous corrects stale samples with the sampler's logprobs, which are "
                "untempered: it needs rollout.temperature=1"
            )
        return self

    @model_validator(mode="after")
    def _batch_sizes(self) -> GRPOConfig:
        sequences = self.rollout.prompts_per_step * self.rollout.n
        if sequences % self.train.global_batch_size:
            raise ValueError(
                f"rollout.prompts_per_step * rollout.n = {sequences} sequences per step must be a multiple of "
                f"train.global_batch_size={self.train.global_batch_size} (each slice is one optimizer step)"
            )
        if self.algorithm.advantage in GROUP_ESTIMATORS and self.rollout.n < 2:
            raise ValueError(f"algorithm.advantage={self.algorithm.advantage} needs rollout.n >= 2 (a group)")
        return self

    @model_validator(mode="after")
    def _policy_update(self) -> GRPOConfig:
        algo, rollout = self.algorithm, self.rollout
        if algo.loss.tis_cap is not None and rollout.temperature != 1.0:
            raise ValueError(
                f"algorithm.loss.tis_cap needs rollout.temperature=1 (got {rollout.temperature}): the "
                "sampler's logprobs are raw, the trainer's tempered, so their ratio is no importance weight"
            )
        if algo.overlong.buffer_len >= rollout.max_tokens:
            raise ValueError(
                f"algorithm.overlong.buffer_len={algo.overlong.buffer_len} must be below "
                f"rollout.max_tokens={rollout.max_tokens} (the penalty starts at max_tokens - buffer_len)"
            )
        if rollout.dynamic_sampling.enabled and rollout.n < 2:
            raise ValueError(
                "rollout.dynamic_sampling needs rollout.n >= 2 (it drops groups of equal rewards)"
            )
        if algo.loss.agg_mode == "seq_mean_token_sum_norm" and algo.loss.norm_length is None:
            algo.loss.norm_length = rollout.max_tokens  # the documented default, resolved once here
        return self

    @property
    def mini_batches(self) -> int:
        """Mini-batches (optimizer steps) per pass over a rollout."""
        return self.rollout.prompts_per_step * self.rollout.n // self.train.global_batch_size

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.algorithm.ppo_epochs * self.mini_batches

    @property
    def policy_optimizer_steps(self) -> int:
        """Optimizer steps the policy takes in the whole run: the length of its LR schedule."""
        return self.train.max_steps * self.optimizer_steps_per_step

    @property
    def uses_reference(self) -> bool:
        """A reference model is built (and its logprobs computed every step) only for a KL penalty."""
        return self.algorithm.loss.kl_coef > 0
