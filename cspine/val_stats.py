"""The statistics of ``cspine validate``, from its ``predictions.csv`` frame (:mod:`common.stats`
does the arithmetic; which library computes what is said there).

Everything is per vertebra (C1..C7), for the vertebrae pooled and per patient
(``patient_overall``), on the studies that were read (``status == ok``); the unreadable ones are
counted and listed, never scored. Confidence intervals come from one patient-level bootstrap
(studies redrawn with replacement, ``replicates`` times, ``seed``) shared by every statistic
of the full set, so that the intervals belong to the same replicates; each subgroup has its
own bootstrap over its own studies.

Operating points are **not** chosen here: their thresholds come from the training run's OOF
predictions (``WORK/metrics.json`` ``operating_points``, written by ``make evaluate``) and are
applied unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import stats
from common.labels import OVERALL, TARGETS, VERTEBRAE
from common.layout import WorkLayout

UID = "StudyInstanceUID"
P = {t: f"p_{t}" for t in TARGETS}
#: Subgroup fields derived from the DICOM headers read during loading, in table order.
HEADER_GROUPS = ("manufacturer", "slice_thickness", "kernel", "contrast", "age", "sex")
THICKNESS_BINS = ((1.0, "<= 1.0 mm"), (2.0, "1.0-2.0 mm"), (3.0, "2.0-3.0 mm"),
                  (math.inf, "> 3.0 mm"))
AGE_BINS = ((40, "< 40 y"), (65, "40-64 y"), (80, "65-79 y"), (math.inf, ">= 80 y"))
NOT_RECORDED = "not recorded"


def oof_points(work: str | Path) -> dict[str, Any]:
    """The operating points ``make evaluate`` recorded for the run in ``WORK/metrics.json``.

    Raises:
        ValueError: no metrics.json or no operating points in it (older evaluation).
    """
    path = WorkLayout(work).metrics
    if not path.is_file():
        raise ValueError(f"{path} not found: run `make evaluate WORK={work}` first (it records "
                         f"the operating points that validation applies)")
    points = json.loads(path.read_text()).get("operating_points") or {}
    if not points.get(OVERALL) or not points.get("vertebrae"):
        raise ValueError(f"{path} has no operating points: run `make evaluate WORK={work}` "
                         f"again (this version records them from the OOF predictions)")
    return points


def _bin(value: float, bins: tuple) -> str:
    return next(label for edge, label in bins if value <= edge)


def _age(text: str) -> float | None:
    """DICOM AS ('065Y', '018M', '003W', '010D') → years."""
    try:
        n, unit = float(text[:-1]), text[-1].upper()
    except (ValueError, IndexError):
        return None
    return n * {"Y": 1, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(unit, math.nan)


def header_groups(record: dict[str, Any] | None) -> dict[str, str]:
    """A study's subgroup fields from the header fields its record kept ("" when unread).

    ``contrast`` is ``contrast`` when the header names a ContrastBolusAgent, ``none recorded``
    for a DICOM study without one, "" for a NIfTI input (no header).
    """
    out = {g: "" for g in HEADER_GROUPS}
    if not record:
        return out
    h = record.get("header") or {}
    dicom = record.get("source", "dicom") != "nifti"
    out["manufacturer"] = h.get("Manufacturer", "")
    out["kernel"] = h.get("ConvolutionKernel", "")
    thick = record.get("thickness_mm")
    if isinstance(thick, (int, float)) and thick > 0:
        out["slice_thickness"] = _bin(float(thick), THICKNESS_BINS)
    if dicom:
        out["contrast"] = "contrast" if h.get("ContrastBolusAgent") else "none recorded"
    age = _age(h.get("PatientAge", ""))
    if age is not None and np.isfinite(age):
        out["age"] = _bin(age, AGE_BINS)
    out["sex"] = {"M": "male", "F": "female", "O": "other"}.get(h.get("PatientSex", ""), "")
    return out


def _yp(frame: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N, K) int and probabilities (N, K) float of the target columns."""
    return (frame[cols].to_numpy(dtype=np.int64),
            frame[[P[c] for c in cols]].to_numpy(dtype=np.float64))


GROUPS = {OVERALL: [OVERALL], "vertebrae": list(VERTEBRAE)}


def _aucs(frame: pd.DataFrame, idx: np.ndarray) -> dict[str, Any]:
    out = {}
    for name, cols in [(t, [t]) for t in TARGETS] + [("vertebrae_pooled", list(VERTEBRAE))]:
        y, p = _yp(frame, cols)
        est = stats.bootstrap_auc(y if len(cols) > 1 else y[:, 0],
                                  p if len(cols) > 1 else p[:, 0], idx)
        out[name] = {**est.to_json(), "positives": int(y.sum()), "negatives": int((1 - y).sum())}
    return out


def _loss(frame: pd.DataFrame) -> np.ndarray:
    from common.metric import per_study_loss

    y = frame.set_index(UID)[list(TARGETS)]
    p = frame.set_index(UID)[[P[t] for t in TARGETS]].set_axis(list(TARGETS), axis=1)
    return per_study_loss(y, p).to_numpy()


def _rates(frame: pd.DataFrame, group: str, threshold: float, idx: np.ndarray,
           prevalence: float) -> dict[str, Any]:
    y, p = _yp(frame, GROUPS[group])
    if group == OVERALL:
        y, p = y[:, 0], p[:, 0]
    return stats.rates_with_ci(y, p, threshold, idx, prevalence)


def _operating(frame, points, idx, prevalence, chosen) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in GROUPS:
        out[group] = {name: {"threshold": pt["threshold"],
                             "oof": {"sensitivity": pt["sensitivity"],
                                     "specificity": pt["specificity"]},
                             "site": _rates(frame, group, pt["threshold"], idx, prevalence)}
                      for name, pt in points[group].items()}
    t = points["vertebrae"][chosen]["threshold"]
    out["per_vertebra"] = {v: stats.rates_with_ci(frame[v].to_numpy(), frame[P[v]].to_numpy(),
                                                  t, idx, prevalence) for v in VERTEBRAE}
    return out


def _calibration(frame: pd.DataFrame, idx: np.ndarray) -> dict[str, Any]:
    out = {}
    for group, cols in GROUPS.items():
        y, p = _yp(frame, cols)
        y, p = (y[:, 0], p[:, 0]) if len(cols) == 1 else (y, p)
        mean, frac = stats.reliability(y, p)
        out[group] = {"ece": stats.bootstrap_ece(y, p, idx).to_json(),
                      "curve": {"mean_predicted": mean.round(4).tolist(),
                                "observed": frac.round(4).tolist()}}
    return out


def recalibration(frame: pd.DataFrame, share: float, replicates: int, seed: int
                  ) -> dict[str, Any]:
    """Platt recalibration fitted on a seeded ``share`` of the studies, reported on the rest.

    One model for ``patient_overall``, one for the seven vertebra columns pooled. The report
    rows never enter a fit (``fit_studies`` and ``report_studies`` are disjoint and listed).
    """
    fit_i, rep_i = stats.split_studies(len(frame), share, seed)
    fit, rep = frame.iloc[fit_i], frame.iloc[rep_i]
    out: dict[str, Any] = {"share": share, "fit_studies": fit[UID].tolist(),
                           "report_studies": rep[UID].tolist(), "groups": {}}
    recal = rep.copy()
    idx = stats.bootstrap_indices(len(rep), replicates, seed + 1)
    for group, cols in GROUPS.items():
        yf, pf = _yp(fit, cols)
        try:
            model = stats.Platt.fit(yf.ravel(), pf.ravel())
        except ValueError as exc:
            out["groups"][group] = {"error": str(exc)}
            continue
        y, p = _yp(rep, cols)
        q = model.apply(p)
        recal[[P[c] for c in cols]] = q
        sq = (lambda a: a[:, 0]) if len(cols) == 1 else (lambda a: a)
        out["groups"][group] = {"a": model.a, "b": model.b,
                                "ece_before": stats.bootstrap_ece(sq(y), sq(p), idx).to_json(),
                                "ece_after": stats.bootstrap_ece(sq(y), sq(q), idx).to_json()}
    out["comp_loss_before"] = stats.bootstrap_mean(_loss(rep), idx).to_json()
    out["comp_loss_after"] = stats.bootstrap_mean(_loss(recal), idx).to_json()
    return out


def _subgroups(frame: pd.DataFrame, fields: list[str], points, chosen: str, replicates: int,
               seed: int, min_size: int, prevalence: float) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for f in fields:
        if f not in frame.columns:
            continue
        values = frame[f].fillna("").astype(str)
        if not (values != "").any():
            continue  # never recorded: no table
        rows = []
        for value in sorted(values.unique(), key=lambda v: (v == "", v)):
            sub = frame[values == value]
            y = sub[OVERALL].to_numpy()
            row: dict[str, Any] = {"value": value or NOT_RECORDED, "n": len(sub),
                                   "positives": int(y.sum())}
            if len(sub) < min_size or np.unique(y).size < 2:
                row["note"] = (f"fewer than {min_size} studies" if len(sub) < min_size
                               else "one class only")
                rows.append(row)
                continue
            idx = stats.bootstrap_indices(len(sub), replicates, seed)
            row["auc_overall"] = stats.bootstrap_auc(y, sub[P[OVERALL]].to_numpy(), idx).to_json()
            yv, pv = _yp(sub, list(VERTEBRAE))
            row["auc_vertebrae_pooled"] = stats.bootstrap_auc(yv, pv, idx).to_json()
            row["comp_loss"] = stats.bootstrap_mean(_loss(sub), idx).to_json()
            row["overall_at_point"] = _rates(sub, OVERALL, points[OVERALL][chosen]["threshold"],
                                             idx, prevalence)
            rows.append(row)
        out[f] = rows
    return out


def _compare(a: pd.DataFrame, b: pd.DataFrame, idx: np.ndarray) -> dict[str, Any]:
    """Paired bootstrap differences A − B (AUC overall, AUC pooled vertebrae, metric)."""
    ya, pa = _yp(a, [OVERALL])
    yb, pb = _yp(b, [OVERALL])
    va, qa = _yp(a, list(VERTEBRAE))
    vb, qb = _yp(b, list(VERTEBRAE))

    def auc(y, p):
        return stats.rank_auc(y.reshape(len(y), -1), p.reshape(len(p), -1))

    la, lb = _loss(a), _loss(b)
    return {
        "auc_overall": stats.paired_difference(auc, (ya, pa), (yb, pb), idx).to_json(),
        "auc_vertebrae_pooled": stats.paired_difference(auc, (va, qa), (vb, qb), idx).to_json(),
        "comp_loss": stats.paired_difference(lambda v: v.mean(axis=-1), (la,), (lb,),
                                             idx).to_json(),
        "auc_overall_b": stats.auc(yb[:, 0], pb[:, 0]),
        "comp_loss_b": float(lb.mean()),
        "note": "A - B on the same studies; a CI excluding 0 is a difference at the 5 % level",
    }


def errors(frame: pd.DataFrame, threshold: float) -> dict[str, list[dict[str, Any]]]:
    """False negatives (most confident first: lowest p) and false positives (highest p first)
    of ``patient_overall`` at ``threshold``."""
    p = frame[P[OVERALL]]

    def rows(sel, ascending):
        part = frame[sel].assign(_p=p[sel]).sort_values("_p", ascending=ascending)
        return [{UID: r[UID], "p": float(r["_p"]),
                 "fractured": [v for v in VERTEBRAE if r[v] == 1],
                 "probabilities": {v: round(float(r[P[v]]), 4) for v in VERTEBRAE}}
                for _, r in part.iterrows()]

    return {"false_negatives": rows((frame[OVERALL] == 1) & (p < threshold), True),
            "false_positives": rows((frame[OVERALL] == 0) & (p >= threshold), False)}


def validation_metrics(frame: pd.DataFrame, points: dict[str, Any], operating_point: str,
                       prevalence: float, recalibrate: float | None = None,
                       replicates: int = stats.DEFAULT_REPLICATES, seed: int = stats.DEFAULT_SEED,
                       min_subgroup: int = 20, other: pd.DataFrame | None = None,
                       group_fields: list[str] | None = None) -> dict[str, Any]:
    """Every statistic of the validation (module docstring) as a JSON-ready dict.

    Args:
        frame: ``predictions.csv`` (:func:`cspine.validate.predictions_frame`).
        points: the OOF operating points (:func:`oof_points`).
        operating_point: the point whose errors are listed and which the subgroups use.
        prevalence: π for the recomputed PPV / NPV.
        recalibrate: share of studies to fit Platt recalibration on (None: none).
        other: the same frame for a second run (``--compare``).
        group_fields: subgroup columns (default: the header fields + any extra columns).
    """
    ok = frame[frame["status"] == "ok"].reset_index(drop=True)
    bad = frame[frame["status"] != "ok"]
    out: dict[str, Any] = {
        "n_listed": len(frame), "n_scored": len(ok), "n_unreadable": len(bad),
        # scored on the models' prior: their segmentation failed the anatomy check
        "n_implausible": int((ok.get("anatomy", pd.Series(dtype=str))
                              == "implausible_segmentation").sum()),
        "unreadable": [{UID: r[UID], "reason": r["reason"], "path": r["path"]}
                       for _, r in bad.iterrows()],
        "operating_point": operating_point, "prevalence": prevalence,
        "bootstrap": {"replicates": replicates, "seed": seed, "unit": "study",
                      "interval": "95 % percentile"},
        "min_subgroup": min_subgroup,
        "prevalence_site": {t: float(ok[t].mean()) if len(ok) else None for t in TARGETS},
    }
    if len(ok) == 0:
        out["note"] = "no study could be read: nothing to score"
        return out
    idx = stats.bootstrap_indices(len(ok), replicates, seed)
    out["auc"] = _aucs(ok, idx)
    losses = _loss(ok)
    out["comp_loss"] = stats.bootstrap_mean(losses, idx).to_json()
    out["operating_points"] = _operating(ok, points, idx, prevalence, operating_point)
    out["calibration"] = _calibration(ok, idx)
    if recalibrate:
        out["recalibration"] = recalibration(ok, recalibrate, replicates, seed)
    known = {UID, "status", "reason", "path", "vertebrae_found", *TARGETS, *P.values()}
    fields = group_fields if group_fields is not None else \
        list(HEADER_GROUPS) + [c for c in frame.columns if c not in known and
                               c not in HEADER_GROUPS]
    out["subgroups"] = _subgroups(ok, fields, points, operating_point, replicates, seed,
                                  min_subgroup, prevalence)
    out["errors"] = errors(ok, points[OVERALL][operating_point]["threshold"])
    if other is not None:
        both = set(ok[UID]) & set(other.loc[other["status"] == "ok", UID])
        a = ok[ok[UID].isin(both)].reset_index(drop=True)
        b = other.set_index(UID).loc[a[UID]].reset_index()
        out["compare"] = _compare(a, b, stats.bootstrap_indices(len(a), replicates, seed))
        out["compare"]["n_studies"] = len(a)
    return out
