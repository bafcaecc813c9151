"""``cspine export-mask STUDY_DIR OUT.nii.gz (--ckpt CKPT | --mask MASK.nii.gz)``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "export-mask"
HELP = "write a study's stage-1 vertebra mask as NIfTI in the study's own DICOM geometry"
DESCRIPTION = (
    "Write the C1-C7 mask of one DICOM study (0 background, 1-7 = C1-C7, uint8) as NIfTI on the "
    "study's own voxel grid (X = column, Y = row, Z = slice sorted along the normal) with its "
    "RAS affine, so it opens aligned over the CT in ITK-SNAP or 3D Slicer. The mask is either "
    "predicted now from a stage-1 checkpoint (--ckpt; 'best'/'last' look in "
    "--work/stage1/checkpoints) or mapped from a mask already predicted on the model grid "
    "(--mask, e.g. a mask NIfTI on the model grid or another study grid). Exit status 2 on bad input.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_dir", type=Path, metavar="STUDY_DIR",
                        help="folder with the study's DICOM slices")
    parser.add_argument("out", type=Path, metavar="OUT.nii.gz", help="NIfTI file to write")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="stage-1 checkpoint path, or best/last (see --work)")
    src.add_argument("--mask", type=Path, help="a predicted mask NIfTI on any grid")
    parser.add_argument("--work", type=Path, default=Path("work/demo"),
                        help="training folder used to resolve --ckpt best/last")
    parser.add_argument("--lenient", action="store_true",
                        help="repair well-defined DICOM defects instead of refusing the series")
    parser.add_argument("--device", default="cpu", help="torch device for --ckpt (cpu, cuda)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from common.dicom_io import load_series
    from common.nifti_io import load_nifti, save_nifti

    try:
        volume = load_series(args.study_dir, lenient=args.lenient)
        if args.mask is not None:
            from common import geometry

            labels, affine = load_nifti(args.mask)
            mask, _ = geometry.labels_to_grid(labels.astype("uint8"), affine, volume.affine,
                                              volume.shape)
        else:
            from common.layout import WorkLayout
            from stage1_segment.inference import load_model, segment_volume
            from stage1_segment.runs import resolve_checkpoint

            ckpt = resolve_checkpoint(args.ckpt, WorkLayout(args.work).stage1_checkpoints)
            mask = segment_volume(load_model(ckpt, map_location=args.device), volume)
        save_nifti(args.out, mask.astype("uint8"), volume.affine)
    except (ValueError, OSError) as err:  # SeriesError / GeometryError are ValueErrors
        print(f"cspine export-mask: error: {err}", file=sys.stderr)
        return 2
    found = sorted(int(v) for v in set(mask.ravel().tolist()) - {0})
    print(f"wrote {args.out}: {mask.shape} labels {found} in {time.perf_counter() - t0:.1f} s")
    return 0
