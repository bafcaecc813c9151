"""``cspine synth OUT_DIR``: write a synthetic dataset in the exact RSNA 2022 layout."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "synth"
HELP = "write a synthetic RSNA-layout dataset (DICOM, NIfTI masks, CSVs) for demos and tests"
DESCRIPTION = (
    "Write a learnable synthetic cervical-spine CT dataset in the exact RSNA 2022 layout: "
    "train.csv, test.csv, sample_submission.csv, train_bounding_boxes.csv, "
    "train_images/<UID>/<n>.dcm, test_images/<UID>/<n>.dcm, segmentations/<UID>.nii. "
    "Same seed and options give identical pixels and CSVs. Re-running into the same folder "
    "resumes; a folder written with other options is refused unless --overwrite. The true "
    "test labels go to OUT_DIR/_synth_truth/test_labels.csv (not part of the RSNA layout). "
    "See docs/synth.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset root to write")
    parser.add_argument("--preset", choices=("tiny", "demo", "full"), default="demo",
                        help="size preset: tiny (tests, seconds), demo (make demo), full "
                             "(512² × ~300 slices, benchmarks)")
    parser.add_argument("--seed", type=int, default=0, help="master random seed")
    keep = argparse.SUPPRESS  # unset flags keep the preset's value
    parser.add_argument("--n-train", type=int, default=keep,
                        help="number of train studies (preset value)")
    parser.add_argument("--n-test", type=int, default=keep,
                        help="number of test studies (preset value)")
    parser.add_argument("--size", type=int, default=keep,
                        help="Rows = Columns in pixels (preset value); the field of view is "
                             "kept, so the pixel spacing scales with it")
    parser.add_argument("--max-slices", type=int, default=keep,
                        help="most slices per study (preset value)")
    parser.add_argument("--jpeg-fraction", type=float, default=keep,
                        help="share of studies written JPEG Lossless SV1 (preset: 0.3)")
    parser.add_argument("--mask-fraction", type=float, default=keep,
                        help="share of train studies with a NIfTI mask (preset value)")
    parser.add_argument("--box-fraction", type=float, default=keep,
                        help="share of positive train studies with bounding boxes")
    parser.add_argument("--reversed-fraction", type=float, default=keep,
                        help="share of studies numbered feet-first (preset: 0.1)")
    parser.add_argument("--prevalence", type=_prevalence, default=keep,
                        metavar="C1=P,...,patient_overall=P",
                        help="per-target positive rates (missing keys keep the preset's)")
    from common.synth.presets import SITES

    parser.add_argument("--site", choices=sorted(SITES), default=keep,
                        help="another hospital's profile: vendors, kernels, slice thickness, "
                             "pixel size, noise, bone HU calibration, contrast and patient "
                             "age/sex in the headers (common/synth/presets.py SITES); its slice "
                             "thicknesses suit the demo preset: with tiny add --max-slices 128")
    parser.add_argument("--workers", type=int, default=keep,
                        help="worker processes (preset: 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a synthetic dataset written with different options")
    parser.add_argument("--figure", type=Path, metavar="PNG",
                        help="also draw a sagittal + axial view with the aligned mask and a "
                             "crack of one study (docs/images/synth_example.png)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--test-types", type=_types, default=keep, metavar="T1,T2",
                        help="prediction types test.csv asks for per test study (default all "
                             "eight; e.g. C1 for the shape of the real public test.csv)")
    parser.add_argument("--test-without-images", type=int, default=keep, metavar="N",
                        help="also list N studies in test.csv that have no test_images/ folder")


def _types(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _prevalence(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{item!r}: {exc}") from exc
    return out


def run(args: argparse.Namespace) -> int:
    from common.synth import SynthStateError, generate

    names = ("n_train", "n_test", "size", "max_slices", "jpeg_fraction", "mask_fraction",
             "box_fraction", "reversed_fraction", "prevalence", "workers", "test_types",
             "test_without_images", "site")
    overrides = {n: getattr(args, n) for n in names if hasattr(args, n)}
    start = time.perf_counter()
    try:
        out = generate(args.out_dir, preset=args.preset, seed=args.seed,
                       overwrite=args.overwrite, progress=not args.no_progress, **overrides)
    except (SynthStateError, ValueError) as exc:
        print(f"cspine synth: {exc}", file=sys.stderr)
        return 2
    print(f"cspine synth: {out} is complete ({time.perf_counter() - start:.1f} s)")
    if args.figure is not None:
        from common.synth.figure import make_figure

        uid = make_figure(out, args.figure)
        print(f"cspine synth: figure of {uid} -> {args.figure}")
    return 0
