"""GRPO on a Ray cluster: the same GRPOTrainer, driven over worker groups instead of in-process objects.

    cfg = load_config(ClusterGRPOConfig, "configs/grpo_tiny.yaml", ["placement.mode=disaggregated", ...])
    metrics = run_grpo_cluster(cfg)

Placement (config section `placement`, rl.cluster.Placement):
- colocated: one pool of placement.num_bundles bundles shared by every role. With rollout.engine=native
  the policy workers host the engines on their own parameters (no copy, no refit: the weight sync only
  records the version; requests are split over the policy's dp shards, tp ranks generate together).
  With rollout.engine=vllm the engines are separate actors on the same bundles (one per bundle),
  refitted over shared memory.
- disaggregated: placement.pools gives each role its own pool (policy, generation, and optionally
  reference; without a pool of its own the reference shares the policy's). One engine replica per
  generation bundle, refitted each step by the policy streaming buckets over a dedicated gloo / NCCL
  group (rollout.transport), or through the Ray object store (weight_transport=object_store: at most two
  buckets alive in it at once, rl/cluster/object_store_transport.py).
The policy (and reference) layout is `parallel` (tp x pp x dp ranks = parallel.world_size workers).

Failures (section `failure`): every worker call has a deadline (call_timeout_s). A worker that dies, is
killed, runs out of memory or hangs raises WorkerGroupError; with restarts left, every group is rebuilt
(dead ranks replaced, worlds re-formed, engines rebuilt), the trainer resumes from the newest complete
checkpoint in run.dir and goes on; otherwise the run stops with ClusterRunError naming the role, the
rank and how to resume. Checkpoints are atomic (GRPOTrainer.save), so a failure never leaves a half
written one behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from algorithms.grpo import GRPOConfig, GRPOTrainer, Inputs
from core.config import ParallelConfig
from rl.cluster import WorkerGroup, WorkerGroupError
from rl.cluster.placement import RolePlacement

logger = logging.getLogger(__name__)


ClusterGRPOConfig = GRPOConfig  # one schema for in-process and Ray runs (the name older code imports)


class ClusterRunError(RuntimeError):
    """The run stopped on a worker failure it could not (or may not) recover from. One line: the role,
    the rank, what happened, and how to resume."""

    def __init__(self, error: WorkerGroupError, restarts: int, resume: str, stage: str = "grpo") -> None:
        self.role, self.rank = error.role, error.rank
        reason = str(error).split("; rerun the same command")[0]
        if not error.recoverable:
            why = "an error in the worker's code: a restart would repeat it"
        else:
            why = f"{restarts} restart(s) used, failure.max_restarts reached"
        super().__init__(f"{stage} stopped: {reason} ({why}). To resume: {resume}")


class ClusterRun:
    """One GRPO run on Ray: `start` builds pools, worker groups and the trainer's Components; `run`
    trains to train.max_steps under the failure policy; `shutdown` releases everything.

    resume_command: what to tell the user to run to resume (default: "rerun the same command ...").
    A loop on GRPO's (rl/ppo_cluster.py) subclasses it: its trainer, its checks, more roles.
    """

    trainer_cls: type[GRPOTrainer] = GRPOTrainer
    layout_roles: tuple[str, ...] = ("policy", "reference")  # groups laid out as `parallel` (tp x pp x dp)
    # disaggregated: these share the policy's pool unless placement.pools gives them their own
    guest_roles: tuple[str, ...] = ("reference", "reward_model")

    def __init__(self, cfg: ClusterGRPOConfig, resume_command: str | None = None) -> None:
        self.cfg = cfg
        self.resume_command = resume_command or (
            f"rerun the same command; it resumes from the newest checkpoint in run.dir={cfg.run.dir}"
        )
        self.groups: dict[str, WorkerGroup] = {}
        self.pools: list[Any] = []
        self.parts: Any = None
        self.inputs: Inputs | None = None
        self.restarts = 0
        self._owns_ray = False
        self._transport: Any = None

    # ---- set-up ---------------------------------------------------------------------------------------

    def start(self) -> None:
        from core.config import dump_config
        from rl.cluster import init_run_ray
        from rl.training import check_ray_layout

        cfg = self.cfg
        self.inputs = self._check()  # every input and the layout, before Ray or any worker starts
        worlds = {role: cfg.parallel.world_size for role in self.layout_roles if role in self._roles()}
        check_ray_layout(cfg.cluster_placement, cfg.ray, worlds)
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        self._owns_ray = init_run_ray(cfg.cluster_ray, cfg.cluster_placement)  # the job's own cluster, if any
        try:
            self._build_groups(self._place())
            self.parts = self._components()
        except WorkerGroupError as error:  # a worker died or hung while starting
            self.shutdown()
            raise ClusterRunError(error, 0, self.resume_command, self.trainer_cls.stage) from error
        except BaseException:
            self.shutdown()
            raise

    def _check(self) -> Inputs:
        from algorithms.grpo import check_for_run

        return check_for_run(self.cfg)

    def _roles(self) -> list[str]:
        from algorithms.grpo import needs_reference

        roles = ["policy"]
        if needs_reference(self.cfg) and self.cfg.lora is None:  # LoRA: the policy's base is the reference
            roles.append("reference")
        if not self.cfg.colocated_engines:
            roles.append("generation")
        if self.cfg.environment.name == "reward_model":
            roles.append("reward_model")
        return roles

    def _place(self) -> dict[str, RolePlacement]:
        from rl.cluster import build_pools

        placement, roles = self.cfg.cluster_placement, self._roles()
        # Disaggregated: the reference and the reward model share the policy's pool unless given their own.
        guests = [r for r in self.guest_roles if r in roles and r not in placement.pools]
        if placement.mode == "colocated" or not guests:
            placed = build_pools(placement, roles)
        else:
            placed = build_pools(placement, [r for r in roles if r not in guests])
            share = RolePlacement(placed["policy"].pool, share=1.0 / (1 + len(guests)))
            for role in ["policy", *guests]:
                placed[role] = share
        self.pools = list({id(p.pool): p.pool for p in placed.values()}.values())
        return placed

    def _policy_spec(self, with_engine: bool) -> Any:
        from algorithms.evaluation import encode_prompt
        from algorithms.grpo import logprob_temperature
        from algorithms.policy import PolicyLossConfig
        from rl.workers import PolicySpec

        cfg = self.cfg
        calibration: tuple[tuple[int, ...], ...] = ()
        if cfg.quantize is not None:
            rows = self.inputs.train_rows[: cfg.quantize.calibration_samples]
            calibration = tuple(tuple(encode_prompt(self.inputs.tokenizer, r["prompt"])) for r in rows)
        return PolicySpec(
            init_from=cfg.model.init_from,
            parallel=cfg.parallel,
            loss=PolicyLossConfig(**cfg.algorithm.loss.model_dump()),
            optim=cfg.optim,
            precision=cfg.precision,
            micro_batch_size=cfg.train.micro_batch_size,
            total_optimizer_steps=cfg.policy_optimizer_steps,
            seed=cfg.train.seed,
            temperature=logprob_temperature(cfg),  # trainer / reference logprobs at the sampling one
            engine=self._engine_spec() if with_engine else None,
            compile_layers=cfg.train.compile,
            lora=cfg.lora,
            quantize=cfg.quantize,
            calibration_prompts=calibration,
        )

    def _engine_spec(self, hf_dir: str | None = None) -> Any:
        from rl.workers import EngineSpec

        cfg, inputs = self.cfg, self.inputs
        eos = inputs.tokenizer.eos_token_id
        return EngineSpec(
            kind=cfg.rollout.engine,
            init_from=cfg.model.init_from,
            max_model_len=inputs.max_model_len,
            max_num_seqs=cfg.rollout.max_num_seqs,
            seed=cfg.train.seed,
            eos_token_ids=(eos,) if eos is not None else (),
            tokenizer_dir=str(inputs.tokenizer_dir),
            hf_dir=hf_dir,
            kv_cache_gib=cfg.rollout.kv_cache_gib,
        )

    def _group(self, worker_cls: type, placed: RolePlacement, world: int, name: str, *args: Any, **kw: Any):
        from core.parallel.dims import ParallelDims

        dims = self.cfg.parallel.dims() if name in self.layout_roles else ParallelDims(world_size=world)
        return WorkerGroup(
            worker_cls,
            placed.pool,
            world,
            dims,
            args,
            name=name,
            timeout_s=self.cfg.failure.call_timeout_s,
            **placed.worker_resources(world),
            **kw,
        )

    def _build_groups(self, placed: dict[str, RolePlacement]) -> None:
        from rl.workers import (
            GenerationWorker,
            PolicyWorker,
            ReferenceWorker,
            RewardModelSpec,
            RewardModelWorker,
        )

        cfg, world = self.cfg, self.cfg.parallel.world_size
        self.groups["policy"] = self._group(
            PolicyWorker, placed["policy"], world, "policy", self._policy_spec(cfg.colocated_engines)
        )
        if "reference" in placed:
            self.groups["reference"] = self._group(
                ReferenceWorker, placed["reference"], world, "reference", self._policy_spec(False)
            )
        if "reward_model" in placed:  # one rank: scores are a forward pass of the prompts + responses
            spec = RewardModelSpec(
                init_from=str(self.inputs.environment.source.path),
                parallel=ParallelConfig(),
                precision=cfg.precision,
                micro_batch_size=cfg.train.micro_batch_size,
                pad_id=self.inputs.tokenizer.pad_token_id or 0,
            )
            self.groups["reward_model"] = self._group(
                RewardModelWorker, placed["reward_model"], 1, "reward_model", spec
            )
        if "generation" in placed:
            engines = placed["generation"].pool.num_bundles
            spec = self._engine_spec(self._engine_hf_dir())
            self.groups["generation"] = self._group(
                GenerationWorker,
                placed["generation"],
                engines,
                "generation",
                spec,
                cfg.precision,
                backend="none",
            )

    def _engine_hf_dir(self) -> str | None:
        """vLLM starts from an HF directory: the source itself, or the policy's initial weights written out."""
        from algorithms.grpo import write_hf
        from rl.workers import RayPolicy

        if self.cfg.rollout.engine != "vllm":
            return None
        if self.inputs.source.kind == "hf":
            return str(self.inputs.source.path)
        path = Path(self.cfg.run.dir) / "engine_init"
        policy = RayPolicy(self.groups["policy"])
        write_hf(policy.hf_weights(), policy.model_config(), path, self.inputs.tokenizer_dir)
        return str(path)

    def _components(self) -> Any:
        from algorithms.grpo import Components, needs_reference
        from rl.workers import (
            ColocatedWeightSync,
            RayBaseReference,
            RayGenerator,
            RayPolicy,
            RayReference,
            TransportWeightSync,
        )

        cfg, inputs = self.cfg, self.inputs
        policy = RayPolicy(self.groups["policy"])
        reference = RayReference(self.groups["reference"]) if "reference" in self.groups else None
        if cfg.lora is not None and needs_reference(cfg):
            reference = RayBaseReference(self.groups["policy"])
        if cfg.colocated_engines:
            generator = RayGenerator(self.groups["policy"])
            sync: Any = ColocatedWeightSync(self.groups["policy"])
        else:
            generator = RayGenerator(self.groups["generation"])
            transport = cfg.weight_transport
            if transport == "auto":
                transport = "shared_memory" if cfg.cluster_placement.mode == "colocated" else "process_group"
            sync = self._transport = TransportWeightSync(
                self.groups["policy"], self.groups["generation"], transport
            )
            sync.connect()
        from algorithms.rl_inputs import init_arch_name
        from rl.workers import RayRewardModel

        environment = inputs.environment
        if "reward_model" in self.groups:  # rollouts scored by the RewardModelWorker group
            scorer = RayRewardModel(self.groups["reward_model"])
            environment = cfg.environment.build(inputs.tokenizer, scorer=scorer)
        colocated = cfg.cluster_placement.mode == "colocated"
        return Components(
            policy,
            generator,
            sync,
            environment,
            inputs.tokenizer,
            reference,
            colocated,
            model_config=policy.model_config(),
            tokenizer_dir=inputs.tokenizer_dir,
            arch=init_arch_name(inputs.source),
        )

    # ---- running --------------------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """start (if not yet), fit under the failure policy, export hf/, shut down."""
        if self.parts is None:
            self.start()
        try:
            metrics = self._fit()
        finally:
            self.shutdown()
        self.trainer_cls.plot_run(Path(self.cfg.run.dir))
        return metrics

    def _fit(self) -> dict[str, float]:
        inputs = self.inputs
        while True:
            try:
                # resumes from the newest checkpoint in run.dir
                trainer = self.trainer_cls(self.cfg, self.parts, inputs.train_rows, inputs.eval_rows)
                metrics = trainer.fit()
                trainer.export()
                return metrics
            except WorkerGroupError as error:
                if not error.recoverable or self.restarts >= self.cfg.failure.max_restarts:
                    raise ClusterRunError(
                        error, self.restarts, self.resume_command, self.trainer_cls.stage
                    ) from error
                self.restarts += 1
                logger.warning(
                    "%s; restart %d of %d from the newest checkpoint",
                    error,
                    self.restarts,
                    self.cfg.failure.max_restarts,
                )
                self.restart()

    def restart(self) -> None:
        """Rebuild every group (dead or stuck ranks replaced, worlds re-formed, setup rerun: models from
        the initial weights, engines fresh at version 0) and reconnect the weight transport. The trainer
        built next loads the newest checkpoint."""
        try:
            for group in self.groups.values():
                group.restart(self.cfg.failure.restart_timeout_s)
            if self._transport is not None:
                self._transport.connect()
        except WorkerGroupError as error:
            raise ClusterRunError(
                error, self.restarts, self.resume_command, self.trainer_cls.stage
            ) from error

    def shutdown(self) -> None:
        from rl.cluster import shutdown_ray

        for group in self.groups.values():
            group.shutdown()
        self.groups = {}
        for pool in self.pools:
            pool.remove()
        self.pools = []
        if self._owns_ray:
            shutdown_ray()
            self._owns_ray = False


def run_grpo_cluster(cfg: ClusterGRPOConfig, resume_command: str | None = None) -> dict[str, float]:
    """Checks every input, starts (or attaches to) Ray, builds the worker groups `cfg.placement` asks for,
    trains to train.max_steps with GRPOTrainer (resuming from run.dir), exports hf/, returns the last
    logged metrics. Raises ClusterRunError (one line: role, rank, how to resume) on a failure it may
    not recover from, InputError on bad input before anything starts."""
    return ClusterRun(cfg, resume_command).run()


def run_rl_any(
    cfg: GRPOConfig,
    resume_command: str,
    run_local: Callable[[Any], dict[str, float]],
    cluster_cls: type[ClusterRun] = ClusterRun,
) -> dict[str, float] | None:
    """`rl grpo` / `rl ppo`: on Ray (`cluster_cls`) when the config says so (None after a failure it could
    not recover from, said on stderr), else `run_local` in this process with failure.max_restarts
    restarts from the newest checkpoint."""
    import sys

    from rl.training import with_restarts

    if not cfg.on_ray:
        return with_restarts(lambda: run_local(cfg), cfg.failure.max_restarts, resume_command)
    try:
        return cluster_cls(cfg, resume_command).run()
    except ClusterRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def run_grpo_any(cfg: GRPOConfig, resume_command: str) -> dict[str, float] | None:
    """`rl grpo` (see run_rl_any)."""
    from algorithms.grpo import run_grpo

    return run_rl_any(cfg, resume_command, run_grpo)
