"""``cspine align-mask STUDY_DIR MASK.nii OUT.nii.gz``: an RSNA mask on its study's DICOM grid."""

from __future__ import annotations

import argparse
import sys

NAME = "align-mask"
HELP = "resample an RSNA segmentation onto its study's DICOM grid (by both affines)"
DESCRIPTION = (
    "Load STUDY_DIR as in 'cspine convert', load MASK (segmentations/<UID>.nii: labels 1-7 = "
    "C1-C7, 8-19 = T1-T12, any integer dtype) and put it onto the CT grid through both images' "
    "affines in patient space: an exact index permutation for well-formed masks, nearest "
    "neighbour otherwise (--lenient only; strict mode rejects with mask_geometry). Writes OUT "
    "as uint8 classes (0 background, 1-7 = C1-C7, 8 = thoracic with --thoracic merge) with the "
    "CT's affine. Prints the alignment QC: the share of C1-C7 voxels at >= 150 HU (flagged "
    "below 0.45) and whether C1 lies above C7. Exit 1 on an error; a flagged mask is written "
    "and reported (exit 0).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_dir", metavar="STUDY_DIR", help="folder of the study's DICOM files")
    parser.add_argument("mask", metavar="MASK.nii", help="the RSNA segmentation NIfTI")
    parser.add_argument("out", metavar="OUT.nii.gz", help="output label NIfTI on the CT grid")
    parser.add_argument("--lenient", action="store_true",
                        help="repair the series and resample a non-permutation mask")
    parser.add_argument("--thoracic", choices=("background", "merge"), default="background",
                        help="T1-T12 (8-19) become background (0) or one class (8)")
    parser.add_argument("--workers", type=int, default=None, help="decoder processes")
    parser.add_argument("--qc", metavar="QC.json", default=None,
                        help="also write the series and alignment QC records as JSON")


def run(args: argparse.Namespace) -> int:
    from common.atomic import check_writable, write_json
    from common.dicom_io import SeriesError, load_series
    from common.geometry import GeometryError
    from common.labels import UnexpectedLabelError
    from common.nifti_io import NIFTI_SUFFIXES, align_mask, save_nifti

    check_writable(args.out, NIFTI_SUFFIXES)  # before any work: a bad path leaves nothing
    if args.qc:
        check_writable(args.qc)
    try:
        vol = load_series(args.study_dir, lenient=args.lenient, workers=args.workers)
        classes, qc = align_mask(vol, args.mask, thoracic=args.thoracic, lenient=args.lenient)
        save_nifti(args.out, classes, vol.affine)
    except (SeriesError, GeometryError, UnexpectedLabelError, FileNotFoundError) as err:
        print(f"cspine align-mask: error: {err}", file=sys.stderr)
        return 1
    if args.qc:
        write_json(args.qc, {"series": vol.qc, "alignment": qc})
    print(f"{args.out}: {classes.shape} on the CT grid, method {qc['method']}, labels "
          f"{qc['labels_present']}, bone fraction {qc['bone_fraction']}, C1 above C7: "
          f"{qc['c1_above_c7']}, status {qc['status']}")
    if qc["flags"]:
        print(f"  flags: {', '.join(qc['flags'])}")
    return 0
