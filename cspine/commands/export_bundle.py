"""``cspine export-bundle WORK OUT``: pack a run's checkpoints for ``cspine predict --bundle``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "export-bundle"
HELP = "copy a run's stage-1/stage-2 checkpoints, stacker and crop settings into one folder"
DESCRIPTION = (
    "Write OUT/ with stage1.ckpt, stage2_fold<k>.ckpt (each fold's chosen checkpoint; with "
    "--format onnx: stage1.onnx, stage2_fold<k>.onnx), "
    "stacker.json and bundle.json (crop settings, patient_overall rule and clip, the ONNX "
    "networks' pre/post-processing settings, provenance) from the "
    "training folder WORK; `cspine predict STUDY --out DIR --bundle OUT` then needs nothing "
    "else. An existing OUT is replaced only when the new bundle is complete.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, metavar="WORK", help="training folder (work/demo)")
    parser.add_argument("out", type=Path, metavar="OUT", help="bundle folder to write")
    parser.add_argument("--format", choices=("ckpt", "onnx"), default="ckpt",
                        help="ckpt: the checkpoints as they are; onnx: both stages' networks as "
                             "ONNX files (run by ONNX Runtime) with their pre/post-processing "
                             "settings in bundle.json")


def run(args: argparse.Namespace) -> int:
    from cspine.bundle import export_bundle
    from cspine.models import PredictError

    try:
        path = export_bundle(args.work, args.out, fmt=args.format)
    except (PredictError, ValueError, OSError) as err:
        print(f"cspine export-bundle: error: {err}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    print(f"wrote {path.parent} ({size:.1f} MB)")
    return 0
