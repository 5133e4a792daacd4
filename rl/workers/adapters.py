"""The algorithms.interfaces Protocols over Ray worker groups, so GRPOTrainer drives a cluster unchanged.

    RayPolicy(group)      Policy:    logprobs / train split the batch over dp; save / load on every rank
    RayReference(group)   Reference: logprobs
    RayCritic(group)      values / train split the batch over dp; save / load on every rank
    RayRewardModel(group) scores split over dp
    RayGenerator(group)   Generator: requests split over the group's dp ranks (engine replicas, or the
                          policy's own dp shards when colocated); sleep / wake_up on every rank
    ColocatedWeightSync   the engines read the policy's parameters in place: only the version moves
    TransportWeightSync   policy ranks stream buckets to the engine workers over a weight transport
                          (process group, shared memory or the Ray object store), both sides called at
                          once and awaited together (a failure on either side surfaces at once, not at
                          the other side's deadline)

Every call has the group's deadline; a dead, stuck or failing rank raises rl.cluster.WorkerGroupError
naming the role and rank.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from rl.cluster import PendingCall, WorkerGroup
from rollout.types import GenerationRequest, GenerationResult

Batch = dict[str, torch.Tensor]


def _first_of_each(metrics: dict[str, Any]) -> dict[str, float]:
    """Train metrics are the same on every dp rank (PolicyModel reduces them): keep dp rank 0's."""
    return {k: float(v[0]) if isinstance(v, list) else float(v) for k, v in metrics.items()}


class RayReference:
    """Reference over a worker group of ReferenceWorker (or PolicyWorker) ranks."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        return self.group.run("logprobs", batch, with_entropy, dispatch="dp")


class RayBaseReference:
    """LoRA: the reference is the policy group's base model (adapters disabled on the same weights)."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        return self.group.run("base_logprobs", batch, dispatch="dp")


class RayPolicy(RayReference):
    """Policy over a worker group of PolicyWorker ranks (any tp x pp x dp layout)."""

    def train(self, batch: Batch) -> dict[str, float]:
        return _first_of_each(self.group.run("train", batch, dispatch="dp"))

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model from rank 0 through the object store (export; refit streams instead)."""
        state = self.group.run("hf_state", dispatch="all")[0]
        yield from state.items()

    def quantizer_state(self) -> dict[str, torch.Tensor]:
        """QAT: rank 0's quantizer buffers (data parallelism only: every rank holds the same)."""
        return self.group.run("quantizer_state", dispatch="rank0")

    def save(self, path: str | Path) -> None:
        self.group.run("save", str(path), dispatch="all")

    def load(self, path: str | Path) -> None:
        self.group.run("load", str(path), dispatch="all")

    def model_config(self) -> Any:
        return self.group.run("model_config", dispatch="rank0")

    def save_adapter(self, path: str | Path, lora: Any) -> None:
        self.group.run("save_adapter", str(path), lora, dispatch="all")


class RayCritic:
    """Critic over a worker group of CriticWorker ranks (any tp x pp x dp layout)."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    def values(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.group.run("values", batch, dispatch="dp")

    def train(self, batch: Batch) -> dict[str, float]:
        return _first_of_each(self.group.run("train", batch, dispatch="dp"))

    def save(self, path: str | Path) -> None:
        self.group.run("save", str(path), dispatch="all")

    def load(self, path: str | Path) -> None:
        self.group.run("load", str(path), dispatch="all")


class RayRewardModel:
    """Reward model over a worker group of RewardModelWorker ranks: scores (B,) split over dp."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    def scores(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.group.run("scores", batch, dispatch="dp")


class RayGenerator:
    """Generator over engine-hosting workers: GenerationWorker replicas or colocated PolicyWorkers."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    @property
    def weight_version(self) -> int:
        return min(self.group.run("weight_version", dispatch="all"))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        requests = list(requests)
        if len(requests) >= self.group.dims.dp:
            return self.group.run("generate", requests, dispatch="dp")
        # fewer requests than replicas: every rank runs them all (SPMD-safe for tp engines)
        return self.group.run("generate", requests, dispatch="all")[0]

    def update_weights(self, named_tensors: Iterator[tuple[str, torch.Tensor]], version: int) -> None:
        """Stream `named_tensors` from this process (the driver) to every engine worker over the object
        store, one bucket at a time (refit in a run goes policy -> engines instead: TransportWeightSync)."""
        from datetime import timedelta

        from rl.cluster.object_store_transport import ObjectStoreSender

        timeout_s = self.group.timeout_s
        sender = ObjectStoreSender(len(self.group), timeout=timedelta(seconds=timeout_s))
        try:
            receiving = self.group.call("receive_weights_from", sender.address, timeout_s, dispatch="all")
            sending = _in_thread(lambda: sender.send(named_tensors, version))
            self.group.get(receiving)  # a failing engine worker surfaces here, not at the sender's deadline
            sending()
        finally:
            sender.close()

    def sleep(self, level: int = 1) -> None:
        self.group.run("sleep", level, dispatch="all")

    def wake_up(self) -> None:
        self.group.run("wake_up", dispatch="all")

    def shutdown(self) -> None:
        """The cluster run owns the groups and shuts them down."""


class ColocatedWeightSync:
    """Policy workers host the engines on their own parameters (no copy): record the new version."""

    def __init__(self, policy: WorkerGroup) -> None:
        self.policy = policy

    def __call__(self, version: int) -> None:
        self.policy.run("use_current_weights", version, dispatch="all")


class TransportWeightSync:
    """Policy rank 0 streams the model (bucket by bucket) to every engine worker over a weight transport.

    `connect()` (again after a restart) opens the sender on policy rank 0 and the receivers on the engine
    workers; transport "process_group" (gloo / NCCL, any hosts), "shared_memory" (same host) or
    "object_store" (the Ray object store, any hosts). bucket_bytes bounds what is shipped at once."""

    def __init__(
        self,
        policy: WorkerGroup,
        generation: WorkerGroup,
        transport: str = "process_group",
        bucket_bytes: int = 256 << 20,
    ) -> None:
        self.policy, self.generation, self.transport = policy, generation, transport
        self.bucket_bytes = bucket_bytes

    def connect(self) -> None:
        timeout_s = self.policy.timeout_s
        address = self.policy.run(
            "open_weight_sender",
            len(self.generation),
            self.transport,
            timeout_s,
            self.bucket_bytes,
            dispatch="rank0",
        )
        self.generation.run("connect_weight_receiver", address, timeout_s, dispatch="all")

    def __call__(self, version: int) -> None:
        sending = self.policy.call("send_weights", version, dispatch="all")
        receiving = self.generation.call("receive_weights", dispatch="all")
        get_together([(self.policy, sending), (self.generation, receiving)])


def get_together(calls: list[tuple[WorkerGroup, PendingCall]]) -> list[Any]:
    """Answers of calls that depend on each other (two sides of a transfer). The first rank to fail, in
    any of the groups, is reported through its group (WorkerGroupError) without waiting for the others,
    which may be blocked on it until their deadline."""
    owner = {ref: (group, pending) for group, pending in calls for ref in pending.refs}
    waiting = list(owner)
    deadline = min(pending.deadline for _, pending in calls)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break  # past the deadline: each group's get below names its late rank
        group, pending = owner[ready[0]]
        try:
            ray.get(ready[0])
        except Exception:
            group.get(pending)  # raises WorkerGroupError naming the role and rank
    return [group.get(pending) for group, pending in calls]


def _in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start fn in a daemon thread; the returned callable joins it and returns (or raises) its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- re-raised by the join below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join
