"""Crop → network input: HU windows, mask channels, lucency and bone-gap maps, vertebra channels.

A crop (``common.manifest``) is ``image`` int16 (X, Y, Z) HU and ``mask`` uint8 (X, Y, Z) 0..7 on
the crop grid, whose axes run along the source CT axes (X = DICOM column, Y = row, Z = sorted
slice; for RSNA's axial series X is the patient's left-right axis). The network input is float32
(C, X, Y, Z) with channels, in order:

1. one channel per HU window ``(level, width)``: ``clip((HU - level + width/2) / width, 0, 1)``;
2. the target-vertebra mask (``mask == this vertebra``);
3. optionally all cervical vertebrae (``mask > 0``);
4. optionally the first window × the target mask dilated by ``masked_image`` voxels (the crop's
   neighbours, whose own fractures would otherwise look like this vertebra's, are blanked);
5. optionally a lucency map of the target vertebra: ``region × clip((below − HU) / width, 0, 1)``
   (voxels of the vertebra darker than bone: fracture lines and gaps light up on a dark field);
   the region is the target mask, optionally closed and hole-filled first (``lucency_fill``:
   a lucent gap that the stage-1 mask left out still counts) and optionally eroded by a few
   voxels so that its partial-volume rim (soft tissue, discs) does not light up;
6. optionally a bone-gap map (``gap``): the voxels that a binary closing of the bone
   (``HU > bone_hu``) fills, inside the target vertebra grown by one voxel. A crack or a
   fragment's fracture line is a thin lucent gap in bright bone, which a closing by one or two
   voxels bridges; the canal, foramina and the soft tissue around the bone are too wide to be
   filled, so normal anatomy stays dark (joint spaces between two bones do light up);
7. optionally 7 constant one-hot channels naming the vertebra.

The deterministic maps (windows, raw lucency, bone gaps, the lucency region) are computed on the
crop before augmentation and transformed with it, so a rotated crack keeps its gap.

Augmentation (``stage2_classify.augment``) runs on whole batches, in the DataLoader worker or on
the training device (``augment_on``), between ``prepare`` (per crop, cacheable) and ``assemble``
(per crop or batch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

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
        lucency_fill: close the target mask by 2 voxels and fill its holes before the erosion.
        gap: ``(bone_hu, closing_steps)`` of the bone-gap channel; None = off.
    """

    windows: Sequence[Sequence[float]] = field(default_factory=lambda: [BONE_WINDOW])
    all_mask: bool = False
    vertebra_channels: bool = False
    masked_image: int | None = None
    lucency: Sequence[float] | None = None
    lucency_fill: bool = False
    gap: Sequence[float] | None = None

    @property
    def num_image_channels(self) -> int:
        return len(self.windows)

    @property
    def num_channels(self) -> int:
        return (len(self.windows) + 1 + int(self.all_mask) + int(self.masked_image is not None)
                + int(self.lucency is not None) + int(self.gap is not None)
                + (7 if self.vertebra_channels else 0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = [[float(a), float(b)] for a, b in self.windows]
        d["lucency"] = [float(v) for v in self.lucency] if self.lucency is not None else None
        d["gap"] = [float(v) for v in self.gap] if self.gap is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Preprocess":
        return cls(**(d or {}))

    def image_channels(self, image: np.ndarray, mask: np.ndarray | None = None,
                       vertebra: str | None = None) -> np.ndarray:
        """HU (X, Y, Z) → float32 (W [+1] [+1], X, Y, Z): the windows in [0, 1], then the raw
        lucency (if on), then the bone-gap map (if on; needs ``mask`` and ``vertebra``)."""
        hu = image.astype(np.float32)
        chans = [np.clip((hu - (lv - wd / 2)) / wd, 0.0, 1.0) for lv, wd in self.windows]
        if self.lucency is not None:
            below, width = self.lucency[0], self.lucency[1]
            chans.append(np.clip((below - hu) / width, 0.0, 1.0))
        if self.gap is not None:
            if mask is None or vertebra is None:
                raise ValueError("the bone-gap channel needs the crop's mask and vertebra")
            chans.append(bone_gaps(hu, mask == CLASS_INDEX[vertebra], *self.gap))
        return np.stack(chans)

    def mask_channels(self, mask: np.ndarray, vertebra: str) -> np.ndarray:
        """Label map (X, Y, Z) → float32 (1 [+1] [+1], X, Y, Z): target vertebra (+ all
        vertebrae) (+ the lucency region, if lucency is on)."""
        target = mask == CLASS_INDEX[vertebra]
        chans = [target]
        if self.all_mask:
            chans.append((mask > 0) & (mask <= 7))
        if self.lucency is not None:
            chans.append(self.lucency_region(target))
        return np.stack(chans).astype(np.float32)

    def lucency_region(self, target: np.ndarray) -> np.ndarray:
        """bool (X, Y, Z): where the lucency channel counts (see ``lucency``/``lucency_fill``)."""
        from scipy import ndimage

        region = target
        if self.lucency_fill:  # padded, so the closing does not eat a target that meets a face
            pad = 2
            closed = ndimage.binary_fill_holes(ndimage.binary_closing(np.pad(region, pad),
                                                                      iterations=pad))
            region = closed[pad:-pad, pad:-pad, pad:-pad]
        erode = int(self.lucency[2]) if self.lucency is not None and len(self.lucency) > 2 else 0
        return binary_cube_filter(region, erode, "minimum") > 0 if erode > 0 else region

    def vertebra_planes(self, vertebra: str, spatial: Sequence[int],
                        device: torch.device | str = "cpu") -> torch.Tensor:
        """7 constant one-hot channels (7, X, Y, Z), or an empty (0, X, Y, Z) tensor."""
        if not self.vertebra_channels:
            return torch.zeros((0, *spatial), device=device)
        onehot = torch.zeros((7, *spatial), device=device)
        onehot[VERTEBRAE.index(vertebra)] = 1.0
        return onehot

    def prepare(self, image: np.ndarray, mask: np.ndarray, vertebra: str
                ) -> dict[str, torch.Tensor]:
        """The deterministic part, cacheable: ``{"image": the windows (W, X, Y, Z), "maps": raw
        lucency and/or bone gaps (1–2, X, Y, Z; absent when neither is on), "mask":
        mask_channels}``, all float32. Augmentation moves all three alike but changes the
        intensity of ``image`` only; :meth:`assemble` then builds the network input."""
        if image.shape != mask.shape:
            raise ValueError(f"crop image {image.shape} and mask {mask.shape} differ in shape")
        chans = torch.from_numpy(self.image_channels(image, mask, vertebra))
        n = len(self.windows)
        item = {"image": chans[:n], "mask": torch.from_numpy(self.mask_channels(mask, vertebra))}
        if len(chans) > n:
            item["maps"] = chans[n:]
        return item

    def assemble(self, item: dict[str, torch.Tensor], vertebra: str) -> torch.Tensor:
        """A prepared (and possibly augmented) item → the input float32 (C, X, Y, Z)."""
        img = torch.as_tensor(item["image"]).float()
        msk = torch.as_tensor(item["mask"]).float()
        chans = [img, msk[:1 + int(self.all_mask)]]
        if self.masked_image is not None:
            chans.append(img[:1] * self.dilate(msk[:1], self.masked_image))
        if self.lucency is not None:  # lucency only inside its region of the target vertebra
            chans.append(torch.as_tensor(item["maps"][:1]).float() * (msk[-1:] > 0.5).float())
        if self.gap is not None:
            chans.append(torch.as_tensor(item["maps"][-1:]).float())
        chans.append(self.vertebra_planes(vertebra, img.shape[1:], img.device))
        return torch.cat(chans, dim=0)

    def assemble_batch(self, parts: dict[str, torch.Tensor], vertebra: torch.Tensor
                       ) -> torch.Tensor:
        """:meth:`assemble` for a batch: parts (B, ·, X, Y, Z), ``vertebra`` (B,) indices 0..6
        → (B, C, X, Y, Z) on the parts' device."""
        names = [VERTEBRAE[i] for i in vertebra.tolist()]  # one device sync, not B
        return torch.stack([self.assemble({k: v[i] for k, v in parts.items()}, name)
                            for i, name in enumerate(names)])

    def __call__(self, image: np.ndarray, mask: np.ndarray, vertebra: str) -> torch.Tensor:
        """The input tensor float32 (C, X, Y, Z) of one crop (no augmentation)."""
        return self.assemble(self.prepare(image, mask, vertebra), vertebra)

    @staticmethod
    def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
        """Binary erosion of (1, X, Y, Z) by a (2r+1)³ cube; voxels beyond the crop count as
        outside."""
        return _cube_filter(mask, radius, "minimum")

    @staticmethod
    def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
        """Binary dilation of (1, X, Y, Z) by a (2r+1)³ cube."""
        return _cube_filter(mask, radius, "maximum")


def binary_cube_filter(mask: np.ndarray, radius: int, op: str) -> np.ndarray:
    """Binary min/max filter of a mask (..., X, Y, Z) over a (2r+1)³ cube of its last three axes,
    zero outside, as uint8 (scipy's separable filter on uint8: ~1 ms per 48×48×32 crop, against
    ~30 ms for torch's cube ``max_pool3d`` on CPU)."""
    from scipy import ndimage

    m = np.asarray(mask).astype(np.uint8)
    if radius > 0:
        filt = ndimage.minimum_filter if op == "minimum" else ndimage.maximum_filter
        size = (1,) * (m.ndim - 3) + (2 * radius + 1,) * 3
        m = filt(m, size=size, mode="constant", cval=0)
    return m


def _cube_filter(mask: torch.Tensor, radius: int, op: str) -> torch.Tensor:
    """:func:`binary_cube_filter` of a (1, X, Y, Z) tensor (> 0.5), as float32 on its device."""
    m = binary_cube_filter((mask > 0.5).cpu().numpy(), radius, op)
    return torch.from_numpy(m.astype(np.float32)).to(mask.device)


def bone_gaps(hu: np.ndarray, target: np.ndarray, bone_hu: float = 200.0,
              steps: float = 1) -> np.ndarray:
    """float32 (X, Y, Z) in {0, 1}: voxels that a binary closing (6-connected, ``steps`` times)
    of the bone ``hu > bone_hu`` adds, inside ``target`` (bool (X, Y, Z)) grown by one voxel.

    A lucent line up to about ``2 · steps`` voxels wide through bright bone lights up; wider
    spaces (canal, foramina, soft tissue) do not. Voxels beyond the crop count as not bone.
    """
    from scipy import ndimage

    bone = hu > bone_hu
    closed = ndimage.binary_closing(bone, iterations=int(steps), border_value=0)
    near = ndimage.binary_dilation(target, iterations=1)
    return (closed & ~bone & near).astype(np.float32)


def flip_lr(x: torch.Tensor) -> torch.Tensor:
    """Left-right flip of a batch (B, C, X, Y, Z) for test-time augmentation."""
    return torch.flip(x, dims=(2 + LR_AXIS,))
