"""`rl pretrain CONFIG [key.sub=value ...]`: pretraining from a YAML recipe."""

from __future__ import annotations

import argparse

from rl.config import load_config

HELP = """Pretrain a model with next-token cross-entropy.

CONFIG is a YAML recipe (see configs/pretrain_tiny.yaml); overrides follow the config path,
e.g. `train.max_steps=50 optim.lr=1e-3 parallel.tp=2`. Running the same command again with the
same run.dir resumes from the newest checkpoint in it."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a model (next-token prediction)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from algorithms.pretrain import PretrainConfig, run_pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    run_pretrain(cfg)
    return 0
