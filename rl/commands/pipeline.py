"""`rl pipeline CONFIG [overrides]`: training commands in a row from one config, with a report."""

from __future__ import annotations

import argparse

HELP = """Run several training commands in a row (e.g. pretrain -> sft -> dpo -> grpo -> distill -> quantize),
each stage starting from an earlier stage's output, and write a report (report.md, report.html,
curves.png) in run.dir. See configs/pipeline_tiny.yaml:

  run: {dir: runs/pipeline_tiny}
  stages:
    - {name: pretrain, kind: pretrain, config: configs/pretrain_tiny.yaml, overrides: {train.max_steps: 300}}
    - {name: sft, kind: sft, config: configs/sft_tiny.yaml}          # model.init_from: pretrain's output
    - {name: distill, kind: distill, config: configs/distill_tiny.yaml,
       from: sft, overrides: {student.init_from: '${stages.pretrain.output}'}}

kind: any training command; its input key (model.init_from; distill: teacher.init_from) is the output of
the nearest earlier stage that writes a language model, or of `from: NAME` (`from: null`: the stage's own
config). ${stages.NAME.output} / ${stages.NAME.dir} name a stage's output or run directory in any value.
Each stage runs in <run.dir>/<name>, in this process or on Ray as its config says.

Every stage is resolved and checked before the first one starts (one line, exit 2, nothing written).
Running the command again skips finished stages and resumes an interrupted one from its checkpoint.
`rl report RUN_DIR` rewrites the report (also while the pipeline runs)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="pretrain -> sft -> dpo -> grpo -> distill -> quantize (any stages) from one config, with a report",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML pipeline: run.dir and a list of stages")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the pipeline config")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="resolve and check every stage, print the plan, write nothing"
    )
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="as --check, and write run.dir/pipeline.yaml and run.dir/stages/NAME.yaml (each stage's config)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rl.pipeline import describe, plan, resolve_pipeline, run_pipeline, write_resolved

    pipeline = resolve_pipeline(args.config, args.overrides)
    if not (args.check or args.dry_run):
        return run_pipeline(pipeline)
    todo = plan(pipeline)
    if args.dry_run:
        write_resolved(pipeline)
    print(f"pipeline {pipeline.run_dir}: {len(pipeline.stages)} stages, every config valid")
    print("\n".join(describe(pipeline, todo)))
    if args.dry_run:
        print(f"resolved stage configs: {pipeline.run_dir / 'stages'}")
    return 0
