"""EngineModel: what the RL models over a core ModelEngine share (PolicyModel in algorithms/policy.py,
CriticModel and RewardModel in algorithms/critic.py).

They take the same batches, dicts of (B, T) tensors right-padded to T with input_ids and (mostly)
response_mask. A batch runs in micro-batches of `micro_batch_size` rows, each cut after its last
response token: rows are right-padded and attention is causal, so nothing after it changes a kept
position's output. Every rank of one dp shard (its tp x pp ranks) is called with the same batch; the last
pipeline stage computes outputs and metrics and broadcasts them over pp, so every rank returns the same.
A train step is normalised by the step's GLOBAL count (all micro-batches, all dp ranks).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from algorithms.losses import loss_count
from core.config import LoraConfig, OptimConfig, ParallelConfig
from core.engine import LossFn, ModelEngine
from core.errors import InputError
from core.parallel.dims import Groups
from core.transformer.config import TransformerConfig

Batch = dict[str, torch.Tensor]


class StepStats:
    """Loss-function metrics of one step on the last pipeline stage, combined over micro-batches.

    Shares (pg_loss, kl, entropy, vf_loss: already divided by the global count) add up; token means (the
    loss's metrics) are weighted by the micro-batch's loss tokens; *_max / *_min keep extremes.
    """

    def __init__(self) -> None:
        self.shares: dict[str, float] = {}
        self.weighted: dict[str, float] = {}
        self.tokens = 0.0
        self.extremes: dict[str, float] = {}

    def add(self, shares: dict[str, torch.Tensor], means: dict[str, torch.Tensor], tokens: float) -> None:
        for k, v in shares.items():
            self.shares[k] = self.shares.get(k, 0.0) + float(v)
        self.tokens += tokens
        for k, v in means.items():
            if k.endswith("_max"):
                self.extremes[k] = max(self.extremes.get(k, float("-inf")), float(v))
            elif k.endswith("_min"):
                self.extremes[k] = min(self.extremes.get(k, float("inf")), float(v))
            else:
                self.weighted[k] = self.weighted.get(k, 0.0) + float(v) * tokens

    def reduce(self, groups: Groups | None, device: torch.device) -> dict[str, float]:
        """Global metrics over dp x cp (last stage only; the caller broadcasts them over pp)."""
        sum_keys, ext_keys = sorted(self.shares) + sorted(self.weighted), sorted(self.extremes)
        sums = [self.shares.get(k, self.weighted.get(k)) for k in sum_keys] + [self.tokens]
        # min(x) = -max(-x): one MAX all-reduce for both kinds of extreme
        signed = [self.extremes[k] if k.endswith("_max") else -self.extremes[k] for k in ext_keys]
        sums_t = torch.tensor(sums, dtype=torch.float64, device=device)
        ext_t = torch.tensor(signed, dtype=torch.float64, device=device)
        if groups is not None:
            dist.all_reduce(sums_t, group=groups.dp_cp_group)
            dist.all_reduce(ext_t, op=dist.ReduceOp.MAX, group=groups.dp_cp_group)
        tokens = float(sums_t[-1])
        out = {k: float(v) for k, v in zip(sum_keys, sums_t[:-1].tolist())}
        for k in self.weighted:
            out[k] /= max(tokens, 1.0)
        for k, v in zip(ext_keys, ext_t.tolist()):
            out[k] = v if k.endswith("_max") else -v
        return out


class EngineModel:
    """One rank's model over a ModelEngine (any tp x pp x dp layout; cp is refused: its sequence split is
    not wired into the micro-batches here): micro-batching, forward-only outputs, one optimizer step,
    save / load. Subclasses add the head's meaning (logprobs, values, scores) and their loss.

    micro_batch_size: rows per forward/backward on this rank; a batch of B rows runs ceil(B / mbs).
    """

    def __init__(self, engine: ModelEngine, micro_batch_size: int):
        if micro_batch_size < 1:
            raise InputError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if engine.groups is not None and engine.groups.cp_size > 1:
            raise InputError(f"{type(self).__name__} does not support context parallelism (cp > 1) yet")
        self.engine, self.micro_batch_size = engine, micro_batch_size

    @staticmethod
    def build_engine(
        config: TransformerConfig,
        full_state: dict[str, torch.Tensor],
        groups: Groups | None,
        optim: OptimConfig,
        parallel: ParallelConfig | None,
        device: torch.device | str,
        param_dtype: torch.dtype,
        compile_layers: bool = False,
        lora: LoraConfig | None = None,
    ) -> ModelEngine:
        """This rank's ModelEngine of `groups` (None: a single process) from the FULL model state.

        parallel: vpp / distributed_optimizer (its sizes must match groups.dims; None: from groups, no vpp,
        replicated optimizer). lora: train low-rank adapters only (core/tensor_parallel/lora.py).
        compile_layers: torch.compile each transformer layer (the engine refuses
        it with cp or ep > 1)."""
        parallel = parallel or _parallel_of(groups)
        _check_parallel(parallel, groups)
        return ModelEngine(
            config,
            parallel,
            optim,
            groups,
            torch.device(device),
            full_state,
            param_dtype,
            compile_layers=compile_layers,
            lora=lora,
        )

    # ---- properties -------------------------------------------------------------------------------------

    @property
    def groups(self) -> Groups | None:
        return self.engine.groups

    @property
    def config(self) -> TransformerConfig:
        return self.engine.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.groups.tp_group if self.groups else None

    # ---- micro-batches, forward-only outputs ------------------------------------------------------------

    def _micro_batches(self, batch: Batch, keys: tuple[str, ...], cut: bool = True) -> list[Batch]:
        """Row slices of the `keys` tensors (those present) on the device; cut: each ends after its last
        response token (nothing after it can change a kept position's output)."""
        ids = batch.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[0] < 1:
            raise InputError("batch needs input_ids (B, T) with B >= 1")
        out = []
        for start in range(0, ids.shape[0], self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            length = ids.shape[1]
            if cut and "response_mask" in batch:
                length = min(length, max(2, last_position(batch["response_mask"][rows]) + 1))
            out.append({k: batch[k][rows, :length].to(self.device) for k in keys if k in batch})
        return out

    @torch.no_grad()
    def _forward_rows(
        self, batch: Batch, collect: LossFn, names: tuple[str, ...], cut: bool = True
    ) -> torch.Tensor:
        """Forward only, in eval mode, micro-batch by micro-batch: the (b, t) fp32 tensors `names` that
        `collect` returns for each micro-batch, laid out at its rows as (len(names), B, T) on the device
        (0 after a micro-batch's cut), the same on every rank of this dp shard."""
        mbs = self._micro_batches(batch, ("input_ids", "response_mask"), cut)
        per_mb = self.engine.forward_collect(mbs, collect)
        B, T = batch["input_ids"].shape
        out = torch.zeros(len(names), B, T, dtype=torch.float32, device=self.device)
        if self.engine.is_last_stage():
            row = 0
            for result in per_mb:
                for i, name in enumerate(names):
                    part = result[name]  # (b, t) with b <= micro_batch_size, t <= T
                    out[i, row : row + part.shape[0], : part.shape[1]] = part
                row += result[names[0]].shape[0]
        if self.groups is not None and self.groups.pp_size > 1:
            dist.broadcast(out, src=self.groups.ranks["pp"][-1], group=self.groups.pp_group)
        return out

    # ---- training ---------------------------------------------------------------------------------------

    def _step_count(self, mbs: list[Batch], agg_mode: str, global_count: float | None) -> torch.Tensor:
        """The step's normaliser, a 0-dim fp64 tensor on the device: `global_count` when given, else the
        micro-batches' loss tokens (token_mean) or sequences (seq_mean_*) summed over dp x cp."""
        if global_count is not None:
            return torch.tensor(float(global_count), dtype=torch.float64, device=self.device)
        local = sum(loss_count(mb["response_mask"], agg_mode) for mb in mbs)
        count = torch.as_tensor(local, dtype=torch.float64).to(self.device)
        if self.groups is not None:
            dist.all_reduce(count, group=self.groups.dp_cp_group)
        return count

    def _train_step(
        self, mbs: list[Batch], loss_fn: LossFn, stats: StepStats, clip_grad: float
    ) -> dict[str, float]:
        """One optimizer step over the micro-batches; `loss_fn` fills `stats` on the last stage. Returns
        the same metrics on every rank: loss, the stats' global metrics, grad_norm (before clipping) and
        lr (the learning rate this step used)."""
        lr = float(self.engine.optimizer.param_groups[0]["lr"])
        result = self.engine.train_step(mbs, loss_fn, clip_grad)
        metrics = stats.reduce(self.groups, self.device) if self.engine.is_last_stage() else None
        if self.groups is not None and self.groups.pp_size > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=self.groups.ranks["pp"][-1], group=self.groups.pp_group)
            metrics = box[0]
        return {"loss": result.loss, **(metrics or {}), "grad_norm": result.grad_norm, "lr": lr}

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Model and optimizer state as a torch.distributed.checkpoint directory (collective: every rank
        calls it). It loads at any other layout (`load`). Not atomic: write into a temporary directory and
        rename it (core/checkpoint/checkpointer.py does so for whole training checkpoints). RunDiverged,
        on every rank and before anything is written, when the weights or optimizer state are not finite."""
        if not self.engine.state_finite():
            from algorithms.trainer import RunDiverged

            raise RunDiverged(f"the weights are not finite: {path} not written")
        dcp.save(self.engine.sharded_state() | self._quantizer_entries(), checkpoint_id=str(path))

    def load(self, path: str | Path) -> None:
        """Restore model and optimizer state written by `save` (or the "model" part of a training
        checkpoint) at any layout. Collective."""
        template = self.engine.load_template(path)
        quantizers = self._quantizer_entries()
        if quantizers:
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            if not any(key in saved for key in quantizers):
                raise InputError(f"{path} holds no quantizer scales: a checkpoint of a run without quantize:")
        template.update(quantizers)  # in place: dcp.load replaces non-tensor entries in the dict it gets
        dcp.load(template, checkpoint_id=str(path))
        self.engine.finish_load(template)

    def _quantizer_entries(self) -> dict[str, torch.Tensor]:
        """QAT (algorithms/qat.py): {"quantizers.<module>.<quantizer>.<buffer>": the buffer itself}, the
        same on every dp rank (tp = pp = 1); {} without quantizers."""
        from algorithms.qat import quantizer_state

        return {f"quantizers.{k}": v for k, v in quantizer_state(self.engine.chunks).items()}


def last_position(response_mask: torch.Tensor) -> int:
    """The largest column index holding a response token in any row (-1 when there is none)."""
    cols = response_mask.bool().any(dim=0).nonzero()
    return int(cols.max()) if cols.numel() else -1


def _parallel_of(groups: Groups | None) -> ParallelConfig:
    if groups is None:
        return ParallelConfig()
    d = groups.dims
    return ParallelConfig(tp=d.tp, pp=d.pp, cp=d.cp, ep=d.ep, dp=d.dp)


def _check_parallel(parallel: ParallelConfig, groups: Groups | None) -> None:
    sizes = ParallelConfig() if groups is None else _parallel_of(groups)
    for axis in ("tp", "pp", "cp", "ep", "dp"):
        if getattr(parallel, axis) != getattr(sizes, axis):
            raise InputError(
                f"parallel.{axis}={getattr(parallel, axis)} but the process groups have {axis}="
                f"{getattr(sizes, axis)}"
            )
