"""Batched 3D augmentation of stage-2 crops, on whatever device the batch is on.

The crops of one batch are augmented together, after they reach the training device
(``CropDataModule.on_after_batch_transfer``) or in the DataLoader worker that collates them: one
``affine_grid`` and two ``grid_sample`` calls (trilinear for image and maps, nearest for masks)
warp the batch. Per-sample MONAI transforms in DataLoader workers cost as much CPU as the network itself
on the 2-core demo machine and would keep a GPU waiting on the CPU; see docs/stage2.md for the
measurement.

A batch is ``{"image": (B, W, X, Y, Z), "maps": (B, K, X, Y, Z) (optional), "mask": (B, M, X, Y,
Z)}`` float32, axes as on the crop grid (X = CT column = left-right for axial series, Y = row,
Z = sorted slice). Every transform keeps a crack a crack: small rotations, scalings and shifts
(in voxel units, about the crop centre), a left-right flip (the only anatomically allowed
flip), and intensity scaling, shift and Gaussian noise on ``image`` only (``maps`` are derived
from HU and move with the image but are never re-scaled or noised; ``mask`` is resampled by
nearest neighbour, so it stays binary).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from stage2_classify.transforms import flip_lr


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) radians about X, Y, Z → (B, 3, 3) rotation matrices R = Rx · Ry · Rz."""
    out = torch.eye(3, device=angles.device).repeat(len(angles), 1, 1)
    for axis in range(3):
        j, k = [a for a in range(3) if a != axis]
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        r = torch.eye(3, device=angles.device).repeat(len(angles), 1, 1)
        r[:, j, j], r[:, j, k], r[:, k, j], r[:, k, k] = c, -s, s, c
        out = out @ r
    return out


def affine_theta(matrix: torch.Tensor, shift_vox: torch.Tensor, size: tuple[int, int, int]
                 ) -> torch.Tensor:
    """The ``F.affine_grid`` theta (B, 3, 4) that makes output voxel p sample the input at
    ``matrix @ (p − c) + c + shift_vox`` (c = the crop centre; voxel units, axes X, Y, Z) for a
    (B, C, X, Y, Z) tensor of spatial ``size``.

    ``affine_grid`` works in normalised coordinates ordered (Z, Y, X) for a 5-D input, and with
    ``align_corners=False`` voxel p maps to ``(p − c) / half`` (half = size / 2) per axis: so the
    voxel-space matrix becomes ``D⁻¹ · M · D`` (D = diag(half)) and a rotation stays a rotation
    on a crop that is not a cube. (MONAI's ``AffineTransform`` layer does the same conversion but
    took about twice the time here; benchmarks/stage2_augment.py.)
    """
    half = torch.tensor([s / 2.0 for s in size], device=matrix.device)
    a = matrix * half[None, None, :] / half[None, :, None]
    t = shift_vox / half
    rev = [2, 1, 0]  # (X, Y, Z) → grid order (Z, Y, X)
    return torch.cat([a[:, rev][:, :, rev], t[:, rev, None]], dim=2)


class BatchAugment:
    """Random affine (with probability ``prob``), left-right flip, intensity and noise.

    Args:
        rotate_deg: maximum rotation about each axis, degrees.
        scale: maximum relative scaling per axis (0.1 = ±10 %).
        translate_vox: maximum shift per axis, voxels.
        flip_lr: random left-right flip (probability 0.5).
        intensity: maximum relative scaling (and half of it as an absolute shift) of ``image``,
            each applied with probability 0.5.
        noise_std: standard deviation of Gaussian noise added to ``image`` (probability 0.5).
        prob: probability of the random affine per crop.

    Random numbers come from torch's global generator on the batch's device, which
    ``seed_everything`` seeds, so a seeded run augments identically.
    """

    def __init__(self, rotate_deg: float = 10.0, scale: float = 0.1, translate_vox: float = 2.0,
                 flip_lr: bool = True, intensity: float = 0.1, noise_std: float = 0.02,
                 prob: float = 0.8) -> None:
        self.rotate = math.radians(rotate_deg)
        self.scale = scale
        self.translate = translate_vox
        self.flip_lr = flip_lr
        self.intensity = intensity
        self.noise_std = noise_std
        self.prob = prob

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        image = out["image"]
        b, dev = image.shape[0], image.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, device=dev) * 2 - 1

        if self.prob > 0:
            on = torch.nonzero(torch.rand(b, device=dev) < self.prob).flatten()
            if len(on):  # resample only the crops that draw an affine
                n = len(on)
                m = _rotation(uniform(n, 3) * self.rotate)
                m = m @ torch.diag_embed(1 + uniform(n, 3) * self.scale)
                theta = affine_theta(m, uniform(n, 3) * self.translate, tuple(image.shape[2:]))
                grid = F.affine_grid(theta, [n, 1, *image.shape[2:]], align_corners=False)
                smooth = [k for k in ("image", "maps") if k in out]
                sizes = [out[k].shape[1] for k in smooth]
                moved = F.grid_sample(torch.cat([out[k][on] for k in smooth], dim=1), grid,
                                      mode="bilinear", padding_mode="zeros", align_corners=False)
                for k, part in zip(smooth, torch.split(moved, sizes, dim=1)):
                    out[k] = out[k].index_copy(0, on, part)
                out["mask"] = out["mask"].index_copy(0, on, F.grid_sample(
                    out["mask"][on], grid, mode="nearest", padding_mode="zeros",
                    align_corners=False))
        if self.flip_lr:
            flip = torch.nonzero(torch.rand(b, device=dev) < 0.5).flatten()
            for k in ("image", "maps", "mask"):
                if k in out and len(flip):
                    out[k] = out[k].index_copy(0, flip, flip_lr(out[k][flip]))
        img = out["image"]
        if self.intensity > 0:
            gate = (torch.rand(b, 1, 1, 1, 1, device=dev) < 0.5).float()
            img = img * (1 + uniform(b, 1, 1, 1, 1) * self.intensity * gate)
            gate = (torch.rand(b, 1, 1, 1, 1, device=dev) < 0.5).float()
            img = img + uniform(b, 1, 1, 1, 1) * (self.intensity / 2) * gate
        if self.noise_std > 0:
            noisy = torch.nonzero(torch.rand(b, device=dev) < 0.5).flatten()
            if len(noisy):
                img = img.index_add(0, noisy, torch.randn_like(img[noisy]) * self.noise_std)
        out["image"] = img
        return out
