"""``cspine submit DATA --work WORK``: the test-time engine over the test studies → submission."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "submit"
HELP = "run the whole test-time engine over the test studies and write submission.csv"
DESCRIPTION = (
    "Run stage 1, the crops and stage 2 (fold models averaged) on every test study of DATA, "
    "through the same engine as `cspine predict`. The patient_overall rule and the clip range "
    "are those `make evaluate` recorded in WORK/metrics.json unless --rule / --clip are given. "
    "Writes WORK/submission.csv (exactly the rows test.csv or sample_submission.csv lists, in "
    "their order), WORK/predict/<UID>/ (probabilities.json, vertebrae_mask.nii.gz, crops/) and "
    "WORK/stage2/submit_qc.csv. Finished studies are skipped while the models are unchanged.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stage2_classify.aggregate import RULES

    parser.add_argument("data", type=Path, metavar="DATA", help="RSNA-layout dataset folder")
    parser.add_argument("--work", type=Path, required=True, help="training folder WORK")
    parser.add_argument("--rule", choices=RULES, default=None,
                        help="patient_overall rule (default: the one make evaluate recorded)")
    parser.add_argument("--clip", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="probability clip range (default: the one make evaluate recorded)")
    parser.add_argument("--out", type=Path, default=None, help="default WORK/submission.csv")
    parser.add_argument("--jobs", type=int, default=2, help="loader (decode) processes")
    parser.add_argument("--shard", default=None, metavar="i/N",
                        help="process every N-th test study from i only (auto: from Slurm array "
                             "or torchrun variables); then run once without it to merge")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--if-worse-than-prior", choices=("refuse", "go-on", "prior"),
                        default="refuse",
                        help="when the rule's out-of-fold loss (metrics.json) does not beat the "
                             "constant prior: refuse (default), go-on (submit the model anyway) "
                             "or prior (submit the prior)")
    parser.add_argument("--dicom", action="store_true",
                        help="also write WORK/predict/<UID>/vertebrae_seg.dcm (DICOM SEG) and "
                             "report_sr.dcm (DICOM SR with the eight probabilities)")
    parser.add_argument("--tta-flip", choices=("config", "on", "off"), default="config",
                        help="stage-2 left-right flip TTA (default: as each model was trained)")
    from stage1_segment.anatomy import add_limits_argument

    add_limits_argument(parser)


def run(args: argparse.Namespace) -> int:
    from cspine.batch import parse_shard
    from cspine.models import PredictError
    from cspine.submit import submit
    from stage1_segment.anatomy import limits_from_args

    tta = None if args.tta_flip == "config" else args.tta_flip == "on"
    try:
        submit(args.work, args.data, rule=args.rule, clip=tuple(args.clip) if args.clip else None,
               out=args.out, jobs=args.jobs, shard=parse_shard(args.shard), device=args.device,
               tta_flip=tta, if_worse=args.if_worse_than_prior, dicom=args.dicom,
               anatomy_limits=limits_from_args(args))
    except (PredictError, ValueError, OSError) as err:
        print(f"cspine submit: error: {err}", file=sys.stderr)
        return 2
    return 0
