"""N Ray actors of one role that together form one torch.distributed world.

    pool = ResourcePool(2, {"CPU": 1}, name="policy")
    policy = WorkerGroup(PolicyWorker, pool, 4, ParallelDims(tp=2, world_size=4), (config,), name="policy")
    logprobs = policy.run("logprobs", batch, dispatch="dp")     # blocking, rows in batch order
    pending = policy.call("train", batch, dispatch="dp")        # futures: other roles run meanwhile
    metrics = policy.get(pending)

Placement: rank r goes to bundle r of the pool, or, with more ranks than bundles, to bundle
r // (world_size / num_bundles), so that tp neighbours share a bundle (a node).

Process groups: each actor's *default* process group is the role's world (gloo on CPU, NCCL on GPU), with
every parallel group from core.parallel.build_groups on top. This is what the core expects (its collectives
address peers by global rank). It rules out an in-process vLLM engine in a training actor: the engine
creates or adopts the default group (ENVIRONMENT.md). Generation therefore runs in its own worker group
with backend="none" (each engine owns its process), colocated on the same bundles when wanted.

Dispatch: "all" (same arguments everywhere, every rank's result), "rank0" (rank 0 only, its result),
"dp" (first argument split into dp shards, see dispatch.py; results of the output ranks joined in dp order).
Arguments and results travel as numpy (transport.py); each argument is put into the object store once and
shared by the ranks that receive it.

Failures: every call has a deadline. A dead actor, a call past its deadline or a worker exception raises
WorkerGroupError naming the role, the rank and the actor state, as soon as the first rank fails (the
others may be stuck in a collective with the dead rank); a rank's exception that is only the echo of a
peer's death (gloo: "Connection closed by peer") is reported as that peer's death. `restart()` replaces
dead or stuck actors and rebuilds the world on every rank; the driver then reloads the newest checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from core.errors import InputError
from core.parallel.dims import ParallelDims
from rl.cluster.dispatch import concat_results, dp_rank_of, output_ranks, split_batch
from rl.cluster.placement import ResourcePool
from rl.cluster.transport import from_transport, to_transport
from rl.cluster.worker import Worker

Dispatch = Literal["all", "dp", "rank0"]
RESUME_HINT = "rerun the same command: it resumes from run.dir's newest checkpoint"
# How long a rank's exception waits for a peer to be reported dead (see WorkerGroup._lost_peer).
_PEER_DEATH_GRACE_S = 5.0


class WorkerGroupError(RuntimeError):
    """A rank of a worker group died, timed out or raised. `recoverable`: the rank itself is fine to
    restart (death, timeout), as opposed to a bug in the called method that a restart would repeat."""

    def __init__(self, role: str, rank: int, state: str, reason: str, *, recoverable: bool = True) -> None:
        self.role, self.rank, self.state, self.recoverable = role, rank, state, recoverable
        hint = f"; {RESUME_HINT}" if recoverable else ""
        super().__init__(f"worker group {role!r} rank {rank} (actor {state}): {reason}{hint}")


@dataclass
class PendingCall:
    """An in-flight group call: one ObjectRef per rank that received it (`refs`, in rank order)."""

    method: str
    dispatch: Dispatch
    ref_by_rank: dict[int, ray.ObjectRef]
    result_ranks: list[int]  # whose results make up the answer, in answer order
    deadline: float  # time.monotonic() after which get() gives up
    timeout_s: float = field(repr=False)

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return [self.ref_by_rank[r] for r in sorted(self.ref_by_rank)]


def _short(error: BaseException) -> str:
    """First line of an error message (Ray's carry multi-line tracebacks and advice)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _actor_state(actor: ActorHandle) -> str:
    """The GCS's view of an actor (ALIVE, RESTARTING, DEAD, PENDING_CREATION), UNKNOWN if unavailable."""
    try:
        from ray._private.state import actors

        info = actors(actor_id=actor._actor_id.hex())
        return str(info.get("State", "UNKNOWN")) if info else "UNKNOWN"
    except Exception:  # a debugging API: never let it hide the real error
        return "UNKNOWN"


def _put(value: Any) -> Any:
    """Plain scalars travel inline; anything else goes into the object store once, shared by all ranks."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return ray.put(to_transport(value))


class WorkerGroup:
    """`world_size` actors of `worker_cls` (a Worker subclass) on `pool`, forming one distributed world."""

    def __init__(
        self,
        worker_cls: type[Worker],
        pool: ResourcePool,
        world_size: int,
        dims: ParallelDims | None = None,
        init_args: Sequence[Any] = (),
        *,
        init_kwargs: dict[str, Any] | None = None,
        backend: Literal["gloo", "nccl", "none"] | None = None,
        name: str = "worker",
        timeout_s: float = 600.0,
        num_cpus_per_worker: float | None = None,
        num_gpus_per_worker: float | None = None,
        env_vars: dict[str, str] | None = None,
        max_restarts: int = 0,
    ) -> None:
        self.name, self.pool, self.world_size, self.timeout_s = name, pool, world_size, timeout_s
        self.dims = dims or ParallelDims(world_size=world_size)
        self._per_bundle = self._check_layout()
        self.num_cpus = _default_share(num_cpus_per_worker, pool.bundle.get("CPU", 0.0), self._per_bundle)
        self.num_gpus = _default_share(num_gpus_per_worker, pool.bundle.get("GPU", 0.0), self._per_bundle)
        self.backend = backend or ("nccl" if self.num_gpus > 0 else "gloo")
        if self.backend == "nccl" and self._per_bundle > 1:
            raise InputError(
                f"worker group {name!r}: NCCL needs one GPU per rank, but {world_size} ranks share "
                f"{pool.num_bundles} bundles; give the pool {world_size} bundles"
            )
        self._init_args, self._init_kwargs = tuple(init_args), dict(init_kwargs or {})
        self._env_vars, self._max_restarts = dict(env_vars or {}), max_restarts
        # One thread per actor, the main one: an in-process vLLM engine and CUDA's per-thread current
        # device both want every call on the same (main) thread, so no concurrency groups.
        self._actor_cls = ray.remote(worker_cls)
        self.restarts = 0
        self.actors: list[ActorHandle] = [self._spawn(rank) for rank in range(world_size)]
        try:
            self._init_world(timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # ---- layout ------------------------------------------------------------------------------

    def _check_layout(self) -> int:
        """Ranks per bundle (1 when the pool has a bundle per rank); raises on layouts that do not fit."""
        if self.dims.world_size != self.world_size:
            raise InputError(
                f"worker group {self.name!r}: world_size={self.world_size} but dims.world_size={self.dims.world_size}"
            )
        bundles = self.pool.num_bundles
        if self.world_size <= bundles:
            return 1
        if self.world_size % bundles:
            raise InputError(
                f"worker group {self.name!r}: {self.world_size} ranks do not divide evenly over the "
                f"{bundles} bundles of pool {self.pool.name!r}"
            )
        return self.world_size // bundles

    def bundle_of(self, rank: int) -> int:
        return rank // self._per_bundle

    def _spawn(self, rank: int) -> ActorHandle:
        options: dict[str, Any] = dict(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            scheduling_strategy=self.pool.scheduling(self.bundle_of(rank)),
            max_restarts=self._max_restarts,
            max_task_retries=0,
        )
        if self._env_vars:
            options["runtime_env"] = {"env_vars": self._env_vars}
        return self._actor_cls.options(**options).remote(*self._init_args, **self._init_kwargs)

    # ---- world set-up ------------------------------------------------------------------------

    def _init_world(self, timeout_s: float) -> None:
        """Wait for the actors, rendezvous every rank into one world, then run setup() everywhere."""
        ranks = range(self.world_size)
        infos = self._gather({r: self.actors[r].ping.remote() for r in ranks}, "start", timeout_s)
        master_addr, port = self._rendezvous({r: info["node_id"] for r, info in infos.items()}, timeout_s)
        self._gather(
            {
                r: self.actors[r].init_distributed.remote(
                    self.name, r, self.dims, master_addr, port, self.backend, self.timeout_s
                )
                for r in ranks
            },
            "init_distributed",
            timeout_s,
        )
        self._gather({r: self.actors[r].setup.remote() for r in ranks}, "setup", timeout_s)

    def _rendezvous(self, node_ids: dict[int, str], timeout_s: float) -> tuple[str, int]:
        """Address of the world's TCP store: a free port on rank 0's node, reached at 127.0.0.1 when the
        whole world is on one node (no interface guessing), else at rank 0's node IP."""
        if self.backend == "none":
            return "", 0
        port = self._gather({0: self.actors[0].rendezvous_port.remote()}, "rendezvous", timeout_s)[0]
        if len(set(node_ids.values())) == 1:
            return "127.0.0.1", port
        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return addresses[node_ids[0]], port

    # ---- calls -------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        *args: Any,
        dispatch: Dispatch = "all",
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> PendingCall:
        """Start `method` on the group's ranks and return at once (see the module doc for `dispatch`).
        `dispatch` and `timeout_s` are this function's own keywords; other kwargs go to the method."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        shared_kwargs = {k: _put(v) for k, v in kwargs.items()}
        if dispatch == "dp":
            refs, result_ranks = self._call_dp(method, args, shared_kwargs)
        elif dispatch in ("all", "rank0"):
            shared_args = [_put(a) for a in args]
            result_ranks = list(range(self.world_size)) if dispatch == "all" else [0]
            refs = {
                r: self.actors[r].execute_dispatched.remote(method, True, *shared_args, **shared_kwargs)
                for r in result_ranks
            }
        else:
            raise InputError(f"dispatch={dispatch!r}: expected 'all', 'dp' or 'rank0'")
        return PendingCall(method, dispatch, refs, result_ranks, time.monotonic() + timeout_s, timeout_s)

    def _call_dp(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[int, ray.ObjectRef], list[int]]:
        if not args:
            raise InputError(f"dispatch='dp' splits the first argument of {method!r}: pass the batch first")
        shards = [ray.put(to_transport(s)) for s in split_batch(args[0], self.dims.dp)]
        rest = [_put(a) for a in args[1:]]
        outputs = output_ranks(self.dims)
        refs = {
            r: self.actors[r].execute_dispatched.remote(
                method, r in outputs, shards[dp_rank_of(self.dims, r)], *rest, **kwargs
            )
            for r in range(self.world_size)
        }
        return refs, outputs

    def get(self, pending: PendingCall) -> Any:
        """Wait for a call (until its deadline) and return its answer: "all" a list in rank order,
        "rank0" rank 0's result, "dp" the output ranks' results joined in dp order."""
        remaining = max(0.0, pending.deadline - time.monotonic())
        results = self._gather(pending.ref_by_rank, pending.method, remaining, timeout_s=pending.timeout_s)
        answer = [from_transport(results[r]) for r in pending.result_ranks]
        if pending.dispatch == "rank0":
            return answer[0]
        return concat_results(answer) if pending.dispatch == "dp" else answer

    def run(
        self,
        method: str,
        *args: Any,
        dispatch: Dispatch = "all",
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """call() then get(): blocking."""
        return self.get(self.call(method, *args, dispatch=dispatch, timeout_s=timeout_s, **kwargs))

    # ---- waiting and errors ------------------------------------------------------------------

    def _gather(
        self,
        ref_by_rank: dict[int, ray.ObjectRef],
        what: str,
        wait_s: float,
        *,
        timeout_s: float | None = None,
    ) -> dict[int, Any]:
        """Results by rank; raises WorkerGroupError at the first failed rank or when wait_s runs out."""
        deadline = time.monotonic() + wait_s
        pending = {ref: rank for rank, ref in ref_by_rank.items()}
        results: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(pending.values())
                limit = wait_s if timeout_s is None else timeout_s
                raise WorkerGroupError(
                    self.name,
                    late[0],
                    _actor_state(self.actors[late[0]]),
                    f"{what} did not finish within {limit:g}s (ranks still running: {late})",
                )
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except RayActorError as e:
                    raise self._lost(rank, what, e) from e
                except RayTaskError as e:
                    lost = self._lost_peer(pending, what, deadline)
                    if lost is not None:  # the exception is collateral damage of a peer's death
                        raise lost from e
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise WorkerGroupError(
                        self.name, rank, "ALIVE", f"{what} raised {_short(cause)}", recoverable=False
                    ) from e
        return results

    def _lost(self, rank: int, what: str, error: BaseException) -> WorkerGroupError:
        state = _actor_state(self.actors[rank])
        return WorkerGroupError(self.name, rank, state, f"actor lost during {what}: {_short(error)}")

    def _lost_peer(
        self, pending: dict[ray.ObjectRef, int], what: str, deadline: float
    ) -> WorkerGroupError | None:
        """After a rank raised: a dead peer, if there is one. A rank's collective fails as soon as a peer
        dies (gloo: "Connection closed by peer"), often before Ray reports the death, so the other ranks
        get a few seconds to report theirs; then the GCS is asked about every actor of the group."""
        grace_end = min(deadline, time.monotonic() + _PEER_DEATH_GRACE_S)
        while pending and (left := grace_end - time.monotonic()) > 0:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                break
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    return self._lost(rank, what, e)
                except RayTaskError:
                    pass
        for rank, actor in enumerate(self.actors):
            if _actor_state(actor) == "DEAD":
                return WorkerGroupError(self.name, rank, "DEAD", f"actor lost during {what}")
        return None

    # ---- health and recovery -----------------------------------------------------------------

    def check_alive(self, timeout_s: float = 1.0) -> None:
        """Raise WorkerGroupError naming the first dead rank, if any. A rank busy with a long call is
        alive: its ping waits in its queue, while a dead actor's ping fails at once."""
        for rank, reason in self._dead(timeout_s).items():
            raise WorkerGroupError(self.name, rank, _actor_state(self.actors[rank]), reason)

    def dead_ranks(self, timeout_s: float = 1.0) -> list[int]:
        """Ranks whose actor is gone: its ping fails within timeout_s or the GCS says DEAD."""
        return sorted(self._dead(timeout_s))

    def _dead(self, timeout_s: float) -> dict[int, str]:
        refs = {r: a.ping.remote() for r, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        dead = {}
        for rank, ref in refs.items():
            if ref not in ready:  # busy, or died so recently that its ping has not failed yet
                if _actor_state(self.actors[rank]) == "DEAD":
                    dead[rank] = "actor lost"
                continue
            try:
                ray.get(ref)
            except RayActorError as e:
                dead[rank] = f"actor lost: {_short(e)}"
        return dead

    def restart(self, timeout_s: float = 120.0) -> list[int]:
        """Replace dead actors, then rebuild the world (and rerun setup) on every rank. Survivors that
        cannot leave the old world within timeout_s (stuck in a call) are replaced too. Returns the
        replaced ranks. The caller reloads state (the newest checkpoint) afterwards."""
        dead = self.dead_ranks()
        self._replace(dead)  # new actors start (import torch ...) while the survivors leave the old world
        survivors = [r for r in range(self.world_size) if r not in dead]
        stuck = _failed_ranks({r: self.actors[r].destroy_distributed.remote() for r in survivors}, timeout_s)
        self._replace(stuck)
        self._init_world(timeout_s)
        self.restarts += 1
        return sorted(dead + stuck)

    def _replace(self, ranks: list[int]) -> None:
        for rank in ranks:
            ray.kill(self.actors[rank], no_restart=True)
            self.actors[rank] = self._spawn(rank)

    def shutdown(self) -> None:
        """Kill every actor of the group (the pool stays reserved for other groups)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __len__(self) -> int:
        return self.world_size

    def __repr__(self) -> str:
        return f"WorkerGroup({self.name!r}, world_size={self.world_size}, backend={self.backend}, pool={self.pool})"


def _failed_ranks(ref_by_rank: dict[int, ray.ObjectRef], timeout_s: float) -> list[int]:
    """Ranks whose call raised, whose actor died, or that did not answer within timeout_s."""
    if not ref_by_rank:
        return []
    ready, _ = ray.wait(list(ref_by_rank.values()), num_returns=len(ref_by_rank), timeout=timeout_s)
    failed = []
    for rank, ref in ref_by_rank.items():
        try:
            if ref not in ready:
                raise TimeoutError
            ray.get(ref)
        except (RayActorError, RayTaskError, TimeoutError):
            failed.append(rank)
    return failed


def _default_share(requested: float | None, per_bundle: float, ranks_per_bundle: int) -> float:
    """Requested resources per worker, or the bundle split evenly among the group's ranks on it."""
    if requested is not None:
        return requested
    return math.floor(per_bundle / ranks_per_bundle * 10_000) / 10_000
