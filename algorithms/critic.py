"""CriticModel and RewardModel: value-head models (TransformerConfig.head == "value") of an RL run on one rank
of any training layout, over a core ModelEngine, with PolicyModel's batch conventions (algorithms/policy.py):

    batch: dict of tensors, B sequences right-padded to T
      input_ids       (B, T) long
      response_mask   (B, T)   1 on tokens that count in the value loss
      returns         (B, T)   critic.train: value targets (e.g. advantages.gae's returns)
      old_values      (B, T)   critic.train, optional: the values the returns were computed with (clipping)
      attention_mask  (B, T)   reward model, optional: 1 = token, 0 = padding (else input_ids != pad_id)

Value convention (token-aligned, as algorithms.advantages.gae expects): values[:, t] = V(state before token t)
= the head's output at position t - 1 (it has read tokens 0..t-1); column 0 holds 0. The head's output at
the LAST position (after the final token) is not a token-aligned value: it is what RewardModel scores.

Every rank of one dp shard is called with the same batch; outputs are the same on every rank of the shard
(the last pipeline stage computes them and broadcasts over pp). `CriticModel.train` is one optimizer step
normalised by the step's GLOBAL count (all micro-batches, all dp ranks), as PolicyModel.train.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from algorithms.engine_model import Batch, EngineModel, StepStats
from algorithms.losses import value_loss
from algorithms.policy import AggMode
from core.config import OptimConfig, ParallelConfig, Schema
from core.engine import LossFn, ModelEngine
from core.errors import InputError
from core.parallel.dims import Groups
from core.transformer.config import TransformerConfig


class ValueLossConfig(Schema):
    """The critic objective: algorithms.losses.value_loss aggregated by agg_mode with the global count."""

    clip_range: float | None = Field(0.2, gt=0, description="values clipped to old_values +- clip_range")
    agg_mode: AggMode = "token_mean"

    @field_validator("agg_mode")
    @classmethod
    def _critic_mode(cls, mode: str) -> str:
        if mode == "seq_mean_token_sum_norm":
            raise ValueError("critic.loss.agg_mode=seq_mean_token_sum_norm is a policy-loss mode (Dr. GRPO)")
        return mode


def value_model_from_lm(
    config: TransformerConfig, lm_state: dict[str, torch.Tensor], seed: int = 0
) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """A value-head model (config, FULL state) from an LM's: the trunk is kept, output_layer is dropped
    (ties are undone: the embedding stays), and value_head is drawn fresh, weight ~ N(0, init_std) from
    `seed`, bias 0."""
    value_config = dataclasses.replace(config, head="value", tie_embeddings=False)
    state = {k: v for k, v in lm_state.items() if k != "output_layer.weight"}
    gen = torch.Generator().manual_seed(seed)
    state["value_head.weight"] = torch.randn(1, config.hidden_size, generator=gen) * config.init_std
    state["value_head.bias"] = torch.zeros(1)
    return value_config, state


def init_value_model(
    init_from: str | Path, seed: int = 0, from_lm: bool = True
) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(config, FULL state) of a value model from anything algorithms.rl_inputs.resolve_init accepts: a
    value model as is (e.g. an `rl rm` run's reward_model/, the usual start of a PPO critic), or (from_lm)
    an LM whose output layer value_model_from_lm replaces with a fresh head drawn from `seed`."""
    from algorithms.rl_inputs import load_init_model, resolve_init

    full = load_init_model(resolve_init(init_from))
    if full.config.head == "value":
        return full.config, full.state_dict()
    if not from_lm:
        raise InputError(f"{init_from} is a language model, not a value model (head='value')")
    return value_model_from_lm(full.config, full.state_dict(), seed)


class _ValueHeadModel(EngineModel):
    """What the critic and the reward model share: a head="value" engine and the head's raw output."""

    def __init__(self, engine: ModelEngine, micro_batch_size: int):
        if engine.config.head != "value":
            raise InputError(
                f"{type(self).__name__} needs a model with head='value', got {engine.config.head!r}"
            )
        super().__init__(engine, micro_batch_size)

    def _head_outputs(self, batch: Batch, cut: bool) -> torch.Tensor:
        """The head's output (B, T) fp32 at every position (0 after a micro-batch's cut), on every rank."""

        def collect(out: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return out.new_zeros(()), {"head": out[..., 0].float()}

        return self._forward_rows(batch, collect, ("head",), cut)[0]


def token_values(head: torch.Tensor) -> torch.Tensor:
    """Token-aligned values (B, T) from the head's outputs (B, T): column t is head[:, t - 1], column 0 is 0."""
    return F.pad(head[:, :-1], (1, 0))


class CriticModel(_ValueHeadModel):
    """One rank's critic: `values` (forward only) and `train` (one optimizer step), `save` / `load`.

    engine: a ModelEngine on a head="value" config (any tp x pp x dp layout; not cp). loss: the value loss.
    clip_grad: max global grad norm (0: none).
    """

    def __init__(self, engine: ModelEngine, micro_batch_size: int, loss: ValueLossConfig, clip_grad: float):
        super().__init__(engine, micro_batch_size)
        self.loss, self.clip_grad = loss, clip_grad

    @classmethod
    def build(
        cls,
        config: TransformerConfig,
        full_state: dict[str, torch.Tensor],
        groups: Groups | None = None,
        *,
        loss: ValueLossConfig | None = None,
        optim: OptimConfig | None = None,
        micro_batch_size: int = 8,
        clip_grad: float | None = None,
        parallel: ParallelConfig | None = None,
        device: torch.device | str = "cpu",
        param_dtype: torch.dtype = torch.float32,
        compile_layers: bool = False,
    ) -> CriticModel:
        """A CriticModel on this rank of `groups` from a FULL value-model state (value_model_from_lm turns an
        LM's into one). clip_grad None: optim.clip_grad. parallel, compile_layers: as
        EngineModel.build_engine."""
        optim = optim or OptimConfig()
        engine = cls.build_engine(
            config, full_state, groups, optim, parallel, device, param_dtype, compile_layers
        )
        clip = optim.clip_grad if clip_grad is None else clip_grad
        return cls(engine, micro_batch_size, loss or ValueLossConfig(), clip)

    def values(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{"values": (B, T) fp32 token-aligned values (module docstring)} on input_ids' device, the same on
        every rank of this dp shard. Columns after a micro-batch's last response token hold 0."""
        head = self._head_outputs(batch, cut=True)
        return {"values": token_values(head).to(batch["input_ids"].device)}

    def train(self, batch: Batch, global_count: float | None = None) -> dict[str, float]:
        """One optimizer step of the value loss against batch["returns"] (clipped around old_values; without
        old_values, unclipped). Returns the same metrics on every rank: loss, vf_loss, vf_clip_frac,
        value_mean, value_error, grad_norm, lr. global_count: as PolicyModel.train (None: summed over dp)."""
        for key in ("response_mask", "returns"):
            if key not in batch:
                raise InputError(f"CriticModel.train: batch has no {key!r}")
        mbs = self._micro_batches(batch, ("input_ids", "response_mask", "returns", "old_values"))
        count = self._step_count(mbs, self.loss.agg_mode, global_count)
        stats = StepStats()
        return self._train_step(mbs, self._loss_fn(count, stats), stats, self.clip_grad)

    def _loss_fn(self, count: torch.Tensor, stats: StepStats) -> LossFn:
        cfg = self.loss

        def loss_fn(out: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            mask = mb["response_mask"]
            values = token_values(out[..., 0].float())  # (B, T)
            old = mb.get("old_values")
            loss, metrics = value_loss(
                values,
                values.detach() if old is None else old,
                mb["returns"],
                mask,
                clip_range=None if old is None else cfg.clip_range,
                agg_mode=cfg.agg_mode,
                global_count=count,
            )
            stats.add({"vf_loss": loss.detach()}, metrics, float(mask.bool().sum()))
            return loss, {"loss_sum": loss.detach()}

        return loss_fn


class InProcessCritic:
    """A CriticModel in this process plus the LR schedule the loop steps once per `train` (as
    algorithms.inprocess_policy.InProcessPolicy for the policy). Checkpoint layout under `path`: model/ (DCP,
    any layout) and schedule.pt, the same as rl/workers' CriticWorker, so a run resumes in either."""

    def __init__(self, model: CriticModel, optim: OptimConfig, total_optimizer_steps: int) -> None:
        from algorithms.schedules import build_scheduler

        self.model = model
        self.scheduler = build_scheduler(model.engine.optimizer, total_optimizer_steps, optim)

    def values(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model.values(batch)

    def train(self, batch: Batch) -> dict[str, float]:
        metrics = self.model.train(batch)
        self.scheduler.step()
        return metrics

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save(path / "model")
        torch.save({"scheduler": self.scheduler.state_dict()}, path / "schedule.pt")

    def load(self, path: str | Path) -> None:
        path = Path(path)
        self.model.load(path / "model")
        self.scheduler.load_state_dict(torch.load(path / "schedule.pt", weights_only=True)["scheduler"])


class RewardModel(_ValueHeadModel):
    """A frozen value-head model that scores whole sequences: `scores` (forward only, never trained).

    pad_id: the padding token, used to find each row's last token when the batch has no attention_mask.
    """

    def __init__(self, engine: ModelEngine, micro_batch_size: int, pad_id: int = 0):
        super().__init__(engine, micro_batch_size)
        self.pad_id = pad_id

    @classmethod
    def build(
        cls,
        config: TransformerConfig,
        full_state: dict[str, torch.Tensor],
        groups: Groups | None = None,
        *,
        micro_batch_size: int = 8,
        pad_id: int = 0,
        parallel: ParallelConfig | None = None,
        device: torch.device | str = "cpu",
        param_dtype: torch.dtype = torch.float32,
        compile_layers: bool = False,
    ) -> RewardModel:
        """A RewardModel from a FULL value-model state (e.g. a trained critic's; or `load` a CriticModel.save
        directory after building). parallel, compile_layers: as EngineModel.build_engine."""
        engine = cls.build_engine(
            config, full_state, groups, OptimConfig(), parallel, device, param_dtype, compile_layers
        )
        return cls(engine, micro_batch_size, pad_id)

    def scores(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{"scores": (B,) fp32}: the head's output at each row's last non-pad token (attention_mask, else
        input_ids != pad_id), the same on every rank of this dp shard."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = (ids != self.pad_id) if mask is None else mask.bool()
        if not mask.any(dim=1).all():
            raise InputError("RewardModel.scores: every row needs at least one token")
        T = ids.shape[1]
        last = (T - 1 - mask.flip(1).int().argmax(dim=1)).to(self.device)  # (B,) last token's position
        head = self._head_outputs({"input_ids": ids}, cut=False)
        return {"scores": head.gather(1, last[:, None])[:, 0].to(ids.device)}
