"""Anatomy check of a stage-1 segmentation: is this a cervical spine a radiologist would accept?

A segmenter trained on one kind of data still labels whatever it is shown: on a CT unlike its
training set it can put "C1" on the skull vault and "C7" on a shoulder with full confidence
(issue 16). Every test-time path (:class:`cspine.engine.StudyEngine`) runs :func:`check_anatomy`
on the stage-1 labels; a study that fails gets ``implausible_segmentation`` with the reasons, and
its probabilities are replaced by the prior (:mod:`cspine.engine`).

The checks, on the vertebrae found (limits in :class:`AnatomyLimits`, all in mm or mL of patient
space, so they do not depend on the grid):

* ``order``: the centroids go down (RAS +S is up) from C1 to C7, each at least
  ``min_step_mm`` below the one above;
* ``column``: neighbouring centroids lie on one column: at most ``max_axial_step_mm`` apart in
  the axial (R, A) plane;
* ``missing``: no vertebra is missing between two that were found (C2 and C4 without C3), and
  the vertical gap between neighbours' boxes is at most ``max_gap_mm``;
* ``size``: each vertebra's volume (mL) and its box extent along R, A, S (mm) within the adult
  ranges; a vertebra cut by the scan's first or last slice is only held to the upper limits;
* ``bone``: at least ``min_bone_fraction`` of its voxels have HU ≥ ``bone_hu`` in the CT;
* ``count``: at least ``min_found`` vertebrae found.

The default ranges are wide on purpose: they flag nonsense (a vertebra the size of a skull, a
column that jumps to the shoulder), not anatomical variation; docs/stage1.md gives the values
measured on the ground-truth and predicted masks they were set against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from common import geometry
from common.labels import VERTEBRAE

STATUS_OK = "ok"
STATUS_IMPLAUSIBLE = "implausible_segmentation"
STATUS_OFF = "not_checked"
#: Most voxels per vertebra whose HU is sampled for the bone fraction (a seeded subsample).
BONE_SAMPLE = 20000


@dataclass(frozen=True)
class AnatomyLimits:
    """Limits of :func:`check_anatomy` (mm, mL, HU, fractions). Override any field with
    ``--anatomy-limits FILE`` (a YAML/JSON mapping of these names) on the commands that run the
    engine; :meth:`from_mapping` refuses unknown names. ``check: false`` turns the check off
    (status ``not_checked``): for models known to segment badly, e.g. the smoke tests'
    one-epoch models (configs/smoke/anatomy_off.yaml)."""

    check: bool = True
    min_found: int = 2
    min_step_mm: float = 3.0
    max_axial_step_mm: float = 25.0
    max_gap_mm: float = 15.0
    min_volume_ml: float = 1.0
    max_volume_ml: float = 60.0
    #: smallest / largest box extent along R (left-right), A (front-back), S (up-down)
    min_extent_mm: tuple[float, float, float] = (15.0, 10.0, 5.0)
    max_extent_mm: tuple[float, float, float] = (120.0, 100.0, 70.0)
    bone_hu: float = 150.0
    min_bone_fraction: float = 0.3

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, where: str = "anatomy limits"
                     ) -> "AnatomyLimits":
        """Limits with the given fields replaced (ValueError naming ``where`` on a bad name or
        value)."""
        if not values:
            return cls()
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a mapping of limit names to values")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown limit(s) {', '.join(unknown)}; "
                             f"known: {', '.join(names)}")
        clean: dict[str, Any] = {}
        for key, value in values.items():
            default = getattr(cls, key)
            try:
                if isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise ValueError
                    clean[key] = value
                elif isinstance(default, tuple):
                    clean[key] = tuple(float(v) for v in value)
                    if len(clean[key]) != 3:
                        raise ValueError
                else:
                    clean[key] = type(default)(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {key} must be like {default!r}, got {value!r}"
                                 ) from None
        return cls(**clean)

    @classmethod
    def from_file(cls, path) -> "AnatomyLimits":
        """Limits from a YAML (or JSON) file of field names → values."""
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not YAML: {exc}".splitlines()[0]) from None
        return cls.from_mapping(values, where=str(path))

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def vertebra_stats(labels: np.ndarray, affine: np.ndarray, hu: np.ndarray,
                   hu_affine: np.ndarray, bone_hu: float = AnatomyLimits.bone_hu
                   ) -> dict[str, dict[str, Any]]:
    """Per found vertebra: size, position and bone fraction in patient space.

    Args:
        labels: uint8 (X, Y, Z) classes (0 background, 1..7 = C1..C7) on the grid of ``affine``.
        affine: float64 (4, 4) label voxel → RAS mm.
        hu: int16 (X', Y', Z') CT in HU on the grid of ``hu_affine`` (may differ from the labels'
            grid: voxel centres are mapped through patient space, nearest CT voxel).
        hu_affine: float64 (4, 4) CT voxel → RAS mm.
        bone_hu: HU from which a voxel counts as bone.

    Returns:
        vertebra name → ``volume_ml``, ``centroid_mm`` (R, A, S), ``mm_lo``/``mm_hi`` (RAS box
        of the voxel faces), ``extent_mm`` (R, A, S), ``bone_fraction``, ``cut`` (touches the
        first or last slice along the grid's superior-inferior axis).
    """
    out: dict[str, dict[str, Any]] = {}
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    codes = geometry.axcodes(affine)  # the grid axis that runs inferior-superior
    s_axis = codes.index("S") if "S" in codes else codes.index("I")
    rng = np.random.default_rng(0)
    top = np.asarray(hu.shape) - 1
    for i, name in enumerate(VERTEBRAE):
        idx = np.argwhere(labels == i + 1)
        if not len(idx):
            continue
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        corners = geometry.box_corners_world(affine, lo - 0.5, hi + 0.5)
        mm_lo, mm_hi = corners.min(axis=0), corners.max(axis=0)
        centroid = geometry.voxel_to_world(affine, idx.mean(axis=0)[None])[0]
        sample = idx if len(idx) <= BONE_SAMPLE else idx[rng.choice(len(idx), BONE_SAMPLE,
                                                                     replace=False)]
        ijk = np.rint(geometry.world_to_voxel(hu_affine,
                                              geometry.voxel_to_world(affine, sample))).astype(int)
        inside = np.all((ijk >= 0) & (ijk <= top), axis=1)
        ijk = ijk[inside]
        bone = float((hu[ijk[:, 0], ijk[:, 1], ijk[:, 2]] >= bone_hu).sum()) / len(sample)
        out[name] = {
            "volume_ml": round(len(idx) * voxel_ml, 3),
            "centroid_mm": [round(float(c), 2) for c in centroid],
            "mm_lo": [round(float(c), 2) for c in mm_lo],
            "mm_hi": [round(float(c), 2) for c in mm_hi],
            "extent_mm": [round(float(c), 2) for c in mm_hi - mm_lo],
            "bone_fraction": round(bone, 4),
            "cut": bool(lo[s_axis] == 0 or hi[s_axis] == labels.shape[s_axis] - 1),
        }
    return out


def judge(stats: dict[str, dict[str, Any]], limits: AnatomyLimits = AnatomyLimits()
          ) -> list[str]:
    """The reasons (``check:detail`` strings, module docstring) a set of :func:`vertebra_stats`
    fails; empty when it passes."""
    reasons: list[str] = []
    found = [v for v in VERTEBRAE if v in stats]
    if len(found) < limits.min_found:
        reasons.append(f"count:{len(found)} vertebrae found (at least {limits.min_found})")
    for v in found:
        s = stats[v]
        if not limits.min_volume_ml <= s["volume_ml"] <= limits.max_volume_ml \
                and not (s["cut"] and s["volume_ml"] < limits.min_volume_ml):
            reasons.append(f"size:{v} volume {s['volume_ml']:.1f} mL outside "
                           f"{limits.min_volume_ml:g}-{limits.max_volume_ml:g}")
        for axis, ext, low, high in zip("RAS", s["extent_mm"], limits.min_extent_mm,
                                        limits.max_extent_mm):
            if ext > high or (ext < low and not s["cut"]):
                reasons.append(f"size:{v} {axis} extent {ext:.0f} mm outside {low:g}-{high:g}")
        if s["bone_fraction"] < limits.min_bone_fraction:
            reasons.append(f"bone:{v} {s['bone_fraction']:.2f} of its voxels on bone "
                           f"(HU >= {limits.bone_hu:g}; at least {limits.min_bone_fraction:g})")
    for upper, lower in zip(found, found[1:]):
        a, b = stats[upper], stats[lower]
        between = VERTEBRAE[VERTEBRAE.index(upper) + 1:VERTEBRAE.index(lower)]
        if between:
            reasons.append(f"missing:{','.join(between)} between {upper} and {lower}")
        step = a["centroid_mm"][2] - b["centroid_mm"][2]
        if step < limits.min_step_mm:
            reasons.append(f"order:{lower} centre {-step:.0f} mm above {upper}'s "
                           f"(C1..C7 must go down)")
        axial = float(np.hypot(a["centroid_mm"][0] - b["centroid_mm"][0],
                               a["centroid_mm"][1] - b["centroid_mm"][1]))
        if axial > limits.max_axial_step_mm:
            reasons.append(f"column:{upper}->{lower} {axial:.0f} mm apart in the axial plane "
                           f"(at most {limits.max_axial_step_mm:g})")
        gap = a["mm_lo"][2] - b["mm_hi"][2]
        if gap > limits.max_gap_mm:
            reasons.append(f"missing:{gap:.0f} mm gap between {upper} and {lower} "
                           f"(at most {limits.max_gap_mm:g})")
    return reasons


def check_anatomy(labels: np.ndarray, affine: np.ndarray, hu: np.ndarray, hu_affine: np.ndarray,
                  limits: AnatomyLimits = AnatomyLimits()) -> dict[str, Any]:
    """The anatomy record of one segmentation (arguments as :func:`vertebra_stats`).

    Returns:
        ``status`` (``ok`` | ``implausible_segmentation`` | ``not_checked``), ``reasons`` (list
        of ``check:detail`` strings) and ``vertebrae`` (the :func:`vertebra_stats`).
    """
    stats = vertebra_stats(labels, affine, hu, hu_affine, limits.bone_hu)
    if not limits.check:
        return {"status": STATUS_OFF, "reasons": [], "vertebrae": stats}
    reasons = judge(stats, limits)
    return {"status": STATUS_IMPLAUSIBLE if reasons else STATUS_OK, "reasons": reasons,
            "vertebrae": stats}


def add_limits_argument(parser) -> None:
    """``--anatomy-limits FILE`` on a command that runs the engine (argparse)."""
    parser.add_argument("--anatomy-limits", default=None, metavar="FILE",
                        help="YAML file overriding limits of the anatomy check of the stage-1 "
                             "segmentation (names and defaults: stage1_segment/anatomy.py "
                             "AnatomyLimits; docs/stage1.md)")


def limits_from_args(args) -> AnatomyLimits:
    """The limits a command's ``--anatomy-limits`` names (the defaults without it)."""
    path = getattr(args, "anatomy_limits", None)
    return AnatomyLimits.from_file(path) if path else AnatomyLimits()
