"""`rl grpo CONFIG [key.sub=value ...]`: GRPO (and RLOO / REINFORCE++) from a YAML recipe."""

from __future__ import annotations

import argparse
import sys

from rl.config import load_config

HELP = """Train a policy with GRPO: sample rollout.n responses per prompt, score them with the
environment, and take clipped policy-gradient steps on group-relative advantages.

CONFIG is a YAML recipe (see configs/grpo_tiny.yaml, which starts from `rl pretrain
configs/pretrain_tiny.yaml`); overrides follow the config path, e.g. `train.max_steps=20
rollout.n=4 algorithm.loss.kl_coef=0.01 model.init_from=runs/pretrain_tiny`. The run directory gets
config.yaml, metrics.jsonl (reward, accuracy, KL, clip fraction, logprob gap, per-phase seconds),
TensorBoard events, checkpoints/step_N and hf/. Running the same command again with the same run.dir
resumes from the newest checkpoint in it.

Without a `placement` section and with parallel.* = 1 everything runs in this process. With a
`placement` section (or parallel.tp/pp/dp > 1) the run goes to Ray worker groups (rl/grpo_cluster.py):
  placement: {mode: colocated, num_bundles: 2}      policy workers generate on their own weights
  placement: {mode: disaggregated, pools: {policy: 2, generation: 1}, gpus_per_bundle: 1}
  failure: {max_restarts: 1}                          restart the groups and resume on a lost worker
  ray: {address: auto}                                attach to a running cluster (else a local one)"""


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
    from algorithms.grpo import run_grpo
    from rl.grpo_cluster import ClusterGRPOConfig, ClusterRunError, run_grpo_cluster

    cfg = load_config(ClusterGRPOConfig, args.config, args.overrides)
    on_ray = bool({"placement", "ray"} & cfg.model_fields_set) or cfg.parallel.world_size > 1
    if on_ray:
        try:
            metrics = run_grpo_cluster(
                cfg, resume_command=" ".join(["rl grpo", args.config, *args.overrides])
            )
        except ClusterRunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        metrics = run_grpo(cfg)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("reward/", "eval/"))}
    print(f"grpo finished: {cfg.run.dir} {shown}")
    return 0
