"""``cspine summary WORK``: the short printed summary of a pipeline run (end of ``make demo``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "summary"
HELP = "print a run's stage-1 Dice, competition metric vs baseline, AUC and output paths"
DESCRIPTION = (
    "Print the summary of a pipeline run folder: stage-1 validation Dice per vertebra "
    "(WORK/stage1/run.json), the stage-2 out-of-fold competition metric against the "
    "constant-prevalence baseline and the AUC per target (WORK/metrics.json), where the outputs "
    "are, and how to upload the offline W&B runs.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, metavar="WORK", help="run folder (e.g. work/demo)")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (unused; for "
                        "symmetry with the make targets)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="total wall time of the run, printed when given")


def run(args: argparse.Namespace) -> int:
    if not args.work.is_dir():
        print(f"cspine summary: error: {args.work} is not a folder", file=sys.stderr)
        return 2
    from cspine.summary import format_summary

    print(format_summary(args.work, args.seconds))
    return 0
