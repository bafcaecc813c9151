"""``cspine crops DATA --work WORK -c STAGE1.yaml``: stage-2 training crops through the engine."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "crops"
OVERRIDES = True  # --crops.margin_mm 6 etc.: the stage-1 parser reads them
HELP = "stage-1 part of the test-time engine over the train studies: crops + the stage-2 manifest"
DESCRIPTION = (
    "Segment every train study with the stage-1 model and cut one crop per vertebra from the "
    "full-resolution CT, through the same engine as `cspine predict` and `cspine submit`. "
    "Writes WORK/stage1/crops/<UID>_<C#>.npz, the manifest WORK/stage1/crops/vertebrae.csv, "
    "WORK/stage1/masks/<UID>.nii.gz (labels in the study's DICOM geometry) and "
    "WORK/stage1/crops/qc_crops.csv. Studies already cropped with the same stage-1 model and "
    "crop settings are skipped; a study decoded by `make stage1-prepare` is read from "
    "WORK/cache/volumes instead of being decoded again. The crop settings are the crops group "
    "of the stage-1 config, read by the stage's own parser: -c files and --section.key value "
    "overrides (e.g. --crops.margin_mm 6, --data.lenient true) mean what they mean for "
    "`python -m stage1_segment fit`.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, metavar="DATA", help="RSNA-layout dataset folder")
    parser.add_argument("--work", type=Path, required=True, help="output root WORK")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="stage-1 YAML (repeatable, later wins; its crops: section gives "
                             "the settings)")
    parser.add_argument("--stage1-ckpt", default="best",
                        help="best / last (in WORK/stage1/checkpoints) or a checkpoint path")
    parser.add_argument("--jobs", type=int, default=2, help="loader (decode) processes")
    parser.add_argument("--shard", default=None, metavar="i/N",
                        help="process every N-th study from i only (auto: from Slurm array or "
                             "torchrun variables); then run once without it to write the "
                             "manifest")
    parser.add_argument("--device", default="cpu", help="torch device of the network")


def run(args: argparse.Namespace) -> int:
    from cspine.batch import parse_shard
    from cspine.train_crops import crop_settings, make_crops, summary_line

    t0 = time.perf_counter()
    try:
        shard = parse_shard(args.shard)
        cfg = crop_settings(args.config, args.data, args.work, args.overrides)
        manifest = make_crops(args.data, args.work, cfg, stage1_ckpt=args.stage1_ckpt,
                              jobs=args.jobs, shard=shard, device=args.device)
    except (ValueError, OSError) as err:
        print(f"cspine crops: error: {err}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(summary_line(manifest, time.perf_counter() - t0))
    return 0
