"""The one module that owns geometry: slice order, orientation, affines, resampling, voxel↔mm.

Conventions (the whole project follows them; nothing else flips, transposes or orders slices):

* **World frame: RAS+ millimetres**, as in NIfTI, nibabel and MONAI. DICOM positions are LPS; they
  are converted here, once, with ``LPS_TO_RAS``.
* **Array axis order (X, Y, Z)** for a DICOM series: ``X`` = column index (along the first
  ImageOrientationPatient vector), ``Y`` = row index (along the second IOP vector), ``Z`` = slice
  index after sorting the slices by ImagePositionPatient projected on the slice normal
  ``n = row_dir × col_dir``, **ascending** (k = 0 is the lowest projection; for RSNA's axial
  IOP (1,0,0,0,1,0) that is the most inferior slice). File names and InstanceNumber are never
  used for geometry; the file number survives only as ``Volume.file_numbers[k]``.
* **Affine**: a 4×4 float64 matrix mapping voxel indices (i, j, k) (voxel centres) to RAS mm.
  Tensors in the models are (C, X, Y, Z).
* Labels are resampled with nearest neighbour only; images with linear interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

#: DICOM patient coordinates (LPS) → NIfTI/RAS world, and back (the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AIR_HU = -1024


class GeometryError(ValueError):
    """Geometry that cannot be interpreted safely (bad affine, mask that does not fit the CT)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Volume:
    """A CT volume with the geometry needed to map it anywhere.

    Attributes:
        hu: int16 array (X, Y, Z) in Hounsfield units (rescale applied, padding mapped to -1024).
        affine: float64 (4, 4), voxel (i, j, k) → RAS mm.
        file_numbers: int64 (Z,), the ``<n>`` of ``<n>.dcm`` for each sorted slice (the key into
            ``train_bounding_boxes.csv``); ``-1`` where a slice was synthesised by repair.
        study_uid: the study folder name.
        qc: the per-study QC record (a plain dict, JSON serialisable).
        source_files: paths of the DICOM files the volume was decoded from, one per source
            slice, in the loader's order (ascending along the slice normal). For a stack the
            loader resampled (lenient repairs) these are the source slices, not the volume's;
            empty for a NIfTI input. DICOM outputs (SEG, SR) reference these files.
    """

    hu: np.ndarray
    affine: np.ndarray
    file_numbers: np.ndarray
    study_uid: str = ""
    qc: dict[str, Any] = field(default_factory=dict)
    source_files: tuple[str, ...] = ()

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (sx, sy, sz) in mm, in array axis order."""
        return spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- DICOM → affine
def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit slice normal (LPS) from ImageOrientationPatient: row_dir × col_dir."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def project_positions(positions_lps: np.ndarray, iop: Sequence[float]) -> np.ndarray:
    """Signed distance (mm) of each ImagePositionPatient along the slice normal; shape (N,)."""
    return np.asarray(positions_lps, dtype=float) @ slice_normal(iop)


def sort_slices(positions_lps: np.ndarray, iop: Sequence[float]) -> np.ndarray:
    """Indices that order slices by ascending position along the slice normal (stable)."""
    return np.argsort(project_positions(positions_lps, iop), kind="stable")


def in_plane_drift(positions_lps_sorted: np.ndarray, iop: Sequence[float]) -> np.ndarray:
    """Per-step displacement (mm) perpendicular to the slice normal; shape (N-1,).

    Non-zero drift means a gantry tilt or an oblique stack: the slices do not stack along
    their own normal.
    """
    steps = np.diff(np.asarray(positions_lps_sorted, dtype=float), axis=0)
    n = slice_normal(iop)
    perp = steps - np.outer(steps @ n, n)
    return np.linalg.norm(perp, axis=1)


def tilt_angle_deg(positions_lps_sorted: np.ndarray, iop: Sequence[float]) -> float:
    """Angle (degrees) between the first-to-last slice displacement and the slice normal."""
    p = np.asarray(positions_lps_sorted, dtype=float)
    if len(p) < 2:
        return 0.0
    d = p[-1] - p[0]
    norm = np.linalg.norm(d)
    if norm == 0:
        return 0.0
    cos = abs(float(d @ slice_normal(iop))) / norm
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def affine_from_dicom(iop: Sequence[float], pixel_spacing: Sequence[float],
                      first_position_lps: Sequence[float], slice_step_mm: float) -> np.ndarray:
    """Voxel (X, Y, Z) → RAS affine of a sorted, evenly spaced, non-tilted DICOM stack.

    Args:
        iop: ImageOrientationPatient (6 floats, LPS direction cosines of rows then columns).
        pixel_spacing: PixelSpacing [row spacing, column spacing] in mm (DICOM order).
        first_position_lps: ImagePositionPatient of slice k = 0 (the lowest along the normal).
        slice_step_mm: distance between consecutive sorted slices along the normal (> 0).
    """
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    lps = np.eye(4)
    lps[:3, 0] = row * float(pixel_spacing[1])  # i runs along a row: column spacing
    lps[:3, 1] = col * float(pixel_spacing[0])  # j runs down a column: row spacing
    lps[:3, 2] = slice_normal(iop) * float(slice_step_mm)
    lps[:3, 3] = np.asarray(first_position_lps, dtype=float)
    return LPS_TO_RAS @ lps


def dicom_position_of_slice(affine: np.ndarray, k: int) -> np.ndarray:
    """ImagePositionPatient (LPS mm) of sorted slice ``k`` of a volume with this RAS affine."""
    return (LPS_TO_RAS @ affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3]


# ----------------------------------------------------------------------------- voxel ↔ mm
def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis: the column norms of the 3×3 part."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map voxel indices (..., 3) to RAS mm (..., 3)."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map RAS mm (..., 3) to (fractional) voxel indices (..., 3)."""
    inv = np.linalg.inv(affine)
    return np.asarray(xyz, dtype=float) @ inv[:3, :3].T + inv[:3, 3]


def translate_affine(affine: np.ndarray, start_ijk: Sequence[float]) -> np.ndarray:
    """Affine of a sub-array that starts at voxel ``start_ijk`` of the array with ``affine``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start_ijk, dtype=float)
    return affine @ shift


def box_corners_world(affine: np.ndarray, lo_ijk: Sequence[float], hi_ijk: Sequence[float]
                      ) -> np.ndarray:
    """The 8 corners (8, 3) in RAS mm of the voxel box [lo, hi] (inclusive voxel centres)."""
    lo, hi = np.asarray(lo_ijk, float), np.asarray(hi_ijk, float)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                        for c in (lo[2], hi[2])])
    return voxel_to_world(affine, corners)


def world_box_to_voxel_box(affine: np.ndarray, lo_mm: Sequence[float], hi_mm: Sequence[float],
                           shape: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box → inclusive integer voxel box of an array (clipped to ``shape``)."""
    corners = np.array([[a, b, c] for a in (lo_mm[0], hi_mm[0]) for b in (lo_mm[1], hi_mm[1])
                        for c in (lo_mm[2], hi_mm[2])])
    v = world_to_voxel(affine, corners)
    lo = np.floor(v.min(axis=0) + 1e-6).astype(int)
    hi = np.ceil(v.max(axis=0) - 1e-6).astype(int)
    if shape is not None:
        lo = np.clip(lo, 0, np.asarray(shape) - 1)
        hi = np.clip(hi, 0, np.asarray(shape) - 1)
    return lo, hi


# ----------------------------------------------------------------------------- resampling
def resample_to_grid(array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                     dst_shape: Sequence[int], order: int = 1, cval: float = 0.0,
                     dtype: Any = None) -> np.ndarray:
    """Resample ``array`` (X, Y, Z) from its grid onto another grid, both given by RAS affines.

    Each output voxel centre is mapped through patient space into the source grid
    (``inv(src_affine) @ dst_affine``) and sampled there. ``order=0`` (nearest) for labels,
    ``order=1`` (linear) for images. Points outside the source get ``cval``.
    """
    m = np.linalg.inv(src_affine) @ dst_affine
    # Only the source voxels under the destination grid (plus a 2-voxel apron for the
    # interpolation kernel) take part: slice them out first, so a small crop of a large CT
    # costs what the crop costs, not what the CT costs. The result is identical.
    dst_shape = tuple(int(s) for s in dst_shape)
    corners = np.array([[a, b, c] for a in (0, dst_shape[0] - 1) for b in (0, dst_shape[1] - 1)
                        for c in (0, dst_shape[2] - 1)], float)
    src = corners @ m[:3, :3].T + m[:3, 3]
    lo = np.clip(np.floor(src.min(axis=0)).astype(int) - 2, 0, np.asarray(array.shape))
    hi = np.clip(np.ceil(src.max(axis=0)).astype(int) + 3, 0, np.asarray(array.shape))
    out_dtype = np.dtype(dtype) if dtype is not None else array.dtype
    if np.any(hi <= lo):  # the destination lies entirely outside the source
        return np.full(dst_shape, cval, dtype=out_dtype)
    sub = array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return ndimage.affine_transform(
        sub, m[:3, :3], offset=m[:3, 3] - lo, output_shape=dst_shape,
        order=order, mode="constant", cval=cval, prefilter=False, output=out_dtype)


def resample_onto_footprint(array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                            dst_shape: Sequence[int], order: int = 1
                            ) -> tuple[np.ndarray, np.ndarray] | None:
    """Resample a small array (e.g. a crop's heatmap) onto only the part of a large grid it covers.

    The destination box is the set of destination voxels whose centres can lie inside the
    source grid (the source's 8 corner centres mapped through patient space, rounded outwards,
    clipped to ``dst_shape``); only that box is resampled (:func:`resample_to_grid`, ``cval``
    0), so a 48³ crop costs what the crop costs on a 512² × 300 CT.

    Args:
        array: float (X, Y, Z) on the grid of ``src_affine`` (voxel → RAS mm).
        dst_affine: float64 (4, 4) voxel → RAS mm of the large grid; ``dst_shape`` its (X, Y, Z).
        order: interpolation order (1 linear, 0 nearest).

    Returns:
        (float32 patch (x, y, z), int64 (3,) start index of the patch on the destination grid),
        or None when the source lies outside the destination.
    """
    corners = box_corners_world(src_affine, [0, 0, 0], np.asarray(array.shape) - 1)
    ijk = world_to_voxel(dst_affine, corners)
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(np.int64), 0, np.asarray(dst_shape))
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(np.int64) + 1, 0, np.asarray(dst_shape))
    if np.any(hi <= lo):
        return None
    patch = resample_to_grid(np.asarray(array, dtype=np.float32), src_affine,
                             translate_affine(dst_affine, lo), hi - lo, order=order, cval=0.0)
    return patch.astype(np.float32, copy=False), lo


def grid_for_shape(affine: np.ndarray, shape: Sequence[int], out_shape: Sequence[int]
                   ) -> np.ndarray:
    """Affine of a grid with ``out_shape`` voxels covering the same field of view as ``shape``.

    Voxel corners are aligned: the outer faces of both grids coincide.
    """
    scale = np.asarray(shape, float) / np.asarray(out_shape, float)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = 0.5 * scale - 0.5
    return affine @ m


def grid_for_spacing(affine: np.ndarray, shape: Sequence[int], spacing_mm: Sequence[float]
                     ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of a grid with the given voxel size covering the same field of view."""
    extent = spacing_of(affine) * np.asarray(shape, float)
    out_shape = np.maximum(1, np.round(extent / np.asarray(spacing_mm, float))).astype(int)
    return grid_for_shape(affine, shape, out_shape), tuple(int(s) for s in out_shape)


def resample_to_shape(array: np.ndarray, affine: np.ndarray, out_shape: Sequence[int],
                      order: int = 1, cval: float = 0.0, dtype: Any = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Resize (X, Y, Z) to ``out_shape`` over the same field of view; returns (array, affine)."""
    dst = grid_for_shape(affine, array.shape, out_shape)
    return resample_to_grid(array, affine, dst, out_shape, order=order, cval=cval,
                            dtype=dtype), dst


def box_grid(affine: np.ndarray, lo_ijk: Sequence[float], hi_ijk: Sequence[float],
             margin_mm: float | Sequence[float], out_shape: Sequence[int]) -> np.ndarray:
    """Affine of a grid with ``out_shape`` voxels spanning a voxel box plus a margin in mm.

    The box [lo, hi] (inclusive voxel centres of the array with ``affine``) is grown by
    ``margin_mm`` on every side and sampled with ``out_shape`` voxels along the same axes, so the
    crop keeps the source orientation (axis i of the crop runs along axis i of the source).
    """
    sp = spacing_of(affine)
    margin_vox = np.broadcast_to(np.asarray(margin_mm, float), (3,)) / sp
    lo = np.asarray(lo_ijk, float) - 0.5 - margin_vox  # voxel faces
    hi = np.asarray(hi_ijk, float) + 0.5 + margin_vox
    scale = (hi - lo) / np.asarray(out_shape, float)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = lo + 0.5 * scale
    return affine @ m


def crop_box(array: np.ndarray, affine: np.ndarray, lo_ijk: Sequence[float],
             hi_ijk: Sequence[float], margin_mm: float | Sequence[float],
             out_shape: Sequence[int], order: int = 1, cval: float = 0.0,
             dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut a voxel box plus margin out of ``array`` and resample it to ``out_shape``.

    Returns:
        (crop (out_shape) in ``dtype``, crop affine voxel → RAS mm).
    """
    dst = box_grid(affine, lo_ijk, hi_ijk, margin_mm, out_shape)
    return resample_to_grid(array, affine, dst, out_shape, order=order, cval=cval,
                            dtype=dtype), dst


# ----------------------------------------------------------------------------- masks
def label_bbox(mask: np.ndarray, label: int | None = None
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive voxel bounding box (lo, hi) of ``mask == label`` (or ``mask > 0``); None if empty."""
    sel = mask > 0 if label is None else mask == label
    if not sel.any():
        return None
    idx = [np.flatnonzero(sel.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return np.array([i[0] for i in idx]), np.array([i[-1] for i in idx])


def check_affine(affine: np.ndarray, where: str = "") -> None:
    """Reject a singular or non-finite affine (``bad_affine``)."""
    a = np.asarray(affine, float)
    if a.shape != (4, 4) or not np.isfinite(a).all() or abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise GeometryError("bad_affine", f"{where}: singular or non-finite affine {a.tolist()}")


def nifti_affine(img: nib.Nifti1Image, where: str = "", atol: float = 1e-3) -> np.ndarray:
    """The voxel → RAS affine of a NIfTI image, after checking its qform and sform agree.

    nibabel picks the sform when its code > 0, else the qform. If both are set and disagree by
    more than ``atol`` mm the file is ambiguous and rejected (``bad_affine``).
    """
    hdr = img.header
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode > 0 and scode > 0:
        q, s = img.get_qform(), img.get_sform()
        if not np.allclose(q, s, atol=atol):
            raise GeometryError("bad_affine", f"{where}: qform and sform disagree")
    affine = np.asarray(img.affine, dtype=float)
    check_affine(affine, where)
    return affine


def permutation_map(src_affine: np.ndarray, src_shape: Sequence[int], dst_affine: np.ndarray,
                    dst_shape: Sequence[int], atol: float = 1e-3
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """If src voxels map onto dst voxels by a signed axis permutation, return it.

    Returns:
        (perm, flip) with ``dst_axis d`` taken from ``src axis perm[d]`` and reversed where
        ``flip[d]``, such that the remapped array covers ``dst_shape`` exactly; or ``None`` when
        the composed transform is not an exact signed permutation with integer offsets that
        tiles the destination grid.
    """
    m = np.linalg.inv(dst_affine) @ src_affine  # src voxel → dst voxel
    r, t = m[:3, :3], m[:3, 3]
    if not np.allclose(np.abs(r).sum(axis=0), 1, atol=atol) or not np.allclose(
            np.abs(np.round(r)), np.abs(r), atol=atol):
        return None
    if not np.allclose(t, np.round(t), atol=atol):
        return None
    r = np.round(r).astype(int)
    perm = np.array([int(np.flatnonzero(r[d])[0]) for d in range(3)])
    if sorted(perm.tolist()) != [0, 1, 2]:
        return None
    flip = np.array([r[d, perm[d]] < 0 for d in range(3)])
    src_shape = np.asarray(src_shape)
    if not np.array_equal(src_shape[perm], np.asarray(dst_shape)):
        return None
    # dst index of src voxel 0 along each axis must be 0 (no flip) or n-1 (flip)
    n = np.asarray(dst_shape)
    expected = np.where(flip, n - 1, 0)
    if not np.allclose(np.round(t), expected):
        return None
    return perm, flip


def map_labels_to_grid(labels: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                       dst_shape: Sequence[int], atol: float = 1e-3
                       ) -> tuple[np.ndarray, str]:
    """Put a label array onto another grid by both affines in patient space.

    When the composed transform is a signed axis permutation with integer offsets (every
    well-formed RSNA mask against its DICOM stack), apply it as an exact index remap; otherwise
    resample with nearest neighbour. No special cases for flipped or reversed studies: the
    affines decide.

    Returns:
        (labels on the destination grid (dst_shape) with the input dtype, method) where method is
        ``"permutation"`` or ``"nearest"``.
    """
    pm = permutation_map(src_affine, labels.shape, dst_affine, dst_shape, atol)
    if pm is not None:
        perm, flip = pm
        out = np.transpose(labels, perm)
        out = out[tuple(slice(None, None, -1) if f else slice(None) for f in flip)]
        return np.ascontiguousarray(out), "permutation"
    out = resample_to_grid(labels, src_affine, dst_affine, dst_shape, order=0, cval=0)
    return out, "nearest"


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str, contiguous: bool = True
             ) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip array axes so they point along ``axcodes`` (e.g. ``"LAS"``), fixing the affine.

    Pure index permutation (no interpolation); the world positions of all voxels are unchanged.
    ``contiguous=False`` returns a view (no copy: for reading a few slices of a large volume).
    """
    cur = nio.io_orientation(affine)
    tgt = nio.axcodes2ornt(tuple(axcodes))
    tr = nio.ornt_transform(cur, tgt)
    out = nio.apply_orientation(array, tr)
    new_affine = affine @ nio.inv_ornt_aff(tr, array.shape)
    return (np.ascontiguousarray(out) if contiguous else out), new_affine


def axcodes(affine: np.ndarray) -> str:
    """Orientation letters of the array axes, e.g. ``"LPS"`` for a DICOM axial stack."""
    return "".join(nib.aff2axcodes(affine))


# ----------------------------------------------------------------------------- SimpleITK bridge
def affine_to_itk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...],
                                                tuple[float, ...]]:
    """(origin, spacing, direction) in ITK's LPS convention for an array (X, Y, Z) with affine.

    SimpleITK's ``GetArrayFromImage`` returns (Z, Y, X); transpose with ``.T`` to get (X, Y, Z).
    """
    lps = LPS_TO_RAS @ affine
    sp = spacing_of(lps)
    direction = lps[:3, :3] / sp
    return tuple(lps[:3, 3]), tuple(sp), tuple(direction.flatten())


def itk_to_affine(origin: Sequence[float], spacing: Sequence[float],
                  direction: Sequence[float]) -> np.ndarray:
    """RAS affine for the (X, Y, Z) array of an ITK image with this LPS geometry."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)
    lps[:3, 3] = np.asarray(origin, float)
    return LPS_TO_RAS @ lps


# ----------------------------------------------------------------------------- DICOM stacks
def stack_to_xyz(stack: np.ndarray) -> np.ndarray:
    """View a decoded slice stack (Z, rows, cols) as the project's (X, Y, Z) array (no copy).

    ``stack[k]`` is sorted slice ``k`` as returned by pydicom (rows = Y, columns = X). The
    result is Fortran-ordered, which is also NIfTI's on-disk order.
    """
    return np.asarray(stack).transpose(2, 1, 0)


def perpendicular_offsets(positions_lps_sorted: np.ndarray, iop: Sequence[float]) -> np.ndarray:
    """Distance (mm) of each slice origin from the line through slice 0 along the normal; (N,).

    All zeros for a stack whose slices lie along their own normal; grows with a gantry tilt.
    """
    p = np.asarray(positions_lps_sorted, dtype=float)
    d = p - p[0]
    n = slice_normal(iop)
    return np.linalg.norm(d - np.outer(d @ n, n), axis=1)


def file_order_direction(file_numbers: Sequence[int], positions_lps: np.ndarray) -> str:
    """How patient z (the S axis) runs as the file number rises.

    Returns:
        ``"descending"`` (file 1 is the top, the usual RSNA case), ``"ascending"``, ``"mixed"``
        (e.g. two stacks in one folder), ``"constant"`` or ``"single"``.
    """
    order = np.argsort(np.asarray(file_numbers), kind="stable")
    z = np.asarray(positions_lps, dtype=float)[order, 2]
    if len(z) < 2:
        return "single"
    dz = np.diff(z)
    if np.all(np.abs(dz) < 1e-6):
        return "constant"
    if np.all(dz <= 1e-6):
        return "descending"
    if np.all(dz >= -1e-6):
        return "ascending"
    return "mixed"


def missing_slice_gaps(steps_mm: np.ndarray, step_mm: float, factor: float = 1.5,
                       tol: float = 0.2) -> np.ndarray:
    """Which steps are gaps of whole missing slices: > ``factor`` × step and within ``tol``
    (in units of the step) of a whole multiple of it. Other uneven steps are not gaps.
    """
    ratio = np.asarray(steps_mm, float) / float(step_mm)
    return (ratio > factor) & (np.abs(ratio - np.round(ratio)) <= tol)


def resample_stack(hu: np.ndarray, positions_lps_sorted: np.ndarray, iop: Sequence[float],
                   pixel_spacing: Sequence[float], step_mm: float, cval: float = AIR_HU
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample a tilted and/or unevenly spaced slice stack onto an orthogonal, even grid.

    The slices are parallel planes (one IOP) whose origins may drift in-plane (gantry tilt) and
    whose distances along the normal may vary. The output grid keeps the slice axes, has slices
    every ``step_mm`` along the normal starting at slice 0, and is widened in-plane to cover the
    drift. A target point is interpolated linearly between the two source planes around it,
    each sampled bilinearly at the point's projection; outside the data, and inside gaps of
    whole missing slices (:func:`missing_slice_gaps`), it gets ``cval``.

    Args:
        hu: (X, Y, Z) source slices sorted ascending along the normal (any numeric dtype).
        positions_lps_sorted: (Z, 3) ImagePositionPatient of each sorted slice (LPS mm).
        iop: ImageOrientationPatient shared by all slices.
        pixel_spacing: PixelSpacing [row spacing, column spacing] (mm).
        step_mm: the output slice step (mm), usually the median source step.

    Returns:
        (out (X', Y', Z') int16 rounded, RAS affine of the output grid, source (Z',) int64: the
        source slice index a target slice coincides with, or -1 when it was interpolated/filled).
    """
    p = np.asarray(positions_lps_sorted, dtype=float)
    row = np.asarray(iop[:3], float)
    col = np.asarray(iop[3:6], float)
    n = slice_normal(iop)
    sx, sy = float(pixel_spacing[1]), float(pixel_spacing[0])
    u = (p - p[0]) @ row
    v = (p - p[0]) @ col
    s = p @ n
    nx = hu.shape[0] + int(np.ceil((u.max() - u.min()) / sx - 1e-6))
    ny = hu.shape[1] + int(np.ceil((v.max() - v.min()) / sy - 1e-6))
    nz = int(round((s[-1] - s[0]) / step_mm)) + 1
    origin = p[0] + u.min() * row + v.min() * col
    affine = affine_from_dicom(iop, pixel_spacing, origin, step_mm)
    out = np.empty((nx, ny, nz), dtype=np.int16, order="F")
    source = np.full(nz, -1, dtype=np.int64)
    eps = 1e-3 * step_mm
    gap_after = np.append(missing_slice_gaps(np.diff(s), step_mm), False)

    def plane(k: int) -> np.ndarray:
        a, b = (u.min() - u[k]) / sx, (v.min() - v[k]) / sy
        src = np.asarray(hu[:, :, k], dtype=np.float32)
        return ndimage.affine_transform(src, np.eye(2), offset=(a, b), output_shape=(nx, ny),
                                        order=1, mode="constant", cval=cval, prefilter=False)

    for kk in range(nz):
        t = s[0] + kk * step_mm
        k1 = int(np.searchsorted(s, t - eps))
        if k1 >= len(s):
            out[:, :, kk] = cval
            continue
        if abs(s[k1] - t) <= eps:
            out[:, :, kk] = np.rint(plane(k1))
            source[kk] = k1
            continue
        k0 = k1 - 1
        if k0 < 0 or gap_after[k0]:
            out[:, :, kk] = cval
            continue
        w = (t - s[k0]) / (s[k1] - s[k0])
        out[:, :, kk] = np.rint((1.0 - w) * plane(k0) + w * plane(k1))
    return out, affine, source


def slice_affine(iop: Sequence[float], pixel_spacing: Sequence[float],
                 position_lps: Sequence[float]) -> np.ndarray:
    """Voxel (X, Y, 0) → RAS affine of one DICOM slice's pixel grid (a one-slice volume).

    ``X`` is the column, ``Y`` the row; the third axis is the slice normal at 1 mm per index
    (only index 0 exists). Used to put labels onto each source slice of a series, whatever the
    stack's spacing, tilt or order.
    """
    return affine_from_dicom(iop, pixel_spacing, position_lps, 1.0)


def labels_on_slices(labels: np.ndarray, affine: np.ndarray, positions_lps: np.ndarray,
                     iop: Sequence[float], pixel_spacing: Sequence[float], rows: int, cols: int
                     ) -> np.ndarray:
    """A label map sampled onto the pixel grids of DICOM slices (nearest neighbour, by affines).

    Every slice is treated on its own (its ImagePositionPatient, the shared orientation and
    pixel spacing), so the frames lie exactly on the source slices of a stack in any order,
    also one the loader resampled. Labels outside the source grid are 0.

    Args:
        labels: integer (X, Y, Z) label map on the grid of ``affine`` (voxel → RAS mm).
        positions_lps: (N, 3) ImagePositionPatient of each slice (LPS mm), any order.
        iop: ImageOrientationPatient shared by the slices.
        pixel_spacing: PixelSpacing [row spacing, column spacing] (mm).
        rows, cols: the slices' Rows and Columns.

    Returns:
        uint8 (N, rows, cols): frame ``n`` is the DICOM pixel matrix of slice ``n``
        (row-major, as a SEG frame stores it).
    """
    out = np.zeros((len(positions_lps), int(rows), int(cols)), dtype=np.uint8)
    for n, ipp in enumerate(np.asarray(positions_lps, dtype=float)):
        plane, _ = labels_to_grid(labels, affine, slice_affine(iop, pixel_spacing, ipp),
                                  (int(cols), int(rows), 1))
        out[n] = xyz_slice_to_pixels(plane, 0)
    return out


def xyz_slice_to_pixels(volume: np.ndarray, k: int) -> np.ndarray:
    """Sorted slice ``k`` of an (X, Y, Z) array as a DICOM pixel matrix (Rows, Columns) = (Y, X).

    The inverse of :func:`stack_to_xyz` for one slice: what a DICOM writer stores for slice k.
    """
    return np.ascontiguousarray(np.asarray(volume)[:, :, k].T)


def resample_labels_axis_aligned(labels: np.ndarray, src_affine: np.ndarray,
                                 dst_affine: np.ndarray, dst_shape: Sequence[int],
                                 atol: float = 1e-6) -> np.ndarray | None:
    """Nearest-neighbour label resampling by per-axis index lookup, when the grids are aligned.

    When destination voxel → source voxel is a per-axis scale and shift (no rotation, no axis
    swap; e.g. a model grid from :func:`grid_for_shape` mapped back onto its CT), nearest
    neighbour is separable: ``out = labels[ix][:, iy][:, :, iz]``. That is the same result as
    ``resample_to_grid(..., order=0)`` (up to exact .5 ties) at a fraction of the cost.

    Returns:
        labels on the destination grid (dst_shape, input dtype; 0 outside the source), or None
        when the transform is not axis-aligned (use :func:`resample_to_grid` then).
    """
    m = np.linalg.inv(src_affine) @ dst_affine
    r = m[:3, :3]
    if not np.allclose(r - np.diag(np.diag(r)), 0, atol=atol):
        return None
    index = []
    for axis in range(3):
        coord = np.arange(int(dst_shape[axis])) * r[axis, axis] + m[axis, 3]
        i = np.floor(coord + 0.5).astype(np.int64)
        inside = (i >= 0) & (i < labels.shape[axis])
        index.append((np.clip(i, 0, labels.shape[axis] - 1), inside))
    out = labels[np.ix_(index[0][0], index[1][0], index[2][0])]
    for axis in range(3):
        outside = ~index[axis][1]
        if outside.any():
            sel = [slice(None)] * 3
            sel[axis] = outside
            out[tuple(sel)] = 0
    return out


def labels_to_grid(labels: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                   dst_shape: Sequence[int]) -> tuple[np.ndarray, str]:
    """The one label map-back: labels on one grid onto another (nearest), by both affines.

    Every caller that puts a label map onto another grid (stage-1 model-grid labels onto their
    CT, a predicted mask onto a DICOM study, the overview) uses this function. Axis-aligned
    grids (a :func:`grid_for_shape` / :func:`grid_for_spacing` grid over its own CT) take the
    separable index lookup of :func:`resample_labels_axis_aligned`; any other pair goes through
    :func:`map_labels_to_grid` (exact permutation, else nearest resampling).

    Args:
        labels: integer (X, Y, Z) label map on the grid of ``src_affine`` (voxel → RAS mm).
        src_affine, dst_affine: float64 (4, 4) voxel → RAS mm of both grids.
        dst_shape: (X, Y, Z) of the destination grid.

    Returns:
        (uint8 labels with ``dst_shape``, 0 outside the source; the method used:
        ``"axis_aligned"``, ``"permutation"`` or ``"nearest"``).
    """
    out = resample_labels_axis_aligned(labels, src_affine, dst_affine, dst_shape)
    if out is not None:
        return out.astype(np.uint8, copy=False), "axis_aligned"
    out, method = map_labels_to_grid(labels, src_affine, dst_affine, dst_shape)
    return out.astype(np.uint8, copy=False), method


def resample_to_grid_torch(array, src_affine: np.ndarray, dst_affine: np.ndarray,
                           dst_shape: Sequence[int], cval: float = 0.0):
    """Linear resampling on a torch device: :func:`resample_to_grid` with ``order=1``.

    The same coordinates and edge rule as SciPy's ``mode="constant"`` (a point outside
    [0, n - 1] on any axis gets ``cval``; inside, trilinear interpolation), computed by
    ``torch.nn.functional.grid_sample`` in float32 where ``array`` lives (e.g. a GPU), so the
    volume crosses to the device once and only the small output comes back.

    Args:
        array: torch tensor (X, Y, Z), any real dtype, on the device to compute on.
        src_affine, dst_affine: float64 (4, 4) voxel → RAS mm of the source and output grids.
        dst_shape: output (X, Y, Z).
        cval: value outside the source.

    Returns:
        float32 torch tensor ``dst_shape`` on ``array``'s device.
    """
    import torch
    import torch.nn.functional as F

    m = np.linalg.inv(src_affine) @ dst_affine
    shape = [int(s) for s in dst_shape]
    device = array.device
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in shape]
    ii, jj, kk = torch.meshgrid(*axes, indexing="ij")
    mt = torch.as_tensor(m, dtype=torch.float64, device=device)
    coords = [mt[a, 0] * ii + mt[a, 1] * jj + mt[a, 2] * kk + mt[a, 3] for a in range(3)]
    n = array.shape
    inside = torch.ones(shape, dtype=torch.bool, device=device)
    norm = []
    for a in range(3):  # align_corners=True: -1 is index 0, +1 is index n - 1
        inside &= (coords[a] >= 0) & (coords[a] <= n[a] - 1)
        norm.append((2.0 * coords[a] / max(n[a] - 1, 1) - 1.0).to(torch.float32))
    grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1)[None]  # (1, X', Y', Z', [z, y, x])
    src = (array.to(torch.float32) - float(cval))[None, None]       # zeros padding = cval
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return torch.where(inside, out[0, 0] + float(cval), torch.full_like(out[0, 0], float(cval)))
