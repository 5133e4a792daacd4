"""Placement pools and worker groups on a real local Ray cluster (one per module, 4 logical CPUs).

Actors are few and reused: "policy" (dp2, 2 ranks) and "reference" (tp2 x dp2, 4 ranks) share one pool of
2 bundles (colocated: 2 reference ranks per bundle); two 1-bundle pools hold the disaggregated pair. The
last test kills a reference rank and restarts the group. Pure pieces (transport, dispatch, the placement
schema) are tested without Ray.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

import pytest
import ray
import torch
import torch.distributed as dist

from core.errors import InputError
from core.parallel.dims import ParallelDims
from rl.cluster import (
    Placement,
    PlacementTimeoutError,
    ResourcePool,
    Worker,
    WorkerGroup,
    WorkerGroupError,
    build_pools,
    from_transport,
    init_ray,
    shutdown_ray,
    to_transport,
)
from rl.cluster.dispatch import concat_results, output_ranks, split_batch

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 60.0


class ProbeWorker(Worker):
    """Answers questions about its own world; pickled by value into the actors (see `ray_cluster`)."""

    def __init__(self, tag: str = "probe") -> None:
        self.tag = tag
        self.setup_calls = 0

    def setup(self) -> None:
        self.setup_calls += 1

    def group_sums(self) -> dict[str, float | int]:
        """Sum of global ranks over this rank's tp and dp groups (tells which ranks are in each)."""
        sums = {}
        for axis in ("tp", "dp"):
            value = torch.tensor([float(self.rank)], device=self.device)
            dist.all_reduce(value, group=getattr(self.groups, f"{axis}_group"))
            sums[f"{axis}_sum"] = value.item()
        return {"rank": self.rank, "tp_rank": self.groups.tp_rank, "dp_rank": self.groups.dp_rank, **sums}

    def double_rows(self, batch: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """Doubles the shard; tp peers check over their group that they got the same rows."""
        batch = {key: value.to(self.device) for key, value in batch.items()}
        checksum = batch["x"].sum().reshape(1)
        lo, hi = checksum.clone(), checksum.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.groups.tp_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.groups.tp_group)
        rows = batch["x"].shape[0]
        return {
            "x": batch["x"] * scale,
            "ids": batch["ids"],
            "dp_rank": torch.full((rows,), self.groups.dp_rank, device=self.device),
            "tp_agree": torch.full((rows,), bool(lo == hi), device=self.device),
        }

    def info(self) -> dict:
        return {
            **self.ping(),
            "tag": self.tag,
            "setup_calls": self.setup_calls,
            "env": os.environ.get("PROBE_ROLE"),
            "main_thread": threading.current_thread() is threading.main_thread(),
            "device": str(self.device),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        }

    def sleep_on(self, rank: int, seconds: float) -> int:
        if self.rank == rank:
            time.sleep(seconds)
        return self.rank

    def fail(self) -> None:
        raise ValueError("bad batch")


# ---- pure pieces -------------------------------------------------------------------------------


def test_transport_round_trips_nested_tensors_bit_exact() -> None:
    Pair = collections.namedtuple("Pair", "a b")
    batch = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "ids": torch.arange(6).reshape(2, 3),
        "nested": [Pair(torch.ones(2, dtype=torch.float16), "text"), (1, torch.tensor(True))],
    }
    wire = to_transport(batch)
    assert not any(isinstance(v, torch.Tensor) for v in (wire["bf16"], wire["ids"]))
    back = from_transport(wire)
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], batch["bf16"])
    assert torch.equal(back["ids"], batch["ids"])
    assert isinstance(back["nested"][0], Pair) and back["nested"][0].b == "text"
    assert back["nested"][0].a.dtype == torch.float16 and back["nested"][1][1].item() is True


def test_dp_split_and_join_keep_row_order() -> None:
    batch = {"x": torch.arange(5), "text": list("abcde")}
    shards = split_batch(batch, 2)
    assert [s["text"] for s in shards] == [list("abc"), list("de")]
    joined = concat_results(shards)
    assert torch.equal(joined["x"], batch["x"]) and joined["text"] == batch["text"]
    assert concat_results([{"loss": 1.0}, {"loss": 2.0}]) == {"loss": [1.0, 2.0]}
    with pytest.raises(InputError, match="one row count"):
        split_batch({"x": torch.arange(4), "y": torch.arange(3)}, 2)
    # tp2 x dp2 x pp2: outputs are tp rank 0 on the last stage, in dp order
    assert output_ranks(ParallelDims(tp=2, dp=2, pp=2, world_size=8)) == [4, 6]


def test_placement_schema_rejects_mismatched_pools() -> None:
    with pytest.raises(ValueError, match="needs placement.pools"):
        Placement(mode="disaggregated")
    with pytest.raises(ValueError, match="placement.pools is for mode=disaggregated"):
        Placement(mode="colocated", pools={"policy": 1})
    assert Placement(gpus_per_bundle=1, cpus_per_bundle=4).bundle == {"CPU": 4, "GPU": 1}


# ---- on Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors need not import this test file
    init_ray(num_cpus=4, object_store_memory=256 * 1024**2)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def shared_pool(ray_cluster) -> ResourcePool:
    return ResourcePool(2, {"CPU": 1}, name="shared", strategy="STRICT_PACK", timeout_s=CALL_TIMEOUT_S)


@pytest.fixture(scope="module")
def policy(shared_pool) -> WorkerGroup:
    group = WorkerGroup(
        ProbeWorker,
        shared_pool,
        2,
        ParallelDims(dp=2, world_size=2),
        ("policy-tag",),
        name="policy",
        timeout_s=CALL_TIMEOUT_S,
        num_cpus_per_worker=0.5,
    )
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def reference(shared_pool) -> WorkerGroup:
    group = WorkerGroup(
        ProbeWorker,
        shared_pool,
        4,
        ParallelDims(tp=2, dp=2, world_size=4),
        name="reference",
        timeout_s=CALL_TIMEOUT_S,
        num_cpus_per_worker=0.25,
        env_vars={"PROBE_ROLE": "reference"},
    )
    yield group
    group.shutdown()


def test_dp2_groups(policy: WorkerGroup) -> None:
    results = policy.run("group_sums")
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["dp_sum"] for r in results] == [1.0, 1.0]  # both ranks in one dp group
    assert [r["tp_sum"] for r in results] == [0.0, 1.0]  # tp groups of one


def test_tp2_dp2_groups(reference: WorkerGroup) -> None:
    results = reference.run("group_sums")
    # tp groups {0,1} {2,3}; dp groups {0,2} {1,3} (tp fastest)
    assert [r["tp_sum"] for r in results] == [1.0, 1.0, 5.0, 5.0]
    assert [r["dp_sum"] for r in results] == [2.0, 4.0, 2.0, 4.0]
    assert [(r["tp_rank"], r["dp_rank"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_dp_dispatch_returns_rows_in_order(reference: WorkerGroup) -> None:
    batch = {"x": torch.arange(8, dtype=torch.float32).reshape(8, 1), "ids": torch.arange(8)}
    out = reference.run("double_rows", batch, 2.0, dispatch="dp")
    assert torch.equal(out["ids"], torch.arange(8))  # each shard once, in dp order
    assert torch.equal(out["x"], batch["x"] * 2)
    assert out["dp_rank"].tolist() == [0] * 4 + [1] * 4
    assert bool(out["tp_agree"].all())  # tp peers got identical shards
    assert reference.run("sleep_on", -1, 0.0, dispatch="rank0") == 0


def test_colocated_groups_share_bundles(policy: WorkerGroup, reference: WorkerGroup) -> None:
    pending = [policy.call("info"), reference.call("info")]  # both roles in flight at once
    policy_info, reference_info = (g.get(p) for g, p in zip((policy, reference), pending))
    pool_ids = {i["placement_group"] for i in policy_info + reference_info}
    assert pool_ids == {policy.pool.placement_group.id.hex()} and reference.pool is policy.pool
    assert [reference.bundle_of(r) for r in range(4)] == [0, 0, 1, 1]  # tp peers share a bundle
    assert [i["tag"] for i in policy_info] == ["policy-tag"] * 2
    assert {i["role"] for i in reference_info} == {"reference"}
    assert all(i["main_thread"] for i in policy_info)  # what an in-process vLLM engine needs
    assert [i["env"] for i in policy_info + reference_info] == [None] * 2 + ["reference"] * 4


def test_build_pools_colocated_shares_each_bundle(ray_cluster) -> None:
    placed = build_pools(
        Placement(mode="colocated", num_bundles=1, cpus_per_bundle=0.3), ["policy", "generation"]
    )
    try:
        assert placed["policy"].pool is placed["generation"].pool
        assert placed["policy"].worker_resources(1) == {
            "num_cpus_per_worker": 0.15,
            "num_gpus_per_worker": 0.0,
        }
    finally:
        placed["policy"].pool.remove()


def test_disaggregated_pools_run_concurrently(ray_cluster) -> None:
    placement = Placement(mode="disaggregated", pools={"policy": 1, "generation": 1}, cpus_per_bundle=0.25)
    placed = build_pools(placement, ["policy", "generation"])
    groups = {
        role: WorkerGroup(
            ProbeWorker,
            rp.pool,
            1,
            name=role,
            timeout_s=CALL_TIMEOUT_S,
            backend="none" if role == "generation" else None,
            **rp.worker_resources(1),
        )
        for role, rp in placed.items()
    }
    try:
        pending = {role: g.call("info") for role, g in groups.items()}
        infos = {role: groups[role].get(p)[0] for role, p in pending.items()}
        assert infos["policy"]["placement_group"] != infos["generation"]["placement_group"]
        assert infos["policy"]["distributed"] and not infos["generation"]["distributed"]
    finally:
        for role, group in groups.items():
            group.shutdown()
            placed[role].pool.remove()


def test_pool_that_cannot_fit_names_missing_resources(ray_cluster) -> None:
    with pytest.raises(PlacementTimeoutError, match=r"pool 'gpus'.*missing \{GPU: 2\}"):
        ResourcePool(2, {"GPU": 1, "CPU": 1}, name="gpus", timeout_s=1)


def test_call_past_its_timeout_names_role_and_rank(policy: WorkerGroup) -> None:
    with pytest.raises(
        WorkerGroupError, match=r"'policy' rank 1 \(actor ALIVE\).*did not finish within 0.5s"
    ) as err:
        policy.run("sleep_on", 1, 3.0, timeout_s=0.5)
    assert err.value.rank == 1 and err.value.recoverable and "resumes from run.dir" in str(err.value)
    policy.check_alive(timeout_s=0.5)  # busy is not dead


def test_worker_exception_is_not_recoverable(policy: WorkerGroup) -> None:
    with pytest.raises(WorkerGroupError, match=r"'policy' rank 0 .*fail raised ValueError: bad batch") as err:
        policy.run("fail")
    assert not err.value.recoverable


def test_killed_rank_fails_fast_and_restart_recovers(reference: WorkerGroup) -> None:
    old_pids = [i["pid"] for i in reference.run("info")]
    ray.kill(reference.actors[2])
    start = time.monotonic()
    with pytest.raises(WorkerGroupError, match=r"'reference' rank 2 \(actor DEAD\)") as err:
        reference.run("group_sums")
    assert time.monotonic() - start < CALL_TIMEOUT_S / 2  # reported from the dead actor, not a timeout
    assert err.value.recoverable
    with pytest.raises(WorkerGroupError, match="rank 2"):
        reference.check_alive()

    assert 2 in reference.restart()
    sums = reference.run("group_sums")
    assert [r["tp_sum"] for r in sums] == [1.0, 1.0, 5.0, 5.0]
    assert [r["dp_sum"] for r in sums] == [2.0, 4.0, 2.0, 4.0]
    infos = reference.run("info")
    assert infos[2]["pid"] != old_pids[2] and infos[0]["pid"] == old_pids[0]
    assert [i["setup_calls"] for i in infos] == [2, 2, 1, 2]  # setup reran everywhere on the new world


@pytest.mark.gpu
def test_nccl_groups_colocated_on_gpu_bundles(ray_cluster) -> None:
    gpus = torch.cuda.device_count()
    placement = Placement(num_bundles=gpus, gpus_per_bundle=1, cpus_per_bundle=1, strategy="STRICT_PACK")
    placed = build_pools(placement, ["policy", "reference"])
    dims = ParallelDims(dp=gpus, world_size=gpus)
    groups = [
        WorkerGroup(ProbeWorker, rp.pool, gpus, dims, name=role, timeout_s=120, **rp.worker_resources(gpus))
        for role, rp in placed.items()
    ]
    try:
        infos = [g.run("info") for g in groups]
        assert [g.backend for g in groups] == ["nccl", "nccl"]
        assert [i["device"] for i in infos[0]] == ["cuda:0"] * gpus  # each actor sees its own GPU as cuda:0
        gpu_ids = [[i["gpu_ids"] for i in group_infos] for group_infos in infos]
        assert gpu_ids[0] == gpu_ids[1] and len({tuple(ids) for ids in gpu_ids[0]}) == gpus  # colocated
        for group in groups:
            assert [r["dp_sum"] for r in group.run("group_sums")] == [float(sum(range(gpus)))] * gpus
        batch = {
            "x": torch.arange(4 * gpus, dtype=torch.float32).reshape(-1, 1),
            "ids": torch.arange(4 * gpus),
        }
        out = groups[0].run("double_rows", batch, 3.0, dispatch="dp")
        assert out["x"].device.type == "cpu" and torch.equal(out["x"], batch["x"] * 3)
    finally:
        for group in groups:
            group.shutdown()
        placed["policy"].pool.remove()
