"""Crop → input channels, and augmentations that keep shapes, masks and anatomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage2_classify.augment import BatchAugment
from stage2_classify.transforms import Preprocess, flip_lr


def _crop() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((12, 10, 8), -1000, np.int16)
    image[4:8, 3:7, 2:8] = 400  # "bone" of C3 (class 3, z 2..5) and C4 (z 6..7)
    mask = np.zeros((12, 10, 8), np.uint8)
    mask[4:8, 3:7, 2:6] = 3
    mask[4:8, 3:7, 6:8] = 4  # the neighbour above
    return image, mask


def test_channels_in_order_with_hand_values():
    image, mask = _crop()
    pre = Preprocess(windows=[(400.0, 1800.0), (0.0, 100.0)], all_mask=True,
                     vertebra_channels=True, masked_image=1)
    x = pre(image, mask, "C3")
    assert x.shape == (pre.num_channels, 12, 10, 8) and pre.num_channels == 2 + 1 + 1 + 1 + 7
    assert float(x[0, 5, 5, 3]) == 0.5  # level 400 is the window centre
    assert float(x[0, 0, 0, 0]) == 0.0 and float(x[1, 5, 5, 3]) == 1.0
    assert torch.equal(x[2] > 0, torch.from_numpy(mask == 3))  # target vertebra
    assert torch.equal(x[3] > 0, torch.from_numpy(mask > 0))  # all vertebrae
    masked = x[4]
    assert float(masked[5, 5, 3]) == 0.5 and float(masked[5, 5, 6]) == 0.5  # 1 voxel of dilation
    assert float(masked[5, 5, 7]) == 0.0  # the neighbour beyond the dilation is blanked
    assert float(masked[0, 0, 0]) == 0.0
    onehot = x[5:].mean(dim=(1, 2, 3))
    assert onehot.tolist() == [0, 0, 1, 0, 0, 0, 0]


def test_preprocess_roundtrips_through_the_checkpoint_dict():
    pre = Preprocess(windows=[(400, 1800)], masked_image=2)
    assert Preprocess.from_dict(pre.to_dict()) == Preprocess(windows=[[400.0, 1800.0]], masked_image=2)


def _batch(pre: Preprocess, n: int = 3) -> dict[str, torch.Tensor]:
    image, mask = _vertebra_with_canal_and_crack()
    items = [pre.prepare(image, mask, "C3") for _ in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_batch_augment_keeps_shape_and_binary_mask():
    pre = Preprocess()
    aug = BatchAugment(prob=1.0)
    for _ in range(3):
        parts = aug(_batch(pre))
        x = pre.assemble_batch(parts, torch.tensor([2, 2, 2]))
        assert x.shape == (3, 2, 16, 16, 16)
        assert set(torch.unique(x[:, 1]).tolist()) <= {0.0, 1.0}


def test_batch_affine_is_a_voxel_space_rotation_about_the_centre():
    from torch.nn import functional as F

    from stage2_classify.augment import _rotation, affine_theta

    def warp(x: torch.Tensor, m: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        theta = affine_theta(m, shift, tuple(x.shape[2:]))
        return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                             mode="nearest", align_corners=False)

    # a single bright voxel off-centre on a non-cubic grid, rotated 90 degrees about Z
    x = torch.zeros(1, 1, 9, 7, 5)
    x[0, 0, 6, 3, 2] = 1.0  # 2 voxels along +X from the centre (4, 3, 2)
    m = _rotation(torch.tensor([[0.0, 0.0, np.pi / 2]]))
    assert torch.nonzero(warp(x, m, torch.zeros(1, 3))[0, 0]).tolist() == [[4, 1, 2]]
    # p - c = R^T (2, 0, 0); a shift of +1 voxel along X pulls from one voxel further
    assert torch.nonzero(warp(x, m, torch.tensor([[1.0, 0, 0]]))[0, 0]).tolist() == [[4, 2, 2]]
    assert torch.equal(warp(x, torch.eye(3)[None], torch.zeros(1, 3)), x)  # identity


def test_flip_lr_flips_only_the_left_right_axis():
    x = torch.arange(24.0).reshape(1, 1, 2, 3, 4)
    y = flip_lr(x)
    assert torch.equal(y[0, 0, 0], x[0, 0, 1]) and torch.equal(y[0, 0, 1], x[0, 0, 0])
    assert torch.equal(flip_lr(y), x)


def test_lucency_channel_with_an_eroded_mask_ignores_the_rim():
    image = np.full((9, 9, 9), 300, np.int16)
    image[4, 2:7, 2:7] = 50  # a crack through the middle of the vertebra
    image[1, :, :] = 0  # a dark rim face, partly inside the mask
    mask = np.zeros((9, 9, 9), np.uint8)
    mask[1:8, 1:8, 1:8] = 3
    raw = Preprocess(lucency=[200.0, 150.0])(image, mask, "C3")[-1]
    eroded = Preprocess(lucency=[200.0, 150.0, 1])(image, mask, "C3")[-1]
    assert float(raw[4, 4, 4]) == 1.0 and float(eroded[4, 4, 4]) == 1.0  # the crack stays
    assert float(raw[1, 4, 4]) == 1.0 and float(eroded[1, 4, 4]) == 0.0  # the rim goes
    assert float(eroded[0, 4, 4]) == 0.0 and float(raw[5, 4, 4]) == 0.0  # outside / bright bone
    assert Preprocess.from_dict(Preprocess(lucency=[200, 150, 1]).to_dict()).lucency == [200.0, 150.0, 1.0]


def _vertebra_with_canal_and_crack() -> tuple[np.ndarray, np.ndarray]:
    """A 16³ bony block (C3) with a 6-voxel-wide canal and a 1-voxel lucent crack."""
    image = np.full((16, 16, 16), 40, np.int16)  # soft tissue around
    image[2:14, 2:14, 2:14] = 350  # bone
    image[5:11, 5:11, :] = 40  # the canal: too wide for a one-step closing
    image[2:5, 8, 4:12] = 60  # a crack through the front wall, one voxel wide
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[(image > 200)] = 3
    return image, mask


def test_bone_gap_channel_lights_the_crack_not_the_canal_or_the_outside():
    image, mask = _vertebra_with_canal_and_crack()
    pre = Preprocess(gap=[200.0, 1])
    x = pre(image, mask, "C3")
    assert pre.num_channels == 3 and x.shape == (3, 16, 16, 16)
    gap = x[-1]
    assert float(gap[3, 8, 8]) == 1.0  # inside the crack
    assert float(gap[8, 8, 8]) == 0.0  # centre of the canal
    assert float(gap[0, 0, 0]) == 0.0 and float(gap[3, 3, 3]) == 0.0  # outside / intact bone
    assert set(torch.unique(gap).tolist()) <= {0.0, 1.0}
    # without a mask the channel cannot be built
    with pytest.raises(ValueError, match="mask"):
        pre.image_channels(image)


def test_lucency_fill_counts_a_gap_the_mask_left_out():
    image, mask = _vertebra_with_canal_and_crack()
    mask[image < 200] = 0  # the stage-1 mask skips the crack's voxels
    plain = Preprocess(lucency=[200.0, 150.0])(image, mask, "C3")[-1]
    filled = Preprocess(lucency=[200.0, 150.0], lucency_fill=True)(image, mask, "C3")[-1]
    assert float(plain[3, 8, 8]) == 0.0  # outside the mask: not counted
    assert float(filled[3, 8, 8]) > 0.9  # closed + hole-filled region covers the crack
    assert float(filled[0, 0, 0]) == 0.0


def test_assemble_batch_matches_single_crops_and_old_dicts_still_load():
    image, mask = _vertebra_with_canal_and_crack()
    pre = Preprocess(windows=[(400, 1800)], all_mask=True, lucency=[200, 150, 1],
                     lucency_fill=True, gap=[200, 1], vertebra_channels=True)
    mask4 = np.where(mask == 3, 4, 0).astype(np.uint8)  # the same bone labelled C4
    items = [pre.prepare(image, mask, "C3"), pre.prepare(image, mask4, "C4")]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    x = pre.assemble_batch(batch, torch.tensor([2, 3]))  # vertebra indices of C3, C4
    assert torch.equal(x[0], pre(image, mask, "C3")) and torch.equal(x[1], pre(image, mask4, "C4"))
    assert x[0, -7:].mean(dim=(1, 2, 3)).tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert x[1, -7:].mean(dim=(1, 2, 3)).tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert pre(image, mask, "C3").shape[0] == pre.num_channels == 1 + 2 + 1 + 1 + 7
    old = {"windows": [[400.0, 1800.0]], "all_mask": False, "vertebra_channels": False,
           "masked_image": None, "lucency": [200.0, 150.0]}  # a checkpoint from before `gap`
    assert Preprocess.from_dict(old) == Preprocess(windows=[[400.0, 1800.0]], lucency=[200.0, 150.0])
    assert Preprocess.from_dict(pre.to_dict()) == Preprocess(
        windows=[[400.0, 1800.0]], all_mask=True, lucency=[200.0, 150.0, 1.0], lucency_fill=True,
        gap=[200.0, 1.0], vertebra_channels=True)


def test_crop_dataset_cache_gives_the_uncached_inputs(tmp_path):
    import pandas as pd
    from torch.utils.data import default_collate

    from stage2_classify.data import CropDataset, batch_inputs

    image, mask = _vertebra_with_canal_and_crack()
    np.savez(tmp_path / "c.npz", image=image, mask=mask, affine=np.eye(4))
    rows = pd.DataFrame({"crop_path": [str(tmp_path / "c.npz")], "vertebra": ["C3"],
                         "study_uid": ["1.2.3"]})
    pre = Preprocess(lucency=[200, 150, 1], lucency_fill=True, gap=[200, 1])
    cached = CropDataset(rows, pre, np.array([1.0]), cache=True)
    plain = CropDataset(rows, pre, np.array([1.0]), cache=False)

    def x_of(ds: CropDataset) -> torch.Tensor:
        batch = batch_inputs(default_collate([ds[0]]), pre)
        assert set(batch) == {"x", "vertebra", "y", "index"}
        return batch["x"][0]

    first, again = x_of(cached), x_of(cached)
    assert torch.equal(first, x_of(plain)) and torch.equal(again, first)
    assert torch.equal(first, pre(image, mask, "C3"))
    assert set(cached._cache) == {0} and cached._cache[0]["mask"].dtype == torch.uint8


def test_augmentation_moves_maps_with_the_image_but_never_adds_noise_to_them():
    pre = Preprocess(lucency=[200, 150], gap=[200, 1])
    batch = _batch(pre)
    assert set(batch) == {"image", "mask", "maps"} and batch["maps"].shape[1] == 2
    aug = BatchAugment(prob=0.0, flip_lr=False, intensity=0.5, noise_std=0.5)
    for _ in range(5):
        out = aug({k: v.clone() for k, v in batch.items()})
        assert torch.equal(out["maps"], batch["maps"])  # no noise / shift / scaling
        assert torch.equal(out["mask"], batch["mask"])
    torch.manual_seed(1)
    moved = BatchAugment(prob=1.0, flip_lr=False, intensity=0.0, noise_std=0.0)(
        {k: v.clone() for k, v in batch.items()})
    assert not torch.equal(moved["maps"], batch["maps"])  # but moved
    assert "maps" not in Preprocess().prepare(*_vertebra_with_canal_and_crack(), "C3")


def test_batch_flip_flips_image_maps_and_mask_together():
    pre = Preprocess(gap=[200, 1])
    batch = _batch(pre, n=16)
    torch.manual_seed(0)
    out = BatchAugment(prob=0.0, flip_lr=True, intensity=0.0, noise_std=0.0)(batch)
    flipped = [not torch.equal(out["image"][i], batch["image"][i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i in range(16):
        ref = {k: (v[i].flip(1) if flipped[i] else v[i]) for k, v in batch.items()}
        assert all(torch.equal(out[k][i], ref[k]) for k in batch)


def test_lucency_fill_keeps_a_target_that_meets_the_crop_face():
    mask = np.zeros((10, 10, 6), np.uint8)
    mask[2:8, 2:8, :] = 3  # the vertebra runs through both z faces of the crop
    region = Preprocess(lucency=[200, 150], lucency_fill=True).lucency_region(mask == 3)
    assert region[mask == 3].all()  # a superset of the target, faces included
