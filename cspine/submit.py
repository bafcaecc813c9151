"""``make submit``: the whole test-time engine over the test studies → ``submission.csv``.

Each test study (the studies of ``test.csv`` / ``sample_submission.csv``, folders under
``test_images/``) is decoded once and run through :class:`cspine.engine.StudyEngine` — the same
code and settings as ``cspine predict`` (stage 1, boxes and crops from the in-memory volume and
float64 affines, stage 2 with the fold models, the rule and clip range ``make evaluate``
recorded unless ``--rule`` / ``--clip`` override them).

Outputs:

* ``$WORK/predict/<UID>/``: ``probabilities.json`` (the eight probabilities, vertebrae found,
  boxes, crop status, timings, the models' key), ``vertebrae_mask.nii.gz`` (uint8 C1–C7 on the
  study's own DICOM grid and affine) and ``crops/<C#>.npz`` (the stage-2 inputs); a study whose
  ``probabilities.json`` has the current models' key is not run again; with ``--dicom`` also
  ``vertebrae_seg.dcm`` and ``report_sr.dcm`` (:mod:`cspine.dicom_out`);
* ``$WORK/submission.csv``: exactly the rows ``test.csv`` (else ``sample_submission.csv``) lists,
  in its order, whatever subset of the eight types it asks for; a study that could not be run
  (no images, unreadable series) or whose segmentation fails the anatomy check
  (:mod:`stage1_segment.anatomy`) gets the models' prior and is flagged;
* ``$WORK/stage2/submit_qc.csv`` (one row per test study: status, crops used, anatomy status
  and reasons, ``volume`` = decoded / done, seconds) and ``$WORK/stage2/submit_timing.json``.

``--shard i/N`` (or ``auto`` under Slurm arrays / torchrun) runs one share of the studies and
writes only their folders; a run without ``--shard`` then merges them into the submission.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from common.labels import TARGETS, VERTEBRAE
from common.layout import WorkLayout
from cspine.batch import StudyTask, run_batch, select_shard


def test_tasks(data_root: Path) -> tuple[list[str], list[StudyTask]]:
    """(the expected row_ids in order, one task per study in first-appearance order)."""
    from common.dataset import RSNADataset

    ds = RSNADataset(data_root)
    rows = ds.expected_submission_rows()
    for row_id in rows:  # before any study runs
        uid, _, target = row_id.partition("_")
        if target not in TARGETS:
            raise ValueError(f"{data_root}: row_id {row_id!r} asks for an unknown type "
                             f"{target!r}; expected one of {', '.join(TARGETS)}")
    uids = list(dict.fromkeys(r.split("_", 1)[0] for r in rows))
    tasks = []
    for uid in uids:
        folder = ds.test_dir / uid
        tasks.append(StudyTask(uid, "test", str(folder) if folder.is_dir() else ""))
    return rows, tasks


def models_key(spec, anatomy_limits=None) -> str:
    """Id of everything that decides a study's probabilities: checkpoints, crops, rule, clip."""
    import hashlib

    from stage1_segment.runs import run_id

    parts = [run_id(spec.stage1), *[run_id(p) for p in spec.stage2], spec.rule,
             json.dumps([float(c) for c in spec.clip]), json.dumps(spec.crops, sort_keys=True)]
    if spec.stacker:
        parts.append(hashlib.sha1(Path(spec.stacker).read_bytes()).hexdigest())
    if anatomy_limits is not None:
        parts.append(json.dumps(anatomy_limits.to_json(), sort_keys=True))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def study_status(found: int, fields: dict[str, Any] | None = None, anatomy: str = "ok") -> str:
    """QC status of one test study: ok, partial (some vertebrae on the prior) or prior (a
    study that could not be run, or whose segmentation failed the anatomy check)."""
    if fields is not None:
        return f"prior:{fields.get('reason')}"
    if anatomy == "implausible_segmentation":
        return f"prior:{anatomy}"
    if found == 0:
        return "prior:no_vertebra_found"
    return "ok" if found == len(VERTEBRAE) else f"partial:{len(VERTEBRAE) - found}_vertebrae_prior"


IF_WORSE = ("refuse", "go-on", "prior")


def worse_than_prior(work: Path, rule: str) -> str:
    """Why the run's ``rule`` does not beat the constant prior out of fold ("" when it does,
    or when ``make evaluate`` has not scored it)."""
    metrics = WorkLayout(work).metrics
    if not metrics.is_file():
        return ""
    m = json.loads(metrics.read_text())
    model = (m.get("rules", {}).get(rule) or {}).get("comp_loss")
    prior = (m.get("baseline_prevalence") or {}).get("comp_loss")
    if model is None or prior is None or model < prior:
        return ""
    return (f"the out-of-fold loss of rule {rule} ({model:.4f}) does not beat the constant "
            f"prior ({prior:.4f}) in {metrics}")


def submit(work: str | os.PathLike, data_root: str | os.PathLike, rule: str | None = None,
           clip: tuple[float, float] | None = None, out: str | os.PathLike | None = None,
           jobs: int = 2, shard: tuple[int, int] | None = None, device: str = "cpu",
           tta_flip: bool | None = None, progress: bool = True, if_worse: str = "refuse",
           anatomy_limits=None, dicom: bool = False):
    """Run the engine over the test studies and write the submission (module docstring).

    ``if_worse``: what to do when the rule does not beat the constant prior out of fold —
    ``refuse`` (raise, nothing written), ``go-on`` (submit the model anyway, with a warning) or
    ``prior`` (submit the models' prior for every study, no study is run).
    ``anatomy_limits``: :class:`stage1_segment.anatomy.AnatomyLimits` (None: the defaults).

    ``dicom``: also write each study's ``vertebrae_seg.dcm`` and ``report_sr.dcm``
    (:func:`cspine.dicom_out.write_study_dicom`; flagged at the operating point of
    :func:`cspine.models.operating_point`); a study whose DICOM outputs cannot be made keeps
    its other outputs, with the reason in its QC row's ``warnings``.

    Returns:
        the submission frame (``row_id, fractured``), or None for a shard.
    """
    import pandas as pd

    from common import geometry
    from common.atomic import save_npz, write_csv, write_json
    from common.nifti_io import save_nifti
    from cspine.dicom_out import write_study_dicom
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work, operating_point
    from cspine.predict import package_versions

    work, data_root = Path(work), Path(data_root)
    layout = WorkLayout(work)
    out = Path(out) if out else layout.submission
    spec = models_from_work(work, rule=rule, clip=clip)
    worse = worse_than_prior(work, spec.rule)
    if worse and if_worse == "refuse":
        raise ValueError(f"{worse}: refusing to submit a model worse than the prior; pass "
                         f"--if-worse-than-prior go-on to submit it anyway, or prior to submit "
                         f"the prior (make: IF_WORSE=go-on|prior)")
    if worse:
        print(f"WARNING: {worse}; " + ("submitting it anyway (--if-worse-than-prior go-on)"
                                       if if_worse == "go-on" else
                                       "submitting the prior (--if-worse-than-prior prior)"))
    engine = StudyEngine.from_spec(spec, device=device, tta_flip=tta_flip,
                                   anatomy_limits=anatomy_limits)
    key = models_key(spec, engine.anatomy_limits)
    row_ids, tasks = test_tasks(data_root)
    mine = select_shard(tasks, shard)
    predict_dir = layout.predict
    probs: dict[str, dict[str, float]] = {}
    threshold, threshold_source = operating_point(work)
    versions, run_id = package_versions(), uuid.uuid4().hex

    def current(task: StudyTask) -> dict[str, Any] | None:
        path = predict_dir / task.uid / "probabilities.json"
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        if doc.get("models_key") != key or doc.get("probabilities") is None:
            return None
        if dicom and "dicom" not in doc:  # asked for now, not made then
            return None
        probs[task.uid] = doc["probabilities"]
        return doc["qc"]

    def process(task: StudyTask, volume) -> dict[str, Any]:
        result = engine.run(volume)
        folder = predict_dir / task.uid
        for name, crop in result.crops.items():
            (folder / "crops" / f"{name}.npz").unlink(missing_ok=True)  # from an earlier run
            if crop is not None:
                save_npz(folder / "crops" / f"{name}.npz", image=crop[0], mask=crop[1],
                         affine=crop[2])
        mask, _ = geometry.labels_to_grid(result.grid_labels, result.grid_affine,
                                          volume.affine, volume.shape)
        save_nifti(folder / "vertebrae_mask.nii.gz", mask, volume.affine)
        anatomy = result.anatomy["status"]
        qc = {"StudyInstanceUID": task.uid,
              "status": study_status(len(result.found), anatomy=anatomy),
              "crops_used": 0 if result.implausible else len(result.found),
              "anatomy": anatomy, "anatomy_reasons": "; ".join(result.anatomy["reasons"]),
              **{f"{k}_s": round(v, 3) for k, v in result.timing_s.items()}}
        doc = {**result.to_json(volume), "models_key": key, "qc": qc,
               "input_qc": {k: volume.qc.get(k) for k in ("status", "reasons", "repairs",
                                                          "warnings") if k in volume.qc}}
        for name in ("vertebrae_seg.dcm", "report_sr.dcm"):
            (folder / name).unlink(missing_ok=True)  # from an earlier run
        if dicom:
            flagged = result.flagged(threshold)
            warnings: list[str] = []
            doc.update(run_id=run_id, threshold=threshold, threshold_source=threshold_source,
                       flagged=flagged)
            doc["dicom"] = write_study_dicom(folder, volume, mask, volume.affine,
                                             doc["probabilities"], flagged, threshold,
                                             threshold_source,
                                             {**spec.to_json(),
                                              "probabilities_source": result.probabilities_note()},
                                             versions, run_id, warnings)
            qc["warnings"] = " | ".join(warnings)
        write_json(folder / "probabilities.json", doc)  # last: its presence means complete
        probs[task.uid] = doc["probabilities"]
        return qc

    def on_failure(task: StudyTask, fields: dict[str, Any]) -> dict[str, Any]:
        probs[task.uid] = engine.prior_probabilities()
        return {"StudyInstanceUID": task.uid, "status": study_status(0, fields), "crops_used": 0,
                "errors": f"{fields.get('reason')}: {fields.get('message')}"}

    t0 = time.perf_counter()
    if worse and if_worse == "prior":  # no study is run: every row gets the prior
        qc = [{**on_failure(t, {"reason": "model_worse_than_prior", "message": worse}),
               "volume": "", "seconds": 0.0} for t in mine]
    else:
        qc = run_batch(mine, process, current, on_failure, jobs=jobs, desc="submit",
                       progress=progress)
    if shard is not None:
        print(f"submit shard {shard[0]}/{shard[1]}: {len(mine)} test studies in "
              f"{time.perf_counter() - t0:.1f} s -> {predict_dir}; run without --shard to "
              f"write {out}")
        return None
    values = []
    for row_id in row_ids:
        uid, target = row_id.split("_", 1)
        values.append(float(probs[uid][target]))
    sub = pd.DataFrame({"row_id": row_ids, "fractured": values})
    write_csv(out, sub)
    qc_frame = pd.DataFrame(qc)
    write_csv(layout.submit_qc, qc_frame)
    ran = qc_frame[qc_frame["volume"] != "done"] if len(qc_frame) else qc_frame
    secs = ran["seconds"].to_numpy(float) if len(ran) else np.zeros(0)
    write_json(layout.submit_timing, {
        "studies": len(tasks), "models": len(engine.stage2), "rule": spec.rule,
        "clip": list(spec.clip), "device": engine.device,
        "studies_run": int(len(secs)),
        "seconds_per_study_mean": float(secs.mean()) if len(secs) else 0.0,
        "seconds_per_study_median": float(np.median(secs)) if len(secs) else 0.0,
        "volumes": qc_frame["volume"].value_counts().to_dict() if len(qc_frame) else {},
        "studies_on_prior": int(qc_frame["status"].str.startswith("prior").sum())
        if len(qc_frame) else 0,
        "studies_implausible": int((qc_frame.get("anatomy", pd.Series(dtype=str))
                                    == "implausible_segmentation").sum())})
    flagged = qc_frame[qc_frame["status"] != "ok"] if len(qc_frame) else qc_frame
    print(f"wrote {out}: {len(sub)} rows, {len(tasks)} studies, {len(engine.stage2)} fold "
          f"models, rule={spec.rule}; {len(flagged)} studies flagged in "
          f"{work / 'stage2' / 'submit_qc.csv'} ({time.perf_counter() - t0:.1f} s)")
    return sub
