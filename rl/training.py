"""The registry of training commands: one entry per loop produces its `rl COMMAND` subcommand, the schema
`rl submit` checks a config with, and how the command runs (in this process, on spawned ranks, or on
Ray worker groups when the config has a `placement`). Adding a loop adds one entry here.

    rl sft configs/sft_tiny.yaml train.max_steps=50                  # in this process
    rl sft configs/sft_tiny.yaml placement.num_bundles=2 parallel.dp=2   # a Ray worker group
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import InputError, StorageError

if TYPE_CHECKING:
    from core.config import Placement, RayOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingCommand:
    name: str
    help: str  # one line for `rl --help`
    description: str  # `rl NAME --help`
    schema: str  # "module:Class": the config schema (in-process and Ray alike)
    check: str | None = None  # "module:function": check(cfg), every input before anything is written
    trainer: str | None = None  # "module:Class": an SPMD EngineTrainer (runs locally or on Ray)
    run: str | None = None  # "module:function": run(cfg, resume) for the other loops (grpo), checking itself
    summary: tuple[str, ...] = ("eval/",)  # metric prefixes printed when the run ends

    def load_schema(self) -> type:
        return _load(self.schema)


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


_COMMON = """Running the same command again with the same run.dir resumes from the newest checkpoint in it.
Without a `placement` section the run happens in this process (parallel.* > 1: ranks spawned here with
torch.distributed); with one it runs on a Ray worker group:
  placement: {num_bundles: 2}        ray: {address: auto}        failure: {max_restarts: 1}"""

TRAINING_COMMANDS: dict[str, TrainingCommand] = {
    c.name: c
    for c in [
        TrainingCommand(
            "pretrain",
            "pretrain a model (next-token prediction)",
            "Pretrain a model with next-token cross-entropy on packed documents.\n\nCONFIG is a YAML recipe "
            "(see configs/pretrain_tiny.yaml); overrides follow the config path, e.g. `train.max_steps=50 "
            "optim.lr=1e-3 parallel.tp=2`. " + _COMMON,
            "algorithms.pretrain:PretrainConfig",
            "algorithms.pretrain:check_for_run",
            trainer="algorithms.pretrain:PretrainTrainer",
            summary=("train/loss", "eval/"),
        ),
        TrainingCommand(
            "sft",
            "supervised fine-tuning on chat or prompt/completion data",
            "Fine-tune a model on responses: chat rows ({messages}: loss on every assistant turn, rendered "
            "with the tokenizer's chat template) or prompt/completion rows (loss on the completion), from "
            ".jsonl, .parquet or a saved `datasets` directory, packed with per-document attention.\n\n"
            "CONFIG is a YAML recipe (see configs/sft_tiny.yaml, which starts from `rl pretrain "
            "configs/pretrain_tiny.yaml`); e.g. `train.max_steps=50 lora.rank=8 parallel.tp=2`. " + _COMMON,
            "algorithms.sft:SFTConfig",
            "algorithms.sft:check_for_run",
            trainer="algorithms.sft:SFTTrainer",
            summary=("train/loss", "eval/"),
        ),
        TrainingCommand(
            "distill",
            "knowledge distillation: a student learns a frozen teacher's token distributions",
            "Distill a teacher into a student (smaller, same tokenizer): forward KL, reverse KL or "
            "generalized JSD (algorithm.loss, .beta) at algorithm.temperature, optionally on the teacher's "
            "algorithm.top_k logits, plus algorithm.hard_label_weight x cross-entropy; off-policy on chat or "
            "prompt/completion data, on-policy (GKD) on the student's own samples for "
            "algorithm.on_policy_frac of the steps. Logs eval/kl (to the teacher) and eval/accuracy.\n\n"
            "CONFIG is a YAML recipe (see configs/distill_tiny.yaml, whose teacher is `rl pretrain "
            "configs/pretrain_tiny.yaml`). " + _COMMON,
            "algorithms.distill:DistillConfig",
            "algorithms.distill:check_for_run",
            trainer="algorithms.distill:DistillTrainer",
            summary=("train/divergence", "eval/"),
        ),
        TrainingCommand(
            "prune",
            "structured pruning (Minitron): a smaller model cut by activation importance",
            "Prune a trained model to a smaller shape (target.num_layers, .hidden_size, .ffn_hidden_size, "
            ".num_attention_heads), keeping the layers, heads, MLP channels and embedding channels that "
            "matter most on calibration rows (the SFT data formats). Writes model/ (our format, a "
            "model.init_from source for any stage, e.g. `rl distill` with the original as teacher) and hf/.\n\n"
            "CONFIG is a YAML recipe (see configs/prune_tiny.yaml). Runs in this process (no placement).",
            "algorithms.prune:PruneConfig",
            run="algorithms.prune:run_prune",
            summary=("prune/",),
        ),
        TrainingCommand(
            "dpo",
            "preference optimisation: DPO, IPO, robust/conservative DPO, SimPO, RPO",
            "Align a model on preference pairs (prompt, chosen, rejected; text or chat messages) with DPO or "
            "a variant (algorithm.loss: sigmoid, robust, ipo, hinge, simpo; algorithm.label_smoothing for "
            "conservative DPO; algorithm.rpo_alpha for an NLL term). The reference is the initial model: "
            "its logprobs precomputed once (algorithm.reference=precompute) or per batch (=batch; with LoRA "
            "the adapters are disabled instead of keeping a copy); algorithm.reference_free=true drops it.\n\n"
            "CONFIG is a YAML recipe (see configs/dpo_tiny.yaml). " + _COMMON,
            "algorithms.dpo:DPOConfig",
            "algorithms.dpo:check_for_run",
            trainer="algorithms.dpo:DPOTrainer",
            summary=("train/rewards/", "eval/"),
        ),
        TrainingCommand(
            "rm",
            "reward-model training (Bradley-Terry on preference pairs)",
            "Train a reward model: the starting LM with a value head, Bradley-Terry loss on preference pairs "
            "(algorithm.margin_key for a per-pair margin). Exports reward_model/ (our format), which "
            "`environment.name: reward_model` in rl grpo scores rollouts with.\n\n"
            "CONFIG is a YAML recipe (see configs/rm_tiny.yaml). " + _COMMON,
            "algorithms.rm:RMConfig",
            "algorithms.rm:check_for_run",
            trainer="algorithms.rm:RMTrainer",
            summary=("train/loss", "eval/"),
        ),
        TrainingCommand(
            "grpo",
            "RL fine-tuning with GRPO on a verifiable task",
            "Train a policy with GRPO: sample rollout.n responses per prompt, score them with the "
            "environment, and take clipped policy-gradient steps on group-relative advantages.\n\n"
            "CONFIG is a YAML recipe (see configs/grpo_tiny.yaml, which starts from `rl pretrain "
            "configs/pretrain_tiny.yaml`); e.g. `train.max_steps=20 rollout.n=4 "
            "algorithm.loss.kl_coef=0.01 model.init_from=runs/pretrain_tiny`. " + _COMMON + "\n"
            "GRPO with parallel.* > 1 always runs on Ray (colocated on one bundle when no placement):\n"
            "  placement: {mode: disaggregated, pools: {policy: 2, generation: 1}, gpus_per_bundle: 1}",
            "algorithms.grpo:GRPOConfig",
            run="rl.grpo_cluster:run_grpo_any",
            summary=("reward/", "eval/"),
        ),
        TrainingCommand(
            "ppo",
            "RL fine-tuning with PPO: a critic, GAE and the KL to the reference in the reward",
            "Train a policy with PPO (RLHF): sample rollout.n responses per prompt, score them (a verifier, a "
            "reward model from `rl rm`, or a verifier plus environment.reward_model.weight x a reward "
            "model), subtract algorithm.kl_in_reward.coef x KL(policy || reference) per token (fixed, or "
            "adaptive with kl_in_reward.target), estimate advantages with GAE (algorithm.gamma, .lam) on a "
            "critic's values, then train critic and policy for algorithm.ppo_epochs passes of mini-batches "
            "of train.global_batch_size sequences (critic.warmup: steps that train only the critic).\n\n"
            "CONFIG is a YAML recipe (see configs/ppo_tiny.yaml, which starts from `rl pretrain "
            "configs/pretrain_tiny.yaml` and `rl rm configs/rm_tiny.yaml`). " + _COMMON + "\n"
            "PPO with parallel.* > 1 always runs on Ray; the critic is a worker group of its own, on the "
            "policy's pool unless given one:\n"
            "  placement: {mode: disaggregated, pools: {policy: 1, generation: 1, critic: 1}}",
            "algorithms.ppo:PPOConfig",
            run="rl.ppo_cluster:run_ppo_any",
            summary=("reward/", "eval/"),
        ),
        TrainingCommand(
            "quantize",
            "post-training quantization with ModelOpt (fp8, int8_sq, int4_awq; w4a8_awq, nvfp4 on CUDA)",
            "Quantize a model with NVIDIA ModelOpt: calibrate quantize.formats on calibration.num_samples "
            "documents (calibration.path: text, prompt/completion or chat rows; or calibration.synthetic), "
            "evaluate held-out accuracy and perplexity before and after, and write per format "
            "run.dir/FORMAT/hf/ (ModelOpt's unified HF checkpoint, which serving engines load) and "
            "run.dir/FORMAT/modelopt_state.pth (mto.save of the fake-quantized model), with the table in "
            "run.dir/report.md. Runs in this process (no placement; parallel.* and placement are refused).\n\n"
            "CONFIG is a YAML recipe (see "
            "configs/quantize_tiny.yaml, which starts from `rl pretrain configs/pretrain_tiny.yaml`).",
            "algorithms.quantize:QuantizeConfig",
            run="algorithms.quantize:run_quantize",
            summary=("quantize/",),
        ),
    ]
}


def training_commands() -> list[str]:
    return list(TRAINING_COMMANDS)


def training_command(name: str) -> TrainingCommand:
    if name not in TRAINING_COMMANDS:
        raise InputError(f"'{name}' is not a training command; choose one of: {', '.join(TRAINING_COMMANDS)}")
    return TRAINING_COMMANDS[name]


def register(sub: argparse._SubParsersAction) -> None:
    """One subcommand per training command."""
    for command in TRAINING_COMMANDS.values():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("config", help="YAML recipe")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.set_defaults(func=_cli_run, training_command=command.name)


def _cli_run(args: argparse.Namespace) -> int:
    from rl.config import load_config

    command = TRAINING_COMMANDS[args.training_command]
    from algorithms.trainer import RunDiverged

    cfg = load_config(command.load_schema(), args.config, args.overrides)
    resume = " ".join(["rl", command.name, args.config, *args.overrides])
    try:
        metrics = run_command(command, cfg, resume)
    except RunDiverged as e:  # exit 3: the run stopped on its numbers (2: bad input, 1: a failure)
        print(f"error: {e}", file=sys.stderr)
        return 3
    except StorageError as e:  # exit 1, one line: a checkpoint or export could not be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    if metrics is None:
        return 1
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(command.summary)}
    print(f"{command.name} finished: {cfg.run.dir} {shown}")
    return 0


def run_command(command: TrainingCommand, cfg: Any, resume: str) -> dict[str, float] | None:
    """Check every input, then run: in this process (with failure.max_restarts restarts from the newest
    checkpoint) or on Ray. None when the run stopped on a failure it could not recover from (said on
    stderr). A `run` command checks its inputs itself (once, in the place that builds from them)."""
    from algorithms.qat import check_qat
    from algorithms.trainer import check_resume_config

    # First: a resume with changed keys must stop before the checks below write anything (pretrain's data
    # or a loop's synthetic rows); so must a `quantize:` section that cannot run here.
    check_resume_config(cfg, command.name)
    check_qat(cfg)
    if command.run is not None:
        return _load(command.run)(cfg, resume)
    if cfg.on_ray:
        check_ray_layout(cfg.placement, cfg.ray, {"trainer": cfg.parallel.world_size}, spmd=command.name)
    _load(command.check)(cfg)
    trainer_cls = _load(command.trainer)
    if cfg.on_ray:
        from rl.spmd_cluster import SPMDRunError, run_spmd_on_ray

        try:
            return run_spmd_on_ray(trainer_cls, cfg, resume)
        except SPMDRunError as e:
            print(f"error: {e}", file=sys.stderr)
            return None
    from algorithms.engine_trainer import run_spmd
    from core.parallel.launch import RankFailure

    try:
        return with_restarts(lambda: run_spmd(trainer_cls, cfg), cfg.failure.max_restarts, resume)
    except RankFailure as e:  # a rank died or hung, every rank was killed: one line, exit 1
        used = cfg.failure.max_restarts
        why = f" ({used} restart(s) used, failure.max_restarts reached)" if used else ""
        print(f"error: {e}{why}. To resume: {resume}", file=sys.stderr)
        return None


def check_ray_layout(
    placement: Placement | None, options: RayOptions | None, worlds: dict[str, int], spmd: str | None = None
) -> None:
    """InputError (one line) before Ray starts or anything is written, when the placement cannot hold the
    run: a torch.distributed group (role -> ranks) that does not fit its pool (Placement.check_world), or,
    when the run would start a local Ray cluster, a placement this machine cannot hold (its CPUs; its GPUs:
    gpus_per_bundle=1 on a machine without one). spmd: the SPMD loop's name (one worker group on a
    colocated pool, every bundle used). Whether an existing cluster holds the placement is checked once
    attached (rl/cluster/ray_utils.py: init_run_ray)."""
    import os

    from core.config import RayOptions

    if spmd is not None and (placement is None or placement.mode != "colocated"):
        raise InputError(
            f"placement.mode={placement.mode if placement else None}: rl {spmd} runs one worker group "
            "(placement.mode=colocated, placement.num_bundles bundles)"
        )
    for role, world_size in worlds.items():
        placement.check_world(role, world_size, every_bundle_used=spmd is not None)
    import ray

    from rl.cluster.placement import placement_shortage
    from rl.cluster.ray_utils import run_cluster_address

    options = options or RayOptions()
    if ray.is_initialized() or run_cluster_address(options.address) is not None:
        return
    import torch

    gpus = options.num_gpus if options.num_gpus is not None else torch.cuda.device_count()
    local = {"CPU": float(options.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}
    shortage = placement_shortage(placement, local, [local])
    if shortage:
        raise InputError(
            f"no ray.address, so this run would start a Ray cluster on this machine, and {shortage}: use fewer "
            "or smaller bundles (placement.*, parallel.*), ray.num_cpus, or ray.address of a larger cluster"
        )


def with_restarts(run: Any, max_restarts: int, resume: str) -> Any:
    """run(); on a crash or a hang (not bad input, a diverged run or a storage failure), up to max_restarts
    more times: each resumes from the newest complete checkpoint (checkpoints are atomic, so a crash never
    leaves a half-written one). Each attempt runs with TANDEM_RESTART_COUNT=attempt in the environment the
    ranks it spawns inherit (see core/parallel/heartbeat.py)."""
    import os

    from algorithms.trainer import RunDiverged
    from core.parallel.heartbeat import RESTART_ENV

    before = os.environ.get(RESTART_ENV)
    for attempt in range(max_restarts + 1):
        os.environ[RESTART_ENV] = str(attempt)
        try:
            return run()
        except (InputError, KeyboardInterrupt, RunDiverged, StorageError):
            raise
        except Exception as e:
            if attempt == max_restarts:
                raise
            logger.warning(
                "run failed (%s); restart %d of %d from the newest checkpoint", e, attempt + 1, max_restarts
            )
        finally:
            if before is None:
                os.environ.pop(RESTART_ENV, None)
            else:
                os.environ[RESTART_ENV] = before
    raise AssertionError("unreachable")
