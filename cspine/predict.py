"""Single-study prediction: one CT (DICOM folder or NIfTI file) → probabilities, mask, overview.

``cspine predict STUDY --out OUT`` runs the whole test-time pipeline on one study:

1. load: :func:`common.dicom_io.load_series` (a DICOM folder) or :func:`common.nifti_io.load_nifti`
   (a ``.nii``/``.nii.gz`` CT in HU; reoriented to the DICOM axial axis order L, P, S so that the
   crops look like the training crops);
2. the test-time engine, :meth:`cspine.engine.StudyEngine.run` — the same code that
   ``make submit`` runs over the test studies and ``make crops`` over the train studies: stage 1,
   boxes, crops, stage 2 (fold models averaged, the run's ``patient_overall`` rule and clip).

Outputs, written into a temporary sibling folder and moved into ``OUT`` only when complete:

* ``probabilities.json``: ``probabilities`` (C1..C7, patient_overall), ``flagged`` vertebrae
  (p ≥ threshold), vertebrae found by stage 1, the ``anatomy`` check of the segmentation
  (:mod:`stage1_segment.anatomy`; on ``implausible_segmentation`` the probabilities are the
  models' prior, ``probabilities_source`` says so, and nothing is flagged), timings (s),
  versions and the models used;
* ``vertebrae_mask.nii.gz``: uint8 classes (0 background, 1..7 = C1..C7) on the input's own voxel
  grid with the input's affine, so it overlays the CT in ITK-SNAP / 3D Slicer;
* ``overview.png``: see :mod:`cspine.overview` (with ``--cam``: the stage-2 class-activation
  map of each flagged vertebra drawn over it, :mod:`stage2_classify.cam`);
* ``cam_heatmap.nii.gz`` (``--cam-nifti``): that map, uint8 0..255 = CAM 0..1, on the input's
  grid and affine;
* ``vertebrae_seg.dcm`` and ``report_sr.dcm`` (``--dicom``, a DICOM input only): the mask as a
  DICOM SEG on the source slices and the eight probabilities as a DICOM SR
  (:mod:`cspine.dicom_out`). A NIfTI input has no series to reference: a warning, and the other
  outputs are written.

The operating point ("flagged": p ≥ threshold) is ``--threshold``, else the
``operating_point`` that ``WORK/metrics.json`` records, else :data:`DEFAULT_THRESHOLD` (0.5);
``threshold_source`` in the JSON and the SR says which.

The checkpoints come from a training folder or a bundle written by ``cspine export-bundle``
(:mod:`cspine.models`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from common import geometry
from common.labels import OVERALL, VERTEBRAE
from common.nifti_io import NIFTI_SUFFIXES
from cspine.engine import StudyEngine, StudyResult

# ModelSpec and the two readers are re-exported: `from cspine.predict import models_from_work`.
from cspine.models import (  # noqa: F401
    DEFAULT_THRESHOLD,
    ModelSpec,
    PredictError,
    models_from_bundle,
    models_from_work,
    one_line,
)

OUTPUT_FILES = ("probabilities.json", "vertebrae_mask.nii.gz", "overview.png")
#: Written only when asked (``--cam-nifti``, ``--dicom``).
OPTIONAL_FILES = ("cam_heatmap.nii.gz", "vertebrae_seg.dcm", "report_sr.dcm")


def load_input(path: str | os.PathLike, lenient: bool = False):
    """Load a DICOM study folder or a NIfTI CT as a :class:`common.geometry.Volume`.

    A NIfTI volume is reoriented (exact axis permutation, no interpolation) to L, P, S — the
    axis order of an axial DICOM stack (column, row, ascending slice) that the models saw.

    Raises:
        PredictError: missing path, unsupported file, unreadable series (one line with the
            study, the file and the reason code).
    """
    from common import geometry
    from common.dicom_io import SeriesError, load_series

    path = Path(path)
    if not path.exists():
        raise PredictError(f"{path}: no such file or folder")
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise PredictError(f"{path}: not a study folder nor a NIfTI file (.nii/.nii.gz); "
                               f"pass the folder holding the study's DICOM slices")
        from common.nifti_io import load_nifti

        try:
            array, affine = load_nifti(path)
        except Exception as exc:  # nibabel raises many types for broken files
            raise PredictError(one_line(f"{path}: unreadable NIfTI: {exc}")) from None
        array = np.asarray(array)
        while array.ndim > 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 3:
            raise PredictError(f"{path}: expected a 3D CT volume, got shape {array.shape}")
        hu, lps_affine = geometry.reorient(np.asarray(array, dtype=np.float32), affine, "LPS")
        hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
        uid = path.name[:-len(".nii.gz")] if path.name.endswith(".gz") else path.stem
        return geometry.Volume(hu=hu, affine=lps_affine, study_uid=uid,
                               file_numbers=np.arange(hu.shape[2], dtype=np.int64),
                               qc={"source": "nifti", "shape": list(hu.shape),
                                   "input_shape": list(array.shape),
                                   "input_affine": np.asarray(affine).tolist(),
                                   "input_axcodes": geometry.axcodes(affine)})
    try:
        return load_series(path, lenient=lenient)
    except SeriesError as err:
        skipped = [f"{s.get('file')} ({s.get('reason')})" for s in
                   err.qc.get("files_skipped", []) if isinstance(s, dict)]
        extra = f"; skipped files: {', '.join(skipped[:3])}" if skipped else ""
        hint = "" if lenient else " (try --lenient to repair what is well defined)"
        raise PredictError(f"{one_line(str(err))}{extra}{hint}") from None


def package_versions() -> dict[str, str]:
    """Installed versions of cspine and the packages its results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cspine", "torch", "monai", "pytorch-lightning", "numpy", "pydicom", "nibabel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = ""
    return out


def class_activation(engine: StudyEngine, result: StudyResult, volume, flagged: list[str],
                     method: str | None) -> tuple[dict[str, Any] | None, dict[str, np.ndarray],
                                                  np.ndarray | None, list[str]]:
    """Stage-2 CAMs of the flagged vertebrae (:mod:`stage2_classify.cam`), on the CT grid.

    Returns:
        (the ``cam`` entry of ``probabilities.json`` or None when not asked, the axial point
        (RAS mm) of highest suspicion per vertebra, the uint8 (X, Y, Z) heatmap on the volume's
        grid (0..255 = CAM 0..1) or None, warnings).
    """
    if method is None:
        return None, {}, None, []
    if not engine.differentiable:  # an exported (ONNX) bundle has no gradients
        return ({"method": method, "error": "no gradients"}, {}, None,
                [f"{volume.study_uid}: --cam needs the torch checkpoints (an ONNX bundle has no "
                 f"gradients); the overview shows centre slices and no map"])
    from stage2_classify import cam as cams_mod

    cams = cams_mod.crop_cams(engine.stage2, result.crops, flagged, method)
    heat = cams_mod.cams_on_grid(cams, result.crops, volume.affine, volume.shape) \
        if cams else None
    doc = {"method": method, "layer": cams_mod.target_layer(engine.stage2[0]) if cams else None,
           "vertebrae": list(cams),
           # all-zero maps: no positive evidence reached the layer (GradCAM's ReLU), nothing drawn
           "empty": [v for v, m in cams.items() if not m.any()],
           "scale": "0..255 = CAM 0..1 (fold mean, / its maximum)"}
    return doc, cams_mod.peak_slice_points(cams, result.crops), heat, []


def predict_study(study: str | os.PathLike, out_dir: str | os.PathLike, engine: StudyEngine,
                  threshold: float = DEFAULT_THRESHOLD, lenient: bool = False,
                  volume=None, saliency: bool = False, cam: str | None = None,
                  cam_nifti: bool = False, dicom: bool = False,
                  threshold_source: str = "default", run_id: str | None = None
                  ) -> dict[str, Any]:
    """Predict one study and write the outputs of the module docstring into ``out_dir``.

    Nothing is written under ``out_dir`` unless every output is complete: the files are made in
    a temporary sibling folder, which is renamed to ``out_dir`` (or whose files replace those
    of an existing ``out_dir``; optional outputs of an earlier run that this run does not
    write are removed, so the folder never mixes two runs).

    Args:
        study: the DICOM folder or NIfTI file.
        out_dir: output folder.
        engine: the loaded test-time engine (:meth:`StudyEngine.from_spec`).
        threshold: the operating point: flag vertebrae with p ≥ threshold.
        lenient: lenient DICOM loading.
        volume: the study already loaded by :func:`load_input` (else it is loaded here).
        saliency: deprecated alias of ``cam="gradcam"``.
        cam: ``gradcam`` / ``gradcam++``: class-activation maps of the flagged vertebrae drawn
            on the overview, each flagged vertebra's axial panel at its slice of highest CAM
            (needs torch models); None: no map, centre slices.
        cam_nifti: also write ``cam_heatmap.nii.gz`` (needs ``cam``).
        dicom: also write ``vertebrae_seg.dcm`` and ``report_sr.dcm`` (a DICOM input only;
            otherwise a warning, and the other outputs are written).
        threshold_source: where ``threshold`` came from (recorded in the JSON and the SR).
        run_id: this run's id (default: a new UUID).

    Returns:
        the ``probabilities.json`` document (``warnings``: one line per output not written).

    Raises:
        PredictError: unreadable input (one line naming the study, file and problem).
    """
    from common.nifti_io import save_nifti
    from cspine.overview import render_overview

    t_start = time.perf_counter()
    cam = cam or ("gradcam" if saliency else None)
    run_id = run_id or uuid.uuid4().hex
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictError(f"--out {out_dir} exists and is not a folder")
    t0 = time.perf_counter()
    preloaded = volume is not None
    if volume is None:
        volume = load_input(study, lenient=lenient)
    t_load = volume.qc.get("load_seconds", time.perf_counter() - t0)
    if preloaded:  # the total covers the loading done by the caller
        t_start -= t_load
    result = run_engine(engine, volume, study)
    probs = result.probabilities
    original_affine, original_shape = _input_geometry(volume)
    mask, method = geometry.labels_to_grid(result.grid_labels, result.grid_affine,
                                           original_affine, original_shape)
    flagged = result.flagged(threshold)
    t0 = time.perf_counter()
    cam_doc, points, heat, warnings = class_activation(engine, result, volume, flagged, cam)
    result.timing_s["cam"] = time.perf_counter() - t0
    doc = {
        **result.to_json(volume), "input": str(Path(study).resolve()), "run_id": run_id,
        "threshold": threshold, "threshold_source": threshold_source, "flagged": flagged,
        "mask": {"file": "vertebrae_mask.nii.gz", "shape": list(original_shape),
                 "values": {str(i + 1): v for i, v in enumerate(VERTEBRAE)},
                 "mapped_by": method},
        "overview": {"file": "overview.png",
                     "axial_slice": ("per flagged vertebra: the crop slice with the largest "
                                     "stage-2 class activation (the vertebra centre when it has "
                                     "no crop)") if points else
                                    "per flagged vertebra: its centre slice (--cam: the slice "
                                    "of largest stage-2 class activation)",
                     "axial_points_mm": {v: [round(float(c), 2) for c in p]
                                         for v, p in points.items()}},
        "cam": cam_doc,
        "input_qc": {k: volume.qc.get(k) for k in ("status", "reasons", "repairs", "warnings",
                                                   "shape", "spacing") if k in volume.qc},
        "models": engine.spec.to_json() if engine.spec is not None else None,
        "device": engine.device,
        "timing_s": {"load_models": round(engine.load_seconds, 3),
                     "load_input": round(t_load, 3),
                     **{k: round(v, 3) for k, v in result.timing_s.items()}},
        "versions": package_versions(),
        "warnings": warnings,
    }
    written = list(OUTPUT_FILES)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_nifti(tmp / "vertebrae_mask.nii.gz", mask.astype(np.uint8), original_affine)
        if cam_nifti and heat is not None:
            on_input, _ = geometry.labels_to_grid(heat, volume.affine, original_affine,
                                                  original_shape)  # exact permutation
            save_nifti(tmp / "cam_heatmap.nii.gz", on_input, original_affine)
            cam_doc["nifti"] = "cam_heatmap.nii.gz"
            written.append("cam_heatmap.nii.gz")
        elif cam_nifti:
            warnings.append(f"{volume.study_uid}: --cam-nifti: no map (no flagged vertebra "
                            f"with a crop, or no --cam); cam_heatmap.nii.gz not written")
        t0 = time.perf_counter()
        render_overview(tmp / "overview.png", volume, result.grid_labels, result.grid_affine,
                        probs, threshold, title=volume.study_uid, axial_points=points,
                        warning=implausible_warning(result.anatomy),
                        heatmap=heat, heatmap_label=f"{cam} (stage 2)" if cam else "")
        doc["timing_s"]["overview"] = round(time.perf_counter() - t0, 3)
        if dicom:
            t0 = time.perf_counter()
            from cspine.dicom_out import write_study_dicom

            doc["dicom"] = write_study_dicom(
                tmp, volume, mask, original_affine, doc["probabilities"], doc["flagged"],
                threshold, threshold_source,
                {**(doc["models"] or {}), "probabilities_source": result.probabilities_note()},
                doc["versions"], run_id, warnings)
            written += [f for f in ("vertebrae_seg.dcm", "report_sr.dcm") if (tmp / f).exists()]
            doc["timing_s"]["dicom"] = round(time.perf_counter() - t0, 3)
        doc["timing_s"]["total"] = round(time.perf_counter() - t_start, 3)
        doc["outputs"] = written
        (tmp / "probabilities.json").write_text(json.dumps(doc, indent=2) + "\n")
        _publish(tmp, out_dir, written)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return doc


def run_engine(engine: StudyEngine, volume, study: str | os.PathLike) -> StudyResult:
    """:meth:`StudyEngine.run` with model failures turned into a one-line error."""
    try:
        return engine.run(volume)
    except (ValueError, RuntimeError) as exc:
        raise PredictError(one_line(f"{study}: prediction failed: {exc}")) from None


def _input_geometry(volume) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of the input as stored (a NIfTI input before its reorientation)."""
    if "input_affine" in volume.qc:
        return np.asarray(volume.qc["input_affine"], dtype=np.float64), \
            tuple(volume.qc["input_shape"])
    return volume.affine, volume.shape


def _publish(tmp: Path, out_dir: Path, written: list[str]) -> None:
    """Move the finished outputs into ``out_dir`` (rename the folder, or replace file by file;
    optional outputs of an earlier run that this run did not write are removed)."""
    for name in written:
        os.chmod(tmp / name, 0o644)
    if not out_dir.exists():
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
        return
    for name in written:
        os.replace(tmp / name, out_dir / name)
    for name in OPTIONAL_FILES:
        if name not in written and (out_dir / name).exists():
            (out_dir / name).unlink()


def implausible_warning(anatomy: dict[str, Any] | None, most: int = 3) -> str:
    """One line on a segmentation that failed the anatomy check ("" when it passed)."""
    if not anatomy or anatomy["status"] != "implausible_segmentation":
        return ""
    reasons = anatomy["reasons"]
    more = f" (+{len(reasons) - most} more)" if len(reasons) > most else ""
    return (f"{anatomy['status']}: {'; '.join(reasons[:most])}{more} - probabilities are the "
            f"models' prior, not their output")


def format_result(doc: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """The printed summary of one prediction."""
    p = doc["probabilities"]
    lines = [f"study {doc['study']}: vertebrae found {','.join(doc['vertebrae_found']) or 'none'}"]
    warning = implausible_warning(doc.get("anatomy"))
    if warning:
        lines.append(f"WARNING: {warning} (all reasons: probabilities.json anatomy)")
    lines.append("  ".join(f"{t}={p[t]:.3f}" for t in VERTEBRAE))
    lines.append(f"patient_overall={p[OVERALL]:.3f} ({doc['patient_overall_rule']}); flagged "
                 f"(p >= {doc['threshold']}): {', '.join(doc['flagged']) or 'none'}")
    t = doc["timing_s"]
    lines.append(f"time: {t['total']:.1f} s for the study (load {t['load_input']:.1f}, stage 1 "
                 f"{t['stage1']:.1f}, crops {t['crops']:.1f}, stage 2 {t['stage2']:.1f}, cam "
                 f"{t['cam']:.1f}, dicom {t.get('dicom', 0.0):.1f}, overview "
                 f"{t['overview']:.1f}) + {t['load_models']:.1f} s "
                 f"loading models on "
                 f"{doc['device']}")
    lines.append(f"wrote {Path(out_dir) / 'probabilities.json'}, "
                 + ", ".join(f for f in doc.get("outputs", OUTPUT_FILES)
                             if f != "probabilities.json"))
    return "\n".join(lines)
