"""MONAI dictionary transforms for stage 1: load the cache, window HU, augment.

Samples are dicts with ``image`` float32 (1, X, Y, Z) and ``label`` (1, X, Y, Z) class indices.

Augmentations and why:

* ``RandAffined``: small rotations (degrees) and scaling about the volume centre; labels use
  nearest interpolation.
* ``RandFlipd`` on array axis 0 only. For the axial RSNA series axis 0 is the DICOM column
  direction = patient left/right (``axcodes`` starts with L or R; :mod:`common.geometry`), and the
  cervical spine is near-symmetric, so a mirrored study is still a plausible study with the same
  labels. **Never** flipped: axis 2 (Z, cranio-caudal; C1 is always above C7, and the network may
  use that order) and axis 1 (Y, anterior/posterior: the vertebral body is in front of the canal).
* intensity scale/shift and Gaussian noise on the windowed image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from common.geometry import AIR_HU, spacing_of
from stage1_segment.prepare import load_cached

#: Array axis that may be mirrored (left/right for axial series); see the module docstring.
LR_AXIS = 0


@dataclass
class AugmentConfig:
    """Training augmentation strengths (0 or prob 0 switches one off).

    Attributes:
        prob_affine: probability of a random rotation/scaling.
        rotate_deg: maximum rotation about each axis, degrees.
        scale: maximum relative scaling (0.1 = ±10 %).
        prob_flip_lr: probability of a left/right mirror (array axis 0).
        prob_intensity: probability of each intensity transform.
        intensity_scale: relative intensity scaling of the windowed image.
        intensity_shift: additive shift of the windowed image (0..1 units).
        noise_std: standard deviation of additive Gaussian noise (0..1 units).
    """

    prob_affine: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    prob_flip_lr: float = 0.5
    prob_intensity: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_std: float = 0.02


def window_hu(hu: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Clip HU to ``window`` = (low, high) and scale linearly to 0..1 (float32, same shape)."""
    low, high = float(window[0]), float(window[1])
    out = (np.asarray(hu, dtype=np.float32) - low) / (high - low)
    return np.clip(out, 0.0, 1.0)


class LoadCachedd(MapTransform):
    """Read ``d["path"]`` (a stage-1 cache file) into ``image`` (1, X, Y, Z) float32 HU and
    ``label`` (1, X, Y, Z) uint8 (zeros when the study has no mask); also ``uid`` and
    ``spacing`` (model voxel size in mm, float32 (3,))."""

    def __init__(self, path_key: str = "path") -> None:
        super().__init__(keys=[path_key])
        self.path_key = path_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        study = load_cached(d[self.path_key])
        d["image"] = study.image[None].astype(np.float32)
        label = study.label if study.label is not None else np.zeros_like(study.image, np.uint8)
        d["label"] = label[None]
        d["uid"] = study.uid
        d["spacing"] = spacing_of(study.affine).astype(np.float32)
        return d


class WindowHUd(MapTransform):
    """Apply :func:`window_hu` to the given keys (the same function inference uses)."""

    def __init__(self, keys: Sequence[str], window: Sequence[float]) -> None:
        super().__init__(keys=keys)
        self.window = tuple(float(w) for w in window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = window_hu(d[key], self.window)
        return d


def deterministic_transforms(hu_window: Sequence[float],
                             patch_size: Sequence[int] | None = None) -> list:
    """Load and window (and pad to ``patch_size``): the part worth caching."""
    out: list = [LoadCachedd()]
    if patch_size is not None:  # grids of varying shape (fixed spacing): pad with air first
        out.append(SpatialPadd(["image"], patch_size, value=float(AIR_HU)))
        out.append(SpatialPadd(["label"], patch_size, value=0))
    out.append(WindowHUd(["image"], hu_window))
    return out


def train_transforms(hu_window: Sequence[float], aug: AugmentConfig,
                     patch_size: Sequence[int] | None = None) -> Compose:
    """Deterministic part, then random crop (if ``patch_size``) and augmentations."""
    rad = float(np.deg2rad(aug.rotate_deg))
    ops = deterministic_transforms(hu_window, patch_size)
    if patch_size is not None:
        ops.append(RandCropByPosNegLabeld(["image", "label"], "label", patch_size, pos=2, neg=1,
                                          num_samples=1))
    ops += [
        RandAffined(["image", "label"], prob=aug.prob_affine, rotate_range=(rad, rad, rad),
                    scale_range=(aug.scale,) * 3, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandFlipd(["image", "label"], prob=aug.prob_flip_lr, spatial_axis=LR_AXIS),
        RandScaleIntensityd(["image"], factors=aug.intensity_scale, prob=aug.prob_intensity),
        RandShiftIntensityd(["image"], offsets=aug.intensity_shift, prob=aug.prob_intensity),
        RandGaussianNoised(["image"], std=aug.noise_std, prob=aug.prob_intensity),
        EnsureTyped(["image", "label"], track_meta=False),
    ]
    return Compose(ops)


def val_transforms(hu_window: Sequence[float], patch_size: Sequence[int] | None = None
                   ) -> Compose:
    """Load and window only (validation runs on the whole grid)."""
    return Compose(deterministic_transforms(hu_window, patch_size)
                   + [EnsureTyped(["image", "label"], track_meta=False)])
