"""AdamW on fp32 master weights that reads DDP's main_grad: replicated or ZeRO-1 sharded over dp.

Both optimizers are torch.optim.AdamW subclasses whose "parameters" are fp32 master vectors, so the
update math, param groups (lr, betas, eps, weight_decay per group) and LR schedulers are torch's own
and the result equals torch.optim.AdamW on the single-process model (AdamW is elementwise).

A master vector covers one contiguous range of one flattened model parameter:
    MainGradAdamW         the whole parameter on every rank (DDP all-reduces the grads)
    DistributedOptimizer  the part of the parameter inside this rank's chunk of its bucket (ZeRO-1:
                          master + exp_avg + exp_avg_sq for ~1/dp of the model per rank; DDP
                          reduce-scatters the grads, step() all-gathers the updated params)
For an fp32 parameter the master is a view of the parameter itself (no copy; keep parameters in place,
e.g. module.load_state_dict copies into them). For bf16/fp16 it is an fp32 copy, so small updates are
not lost to rounding ("bf16 parameters with fp32 master weights"). The master's .grad is a view of the
fp32 main_grad buffer (a cast copy when grad_dtype is not fp32).

Checkpoints: state_dict()/load_state_dict() are per rank (same layout only). full_state_dict() gathers
the state as FULL per-parameter tensors keyed by parameter name, which load_full_state_dict() reads at
any dp size or sharding (dp2 -> dp1, dp4, replicated). "Full" is over dp: each tensor has its
parameter's local shape, so tp/ep/pp-sharded params stay sharded as the params are (tp_dim, ep_dim)
and the checkpoint layer reshards those. Both loads write the masters into the params (collective):
    {"state": {name: {"step": (), "master_param": shape, "exp_avg": shape, "exp_avg_sq": shape}},
     "param_groups": [{"lr": ..., "weight_decay": ..., ..., "params": [name, ...]}]}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from core.distributed.buffers import Bucket, GradBuffer, all_gather_single, group_size
from core.distributed.clip import clip_grad_norm_
from core.distributed.ddp import DistributedDataParallel

if TYPE_CHECKING:  # only read here: keeps the parallel core importable without pydantic
    from core.config import OptimConfig

_NOT_PER_ELEMENT = ("step", "master_param")


@dataclass(eq=False)
class _Shard:
    """The flattened elements [lo, hi) of one parameter that this rank's optimizer updates."""

    name: str
    param: nn.Parameter
    buffer: GradBuffer
    lo: int
    hi: int
    master: torch.Tensor  # (hi - lo,) fp32
    master_is_param: bool  # fp32 param: the master is a view of it

    @property
    def buffer_lo(self) -> int:
        return self.buffer.param_range[self.param][0] + self.lo

    @property
    def main_grad(self) -> torch.Tensor:
        return self.param.main_grad.view(-1)[self.lo : self.hi]


class _MasterAdamW(torch.optim.AdamW):
    """Shared machinery; subclasses say which range of each param this rank owns and how to publish.

    params: parameters of ddp.module, or torch-style param groups ({"params": [...], "weight_decay": ...});
    the keyword hyperparameters are torch.optim.AdamW's defaults for every group.
    """

    needs_reduce_scatter: bool

    def __init__(
        self,
        ddp: DistributedDataParallel,
        params: list[nn.Parameter] | list[dict[str, Any]],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        **adamw_kwargs: Any,
    ):
        if ddp.use_distributed_optimizer != self.needs_reduce_scatter:
            raise ValueError(
                f"{type(self).__name__} needs DistributedDataParallel(use_distributed_optimizer="
                f"{self.needs_reduce_scatter}), got {ddp.use_distributed_optimizer}"
            )
        self.ddp = ddp
        param_groups = [{"params": list(params)}] if isinstance(params[0], torch.Tensor) else params
        self.param_name = _param_names(ddp.module, param_groups)  # every optimized param, on all ranks
        self._names_per_group = [[self.param_name[p] for p in g["params"]] for g in param_groups]
        self.shards: list[_Shard] = []
        groups = []
        for group in param_groups:
            shards = [s for p in group["params"] if (s := self._make_shard(p)) is not None]
            self.shards += shards
            groups.append({**group, "params": [s.master for s in shards]})
        if not ({"fused", "foreach"} & adamw_kwargs.keys()) and self.shards:
            # One fused kernel over every CUDA master (torch's fastest AdamW); torch's foreach elsewhere.
            adamw_kwargs["fused"] = all(s.master.is_cuda for s in self.shards)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kwargs)
        self._shards_in: dict[Bucket, list[_Shard]] = {}
        for s in self.shards:
            self._shards_in.setdefault(s.buffer.bucket_of[s.param], []).append(s)

    # ---- what subclasses define ---------------------------------------------------------------------

    def _owned_range(self, buffer: GradBuffer, p: nn.Parameter) -> tuple[int, int] | None:
        raise NotImplementedError

    def _publish_params(self) -> None:
        """Write the masters into the model parameters (every rank ends with the full updated model)."""
        raise NotImplementedError

    def _full_values(
        self, rows_of: Callable[[_Shard], torch.Tensor], rows: int, dtype: torch.dtype | None
    ) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """(param, (rows, numel)) for every optimized param: rows_of(shard) (rows, hi - lo) assembled
        over the ranks owning it. dtype None: the param's dtype. Collective for the sharded optimizer."""
        raise NotImplementedError

    def _shard_groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(dense, expert) groups whose ranks hold disjoint shards: summed in the grad norm."""
        raise NotImplementedError

    # ---- construction ---------------------------------------------------------------------------------

    def _make_shard(self, p: nn.Parameter) -> _Shard | None:
        buffer = self.ddp.grad_buffer_of(p)
        owned = self._owned_range(buffer, p)
        if owned is None:
            return None
        lo, hi = owned
        flat = p.detach().view(-1)[lo:hi]
        is_fp32 = p.dtype == torch.float32
        master = flat if is_fp32 else flat.float()
        return _Shard(self.param_name[p], p, buffer, lo, hi, master, is_fp32)

    # ---- the step -------------------------------------------------------------------------------------

    def main_grads(self) -> list[torch.Tensor]:
        """The main_grad elements this rank's optimizer reads (what to unscale / check for inf)."""
        return [s.main_grad for s in self.shards]

    def clip_grad_norm_(
        self,
        max_norm: float,
        *,
        tp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
        ep_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """Global grad norm of the whole model (see clip.py); scales main_grad in place. Collective."""
        dp_group, expert_dp_group = self._shard_groups()
        return clip_grad_norm_(
            [s.param for s in self.shards],
            max_norm,
            grads=self.main_grads(),
            tp_group=tp_group,
            pp_group=pp_group,
            ep_group=ep_group,
            dp_group=dp_group,
            expert_dp_group=expert_dp_group,
            device=self.ddp.grad_buffers[0].data.device if self.ddp.grad_buffers else None,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """AdamW on the masters from the (reduced) main_grads, then publish the params. Call after
        ddp.finish_grad_sync() (and clipping)."""
        if closure is not None:
            raise ValueError("closure is not supported: run forward/backward, then step()")
        for s in self.shards:
            g = s.main_grad
            s.master.grad = g if g.dtype == torch.float32 else g.float()
        super().step()
        self._publish_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the DDP gradient buffer (main_grad) for the next step's first micro-batch."""
        self.ddp.zero_grad_buffer()
        for s in self.shards:
            s.master.grad = None

    # ---- per-rank checkpoint (same layout) ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["master_params"] = [s.master for s in self.shards]
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_params")
        if len(masters) != len(self.shards):
            raise ValueError(
                f"per-rank optimizer state has {len(masters)} master shards, this rank has "
                f"{len(self.shards)}: a different layout; use full_state_dict/load_full_state_dict"
            )
        super().load_state_dict(state_dict)
        for s, m in zip(self.shards, masters, strict=True):
            s.master.copy_(m)
        self._publish_params()

    # ---- full, per-parameter checkpoint (any layout) --------------------------------------------------

    def _global_step(self) -> int:
        steps = [float(self.state[s.master]["step"]) for s in self.shards if "step" in self.state[s.master]]
        step = torch.tensor(max(steps, default=0.0), device=self._device())
        dense, expert = self._shard_groups()
        for group in [dense] if expert is dense else [dense, expert]:  # same order on every rank
            if group_size(group) > 1:
                dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
        return int(step.item())

    def _device(self) -> torch.device:
        return self.ddp.grad_buffers[0].data.device if self.ddp.grad_buffers else torch.device("cpu")

    def _per_element_keys(self) -> list[str]:
        keys = ["exp_avg", "exp_avg_sq"]
        return keys + ["max_exp_avg_sq"] if any(g["amsgrad"] for g in self.param_groups) else keys

    @torch.no_grad()
    def full_state_dict(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Full per-parameter state keyed by name, on `device`, identical on every rank. Collective."""
        step = self._global_step()
        keys = ["master_param"] + (self._per_element_keys() if step > 0 else [])

        def rows_of(s: _Shard) -> torch.Tensor:  # (len(keys), hi - lo)
            return torch.stack([s.master] + [self.state[s.master][k] for k in keys[1:]])

        state: dict[str, dict[str, torch.Tensor]] = {}
        for p, values in self._full_values(rows_of, len(keys), torch.float32):
            entry = {k: v.view(p.shape).to(device, copy=True) for k, v in zip(keys, values, strict=True)}
            if step > 0:
                entry["step"] = torch.tensor(float(step), dtype=torch.float32)
            state[self.param_name[p]] = entry
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
            for g, names in zip(self.param_groups, self._names_per_group, strict=True)
        ]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load full per-parameter state (from any dp size); writes the masters into the model params."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"checkpoint has {len(groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        for mine, theirs in zip(self.param_groups, groups, strict=True):
            mine.update({k: v for k, v in theirs.items() if k != "params"})
        for s in self.shards:
            if s.name not in state_dict["state"]:
                raise KeyError(f"optimizer checkpoint has no state for parameter {s.name!r}")
            self._load_shard(s, state_dict["state"][s.name])
        self._publish_params()

    def _load_shard(self, s: _Shard, entry: dict[str, torch.Tensor]) -> None:
        if "master_param" in entry:
            s.master.copy_(entry["master_param"].reshape(-1)[s.lo : s.hi])
        self.state[s.master] = {}
        if "step" not in entry:
            return
        step_on_device = any(g["fused"] or g["capturable"] for g in self.param_groups)
        state = {"step": entry["step"].detach().to(torch.float32).clone()}
        if step_on_device:
            state["step"] = state["step"].to(s.master.device)
        for k, v in entry.items():
            if k not in _NOT_PER_ELEMENT:
                state[k] = v.reshape(-1)[s.lo : s.hi].to(s.master.device, torch.float32, copy=True)
        self.state[s.master] = state


class MainGradAdamW(_MasterAdamW):
    """AdamW on the whole model on every rank, reading all-reduced main_grads (no sharding)."""

    needs_reduce_scatter = False

    def _owned_range(self, buffer: GradBuffer, p: nn.Parameter) -> tuple[int, int] | None:
        return 0, p.numel()

    def _publish_params(self) -> None:
        pairs = [(s.param.detach().view(-1), s.master) for s in self.shards if not s.master_is_param]
        if pairs:
            torch._foreach_copy_(*map(list, zip(*pairs, strict=True)))  # cast fp32 masters into the params

    def _full_values(
        self, rows_of: Callable[[_Shard], torch.Tensor], rows: int, dtype: torch.dtype | None
    ) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        for s in self.shards:
            yield s.param, rows_of(s).to(dtype or s.param.dtype)

    def _shard_groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        return None, None


class DistributedOptimizer(_MasterAdamW):
    """ZeRO-1: this rank keeps fp32 master weights and Adam state for its chunk of every bucket only."""

    needs_reduce_scatter = True

    def _owned_range(self, buffer: GradBuffer, p: nn.Parameter) -> tuple[int, int] | None:
        start, end = buffer.param_range[p]
        lo, hi = buffer.bucket_of[p].chunk(buffer.dp_rank, buffer.dp_size)
        lo, hi = max(start, lo), min(end, hi)
        return (lo - start, hi - start) if lo < hi else None

    def _shard_groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        return self.ddp.dp_group, self.ddp.expert_dp_group

    def _publish_params(self) -> None:
        """All-gather the updated chunks (in the param dtype) bucket by bucket into the params."""
        for p, values in self._full_values(lambda s: s.master[None], 1, None):
            p.detach().view(-1).copy_(values[0])

    def _full_values(
        self, rows_of: Callable[[_Shard], torch.Tensor], rows: int, dtype: torch.dtype | None
    ) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        for buffer in self.ddp.grad_buffers:
            for bucket in buffer.buckets:
                params = [p for p in bucket.params if p in self.param_name]
                if not params:
                    continue
                full = self._gather_bucket(buffer, bucket, rows_of, rows, dtype or buffer.param_dtype)
                for p in params:
                    start, end = buffer.param_range[p]
                    yield p, full[:, start - bucket.start : end - bucket.start]

    def _gather_bucket(
        self,
        buffer: GradBuffer,
        bucket: Bucket,
        rows_of: Callable[[_Shard], torch.Tensor],
        rows: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """(rows, bucket.numel): each rank fills its chunk from its shards, one in-place all-gather."""
        dp, rank = buffer.dp_size, buffer.dp_rank
        lo, hi = bucket.chunk(rank, dp)
        gathered = torch.zeros(dp, rows, hi - lo, dtype=dtype, device=buffer.data.device)
        local = gathered[rank]  # (rows, chunk): contiguous, at offset rank * rows * chunk
        for s in self._shards_in.get(bucket, []):
            local[:, s.buffer_lo - lo : s.buffer_lo - lo + s.master.numel()] = rows_of(s)
        if dp > 1:
            all_gather_single(gathered.view(dp * rows, hi - lo), local, group=buffer.group)
        return gathered.permute(1, 0, 2).reshape(rows, bucket.numel)


def _param_names(module: nn.Module, param_groups: list[dict[str, Any]]) -> dict[nn.Parameter, str]:
    """Name of every param in the groups (the module's first name for a tied weight); checks duplicates."""
    names = {p: n for n, p in module.named_parameters()}
    out: dict[nn.Parameter, str] = {}
    for group in param_groups:
        for p in group["params"]:
            if p not in names:
                raise ValueError("a param group holds a tensor that is not a parameter of the DDP module")
            if p in out:
                raise ValueError(f"parameter {names[p]!r} is in more than one param group")
            out[p] = names[p]
    return out


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; no weight decay on biases and norm weights (1-D params), as Megatron and nanoGPT."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    ddp: DistributedDataParallel, cfg: OptimConfig, *, distributed: bool
) -> MainGradAdamW | DistributedOptimizer:
    """AdamW with weight-decay groups over ddp.module: ZeRO-1 sharded (distributed=True; the DDP must be
    built with use_distributed_optimizer=True) or replicated on every dp rank."""
    cls = DistributedOptimizer if distributed else MainGradAdamW
    return cls(
        ddp,
        weight_decay_groups(ddp.module, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
