"""Class-activation maps of stage 2 (:mod:`stage2_classify.cam`).

A small :class:`~stage2_classify.nets.SmallCNN3d` classifier is trained for a few dozen steps on
synthetic crops (a bright vertebra, a dark crack plane through it when fractured; the
stage-2 fixtures' crops); its CAM of unseen positive crops must put more of its mass on the
crack than on randomly placed regions of the same shape, and be denser on the crack than on
the intact bone of the same vertebra. A uniform or misplaced (e.g. flipped) map fails both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stage2_fixtures import make_crop

from common import geometry
from common.labels import VERTEBRAE
from stage2_classify import cam
from stage2_classify.module import CropClassifier
from stage2_classify.nets import SmallCNN3d
from stage2_classify.transforms import Preprocess

SHAPE = (16, 16, 12)


@pytest.fixture(scope="module")
def crack_model() -> CropClassifier:
    """SmallCNN3d (mask pooling, as configs/stage2/cpu.yaml) trained to tell cracked crops."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pre = Preprocess()
    net = SmallCNN3d(in_channels=pre.num_channels, out_channels=16, widths=(8, 16),
                     dropout=0.0, pool_mask_channel=1)
    model = CropClassifier(net=net, preprocess=pre.to_dict())
    pool = []
    for i in range(64):
        v = VERTEBRAE[i % 7]
        image, mask, _ = make_crop(v, bool(i % 2), SHAPE, rng)
        pool.append((pre(image, mask, v), float(i % 2), VERTEBRAE.index(v)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        batch = [pool[j] for j in rng.choice(len(pool), 16, replace=False)]
        logit = model(torch.stack([b[0] for b in batch]), torch.tensor([b[2] for b in batch]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logit, torch.tensor([b[1] for b in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("method", cam.METHODS)
def test_cam_lies_on_the_crack(crack_model, method):
    rng = np.random.default_rng(1)
    ratios, density = [], []
    for i in range(4):
        v = VERTEBRAE[(2 * i) % 7]
        image, mask, affine = make_crop(v, True, SHAPE, rng)
        bone = mask == VERTEBRAE.index(v) + 1
        crack = bone & (image < 150)  # the crack is soft-tissue HU inside the bone
        m = cam.crop_cams([crack_model], {v: (image, mask, affine)}, [v], method)[v]
        assert m.shape == SHAPE and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() == pytest.approx(1.0)
        inside = m[crack].sum() / m.sum()
        shifts = [rng.integers(-6, 7, 3) for _ in range(30)]
        random = [m[np.roll(crack, tuple(s), axis=(0, 1, 2))].sum() / m.sum() for s in shifts]
        ratios.append(inside / np.mean(random))
        density.append(m[crack].mean() / m[bone & ~crack].mean())
    assert np.mean(ratios) > 2.0, ratios
    assert np.mean(density) > 1.5, density


def test_densenet121_cam_runs_on_its_layer():
    """The base config's MONAI DenseNet121 (untrained): its layer, a map on the crop grid."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    pre = Preprocess()
    model = CropClassifier(net=DenseNet121(spatial_dims=3, in_channels=pre.num_channels,
                                           out_channels=8), preprocess=pre.to_dict()).eval()
    assert cam.target_layer(model) == "net.class_layers.relu"
    image, mask, affine = make_crop("C3", True, (32, 32, 32), np.random.default_rng(0))
    for method in cam.METHODS:
        m = cam.crop_cams([model], {"C3": (image, mask, affine)}, ["C3"], method)["C3"]
        assert m.shape == (32, 32, 32) and np.isfinite(m).all() and 0.0 <= m.min() <= m.max() <= 1
    # the hooks went onto copies: the loaded model still scores without them
    assert not model.net.class_layers.relu._forward_hooks


def test_cams_on_grid_follow_the_crop_affine():
    """A crop's map lands on the CT voxels its affine names (reversed axes and offset)."""
    ct_affine = np.diag([-0.5, -0.5, 1.0, 1.0])
    ct_affine[:3, 3] = [10.0, 20.0, -30.0]
    shape = (40, 40, 30)
    # a crop of CT voxels [5..12, 8..15, 4..9] with its z axis reversed
    crop_affine = geometry.translate_affine(ct_affine, [5, 8, 9]) @ np.diag([1.0, 1.0, -1.0, 1])
    heat_crop = np.zeros((8, 8, 6), np.float32)
    heat_crop[2, 3, 1] = 1.0  # CT voxel (7, 11, 8)
    heat = cam.cams_on_grid({"C4": heat_crop}, {"C4": (None, None, crop_affine)}, ct_affine,
                            shape)
    assert heat.dtype == np.uint8 and heat.shape == shape
    assert np.unravel_index(np.argmax(heat), shape) == (7, 11, 8) and heat.max() == 255
    assert heat[:5].max() == 0 and heat[13:].max() == 0
    points = cam.peak_slice_points({"C4": heat_crop},
                                   {"C4": (heat_crop, (heat_crop > 0).astype(np.uint8) * 4,
                                           crop_affine)})
    k = geometry.world_to_voxel(ct_affine, points["C4"][None])[0, 2]
    assert k == pytest.approx(8.0)
