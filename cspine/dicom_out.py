"""DICOM outputs of a prediction: a SEG of the vertebra mask and a structured report (highdicom).

Both reference the source series of the CT, read from the files the loader decoded
(:attr:`common.geometry.Volume.source_files`, in its sorted slice order) with
``pydicom.dcmread(stop_before_pixels=True)``; no pixel data is read again.

* **SEG** (:func:`write_seg`): one segment per vertebra C1..C7 present in the mask, each with
  the SNOMED CT code of that vertebra (property category "Anatomical Structure"), algorithm type
  AUTOMATIC. Frame ``n`` of the SEG lies on source slice ``n`` (its ImagePositionPatient,
  orientation and pixel grid: the labels are sampled onto each source slice by the affines,
  :func:`common.geometry.labels_on_slices`) and references that slice's SOPInstanceUID. Empty
  frames are left out (highdicom's default), as viewers expect.
* **SR** (:func:`write_sr`): a Comprehensive SR holding a TID 1500 Measurement Report (the
  template viewers such as OHIF and 3D Slicer display): one measurement group per target
  (C1..C7, ``patient_overall``) with finding type "Fracture of bone", the finding site (the
  vertebra, or the cervical spine for ``patient_overall``), the probability (DCM "Probability",
  unit UCUM ``1``) and, for vertebrae, a qualitative evaluation "Flagged" Yes/No at the
  operating point. The algorithm identification of every group names the model versions, the
  run id, the operating point and where it came from (``threshold_source``).

Headers the sparse RSNA files lack (FrameOfReferenceUID, Modality, the type-2 patient and study
attributes) and the empty SOPClassUID of some real series are filled in a *copy* of the headers
before highdicom sees them, and every such fill is returned in the info dict (written to
``probabilities.json``). A missing FrameOfReferenceUID becomes a UID derived from the
SeriesInstanceUID (the same for every output of that series), so SEG and SR agree.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common import geometry
from common.labels import OVERALL, TARGETS, VERTEBRAE

#: Series numbers of the outputs (viewers sort series by number; high numbers sort last).
SEG_SERIES_NUMBER = 9101
SR_SERIES_NUMBER = 9102
MANUFACTURER = "cspine"
#: Attributes of type 2 (must be present, may be empty) that highdicom copies from the source.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "AccessionNumber", "StudyID")
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class DicomOutputError(ValueError):
    """A DICOM output that cannot be made for this input (one line naming study and problem)."""


def read_source_headers(volume: geometry.Volume) -> list:
    """The source slices' headers (pydicom Datasets without pixel data), in the loader's order.

    Raises:
        DicomOutputError: the volume has no source DICOM (a NIfTI input) or a file is unreadable.
    """
    import pydicom

    if not volume.source_files:
        raise DicomOutputError(
            f"{volume.study_uid}: no source DICOM series to reference (the input is not a "
            f"DICOM folder, or its decode-cache entry predates the stored source files); DICOM "
            f"SEG/SR need the study's DICOM folder as input")
    out = []
    for path in volume.source_files:
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken files
            raise DicomOutputError(f"{volume.study_uid}: source file {path} unreadable for the "
                                   f"DICOM outputs: {type(exc).__name__}: {exc}") from None
    return out


def prepare_headers(headers: Sequence) -> tuple[list, list[str]]:
    """Copies of the source headers with what highdicom requires filled in.

    * an empty SOPInstanceUID or SOPClassUID: the file meta's MediaStorage value (the file's
      own identity; some anonymisers blank the dataset's copy);
    * an empty StudyInstanceUID or SeriesInstanceUID (anonymised away): a UID derived from the
      slices' instance UIDs, so every output of this series gets the same one. Viewers can
      then match the outputs to the CT only by frame of reference and position;
    * no FrameOfReferenceUID (the sparse RSNA header): a UID derived from the series UID;
    * no Modality: ``CT``; absent type-2 patient/study attributes: present and empty.

    Returns:
        (the copies, one line per kind of fill made, with the count of files).

    Raises:
        DicomOutputError: a slice without any SOP instance UID.
    """
    from pydicom.uid import generate_uid

    fixed = [copy.deepcopy(h) for h in headers]
    counts: dict[str, int] = {}

    def note(text: str) -> None:
        counts[text] = counts.get(text, 0) + 1

    for ds in fixed:
        meta = getattr(ds, "file_meta", None)
        for tag, fallback in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                              ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not str(ds.get(tag, "")):
                value = str(meta.get(fallback, "")) if meta is not None else ""
                if not value and tag == "SOPClassUID":
                    value = _CT_IMAGE_STORAGE
                if not value:
                    raise DicomOutputError(f"{getattr(ds, 'filename', '?')}: no SOPInstanceUID "
                                           f"(nor a MediaStorageSOPInstanceUID) to reference")
                setattr(ds, tag, value)
                note(f"{tag} empty: set from {fallback}")
    instances = sorted(str(ds.SOPInstanceUID) for ds in fixed)
    derived = {tag: generate_uid(entropy_srcs=[f"cspine {tag}", *instances])
               for tag in ("StudyInstanceUID", "SeriesInstanceUID")}
    for ds in fixed:
        for tag, uid in derived.items():
            if not str(ds.get(tag, "")):
                setattr(ds, tag, uid)
                note(f"{tag} empty: set to {uid} (derived from the instance UIDs; viewers match "
                     f"the outputs to the CT by frame of reference and position only)")
    for_uid = generate_uid(entropy_srcs=["cspine frame of reference",
                                         str(fixed[0].SeriesInstanceUID)])
    for ds in fixed:
        if not str(ds.get("FrameOfReferenceUID", "")):
            ds.FrameOfReferenceUID = for_uid
            note(f"FrameOfReferenceUID missing: set to {for_uid} (derived from the series UID)")
        if not str(ds.get("Modality", "")):
            ds.Modality = "CT"
            note("Modality missing: set to CT")
        for tag in _TYPE2:
            if tag not in ds:
                setattr(ds, tag, "")
    return fixed, [f"{k} ({n} of {len(fixed)} files)" for k, n in counts.items()]


def _slice_geometry(headers: Sequence) -> tuple[np.ndarray, list[float], list[float], int, int]:
    """(positions (N, 3) LPS mm, IOP, PixelSpacing, Rows, Columns) of the source slices."""
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    h0 = headers[0]
    return (positions, [float(v) for v in h0.ImageOrientationPatient],
            [float(v) for v in h0.PixelSpacing], int(h0.Rows), int(h0.Columns))


def _algorithm(versions: Mapping[str, str]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name="cspine stage 1 (3D UNet)", version=str(versions.get("cspine", "") or "unknown"),
        family=codes.cid7162.ArtificialIntelligence)


def write_seg(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray,
              headers: Sequence, versions: Mapping[str, str], run_id: str) -> dict[str, Any]:
    """Write the vertebra mask as a DICOM SEG (binary, one segment per vertebra present).

    Args:
        path: output ``.dcm`` (written atomically).
        labels: uint8 (X, Y, Z) classes 0 background, 1..7 = C1..C7, on the grid of ``affine``
            (voxel → RAS mm); any grid works, the frames are sampled onto the source slices.
        affine: float64 (4, 4) of ``labels``.
        headers: the source slices' headers (:func:`read_source_headers`), loader order.
        versions: package versions (``cspine`` names the software version).
        run_id: this prediction's run id (recorded as the SEG's SeriesDescription suffix).

    Returns:
        info: file name, SOPInstanceUID, segments (vertebra → segment number), frames written,
        header fills.

    Raises:
        DicomOutputError: the mask has no vertebra, or highdicom refuses the sources.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from common.atomic import atomic_path

    sources, notes = prepare_headers(headers)
    positions, iop, spacing, rows, cols = _slice_geometry(sources)
    frames = geometry.labels_on_slices(labels, affine, positions, iop, spacing, rows, cols)
    present = [v for i, v in enumerate(VERTEBRAE, start=1) if (frames == i).any()]
    if not present:
        raise DicomOutputError(f"{sources[0].get('StudyInstanceUID', '')}: no vertebra in the "
                               f"mask on the source slices; no SEG written")
    # segment numbers 1..n in C1..C7 order over the vertebrae present (DICOM wants them dense)
    remap = np.zeros(len(VERTEBRAE) + 1, dtype=np.uint8)
    for n, v in enumerate(present, start=1):
        remap[VERTEBRAE.index(v) + 1] = n
    algorithm = _algorithm(versions)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=v,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=getattr(codes.SCT, f"{v}Vertebra"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=f"{v} vertebra",
        tracking_uid=hd.UID()) for n, v in enumerate(present, start=1)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*")
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=remap[frames],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name="cspine predict",
            software_versions=str(versions.get("cspine", "") or "unknown"),
            device_serial_number="none", series_description=f"cspine C1-C7 {run_id[:8]}",
            content_label="VERTEBRAE")
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return {"file": Path(path).name, "sop_instance_uid": str(seg.SOPInstanceUID),
            "segments": {v: n for n, v in enumerate(present, start=1)},
            "frames": int(seg.NumberOfFrames), "source_slices": len(sources),
            "header_fills": notes}


#: Local codes (coding scheme "99CSPINE": the DICOM convention for private schemes).
LOCAL_SCHEME = "99CSPINE"


def _local(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


def model_versions(paths: Sequence[str | os.PathLike]) -> list[str]:
    """``<fold folder>/<file>@<sha256 prefix>`` of each checkpoint (``<file>`` alone outside a
    ``checkpoints/`` folder; no digest for a file that is gone): the model version the report
    names, since file names such as ``last.ckpt`` repeat across runs."""
    import hashlib

    out = []
    for p in paths:
        path = Path(p)
        name = f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" \
            else path.name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            name += f"@sha256:{digest.hexdigest()[:12]}"
        out.append(name)
    return out


def write_sr(path: str | os.PathLike, probabilities: Mapping[str, float],
             flagged: Sequence[str], threshold: float, threshold_source: str,
             headers: Sequence, models: Mapping[str, Any], versions: Mapping[str, str],
             run_id: str) -> dict[str, Any]:
    """Write the eight probabilities as a DICOM Comprehensive SR (TID 1500 Measurement Report).

    Args:
        path: output ``.dcm`` (written atomically).
        probabilities: target (C1..C7, patient_overall) → probability in [0, 1].
        flagged: the vertebrae with p ≥ ``threshold``.
        threshold: the operating point.
        threshold_source: where it came from (``metrics.json``, ``default`` or ``--threshold``).
        headers: the source slices' headers (:func:`read_source_headers`): the evidence (the
            study and series the report is about).
        models: model description (the ``models`` entry of ``probabilities.json``: checkpoint
            files, rule, clip).
        versions: package versions.
        run_id: this prediction's run id.

    Returns:
        info: file name, SOPInstanceUID, header fills.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from common.atomic import atomic_path

    sources, notes = prepare_headers(headers)
    stage1 = model_versions([models["stage1"]]) if models.get("stage1") else []
    parameters = [f"run_id={run_id}", f"operating_point={threshold:g}",
                  f"threshold_source={threshold_source}",
                  f"patient_overall_rule={models.get('rule', '')}",
                  f"stage1={','.join(stage1)}",
                  f"stage2={','.join(model_versions(models.get('stage2', [])))}",
                  f"torch={versions.get('torch', '')}", f"monai={versions.get('monai', '')}"]
    if models.get("probabilities_source"):  # "prior (implausible_segmentation: ...)" or "model"
        parameters.append(f"probabilities_source={models['probabilities_source']}")
    algorithm = hd.sr.AlgorithmIdentification(
        name="cspine fracture classifier", version=str(versions.get("cspine") or "unknown"),
        parameters=parameters)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name="cspine predict", manufacturer_name=MANUFACTURER,
        model_name="cspine", serial_number=run_id)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    fracture = hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
    groups = []
    for target in TARGETS:
        site = codes.SCT.CervicalSpine if target == OVERALL else \
            getattr(codes.SCT, f"{target}Vertebra")
        evaluations = None
        if target != OVERALL:
            evaluations = [hd.sr.QualitativeEvaluation(
                name=_local("FLAGGED", f"Flagged at operating point {threshold:g}"),
                value=codes.SCT.Yes if target in flagged else codes.SCT.No)]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(),
                                                         identifier=f"{target} fracture"),
            finding_type=fracture, algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(site)],
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability,
                                            value=float(probabilities[target]),
                                            unit=codes.UCUM.NoUnits, algorithm_id=algorithm)],
            qualitative_evaluations=evaluations))
    report = hd.sr.MeasurementReport(observation_context=context,
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*")
        sr = hd.sr.ComprehensiveSR(
            evidence=sources, content=report, series_instance_uid=hd.UID(),
            series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True,
            series_description=f"cspine fracture probabilities {run_id[:8]}")
    with atomic_path(path, suffix=".dcm") as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return {"file": Path(path).name, "sop_instance_uid": str(sr.SOPInstanceUID),
            "header_fills": notes}


def read_sr_probabilities(path: str | os.PathLike) -> dict[str, Any]:
    """Parse an SR written by :func:`write_sr` back: target → probability and flag.

    Returns:
        ``{"probabilities": {target: float}, "flagged": [vertebra, ...], "parameters": [...],
        "study_uid": str}``.
    """
    import highdicom as hd

    sr = hd.sr.srread(path)
    probs: dict[str, float] = {}
    flagged: list[str] = []
    parameters: list[str] = []
    for group in sr.content.get_image_measurement_groups():
        target = str(group.tracking_identifier).removesuffix(" fracture")
        for m in group.get_measurements():
            probs[target] = float(m.value)
        for q in group.get_qualitative_evaluations():
            if q.value.meaning == "Yes":
                flagged.append(target)
    stack = list(sr.ContentSequence)
    while stack:  # the algorithm parameters: TEXT items anywhere in the content tree
        item = stack.pop(0)
        stack.extend(item.get("ContentSequence", []))
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item \
            else ""
        if item.ValueType == "TEXT" and name == "Algorithm Parameters" and \
                item.TextValue not in parameters:
            parameters.append(str(item.TextValue))
    return {"probabilities": probs, "flagged": flagged, "parameters": parameters,
            "study_uid": str(sr.StudyInstanceUID)}


def write_study_dicom(folder: str | os.PathLike, volume: geometry.Volume, labels: np.ndarray,
                      affine: np.ndarray, probabilities: Mapping[str, float],
                      flagged: Sequence[str], threshold: float, threshold_source: str,
                      models: Mapping[str, Any], versions: Mapping[str, str], run_id: str,
                      problems: list[str]) -> dict[str, Any]:
    """``vertebrae_seg.dcm`` and ``report_sr.dcm`` of one study into ``folder``.

    A problem (no source DICOM, no vertebra, headers highdicom refuses) becomes one line in
    ``problems`` and the ``error`` of that output's entry, never an exception, so the caller's
    other outputs are still written.

    Returns:
        ``{"seg": info, "sr": info}`` (:func:`write_seg`, :func:`write_sr`), or
        ``{"error": line}`` when the source headers cannot be read.
    """
    folder = Path(folder)
    try:
        headers = read_source_headers(volume)
    except DicomOutputError as err:
        problems.append(f"{err} (--dicom: no SEG/SR written; the other outputs are)")
        return {"error": str(err)}
    jobs = (("seg", lambda: write_seg(folder / "vertebrae_seg.dcm", labels, affine, headers,
                                      versions, run_id)),
            ("sr", lambda: write_sr(folder / "report_sr.dcm", probabilities, flagged, threshold,
                                    threshold_source, headers, models, versions, run_id)))
    out: dict[str, Any] = {}
    for key, write in jobs:
        try:
            out[key] = write()
        except (DicomOutputError, ValueError, AttributeError, TypeError) as exc:
            # highdicom raises ValueError/AttributeError on headers it cannot use
            line = " ".join(f"{volume.study_uid}: --dicom: {key.upper()} not written: "
                            f"{type(exc).__name__}: {exc}".split())
            problems.append(line)
            out[key] = {"error": line}
    return out
