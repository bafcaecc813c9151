"""Stage 1 on hand-built arrays: boxes round trip, cleaning, windowing, grid settings, crops."""

from __future__ import annotations

import numpy as np
import pytest

from common import geometry
from common.geometry import Volume
from stage1_segment.boxes import vertebra_box, vertebra_boxes
from stage1_segment.crops import CropConfig, crops_for_volume
from stage1_segment.inference import largest_components
from stage1_segment.prepare import GridSettings, resample_volume
from stage1_segment.transforms import window_hu


def _affines() -> dict[str, np.ndarray]:
    """RAS-storage, DICOM-like LPS storage, and reversed-z with anisotropic spacing."""
    ras = np.diag([0.8, 0.8, 2.0, 1.0])
    ras[:3, 3] = [-20.0, -30.0, 10.0]
    lps = geometry.affine_from_dicom([1, 0, 0, 0, 1, 0], [0.7, 0.6], [12.0, -40.0, -55.0], 1.25)
    rev = lps.copy()
    rev[:3, 2] *= -1  # z runs the other way
    return {"ras": ras, "lps": lps, "reversed_z": rev}


@pytest.mark.parametrize("name", ["ras", "lps", "reversed_z"])
def test_box_round_trip_grid_mm_original(name):
    src_affine, src_shape = _affines()[name], (40, 50, 30)
    grid_affine = geometry.grid_for_shape(src_affine, src_shape, (20, 25, 15))  # 2× coarser
    mask = np.zeros((20, 25, 15), np.uint8)
    mask[5:9, 10:14, 3:6] = 3  # grid voxels x 5..8, y 10..13, z 3..5
    numbers = np.arange(100, 130)
    box = vertebra_box(mask, grid_affine, 3, src_affine, src_shape, numbers)
    assert box["grid_lo"] == [5, 10, 3] and box["grid_hi"] == [8, 13, 5]
    # each coarse voxel covers exactly 2 source voxels per axis: 10..17, 20..27, 6..11
    assert box["src_lo"] == [10, 20, 6] and box["src_hi"] == [17, 27, 11]
    assert (box["file_number_lo"], box["file_number_hi"]) == (106, 111)
    # the mm box is the RAS extent of those source voxels' outer faces
    corners = geometry.box_corners_world(src_affine, np.array([9.5, 19.5, 5.5]),
                                         np.array([17.5, 27.5, 11.5]))
    assert np.allclose(box["mm_lo"], corners.min(0), atol=1e-3)
    assert np.allclose(box["mm_hi"], corners.max(0), atol=1e-3)
    assert box["voxels"] == 4 * 4 * 3


def test_boxes_absent_vertebra_is_none():
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    boxes = vertebra_boxes(mask, np.eye(4), np.eye(4), (8, 8, 8))
    assert boxes["C1"] is not None and all(boxes[f"C{i}"] is None for i in range(2, 8))


def test_largest_components_keeps_biggest_blob_per_label():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:4, 1:4, 1:4] = 2      # 27 voxels
    mask[8:10, 8:10, 8:10] = 2   # 8 voxels, same label: removed
    mask[6, 6, 6] = 5            # lone voxel of another label: kept (its largest)
    mask[0, 11, 0] = 9           # not a C label: untouched
    out = largest_components(mask)
    assert (out == 2).sum() == 27 and out[9, 9, 9] == 0
    assert out[6, 6, 6] == 5 and out[0, 11, 0] == 9


def test_window_hu_maps_window_to_unit_interval():
    hu = np.array([-2000, -400, 800, 2000, 3000], np.int16)
    assert np.allclose(window_hu(hu, (-400, 2000)), [0, 0, 0.5, 1, 1])


def test_grid_settings_key_and_validation():
    a = GridSettings(shape=[64, 64, 64])
    assert a.key() == GridSettings(shape=(64, 64, 64)).key()
    assert a.key() != GridSettings(shape=(64, 64, 32)).key()
    assert a.key() != GridSettings(shape=(64, 64, 64), thoracic="merge").key()
    with pytest.raises(ValueError):
        GridSettings()
    with pytest.raises(ValueError):
        GridSettings(shape=(64, 64, 64), spacing_mm=(1, 1, 1))
    affine, shape = GridSettings(spacing_mm=(2.0, 2.0, 4.0)).grid_for(np.eye(4), (40, 40, 40))
    assert shape == (20, 20, 10) and np.allclose(geometry.spacing_of(affine), [2, 2, 4])


def _phantom(affine: np.ndarray) -> tuple[Volume, np.ndarray]:
    """A 60×60×70 CT with seven bone blocks (labels 1..7) stacked along +Z (C7 lowest)."""
    hu = np.full((60, 60, 70), -1000, np.int16)
    labels = np.zeros(hu.shape, np.uint8)
    for i in range(7):
        z0 = 5 + (6 - i) * 9
        hu[20:40, 22:38, z0:z0 + 7] = 700
        labels[20:40, 22:38, z0:z0 + 7] = i + 1
    return Volume(hu=hu, affine=affine, file_numbers=np.arange(70) + 1, study_uid="p"), labels


@pytest.mark.parametrize("name", ["ras", "lps", "reversed_z"])
def test_crops_are_centred_on_their_vertebra(name):
    volume, labels = _phantom(_affines()[name])
    grid_hu, grid_affine = resample_volume(volume, GridSettings(shape=(30, 30, 35)))
    assert grid_hu.dtype == np.int16 and grid_hu.shape == (30, 30, 35)
    grid_labels = geometry.resample_to_grid(labels, volume.affine, grid_affine, (30, 30, 35),
                                            order=0)
    cfg = CropConfig(shape=(16, 16, 12), margin_mm=4.0, min_volume_mm3=1.0)
    crops = crops_for_volume(volume, grid_labels, grid_affine, cfg)
    for i, name in enumerate(f"C{k}" for k in range(1, 8)):
        image, mask, affine = crops[name]
        assert image.dtype == np.int16 and mask.dtype == np.uint8 and image.shape == (16, 16, 12)
        own = np.argwhere(mask == i + 1)
        # the vertebra's own label sits in the middle of its crop, and it is bone there
        assert np.allclose(own.mean(0), (np.array(image.shape) - 1) / 2, atol=1.5)
        assert image[8, 8, 6] > 300
        # the crop's centre maps to the vertebra's centre in patient space
        centre_mm = geometry.voxel_to_world(affine, (np.array(image.shape) - 1) / 2)
        true_mm = geometry.voxel_to_world(volume.affine, np.argwhere(labels == i + 1).mean(0))
        assert np.linalg.norm(centre_mm - true_mm) < 2 * geometry.spacing_of(grid_affine).max()


def test_crops_mark_small_or_missing_vertebrae_absent():
    volume, labels = _phantom(np.eye(4))
    labels[labels == 4] = 0
    kept = crops_for_volume(volume, labels, None, CropConfig(shape=(8, 8, 8),
                                                             min_volume_mm3=1000.0))
    assert kept["C4"] is None and all(kept[f"C{k}"] is not None for k in (1, 2, 3, 5, 6, 7))
    # every block is 20·16·7 = 2240 mm³: below a 3000 mm³ minimum they count as absent
    small = crops_for_volume(volume, labels, None, CropConfig(shape=(8, 8, 8),
                                                              min_volume_mm3=3000.0))
    assert all(v is None for v in small.values())


@pytest.mark.parametrize("name", ["ras", "lps", "reversed_z"])
def test_axis_aligned_label_lookup_matches_nearest_resampling(name):
    ct_affine, ct_shape = _affines()[name], (40, 36, 30)
    grid_affine = geometry.grid_for_shape(ct_affine, ct_shape, (16, 12, 10))
    labels = np.random.default_rng(1).integers(0, 8, (16, 12, 10)).astype(np.uint8)
    fast = geometry.resample_labels_axis_aligned(labels, grid_affine, ct_affine, ct_shape)
    slow = geometry.resample_to_grid(labels, grid_affine, ct_affine, ct_shape, order=0)
    assert fast.shape == ct_shape and fast.dtype == np.uint8
    # identical inside; at the outer half voxel ndimage's constant mode gives 0, the lookup
    # still uses the edge voxel (its extent reaches the field-of-view border)
    assert np.array_equal(fast[3:-3, 3:-3, 3:-3], slow[3:-3, 3:-3, 3:-3])
    assert np.array_equal(fast[0, 0, 0], labels[0, 0, 0])
    # outside the source grid → 0; a rotated grid → None
    shifted = geometry.translate_affine(ct_affine, (-50, 0, 0))
    assert not geometry.resample_labels_axis_aligned(labels, grid_affine, shifted, ct_shape).any()
    rot = np.eye(4)
    rot[:2, :2] = [[0.8, -0.6], [0.6, 0.8]]
    assert geometry.resample_labels_axis_aligned(labels, grid_affine, rot @ ct_affine,
                                                 ct_shape) is None
