"""`rl grpo CONFIG [key.sub=value ...]`: GRPO (and RLOO / REINFORCE++) from a YAML recipe."""

from __future__ import annotations

import argparse

from rl.config import load_config

HELP = """Train a policy with GRPO: sample rollout.n responses per prompt, score them with the
environment, and take clipped policy-gradient steps on group-relative advantages.

CONFIG is a YAML recipe (see configs/grpo_tiny.yaml, which starts from `rl pretrain
configs/pretrain_tiny.yaml`); overrides follow the config path, e.g. `train.max_steps=20
rollout.n=4 algorithm.loss.kl_coef=0.01 model.init_from=runs/pretrain_tiny`. The run directory gets
config.yaml, metrics.jsonl (reward, accuracy, KL, clip fraction, logprob gap, per-phase seconds),
TensorBoard events, checkpoints/step_N and hf/. Running the same command again with the same run.dir
resumes from the newest checkpoint in it."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grpo",
        help="RL fine-tuning with GRPO on a verifiable task",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algorithms.grpo import GRPOConfig, run_grpo

    cfg = load_config(GRPOConfig, args.config, args.overrides)
    metrics = run_grpo(cfg)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("reward/", "eval/"))}
    print(f"grpo finished: {cfg.run.dir} {shown}")
    return 0
