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
* ``overview.png``: see :mod:`cspine.overview`.

The checkpoints come from a training folder or a bundle written by ``cspine export-bundle``
(:mod:`cspine.models`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import geometry
from common.labels import OVERALL, VERTEBRAE
from common.nifti_io import NIFTI_SUFFIXES
from cspine.engine import StudyEngine, StudyResult
# ModelSpec and the two readers are re-exported: `from cspine.predict import models_from_work`.
from cspine.models import (ModelSpec, PredictError, models_from_bundle,  # noqa: F401
                           models_from_work, one_line)

#: Default probability above which a vertebra is "flagged" in the overview.
DEFAULT_THRESHOLD = 0.5
OUTPUT_FILES = ("probabilities.json", "vertebrae_mask.nii.gz", "overview.png")


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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cspine", "torch", "monai", "pytorch-lightning", "numpy", "pydicom", "nibabel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = ""
    return out


def saliency_points(models, crops: dict[str, Any], vertebrae: list[str]
                    ) -> dict[str, np.ndarray]:
    """World point (RAS mm) of the axial crop slice where stage 2 looks most, per vertebra.

    Input-gradient saliency: the gradient of the summed fold-model logits with respect to the
    crop's image channels, |·| summed over channels and the crop's X and Y; among the crop slices
    that hold the vertebra (its stage-1 label), the one with the largest sum is the "slice of
    highest suspicion". Returns the world position of that slice's
    centre (crop axes run along the CT axes, so it maps to one CT slice).
    """
    import torch

    if not vertebrae:
        return {}
    pre = models[0].preprocess
    n_image = pre.num_image_channels
    names = [v for v in vertebrae if crops.get(v) is not None]
    if not names:
        return {}
    # one batched forward/backward per fold model: in eval mode the samples do not interact
    x = torch.stack([pre(crops[v][0], crops[v][1], v) for v in names]).requires_grad_(True)
    index = torch.tensor([VERTEBRAE.index(v) for v in names])
    with torch.enable_grad():
        for m in models:
            m(x, index).sum().backward()
    per_slice = x.grad[:, :n_image].abs().sum(dim=(1, 2, 3)).numpy()  # (vertebrae, crop Z)
    out = {}
    for v, row in zip(names, per_slice):
        image, mask, affine = crops[v]
        inside = (np.asarray(mask) == VERTEBRAE.index(v) + 1).any(axis=(0, 1))
        row = np.where(inside, row, -np.inf) if inside.any() else row  # slices of this vertebra
        centre = np.array([(image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2,
                           int(np.argmax(row)), 1.0])
        out[v] = (np.asarray(affine) @ centre)[:3]
    return out


def predict_study(study: str | os.PathLike, out_dir: str | os.PathLike, engine: StudyEngine,
                  threshold: float = DEFAULT_THRESHOLD, lenient: bool = False,
                  volume=None, saliency: bool = False) -> dict[str, Any]:
    """Predict one study and write the outputs of the module docstring into ``out_dir``.

    Nothing is written under ``out_dir`` unless every output is complete: the files are made in
    a temporary sibling folder, which is renamed to ``out_dir`` (or whose files replace those
    of an existing ``out_dir``).

    Args:
        study: the DICOM folder or NIfTI file.
        out_dir: output folder.
        engine: the loaded test-time engine (:meth:`StudyEngine.from_spec`).
        threshold: flag vertebrae with p ≥ threshold.
        lenient: lenient DICOM loading.
        volume: the study already loaded by :func:`load_input` (else it is loaded here).
        saliency: pick each flagged vertebra's axial slice by stage-2 input-gradient saliency
            (:func:`saliency_points`; needs torch models) instead of its centre.

    Returns:
        the ``probabilities.json`` document.

    Raises:
        PredictError: unreadable input (one line naming the study, file and problem).
    """
    from common.nifti_io import save_nifti
    from cspine.overview import render_overview

    t_start = time.perf_counter()
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
    # the prior of an implausible segmentation says nothing about this study: nothing is flagged
    flagged = [] if result.implausible else [v for v in VERTEBRAE if probs[v] >= threshold]
    t0 = time.perf_counter()
    # an exported (ONNX) bundle has no gradients: centre slices
    points = saliency_points(engine.stage2, result.crops, flagged) \
        if saliency and engine.differentiable else {}
    result.timing_s["saliency"] = time.perf_counter() - t0
    doc = {
        **result.to_json(volume), "input": str(Path(study).resolve()),
        "threshold": threshold, "flagged": flagged,
        "mask": {"file": "vertebrae_mask.nii.gz", "shape": list(original_shape),
                 "values": {str(i + 1): v for i, v in enumerate(VERTEBRAE)},
                 "mapped_by": method},
        "overview": {"file": "overview.png",
                     "axial_slice": ("per flagged vertebra: the crop slice with the largest "
                                     "stage-2 input-gradient saliency (the vertebra centre "
                                     "when it has no crop)") if points else
                                    "per flagged vertebra: its centre slice (--saliency: the "
                                    "slice of largest stage-2 input-gradient saliency)",
                     "axial_points_mm": {v: [round(float(c), 2) for c in p]
                                         for v, p in points.items()}},
        "input_qc": {k: volume.qc.get(k) for k in ("status", "reasons", "repairs", "warnings",
                                                   "shape", "spacing") if k in volume.qc},
        "models": engine.spec.to_json() if engine.spec is not None else None,
        "device": engine.device,
        "timing_s": {"load_models": round(engine.load_seconds, 3),
                     "load_input": round(t_load, 3),
                     **{k: round(v, 3) for k, v in result.timing_s.items()}},
        "versions": _versions(),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_nifti(tmp / "vertebrae_mask.nii.gz", mask.astype(np.uint8), original_affine)
        t0 = time.perf_counter()
        render_overview(tmp / "overview.png", volume, result.grid_labels, result.grid_affine,
                        probs, threshold, title=volume.study_uid, axial_points=points,
                        warning=implausible_warning(result.anatomy))
        doc["timing_s"]["overview"] = round(time.perf_counter() - t0, 3)
        doc["timing_s"]["total"] = round(time.perf_counter() - t_start, 3)
        (tmp / "probabilities.json").write_text(json.dumps(doc, indent=2) + "\n")
        _publish(tmp, out_dir)
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


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished outputs into ``out_dir`` (rename the folder, or replace file by file)."""
    for name in OUTPUT_FILES:
        os.chmod(tmp / name, 0o644)
    if not out_dir.exists():
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
        return
    for name in OUTPUT_FILES:
        os.replace(tmp / name, out_dir / name)


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
                 f"{t['stage1']:.1f}, crops {t['crops']:.1f}, stage 2 {t['stage2']:.1f}, saliency "
                 f"{t['saliency']:.1f}, overview {t['overview']:.1f}) + {t['load_models']:.1f} s "
                 f"loading models on "
                 f"{doc['device']}")
    lines.append(f"wrote {Path(out_dir) / 'probabilities.json'}, vertebrae_mask.nii.gz, "
                 f"overview.png")
    return "\n".join(lines)
