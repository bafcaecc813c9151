"""The plain path: the engine's steps done the straightforward way, as a baseline and a check.

:class:`cspine.engine.StudyEngine` is the one test-time engine; this module re-does its steps
the way one would write them first — a float32 copy of the whole CT before every resampling
(SciPy on the CPU), the test-time flips as separate forward passes under ``torch.no_grad``,
each label's connected components over the whole grid, one stage-2 model at a time — with the
same networks and settings. It is used by ``benchmarks/predict_full.py`` (the baseline whose
time the engine is compared with, in the same run) and by ``tests/test_engine.py`` (the engine's
probabilities must equal these to 1e-4). Nothing in the pipeline calls it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from common import geometry
from common.geometry import AIR_HU, Volume
from common.labels import TARGETS, VERTEBRAE


def _largest_components(mask: np.ndarray) -> np.ndarray:
    out = mask.astype(np.uint8, copy=True)
    for lab in range(1, len(VERTEBRAE) + 1):
        sel = out == lab
        if not sel.any():
            continue
        comp, n = ndimage.label(sel, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[sel & (comp != int(np.argmax(sizes)) + 1)] = 0
    return out


@torch.no_grad()
def plain_stage1(model, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 labels on the model grid: (uint8 (X', Y', Z'), grid affine)."""
    from stage1_segment.inference import grid_settings
    from stage1_segment.module import LR_DIM
    from stage1_segment.transforms import window_hu

    affine, shape = grid_settings(model).grid_for(volume.affine, volume.shape)
    hu = geometry.resample_to_grid(volume.hu.astype(np.float32), volume.affine, affine, shape,
                                   order=1, cval=float(AIR_HU), dtype=np.float32)
    hu = np.rint(hu).astype(np.int16)
    device = next(model.parameters()).device
    image = torch.from_numpy(window_hu(hu, model.hparams.hu_window))[None, None].to(device)
    probs = torch.softmax(model(image).float(), dim=1)
    if model.hparams.tta_flip_lr:
        flipped = torch.softmax(model(torch.flip(image, dims=(LR_DIM,))).float(), dim=1)
        probs = 0.5 * (probs + torch.flip(flipped, dims=(LR_DIM,)))
    labels = probs[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
    return _largest_components(labels), affine


@torch.no_grad()
def plain_stage2(models, crops: dict[str, Any], tta_flip: bool | None = None) -> dict[str, float]:
    """Mean over models (and flips, one forward pass each) of each present crop's probability."""
    from stage2_classify.transforms import flip_lr

    out = {}
    pre = models[0].preprocess
    for v, crop in crops.items():
        if crop is None:
            continue
        x = pre(crop[0], crop[1], v)[None]
        index = torch.tensor([VERTEBRAE.index(v)])
        ps = []
        for m in models:
            x_m, i_m = x.to(next(m.parameters()).device), index.to(next(m.parameters()).device)
            p = torch.sigmoid(m(x_m, i_m))
            if (m.hparams.tta_flip if tta_flip is None else tta_flip):
                p = (p + torch.sigmoid(m(flip_lr(x_m), i_m))) / 2
            ps.append(float(p[0]))
        out[v] = float(np.mean(ps))
    return out


def plain_run(engine, volume: Volume) -> dict[str, Any]:
    """The plain path with an engine's models and settings.

    Returns:
        ``probabilities`` (TARGETS), ``crops`` {vertebra: crop or None}, ``timing_s``.
    """
    import pandas as pd

    from stage1_segment.boxes import vertebra_boxes
    from stage2_classify.aggregate import aggregate, crops_to_study

    timing = {}
    t0 = time.perf_counter()
    labels, grid_affine = plain_stage1(engine.stage1, volume)
    timing["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    boxes = vertebra_boxes(labels, grid_affine, volume.affine, volume.shape, volume.file_numbers)
    cfg = engine.crop_config
    voxel_mm3 = abs(float(np.linalg.det(grid_affine[:3, :3])))
    crops: dict[str, Any] = {}
    for v in VERTEBRAE:
        box = boxes[v]
        crops[v] = None
        if box is None or box["voxels"] * voxel_mm3 < cfg.min_volume_mm3:
            continue
        image, affine = geometry.crop_box(volume.hu.astype(np.float32), volume.affine,
                                          box["src_lo"], box["src_hi"], cfg.margin_mm, cfg.shape,
                                          order=1, cval=float(AIR_HU), dtype=np.float32)
        mask = geometry.resample_to_grid(labels, grid_affine, affine, cfg.shape, order=0, cval=0,
                                         dtype=np.uint8)
        crops[v] = (np.rint(image).astype(np.int16), mask, affine)
    timing["crops"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = plain_stage2(engine.stage2, crops, engine.tta_flip)
    frame = pd.DataFrame([{"study_uid": "study", "vertebra": v, "prob": q} for v, q in p.items()],
                         columns=["study_uid", "vertebra", "prob"])
    wide = aggregate(crops_to_study(frame, ["study"], engine.prior), engine.rule, engine.stacker,
                     engine.clip)
    timing["stage2"] = time.perf_counter() - t0
    return {"probabilities": {t: float(wide.at["study", t]) for t in TARGETS}, "crops": crops,
            "timing_s": timing}
