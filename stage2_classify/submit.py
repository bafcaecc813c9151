"""``make submit``: score the test studies' crops with every fold model and write submission.csv.

Inputs: the stage-1 manifest (test rows, ``split == "test"``), the fold runs
``$WORK/stage2/fold<k>/run.json`` (their chosen checkpoints), ``$WORK/stage2/stacker.json`` (when the
rule is ``stacker``; written by ``make evaluate``) and ``$DATA`` (test.csv / sample_submission.csv
define the expected rows and their order).

Outputs: ``$WORK/submission.csv`` (``row_id,fractured``, the expected rows in their order, clipped),
``$WORK/stage2/submit_qc.csv`` (one row per test study: status, crops used, seconds) and
``$WORK/stage2/submit_timing.json``. A study without crops (stage 1 failed, unreadable images, not
in the manifest) gets the models' training prior and is flagged in the QC file.

Run: ``python -m stage2_classify.submit --work work/demo --data data/synth_demo``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from common.atomic import write_csv, write_json
from common.dataset import RSNADataset
from common.manifest import read_manifest
from common.metric import submission_to_wide, wide_to_submission
from stage2_classify.aggregate import (DEFAULT_CLIP, DEFAULT_RULE, RULES, Stacker, aggregate,
                                       crops_to_study)
from stage2_classify.inference import checkpoints_of_runs, ensemble_prior, load_models, score_rows
from stage2_classify.oof import fold_runs


def expected_rows(data_root: Path) -> tuple[list[str], list[str]]:
    """(row_ids in the scorer's order, study UIDs in first-appearance order)."""
    rows = RSNADataset(data_root).expected_submission_rows()
    uids = list(dict.fromkeys(r.split("_", 1)[0] for r in rows))
    return rows, uids


def study_status(rows: pd.DataFrame, scored: pd.DataFrame) -> str:
    """QC status of one study from its manifest rows and scored crops."""
    if rows.empty:
        return "prior:not_in_manifest"
    failed = rows["qc_status"].astype(str).str.startswith("failed")
    if failed.all():
        return "prior:" + str(rows["qc_status"].iloc[0])
    used = int(scored["prob"].notna().sum()) if len(scored) else 0
    if used == 0:
        return "prior:no_readable_crop"
    return "ok" if used == 7 else f"partial:{7 - used}_vertebrae_prior"


def submit(work: Path, data_root: Path, manifest: Path | None = None, rule: str = DEFAULT_RULE,
           clip: tuple[float, float] = DEFAULT_CLIP, out: Path | None = None,
           tta_flip: bool | None = None) -> pd.DataFrame:
    """Write the submission and its QC record; returns the submission frame."""
    manifest = manifest or work / "stage1" / "crops" / "vertebrae.csv"
    out = out or work / "submission.csv"
    row_ids, uids = expected_rows(data_root)
    m = read_manifest(manifest)
    m = m[m["study_uid"].isin(set(uids))]
    runs = fold_runs(work / "stage2")
    if not runs:
        raise FileNotFoundError(f"no fold runs under {work / 'stage2'} (fold<k>/run.json): "
                                f"run `make stage2-fit` first")
    models = load_models(checkpoints_of_runs(runs))
    prior = ensemble_prior(models)
    stacker = None
    if rule == "stacker":
        path = work / "stage2" / "stacker.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `make evaluate` (fits the stacker on "
                                    f"the OOF predictions) or pass --rule noisy_or")
        stacker = Stacker.load(path)
    crops, qc = [], []
    by_study = dict(tuple(m.groupby("study_uid")))
    for uid in tqdm(uids, desc="submit", unit="study"):
        start = time.perf_counter()
        rows = by_study.get(uid, m.iloc[:0])
        present = rows[rows["present"]]
        scored = score_rows(models, present, tta_flip=tta_flip, progress=False) if len(present) \
            else pd.DataFrame(columns=["study_uid", "vertebra", "prob", "error"])
        crops.append(scored)
        errors = "; ".join(e for e in scored.get("error", []) if e)
        qc.append({"StudyInstanceUID": uid, "status": study_status(rows, scored),
                   "crops_used": int(scored["prob"].notna().sum()) if len(scored) else 0,
                   "seconds": time.perf_counter() - start, "errors": errors})
    frame = pd.concat(crops, ignore_index=True) if crops else pd.DataFrame()
    frame = frame.dropna(subset=["prob"]) if len(frame) else frame
    wide = aggregate(crops_to_study(frame, uids, prior), rule, stacker, clip)
    sub = wide_to_submission(wide).set_index("row_id").loc[row_ids].reset_index()
    submission_to_wide(sub)  # the scorer's reader must accept it
    write_csv(out, sub)
    qc_frame = pd.DataFrame(qc)
    write_csv(work / "stage2" / "submit_qc.csv", qc_frame)
    secs = qc_frame["seconds"].to_numpy(float)
    write_json(work / "stage2" / "submit_timing.json", {
        "studies": len(uids), "models": len(models), "rule": rule,
        "stage2_seconds_per_study_mean": float(secs.mean()) if len(secs) else 0.0,
        "stage2_seconds_per_study_median": float(np.median(secs)) if len(secs) else 0.0,
        "studies_on_prior": int(qc_frame["status"].str.startswith("prior").sum())})
    flagged = qc_frame[qc_frame["status"] != "ok"]
    print(f"wrote {out}: {len(sub)} rows, {len(uids)} studies, {len(models)} fold models, "
          f"rule={rule}; {len(flagged)} studies flagged in {work / 'stage2' / 'submit_qc.csv'}")
    return sub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stage2_classify.submit",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder ($WORK)")
    parser.add_argument("--data", type=Path, required=True, help="RSNA-layout data folder ($DATA)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="crop manifest (default $WORK/stage1/crops/vertebrae.csv)")
    parser.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                        help=f"patient_overall rule (default {DEFAULT_RULE})")
    parser.add_argument("--clip", type=float, nargs=2, default=list(DEFAULT_CLIP),
                        metavar=("LO", "HI"), help="probability clip range (default 0.001 0.999)")
    parser.add_argument("--out", type=Path, default=None, help="default $WORK/submission.csv")
    parser.add_argument("--tta-flip", choices=("config", "on", "off"), default="config",
                        help="left-right flip TTA (default: as each model was configured)")
    args = parser.parse_args(argv)
    tta = None if args.tta_flip == "config" else args.tta_flip == "on"
    submit(args.work, args.data, args.manifest, args.rule, tuple(args.clip), args.out, tta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
