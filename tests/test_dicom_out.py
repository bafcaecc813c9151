"""DICOM SEG and SR of a prediction (:mod:`cspine.dicom_out`): round trips through highdicom.

The SEG is written from a NIfTI mask in its own geometry (as ``cspine predict`` writes it) and
read back with highdicom; every frame must lie on the source slice it references (by
ImagePositionPatient) and, put back on the NIfTI grid by the frames' positions, give Dice 1.0
per vertebra. Masks are asymmetric in every axis, so a flip or a slice-order error fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import axial_positions, ramp_stack, write_series
from seg_check import dice_per_vertebra, seg_back_on_grid

from common import geometry
from common.dicom_io import load_series
from common.labels import TARGETS, VERTEBRAE
from common.nifti_io import save_nifti
from cspine import dicom_out

VERSIONS = {"cspine": "0.0.test", "torch": "x", "monai": "y"}


def _blob_mask(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 (X, Y, Z): vertebrae C1..C7 as stacked, off-centre, irregular blobs (C1 on top)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=np.uint8)
    nz = shape[2]
    for i in range(1, 8):
        z1 = nz - 1 - (i - 1) * max(1, nz // 8)
        z0 = max(0, z1 - max(1, nz // 8) + 1)
        x0 = 1 + (i % 3)
        block = rng.random((shape[0] // 2, shape[1] // 2 + (i % 2), z1 - z0 + 1)) > 0.35
        mask[x0:x0 + block.shape[0], 1:1 + block.shape[1], z0:z1 + 1][block] = i
    return mask


def _series(tmp_path: Path, order: str, n: int = 16) -> Path:
    """A synthetic RSNA-style study (16 × 12 pixels, anisotropic spacing, sparse header)."""
    folder = tmp_path / f"1.2.826.0.1.3680043.99.{ {'descending': 1, 'ascending': 2}[order]}"
    positions = axial_positions(n, step=0.8)  # file 1 at the top
    if order == "ascending":
        positions = positions[::-1]
    write_series(folder, ramp_stack(n, rows=12, cols=16), positions, pixel_spacing=(0.7, 0.5))
    return folder


@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_seg_round_trip_rsna_style(order, tmp_path):
    study = _series(tmp_path, order)
    volume = load_series(study)
    mask = _blob_mask(volume.shape, seed=len(order))
    save_nifti(tmp_path / "mask.nii.gz", mask, volume.affine)
    img = nib.load(tmp_path / "mask.nii.gz")
    nifti = np.asarray(img.dataobj).astype(np.uint8)
    headers = dicom_out.read_source_headers(volume)
    info = dicom_out.write_seg(tmp_path / "seg.dcm", nifti, img.affine, headers, VERSIONS, "r1")
    assert info["segments"] == {v: i for i, v in enumerate(VERTEBRAE, start=1)}
    assert any("FrameOfReferenceUID missing" in n for n in info["header_fills"])
    back = seg_back_on_grid(tmp_path / "seg.dcm", headers, nifti.shape, img.affine)
    dice = dice_per_vertebra(back, nifti)
    assert set(dice) == set(VERTEBRAE) and all(d == 1.0 for d in dice.values()), dice
    # the anatomic codes: SNOMED CT C1..C7 vertebra under "Anatomical Structure"
    import highdicom as hd

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    for d in seg.SegmentSequence:
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        code = d.SegmentedPropertyTypeCodeSequence[0]
        assert code.CodingSchemeDesignator == "SCT" and code.CodeMeaning == \
            f"{d.SegmentLabel} vertebra"
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    # highdicom's own reader maps the frames to the source instances too
    uid = str(headers[3].SOPInstanceUID)
    got = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2, 3, 4, 5, 6, 7],
                                            combine_segments=True, skip_overlap_checks=True)[0]
    k = volume.source_files.index(next(p for p in volume.source_files
                                       if Path(p).name == Path(headers[3].filename).name))
    expected = geometry.xyz_slice_to_pixels(mask, k)
    assert np.array_equal(got, expected)


def test_seg_of_a_flipped_mask_fails_the_check(tmp_path):
    """The round-trip check can fail: a mask mirrored along the rows gives Dice < 1."""
    volume = load_series(_series(tmp_path, "descending"))
    mask = _blob_mask(volume.shape, seed=3)
    headers = dicom_out.read_source_headers(volume)
    dicom_out.write_seg(tmp_path / "seg.dcm", mask[:, ::-1].copy(), volume.affine, headers,
                        VERSIONS, "r1")
    back = seg_back_on_grid(tmp_path / "seg.dcm", headers, mask.shape, volume.affine)
    assert min(dice_per_vertebra(back, mask).values()) < 0.9


def test_seg_round_trip_real_totalsegmentator(realdata, tmp_path):
    """The real 20-slice J2K series (empty SOPClassUID, file names z-descending) with its real
    LAS mask (j reversed against the rows): seven of its labels as C1..C7."""
    volume = load_series(realdata / "totalsegmentator" / "example_ct_dicom")
    img = nib.load(realdata / "totalsegmentator" / "example_seg_dicom.nii.gz")
    real = np.asarray(img.dataobj)
    values, counts = np.unique(real[real > 0], return_counts=True)
    keep = values[np.argsort(counts)[::-1][:7]]
    mask = np.zeros(real.shape, dtype=np.uint8)
    for i, value in enumerate(sorted(keep), start=1):
        mask[real == value] = i
    headers = dicom_out.read_source_headers(volume)
    info = dicom_out.write_seg(tmp_path / "seg.dcm", mask, img.affine, headers, VERSIONS, "r2")
    fills = " | ".join(info["header_fills"])
    assert "SOPClassUID empty" in fills and "SeriesInstanceUID empty" in fills
    back = seg_back_on_grid(tmp_path / "seg.dcm", headers, mask.shape, img.affine)
    dice = dice_per_vertebra(back, mask)
    assert len(dice) == 7 and all(d == 1.0 for d in dice.values()), dice


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools)")
def test_seg_and_sr_pass_dciodvfy(tmp_path):
    volume = load_series(_series(tmp_path, "descending"))
    headers = dicom_out.read_source_headers(volume)
    dicom_out.write_seg(tmp_path / "seg.dcm", _blob_mask(volume.shape, 1), volume.affine,
                        headers, VERSIONS, "r3")
    probs = {t: 0.1 + 0.1 * i for i, t in enumerate(TARGETS)}
    dicom_out.write_sr(tmp_path / "sr.dcm", probs, ["C7"], 0.5, "default", headers, {},
                       VERSIONS, "r3")
    for name in ("seg.dcm", "sr.dcm"):
        res = subprocess.run(["dciodvfy", str(tmp_path / name)], capture_output=True, text=True)
        errors = [line for line in (res.stdout + res.stderr).splitlines()
                  if line.startswith("Error")]
        assert not errors, (name, errors)


def test_sr_holds_the_eight_values(tmp_path):
    volume = load_series(_series(tmp_path, "ascending"))
    headers = dicom_out.read_source_headers(volume)
    probs = {t: round(0.05 + 0.11 * i, 4) for i, t in enumerate(TARGETS)}
    flagged = [v for v in VERTEBRAE if probs[v] >= 0.42]
    ckpt = tmp_path / "stage2" / "fold0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    models = {"stage1": "/w/stage1/checkpoints/best.ckpt", "rule": "max",
              "stage2": [str(ckpt)]}
    dicom_out.write_sr(tmp_path / "sr.dcm", probs, flagged, 0.42, "metrics.json", headers,
                       models, VERSIONS, "run-abc")
    back = dicom_out.read_sr_probabilities(tmp_path / "sr.dcm")
    assert back["probabilities"] == pytest.approx(probs) and list(back["probabilities"]) == \
        list(TARGETS)
    assert back["flagged"] == flagged == ["C5", "C6", "C7"]
    assert {"run_id=run-abc", "operating_point=0.42", "threshold_source=metrics.json",
            "stage2=fold0/last.ckpt@sha256:9a129038d9a0", "stage1=stage1/best.ckpt",
            "patient_overall_rule=max"} <= set(back["parameters"])
    assert back["study_uid"] == headers[0].StudyInstanceUID


def test_no_source_dicom_is_a_clear_error():
    volume = geometry.Volume(hu=np.zeros((4, 4, 4), np.int16), affine=np.eye(4),
                             file_numbers=np.arange(4), study_uid="ct_from_nifti")
    with pytest.raises(dicom_out.DicomOutputError, match="ct_from_nifti: no source DICOM"):
        dicom_out.read_source_headers(volume)


def test_source_files_survive_the_volume_cache(tmp_path):
    """A volume read back from the decode cache still names its source files (for --dicom)."""
    from common.volume_cache import load_study

    study = _series(tmp_path, "descending")
    first, how = load_study(study, cache_dir=tmp_path / "cache", keep=True)
    again, how_again = load_study(study, cache_dir=tmp_path / "cache")
    assert (how, how_again) == ("decoded", "cache")
    assert again.source_files == first.source_files and len(first.source_files) == 16
    assert [Path(p).name for p in first.source_files] == [f"{n}.dcm" for n in range(16, 0, -1)]
