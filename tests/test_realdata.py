"""load_series and mask alignment on the real files in ../shared/realdata (see its README)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from common import geometry
from common.dicom_decode import DecodeItem, decode_one
from common.dicom_io import SeriesError, load_series
from common.nifti_io import align_labels

pytestmark = pytest.mark.realdata

TS_J2K = "totalsegmentator/example_ct_dicom"
TS_JPLL = "derived_jpll/totalsegmentator_example_ct_jpll"
TS_SEG = "totalsegmentator/example_seg_dicom.nii.gz"
GE = "dcm_qa_ct_GE"
GE_JPLL = "derived_jpll/dcm_qa_ct_GE_jpll"


@pytest.fixture(scope="module")
def ts_volume(realdata):
    return load_series(realdata / TS_J2K)


def _sitk_read(folder):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_totalsegmentator_j2k_and_jpll_identical(realdata, ts_volume):
    b = load_series(realdata / TS_JPLL)
    np.testing.assert_array_equal(ts_volume.hu, b.hu)
    np.testing.assert_allclose(ts_volume.affine, b.affine)
    assert ts_volume.qc["status"] == "ok" and ts_volume.shape == (512, 512, 20)
    assert ts_volume.qc["z_direction"] == "descending"
    assert ".4.90" in ts_volume.qc["decoder"] and ".4.70" in b.qc["decoder"]


def test_totalsegmentator_matches_simpleitk(realdata, ts_volume):
    import SimpleITK as sitk

    img = _sitk_read(realdata / TS_J2K)
    ref = geometry.itk_to_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    np.testing.assert_allclose(ts_volume.affine, ref, atol=1e-4)
    np.testing.assert_array_equal(ts_volume.hu, sitk.GetArrayFromImage(img).T)


def test_totalsegmentator_mask_alignment_matches_simpleitk(realdata, ts_volume):
    import nibabel as nib
    import SimpleITK as sitk

    nii = nib.load(str(realdata / TS_SEG))
    labels = np.asarray(nii.dataobj)
    ours, method = align_labels(ts_volume, labels, geometry.nifti_affine(nii))
    assert method == "permutation"
    ct = _sitk_read(realdata / TS_J2K)
    seg = sitk.ReadImage(str(realdata / TS_SEG))
    ref = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        seg.GetPixelID())
    np.testing.assert_array_equal(ours, sitk.GetArrayFromImage(ref).T)
    assert (ours > 0).sum() > 10000


def test_ge_tilt_strict_rejected_lenient_repaired(realdata):
    with pytest.raises(SeriesError) as err:
        load_series(realdata / GE)
    assert err.value.reason == "gantry_tilt" and err.value.study == GE
    assert "nonuniform_spacing" in str(err.value) and "18.50 deg" in str(err.value)
    vol = load_series(realdata / GE, lenient=True)
    assert vol.qc["status"] == "recovered"
    assert set(vol.qc["reasons"]) == {"gantry_tilt", "nonuniform_spacing"}
    assert vol.qc["tilt_deg"] == pytest.approx(18.5, abs=0.05)
    rot = vol.affine[:3, :3] / vol.spacing
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-6)  # orthogonal grid
    assert vol.hu.min() == -1024 and vol.hu.max() > 1000  # padding -1500 mapped to -1024
    # slices that coincide with a source file keep its (tilt-shifted) pixels
    k = int(np.flatnonzero(vol.file_numbers >= 0)[3])
    assert (vol.hu[:, :, k] > 0).mean() > 0.1


def test_signed_jpll_decodes_identical_to_uncompressed(realdata):
    for name in sorted(p.name for p in (realdata / GE).glob("*.dcm")):
        a, _ = decode_one(DecodeItem(str(realdata / GE / name), 512, 512, plugin=""))
        for plugin in ("gdcm", "pylibjpeg"):
            b, _ = decode_one(DecodeItem(str(realdata / GE_JPLL / name), 512, 512, plugin))
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {plugin}")
    a = load_series(realdata / GE, lenient=True)
    b = load_series(realdata / GE_JPLL, lenient=True)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.hu.min() < 0


def test_gap_flagged(realdata):
    with pytest.raises(SeriesError) as err:
        load_series(realdata / "pydicom/dicomdirtests_77654033_CT2")
    assert err.value.reason == "gap" and "202.50 mm" in str(err.value)


def test_truncated_and_no_meta_are_corrupt(realdata, tmp_path):
    from pydicom.data import get_testdata_file

    for name in ("MR_truncated.dcm", "no_meta.dcm"):
        study = tmp_path / name.split(".")[0]
        shutil.copytree(realdata / "pydicom/dicomdirtests_98892001_CT5N", study)
        shutil.copy(get_testdata_file(name), study / name)
        with pytest.raises(SeriesError) as err:
            load_series(study, lenient=True)
        assert err.value.reason == "corrupt_file" and err.value.file == name


def test_non_dicom_file_skipped(realdata, tmp_path):
    study = tmp_path / "ct5n"
    shutil.copytree(realdata / "pydicom/dicomdirtests_98892001_CT5N", study)
    shutil.copy(realdata / "README.md", study / "README.md")
    vol = load_series(study)
    assert vol.shape == (16, 16, 5)
    assert {"file": "README.md", "reason": "not_dicom"} in vol.qc["files_skipped"]


def _single(realdata, tmp_path, rel):
    study = tmp_path / rel.replace("/", "_")
    study.mkdir(parents=True)
    shutil.copy(realdata / rel, study / "1.dcm")
    return load_series(study, min_slices=1)  # one file on purpose


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_single_files_match_pydicom_modality_lut(realdata, tmp_path):
    """Unsigned 12-bit JPEG-LL neck CT, and a J2K file whose BitsStored disagrees (16 vs 14)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    for rel in ("pydicom/bad_sequence.dcm", "pydicom/693_UNCR.dcm", "pydicom/693_J2KR.dcm"):
        vol = _single(realdata, tmp_path / "a", rel)
        ds = pydicom.dcmread(realdata / rel)
        expect = np.maximum(np.rint(apply_modality_lut(ds.pixel_array, ds)), -1024)
        np.testing.assert_array_equal(vol.hu[:, :, 0], expect.T, err_msg=rel)
        assert vol.qc["z_direction"] == "single"
    a = _single(realdata, tmp_path / "b", "pydicom/693_UNCR.dcm")
    b = _single(realdata, tmp_path / "b", "pydicom/693_J2KR.dcm")
    np.testing.assert_array_equal(a.hu, b.hu)
