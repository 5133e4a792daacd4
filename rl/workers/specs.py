"""What a worker needs to build its state: small picklable records handed to the actors at start.

A spec holds paths and typed config sections, never tensors or models: every rank loads the initial
weights itself (from `init_from`) and keeps its shard, so nothing model-sized crosses the object store
at start, and a restarted rank rebuilds from the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from algorithms.critic import ValueLossConfig
from algorithms.policy import PolicyLossConfig
from algorithms.qat import QATConfig
from core.config import LoraConfig, OptimConfig, ParallelConfig, PrecisionConfig


@dataclass(frozen=True)
class EngineSpec:
    """A generation engine. native: our engine on a GPTModel (the policy's own parameters when colocated
    inside a policy worker, else a copy loaded from init_from); vllm: an in-process vLLM engine on an HF
    directory (`hf_dir`), refitted over a weight transport."""

    kind: Literal["native", "vllm"]
    init_from: str  # what rl_inputs.resolve_init accepts (native engine outside a policy worker)
    max_model_len: int
    max_num_seqs: int = 64
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    tokenizer_dir: str | None = None
    hf_dir: str | None = None  # vllm: the HF checkpoint the engine starts from
    kv_cache_gib: float = 0.25  # vllm


@dataclass(frozen=True)
class PolicySpec:
    """A policy (trainable) or reference (frozen) model on one rank of a `parallel` layout."""

    init_from: str
    parallel: ParallelConfig
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    micro_batch_size: int = 8
    total_optimizer_steps: int = 1  # length of the LR schedule
    seed: int = 0
    temperature: float = 1.0
    engine: EngineSpec | None = None  # colocated generation on the policy's own parameters
    compile_layers: bool = False  # torch.compile each transformer layer (ModelEngine)
    lora: LoraConfig | None = None  # train LoRA adapters only; the base (adapters off) is the reference
    # QAT (algorithms/qat.py): the policy worker (not the reference) inserts the format's quantizers,
    # calibrated on these prompts' token ids
    quantize: QATConfig | None = None
    calibration_prompts: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class CriticSpec:
    """A critic (trainable value model) on one rank of a `parallel` layout. init_from: a value model (head
    "value", e.g. a saved critic) or an LM, whose output layer is then replaced by a fresh value head
    (algorithms.critic.value_model_from_lm, drawn from `seed`)."""

    init_from: str
    parallel: ParallelConfig
    loss: ValueLossConfig = field(default_factory=ValueLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    micro_batch_size: int = 8
    total_optimizer_steps: int = 1  # length of the LR schedule
    seed: int = 0


@dataclass(frozen=True)
class RewardModelSpec:
    """A frozen reward model (a value-head model, e.g. a native directory saved from one) on one rank of a
    `parallel` layout. pad_id finds each row's last token when a batch has no attention_mask."""

    init_from: str
    parallel: ParallelConfig
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    micro_batch_size: int = 8
    pad_id: int = 0
