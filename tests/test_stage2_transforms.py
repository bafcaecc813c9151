"""Crop → input channels, and augmentations that keep shapes, masks and anatomy."""

from __future__ import annotations

import numpy as np
import torch

from stage2_classify.transforms import Preprocess, build_augment, flip_lr


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


def test_augment_keeps_shape_and_binary_mask():
    image, mask = _crop()
    pre = Preprocess()
    aug = build_augment(prob=1.0)
    for _ in range(3):
        x = pre(image, mask, "C3", aug)
        assert x.shape == (2, 12, 10, 8)
        assert set(torch.unique(x[1]).tolist()) <= {0.0, 1.0}


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
