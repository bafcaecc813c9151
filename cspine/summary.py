"""Read the records of a pipeline run (``WORK``) and print the short end-of-demo summary.

What a run folder holds (written by the stage targets; every one is optional here):

* ``WORK/stage1/run.json`` (:mod:`common.run_record`): ``metrics`` with ``val/dice_C1`` …
  ``val/dice_mean`` (validation fold
  of the best stage-1 checkpoint) and the resolved ``config`` (``data.val_fold``);
* ``WORK/metrics.json``: stage-2 out-of-fold competition metric (``comp_loss``,
  ``comp_loss_global``), ``baseline_prevalence``, ``rules`` and ``auc`` per target;
* ``WORK/submission.csv``, ``WORK/oof.csv``, ``WORK/report/index.html``;
* the offline W&B runs under ``WORK/stage1/wandb`` and ``WORK/stage2/fold<k>/wandb``;
* the QC records of the steps that load DICOM (``WORK/stage1/qc_prepare.csv``,
  ``WORK/stage1/crops/qc_crops.csv``, ``WORK/stage2/submit_qc.csv``), whose ``volume`` column
  says whether a step decoded the study (``decoded``), read it from the volume cache
  (``cache``) or found its outputs current (``done``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from common.labels import OVERALL, TARGETS, VERTEBRAE
from common.layout import WorkLayout


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage1_dice(work: str | os.PathLike) -> dict[str, Any] | None:
    """Stage-1 validation Dice per vertebra from ``WORK/stage1/run.json``.

    Returns:
        ``{"dice": {C1..C7: float}, "mean": float, "fold": int | None, "checkpoint": str}``, or
        None when stage 1 has not finished a fit.
    """
    run = _json(WorkLayout(work).stage1_run)
    val = (run or {}).get("metrics") or (run or {}).get("best_val")  # best_val: older runs
    if not val:
        return None
    dice = {v: float(val[f"val/dice_{v}"]) for v in VERTEBRAE if f"val/dice_{v}" in val}
    config = run.get("config") or {}
    config = config.get("fit", config)  # the LightningCLI dump is keyed by subcommand
    fold = (config.get("data") or {}).get("val_fold")
    mean = val.get("val/dice_mean", sum(dice.values()) / len(dice) if dice else math.nan)
    return {"dice": dice, "mean": float(mean), "fold": fold,
            "checkpoint": run.get("checkpoint") or run.get("best_checkpoint", ""),
            "epochs": run.get("epochs")}


def stage2_metrics(work: str | os.PathLike) -> dict[str, Any] | None:
    """``WORK/metrics.json`` (written by ``make evaluate``), or None."""
    return _json(WorkLayout(work).metrics)


def wandb_runs(work: str | os.PathLike) -> list[Path]:
    """Offline W&B run folders of both stages (``offline-run-*``), oldest first."""
    work = Path(work)
    layout = WorkLayout(work)
    runs = list((layout.stage1 / "wandb").glob("offline-run-*"))
    runs += list(layout.stage2.glob("fold*/wandb/offline-run-*"))
    runs += list((work / "wandb").glob("offline-run-*"))
    return sorted(runs, key=lambda p: p.name)


def outputs(work: str | os.PathLike) -> dict[str, Path]:
    """The run's main output files that exist."""
    work = Path(work)
    layout = WorkLayout(work)
    cands = {"submission": layout.submission, "oof": layout.oof, "metrics": layout.metrics,
             "report": layout.report / "index.html",
             "stage1 checkpoints": layout.stage1_checkpoints,
             "stage2 checkpoints": layout.stage2, "crop manifest": layout.manifest}
    return {k: p for k, p in cands.items() if p.exists()}


#: (QC record under WORK, its study column) of every step that loads a study's DICOM.
LOADING_STEPS = (("stage1/qc_prepare.csv", "study_uid"), ("stage1/crops/qc_crops.csv", "study_uid"),
                 ("stage2/submit_qc.csv", "StudyInstanceUID"))


def decode_counts(work: str | os.PathLike) -> dict[str, int]:
    """Full DICOM decodes per study in the run's QC records (``volume == "decoded"``).

    Returns:
        study UID → number of steps that decoded it, for every study any loading step lists.
    """
    import pandas as pd

    counts: dict[str, int] = {}
    for rel, col in LOADING_STEPS:
        path = Path(work) / rel
        if not path.is_file():
            continue
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if col not in frame:
            continue
        decoded = frame["volume"] if "volume" in frame else pd.Series([""] * len(frame))
        for uid, how in zip(frame[col], decoded):
            counts[uid] = counts.get(uid, 0) + int(how == "decoded")
    return counts


def _f(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_summary(work: str | os.PathLike, seconds: float | None = None) -> str:
    """The printed summary of a run folder (missing parts are said to be missing)."""
    work = Path(work)
    lines = [f"=== cspine run summary: {work} ==="]
    s1 = stage1_dice(work)
    if s1:
        fold = f"fold {s1['fold']}" if s1["fold"] is not None else "validation"
        lines.append(f"stage 1 Dice ({fold}, best checkpoint): "
                     + "  ".join(f"{v}={s1['dice'][v]:.3f}" for v in s1["dice"])
                     + f"  mean={s1['mean']:.3f}")
    else:
        lines.append(f"stage 1: no finished fit ({work / 'stage1' / 'run.json'} missing)")
    m = stage2_metrics(work)
    if m:
        base = m.get("baseline_prevalence", {})
        lines.append(f"stage 2 out-of-fold, {m.get('n_studies')} studies, {m.get('n_folds')} "
                     f"folds, patient_overall rule {m.get('rule')}:")
        lines.append(f"  competition loss (per study)  model {_f(m.get('comp_loss'), 4)}   "
                     f"constant-prevalence baseline {_f(base.get('comp_loss'), 4)}")
        lines.append(f"  competition loss (global)     model {_f(m.get('comp_loss_global'), 4)}"
                     f"   baseline {_f(base.get('comp_loss_global'), 4)}")
        if m.get("comp_loss") is not None and base.get("comp_loss") is not None \
                and m["comp_loss"] >= base["comp_loss"]:
            lines.append("  WARNING: the model does not beat the constant prior out of fold; "
                         "`make submit` refuses unless IF_WORSE=go-on or IF_WORSE=prior")
        auc = m.get("auc", {})
        lines.append("  AUC " + "  ".join(
            f"{'overall' if t == OVERALL else t}={_f(auc.get(t))}" for t in TARGETS)
            + f"  mean C1-C7={_f(auc.get('mean_vertebra'))}")
    else:
        lines.append(f"stage 2: not evaluated ({work / 'metrics.json'} missing)")
    decodes = decode_counts(work)
    if decodes:
        per = sorted(set(decodes.values()))
        lines.append(f"DICOM decodes per study: {'/'.join(map(str, per))} "
                     f"({sum(decodes.values())} decodes, {len(decodes)} studies; stage1-prepare "
                     f"keeps what it decodes for crops)")
    outs = outputs(work)
    lines.append("outputs: " + ", ".join(f"{k} {p}" for k, p in outs.items()))
    runs = wandb_runs(work)
    if runs:
        lines.append(f"W&B: {len(runs)} offline runs; upload with "
                     f"`wandb sync {work}/stage1/wandb/offline-run-* "
                     f"{work}/stage2/fold*/wandb/offline-run-*`")
    if seconds is not None:
        lines.append(f"total time: {seconds / 60:.1f} min ({seconds:.0f} s)")
    return "\n".join(lines)
