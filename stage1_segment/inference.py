"""Single-study inference: checkpoint → C1–C7 mask, on the model grid or the CT's own grid.

Used by the test-time engine (:mod:`cspine.engine`) and ``cspine export-mask``. Everything the
model needs (grid, HU window, thoracic mode, TTA) comes from the checkpoint's hyperparameters.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from common import geometry
from common.geometry import Volume
from common.labels import VERTEBRAE
from stage1_segment.module import Stage1Module
from stage1_segment.prepare import GridSettings, resample_volume
from stage1_segment.transforms import window_hu

#: 26-connectivity for "connected" (diagonal neighbours count).
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def load_model(ckpt_path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> Stage1Module:
    """Rebuild a trained :class:`Stage1Module` (network from its saved config) in eval mode."""
    from common.checkpoints import unreadable_checkpoint

    with warnings.catch_warnings():  # the rebuilt net is passed back to __init__: expected
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        with unreadable_checkpoint(ckpt_path):
            model = Stage1Module.load_from_checkpoint(str(ckpt_path), map_location=map_location,
                                                      weights_only=False)
    return model.eval()


def grid_settings(model: Stage1Module) -> GridSettings:
    """The model grid the checkpoint was trained on (its cache key, too)."""
    hp = model.hparams
    return GridSettings(shape=hp.get("grid_shape"), spacing_mm=hp.get("grid_spacing_mm"),
                        thoracic=hp.get("thoracic", "background"))


def largest_components(mask: np.ndarray, labels: Sequence[int] = range(1, len(VERTEBRAE) + 1)
                       ) -> np.ndarray:
    """Keep only the largest 26-connected component of each label (others become 0).

    Args:
        mask: integer (X, Y, Z) label map.
        labels: the labels to clean (default C1..C7; others are kept as they are).

    Returns:
        uint8 (X, Y, Z) cleaned copy.
    """
    out = mask.astype(np.uint8, copy=True)
    boxes = ndimage.find_objects(out)  # one pass: the bounding box of every label present
    for lab in labels:
        if lab > len(boxes) or boxes[lab - 1] is None:
            continue
        box = boxes[lab - 1]  # components of a label lie inside its bounding box
        sub = out[box]
        sel = sub == lab
        comp, n = ndimage.label(sel, structure=_STRUCTURE)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            sub[sel & (comp != int(np.argmax(sizes)) + 1)] = 0
    return out


@torch.inference_mode()
def predict_on_grid(model: Stage1Module, hu_grid, tta_flip_lr: bool | None = None,
                    clean: bool = True) -> np.ndarray:
    """Segment a volume already on the model grid.

    Args:
        model: a loaded stage-1 model (its device is used; fp16 autocast on CUDA).
        hu_grid: int16/float (X, Y, Z) HU on the model grid (NumPy, or a torch tensor already
            on the model's device).
        tta_flip_lr: average with the left/right mirror (default: the checkpoint's setting).
        clean: keep the largest connected component per vertebra.

    Returns:
        uint8 (X, Y, Z) classes (0 background, 1..7 C1..C7, 8 thoracic if merged).
    """
    device = next(model.parameters()).device
    if isinstance(hu_grid, torch.Tensor):  # the same windowing as window_hu, on the device
        low, high = (float(w) for w in model.hparams.hu_window)
        image = ((hu_grid.to(device, torch.float32) - low) / (high - low)).clamp(0, 1)[None, None]
    else:
        image = torch.from_numpy(window_hu(hu_grid, model.hparams.hu_window))[None, None].to(device)
    with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        probs = model.predict_probs(image, tta_flip_lr=tta_flip_lr)
    # max(dim=0).indices: the first maximal class, as argmax, ~10x faster on the CPU for (C, N)
    labels = probs[0].max(dim=0).indices.to(torch.uint8).cpu().numpy()
    return largest_components(labels) if clean else labels


def segment_to_grid(model: Stage1Module, volume: Volume, tta_flip_lr: bool | None = None,
                    clean: bool = True, hu_device: torch.Tensor | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Resample a CT onto the model grid and segment it.

    Args:
        hu_device: ``volume.hu`` already on a torch device (e.g. the GPU): resample there
            (:func:`common.geometry.resample_to_grid_torch`) instead of with SciPy on the CPU.

    Returns:
        (uint8 (X', Y', Z') classes on the model grid, model-grid affine voxel → RAS mm).
    """
    if hu_device is not None:
        from common.geometry import AIR_HU

        affine, shape = grid_settings(model).grid_for(volume.affine, volume.shape)
        hu_grid = torch.round(geometry.resample_to_grid_torch(
            hu_device, volume.affine, affine, shape, cval=float(AIR_HU)))  # as np.rint
        return predict_on_grid(model, hu_grid, tta_flip_lr, clean), affine
    hu_grid, affine = resample_volume(volume, grid_settings(model))
    return predict_on_grid(model, hu_grid, tta_flip_lr, clean), affine


def segment_volume(model: Stage1Module, volume: Volume, tta_flip_lr: bool | None = None,
                   clean: bool = True) -> np.ndarray:
    """Segment a CT and return the mask on the CT's own grid.

    Inference runs on the model grid; the labels are mapped back by both affines with nearest
    neighbour (:func:`common.geometry.labels_to_grid`).

    Returns:
        uint8 (X, Y, Z) classes with ``volume.shape``; ``volume.affine`` is its affine.
    """
    mask, affine = segment_to_grid(model, volume, tta_flip_lr, clean)
    return geometry.labels_to_grid(mask, affine, volume.affine, volume.shape)[0]
