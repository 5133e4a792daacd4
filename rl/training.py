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
from typing import Any

from core.errors import InputError

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
    if metrics is None:
        return 1
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(command.summary)}
    print(f"{command.name} finished: {cfg.run.dir} {shown}")
    return 0


def run_command(command: TrainingCommand, cfg: Any, resume: str) -> dict[str, float] | None:
    """Check every input, then run: in this process (with failure.max_restarts restarts from the newest
    checkpoint) or on Ray. None when the run stopped on a failure it could not recover from (said on
    stderr). A `run` command checks its inputs itself (once, in the place that builds from them)."""
    if command.run is not None:
        return _load(command.run)(cfg, resume)
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

    return with_restarts(lambda: run_spmd(trainer_cls, cfg), cfg.failure.max_restarts, resume)


def with_restarts(run: Any, max_restarts: int, resume: str) -> Any:
    """run(); on a crash (not bad input), up to max_restarts more times: each resumes from the newest
    complete checkpoint (checkpoints are atomic, so a crash never leaves a half-written one)."""
    from algorithms.trainer import RunDiverged

    for attempt in range(max_restarts + 1):
        try:
            return run()
        except (InputError, KeyboardInterrupt, RunDiverged):
            raise
        except Exception as e:
            if attempt == max_restarts:
                raise
            logger.warning(
                "run failed (%s); restart %d of %d from the newest checkpoint", e, attempt + 1, max_restarts
            )
    raise AssertionError("unreachable")
