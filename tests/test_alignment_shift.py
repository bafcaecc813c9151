"""Alignment QC catches a shifted mask that still passes the bone-fraction flag: one of its
shifted copies lies on bone far better than the mask itself (common/nifti_io.py)."""

from __future__ import annotations

import numpy as np

from common import geometry
from common.dataset import RSNADataset
from common.dicom_io import load_series
from common.nifti_io import BONE_FRACTION_MIN, align_mask, alignment_qc


def _shift(labels: np.ndarray, axis: int, k: int) -> np.ndarray:
    out = np.zeros_like(labels)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(0, labels.shape[axis] - k), slice(k, None)
    out[tuple(dst)] = labels[tuple(src)]
    return out


def test_aligned_masks_pass_and_shifted_ones_are_flagged(tiny_data):
    ds = RSNADataset(tiny_data)
    uids = [u for u in ds.train_uids() if ds.mask_path(u) is not None][:4]
    assert uids
    caught_above_threshold = 0
    for uid in uids:
        volume = load_series(ds.study_dir(uid), workers=1)
        labels, qc = align_mask(volume, ds.mask_path(uid))
        assert "shifted_mask" not in qc["flags"], (uid, qc)
        for axis, mm in ((2, 20.0), (1, 20.0)):
            k = int(round(mm / geometry.spacing_of(volume.affine)[axis]))
            shifted = alignment_qc(volume.hu, _shift(labels, axis, k), volume.affine)
            assert "shifted_mask" in shifted["flags"], (uid, axis, shifted)
            caught_above_threshold += shifted["bone_fraction"] >= BONE_FRACTION_MIN
    # the check matters: some shifted masks still pass the plain bone-fraction flag
    assert caught_above_threshold >= 1


def test_real_vertebrae_pass_and_their_shifted_copy_is_flagged(realdata):
    """The real TotalSegmentator CT and its vertebra labels (values 25..50): aligned, no
    ``shifted_mask``; shifted 20 mm in y, flagged."""
    import nibabel as nib

    from common.nifti_io import align_labels

    root = realdata / "totalsegmentator"
    volume = load_series(root / "example_ct_dicom", workers=1)
    img = nib.load(root / "example_seg_dicom.nii.gz")
    labels, _ = align_labels(volume, np.asarray(img.dataobj), geometry.nifti_affine(img))
    bone = ((labels >= 25) & (labels <= 50)).astype(np.uint8)
    qc = alignment_qc(volume.hu, bone, volume.affine)
    assert qc["bone_fraction"] > 0.7 and "shifted_mask" not in qc["flags"], qc
    k = int(round(20.0 / geometry.spacing_of(volume.affine)[1]))
    moved = alignment_qc(volume.hu, _shift(bone, 1, k), volume.affine)
    assert "shifted_mask" in moved["flags"], moved
