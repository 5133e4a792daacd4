"""Where roles run: Ray placement groups ("pools") of bundles, and the placement config.

A bundle is the unit a worker is placed on: one GPU (plus some CPUs) on GPU clusters, one worker process'
worth of CPU on CPU machines. A pool reserves its bundles up front (so a run either gets all its
resources or fails fast, naming what is missing) and hands them to worker groups.

Modes:
- colocated: every role (policy, reference, generation, ...) shares one pool; on each bundle every role
  gets an equal fraction of its CPUs/GPUs so that all of them fit together. Each role still runs in its
  own actor (own process), see worker_group.py for why.
- disaggregated: one pool per role, of its own size; roles run concurrently on separate devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.config import Placement, Strategy
from core.errors import InputError


class PlacementTimeoutError(RuntimeError):
    """A pool's bundles could not be reserved in time; the message names the resources missing."""


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _missing(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}


class ResourcePool:
    """`num_bundles` copies of `bundle` reserved as one Ray placement group.

    strategy: STRICT_PACK (all on one node: required for NCCL over NVLink within a node), PACK (one node
    if possible), SPREAD / STRICT_SPREAD (across nodes). Blocks until the group is ready, at most
    timeout_s, then raises PlacementTimeoutError naming the missing resources (and frees the request).
    """

    def __init__(
        self,
        num_bundles: int,
        bundle: dict[str, float] | None = None,
        name: str = "pool",
        *,
        strategy: Strategy = "PACK",
        timeout_s: float = 120.0,
    ) -> None:
        if num_bundles < 1:
            raise InputError(f"pool {name!r}: num_bundles={num_bundles} must be >= 1")
        self.num_bundles = num_bundles
        self.bundle = dict(bundle or {"CPU": 1.0})
        self.name = name
        self.strategy = strategy
        self.placement_group: PlacementGroup = placement_group(
            [dict(self.bundle) for _ in range(num_bundles)], strategy=strategy, name=name
        )
        self._wait_ready(timeout_s)

    @property
    def total(self) -> dict[str, float]:
        return {k: v * self.num_bundles for k, v in self.bundle.items()}

    def _wait_ready(self, timeout_s: float) -> None:
        try:
            ray.get(self.placement_group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            message = self._shortage_message(timeout_s)
            remove_placement_group(self.placement_group)
            raise PlacementTimeoutError(message) from None

    def _shortage_message(self, timeout_s: float) -> str:
        cluster, free = ray.cluster_resources(), ray.available_resources()
        missing = _missing(self.total, cluster)
        where = "on one node " if self.strategy == "STRICT_PACK" else ""
        what = (
            f"missing {_fmt(missing)} in the whole cluster"
            if missing
            else f"busy: {_fmt(_missing(self.total, free))} of it is held by others, or no node fits the "
            f"{self.strategy} layout"
        )
        return (
            f"pool {self.name!r} could not reserve {self.num_bundles} x {_fmt(self.bundle)} = "
            f"{_fmt(self.total)} {where}within {timeout_s:g}s: {what} (cluster {_fmt(cluster)}, "
            f"free {_fmt(free)}). Use fewer/smaller bundles or a larger cluster."
        )

    def scheduling(self, bundle_index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling strategy that puts an actor on bundle `bundle_index` of this pool."""
        if not 0 <= bundle_index < self.num_bundles:
            raise IndexError(f"pool {self.name!r} has {self.num_bundles} bundles, asked for {bundle_index}")
        return PlacementGroupSchedulingStrategy(
            self.placement_group,
            placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=False,
        )

    def remove(self) -> None:
        """Release the bundles (actors still on them are killed by Ray)."""
        remove_placement_group(self.placement_group)

    def __repr__(self) -> str:
        return f"ResourcePool({self.name!r}, {self.num_bundles} x {_fmt(self.bundle)}, {self.strategy})"


@dataclass(frozen=True)
class RolePlacement:
    """A role's pool and the fraction of each bundle it may use (1.0 unless colocated with other roles)."""

    pool: ResourcePool
    share: float

    def worker_resources(self, world_size: int) -> dict[str, float]:
        """WorkerGroup kwargs giving `world_size` workers of this role their share of the pool's bundles."""
        per_bundle = max(1, math.ceil(world_size / self.pool.num_bundles))
        fraction = _round_down(self.share / per_bundle)
        return {
            "num_cpus_per_worker": _round_down(self.pool.bundle.get("CPU", 0.0) * fraction),
            "num_gpus_per_worker": _round_down(self.pool.bundle.get("GPU", 0.0) * fraction),
        }


def _round_down(x: float) -> float:
    """Ray accounts resources in units of 1e-4: round down so that the shares still fit the bundle."""
    return math.floor(x * 10_000) / 10_000


def placement_shortage(
    placement: Placement, cluster: dict[str, float], nodes: list[dict[str, float]]
) -> str | None:
    """What a cluster (its total resources and those of each node) can never give `placement`, waiting
    or not: the bundles of all its pools together, one bundle on some node, a STRICT_PACK pool on one node,
    a STRICT_SPREAD pool on distinct nodes. None when it fits."""
    pools = {"colocated": placement.num_bundles} if placement.mode == "colocated" else dict(placement.pools)
    bundle, count = placement.bundle, sum(pools.values())
    total = {k: v * count for k, v in bundle.items()}
    has = {k: cluster.get(k, 0.0) for k in sorted({"CPU", "GPU", *bundle})}
    if _missing(total, cluster):
        return (
            f"the placement needs {count} x {_fmt(bundle)} = {_fmt(total)} but the Ray cluster has {_fmt(has)} "
            f"in all (missing {_fmt(_missing(total, cluster))})"
        )
    fitting = [node for node in nodes if not _missing(bundle, node)]
    if not fitting:
        return f"no node of the Ray cluster fits one bundle {_fmt(bundle)} (cluster {_fmt(has)})"
    for name, size in pools.items():
        whole = {k: v * size for k, v in bundle.items()}
        if placement.strategy == "STRICT_PACK" and all(_missing(whole, node) for node in nodes):
            return f"pool {name!r} needs {_fmt(whole)} on one node (STRICT_PACK); no node of the Ray cluster has it"
        if placement.strategy == "STRICT_SPREAD" and len(fitting) < size:
            return f"pool {name!r} needs {size} nodes (STRICT_SPREAD) that fit {_fmt(bundle)}; the cluster has {len(fitting)}"
    return None


def check_placement_fits(placement: Placement) -> None:
    """InputError (one line) when the connected cluster can never hold the placement, before any pool or
    worker is made (resources that exist but are busy are waited for, placement.ready_timeout_s)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    shortage = placement_shortage(placement, ray.cluster_resources(), nodes)
    if shortage:
        raise InputError(
            f"{shortage}: use fewer or smaller bundles (placement.num_bundles / pools, gpus_per_bundle, "
            "cpus_per_bundle, parallel.*) or a larger cluster"
        )


def build_pools(placement: Placement, roles: list[str]) -> dict[str, RolePlacement]:
    """Reserve the pools `placement` asks for and say where each role goes.

    colocated: one pool of placement.num_bundles shared by all `roles`, each getting 1/len(roles) of every
    bundle. disaggregated: placement.pools[role] bundles per role, whole bundles.
    """
    if not roles:
        raise InputError("build_pools needs at least one role")
    if placement.mode == "colocated":
        pool = ResourcePool(
            placement.num_bundles,
            placement.bundle,
            name="colocated",
            strategy=placement.strategy,
            timeout_s=placement.ready_timeout_s,
        )
        return {role: RolePlacement(pool, share=1.0 / len(roles)) for role in roles}
    missing = [role for role in roles if role not in placement.pools]
    if missing:
        raise InputError(
            f"placement.pools has no size for {missing} (mode=disaggregated): add e.g. "
            f"placement.pools.{missing[0]}=1"
        )
    placed: dict[str, RolePlacement] = {}
    try:
        for role in roles:
            pool = ResourcePool(
                placement.pools[role],
                placement.bundle,
                name=role,
                strategy=placement.strategy,
                timeout_s=placement.ready_timeout_s,
            )
            placed[role] = RolePlacement(pool, share=1.0)
    except BaseException:
        for role_placement in placed.values():  # all or nothing: free what was reserved
            role_placement.pool.remove()
        raise
    return placed
