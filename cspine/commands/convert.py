"""``cspine convert STUDY_DIR OUT.nii.gz``: one DICOM study folder → HU NIfTI with its geometry."""

from __future__ import annotations

import argparse
import sys

NAME = "convert"
HELP = "convert a DICOM study folder to an int16 HU NIfTI with correct geometry"
DESCRIPTION = (
    "Read STUDY_DIR (one folder of <n>.dcm CT slices) with the validating series reader and "
    "write OUT (.nii or .nii.gz) as int16 HU, axes (X, Y, Z) = (DICOM column, DICOM row, slice "
    "ascending along the slice normal), qform = sform = the voxel-to-RAS affine (code 1). "
    "Strict by default: a gap, duplicate position, second stack, gantry tilt, uneven spacing, "
    "mixed geometry, unreadable file or missing codec is an error (exit 1) naming the study, "
    "the file and the reason. --lenient repairs what is well defined and records it in the QC "
    "record (--qc).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_dir", metavar="STUDY_DIR", help="folder of one study's DICOM files")
    parser.add_argument("out", metavar="OUT.nii.gz", help="output NIfTI path (.nii or .nii.gz)")
    parser.add_argument("--lenient", action="store_true",
                        help="repair duplicates, extra stacks, gaps, uneven spacing and tilt")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoder processes (default: min(2, CPU count))")
    parser.add_argument("--qc", metavar="QC.json", default=None,
                        help="also write the study's QC record as JSON")


def run(args: argparse.Namespace) -> int:
    from common.atomic import check_writable, write_json
    from common.dicom_io import SeriesError, load_series
    from common.geometry import GeometryError
    from common.nifti_io import NIFTI_SUFFIXES, save_nifti

    check_writable(args.out, NIFTI_SUFFIXES)  # before any work: a bad path leaves nothing
    if args.qc:
        check_writable(args.qc)
    try:
        vol = load_series(args.study_dir, lenient=args.lenient, workers=args.workers)
    except SeriesError as err:
        print(f"cspine convert: error: {err}", file=sys.stderr)
        if args.qc:
            write_json(args.qc, err.qc)
        return 1
    try:
        save_nifti(args.out, vol.hu, vol.affine)
    except GeometryError as err:
        print(f"cspine convert: error: {err}", file=sys.stderr)
        return 1
    if args.qc:
        write_json(args.qc, vol.qc)
    qc = vol.qc
    print(f"{args.out}: {vol.shape} voxels of {[round(float(s), 4) for s in vol.spacing]} mm, "
          f"{qc['axcodes']}, HU {qc['hu_min']}..{qc['hu_max']}, status {qc['status']}, "
          f"decoder {qc['decoder']}, {qc['timings']['total_s']:.2f} s")
    for note in qc["repairs"] + qc["warnings"]:
        print(f"  note: {note}")
    return 0
