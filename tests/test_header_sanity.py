"""Header sanity before decoding: damaged headers are refused (strict) or repaired only where the
repair is well defined (lenient), each with its reason code — never decoded silently wrong.

Every case is a tiny series written here (tests/dicom_factory.py) with one header changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import axial_positions, write_series

from common.dicom_io import SeriesError, load_series

N = 6


def _series(folder: Path, size: int = 8, **header) -> Path:
    stored = np.full((N, size, size), 1064, np.int16)  # 40 HU with intercept -1024
    stored[:, 2:5, 2:5] = 1724                   # 700 HU
    write_series(folder, stored, axial_positions(N), **header)
    return folder


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for tag, value in tags.items():
        if value is None:
            del ds[tag]
        else:
            setattr(ds, tag, value)
    ds.save_as(path)


def _reason(study: Path, lenient: bool = False) -> SeriesError:
    with pytest.raises(SeriesError) as err:
        load_series(study, lenient=lenient, workers=1)
    assert "\n" not in str(err.value)
    return err.value


def test_missing_intercept_in_every_file_is_refused_in_both_modes(tmp_path):
    study = _series(tmp_path / "s", intercept=None)
    for lenient in (False, True):
        err = _reason(study, lenient)
        assert err.reason == "incomplete_rescale" and "RescaleIntercept" in str(err)


def test_missing_intercept_in_one_file_refused_strict_repaired_lenient(tmp_path):
    study = _series(tmp_path / "s")
    _edit(study / "3.dcm", RescaleIntercept=None)
    err = _reason(study)
    assert err.reason == "incomplete_rescale" and err.file == "3.dcm"
    vol = load_series(study, lenient=True, workers=1)
    assert "incomplete_rescale" in vol.qc["reasons"]
    assert any("intercept -1024" in r for r in vol.qc["repairs"])
    assert vol.hu.min() == 40 and vol.hu.max() == 700  # no slice +1024 HU


def test_a_file_with_another_rescale_is_refused_or_dropped(tmp_path):
    study = _series(tmp_path / "s")
    _edit(study / "4.dcm", RescaleIntercept="-1000")
    assert _reason(study).reason == "inconsistent_rescale"
    vol = load_series(study, lenient=True, workers=1)
    assert "inconsistent_rescale" in vol.qc["reasons"]
    assert {"file": "4.dcm", "reason": "inconsistent_rescale"} in vol.qc["files_skipped"]


def test_bits_allocated_8_over_16_bit_pixel_data(tmp_path):
    study = _series(tmp_path / "s", size=32)
    _edit(study / "2.dcm", BitsAllocated=8, BitsStored=8, HighBit=7)
    for lenient in (False, True):
        err = _reason(study, lenient)
        assert err.reason == "pixel_size_mismatch" and err.file == "2.dcm"


@pytest.mark.parametrize("tags, reason", [
    ({"Rows": 65535, "Columns": 65535}, "implausible_size"),
    ({"Rows": None}, "bad_header"),
    ({"PixelSpacing": [0, 0]}, "bad_geometry"),
    ({"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]}, "bad_geometry"),
    ({"ImagePositionPatient": ["nan", 0, 0]}, "bad_geometry"),
])
def test_impossible_headers_are_refused_before_decoding(tmp_path, tags, reason):
    study = _series(tmp_path / "s")
    path = study / "3.dcm"
    if tags.get("Rows", 0) is None:  # an empty Rows value, as the hostile-input run wrote it
        ds = pydicom.dcmread(path)
        ds["Rows"].value = None
        ds.save_as(path)
    else:
        _edit(path, **tags)
    err = _reason(study, lenient=True)
    assert err.reason == reason and err.file == "3.dcm", str(err)


def test_an_mr_series_is_not_a_ct(tmp_path):
    study = _series(tmp_path / "s")
    for path in study.iterdir():
        _edit(path, Modality="MR")
    err = _reason(study)
    assert err.reason == "no_images" and "not_ct" in str(err)


def test_one_or_two_slices_are_not_a_study(tmp_path):
    stored = np.full((2, 8, 8), 1064, np.int16)
    write_series(tmp_path / "two", stored, axial_positions(2))
    err = _reason(tmp_path / "two", lenient=True)
    assert err.reason == "too_few_slices"


def test_check_data_decode_finishes_a_batch_with_a_65535_header(tmp_path):
    """The declared-size ceiling refuses the study before any allocation; the batch goes on."""
    import pandas as pd

    from cspine.cli import main

    data = tmp_path / "data"
    ids = [f"1.2.826.0.1.3680043.{n}" for n in (101, 102, 103)]
    for uid in ids:
        _series(data / "train_images" / uid, study_uid=uid)
    _edit(data / "train_images" / ids[1] / "2.dcm", Rows=65535, Columns=65535)
    pd.DataFrame({"StudyInstanceUID": ids, "patient_overall": 0,
                  **{f"C{i}": 0 for i in range(1, 8)}}).to_csv(data / "train.csv", index=False)
    out = tmp_path / "qc.csv"
    main(["check-data", str(data), "--out", str(out), "--decode"])
    qc = pd.read_csv(out).set_index("study")
    assert len(qc) == 3 and qc.loc[ids[1], "reasons"] == "implausible_size"
    assert (qc.loc[[ids[0], ids[2]], "status"] == "ok").all()


@pytest.mark.parametrize("case, reason", [
    ("no_position", "no_geometry"), ("folder", "not_a_file"), ("dangling_link", "broken_link"),
    ("link_loop", "broken_link")])
def test_every_skipped_entry_is_named_in_the_error_and_the_qc(tmp_path, case, reason):
    """A slice without a position, or a folder / dangling or looping link where 3.dcm was: the
    gap error names the skipped entry and why, and lenient's repair record lists it."""
    import os

    study = _series(tmp_path / "s")
    victim = study / "3.dcm"
    if case == "no_position":
        _edit(victim, ImagePositionPatient=None)
    else:
        victim.unlink()
        if case == "folder":
            victim.mkdir()
        elif case == "dangling_link":
            os.symlink(tmp_path / "nowhere.dcm", victim)
        else:
            os.symlink(victim, victim)
    err = _reason(study)
    assert err.reason == "gap" and f"3.dcm ({reason})" in str(err)
    vol = load_series(study, lenient=True, workers=1)
    assert {"file": "3.dcm", "reason": reason} in vol.qc["files_skipped"]
    assert any(f"3.dcm ({reason})" in r for r in vol.qc["repairs"])


@pytest.mark.parametrize("damage, reason", [("random_bytes", "corrupt_file"),
                                            ("nan_position", "bad_geometry")])
def test_a_damaged_slice_is_refused_naming_it(tmp_path, damage, reason):
    """Random bytes named 3.dcm, or a NaN position, are refused as what they are (not as a gap or
    a duplicate of another file)."""
    study = _series(tmp_path / "s")
    victim = study / "3.dcm"
    if damage == "random_bytes":
        victim.write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        _edit(victim, ImagePositionPatient=["nan", "0", "0"])
    for lenient in (False, True):
        err = _reason(study, lenient)
        assert err.reason == reason and err.file == "3.dcm", str(err)
