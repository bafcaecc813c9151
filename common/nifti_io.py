"""NIfTI reading and writing, RSNA mask loading, and alignment of masks onto a CT volume's grid.

Arrays are in NIfTI voxel order, which is the project's (X, Y, Z) order; affines map voxel
indices to RAS mm (see :mod:`common.geometry`). Masks are put onto the DICOM grid by both
images' affines in patient space (:func:`common.geometry.map_labels_to_grid`): a well-formed
RSNA mask is an exact signed axis permutation of the CT grid, so flipped and reversed studies
need no special cases.

Alignment QC (``align_mask``): ``bone_fraction`` is the share of cervical mask voxels (C1–C7)
whose HU is at least ``BONE_HU`` = 150. Cancellous vertebral bone is mostly above it and soft
tissue (muscle 40–80 HU, fat below 0) below it. On the real TotalSegmentator CT in
``shared/realdata`` the vertebra labels score 0.74, the same mask shifted 20 mm in y 0.35, 40
voxels in x 0.12 and mirrored front-to-back 0.01, so a score under ``BONE_FRACTION_MIN`` = 0.45
flags a mis-registered mask (``qc["flags"]`` gets ``"low_bone_fraction"``); osteoporotic bone
lowers the score, so this is a flag, not an error. ``c1_above_c7`` checks that the C1 centroid
has a larger RAS z (superior) than the C7 centroid.
"""

from __future__ import annotations

import os
from typing import Any

import nibabel as nib
import numpy as np

from common import geometry
from common.atomic import atomic_path
from common.geometry import GeometryError, Volume
from common.labels import ThoracicMode, remap_rsna_mask

BONE_HU = 150
BONE_FRACTION_MIN = 0.45


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file: (array in its stored dtype, scaling applied if set; RAS affine).

    The affine is checked by :func:`common.geometry.nifti_affine` (qform and sform must agree,
    non-singular); a bad header raises ``GeometryError`` with reason ``bad_affine``.
    """
    img = nib.load(str(path))
    affine = geometry.nifti_affine(img, where=str(path))
    return np.asanyarray(img.dataobj), affine


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
               code: int = 1) -> None:
    """Write ``array`` (X, Y, Z) with ``affine`` (voxel → RAS mm) atomically.

    qform and sform are both set to ``affine`` with the same ``code`` (1 = scanner coordinates,
    right for volumes built from DICOM; 2 = aligned to another image). Units are mm. The dtype
    is kept (int16 HU, uint8 labels); ``.nii.gz`` compresses.

    Raises:
        GeometryError: ``bad_affine`` when the affine is singular, or sheared (a qform cannot
            hold it, so qform and sform would disagree).
    """
    from common.atomic import check_writable

    check_writable(path, NIFTI_SUFFIXES)
    affine = np.asarray(affine, dtype=np.float64)
    geometry.check_affine(affine, str(path))
    rot = affine[:3, :3] / geometry.spacing_of(affine)
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-4):
        raise GeometryError("bad_affine", f"{path}: sheared affine cannot be stored as a qform")
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=int(code))
    img.set_sform(affine, code=int(code))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def load_rsna_mask(path: str | os.PathLike, thoracic: ThoracicMode = "background"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Load ``segmentations/<UID>.nii`` as model classes with its affine.

    Args:
        path: the RSNA mask (any integer storage dtype, e.g. uint8 or uint16).
        thoracic: T1–T12 (8–19) → background (``"background"``) or class 8 (``"merge"``).

    Returns:
        (uint8 classes (I, J, K) in the file's voxel order, RAS affine).

    Raises:
        UnexpectedLabelError: values outside 0–19 or non-integer values.
        GeometryError: ``bad_affine``.
    """
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: a mask must be 3-D, this one has shape {tuple(img.shape)}")
    affine = geometry.nifti_affine(img, where=str(path))
    raw = np.asanyarray(img.dataobj)
    return remap_rsna_mask(raw, thoracic, where=str(path)), affine


def align_labels(volume: Volume, labels: np.ndarray, labels_affine: np.ndarray,
                 lenient: bool = False, where: str = "") -> tuple[np.ndarray, str]:
    """Put a label array onto ``volume``'s grid; returns (labels (X, Y, Z), method).

    ``method`` is ``"permutation"`` (exact index remap) or ``"nearest"`` (nearest-neighbour
    resampling, lenient only).

    Raises:
        GeometryError: ``mask_geometry`` in strict mode when the mask is not an exact signed
            axis permutation of the CT grid (different shape, spacing, origin or rotation).
    """
    out, method = geometry.map_labels_to_grid(labels, labels_affine, volume.affine,
                                              volume.shape)
    if method != "permutation" and not lenient:
        raise GeometryError(
            "mask_geometry",
            f"{where or volume.study_uid}: mask {labels.shape} "
            f"{geometry.axcodes(labels_affine)} spacing "
            f"{np.round(geometry.spacing_of(labels_affine), 4).tolist()} is not an exact axis "
            f"permutation of the CT grid {volume.shape} {geometry.axcodes(volume.affine)} "
            f"spacing {np.round(volume.spacing, 4).tolist()} (use lenient mode to resample)")
    return out, method


#: Shifts (mm, along each array axis) at which a mask's bone fraction is compared with its own.
SHIFTS_MM = (-40.0, -30.0, -20.0, -10.0, 10.0, 20.0, 30.0, 40.0)
#: ``shifted_mask``: a shifted copy lies on bone this much more (absolute and relative).
SHIFT_GAIN_MIN = 0.15
SHIFT_RATIO_MIN = 1.25


def best_shift(hu: np.ndarray, mask: np.ndarray, affine: np.ndarray, max_voxels: int = 50_000,
               seed: int = 0) -> tuple[list[float], float]:
    """The shift (mm per array axis, one axis at a time, :data:`SHIFTS_MM`) at which the mask's
    voxels lie most on bone (HU ≥ :data:`BONE_HU`), and that bone fraction.

    A mask aligned by the wrong geometry (or shifted by hand) sits beside the vertebrae: one of
    its shifted copies then covers bone far better than the mask itself, although its own bone
    fraction can still pass :data:`BONE_FRACTION_MIN` (issue 16: a 40-mm shift at 0.60).
    Voxels that a shift moves outside the CT count as not bone.
    """
    pts = np.argwhere(mask)
    if len(pts) > max_voxels:
        pts = pts[np.random.default_rng(seed).choice(len(pts), max_voxels, replace=False)]
    spacing = geometry.spacing_of(affine)
    shape = np.asarray(hu.shape)
    best: tuple[list[float], float] = ([0.0, 0.0, 0.0], 0.0)
    for axis in range(3):
        for mm in SHIFTS_MM:
            moved = pts.copy()
            moved[:, axis] += int(round(mm / spacing[axis]))
            inside = np.all((moved >= 0) & (moved < shape), axis=1)
            if not inside.any():
                continue
            m = moved[inside]
            fraction = float((hu[m[:, 0], m[:, 1], m[:, 2]] >= BONE_HU).sum()) / len(pts)
            if fraction > best[1]:
                shift = [0.0, 0.0, 0.0]
                shift[axis] = mm
                best = (shift, round(fraction, 4))
    return best


def alignment_qc(hu: np.ndarray, classes: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """Plausibility of a mask on its CT: bone fraction and C1-above-C7 (see module docstring).

    Args:
        hu: int16 (X, Y, Z) HU.
        classes: uint8 (X, Y, Z) model classes, 1–7 = C1–C7.
        affine: the shared voxel → RAS affine.
    """
    cervical = (classes >= 1) & (classes <= 7)
    n = int(cervical.sum())
    qc: dict[str, Any] = {"mask_voxels": n, "flags": []}
    present = [int(c) for c in np.unique(classes[cervical])] if n else []
    qc["labels_present"] = present
    if n == 0:
        qc.update(bone_fraction=None, median_hu=None, c1_above_c7=None)
        qc["flags"].append("empty_mask")
        return qc
    qc["bone_fraction"] = round(float((hu[cervical] >= BONE_HU).mean()), 4)
    qc["median_hu"] = float(np.median(hu[cervical]))
    if qc["bone_fraction"] < BONE_FRACTION_MIN:
        qc["flags"].append("low_bone_fraction")
    best = best_shift(hu, cervical, affine)
    qc["best_shift_mm"], qc["best_shift_bone_fraction"] = best
    if best[1] >= qc["bone_fraction"] + SHIFT_GAIN_MIN and \
            best[1] >= qc["bone_fraction"] * SHIFT_RATIO_MIN:
        qc["flags"].append("shifted_mask")
    if 1 in present and 7 in present:
        z = {}
        for c in (1, 7):
            centroid = np.argwhere(classes == c).mean(axis=0)
            z[c] = float(geometry.voxel_to_world(affine, centroid)[2])
        qc["c1_z_mm"], qc["c7_z_mm"] = round(z[1], 2), round(z[7], 2)
        qc["c1_above_c7"] = z[1] > z[7]
        if not qc["c1_above_c7"]:
            qc["flags"].append("c1_below_c7")
    else:
        qc["c1_above_c7"] = None
    return qc


def align_mask(volume: Volume, mask_path: str | os.PathLike,
               thoracic: ThoracicMode = "background", lenient: bool = False
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Load an RSNA mask and put it onto the DICOM volume's grid, with an alignment QC record.

    Args:
        volume: the study's CT from :func:`common.dicom_io.load_series`.
        mask_path: ``segmentations/<UID>.nii``.
        thoracic: T1–T12 → ``"background"`` (0) or ``"merge"`` (class 8).
        lenient: resample with nearest neighbour when the mask is not an exact permutation of
            the CT grid (strict: reject with ``mask_geometry``).

    Returns:
        (uint8 (X, Y, Z) classes on the CT grid, qc dict: method, bone_fraction, median_hu,
        c1_above_c7, labels_present, flags, status ``ok``/``flagged``).
    """
    classes, affine = load_rsna_mask(mask_path, thoracic)
    out, method = align_labels(volume, classes, affine, lenient=lenient, where=str(mask_path))
    qc = {"study": volume.study_uid, "mask": os.fspath(mask_path), "method": method,
          "mask_shape": list(classes.shape), "mask_axcodes": geometry.axcodes(affine),
          "thoracic": thoracic}
    qc.update(alignment_qc(volume.hu, out, volume.affine))
    if method != "permutation":
        qc["flags"].append("resampled")
    qc["status"] = "flagged" if any(f != "resampled" for f in qc["flags"]) else "ok"
    return out.astype(np.uint8, copy=False), qc
