"""``cspine report WORK``: the HTML report of a pipeline run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "report"
HELP = "write WORK/report/index.html: data census, stage-1 Dice + overlays, stage-2 metrics, QC"
DESCRIPTION = (
    "Build one self-contained HTML page (images embedded; the PNGs it makes are also written "
    "beside it) from the records of a pipeline run: data census (WORK/qc_data.csv), stage-1 "
    "validation Dice per vertebra and example overlays (WORK/stage1/), the stage-2 competition "
    "metric against the constant-prevalence baseline, AUC, ROC and calibration plots "
    "(WORK/metrics.json, WORK/report/*.png) and the failed and slowest studies from the QC "
    "records. Missing parts are shown as missing, with the make target that writes them.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, metavar="WORK", help="run folder (e.g. work/demo)")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (shown only)")


def run(args: argparse.Namespace) -> int:
    if not args.work.is_dir():
        print(f"cspine report: error: {args.work} is not a folder", file=sys.stderr)
        return 2
    from cspine.report import write_report

    path = write_report(args.work, args.data)
    print(f"wrote {path}")
    return 0
