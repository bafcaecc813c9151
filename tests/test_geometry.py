"""Geometry contract: hand-computed cases, including the real RSNA header pair of study …10921."""

from __future__ import annotations

import numpy as np
import pytest

from common import geometry as g

# RSNA_FACTS.md §4-§6: train_images/…10921 (339 slices, head first) and its segmentation header.
PIX = 0.332031
STEP = 0.625
N = 339
IPP_FILE_100 = np.array([-67.4, -85.0, -60.875])
NIFTI_AFFINE_10921 = np.array([
    [-PIX, 0, 0, 67.4],
    [0, PIX, 0, -84.66784],
    [0, 0, STEP, -210.25],
    [0, 0, 0, 1.0],
])


def _rsna_ct_affine() -> np.ndarray:
    # head first: file n sits at z = z(100) - (n - 100) * step; k = 0 is file N (the lowest z)
    first = IPP_FILE_100 - np.array([0, 0, (N - 100) * STEP])
    return g.affine_from_dicom([1, 0, 0, 0, 1, 0], [PIX, PIX], first, STEP)


def test_rsna_ct_affine_matches_header_facts():
    aff = _rsna_ct_affine()
    np.testing.assert_allclose(np.diag(aff)[:3], [-PIX, -PIX, STEP])
    np.testing.assert_allclose(aff[:3, 3], [67.4, 85.0, -210.25])
    assert g.axcodes(aff) == "LPS"
    # file 100 is sorted slice k = N - 100 = 239 (RSNA_FACTS.md §6.1)
    np.testing.assert_allclose(g.dicom_position_of_slice(aff, N - 100), IPP_FILE_100)


def test_rsna_mask_storage_is_las_reorientation_of_ct_grid():
    aff = _rsna_ct_affine()
    stored, stored_aff = g.reorient(np.zeros((512, 512, N), np.uint8), aff, "LAS")
    assert stored.shape == (512, 512, N)
    np.testing.assert_allclose(stored_aff, NIFTI_AFFINE_10921, atol=1e-4)
    assert np.linalg.det(stored_aff[:3, :3]) < 0  # qfac = -1 in the written header


def test_mask_maps_row_as_h_minus_1_minus_j_and_k_ascending():
    h, w, n = 6, 5, 4
    ct_aff = g.affine_from_dicom([1, 0, 0, 0, 1, 0], [0.5, 0.5], [-10.0, -20.0, -50.0], 2.0)
    mask_aff = ct_aff @ np.array([[1, 0, 0, 0], [0, -1, 0, h - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nifti = np.zeros((w, h, n), np.uint8)
    nifti[3, 1, 2] = 7  # column 3, j = 1, k = 2
    out, method = g.map_labels_to_grid(nifti, mask_aff, ct_aff, (w, h, n))
    assert method == "permutation"
    assert out[3, h - 1 - 1, 2] == 7 and out.sum() == 7


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR", "SLA"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.7, 2.5)])
def test_reorient_then_map_back_is_identity(codes, spacing):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=(5, 6, 7)).astype(np.uint8)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [3.0, -4.0, 5.0]
    stored, stored_aff = g.reorient(labels, aff, codes)
    back, method = g.map_labels_to_grid(stored, stored_aff, aff, labels.shape)
    assert method == "permutation"
    np.testing.assert_array_equal(back, labels)
    # every voxel keeps its world position
    ijk = np.array([1, 2, 3])
    world = g.voxel_to_world(aff, ijk)
    s_ijk = np.rint(g.world_to_voxel(stored_aff, world)).astype(int)
    assert stored[tuple(s_ijk)] == labels[tuple(ijk)]


def test_map_labels_falls_back_to_nearest_on_other_grid():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:8, 2:8, 2:8] = 3
    src = np.eye(4)
    dst = np.diag([2.0, 2.0, 2.0, 1.0])
    dst[:3, 3] = 0.5
    out, method = g.map_labels_to_grid(labels, src, dst, (5, 5, 5))
    assert method == "nearest"
    assert set(np.unique(out)) == {0, 3}
    assert out[2, 2, 2] == 3 and out[0, 0, 0] == 0


def test_sort_slices_uses_position_not_order():
    iop = [1, 0, 0, 0, 1, 0]
    pos = np.array([[0, 0, 5.0], [0, 0, -1.0], [0, 0, 2.0]])
    np.testing.assert_array_equal(g.sort_slices(pos, iop), [1, 2, 0])
    # oblique normal: projection, not raw z
    iop_tilted = [1, 0, 0, 0, np.cos(0.3), -np.sin(0.3)]
    n = g.slice_normal(iop_tilted)
    pos2 = np.array([n * 3.0, n * 1.0, n * 2.0])
    np.testing.assert_array_equal(g.sort_slices(pos2, iop_tilted), [1, 2, 0])


def test_tilt_and_drift_detect_sheared_stack():
    iop = [1, 0, 0, 0, 1, 0]
    straight = np.array([[0, 0, z] for z in range(5)], float)
    assert g.tilt_angle_deg(straight, iop) == pytest.approx(0.0)
    assert np.allclose(g.in_plane_drift(straight, iop), 0)
    sheared = np.array([[0, z * np.tan(np.radians(18.5)), z] for z in range(5)], float)
    assert g.tilt_angle_deg(sheared, iop) == pytest.approx(18.5, abs=1e-6)
    assert np.all(g.in_plane_drift(sheared, iop) > 0.3)


def test_resample_to_shape_preserves_field_of_view_and_centres():
    arr = np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    out, out_aff = g.resample_to_shape(arr, aff, (4, 4, 2))
    np.testing.assert_allclose(g.spacing_of(out_aff), [1.0, 1.0, 4.0])
    # outer faces coincide: first voxel face at -0.5 * spacing in both grids
    np.testing.assert_allclose(out_aff[:3, 3] - 0.5 * g.spacing_of(out_aff),
                               aff[:3, 3] - 0.5 * g.spacing_of(aff))
    assert out.shape == (4, 4, 2)


def test_crop_box_is_centred_and_maps_back():
    vol = np.zeros((40, 40, 30), np.int16)
    vol[10:20, 15:25, 5:15] = 1000
    aff = g.affine_from_dicom([1, 0, 0, 0, 1, 0], [0.8, 0.8], [0, 0, 0], 1.5)
    lo, hi = g.label_bbox((vol > 0).astype(np.uint8))
    np.testing.assert_array_equal(lo, [10, 15, 5])
    np.testing.assert_array_equal(hi, [19, 24, 14])
    crop, crop_aff = g.crop_box(vol, aff, lo, hi, margin_mm=0.0, out_shape=(10, 10, 10), order=0)
    assert (crop == 1000).all()
    # the crop's centre voxel centre maps to the box centre in mm
    centre_crop = g.voxel_to_world(crop_aff, (np.array(crop.shape) - 1) / 2)
    centre_box = g.voxel_to_world(aff, (lo + hi) / 2)
    np.testing.assert_allclose(centre_crop, centre_box, atol=1e-6)
    # world box back to source indices round-trips
    corners = g.box_corners_world(aff, lo, hi)
    lo2, hi2 = g.world_box_to_voxel_box(aff, corners.min(0), corners.max(0), vol.shape)
    np.testing.assert_array_equal(lo2, lo)
    np.testing.assert_array_equal(hi2, hi)


def test_itk_bridge_round_trip():
    aff = _rsna_ct_affine()
    origin, spacing, direction = g.affine_to_itk(aff)
    np.testing.assert_allclose(origin, [-67.4, -85.0, -210.25])
    np.testing.assert_allclose(spacing, [PIX, PIX, STEP])
    np.testing.assert_allclose(g.itk_to_affine(origin, spacing, direction), aff)


def test_bad_affine_rejected():
    with pytest.raises(g.GeometryError, match="bad_affine"):
        g.check_affine(np.zeros((4, 4)))


@pytest.mark.parametrize("order", [0, 1])
def test_resample_to_grid_subregion_equals_full_transform(order):
    """Slicing the source under the destination grid must not change a single value."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    src = rng.normal(size=(30, 28, 26)).astype(np.float32)
    src_aff = g.affine_from_dicom([1, 0, 0, 0, 1, 0], [0.7, 0.9], [5.0, -3.0, 10.0], 1.3)
    rot = np.eye(4)
    c, s = np.cos(0.2), np.sin(0.2)
    rot[:2, :2] = [[c, -s], [s, c]]
    for lo, hi in [((3, 4, 5), (12, 15, 9)), ((-5, -5, -5), (40, 40, 40)), ((20, 0, 0), (29, 27, 25))]:
        dst_aff = rot @ g.box_grid(src_aff, lo, hi, margin_mm=2.0, out_shape=(9, 8, 7))
        got = g.resample_to_grid(src, src_aff, dst_aff, (9, 8, 7), order=order, cval=-7.0)
        m = np.linalg.inv(src_aff) @ dst_aff
        want = ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=(9, 8, 7),
                                        order=order, mode="constant", cval=-7.0, prefilter=False)
        np.testing.assert_array_equal(got, want)
    far = g.translate_affine(src_aff, (500, 500, 500))
    assert (g.resample_to_grid(src, src_aff, far, (3, 3, 3), cval=-7.0) == -7.0).all()


def test_xyz_slice_to_pixels_inverts_stack_to_xyz():
    stack = np.arange(3 * 4 * 5).reshape(3, 4, 5)  # (Z, rows, cols)
    xyz = g.stack_to_xyz(stack)
    for k in range(3):
        np.testing.assert_array_equal(g.xyz_slice_to_pixels(xyz, k), stack[k])
    assert g.xyz_slice_to_pixels(xyz, 1).shape == (4, 5)
