"""``cspine validate DATA --work WORK``: external validation of trained models on a site's own
labelled CTs.

Every study goes through the one test-time engine (:class:`cspine.engine.StudyEngine`, mapped
over the studies by :func:`cspine.batch.run_batch`: decode pool, one QC row per study, a bad
study never stops the run), then :mod:`cspine.val_stats` computes the statistics and
:mod:`cspine.validate_report` writes the page.

The dataset (:func:`read_dataset`) is either

* an RSNA-layout folder: ``train.csv`` labels + ``train_images/<UID>/`` (a labelled study
  without a folder is listed as unreadable), or
* a CSV file: one row per study with ``study_dir`` (a DICOM folder) or ``nifti_path`` (a CT in
  HU), ``C1..C7`` (0/1), optional ``patient_overall`` (default: the maximum of C1..C7),
  optional ``StudyInstanceUID`` (default: the folder or file name); every other column is a
  subgroup column. Relative paths are relative to the CSV's folder.

Outputs under ``OUT`` (default ``WORK/validation/<dataset name>``):

* ``records/<models key>/<UID>.json``: each study's probabilities, header fields and QC
  (written last, atomically; a study whose record has the current models' key is not run again),
  ``overviews/<UID>.png``: the ``cspine predict`` overview of each study;
* ``predictions.csv``: one row per listed study (status, labels, probabilities, subgroup
  fields), ``qc.csv``: one QC row per study, unreadable ones with their reason;
* ``metrics.json``, ``roc.png``, ``reliability.png`` and ``index.html`` (self-contained).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.labels import OVERALL, TARGETS, VERTEBRAE
from common.layout import WorkLayout
from cspine.batch import StudyTask, run_batch

UID = "StudyInstanceUID"
PATH_COLUMNS = ("study_dir", "nifti_path")


@dataclass
class ValStudy:
    """One labelled study of a validation set.

    Attributes:
        uid: study id (StudyInstanceUID, or the folder / file name).
        path: the DICOM folder or NIfTI file ("" when the dataset names none).
        labels: C1..C7 and patient_overall → 0/1.
        groups: subgroup column → value (the CSV's own columns).
    """

    uid: str
    path: str
    labels: dict[str, int]
    groups: dict[str, str] = field(default_factory=dict)


def read_dataset(data: str | os.PathLike) -> tuple[list[ValStudy], list[str]]:
    """The studies of an RSNA-layout folder or of a CSV (module docstring), and the CSV's
    subgroup column names.

    Raises:
        ValueError: a CSV without a path column or label columns, labels other than 0/1,
            duplicate study ids (each message names the file and the fix).
    """
    data = Path(data)
    if data.is_file():
        return _read_csv(data)
    from common.dataset import RSNADataset

    ds = RSNADataset(data)
    studies = []
    for _, row in ds.labels.iterrows():
        uid = str(row[UID])
        folder = ds.train_dir / uid
        studies.append(ValStudy(uid, str(folder) if folder.is_dir() else "",
                                {t: int(row[t]) for t in TARGETS}))
    return studies, []


def _read_csv(path: Path) -> tuple[list[ValStudy], list[str]]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    where = [c for c in PATH_COLUMNS if c in frame.columns]
    if not where:
        raise ValueError(f"{path}: needs a study_dir (DICOM folder) or nifti_path column")
    missing = [v for v in VERTEBRAE if v not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing label columns {missing} (0/1 per vertebra)")
    labels = frame[list(VERTEBRAE) + ([OVERALL] if OVERALL in frame.columns else [])]
    bad = ~labels.isin(["0", "1"]).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: row {int(np.flatnonzero(bad)[0]) + 2} has labels other than "
                         f"0/1 in {list(labels.columns)}")
    known = {*PATH_COLUMNS, UID, *TARGETS}
    group_cols = [c for c in frame.columns if c not in known]
    studies = []
    for _, row in frame.iterrows():
        raw = next((row[c] for c in where if row[c]), "")
        full = raw and (Path(raw) if Path(raw).is_absolute() else path.parent / raw)
        name = Path(raw).name
        uid = row.get(UID) or (name[:-7] if name.endswith(".nii.gz") else
                               name[:-4] if name.endswith(".nii") else name)
        lab = {v: int(row[v]) for v in VERTEBRAE}
        lab[OVERALL] = int(row[OVERALL]) if OVERALL in frame.columns else max(lab.values())
        studies.append(ValStudy(str(uid), str(full) if full else "", lab,
                                {c: row[c] for c in group_cols}))
    uids = [s.uid for s in studies]
    dup = sorted({u for u in uids if uids.count(u) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate studies {dup[:5]}; give a StudyInstanceUID column")
    return studies, group_cols


def _record(result, volume, key: str, seconds: float) -> dict[str, Any]:
    """The per-study record of one engine run (probabilities, header fields for subgroups)."""
    qc = volume.qc
    return {"study": result.study_uid, "models_key": key,
            "probabilities": {t: float(result.probabilities[t]) for t in TARGETS},
            "vertebrae_found": result.found,
            "header": dict(qc.get("header") or {}),
            "thickness_mm": qc.get("thickness"), "spacing_mm": qc.get("spacing"),
            "source": qc.get("source", "dicom"),
            "input_status": qc.get("status"), "engine_seconds": round(seconds, 3),
            "anatomy": (result.anatomy or {}).get("status"),
            "anatomy_reasons": list((result.anatomy or {}).get("reasons", [])),
            "probabilities_source": result.probabilities_source}


def run_models(studies: list[ValStudy], engines: list, out: Path, jobs: int = 2,
               lenient: bool = False, overview_threshold: float = 0.5,
               progress: bool = True, dicom: bool = False, threshold_source: str = ""
               ) -> tuple[list[dict[str, Any]], list[dict[str, dict]]]:
    """Run every engine on every study (each study decoded once) and keep the records.

    Args:
        studies: the validation studies.
        engines: loaded :class:`cspine.engine.StudyEngine` s (the first draws the overviews).
        out: the validation folder.
        overview_threshold: vertebrae with p ≥ this get an axial panel in the overview (and
            are flagged in the DICOM SR).
        dicom: also write each study's DICOM SEG + SR (first engine) into
            ``out/dicom/<UID>/`` (:func:`cspine.dicom_out.write_study_dicom`; a study without
            source DICOM gets a warning in its record, the rest is written).
        threshold_source: where ``overview_threshold`` came from (recorded in the SR).

    Returns:
        (one QC row per study, per engine ``{uid: record}`` of the studies that ran).
    """
    from common.atomic import write_json
    from cspine.overview import render_overview
    from cspine.predict import implausible_warning
    from cspine.submit import models_key

    keys = [models_key(e.spec) for e in engines]
    run_id = uuid.uuid4().hex
    records: list[dict[str, dict]] = [{} for _ in engines]

    def path(i: int, uid: str) -> Path:
        return out / "records" / keys[i] / f"{uid}.json"

    def current(task: StudyTask) -> dict[str, Any] | None:
        docs = []
        for i in range(len(engines)):
            p = path(i, task.uid)
            if not p.is_file():
                return None
            docs.append(json.loads(p.read_text()))
        if not (out / "overviews" / f"{task.uid}.png").is_file():
            return None
        if dicom and "dicom" not in docs[0]:  # asked for now, not made then
            return None
        for i, doc in enumerate(docs):
            records[i][task.uid] = doc
        return {UID: task.uid, "status": "ok", "vertebrae_found": len(docs[0]["vertebrae_found"])}

    def process(task: StudyTask, volume) -> dict[str, Any]:
        first = None
        for i, engine in enumerate(engines):
            t0 = time.perf_counter()
            result = engine.run(volume)
            doc = _record(result, volume, keys[i], time.perf_counter() - t0)
            doc["study"] = task.uid
            if i == 0:
                first = result
                render_overview(out / "overviews" / f"{task.uid}.png", volume,
                                result.grid_labels, result.grid_affine, result.probabilities,
                                overview_threshold, title=task.uid,
                                warning=implausible_warning(result.anatomy))
                if dicom:
                    doc["dicom"], doc["warnings"] = _study_dicom(
                        out / "dicom" / task.uid, engine, result, volume, overview_threshold,
                        threshold_source, run_id)
            write_json(path(i, task.uid), doc)  # last: its presence means complete
            records[i][task.uid] = doc
        return {UID: task.uid, "status": "ok", "vertebrae_found": len(first.found)}

    def on_failure(task: StudyTask, fields: dict[str, Any]) -> dict[str, Any]:
        return {UID: task.uid, "status": "unreadable", "vertebrae_found": 0,
                "reason": fields.get("reason"), "message": fields.get("message")}

    tasks = [StudyTask(s.uid, "validate", s.path) for s in studies]
    qc = run_batch(tasks, process, current, on_failure, lenient=lenient, jobs=jobs,
                   desc="validate", progress=progress)
    return qc, records


def _study_dicom(folder: Path, engine, result, volume, threshold: float, source: str,
                 run_id: str) -> tuple[dict[str, Any], list[str]]:
    """The DICOM SEG + SR of one validation study (``cspine predict --dicom``'s writer):
    the mask in the CT geometry, the vertebrae at or above ``threshold`` flagged (none for an
    implausible segmentation)."""
    from common import geometry
    from cspine.dicom_out import write_study_dicom
    from cspine.predict import package_versions

    mask, _ = geometry.labels_to_grid(result.grid_labels, result.grid_affine, volume.affine,
                                      volume.shape)
    flagged = result.flagged(threshold)
    folder.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    models = {**(engine.spec.to_json() if engine.spec is not None else {}),
              "probabilities_source": result.probabilities_note()}
    info = write_study_dicom(folder, volume, mask, volume.affine, result.probabilities, flagged,
                             threshold, source, models, package_versions(), run_id, problems)
    return info, problems


def predictions_frame(studies: list[ValStudy], qc: list[dict[str, Any]], records: dict,
                      group_cols: list[str]) -> pd.DataFrame:
    """One row per listed study: status, reason, labels, probabilities ``p_<target>``, the
    subgroup fields (:func:`cspine.val_stats.header_groups` + the CSV's columns)."""
    from cspine.val_stats import header_groups

    by_uid = {row[UID]: row for row in qc}
    rows = []
    for s in studies:
        q = by_uid.get(s.uid, {})
        rec = records.get(s.uid)
        row: dict[str, Any] = {UID: s.uid, "status": q.get("status", "unreadable"),
                               "reason": q.get("reason") or "", "path": s.path}
        row.update({t: s.labels[t] for t in TARGETS})
        row.update({f"p_{t}": (rec["probabilities"][t] if rec else np.nan) for t in TARGETS})
        row["vertebrae_found"] = len(rec["vertebrae_found"]) if rec else 0
        row["anatomy"] = (rec or {}).get("anatomy") or ""
        row.update(header_groups(rec))
        row.update({c: s.groups.get(c, "") for c in group_cols})
        rows.append(row)
    return pd.DataFrame(rows)


def validate(data: str | os.PathLike, work: str | os.PathLike, out: str | os.PathLike | None = None,
             compare: str | os.PathLike | None = None, operating_point: str = "sens90",
             prevalence: float = 0.06, recalibrate: float | None = None,
             replicates: int = 1000, seed: int = 20240, min_subgroup: int = 20,
             jobs: int = 2, device: str = "cpu", lenient: bool = False,
             progress: bool = True, dicom: bool = False) -> dict[str, Any]:
    """The whole validation (module docstring); returns the metrics dict.

    Args:
        data: RSNA-layout folder or CSV.
        work: the training folder whose models (and OOF operating points) are validated.
        out: output folder (default ``WORK/validation/<dataset name>``).
        compare: a second training folder scored on the same studies (paired differences).
        operating_point: ``sens80`` / ``sens90`` / ``sens95`` / ``youden``: the one whose errors
            are reviewed.
        prevalence: the prevalence at which PPV and NPV are recomputed (0 < π < 1).
        recalibrate: share of the studies that Platt recalibration is fitted on (None: no
            recalibration); it is reported on the other studies only.
        replicates, seed: the patient-level bootstrap.
        min_subgroup: a subgroup with fewer studies gets its counts only.
    """
    from common.atomic import write_csv, write_json
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work
    from cspine.submit import models_key
    from cspine.val_stats import oof_points, validation_metrics
    from cspine.validate_report import write_page

    t_start = time.perf_counter()
    work = Path(work)
    name = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    out = Path(out) if out else WorkLayout(work).validation(name)
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"--prevalence {prevalence} must lie strictly between 0 and 1")
    if recalibrate is not None and not 0.0 < recalibrate < 1.0:
        raise ValueError(f"--recalibrate {recalibrate}: give the share of studies to fit on, "
                         f"strictly between 0 and 1 (e.g. 0.5)")
    if replicates < 1:
        raise ValueError(f"--replicates {replicates} must be at least 1 (1,000+ recommended)")
    points = oof_points(work)
    if operating_point not in points[OVERALL]:
        raise ValueError(f"operating point {operating_point!r} not among {sorted(points[OVERALL])}")
    studies, group_cols = read_dataset(data)
    if not studies:
        raise ValueError(f"{data}: no labelled studies")
    works = [work] + ([Path(compare)] if compare else [])
    engines = [StudyEngine.from_spec(models_from_work(w), device=device) for w in works]
    qc, records = run_models(studies, engines, out, jobs=jobs, lenient=lenient,
                             overview_threshold=points["vertebrae"][operating_point]["threshold"],
                             progress=progress, dicom=dicom,
                             threshold_source=f"metrics.json operating_points.vertebrae."
                                              f"{operating_point} (out of fold)")
    frame = predictions_frame(studies, qc, records[0], group_cols)
    write_csv(out / "predictions.csv", frame)
    write_csv(out / "qc.csv", pd.DataFrame(qc))
    other = predictions_frame(studies, qc, records[1], group_cols) if compare else None
    metrics = validation_metrics(frame, points, operating_point=operating_point,
                                 prevalence=prevalence, recalibrate=recalibrate,
                                 replicates=replicates, seed=seed, min_subgroup=min_subgroup,
                                 other=other)
    metrics.update(dataset=str(Path(data).resolve()), work=str(work.resolve()),
                   compare_work=str(Path(compare).resolve()) if compare else None,
                   models_key=models_key(engines[0].spec), out=str(out),
                   seconds=round(time.perf_counter() - t_start, 1))
    write_json(out / "metrics.json", metrics)
    write_page(out, frame, metrics)
    return metrics
