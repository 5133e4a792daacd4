"""`rl report RUN_DIR`: the report of a pipeline run directory, rewritten from what its stages logged."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="rewrite a pipeline's report (report.md, report.html, curves.png) from its stages' metrics",
        description="Rewrite RUN_DIR/report.md, report.html (self-contained) and curves.png of an `rl pipeline` "
        "run directory from each stage's metrics.jsonl, for a finished or a running pipeline.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the pipeline's run.dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rl.report import write_report

    path = write_report(args.run_dir)
    print(path.read_text(), end="")
    print(f"written: {path}, {path.with_suffix('.html')}")
    return 0
