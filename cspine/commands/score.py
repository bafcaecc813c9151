"""``cspine score SOLUTION.csv SUBMISSION.csv``: the competition metric of a submission file."""

from __future__ import annotations

import argparse
import math
import sys

NAME = "score"
HELP = "score a submission (row_id,fractured) against labels in train.csv format"
DESCRIPTION = (
    "Print the RSNA 2022 weighted log loss of SUBMISSION (sample_submission format: "
    "row_id=<StudyInstanceUID>_<C1..C7|patient_overall>, fractured in [0,1]) against SOLUTION "
    "(train.csv format: StudyInstanceUID, patient_overall, C1..C7), and the per-target ROC AUC. "
    "The submission must hold exactly the 8 rows of every solution study. 'study' normalises "
    "the weighted loss per study and averages (primary); 'global' normalises over all rows. "
    "Exit status 2 when the files do not fit together.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("solution", metavar="SOLUTION.csv", help="labels in train.csv format")
    parser.add_argument("submission", metavar="SUBMISSION.csv",
                        help="predictions in sample_submission format (row_id,fractured)")
    parser.add_argument("--form", choices=("study", "global", "both"), default="both",
                        help="which normalisation of the weighted log loss to print")
    parser.add_argument("--eps", type=float, default=1e-15, help="probability clip bound")


def _check_rows(solution, sub) -> list[str]:
    """Problems with the submission's row_ids against the solution's studies."""
    import pandas as pd

    from common.labels import TARGETS

    expected = {f"{u}_{t}" for u in solution.index for t in TARGETS}
    got = sub["row_id"].astype(str)
    problems = []
    dup = got[got.duplicated()].tolist()
    if dup:
        problems.append(f"{len(dup)} duplicate row_ids, e.g. {dup[:3]}")
    missing = sorted(expected - set(got))
    extra = sorted(set(got) - expected)
    if missing:
        problems.append(f"{len(missing)} row_ids missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected row_ids, e.g. {extra[:3]}")
    numeric = pd.to_numeric(sub["fractured"], errors="coerce")
    bad = numeric.isna() | (numeric < 0) | (numeric > 1)
    if bad.any():
        first = sub.loc[bad[bad].index[0]]
        problems.append(f"{int(bad.sum())} values of 'fractured' are missing or outside [0, 1], "
                        f"e.g. {first['row_id']}={first['fractured']!r}")
    return problems


def run(args: argparse.Namespace) -> int:
    from common.labels import TARGETS
    from common.metric import MetricInputError, as_wide, auc_per_target, competition_loss, submission_to_wide
    from common.tables import TableError, read_csv

    try:
        solution = as_wide(read_csv(args.solution, dtype={"StudyInstanceUID": str}),
                           args.solution)
        sub = read_csv(args.submission, dtype={"row_id": str})
        for col in ("row_id", "fractured"):
            if col not in sub.columns:
                raise MetricInputError(f"{args.submission}: no column {col!r} (has "
                                       f"{list(sub.columns)}); expected row_id,fractured")
        problems = _check_rows(solution, sub)
        if problems:
            raise MetricInputError(f"{args.submission} does not fit {args.solution}: "
                                   + "; ".join(problems))
        pred = submission_to_wide(sub)
        forms = ("study", "global") if args.form == "both" else (args.form,)
        losses = {f: competition_loss(solution, pred, form=f, eps=args.eps) for f in forms}
        aucs = auc_per_target(solution, pred)
    except (MetricInputError, FileNotFoundError, TableError) as err:
        print(f"cspine score: error: {err}", file=sys.stderr)
        return 2
    print(f"studies: {len(solution)}  positive: {int(solution['patient_overall'].sum())}")
    for form, value in losses.items():
        print(f"competition_loss ({form}): {value:.4f}")
    print(f"{'target':<16} {'positives':>9} {'AUC':>7}")
    for t in TARGETS:
        print(f"{t:<16} {int(solution[t].sum()):>9} {_fmt(aucs[t]):>7}")
    print(f"{'mean C1-C7':<16} {'':>9} {_fmt(aucs['mean_vertebra']):>7}")
    print(f"{'pooled C1-C7':<16} {'':>9} {_fmt(aucs['pooled_vertebra']):>7}")
    return 0


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"
