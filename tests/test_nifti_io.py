"""NIfTI round trips, RSNA mask loading and mask alignment on synthetic volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from common import geometry
from common.geometry import GeometryError, Volume
from common.labels import UnexpectedLabelError
from common.nifti_io import align_mask, load_nifti, load_rsna_mask, save_nifti


def _ct(shape=(12, 10, 14), spacing=(0.5, 0.5, 0.625)) -> Volume:
    """Axial CT with a bright 'spine' column of bone and RSNA-like DICOM geometry."""
    affine = geometry.affine_from_dicom((1, 0, 0, 0, 1, 0), (spacing[1], spacing[0]),
                                        (-3.0, -2.5, -40.0), spacing[2])
    hu = np.full(shape, -50, dtype=np.int16)
    hu[4:8, 2:6, :] = 400
    return Volume(hu=hu, affine=affine, file_numbers=np.arange(shape[2])[::-1] + 1,
                  study_uid="1.2.3")


def _spine_labels(shape) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    z = shape[2]
    for c in range(1, 8):  # C1 at the top (largest k), C7 low
        k_hi = z - 1 - (c - 1) * (z // 8)
        lab[4:8, 2:6, max(0, k_hi - z // 8 + 1):k_hi + 1] = c
    lab[4:8, 2:6, 0] = 8  # T1 below
    return lab


def _as_rsna_file(path, labels_xyz, ct_affine, dtype=np.uint16):
    """Store labels like the RSNA masks: LAS axes (j against the rows), qform 2 / sform 1."""
    arr, aff = geometry.reorient(labels_xyz, ct_affine, "LAS")
    img = nib.Nifti1Image(arr.astype(dtype), aff)
    img.set_qform(aff, code=2)
    img.set_sform(aff, code=1)
    nib.save(img, str(path))
    return arr, aff


def test_save_load_roundtrip(tmp_path):
    vol = _ct()
    save_nifti(tmp_path / "ct.nii.gz", vol.hu, vol.affine)
    arr, aff = load_nifti(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(arr, vol.hu)
    assert arr.dtype == np.int16
    np.testing.assert_allclose(aff, vol.affine, atol=1e-5)
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))
    sheared = vol.affine.copy()
    sheared[0, 2] = 0.3
    with pytest.raises(GeometryError, match="bad_affine"):
        save_nifti(tmp_path / "bad.nii.gz", vol.hu, sheared)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_align_rsna_style_mask_exact(tmp_path, dtype):
    vol = _ct()
    lab = _spine_labels(vol.shape)
    stored, _ = _as_rsna_file(tmp_path / "m.nii", lab, vol.affine, dtype)
    assert not np.array_equal(stored, lab)  # the file really is stored differently
    classes, aff = load_rsna_mask(tmp_path / "m.nii")
    assert classes.dtype == np.uint8 and classes.max() == 7  # T1 → background
    out, qc = align_mask(vol, tmp_path / "m.nii")
    expect = np.where(lab == 8, 0, lab)
    np.testing.assert_array_equal(out, expect)
    assert qc["method"] == "permutation" and qc["status"] == "ok"
    assert qc["bone_fraction"] == 1.0 and qc["c1_above_c7"] is True
    merged, _ = align_mask(vol, tmp_path / "m.nii", thoracic="merge")
    assert (merged == 8).sum() == (lab == 8).sum()


def test_misregistered_mask_flagged(tmp_path):
    vol = _ct()
    lab = np.roll(_spine_labels(vol.shape), 4, axis=0)  # shifted off the bone
    _as_rsna_file(tmp_path / "m.nii", lab, vol.affine)
    _, qc = align_mask(vol, tmp_path / "m.nii")
    assert qc["status"] == "flagged" and "low_bone_fraction" in qc["flags"]
    flipped = _spine_labels(vol.shape)[:, :, ::-1]  # C1 at the bottom
    _as_rsna_file(tmp_path / "f.nii", flipped, vol.affine)
    _, qc = align_mask(vol, tmp_path / "f.nii")
    assert qc["c1_above_c7"] is False and "c1_below_c7" in qc["flags"]


def test_mask_geometry_strict_and_lenient(tmp_path):
    vol = _ct()
    lab = _spine_labels(vol.shape)
    coarse, coarse_aff = geometry.resample_to_shape(lab, vol.affine, (6, 5, 7), order=0)
    _as_rsna_file(tmp_path / "c.nii", coarse, coarse_aff)
    with pytest.raises(GeometryError, match="mask_geometry"):
        align_mask(vol, tmp_path / "c.nii")
    out, qc = align_mask(vol, tmp_path / "c.nii", lenient=True)
    assert qc["method"] == "nearest" and "resampled" in qc["flags"]
    assert out.shape == vol.shape
    assert (out == lab).mean() > 0.8


def test_unexpected_label_rejected(tmp_path):
    vol = _ct()
    lab = _spine_labels(vol.shape)
    lab[0, 0, 0] = 25
    _as_rsna_file(tmp_path / "m.nii", lab, vol.affine)
    with pytest.raises(UnexpectedLabelError, match="25"):
        align_mask(vol, tmp_path / "m.nii")
