"""The base class of every role's Ray actor (policy, reference, critic, reward, generation).

A worker is one process and one rank of its group's torch.distributed world. The group drives its
lifecycle: `init_distributed` (default process group + every parallel group of `dims`), then `setup`
(the role builds its model, optimizer, engine ...), then `execute` calls. Roles subclass Worker, build
their state in `setup` and keep methods thin: unpack the batch, call core/algorithms code, return
tensors or metrics.

Process groups: the training world is the actor's *default* process group (build_groups and the core's
collectives, which address peers by global rank, need that). vLLM's in-process engine also creates (or
adopts) the default group, so a generation engine must not share a process with a training world: it
runs in its own worker group with backend="none" (no torch.distributed world of ours), colocated on the
same bundles if wanted. See worker_group.py.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from core.parallel.dims import Groups, ParallelDims, build_groups
from rl.cluster.transport import from_transport, to_transport


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Worker:
    """One rank of a WorkerGroup. Subclasses may define __init__(*init_args) and override setup()."""

    role: str = "worker"
    rank: int = -1
    world_size: int = 0
    dims: ParallelDims | None = None
    groups: Groups | None = None  # None for backend="none" groups (generation engines own their world)
    device: torch.device = torch.device("cpu")

    # ---- what roles override -----------------------------------------------------------------

    def setup(self) -> None:
        """Build the role's state once the groups exist (collective: runs on every rank together).
        Runs again after WorkerGroup.restart(), with new groups: rebuild, do not reuse old state."""

    # ---- called by WorkerGroup -----------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """Where and what this worker is (queued behind a running call, like every method)."""
        context = ray.get_runtime_context()
        return {
            "role": self.role,
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "placement_group": context.get_placement_group_id(),
            "distributed": self.groups is not None,
        }

    def rendezvous_port(self) -> int:
        """A free TCP port on this node for the world's store (asked of rank 0)."""
        return _free_port()

    def init_distributed(
        self,
        role: str,
        rank: int,
        dims: ParallelDims,
        master_addr: str,
        master_port: int,
        backend: str,
        timeout_s: float,
    ) -> None:
        """Join the group's world as `rank` (collective) and build every parallel group of `dims`."""
        self.destroy_distributed()
        self.role, self.rank, self.dims, self.world_size = role, rank, dims, dims.world_size
        self.device = _local_device()
        if backend == "none":
            return
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=dims.world_size,
            timeout=timeout,
        )
        self.groups = build_groups(dims, rank, timeout=timeout)

    def destroy_distributed(self) -> None:
        self.groups = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def execute(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Call `method_name` with transport-decoded arguments and return its result encoded for transport."""
        return self.execute_dispatched(method_name, True, *args, **kwargs)

    def execute_dispatched(self, method_name: str, keep_result: bool, *args: Any, **kwargs: Any) -> Any:
        """execute(), but a rank whose result the group discards (dp dispatch, not an output rank)
        returns None instead of shipping a duplicate through the object store."""
        method = getattr(self, method_name, None)
        if method is None or not callable(method):
            raise AttributeError(
                f"{type(self).__name__} ({self.role} rank {self.rank}) has no method {method_name!r}"
            )
        result = method(*from_transport(args), **from_transport(kwargs))
        return to_transport(result) if keep_result else None

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return f"{type(self).__name__}({self.role}:{self.rank})"


def _local_device() -> torch.device:
    """cuda:0 when Ray gave this actor a GPU (it sets CUDA_VISIBLE_DEVICES to that GPU), else the CPU."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")
