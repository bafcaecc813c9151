"""Read a DICOM SEG back onto a NIfTI grid by its frames' positions, and Dice per vertebra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import geometry
from common.labels import VERTEBRAE
from cspine import dicom_out


def seg_back_on_grid(seg_path: Path, headers: list, shape, affine) -> np.ndarray:
    """The SEG read back with highdicom, put on the (X, Y, Z) grid of ``affine`` by each frame's
    ImagePositionPatient; checks each frame lies on the source slice it references."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    by_uid = {str(h.SOPInstanceUID): h for h in dicom_out.prepare_headers(headers)[0]}
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    out = np.zeros(shape, dtype=np.uint8)
    pixels = seg.pixel_array if seg.NumberOfFrames > 1 else seg.pixel_array[None]
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = by_uid[str(uid)]
        assert np.allclose(ipp, [float(v) for v in source.ImagePositionPatient], atol=1e-4)
        ijk = geometry.world_to_voxel(affine, (geometry.LPS_TO_RAS[:3, :3] @ ipp)[None])[0]
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        value = VERTEBRAE.index(labels[number]) + 1
        # a frame's pixel (row r, column c) lies at IPP + c·dc·row_dir + r·dr·col_dir (LPS)
        iop = np.asarray(source.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in source.PixelSpacing)
        rc = np.argwhere(frame > 0)
        p = ipp + np.outer(rc[:, 1] * dc, iop[:3]) + np.outer(rc[:, 0] * dr, iop[3:])
        v = geometry.world_to_voxel(affine, (geometry.LPS_TO_RAS[:3, :3] @ p.T).T)
        assert np.allclose(v, np.round(v), atol=1e-3) and np.allclose(v[:, 2], ijk[2], atol=1e-3)
        i, j, k = np.round(v).astype(int).T
        out[i, j, k] = value
    return out


def dice_per_vertebra(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    out = {}
    for i, v in enumerate(VERTEBRAE, start=1):
        x, y = a == i, b == i
        if x.any() or y.any():
            out[v] = 2 * float((x & y).sum()) / float(x.sum() + y.sum())
    return out
