"""Where stage 2 looked: class-activation maps of the crop classifier, on the crop and on the CT.

MONAI's ``monai.visualize`` GradCAM (default) or GradCAM++ on the fracture logit of
:class:`~stage2_classify.module.CropClassifier`, averaged over the fold models.

**Target layer** (:func:`target_layer`): the last spatial feature map of the backbone, the one
its global pooling reads, so the gradient of the logit with respect to it is the classifier's
own weighting of each channel (GradCAM's premise); earlier layers are sharper but less tied
to the decision.

* :class:`~stage2_classify.nets.SmallCNN3d` (``configs/stage2/cpu.yaml``): ``net.features.<last>``,
  the final ReLU of the last stage: 1/8 of the crop with ``stem_stride: 2`` and three stages
  (6 × 6 × 3 cells for the 48 × 48 × 20 CPU crop). With ``pool_mask_channel`` the pooling reads
  only the target vertebra's cells, so the map is zero outside it.
* MONAI ``DenseNet121`` (``configs/stage2/base.yaml``): ``net.class_layers.relu``, the ReLU after
  ``norm5`` that the global average pooling reads: 1/32 of the crop (3 × 3 × 2 cells for the
  96 × 96 × 64 base crop), so it tells which part of the vertebra, not which voxel.
* :class:`~stage2_classify.nets.ResNet3d`: ``net.layer4``; any other backbone: the last module
  (in forward order) whose output is 5-D with more than one spatial cell.

MONAI upsamples the cell map trilinearly to the network input, which is the crop grid (the
preprocessing adds channels, never resamples), so the map sits on the crop with the crop's
affine. Raw maps (ReLU of the weighted activations) are averaged over the fold models and then
scaled to [0, 1] by their maximum.

A CAM needs one forward and one backward pass per fold model and vertebra (batch 1: GradCAM++
weighs by the exponentiated score of a single sample), so ``cspine predict`` computes it only
with ``--cam`` and only for flagged vertebrae. The models are deep-copied before MONAI hooks
them, so the loaded models stay hook-free for the next study.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from common import geometry
from common.labels import VERTEBRAE

METHODS = ("gradcam", "gradcam++")
Crop = tuple[np.ndarray, np.ndarray, np.ndarray]


class _Logit(nn.Module):
    """(B, C, X, Y, Z), vertebra (B,) → fracture logit (B, 1): the class axis MONAI expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, vertebra: torch.Tensor) -> torch.Tensor:
        return self.model(x, vertebra)[:, None]


def target_layer(model: nn.Module, sample: torch.Tensor | None = None,
                 vertebra: torch.Tensor | None = None) -> str:
    """Name of the layer the CAM reads, relative to the :class:`CropClassifier` ``model``
    (module docstring); ``sample``/``vertebra`` (one input) are needed only for the fallback
    probe of an unknown backbone."""
    from monai.networks.nets import DenseNet

    from stage2_classify.nets import ResNet3d, SmallCNN3d

    net = model.net
    if isinstance(net, SmallCNN3d):
        return f"net.features.{len(net.features) - 1}"
    if isinstance(net, DenseNet):
        return "net.class_layers.relu"
    if isinstance(net, ResNet3d):
        return "net.net.layer4"
    if sample is None:
        raise ValueError(f"no CAM layer known for {type(net).__name__}; pass a sample to probe")
    seen: list[str] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: seen.append(name)
        if isinstance(out, torch.Tensor) and out.ndim == 5 and int(np.prod(out.shape[2:])) > 1
        else None) for name, m in net.named_modules() if name]
    try:
        with torch.no_grad():
            model(sample, vertebra)
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError(f"{type(net).__name__} has no 5-D feature map for a CAM")
    return f"net.{seen[-1]}"


def _cam_objects(models: Sequence[nn.Module], method: str, sample: torch.Tensor,
                 index: torch.Tensor) -> list:
    """One MONAI CAM per fold model, each on a deep copy (MONAI's hooks stay on the copy)."""
    from monai.visualize import GradCAM, GradCAMpp

    if method not in METHODS:
        raise ValueError(f"CAM method must be one of {METHODS}, got {method!r}")
    cls = GradCAM if method == "gradcam" else GradCAMpp
    out = []
    for model in models:
        device = next(model.parameters()).device
        layer = "model." + target_layer(model, sample.to(device), index.to(device))
        out.append(cls(nn_module=_Logit(copy.deepcopy(model)).eval(), target_layers=layer,
                       postprocessing=lambda a: a))
    return out


def _fold_mean(cams: Sequence, x: torch.Tensor, index: torch.Tensor) -> np.ndarray:
    total = np.zeros(tuple(x.shape[1:]), dtype=np.float32)
    for cam in cams:
        device = next(cam.nn_module.model.parameters()).device
        with torch.enable_grad():
            out = cam(x[None].to(device).contiguous(), class_idx=0, vertebra=index.to(device))
        total += out[0, 0].detach().float().cpu().numpy()
    total /= max(1, len(cams))
    peak = float(total.max())
    return total / peak if peak > 0 else total


def crop_cam(models: Sequence[nn.Module], x: torch.Tensor, vertebra: str,
             method: str = "gradcam") -> np.ndarray:
    """The fold-averaged CAM of one network input.

    Args:
        models: fold :class:`CropClassifier` models (torch; eval mode).
        x: float32 (C, X, Y, Z) network input of one crop (``Preprocess.__call__``).
        vertebra: ``C1`` … ``C7``.
        method: ``gradcam`` or ``gradcam++``.

    Returns:
        float32 (X, Y, Z) in [0, 1] on the crop grid (all zeros when no model found evidence).
    """
    index = torch.tensor([VERTEBRAE.index(vertebra)])
    return _fold_mean(_cam_objects(models, method, x[None], index), x, index)


def crop_cams(models: Sequence[nn.Module], crops: Mapping[str, Crop | None],
              vertebrae: Sequence[str], method: str = "gradcam") -> dict[str, np.ndarray]:
    """:func:`crop_cam` for each of ``vertebrae`` that has a crop → {vertebra: (X, Y, Z) map}."""
    pre = models[0].preprocess
    inputs = {v: pre(crops[v][0], crops[v][1], v) for v in vertebrae if crops.get(v) is not None}
    if not inputs:
        return {}
    first = next(iter(inputs))
    cams = _cam_objects(models, method, inputs[first][None],
                        torch.tensor([VERTEBRAE.index(first)]))
    return {v: _fold_mean(cams, x, torch.tensor([VERTEBRAE.index(v)]))
            for v, x in inputs.items()}


def cams_on_grid(cams: Mapping[str, np.ndarray], crops: Mapping[str, Crop | None],
                 affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The crop maps put onto a CT grid by the crops' affines (linear), maximum where they meet.

    Args:
        cams: vertebra → float (X, Y, Z) map in [0, 1] on its crop grid.
        crops: vertebra → (image, mask, crop affine voxel → RAS mm).
        affine: float64 (4, 4) voxel → RAS mm of the CT grid; ``shape`` its (X, Y, Z).

    Returns:
        uint8 (X, Y, Z) heatmap, 0..255 = CAM 0..1 (0 outside every crop).
    """
    heat = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    for v, cam in cams.items():
        placed = geometry.resample_onto_footprint(cam, crops[v][2], affine, shape, order=1)
        if placed is None:
            continue
        patch, lo = placed
        sel = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, patch.shape))
        values = np.clip(np.rint(patch * 255), 0, 255).astype(np.uint8)
        heat[sel] = np.maximum(heat[sel], values)
    return heat


def peak_slice_points(cams: Mapping[str, np.ndarray], crops: Mapping[str, Crop | None]
                      ) -> dict[str, np.ndarray]:
    """World point (RAS mm) of each vertebra's axial crop slice of highest suspicion.

    The crop slice (crop axis Z, which runs along the CT's slice axis) with the largest CAM
    sum among the slices that hold the vertebra's stage-1 label; its centre is returned.
    """
    out = {}
    for v, cam in cams.items():
        image, mask, affine = crops[v]
        inside = (np.asarray(mask) == VERTEBRAE.index(v) + 1).any(axis=(0, 1))
        row = cam.sum(axis=(0, 1))
        row = np.where(inside, row, -np.inf) if inside.any() else row
        centre = np.array([(image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2,
                           int(np.argmax(row)), 1.0])
        out[v] = (np.asarray(affine) @ centre)[:3]
    return out
