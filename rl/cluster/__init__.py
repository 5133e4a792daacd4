"""Ray orchestration: clusters, placement pools, and worker groups that form torch.distributed worlds."""

from rl.cluster.placement import Placement, PlacementTimeoutError, ResourcePool, RolePlacement, build_pools
from rl.cluster.ray_utils import init_ray, init_run_ray, shutdown_ray
from rl.cluster.transport import TensorPayload, from_transport, to_transport
from rl.cluster.worker import Worker
from rl.cluster.worker_group import PendingCall, WorkerGroup, WorkerGroupError

__all__ = [
    "PendingCall",
    "Placement",
    "PlacementTimeoutError",
    "ResourcePool",
    "RolePlacement",
    "TensorPayload",
    "Worker",
    "WorkerGroup",
    "WorkerGroupError",
    "build_pools",
    "from_transport",
    "init_ray",
    "init_run_ray",
    "shutdown_ray",
    "to_transport",
]
