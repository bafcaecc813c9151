"""``cspine predict STUDY --out OUT``: fracture probabilities, vertebra mask and overview PNG."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

NAME = "predict"
HELP = "predict one study (DICOM folder or NIfTI CT): probabilities, vertebra mask, overview PNG"
DESCRIPTION = (
    "Run stage 1 (C1-C7 segmentation), the crops and stage 2 (fracture classifier, fold models "
    "averaged) on one study: a folder of DICOM slices (one series) or a NIfTI CT in HU. Writes "
    "OUT/probabilities.json (C1..C7 and patient_overall, timings, versions), "
    "OUT/vertebrae_mask.nii.gz (0 background, 1-7 = C1-C7, on the input's own voxel grid and "
    "affine: opens aligned over the CT in ITK-SNAP or 3D Slicer) and OUT/overview.png (sagittal "
    "view with every vertebra labelled with its probability, plus the axial slice through each "
    "flagged vertebra). Models: --work (a training folder, default work/demo), --bundle (from "
    "`cspine export-bundle`) or explicit --stage1-ckpt/--stage2-ckpt. Outputs appear only when "
    "complete. A segmentation that fails the anatomy check (C1-C7 in order down one column, adult "
    "sizes, on bone) is reported as implausible_segmentation with its reasons, and the "
    "probabilities are the models' prior, not their output. --cam draws the stage-2 "
    "class-activation map of each flagged vertebra on the overview (--cam-nifti also writes it "
    "as a NIfTI); --dicom also writes a DICOM SEG of the mask and a DICOM SR of the "
    "probabilities (a DICOM input only: for a NIfTI input a warning, the other outputs are "
    "written). Exit status 2 on bad input (one-line error), 0 on success.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", type=Path, metavar="STUDY",
                        help="folder of one study's DICOM slices, or a .nii/.nii.gz CT in HU")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR",
                        help="output folder (created; existing outputs in it are replaced)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--work", type=Path, default=None,
                     help="training folder with stage1/ and stage2/ (default: work/demo)")
    src.add_argument("--bundle", type=Path, default=None,
                     help="model bundle folder written by `cspine export-bundle`")
    parser.add_argument("--stage1-ckpt", type=Path, default=None,
                        help="stage-1 checkpoint (overrides the one from --work/--bundle)")
    parser.add_argument("--stage2-ckpt", type=Path, action="append", default=None,
                        help="stage-2 checkpoint; repeat for several folds (overrides --work)")
    from stage2_classify.aggregate import RULES

    parser.add_argument("--rule", default=None, choices=RULES,
                        help="patient_overall rule (default: the one make evaluate recorded in "
                             "WORK/metrics.json, or the bundle's)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="operating point: flag vertebrae with probability >= this (default: "
                             "the operating_point in WORK/metrics.json, else 0.5)")
    parser.add_argument("--lenient", action="store_true",
                        help="repair what is well defined in the DICOM series (gaps, tilt, "
                             "duplicates) instead of refusing it")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--cam", nargs="?", const="gradcam", default=None,
                        choices=("gradcam", "gradcam++"),
                        help="draw the stage-2 class-activation map (GradCAM, or gradcam++) of "
                             "each flagged vertebra on the overview, with its axial slice of "
                             "highest activation (a forward and backward pass per fold model and "
                             "flagged vertebra)")
    parser.add_argument("--cam-nifti", action="store_true",
                        help="also write the --cam map (implies --cam) as "
                             "OUT/cam_heatmap.nii.gz (uint8 0-255) in the input's geometry")
    parser.add_argument("--saliency", action="store_true",
                        help="deprecated: the same as --cam")
    parser.add_argument("--dicom", action="store_true",
                        help="also write OUT/vertebrae_seg.dcm (DICOM SEG, one segment per "
                             "vertebra, on the source slices) and OUT/report_sr.dcm (DICOM SR "
                             "with the eight probabilities); needs a DICOM study folder")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    from stage1_segment.anatomy import add_limits_argument

    add_limits_argument(parser)


def _spec(args: argparse.Namespace):
    from cspine.models import ModelSpec, models_from_bundle, models_from_work

    if args.bundle is not None:
        spec = models_from_bundle(args.bundle)
        if args.rule:
            spec = dataclasses.replace(spec, rule=args.rule)  # __post_init__ checks the stacker
    elif args.stage1_ckpt is not None and args.stage2_ckpt and args.work is None:
        spec = ModelSpec(stage1=args.stage1_ckpt, stage2=list(args.stage2_ckpt),
                         rule=args.rule or ModelSpec.rule, source="command line")
    else:
        spec = models_from_work(args.work or Path("work/demo"), rule=args.rule)
    if args.stage1_ckpt is not None:
        spec.stage1 = args.stage1_ckpt
    if args.stage2_ckpt:
        spec.stage2 = list(args.stage2_ckpt)
    for path in [spec.stage1, *spec.stage2]:
        if not Path(path).is_file():
            from cspine.models import PredictError

            raise PredictError(f"checkpoint {path} not found")
    return spec


def _threshold(args: argparse.Namespace) -> tuple[float, str]:
    """The operating point and its source (``--threshold``, ``metrics.json`` or ``default``)."""
    from cspine.models import DEFAULT_THRESHOLD, operating_point

    if args.threshold is not None:
        return float(args.threshold), "--threshold"
    if args.bundle is not None:
        return DEFAULT_THRESHOLD, "default"
    return operating_point(args.work or Path("work/demo"))


def run(args: argparse.Namespace) -> int:
    import threading

    from cspine.engine import StudyEngine
    from cspine.predict import PredictError, format_result, load_input, predict_study
    from stage1_segment.anatomy import limits_from_args

    t0 = time.perf_counter()
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        spec = _spec(args)
        limits = limits_from_args(args)
        # the models load in a thread while the study decodes (in the decoder's processes)
        loaded: dict = {}

        def load_models() -> None:
            try:
                loaded["engine"] = StudyEngine.from_spec(spec, device=args.device,
                                                          anatomy_limits=limits)
            except BaseException as exc:  # noqa: BLE001 — re-raised in the main thread
                loaded["error"] = exc

        loader = threading.Thread(target=load_models, daemon=True)
        loader.start()
        volume = load_input(args.study, lenient=args.lenient)
        volume.qc["load_seconds"] = time.perf_counter() - t0
        loader.join()
        if "error" in loaded:
            raise loaded["error"]
        threshold, source = _threshold(args)
        cam = args.cam or ("gradcam" if args.saliency or args.cam_nifti else None)
        doc = predict_study(args.study, args.out, loaded["engine"], threshold=threshold,
                            lenient=args.lenient, volume=volume, cam=cam,
                            cam_nifti=args.cam_nifti, dicom=args.dicom,
                            threshold_source=source)
    except PredictError as err:
        print(f"cspine predict: error: {err}", file=sys.stderr)
        return 2
    for line in doc.get("warnings", []):
        print(f"cspine predict: warning: {line}", file=sys.stderr)
    print(format_result(doc, args.out))
    print(f"cspine predict: done in {time.perf_counter() - t0:.1f} s (including start-up)")
    return 0
