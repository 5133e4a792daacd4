"""Parallel layout: how the world's ranks split into tensor/context/expert/data/pipeline groups.

Rank order is tp-cp-ep-dp-pp with tp fastest (Megatron's default). Expert parallelism is a
subdivision of the dense dp x cp block, so the dense layout is tp-cp-dp-pp:

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Within one (tp_rank, pp_rank) slice the dp x cp ranks are numbered j = cp_rank + cp * dp_rank; expert
groups take ep consecutive j's (ep_rank = j % ep) and the expert-data-parallel group strides over them
(edp_rank = j // ep). Expert tensor parallelism equals tp. With cp = 1 this gives tp-ep-edp-pp, so
that expert all-to-all stays among neighbouring ranks (one node) like tp does.

The rank arithmetic is pure (`rank_coords`, `group_ranks`) so layouts are testable without processes;
`build_groups` turns it into process groups. Nothing here is a module-level global.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch.distributed as dist

from core.errors import InputError

# The order in which build_groups creates groups: every rank must call new_group in the same order.
AXES: tuple[str, ...] = ("tp", "cp", "dp", "dp_cp", "pp", "ep", "edp", "mp")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt_set(values: list[int]) -> str:
    return "{" + ",".join(str(v) for v in values) + "}"


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel axis. world_size = tp * cp * dp * pp; ep divides dp * cp.

    dp=-1 means "whatever is left": dp = world_size // (tp * cp * pp).
    """

    tp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int = -1
    pp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "ep", "pp", "world_size"):
            if getattr(self, name) < 1:
                raise InputError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp == -1:
            object.__setattr__(self, "dp", self._infer_dp())
        elif self.dp < 1:
            raise InputError(f"parallel.dp={self.dp} must be >= 1 (or -1 to use the remaining ranks)")
        self._check_world()
        self._check_ep()

    def _infer_dp(self) -> int:
        model_parallel = self.tp * self.cp * self.pp
        if self.world_size % model_parallel:
            raise InputError(
                f"world_size={self.world_size} is not divisible by tp*cp*pp={model_parallel} "
                f"(tp={self.tp}, cp={self.cp}, pp={self.pp}): change tp, cp or pp, or the number of processes"
            )
        return self.world_size // model_parallel

    def _check_world(self) -> None:
        product = self.tp * self.cp * self.dp * self.pp
        if product == self.world_size:
            return
        hint = "change the number of processes"
        model_parallel = self.tp * self.cp * self.pp
        if self.world_size % model_parallel == 0:
            hint = f"set parallel.dp={self.world_size // model_parallel} (or dp=-1 to infer it)"
        raise InputError(
            f"tp*cp*dp*pp = {self.tp}*{self.cp}*{self.dp}*{self.pp} = {product} does not match "
            f"world_size={self.world_size}: {hint}"
        )

    def _check_ep(self) -> None:
        if self.dp_cp % self.ep:
            raise InputError(
                f"parallel.ep={self.ep} must divide dp*cp={self.dp_cp} (expert groups are carved out of "
                f"dp x cp): use ep in {_fmt_set(_divisors(self.dp_cp))}"
            )

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard."""
        return self.dp_cp // self.ep


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits on every axis (its rank within each group, 0-based)."""

    tp: int
    cp: int
    dp: int
    pp: int
    dp_cp: int  # cp + cp_size * dp: index in the dp x cp block
    ep: int
    edp: int


def rank_coords(dims: ParallelDims, rank: int) -> RankCoords:
    """Coordinates of `rank` in the tp-cp-dp-pp layout (tp fastest) plus its expert coordinates."""
    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank={rank} is outside world_size={dims.world_size}")
    tp_r, rest = rank % dims.tp, rank // dims.tp
    cp_r, rest = rest % dims.cp, rest // dims.cp
    dp_r, pp_r = rest % dims.dp, rest // dims.dp
    j = cp_r + dims.cp * dp_r  # index in the dp x cp block
    return RankCoords(tp=tp_r, cp=cp_r, dp=dp_r, pp=pp_r, dp_cp=j, ep=j % dims.ep, edp=j // dims.ep)


def _global_rank(dims: ParallelDims, tp: int, j: int, pp: int) -> int:
    """Global rank from (tp rank, dp x cp block index j, pp rank)."""
    return tp + dims.tp * (j + dims.dp_cp * pp)


def _axis_members(dims: ParallelDims, axis: str, tp: int, j: int, pp: int) -> list[int]:
    """Global ranks of the `axis` group of the rank at (tp, j, pp)."""
    cp_r, dp_r = j % dims.cp, j // dims.cp
    if axis == "tp":
        return [_global_rank(dims, t, j, pp) for t in range(dims.tp)]
    if axis == "cp":
        return [_global_rank(dims, tp, c + dims.cp * dp_r, pp) for c in range(dims.cp)]
    if axis == "dp":
        return [_global_rank(dims, tp, cp_r + dims.cp * d, pp) for d in range(dims.dp)]
    if axis == "dp_cp":
        return [_global_rank(dims, tp, k, pp) for k in range(dims.dp_cp)]
    if axis == "pp":
        return [_global_rank(dims, tp, j, p) for p in range(dims.pp)]
    if axis == "ep":
        first = (j // dims.ep) * dims.ep
        return [_global_rank(dims, tp, first + e, pp) for e in range(dims.ep)]
    if axis == "edp":
        return [_global_rank(dims, tp, j % dims.ep + dims.ep * k, pp) for k in range(dims.edp)]
    if axis == "mp":  # model parallel = tp x pp: the ranks holding one full copy of the dense model
        return sorted(_global_rank(dims, t, j, p) for p in range(dims.pp) for t in range(dims.tp))
    raise ValueError(f"unknown axis {axis!r}; expected one of {AXES}")


def group_ranks(dims: ParallelDims, axis: str) -> list[list[int]]:
    """Every group of `axis` as sorted global ranks, ordered by their lowest rank (a partition of the world)."""
    groups: dict[tuple[int, ...], None] = {}
    for rank in range(dims.world_size):
        c = rank_coords(dims, rank)
        groups.setdefault(tuple(_axis_members(dims, axis, c.tp, c.dp_cp, c.pp)), None)
    return sorted(list(g) for g in groups)


def members(dims: ParallelDims, axis: str, rank: int) -> list[int]:
    """Global ranks of the `axis` group that contains `rank`."""
    c = rank_coords(dims, rank)
    return _axis_members(dims, axis, c.tp, c.dp_cp, c.pp)


@dataclass(frozen=True)
class Groups:
    """Every process group this rank belongs to, built once and handed down (never a global).

    `<axis>_group` is the group, `<axis>_rank` this rank's index in it, `<axis>_size` its size and
    `ranks[axis]` its members as global ranks (what dist.send / broadcast's `src` take).
    Axes: tp, cp, dp, dp_cp (dp x cp: gradient reduction of dense params under CP), pp, ep, edp
    (expert data parallel: gradient reduction of expert params), mp (tp x pp: one model replica,
    e.g. for the gradient norm).
    """

    dims: ParallelDims
    rank: int
    ranks: dict[str, tuple[int, ...]]
    tp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    tp_rank: int
    cp_rank: int
    dp_rank: int
    dp_cp_rank: int
    pp_rank: int
    ep_rank: int
    edp_rank: int
    mp_rank: int
    tp_size: int
    cp_size: int
    dp_size: int
    dp_cp_size: int
    pp_size: int
    ep_size: int
    edp_size: int
    mp_size: int

    @property
    def pp_prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around: interleaved schedules need it)."""
        stages = self.ranks["pp"]
        return stages[(self.pp_rank - 1) % len(stages)]

    @property
    def pp_next_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around)."""
        stages = self.ranks["pp"]
        return stages[(self.pp_rank + 1) % len(stages)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def build_groups(
    dims: ParallelDims, rank: int, backend: str | None = None, timeout: timedelta | None = None
) -> Groups:
    """Create every group of every axis (collective: all ranks call it with the same dims).

    torch requires each new_group call on all ranks in the same order, so we create all groups of
    all axes in AXES order and keep the ones holding `rank`. Needs an initialised default group.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed.init_process_group to have run")
    if dist.get_world_size() != dims.world_size:
        raise InputError(
            f"ParallelDims.world_size={dims.world_size} but torch.distributed has "
            f"{dist.get_world_size()} processes: launch {dims.world_size} processes or change the layout"
        )
    fields: dict[str, object] = {}
    ranks: dict[str, tuple[int, ...]] = {}
    for axis in AXES:
        for group_members in group_ranks(dims, axis):
            pg = dist.new_group(group_members, timeout=timeout, backend=backend)
            if rank in group_members:
                ranks[axis] = tuple(group_members)
                fields[f"{axis}_group"] = pg
                fields[f"{axis}_rank"] = group_members.index(rank)
                fields[f"{axis}_size"] = len(group_members)
    return Groups(dims=dims, rank=rank, ranks=ranks, **fields)  # type: ignore[arg-type]


class ModelLayout(Protocol):
    """What validate_model_layout reads from a model config. Optional attributes (read with defaults):
    num_kv_heads (= num_attention_heads), ffn_hidden_size, num_experts (0), virtual_pipeline_size (1)."""

    num_attention_heads: int
    num_layers: int
    vocab_size: int


def _tp_choices(sizes: dict[str, int]) -> list[int]:
    """tp values that divide every tp-sharded size."""
    return [t for t in _divisors(min(sizes.values())) if all(n % t == 0 for n in sizes.values())]


def validate_model_layout(
    dims: ParallelDims, config: ModelLayout, virtual_pipeline_size: int | None = None
) -> None:
    """Raise InputError (one line, saying what to change) if the model cannot be split as `dims` says.
    virtual_pipeline_size: None reads it from the config (default 1)."""
    heads = config.num_attention_heads
    tp_sharded = {
        "num_attention_heads": heads,
        "num_kv_heads": getattr(config, "num_kv_heads", None) or heads,
        "vocab_size": config.vocab_size,
    }
    ffn = getattr(config, "ffn_hidden_size", None)
    if ffn:
        tp_sharded["ffn_hidden_size"] = ffn
    for name, size in tp_sharded.items():
        if size % dims.tp:
            raise InputError(
                f"{name}={size} is not divisible by parallel.tp={dims.tp}: "
                f"use tp in {_fmt_set(_tp_choices(tp_sharded))}"
            )
    vpp = virtual_pipeline_size or getattr(config, "virtual_pipeline_size", None) or 1
    _validate_pipeline(dims, config.num_layers, vpp)
    _validate_experts(dims, getattr(config, "num_experts", None) or 0)


def _validate_pipeline(dims: ParallelDims, num_layers: int, vpp: int) -> None:
    if vpp > 1 and dims.pp == 1:
        raise InputError(f"virtual_pipeline_size={vpp} needs parallel.pp > 1: set virtual_pipeline_size=1")
    if num_layers % (dims.pp * vpp):
        choices = [p for p in _divisors(num_layers) if num_layers % (p * vpp) == 0]
        raise InputError(
            f"num_layers={num_layers} is not divisible by parallel.pp={dims.pp} x virtual_pipeline_size="
            f"{vpp}: use pp in {_fmt_set(choices)}"
        )


def _validate_experts(dims: ParallelDims, num_experts: int) -> None:
    if dims.ep > 1 and num_experts == 0:
        raise InputError(f"parallel.ep={dims.ep} needs a mixture-of-experts model (num_experts=0): set ep=1")
    if num_experts and num_experts % dims.ep:
        choices = [e for e in _divisors(num_experts) if dims.dp_cp % e == 0]
        raise InputError(
            f"num_experts={num_experts} is not divisible by parallel.ep={dims.ep}: use ep in {_fmt_set(choices)}"
        )
