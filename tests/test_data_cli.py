"""The data-layer commands: cspine convert, align-mask and check-data (synthetic folders)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
from dicom_factory import axial_positions, ramp_stack, write_series

from common import geometry
from common.dicom_io import load_series
from cspine.cli import main

UID = "1.2.826.0.1.3680043.99100"


def _study(folder, n=6, seed=0):
    """Bone-bright slices (>= 176 HU) with one row of air (-1024 HU)."""
    stored = ramp_stack(n, 8, 10, seed=seed) + 1200
    stored[:, 0, :] = 0
    write_series(folder, stored, axial_positions(n, step=0.5))
    return folder


def test_convert_writes_hu_with_geometry(tmp_path, capsys):
    study = _study(tmp_path / UID)
    out = tmp_path / "ct.nii.gz"
    assert main(["convert", str(study), str(out), "--qc", str(tmp_path / "qc.json")]) == 0
    img = nib.load(str(out))
    vol = load_series(study)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.hu)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    assert json.loads((tmp_path / "qc.json").read_text())["status"] == "ok"
    assert "status ok" in capsys.readouterr().out


def test_convert_strict_error_names_study_file_reason(tmp_path, capsys):
    pos = axial_positions(5)
    write_series(tmp_path / UID, np.concatenate([ramp_stack(5), ramp_stack(5, seed=1)]),
                 np.concatenate([pos, pos]))
    assert main(["convert", str(tmp_path / UID), str(tmp_path / "x.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert UID in err and "duplicate_position" in err and "1.dcm" in err
    assert not (tmp_path / "x.nii.gz").exists()
    assert main(["convert", str(tmp_path / UID), str(tmp_path / "x.nii.gz"), "--lenient"]) == 0
    assert nib.load(str(tmp_path / "x.nii.gz")).shape == (8, 8, 5)


def test_align_mask_command(tmp_path, capsys):
    study = _study(tmp_path / UID, n=8)
    vol = load_series(study)
    lab = np.zeros(vol.shape, np.uint8)
    lab[2:5, 2:6, 6:] = 1
    lab[2:5, 2:6, :2] = 7
    lab[2:5, 2:6, 3] = 9  # T2
    stored, aff = geometry.reorient(lab, vol.affine, "LAS")
    nii = nib.Nifti1Image(stored.astype(np.uint16), aff)
    nii.set_qform(aff, code=2)
    nib.save(nii, str(tmp_path / "mask.nii"))
    out = tmp_path / "aligned.nii.gz"
    assert main(["align-mask", str(study), str(tmp_path / "mask.nii"), str(out),
                 "--thoracic", "merge", "--qc", str(tmp_path / "qc.json")]) == 0
    got = nib.load(str(out))
    expect = np.where(lab == 9, 8, lab)
    np.testing.assert_array_equal(np.asarray(got.dataobj), expect)
    np.testing.assert_allclose(got.affine, vol.affine, atol=1e-5)
    qc = json.loads((tmp_path / "qc.json").read_text())["alignment"]
    assert qc["method"] == "permutation" and qc["c1_above_c7"] is True
    assert "bone fraction 1.0" in capsys.readouterr().out


def test_check_data_census(tmp_path, capsys):
    root = tmp_path / "rsna"
    _study(root / "train_images" / f"{UID}1", seed=1)
    pos = axial_positions(4)
    write_series(root / "train_images" / f"{UID}2", np.concatenate([ramp_stack(4)] * 2),
                 np.concatenate([pos, pos]))
    (root / "train_images" / f"{UID}2" / "10.dcm").write_bytes(b"DICM but broken")
    _study(root / "test_images" / f"{UID}3", seed=3)
    pd.DataFrame({"StudyInstanceUID": [f"{UID}1", f"{UID}9"], "patient_overall": [0, 1],
                  **{f"C{i}": [0, 1] for i in range(1, 8)}}).to_csv(root / "train.csv",
                                                                    index=False)
    pd.DataFrame({"row_id": [f"{UID}7_C1"], "StudyInstanceUID": [f"{UID}7"],
                  "prediction_type": ["C1"]}).to_csv(root / "test.csv", index=False)
    out = tmp_path / "qc.csv"
    assert main(["check-data", str(root), "--out", str(out), "--workers", "1"]) == 0
    qc = pd.read_csv(out, dtype={"study": str}).set_index("study")
    assert qc.loc[f"{UID}1", "status"] == "ok" and qc.loc[f"{UID}1", "n_slices"] == 6
    assert qc.loc[f"{UID}1", "direction"] == "LPS"
    assert qc.loc[f"{UID}2", "status"] == "rejected"
    assert qc.loc[f"{UID}2", "reasons"] == "corrupt_file"
    assert qc.loc[f"{UID}3", "split"] == "test" and qc.loc[f"{UID}3", "listed"] == "no"
    assert qc.loc[f"{UID}9", "status"] == "missing" and qc.loc[f"{UID}7", "status"] == "missing"
    printed = capsys.readouterr().out
    assert "decoder in use:" in printed and "1.2.840.10008.1.2.1 20" in printed
    assert main(["check-data", str(tmp_path), "--out", str(out)]) == 2
