"""Parallel layout: rank arithmetic (no processes), error messages, and real groups on a 4-rank world."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from dist import DistributedTestError, run_distributed

from core.errors import InputError
from core.parallel import (
    AXES,
    ParallelDims,
    build_groups,
    group_ranks,
    members,
    rank_coords,
    validate_model_layout,
)


def test_tp2_dp2_pp2_groups_follow_tp_dp_pp_order() -> None:
    dims = ParallelDims(tp=2, dp=2, pp=2, world_size=8)
    assert group_ranks(dims, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks(dims, "dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks(dims, "pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_ranks(dims, "cp") == [[r] for r in range(8)]
    assert group_ranks(dims, "dp_cp") == group_ranks(dims, "dp")
    assert group_ranks(dims, "mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    c = rank_coords(dims, 6)
    assert (c.tp, c.cp, c.dp, c.pp) == (0, 0, 1, 1)


def test_cp_sits_between_tp_and_dp() -> None:
    dims = ParallelDims(tp=2, cp=2, dp=2, world_size=8)
    assert group_ranks(dims, "cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks(dims, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_ranks(dims, "dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_expert_groups_are_carved_out_of_dp_x_cp() -> None:
    dims = ParallelDims(tp=1, ep=2, dp=4, world_size=4)
    assert group_ranks(dims, "ep") == [[0, 1], [2, 3]]
    assert group_ranks(dims, "edp") == [[0, 2], [1, 3]]
    # cp=2 x dp=2 with ep=4: one expert group spans the whole dp x cp block of each tp rank.
    dims = ParallelDims(tp=2, cp=2, ep=4, dp=2, world_size=8)
    assert group_ranks(dims, "ep") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert group_ranks(dims, "edp") == [[r] for r in range(8)]
    assert dims.edp == 1


@pytest.mark.parametrize(
    "layout",
    [
        dict(tp=2, cp=2, ep=2, dp=3, pp=2),
        dict(tp=3, cp=1, ep=4, dp=4, pp=1),
        dict(tp=1, cp=4, ep=2, dp=1, pp=3),
    ],
)
def test_every_axis_partitions_the_world_and_matches_coords(layout: dict[str, int]) -> None:
    world = layout["tp"] * layout["cp"] * layout["dp"] * layout["pp"]
    dims = ParallelDims(**layout, world_size=world)
    for axis in AXES:
        groups = group_ranks(dims, axis)
        assert sorted(r for g in groups for r in g) == list(range(world)), axis
    for rank in range(world):
        c = rank_coords(dims, rank)
        assert rank == c.tp + dims.tp * (c.cp + dims.cp * (c.dp + dims.dp * c.pp))
        for axis, index in [
            ("tp", c.tp),
            ("cp", c.cp),
            ("dp", c.dp),
            ("pp", c.pp),
            ("ep", c.ep),
            ("edp", c.edp),
        ]:
            assert members(dims, axis, rank)[index] == rank, (axis, rank)


def test_dp_is_inferred_from_the_world() -> None:
    assert ParallelDims(tp=2, pp=2, world_size=8).dp == 2


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(tp=2, dp=2, pp=2, world_size=4), "does not match world_size=4: set parallel.dp=1"),
        (dict(tp=3, world_size=4), "world_size=4 is not divisible by tp*cp*pp=3"),
        (
            dict(tp=2, ep=3, world_size=8),
            "parallel.ep=3 must divide dp*cp=4 (expert groups are carved out of dp x cp): use ep in {1,2,4}",
        ),
        (dict(tp=0, world_size=1), "parallel.tp=0 must be >= 1"),
    ],
)
def test_bad_layouts_say_what_to_change(layout: dict[str, int], message: str) -> None:
    with pytest.raises(InputError) as err:
        ParallelDims(**layout)
    assert message in str(err.value)


@dataclass
class _Model:
    num_attention_heads: int = 8
    num_kv_heads: int = 2
    num_layers: int = 4
    num_experts: int = 0
    vocab_size: int = 64
    virtual_pipeline_size: int | None = None


@pytest.mark.parametrize(
    "layout, model, message",
    [
        (
            dict(tp=4, world_size=4),
            _Model(),
            "num_kv_heads=2 is not divisible by parallel.tp=4: use tp in {1,2}",
        ),
        (
            dict(tp=2, world_size=2),
            _Model(vocab_size=63),
            "vocab_size=63 is not divisible by parallel.tp=2: use tp in {1}",
        ),
        (
            dict(pp=3, world_size=3),
            _Model(),
            "num_layers=4 is not divisible by parallel.pp=3 x virtual_pipeline_size=1: use pp in {1,2,4}",
        ),
        (dict(pp=2, world_size=2), _Model(virtual_pipeline_size=4), "use pp in {1}"),
        (
            dict(world_size=1),
            _Model(virtual_pipeline_size=2),
            "virtual_pipeline_size=2 needs parallel.pp > 1",
        ),
        (dict(ep=2, world_size=2), _Model(), "parallel.ep=2 needs a mixture-of-experts model"),
        (
            dict(ep=4, world_size=4),
            _Model(num_experts=6),
            "num_experts=6 is not divisible by parallel.ep=4: use ep in {1,2}",
        ),
    ],
)
def test_bad_model_layouts_say_what_to_change(layout: dict[str, int], model: _Model, message: str) -> None:
    with pytest.raises(InputError) as err:
        validate_model_layout(ParallelDims(**layout), model)
    assert message in str(err.value)


def test_good_model_layout_passes_and_one_step_past_each_limit_does_not() -> None:
    model = _Model(num_experts=4, virtual_pipeline_size=2)
    assert validate_model_layout(ParallelDims(tp=2, ep=2, pp=2, world_size=8), model) is None
    past = {
        "tp": dict(tp=4, ep=2, pp=2, world_size=16),  # num_kv_heads=2
        "pp": dict(tp=2, ep=2, pp=4, world_size=16),  # 4 layers over pp=4 x vpp=2
        "ep": dict(tp=2, ep=8, pp=2, world_size=32),  # 4 experts over ep=8
    }
    for axis, layout in past.items():
        with pytest.raises(InputError, match=f"parallel.{axis}={layout[axis]}"):
            validate_model_layout(ParallelDims(**layout), model)


@pytest.mark.parametrize(
    "axis, layout, model",
    [
        ("tp", dict(tp=4, world_size=4), _Model()),
        ("tp", dict(tp=2, world_size=2), _Model(vocab_size=63)),
        ("pp", dict(pp=3, world_size=3), _Model()),
        ("ep", dict(ep=4, world_size=4), _Model(num_experts=6)),
    ],
)
def test_every_layout_an_error_suggests_is_accepted(axis: str, layout: dict[str, int], model: _Model) -> None:
    """'use tp in {1,2}': each value offered is a layout the model accepts (ep is carved out of the same
    world; tp and pp change its size)."""
    import re

    with pytest.raises(InputError) as err:
        validate_model_layout(ParallelDims(**layout), model)
    offered = re.search(rf"use {axis} in {{([\d,]+)}}", str(err.value))
    assert offered, str(err.value)
    for value in map(int, offered.group(1).split(",")):
        world = layout["world_size"] if axis == "ep" else layout["world_size"] // layout[axis] * value
        assert (
            validate_model_layout(ParallelDims(**{**layout, axis: value, "world_size": world}), model) is None
        )


# ---- real process groups on one 4-rank world ------------------------------------------------------------

_LAYOUTS = [dict(tp=2, dp=2, ep=2), dict(tp=2, pp=2), dict(cp=2, dp=2)]


def _sum_of_ranks_per_axis(rank: int, world_size: int) -> list[dict[str, object]]:
    """For each layout: every axis's all-reduce of (rank + 1), plus the group bookkeeping."""
    out = []
    for layout in _LAYOUTS:
        groups = build_groups(ParallelDims(**layout, world_size=world_size), rank)
        sums = {}
        for axis in AXES:
            x = torch.tensor([rank + 1.0])
            dist.all_reduce(x, group=getattr(groups, f"{axis}_group"))
            sums[axis] = x.item()
        out.append(
            {
                "sums": sums,
                "ranks": groups.ranks,
                "tp_rank": groups.tp_rank,
                "pp_next": groups.pp_next_rank,
                "pp_prev": groups.pp_prev_rank,
                "first_last": (groups.is_first_stage, groups.is_last_stage),
            }
        )
    return out


@pytest.mark.slow
def test_all_reduce_over_each_group_sums_exactly_its_ranks() -> None:
    results = run_distributed(_sum_of_ranks_per_axis, 4, timeout=120)
    for i, layout in enumerate(_LAYOUTS):
        dims = ParallelDims(**layout, world_size=4)
        for rank, per_layout in enumerate(results):
            got = per_layout[i]
            for axis in AXES:
                expected = members(dims, axis, rank)
                assert got["ranks"][axis] == tuple(expected), (layout, axis, rank)
                assert got["sums"][axis] == sum(r + 1 for r in expected), (layout, axis, rank)
            assert got["tp_rank"] == rank_coords(dims, rank).tp
    # tp=2 x dp=2, spelled out: tp pairs {0,1},{2,3}; dp pairs {0,2},{1,3}; ep=2 spans dp.
    tp_dp = [r[0]["sums"] for r in results]
    assert [s["tp"] for s in tp_dp] == [3.0, 3.0, 7.0, 7.0]
    assert [s["dp"] for s in tp_dp] == [4.0, 6.0, 4.0, 6.0]
    assert [s["ep"] for s in tp_dp] == [4.0, 6.0, 4.0, 6.0]
    assert [s["pp"] for s in tp_dp] == [1.0, 2.0, 3.0, 4.0]
    # tp=2 x pp=2: ranks 0,1 are stage 0 and 2,3 stage 1; neighbours wrap around.
    tp_pp = [r[1] for r in results]
    assert [r["first_last"] for r in tp_pp] == [(True, False), (True, False), (False, True), (False, True)]
    assert [r["pp_next"] for r in tp_pp] == [2, 3, 0, 1]
    assert [r["pp_prev"] for r in tp_pp] == [2, 3, 0, 1]


# ---- the harness itself -------------------------------------------------------------------------------------


def _rank1_fails_while_rank0_waits(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # would wait forever for rank 1: the harness must stop it


@pytest.mark.slow
def test_harness_raises_the_failing_ranks_traceback_without_hanging() -> None:
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 failed(.|\n)*ValueError: boom from rank 1"):
        run_distributed(_rank1_fails_while_rank0_waits, 2, timeout=120)
