"""Fuzz: many seeded mutations of a tiny series' headers never give a traceback or a hang —
``load_series`` either loads (and the values are HU-plausible) or raises ``SeriesError`` with a
reason code and a one-line message."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from dicom_factory import axial_positions, write_series

from common.dicom_io import SeriesError, load_series

TAGS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
        "SamplesPerPixel", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
        "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
        "Modality", "SeriesInstanceUID", "InstanceNumber", "PixelPaddingValue",
        "PhotometricInterpretation"]
VALUES = [None, "", "ab", "-1", "0", "1", "7", "65535", "1e308", "nan", "-inf", [0, 0],
          [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0], ["x", 1, 2], [1e30, 1e30, 1e30]]


def _mutate(path, rng) -> str:
    ds = pydicom.dcmread(path)
    tag = TAGS[rng.integers(len(TAGS))]
    value = VALUES[rng.integers(len(VALUES))]
    try:
        if value is None:
            if tag in ds:
                del ds[tag]
        elif tag in ds:
            ds[tag].value = value
        else:
            setattr(ds, tag, value)
        ds.save_as(path)
    except Exception:  # noqa: BLE001 — pydicom refused to write this value: nothing to test
        return ""
    return f"{path.name}: {tag}={value!r}"


@pytest.mark.slow
def test_mutated_headers_never_traceback(tmp_path):
    rng = np.random.default_rng(20261201)
    stored = np.full((5, 8, 8), 1064, np.int16)
    outcomes = {"loaded": 0, "refused": 0}
    t_start = time.perf_counter()
    for case in range(120):
        study = tmp_path / f"c{case}"
        write_series(study, stored, axial_positions(5))
        files = sorted(study.iterdir())
        done = [_mutate(files[rng.integers(len(files))], rng) for _ in range(rng.integers(1, 4))]
        for lenient in (False, True):
            t0 = time.perf_counter()
            try:
                vol = load_series(study, lenient=lenient, workers=1)
            except SeriesError as err:
                assert err.reason and "\n" not in str(err), (done, err)
                outcomes["refused"] += 1
            else:
                assert vol.hu.dtype == np.int16 and vol.hu.ndim == 3, done
                # every voxel is the written 40 HU, or air a recorded repair filled in
                values = set(np.unique(vol.hu).tolist())
                assert values <= {40} or (values <= {40, -1024} and vol.qc["reasons"]), \
                    (done, values, vol.qc.get("reasons"))
                outcomes["loaded"] += 1
            assert time.perf_counter() - t0 < 10, ("slow", done)
    assert outcomes["loaded"] and outcomes["refused"], outcomes
    assert time.perf_counter() - t_start < 120
