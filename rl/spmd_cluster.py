"""SPMD loops (pretrain, sft, dpo, rm) on Ray: every rank of the run is a TrainerWorker actor of one
worker group, placed by the config's `placement`, running the same EngineTrainer it would run when
spawned locally. The driver only waits and watches: every rank beats into a HeartbeatBoard actor
(core/parallel/heartbeat.py: its phase and step, and that its process runs), and a rank that dies, or
hangs past failure.hang_timeout_s, stops the group. Under failure.max_restarts the whole group is then
rebuilt (a hung rank's peers are stuck in its collectives: no survivor is worth keeping) and the ranks
resume from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from core.parallel.heartbeat import FAULT_ENV, RESTART_ENV, BeatTable, HangPolicy, find_hang, hang_policy
from rl.cluster import WorkerGroup, WorkerGroupError
from rl.cluster.worker import Worker

logger = logging.getLogger(__name__)
RUN_TIMEOUT_S = 30 * 24 * 3600.0  # the whole fit is one call: its deadline is the run's, not a step's
POLL_S = 1.0  # how often the driver looks at the heartbeats


# The beats of one attempt's ranks, timed on arrival (ranks may live on other nodes); no CPU of the pool.
HeartbeatBoard = ray.remote(num_cpus=0)(BeatTable)


class SPMDRunError(RuntimeError):
    """A worker failure the run could not (or may not) recover from; one line with how to resume."""


class TrainerWorker(Worker):
    """One rank: builds the loop's EngineTrainer on the group's process groups and runs it."""

    role = "trainer"

    def __init__(self, trainer_path: str, cfg_dict: dict[str, Any]) -> None:
        self.trainer_path, self.cfg_dict = trainer_path, cfg_dict

    def fit(self, board: Any = None) -> dict[str, float]:
        """The rank's whole run, beating into `board` (a HeartbeatBoard actor) when given."""
        from algorithms.engine_trainer import train_rank, trainer_class
        from core.parallel import heartbeat

        trainer_cls = trainer_class(self.trainer_path)
        cfg = trainer_cls.config_schema.model_validate(self.cfg_dict)
        if board is not None:
            heartbeat.install(BoardClient(board), self.rank)
        try:
            return train_rank(trainer_cls, cfg, self.groups, self.rank)
        finally:
            heartbeat.uninstall()


class BoardClient:
    """A rank's side of a HeartbeatBoard actor: calls sent without waiting (the board times them)."""

    def __init__(self, board: Any) -> None:
        self.board = board

    def beat(self, rank: int, pid: int, phase: str, step: int, warm: bool) -> None:
        self.board.beat.remote(rank, pid, phase, step, warm)

    def alive(self, rank: int) -> None:
        self.board.alive.remote(rank)


def run_spmd_on_ray(trainer_cls: type, cfg: Any, resume: str) -> dict[str, float]:
    """Place parallel.world_size TrainerWorkers on the placement's pool and train (config.yaml written
    first, inputs already checked by the caller). Returns rank 0's last logged metrics."""
    from core.config import RayOptions, dump_config
    from rl.cluster import ResourcePool, init_run_ray, shutdown_ray
    from rl.training import check_ray_layout

    placement = cfg.placement
    check_ray_layout(placement, cfg.ray, {"trainer": cfg.parallel.world_size}, spmd=trainer_cls.stage)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    owns_ray = init_run_ray(cfg.ray or RayOptions(), placement)  # the job's own cluster, if any
    pool = group = None
    try:
        pool = ResourcePool(
            placement.num_bundles,
            placement.bundle,
            name=trainer_cls.stage,
            strategy=placement.strategy,
            timeout_s=placement.ready_timeout_s,
        )
        path = f"{trainer_cls.__module__}:{trainer_cls.__qualname__}"

        def new_group(restarts: int) -> WorkerGroup:
            return WorkerGroup(
                TrainerWorker,
                pool,
                cfg.parallel.world_size,
                cfg.parallel.dims(),
                (path, cfg.model_dump(mode="json")),
                name=trainer_cls.stage,
                timeout_s=cfg.failure.restart_timeout_s,
                env_vars=_fault_env(restarts),
            )

        group, restarts = new_group(0), 0
        while True:
            try:
                return fit_watched(group, hang_policy(cfg.failure))  # every rank trains
            except WorkerGroupError as error:
                if not error.recoverable or restarts >= cfg.failure.max_restarts:
                    why = (
                        "a restart would repeat it"
                        if not error.recoverable
                        else "failure.max_restarts reached"
                    )
                    raise SPMDRunError(f"{error} ({why}). To resume: {resume}") from error
                restarts += 1
                logger.warning("%s; restart %d of %d", error, restarts, cfg.failure.max_restarts)
                group.shutdown()  # every rank: the others are stuck in the lost rank's collectives
                group = None
                group = new_group(restarts)
    finally:
        if group is not None:
            group.shutdown()
        if pool is not None:
            pool.remove()
        if owns_ray:
            shutdown_ray()


def fit_watched(group: WorkerGroup, hang: HangPolicy | None) -> dict[str, float]:
    """`fit` on every rank, watched: rank 0's last metrics, or WorkerGroupError as soon as a rank fails
    (WorkerGroup.get names it) or hangs (heartbeat.find_hang over a HeartbeatBoard of this attempt)."""
    board = HeartbeatBoard.remote(group.world_size)
    try:
        pending = group.call("fit", board, dispatch="all", timeout_s=RUN_TIMEOUT_S)
        refs = pending.refs  # rank order
        read = None  # the board read in flight
        while True:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
            if len(done) == len(refs) or any(_failed(ref) for ref in done):
                return group.get(pending)[0]
            if hang is None:
                continue
            read = read or board.read.remote()
            if not ray.wait([read], timeout=0)[0]:
                continue  # the board actor is still starting (a busy machine): no news yet, not an error
            beats = [b for b in ray.get(read) if refs[b.rank] not in done]  # ages as of the read
            read = None
            found = find_hang(beats, hang, group.world_size)  # ranks that finished are not waited for
            if found is not None:
                raise WorkerGroupError(group.name, found.beat.rank, "ALIVE", str(found))
    finally:
        ray.kill(board)


def _failed(ref: Any) -> bool:
    try:
        ray.get(ref, timeout=0)
    except Exception:
        return True
    return False


def _fault_env(restarts: int) -> dict[str, str]:
    """TANDEM_FAULT (core/parallel/heartbeat.py), when the driver has it, reaches the ranks with this
    attempt's restart count."""
    spec = os.environ.get(FAULT_ENV)
    return {FAULT_ENV: spec, RESTART_ENV: str(restarts)} if spec else {}
