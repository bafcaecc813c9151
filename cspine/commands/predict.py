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
    "probabilities are the models' prior, not their output. Exit status 2 on bad input "
    "(one-line error), 0 on success.")


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
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="flag vertebrae with probability >= this in the overview")
    parser.add_argument("--lenient", action="store_true",
                        help="repair what is well defined in the DICOM series (gaps, tilt, "
                             "duplicates) instead of refusing it")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--saliency", action="store_true",
                        help="show each flagged vertebra's axial slice of largest stage-2 "
                             "input-gradient saliency (a backward pass per fold model: seconds on "
                             "a CPU for DenseNet121) instead of its centre slice")
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
        doc = predict_study(args.study, args.out, loaded["engine"], threshold=args.threshold,
                            lenient=args.lenient, volume=volume, saliency=args.saliency)
    except PredictError as err:
        print(f"cspine predict: error: {err}", file=sys.stderr)
        return 2
    print(format_result(doc, args.out))
    print(f"cspine predict: done in {time.perf_counter() - t0:.1f} s (including start-up)")
    return 0
