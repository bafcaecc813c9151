"""Per-vertebra bounding boxes of a label map, in three frames.

For each vertebra C1..C7 found in a label map on some grid (the model grid, usually):

* ``grid_lo``/``grid_hi``: inclusive voxel box on that grid;
* ``mm_lo``/``mm_hi``: the axis-aligned RAS mm box of the grid box's outer voxel faces;
* ``src_lo``/``src_hi``: inclusive (X = column, Y = row, Z = sorted slice) indices of the
  original DICOM voxels whose centres lie inside the grid box (clipped to the volume), and
  ``file_number_lo``/``file_number_hi``: the ``<n>.dcm`` numbers of its lowest and highest
  sorted slice.

All conversions go through :mod:`common.geometry`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from common import geometry
from common.labels import VERTEBRAE

#: Tolerance, in source voxels, of the box-face → source-voxel rounding. The faces of a grid made
#: to cover its CT often fall exactly on source voxel centres; float error in an affine (e.g. one
#: that went through float32, ~1e-5 voxel over a 300-slice study) must not move a box by a slice.
BOX_TOL_VOXELS = 1e-3


def vertebra_box(mask: np.ndarray, mask_affine: np.ndarray, label: int,
                 src_affine: np.ndarray, src_shape: Sequence[int],
                 file_numbers: np.ndarray | None = None) -> dict[str, Any] | None:
    """Box of ``mask == label`` in grid voxels, RAS mm and source indices; None if absent.

    Args:
        mask: uint8 (X, Y, Z) label map on the grid of ``mask_affine``.
        mask_affine: voxel → RAS mm of the mask grid.
        label: class index (1..7 for C1..C7).
        src_affine, src_shape: the original DICOM volume's affine and (X, Y, Z) shape.
        file_numbers: int (Z,) file number of each sorted source slice (optional).
    """
    found = geometry.label_bbox(mask, label)
    if found is None:
        return None
    lo, hi = found
    corners = geometry.box_corners_world(mask_affine, lo - 0.5, hi + 0.5)
    mm_lo, mm_hi = corners.min(axis=0), corners.max(axis=0)
    # source voxels whose centres lie inside the grid box (what nearest-neighbour maps to it)
    src = geometry.world_to_voxel(src_affine, corners)
    top = np.asarray(src_shape) - 1
    src_lo = np.clip(np.ceil(src.min(axis=0) - BOX_TOL_VOXELS).astype(int), 0, top)
    src_hi = np.clip(np.floor(src.max(axis=0) + BOX_TOL_VOXELS).astype(int), 0, top)
    src_hi = np.maximum(src_hi, src_lo)
    box = {"voxels": int((mask == label).sum()),
           "grid_lo": lo.tolist(), "grid_hi": hi.tolist(),
           "mm_lo": [round(float(v), 3) for v in mm_lo],
           "mm_hi": [round(float(v), 3) for v in mm_hi],
           "src_lo": src_lo.tolist(), "src_hi": src_hi.tolist()}
    if file_numbers is not None and len(file_numbers):
        box["file_number_lo"] = int(file_numbers[src_lo[2]])
        box["file_number_hi"] = int(file_numbers[src_hi[2]])
    return box


def vertebra_boxes(mask: np.ndarray, mask_affine: np.ndarray, src_affine: np.ndarray,
                   src_shape: Sequence[int], file_numbers: np.ndarray | None = None
                   ) -> dict[str, dict[str, Any] | None]:
    """:func:`vertebra_box` for C1..C7: vertebra name → box dict or None (absent)."""
    return {name: vertebra_box(mask, mask_affine, i + 1, src_affine, src_shape, file_numbers)
            for i, name in enumerate(VERTEBRAE)}
