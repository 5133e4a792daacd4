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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from pydantic import Field

from algorithms.losses import loss_count, value_loss
from algorithms.policy import AggMode, _check_parallel, _last_position, _parallel_of, _StepStats
from core.config import OptimConfig, ParallelConfig, Schema
from core.engine import ModelEngine
from core.errors import InputError
from core.parallel.dims import Groups
from core.transformer.config import TransformerConfig

Batch = dict[str, torch.Tensor]


class ValueLossConfig(Schema):
    """The critic objective: algorithms.losses.value_loss aggregated by agg_mode with the global count."""

    clip_range: float | None = Field(0.2, gt=0, description="values clipped to old_values +- clip_range")
    agg_mode: AggMode = "token_mean"


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


class _ValueHeadModel:
    """What the critic and the reward model share: the engine, micro-batches, and the head's raw output."""

    def __init__(self, engine: ModelEngine, micro_batch_size: int):
        if engine.config.head != "value":
            raise InputError(
                f"{type(self).__name__} needs a model with head='value', got {engine.config.head!r}"
            )
        if micro_batch_size < 1:
            raise InputError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if engine.groups is not None and engine.groups.cp_size > 1:
            raise InputError(f"{type(self).__name__} does not support context parallelism (cp > 1) yet")
        self.engine, self.micro_batch_size = engine, micro_batch_size

    @staticmethod
    def _engine(
        config: TransformerConfig,
        full_state: dict[str, torch.Tensor],
        groups: Groups | None,
        optim: OptimConfig,
        parallel: ParallelConfig | None,
        device: torch.device | str,
        param_dtype: torch.dtype,
    ) -> ModelEngine:
        parallel = parallel or _parallel_of(groups)
        _check_parallel(parallel, groups)
        return ModelEngine(config, parallel, optim, groups, torch.device(device), full_state, param_dtype)

    @property
    def groups(self) -> Groups | None:
        return self.engine.groups

    @property
    def config(self) -> TransformerConfig:
        return self.engine.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _micro_batches(self, batch: Batch, keys: tuple[str, ...], cut: bool = True) -> list[Batch]:
        """Row slices of the `keys` tensors (those present) on the device; cut: each ends after its last
        response token (nothing after it changes a kept value)."""
        ids = batch.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[0] < 1:
            raise InputError("batch needs input_ids (B, T) with B >= 1")
        out = []
        for start in range(0, ids.shape[0], self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            length = ids.shape[1]
            if cut and "response_mask" in batch:
                length = min(length, max(2, _last_position(batch["response_mask"][rows]) + 1))
            out.append({k: batch[k][rows, :length].to(self.device) for k in keys if k in batch})
        return out

    @torch.no_grad()
    def _head_outputs(self, batch: Batch, cut: bool) -> torch.Tensor:
        """The head's output (B, T) fp32 at every position (0 after a micro-batch's cut), on every rank."""

        def collect(out: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return out.new_zeros(()), {"head": out[..., 0].float()}

        mbs = self._micro_batches(batch, ("input_ids", "response_mask"), cut)
        per_mb = self.engine.forward_collect(mbs, collect)
        B, T = batch["input_ids"].shape
        out = torch.zeros(B, T, dtype=torch.float32, device=self.device)
        if self.engine.is_last_stage():
            row = 0
            for result in per_mb:
                part = result["head"]
                out[row : row + part.shape[0], : part.shape[1]] = part
                row += part.shape[0]
        if self.groups is not None and self.groups.pp_size > 1:
            dist.broadcast(out, src=self.groups.ranks["pp"][-1], group=self.groups.pp_group)
        return out

    def load(self, path: str | Path) -> None:
        """Restore the model (and optimizer) state of a CriticModel.save directory, at any layout. Collective."""
        template = self.engine.load_template(path)
        dcp.load(template, checkpoint_id=str(path))
        self.engine.finish_load(template)


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
    ) -> CriticModel:
        """A CriticModel on this rank of `groups` from a FULL value-model state (value_model_from_lm turns an
        LM's into one). clip_grad None: optim.clip_grad."""
        optim = optim or OptimConfig()
        engine = cls._engine(config, full_state, groups, optim, parallel, device, param_dtype)
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
        if global_count is None:
            count = self._global_count(mbs)
        else:
            count = torch.tensor(float(global_count), dtype=torch.float64, device=self.device)
        stats = _StepStats()
        lr = float(self.engine.optimizer.param_groups[0]["lr"])
        result = self.engine.train_step(mbs, self._loss_fn(count, stats), self.clip_grad)
        metrics = stats.reduce(self.groups, self.device) if self.engine.is_last_stage() else None
        if self.groups is not None and self.groups.pp_size > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=self.groups.ranks["pp"][-1], group=self.groups.pp_group)
            metrics = box[0]
        return {"loss": result.loss, **(metrics or {}), "grad_norm": result.grad_norm, "lr": lr}

    def _global_count(self, mbs: list[Batch]) -> torch.Tensor:
        local = sum(loss_count(mb["response_mask"], self.loss.agg_mode) for mb in mbs)
        count = torch.as_tensor(local, dtype=torch.float64).to(self.device)
        if self.groups is not None:
            dist.all_reduce(count, group=self.groups.dp_cp_group)
        return count

    def _loss_fn(self, count: torch.Tensor, stats: _StepStats):
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

    def save(self, path: str | Path) -> None:
        """Model and optimizer state as a torch.distributed.checkpoint directory (collective); loads at any
        layout into a CriticModel or a RewardModel (`load`)."""
        dcp.save(self.engine.sharded_state(), checkpoint_id=str(path))


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
    ) -> RewardModel:
        """A RewardModel from a FULL value-model state (e.g. a trained critic's; or `load` a CriticModel.save
        directory after building)."""
        engine = cls._engine(config, full_state, groups, OptimConfig(), parallel, device, param_dtype)
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
