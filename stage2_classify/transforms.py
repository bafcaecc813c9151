"""Crop → network input: HU windows, mask channels, vertebra channels, and 3D augmentation.

A crop (``common.manifest``) is ``image`` int16 (X, Y, Z) HU and ``mask`` uint8 (X, Y, Z) 0..7 on
the crop grid, whose axes run along the source CT axes (X = DICOM column, Y = row, Z = sorted
slice; for RSNA's axial series X is the patient's left-right axis). The network input is float32
(C, X, Y, Z) with channels, in order:

1. one channel per HU window ``(level, width)``: ``clip((HU - level + width/2) / width, 0, 1)``;
2. the target-vertebra mask (``mask == this vertebra``);
3. optionally all cervical vertebrae (``mask > 0``);
4. optionally the first window × the target mask dilated by ``masked_image`` voxels (the crop's
   neighbours, whose own fractures would otherwise look like this vertebra's, are blanked);
5. optionally a lucency map of the target vertebra: ``mask × clip((below − HU) / width, 0, 1)``
   (voxels of the vertebra darker than bone: fracture lines and gaps light up on a dark field),
   with the mask optionally eroded by a few voxels so that its partial-volume rim (soft tissue,
   discs) does not light up;
6. optionally 7 constant one-hot channels naming the vertebra.

Augmentations keep a crack a crack: small rotations and scalings, a left-right flip only (never
cranio-caudal or antero-posterior: those change anatomy), mild intensity scaling/shift and noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.labels import CLASS_INDEX, VERTEBRAE

#: Bone window (RSNA_FACTS.md §9.1 item 9: level 400, width 1800 as the 3rd place).
BONE_WINDOW = (400.0, 1800.0)
#: Spatial axis of the (X, Y, Z) crop that is left-right for axial series.
LR_AXIS = 0


@dataclass
class Preprocess:
    """How a crop becomes network input; stored in the checkpoint so inference rebuilds it.

    Attributes:
        windows: HU windows ``(level, width)``, one image channel each.
        all_mask: add a channel with every cervical vertebra of the stage-1 mask.
        vertebra_channels: add 7 constant one-hot channels naming the target vertebra.
        masked_image: dilation (voxels) of the target mask for a masked-image channel; None = off.
        lucency: ``(below_hu, width_hu)`` or ``(below_hu, width_hu, erode_voxels)`` of the
            lucency channel (the target mask is eroded by a (2e+1)³ cube first); None = off.
    """

    windows: Sequence[Sequence[float]] = field(default_factory=lambda: [BONE_WINDOW])
    all_mask: bool = False
    vertebra_channels: bool = False
    masked_image: int | None = None
    lucency: Sequence[float] | None = None

    @property
    def num_image_channels(self) -> int:
        return len(self.windows)

    @property
    def num_channels(self) -> int:
        return (len(self.windows) + 1 + int(self.all_mask) + int(self.masked_image is not None)
                + int(self.lucency is not None) + (7 if self.vertebra_channels else 0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = [[float(a), float(b)] for a, b in self.windows]
        d["lucency"] = [float(v) for v in self.lucency] if self.lucency is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Preprocess":
        return cls(**(d or {}))

    def image_channels(self, image: np.ndarray) -> np.ndarray:
        """HU (X, Y, Z) → float32 (W, X, Y, Z) windowed to [0, 1] (+ the raw lucency, if on)."""
        hu = image.astype(np.float32)
        chans = [np.clip((hu - (lv - wd / 2)) / wd, 0.0, 1.0) for lv, wd in self.windows]
        if self.lucency is not None:
            below, width = self.lucency[0], self.lucency[1]
            chans.append(np.clip((below - hu) / width, 0.0, 1.0))
        return np.stack(chans)

    def mask_channels(self, mask: np.ndarray, vertebra: str) -> np.ndarray:
        """Label map (X, Y, Z) → float32 (1 or 2, X, Y, Z): target vertebra (+ all vertebrae)."""
        chans = [mask == CLASS_INDEX[vertebra]]
        if self.all_mask:
            chans.append((mask > 0) & (mask <= 7))
        return np.stack(chans).astype(np.float32)

    def vertebra_planes(self, vertebra: str, spatial: Sequence[int]) -> torch.Tensor:
        """7 constant one-hot channels (7, X, Y, Z), or an empty (0, X, Y, Z) tensor."""
        if not self.vertebra_channels:
            return torch.zeros((0, *spatial))
        onehot = torch.zeros((7, *spatial))
        onehot[VERTEBRAE.index(vertebra)] = 1.0
        return onehot

    def __call__(self, image: np.ndarray, mask: np.ndarray, vertebra: str,
                 augment: Callable[[dict], dict] | None = None) -> torch.Tensor:
        """Build the input tensor float32 (C, X, Y, Z) for one crop, augmenting if asked."""
        if image.shape != mask.shape:
            raise ValueError(f"crop image {image.shape} and mask {mask.shape} differ in shape")
        item = {"image": torch.from_numpy(self.image_channels(image)),
                "mask": torch.from_numpy(self.mask_channels(mask, vertebra))}
        if augment is not None:
            item = augment(item)
        img = torch.as_tensor(item["image"]).float()
        msk = torch.as_tensor(item["mask"]).float()
        n = len(self.windows)
        chans = [img[:n], msk]
        if self.masked_image is not None:
            chans.append(img[:1] * self.dilate(msk[:1], self.masked_image))
        if self.lucency is not None:  # lucency only inside the target vertebra
            erode = int(self.lucency[2]) if len(self.lucency) > 2 else 0
            inside = self.erode(msk[:1], erode) if erode > 0 else (msk[:1] > 0.5).float()
            chans.append(img[n:] * inside)
        chans.append(self.vertebra_planes(vertebra, img.shape[1:]))
        return torch.cat(chans, dim=0)

    @staticmethod
    def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
        """Binary erosion of (1, X, Y, Z) by a (2r+1)³ cube; voxels beyond the crop count as
        outside."""
        return _cube_filter(mask, radius, "minimum")

    @staticmethod
    def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
        """Binary dilation of (1, X, Y, Z) by a (2r+1)³ cube."""
        return _cube_filter(mask, radius, "maximum")


def _cube_filter(mask: torch.Tensor, radius: int, op: str) -> torch.Tensor:
    """Binary min/max filter of a (1, X, Y, Z) mask over a (2r+1)³ cube, zero outside, as float32
    (scipy's separable filter on uint8: ~1 ms per 48×48×32 crop, against ~30 ms for torch's cube
    ``max_pool3d`` on CPU)."""
    from scipy import ndimage

    m = (mask > 0.5).to(torch.uint8).cpu().numpy()
    if radius > 0:
        filt = ndimage.minimum_filter if op == "minimum" else ndimage.maximum_filter
        m = filt(m, size=(1,) + (2 * radius + 1,) * 3, mode="constant", cval=0)
    return torch.from_numpy(m.astype(np.float32))


def build_augment(rotate_deg: float = 10.0, scale: float = 0.1, translate_vox: float = 2.0,
                  flip_lr: bool = True, intensity: float = 0.1, noise_std: float = 0.02,
                  prob: float = 0.8) -> Callable[[dict], dict]:
    """MONAI dictionary transforms for ``{"image": (W,X,Y,Z), "mask": (M,X,Y,Z)}`` tensors.

    Args:
        rotate_deg: maximum rotation about each axis, degrees.
        scale: maximum relative scaling (0.1 = ±10 %).
        translate_vox: maximum shift in voxels.
        flip_lr: random left-right flip (the only anatomically allowed flip).
        intensity: maximum relative scaling and shift of the windowed image.
        noise_std: Gaussian noise std on the windowed [0, 1] image.
        prob: probability of the affine transform.
    """
    from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandScaleIntensityd, RandShiftIntensityd)

    rad = float(np.deg2rad(rotate_deg))
    ts: list[Any] = [RandAffined(keys=("image", "mask"), prob=prob, rotate_range=(rad, rad, rad),
                                 scale_range=(scale, scale, scale),
                                 translate_range=(translate_vox,) * 3,
                                 mode=("bilinear", "nearest"), padding_mode="zeros")]
    if flip_lr:
        ts.append(RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=LR_AXIS))
    if intensity > 0:
        ts += [RandScaleIntensityd(keys="image", factors=intensity, prob=0.5),
               RandShiftIntensityd(keys="image", offsets=intensity / 2, prob=0.5)]
    if noise_std > 0:
        ts.append(RandGaussianNoised(keys="image", std=noise_std, prob=0.5))
    # MONAI transforms keep their own generators: seed them from numpy's global state, which
    # `seed_everything` has set, so a seeded run augments identically (workers reseed via
    # monai.data.worker_init_fn).
    return Compose(ts).set_random_state(seed=int(np.random.randint(0, 2**31 - 1)))


def flip_lr(x: torch.Tensor) -> torch.Tensor:
    """Left-right flip of a batch (B, C, X, Y, Z) for test-time augmentation."""
    return torch.flip(x, dims=(2 + LR_AXIS,))
