"""SPMD loops (pretrain, sft, dpo, rm) on Ray: every rank of the run is a TrainerWorker actor of one
worker group, placed by the config's `placement`, running the same EngineTrainer it would run when
spawned locally. The driver only waits; a lost worker (death, timeout) under failure.max_restarts
rebuilds the group and the ranks resume from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rl.cluster import WorkerGroup, WorkerGroupError
from rl.cluster.worker import Worker

logger = logging.getLogger(__name__)
RUN_TIMEOUT_S = 30 * 24 * 3600.0  # the whole fit is one call: its deadline is the run's, not a step's


class SPMDRunError(RuntimeError):
    """A worker failure the run could not (or may not) recover from; one line with how to resume."""


class TrainerWorker(Worker):
    """One rank: builds the loop's EngineTrainer on the group's process groups and runs it."""

    role = "trainer"

    def __init__(self, trainer_path: str, cfg_dict: dict[str, Any]) -> None:
        self.trainer_path, self.cfg_dict = trainer_path, cfg_dict

    def fit(self) -> dict[str, float]:
        from algorithms.engine_trainer import train_rank, trainer_class

        trainer_cls = trainer_class(self.trainer_path)
        cfg = trainer_cls.config_schema.model_validate(self.cfg_dict)
        return train_rank(trainer_cls, cfg, self.groups, self.rank)


def run_spmd_on_ray(trainer_cls: type, cfg: Any, resume: str) -> dict[str, float]:
    """Place parallel.world_size TrainerWorkers on the placement's pool and train (config.yaml written
    first, inputs already checked by the caller). Returns rank 0's last logged metrics."""
    from core.config import RayOptions, dump_config
    from rl.cluster import ResourcePool, init_ray, shutdown_ray

    placement = cfg.placement
    if placement is None or placement.mode != "colocated":
        from core.errors import InputError

        raise InputError(
            f"placement.mode={placement.mode if placement else None}: rl {trainer_cls.stage} runs one "
            "worker group (mode=colocated, placement.num_bundles bundles)"
        )
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    import ray

    r = cfg.ray or RayOptions()
    owns_ray = not ray.is_initialized()
    init_ray(r.address, r.num_cpus, num_gpus=r.num_gpus, namespace=r.namespace)
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
        group = WorkerGroup(
            TrainerWorker,
            pool,
            cfg.parallel.world_size,
            cfg.parallel.dims(),
            (path, cfg.model_dump(mode="json")),
            name=trainer_cls.stage,
            timeout_s=cfg.failure.restart_timeout_s,
        )
        restarts = 0
        while True:
            try:
                return group.run("fit", dispatch="all", timeout_s=RUN_TIMEOUT_S)[0]  # every rank trains
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
                group.restart(cfg.failure.restart_timeout_s)
    finally:
        if group is not None:
            group.shutdown()
        if pool is not None:
            pool.remove()
        if owns_ray:
            shutdown_ray()
