"""``cspine validate DATA --work WORK``: external validation on a site's own labelled CTs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "validate"
HELP = "validate trained models on another site's labelled CTs: AUC/metric CIs, operating " \
       "points, calibration, subgroups, error review (HTML)"
DESCRIPTION = (
    "Run the trained models of WORK (through the same engine as `cspine predict` and "
    "`make submit`) on a labelled dataset that was not used for training: an RSNA-layout "
    "folder (train.csv + train_images/) or a CSV with study_dir or nifti_path, C1..C7, "
    "optional patient_overall and any subgroup columns. Writes OUT (default "
    "WORK/validation/<name>): predictions.csv, qc.csv (unreadable studies with their reason), "
    "metrics.json, roc.png, reliability.png, overviews/<UID>.png and index.html. AUC and the "
    "competition metric get 95 %% CIs from a patient-level bootstrap; sensitivity, "
    "specificity, PPV and NPV are given at the thresholds make evaluate chose on the OOF "
    "predictions (applied unchanged). Finished studies are skipped on a rerun.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from common.stats import OPERATING_POINTS

    parser.add_argument("data", type=Path, metavar="DATA",
                        help="RSNA-layout folder (train.csv + train_images/) or a CSV file")
    parser.add_argument("--work", type=Path, required=True,
                        help="training folder whose models are validated (needs make evaluate)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default WORK/validation/<dataset name>)")
    parser.add_argument("--compare", type=Path, default=None, metavar="WORK_B",
                        help="a second training folder scored on the same studies: paired "
                             "bootstrap differences in AUC and in the metric")
    parser.add_argument("--operating-point", choices=OPERATING_POINTS, default="sens90",
                        help="the OOF operating point whose false negatives/positives are "
                             "reviewed and which the subgroup table uses")
    parser.add_argument("--prevalence", type=float, default=0.06,
                        help="prevalence at which PPV and NPV are recomputed (ED: 0.04-0.09)")
    parser.add_argument("--recalibrate", type=float, default=None, metavar="SHARE",
                        help="fit Platt recalibration on this share of the studies (e.g. 0.5) "
                             "and report it on the others")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=20240, help="bootstrap seed")
    parser.add_argument("--min-subgroup", type=int, default=20,
                        help="smallest subgroup given an AUC (smaller ones: counts only)")
    parser.add_argument("--jobs", type=int, default=2, help="loader (decode) processes")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--lenient", action="store_true",
                        help="repair what is well defined in the DICOM series")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--dicom", action="store_true",
                        help="also write each study's DICOM SEG (C1-C7 on the source slices) and "
                             "SR (the eight probabilities, flagged at the operating point) into "
                             "OUT/dicom/<UID>/ (docs/dicom_output.md)")


def run(args: argparse.Namespace) -> int:
    from cspine.models import PredictError
    from cspine.validate import validate

    if args.replicates < 1000:
        print(f"cspine validate: note: {args.replicates} bootstrap replicates (1,000 or more "
              f"are recommended for reported intervals)", file=sys.stderr)
    try:
        m = validate(args.data, args.work, out=args.out, compare=args.compare,
                     operating_point=args.operating_point, prevalence=args.prevalence,
                     recalibrate=args.recalibrate, replicates=args.replicates, seed=args.seed,
                     min_subgroup=args.min_subgroup, jobs=args.jobs, device=args.device,
                     lenient=args.lenient, progress=not args.no_progress, dicom=args.dicom)
    except (PredictError, ValueError, OSError) as err:
        print(f"cspine validate: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(m))
    return 0


def format_summary(m: dict) -> str:
    """The printed summary of a validation."""
    from cspine.validate_report import ci

    lines = [f"validated {m['n_scored']} of {m['n_listed']} studies ({m['n_unreadable']} "
             f"unreadable) in {m['seconds']:.0f} s"]
    if m.get("n_implausible"):
        lines.append(f"WARNING: {m['n_implausible']} scored studies failed the anatomy check "
                     f"(implausible_segmentation): their probabilities are the models' prior")
    if m.get("auc"):
        a = m["auc"]
        op = m["operating_points"]["patient_overall"][m["operating_point"]]
        lines += [f"AUC patient_overall {ci(a['patient_overall'])}, C1-C7 pooled "
                  f"{ci(a['vertebrae_pooled'])}; metric {ci(m['comp_loss'], 4)}",
                  f"at {m['operating_point']} (OOF threshold {op['threshold']:.3f}): sensitivity "
                  f"{ci(op['site']['sensitivity'])}, specificity {ci(op['site']['specificity'])}"]
    lines.append(f"wrote {Path(m['out']) / 'index.html'}")
    return "\n".join(lines)
