"""The `rl` command line: one sub-command per module in rl/commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from core.errors import InputError

# Training commands come from one registry (rl/training.py); each other module in rl.commands exposes
# `register(subparsers)`. Every parser sets `func(args) -> int`.
TOOLS = ["pipeline", "report", "data", "convert", "bench", "generate", "submit", "job"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rl",
        description="tandem-rl: pretraining and post-training for LLMs on a Megatron-style parallel core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from rl import training

    training.register(sub)
    for name in TOOLS:
        importlib.import_module(f"rl.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        # Bad input: one line, exit code 2, before any work starts.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
