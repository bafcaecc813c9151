"""``cspine fit stage1|stage2 DATA --work WORK -c CONFIG``: train a stage unless it is done."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "fit"
OVERRIDES = True  # --trainer.max_epochs 3 etc.: passed to the stage's LightningCLI
HELP = "train stage 1 or the stage-2 folds, skipping, resuming or retiring earlier runs"
DESCRIPTION = (
    "Train stage 1 (WORK/stage1) or stage 2 (WORK/stage2/fold<k>, one fold after another) with "
    "the stage's LightningCLI, in a child process. Before each run its settings (the -c files "
    "and --section.key value overrides, read by the stage's own parser, without paths and "
    "logging) and the contents of its input tables (folds.csv, train.csv; for stage 2 the crop "
    "manifest) are hashed: a finished run with the same hash is skipped, an interrupted one "
    "resumes from checkpoints/last.ckpt, and a run made with anything else is moved aside to "
    "<run>.stale-<n>/ (never deleted) and trained again. make stage1-fit / stage2-fit call "
    "this.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=("stage1", "stage2"), help="which stage to train")
    parser.add_argument("data", type=Path, metavar="DATA", help="RSNA-layout dataset folder")
    parser.add_argument("--work", type=Path, required=True, help="training folder WORK")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="the stage's YAML (repeatable, later wins)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="stage 2: the folds to train, in this order")
    parser.add_argument("--jobs", type=int, default=2,
                        help="stage 1: processes that build the training cache")


def run(args: argparse.Namespace) -> int:
    from cspine.runs import fit_stage1, fit_stage2

    if args.stage == "stage1":
        return fit_stage1(args.data, args.work, args.config, args.overrides, jobs=args.jobs)
    return fit_stage2(args.data, args.work, args.config, args.folds, args.overrides)
