"""load_series on synthetic series written by tests/dicom_factory.py (RSNA-like sparse headers)."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from dicom_factory import AXIAL, axial_positions, ramp_stack, write_series, write_slice
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from common import geometry
from common.dicom_io import SeriesError, load_series, scan_series

UID = "1.2.826.0.1.3680043.99001"


def _ras_of_ipp(ipp):
    return np.array([-ipp[0], -ipp[1], ipp[2]])


def test_descending_numbering_sparse_header(tmp_path):
    stored = ramp_stack(6)
    pos = axial_positions(6, step=0.625, z_top=10.0)  # file 1 is the top (usual RSNA case)
    files = write_series(tmp_path / UID, stored, pos)
    ds = pydicom.dcmread(files[0])
    for tag in ("Modality", "SliceLocation", "FrameOfReferenceUID"):
        assert tag not in ds
    vol = load_series(tmp_path / UID)
    assert vol.hu.dtype == np.int16 and vol.shape == (8, 8, 6)
    assert vol.file_numbers.tolist() == [6, 5, 4, 3, 2, 1]  # k = 0 is the most inferior
    np.testing.assert_array_equal(vol.hu[:, :, 0], stored[5].T.astype(np.int16) - 1024)
    np.testing.assert_allclose(vol.spacing, [0.5, 0.5, 0.625])
    for k, n in enumerate(vol.file_numbers):
        np.testing.assert_allclose(geometry.voxel_to_world(vol.affine, [0, 0, k]),
                                   _ras_of_ipp(pos[n - 1]), atol=1e-6)
    # voxel (i, j) is column i, row j of the slice
    np.testing.assert_array_equal(vol.hu[3, 5, 2], int(stored[6 - 1 - 2][5, 3]) - 1024)
    assert vol.qc["status"] == "ok" and vol.qc["z_direction"] == "descending"
    assert vol.qc["files_used"] == 6 and vol.qc["reasons"] == []
    assert vol.qc["decoder"].endswith("=native")


def test_ascending_numbering_and_start_at_59(tmp_path):
    stored = ramp_stack(5, seed=1)
    pos = axial_positions(5, step=1.0)[::-1]  # z rises with the file number
    write_series(tmp_path / UID, stored, pos, file_numbers=range(59, 64))
    vol = load_series(tmp_path / UID)
    assert vol.file_numbers.tolist() == [59, 60, 61, 62, 63]
    assert vol.qc["z_direction"] == "ascending"
    np.testing.assert_array_equal(vol.hu[:, :, 0], stored[0].T - 1024)
    assert vol.affine[2, 2] == pytest.approx(1.0)


def test_sorting_ignores_instance_number_and_names(tmp_path):
    stored = ramp_stack(4, seed=2)
    pos = axial_positions(4)
    # file numbers shuffled against position
    write_series(tmp_path / UID, stored, pos, file_numbers=[3, 1, 4, 2])
    vol = load_series(tmp_path / UID)
    assert vol.file_numbers.tolist() == [2, 4, 1, 3]
    assert vol.qc["z_direction"] == "mixed"
    z = [geometry.voxel_to_world(vol.affine, [0, 0, k])[2] for k in range(4)]
    assert np.all(np.diff(z) > 0)


def test_unsigned_12bit_slope_and_padding(tmp_path):
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4096, size=(3, 8, 8)).astype(np.uint16)
    stored[0, 0, 0] = 4095  # padding value
    write_series(tmp_path / "u12", stored, axial_positions(3), signed=False, bits_stored=12,
                 padding=4095, slope=1.0, intercept=-1024)
    vol = load_series(tmp_path / "u12")
    expect = np.clip(stored.astype(np.int32) - 1024, -1024, None)
    expect[0, 0, 0] = -1024
    np.testing.assert_array_equal(vol.hu, geometry.stack_to_xyz(expect[::-1]))
    assert vol.qc["padding_fraction"] > 0

    stored2 = rng.integers(-600, 1500, size=(3, 8, 8)).astype(np.int16)
    write_series(tmp_path / "slope", stored2, axial_positions(3), slope=2.0, intercept=-1000)
    vol2 = load_series(tmp_path / "slope")
    expect2 = np.clip(stored2.astype(np.int32) * 2 - 1000, -1024, None)  # below -1024 → -1024
    np.testing.assert_array_equal(vol2.hu, geometry.stack_to_xyz(expect2[::-1]))
    assert vol2.qc["hu_min"] == -1024


def test_rle_and_implicit_vr_match_explicit(tmp_path):
    stored = ramp_stack(3, seed=4)
    stored[0, 0, 0] = -3000  # below -1024 HU after the rescale
    write_series(tmp_path / "raw", stored, axial_positions(3))
    write_series(tmp_path / "rle", stored, axial_positions(3), transfer_syntax=RLELossless)
    write_series(tmp_path / "imp", stored, axial_positions(3),
                 transfer_syntax=ImplicitVRLittleEndian)
    a, b, c = (load_series(tmp_path / n) for n in ("raw", "rle", "imp"))
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.hu, c.hu)
    assert a.hu[0, 0, 2] == -1024
    assert "1.2.840.10008.1.2.5" in b.qc["transfer_syntaxes"]
    assert "1.2.840.10008.1.2" in c.qc["transfer_syntaxes"]


def test_direct_read_equals_pydicom(tmp_path):
    """The uncompressed fast path (read at the scanned offset) equals pydicom's decoder."""
    from pydicom.pixels import pixel_array

    from common.dicom_decode import read_native
    from common.dicom_io import decode_items
    from common.dicom_scan import scan_folder
    from common.series_validate import plan_series

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 1 << 16, size=(2, 6, 6)).astype(np.uint16)  # junk above bit 12
    write_series(tmp_path / "u12", stored, axial_positions(2), signed=False, bits_stored=12)
    signed = rng.integers(-30000, 30000, size=(2, 6, 6)).astype(np.int16)
    write_series(tmp_path / "s14", signed, axial_positions(2), bits_stored=14)
    for name in ("u12", "s14"):
        for item in decode_items(plan_series(scan_folder(tmp_path / name), min_slices=1)):
            assert item.native is not None
            np.testing.assert_array_equal(read_native(item), pixel_array(item.path))


def test_two_stacks_strict_reject_lenient_keeps_first(tmp_path):
    n = 5
    pos = axial_positions(n)
    stored = np.concatenate([ramp_stack(n, seed=5), ramp_stack(n, seed=6)])
    write_series(tmp_path / UID, stored, np.concatenate([pos, pos]))
    with pytest.raises(SeriesError) as err:
        load_series(tmp_path / UID)
    assert err.value.reason == "duplicate_position" and err.value.study == UID
    assert "10 files but only 5 distinct slice positions" in str(err.value)
    assert err.value.qc["status"] == "rejected"
    import pickle

    again = pickle.loads(pickle.dumps(err.value))
    assert (again.reason, again.study, str(again)) == ("duplicate_position", UID, str(err.value))
    vol = load_series(tmp_path / UID, lenient=True)
    assert sorted(vol.file_numbers.tolist()) == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(vol.hu[:, :, 0], stored[4].T - 1024)
    assert vol.qc["status"] == "recovered" and "duplicate_position" in vol.qc["reasons"]
    skipped = {s["file"]: s["reason"] for s in vol.qc["files_skipped"]}
    assert skipped == {f"{i}.dcm": "duplicate_stack" for i in range(6, 11)}


def test_byte_identical_duplicate_dropped_with_warning(tmp_path):
    stored = ramp_stack(4, seed=7)
    files = write_series(tmp_path / UID, stored, axial_positions(4))
    shutil.copy(files[1], tmp_path / UID / "5.dcm")
    vol = load_series(tmp_path / UID)
    assert vol.shape[2] == 4 and vol.qc["status"] == "warned"
    assert {"file": "5.dcm", "reason": "duplicate_identical"} in vol.qc["files_skipped"]


def test_mixed_sizes_inconsistent_geometry(tmp_path):
    pos = axial_positions(5)
    write_series(tmp_path / UID, ramp_stack(3, 8, 8), pos[:3])
    write_series(tmp_path / UID, ramp_stack(2, 8, 9), pos[3:], file_numbers=[4, 5])
    with pytest.raises(SeriesError) as err:
        load_series(tmp_path / UID)
    assert err.value.reason == "inconsistent_geometry" and "8x9" in str(err.value)
    vol = load_series(tmp_path / UID, lenient=True)
    assert vol.shape == (8, 8, 3)


def test_multiple_series(tmp_path):
    pos = axial_positions(4)
    write_series(tmp_path / UID, ramp_stack(4), pos)
    write_series(tmp_path / UID, ramp_stack(2), pos[:2] + [0, 0, 50], file_numbers=[7, 8],
                 series_uid=f"{UID}.2")
    with pytest.raises(SeriesError) as err:
        load_series(tmp_path / UID)
    assert err.value.reason == "multiple_series" and f"{UID}.2 (2 files)" in str(err.value)
    vol = load_series(tmp_path / UID, lenient=True)
    assert vol.shape[2] == 4 and vol.qc["status"] == "recovered"


def test_non_dicom_skipped_and_corrupt_rejected(tmp_path):
    write_series(tmp_path / UID, ramp_stack(3), axial_positions(3))
    (tmp_path / UID / "notes.txt").write_text("radiologist notes\n")
    vol = load_series(tmp_path / UID)
    assert vol.qc["files_seen"] == 4 and vol.qc["files_used"] == 3
    assert vol.qc["files_skipped"] == [{"file": "notes.txt", "reason": "not_dicom"}]
    assert vol.qc["status"] == "warned"
    data = (tmp_path / UID / "2.dcm").read_bytes()
    (tmp_path / UID / "2.dcm").write_bytes(data[:-20])
    for lenient in (False, True):
        with pytest.raises(SeriesError) as err:
            load_series(tmp_path / UID, lenient=lenient)
        assert err.value.reason == "corrupt_file" and err.value.file == "2.dcm"
        assert "truncated" in str(err.value)


def test_no_rescale(tmp_path):
    stored = ramp_stack(3) - 1024
    write_series(tmp_path / UID, stored, axial_positions(3), slope=None, intercept=None)
    with pytest.raises(SeriesError) as err:
        load_series(tmp_path / UID)
    assert err.value.reason == "no_rescale"
    vol = load_series(tmp_path / UID, lenient=True)  # stored minimum looks like HU air
    assert vol.qc["status"] == "recovered"
    write_series(tmp_path / "raw", ramp_stack(3), axial_positions(3), slope=None, intercept=None)
    with pytest.raises(SeriesError, match="does not look like HU"):
        load_series(tmp_path / "raw", lenient=True)


def test_gap_and_nonuniform(tmp_path):
    pos = axial_positions(8, step=1.0)
    write_series(tmp_path / "gap", ramp_stack(6), np.delete(pos, [2, 3], axis=0))
    with pytest.raises(SeriesError) as err:
        load_series(tmp_path / "gap")
    assert err.value.reason == "gap"
    vol = load_series(tmp_path / "gap", lenient=True)
    assert vol.shape[2] == 8 and (vol.file_numbers == -1).sum() == 2
    assert (vol.hu[:, :, vol.file_numbers == -1] == -1024).all()

    pos2 = axial_positions(5, step=1.0)
    pos2[3:, 2] -= 0.3  # uneven step
    write_series(tmp_path / "uneven", ramp_stack(5), pos2)
    with pytest.raises(SeriesError) as err:
        load_series(tmp_path / "uneven")
    assert err.value.reason == "nonuniform_spacing"
    vol = load_series(tmp_path / "uneven", lenient=True)
    assert vol.spacing[2] == pytest.approx(1.0) and vol.qc["status"] == "recovered"


def test_tilted_stack_resampled_exactly_for_linear_field(tmp_path):
    """A gantry-tilted stack of a linear HU field resamples to the same field (linear interp)."""
    n, rows, cols, ps, step = 12, 16, 16, 1.0, 1.0
    pos = np.stack([np.zeros(n), -0.4 * np.arange(n), step * np.arange(n)], axis=1)  # y drift

    def field(lps):  # HU as a linear function of patient position
        return 10 * lps[..., 0] + 5 * lps[..., 1] + 20 * lps[..., 2]

    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    stored = np.stack([field(np.stack([p[0] + ii * ps, p[1] + jj * ps,
                                       np.full_like(ii, p[2], dtype=float)], -1))
                       for p in pos]).round().astype(np.int16)
    write_series(tmp_path / "tilt", stored, pos, intercept=0.0, pixel_spacing=(ps, ps))
    with pytest.raises(SeriesError) as err:
        load_series(tmp_path / "tilt")
    assert err.value.reason == "gantry_tilt"
    vol = load_series(tmp_path / "tilt", lenient=True)
    assert vol.qc["tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.4)), abs=0.01)
    assert vol.shape[1] > rows  # widened to cover the drift
    ijk = np.argwhere(vol.hu > -1024)
    lps = geometry.voxel_to_world(vol.affine, ijk) * [-1, -1, 1]
    inside = (ijk[:, 1] > 6) & (ijk[:, 1] < vol.shape[1] - 7) & (ijk[:, 0] < cols - 1)
    got = vol.hu[tuple(ijk[inside].T)]
    np.testing.assert_allclose(got, field(lps[inside]), atol=1.01)


def test_parallel_decode_equals_serial(tmp_path):
    stored = ramp_stack(40, 8, 8, seed=9)
    write_series(tmp_path / UID, stored, axial_positions(40))
    a = load_series(tmp_path / UID, workers=1)
    b = load_series(tmp_path / UID, workers=2)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.qc["workers"] == 1 and b.qc["workers"] == 2


def test_missing_codec(tmp_path, monkeypatch):
    src = tmp_path / "rle"
    write_series(src, ramp_stack(3), axial_positions(3), transfer_syntax=RLELossless)
    monkeypatch.setenv("CSPINE_DECODER", "gdcm-not-installed")
    with pytest.raises(SeriesError) as err:
        load_series(src)
    assert err.value.reason == "missing_codec" and "1.2.840.10008.1.2.5" in str(err.value)


def test_scan_series_census_row(tmp_path):
    pos = axial_positions(5)
    write_series(tmp_path / UID, np.concatenate([ramp_stack(5), ramp_stack(5, seed=3)]),
                 np.concatenate([pos, pos]))
    row = scan_series(tmp_path / UID)
    assert row["status"] == "recoverable" and row["reasons"] == "duplicate_position"
    assert row["n_files"] == 10 and row["n_slices"] == 5 and row["direction"] == "LPS"
    assert row["z_direction"] == "mixed"
    write_slice(tmp_path / "one" / "1.dcm", ramp_stack(1)[0], (0, 0, 0), study_uid="x", number=1)
    one = scan_series(tmp_path / "one")  # a single slice has no slice step: not a study
    assert one["status"] == "rejected" and "too_few_slices" in one["reasons"]
    assert scan_series(tmp_path / "missing")["status"] == "rejected"


# ------------------------------------------------------------------ geometry helpers used here
def test_geometry_stack_helpers():
    stack = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (Z, rows, cols)
    xyz = geometry.stack_to_xyz(stack)
    assert xyz.shape == (4, 3, 2) and xyz[3, 1, 0] == stack[0, 1, 3]
    pos = np.array([[0, 0, 0], [0, 0.5, 1], [0, 1.0, 2]], float)
    np.testing.assert_allclose(geometry.perpendicular_offsets(pos, AXIAL), [0, 0.5, 1.0])
    assert geometry.file_order_direction([1, 2, 3], pos[::-1]) == "descending"
    assert geometry.file_order_direction([3, 1, 2], pos) == "mixed"
    assert geometry.file_order_direction([1], pos[:1]) == "single"
    gaps = geometry.missing_slice_gaps(np.array([1.0, 2.0, 1.75, 3.05, 1.0]), 1.0)
    assert gaps.tolist() == [False, True, False, True, False]


def test_resample_stack_uneven_steps_and_gap():
    z = np.array([0.0, 1.0, 2.0, 2.5, 3.5, 6.5])  # a half step, then a 3-step gap
    pos = np.stack([np.zeros(6), np.zeros(6), z], axis=1)
    hu = np.broadcast_to((100 * z).astype(np.int16), (3, 2, 6))  # HU = 100 * z
    out, affine, source = geometry.resample_stack(hu, pos, AXIAL, (1.0, 1.0), 1.0)
    assert out.shape == (3, 2, 7) and out.dtype == np.int16
    np.testing.assert_allclose(geometry.spacing_of(affine), [1, 1, 1])
    assert out[0, 0, :].tolist() == [0, 100, 200, 300, -1024, -1024, -1024]
    assert source.tolist() == [0, 1, 2, -1, -1, -1, -1]


def _load_in_daemon(path: str) -> int:
    return load_series(path, workers=2).qc["workers"]


def test_daemonic_caller_decodes_in_process(tmp_path):
    """Inside a DataLoader/Pool worker (daemonic) the loader must not start child processes."""
    import multiprocessing

    write_series(tmp_path / UID, ramp_stack(40, 4, 4), axial_positions(40))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_load_in_daemon, [str(tmp_path / UID)]) == [1]


def test_factory_fast_writer_matches_pydicom(tmp_path):
    """tests/dicom_factory.write_series splices pre-encoded elements: same bytes as pydicom."""
    from dicom_factory import make_header

    stored, pos = ramp_stack(3, 4, 4), axial_positions(3)
    write_series(tmp_path / "fast", stored, pos, study_uid=UID)
    for i in range(3):
        write_slice(tmp_path / "ref" / f"{i + 1}.dcm", stored[i], pos[i], study_uid=UID,
                    number=i + 1)
        assert (tmp_path / "fast" / f"{i + 1}.dcm").read_bytes() == (
            tmp_path / "ref" / f"{i + 1}.dcm").read_bytes()
    assert make_header(stored[0], pos[0], study_uid=UID, number=1).Rows == 4
