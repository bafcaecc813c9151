"""Per-vertebra crops from the full-resolution CT: the crop settings and the cutting.

Each vertebra's box (from the stage-1 label map on the model grid, mapped to source indices by
:mod:`stage1_segment.boxes`) grown by ``margin_mm`` is resampled from the in-memory CT to a
fixed ``shape`` with :func:`common.geometry.crop_box`, and the label map is resampled (nearest)
onto the same crop grid. The test-time engine (:mod:`cspine.engine`) calls these functions for
every study, whether from ``cspine predict``, ``make submit`` or the making of the stage-2
training crops (``make crops``, :mod:`cspine.batch`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from common import geometry
from common.geometry import AIR_HU, Volume
from common.labels import VERTEBRAE

Crop = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class CropConfig:
    """How vertebra crops are cut.

    Attributes:
        shape: crop grid (X, Y, Z) voxels; the box plus margin is resampled to it.
        margin_mm: margin added on every side of the vertebra's box, mm.
        min_volume_mm3: a predicted vertebra smaller than this is marked absent ("too small").
        lenient: load DICOM series in lenient mode (repairs recorded in the QC record).
        n_folds: folds of ``$WORK/folds.csv`` (created with this count if missing).
    """

    shape: tuple[int, int, int] = (96, 96, 64)
    margin_mm: float = 10.0
    min_volume_mm3: float = 300.0
    lenient: bool = False
    n_folds: int = 5

    def key(self) -> str:
        """Hash of the settings (a changed setting re-crops)."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def crop_vertebra(volume: Volume, mask: np.ndarray, mask_affine: np.ndarray,
                  src_lo: Sequence[int], src_hi: Sequence[int], cfg: CropConfig,
                  hu_device=None) -> Crop:
    """Cut one box (inclusive source indices) plus margin out of the CT and the label map.

    ``hu_device``: ``volume.hu`` as a torch tensor on a device (the GPU): the image is
    resampled there (:func:`common.geometry.resample_to_grid_torch`), the labels on the CPU.

    Returns:
        (image int16 (shape) HU, outside the CT = -1024; mask uint8 (shape) full label map,
        nearest; crop affine voxel → RAS mm).
    """
    # sampled straight from the int16 volume (only the voxels under the crop are read; scipy
    # interpolates in double whatever the input type, so the values equal a float32 copy's)
    if hu_device is not None:
        affine = geometry.box_grid(volume.affine, src_lo, src_hi, cfg.margin_mm, cfg.shape)
        image = geometry.resample_to_grid_torch(hu_device, volume.affine, affine, cfg.shape,
                                                cval=float(AIR_HU)).round().cpu().numpy()
    else:
        image, affine = geometry.crop_box(volume.hu, volume.affine, src_lo, src_hi,
                                          cfg.margin_mm, cfg.shape, order=1, cval=float(AIR_HU),
                                          dtype=np.float32)
    labels = geometry.resample_to_grid(mask, mask_affine, affine, cfg.shape, order=0, cval=0,
                                       dtype=np.uint8)
    return np.rint(image).astype(np.int16), labels, affine


def crops_from_boxes(volume: Volume, mask: np.ndarray, mask_affine: np.ndarray,
                     boxes: dict[str, dict[str, Any] | None], cfg: CropConfig,
                     hu_device=None) -> tuple[dict[str, Crop | None], dict[str, str]]:
    """Crops of C1..C7 from boxes already computed (:func:`stage1_segment.boxes.vertebra_boxes`).

    Args:
        volume: the full-resolution CT (:func:`common.dicom_io.load_series`).
        mask: uint8 (X, Y, Z) classes on the grid of ``mask_affine`` (the model grid).
        mask_affine: float64 (4, 4) voxel → RAS mm of the mask grid.
        boxes: vertebra name → box dict (source indices ``src_lo``/``src_hi``) or None.
        cfg: crop settings.
        hu_device: as in :func:`crop_vertebra`.

    Returns:
        (vertebra name → (image, mask, affine) as in :func:`crop_vertebra`, or None when the
        vertebra is absent or smaller than ``cfg.min_volume_mm3``; vertebra name → status
        ``ok`` / ``absent: not found by stage 1`` / ``absent: too small (… mm3 < …)``).
    """
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(mask_affine)[:3, :3])))
    crops: dict[str, Crop | None] = {}
    status: dict[str, str] = {}
    for name in VERTEBRAE:
        box = boxes.get(name)
        crops[name] = None
        if box is None:
            status[name] = "absent: not found by stage 1"
        elif box["voxels"] * voxel_mm3 < cfg.min_volume_mm3:
            status[name] = (f"absent: too small ({box['voxels'] * voxel_mm3:.0f} mm3 < "
                            f"{cfg.min_volume_mm3:.0f})")
        else:
            crops[name] = crop_vertebra(volume, mask, mask_affine, box["src_lo"], box["src_hi"],
                                        cfg, hu_device)
            status[name] = "ok"
    return crops, status


def crops_for_volume(volume: Volume, mask: np.ndarray, mask_affine: np.ndarray | None,
                     cfg: CropConfig) -> dict[str, Crop | None]:
    """Crops of C1..C7 for one CT and a label map on any grid (boxes computed here).

    Args:
        volume: the full-resolution CT.
        mask: uint8 (X, Y, Z) classes, on the model grid or the CT grid.
        mask_affine: the mask's affine (None: the mask is on the CT grid).
        cfg: crop settings.

    Returns:
        vertebra name → crop or None, as in :func:`crops_from_boxes`.
    """
    from stage1_segment.boxes import vertebra_boxes

    mask_affine = volume.affine if mask_affine is None else mask_affine
    boxes = vertebra_boxes(mask, mask_affine, volume.affine, volume.shape, volume.file_numbers)
    return crops_from_boxes(volume, mask, mask_affine, boxes, cfg)[0]


def crop_config(settings: dict[str, Any]) -> CropConfig:
    """A :class:`CropConfig` from a config's ``crops:`` section or a run record (unknown keys
    are ignored; ``shape`` as a tuple)."""
    known = {k: v for k, v in (settings or {}).items() if k in CropConfig.__dataclass_fields__}
    if "shape" in known:
        known["shape"] = tuple(int(s) for s in known["shape"])
    return CropConfig(**known)
