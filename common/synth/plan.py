"""Per-study plans (labels, numbering, compression, masks) and the per-study render.

Everything random is derived from the config's seed: the plan of all studies from one master
generator, and each study's anatomy, fracture geometry and noise from three independent streams
spawned from (seed, study index). So a study renders identically whatever the number of
workers, the order of completion or an interrupted run, and rendering the same study without
its fractures changes only the fractured voxels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common import geometry
from common.labels import OVERALL, VERTEBRAE
from common.synth.phantom import Rendered, render, sample_anatomy
from common.synth.presets import REAL_Z_SPACING, THICKNESS_RATIOS, SynthConfig
from common.synth.writer import IOP

UID_ROOT = "1.2.826.0.1.3680043"


@dataclass
class StudyPlan:
    """What one study will be; decided up front for the whole dataset.

    Attributes:
        index: position in the dataset (train studies first); seeds the study's generators.
        uid: StudyInstanceUID.
        split: "train" or "test".
        labels: C1..C7 and patient_overall → 0/1.
        fractures: fractured vertebra → "crack" | "fragment".
        reversed: file 1 is the lowest slice (z rises with the file number).
        start: the first file number (1, or 2 / 59 for the offset studies).
        jpeg: JPEG Lossless SV1 instead of uncompressed.
        mask: write ``segmentations/<UID>.nii`` (train only).
        mask_dtype: "uint8" or "uint16".
        boxes: write rows to ``train_bounding_boxes.csv`` (positive train studies only).
        header: extra DICOM header text (``Manufacturer``, ``ConvolutionKernel``,
            ``ContrastBolusAgent``, ``PatientAge``, ``PatientSex``) of a site profile.
        thickness_mm: the study's slice spacing = SliceThickness (None: the real-spacing draw).
    """

    index: int
    uid: str
    split: str
    labels: dict[str, int]
    fractures: dict[str, str] = field(default_factory=dict)
    reversed: bool = False
    start: int = 1
    jpeg: bool = False
    mask: bool = False
    mask_dtype: str = "uint8"
    boxes: bool = False
    header: dict[str, str] = field(default_factory=dict)
    thickness_mm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(frac: float, n: int, at_least_one: bool = False) -> int:
    k = int(math.floor(frac * n + 0.5))
    return max(k, 1 if (at_least_one and frac > 0 and n > 0) else 0)


def _pick(rng: np.random.Generator, pool: list[int], k: int) -> list[int]:
    """``k`` members of ``pool`` in random order."""
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def vertebra_rates(prevalence: dict[str, float]) -> tuple[dict[str, float], bool]:
    """Per-vertebra Bernoulli rates for a positive study so the marginals match ``prevalence``.

    A positive study draws each vertebra with rate q_v and redraws until one is fractured, so
    P(v) = p_overall · q_v / P(≥1). Solving q_v = (p_v / p_overall) · P(≥1) by fixed-point
    iteration gives marginals equal to ``prevalence`` in expectation. When the rates sum to
    p_overall exactly, every positive study has exactly one fracture (returned flag True).
    """
    p_all = prevalence[OVERALL]
    if p_all <= 0:
        return {v: 0.0 for v in VERTEBRAE}, True
    r = np.array([prevalence[v] / p_all for v in VERTEBRAE])
    if r.sum() <= 1.0 + 1e-6:
        return dict(zip(VERTEBRAE, (r / r.sum()).tolist())), True
    p_any = 1.0
    for _ in range(500):
        p_any = 1.0 - float(np.prod(1.0 - np.minimum(r * p_any, 1.0)))
    return dict(zip(VERTEBRAE, np.minimum(r * p_any, 1.0).tolist())), False


def plan_studies(cfg: SynthConfig) -> list[StudyPlan]:
    """The plans of all studies: ``n_train`` train then ``n_test`` test studies."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7919]))
    n = cfg.n_train + cfg.n_test
    suffixes = cfg.uid_base + rng.choice(20000, size=n, replace=False)
    rates, single = vertebra_rates(cfg.prevalence)
    names, q = list(rates), np.array(list(rates.values()))
    plans = []
    for split, ids in (("train", range(cfg.n_train)), ("test", range(cfg.n_train, n))):
        ids = list(ids)
        positives = set(_pick(rng, ids, _count(cfg.prevalence[OVERALL], len(ids))))
        for i in ids:
            labels = {v: 0 for v in VERTEBRAE}
            if i in positives:
                if single:
                    labels[names[int(rng.choice(len(names), p=q))]] = 1
                else:
                    while not any(labels.values()):
                        labels = {v: int(x) for v, x in zip(names, rng.random(len(q)) < q)}
            labels[OVERALL] = int(any(labels[v] for v in VERTEBRAE))
            kinds = {v: ("fragment" if rng.random() < cfg.fragment_fraction else "crack")
                     for v in VERTEBRAE if labels[v]}
            plans.append(StudyPlan(i, f"{UID_ROOT}.{int(suffixes[i])}", split, labels, kinds))
    everyone = list(range(n))
    for i in _pick(rng, everyone, _count(cfg.reversed_fraction, n, True)):
        plans[i].reversed = True
    for j, i in enumerate(_pick(rng, everyone, _count(cfg.offset_start_fraction, n, True))):
        plans[i].start = 59 if j == 0 else 2
    for i in _pick(rng, everyone, _count(cfg.jpeg_fraction, n, True)):
        plans[i].jpeg = True
    train = list(range(cfg.n_train))
    masked = _pick(rng, train, _count(cfg.mask_fraction, len(train)))
    for i in masked:
        plans[i].mask = True
    k16 = _count(cfg.uint16_mask_fraction, len(masked), at_least_one=len(masked) > 1)
    for i in masked[:min(k16, len(masked) - (1 if len(masked) > 1 else 0))]:
        plans[i].mask_dtype = "uint16"
    pos_train = [i for i in train if plans[i].labels[OVERALL]]
    for i in _pick(rng, pos_train, _count(cfg.box_fraction, len(pos_train))):
        plans[i].boxes = True
    _site_headers(cfg, plans)
    return plans


def _balanced(rng: np.random.Generator, values: tuple, n: int) -> list:
    """``values`` spread over n studies in near-equal counts, in random order."""
    order = rng.permutation(n)
    return [values[int(r) % len(values)] for r in np.argsort(order)]


def _site_headers(cfg: SynthConfig, plans: list[StudyPlan]) -> None:
    """The site profile's header fields and slice thickness per study, from their own stream
    (so a config without them plans exactly what it planned before they existed). Vendors,
    kernels and thicknesses are each balanced over the dataset and crossed at random."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 104729]))
    n = len(plans)
    for tag, values in (("Manufacturer", cfg.manufacturers), ("ConvolutionKernel", cfg.kernels)):
        if values:
            for plan, value in zip(plans, _balanced(rng, tuple(values), n)):
                plan.header[tag] = str(value)
    if cfg.slice_thickness_mm:
        for plan, value in zip(plans, _balanced(rng, tuple(cfg.slice_thickness_mm), n)):
            plan.thickness_mm = float(value)
    if cfg.contrast_fraction > 0:
        for i in _pick(rng, list(range(n)), _count(cfg.contrast_fraction, n, True)):
            plans[i].header["ContrastBolusAgent"] = "IOHEXOL"
    if cfg.demographics:
        for plan in plans:
            plan.header["PatientAge"] = f"{int(rng.integers(18, 96)):03d}Y"
            plan.header["PatientSex"] = "M" if rng.random() < 0.6 else "F"


@dataclass
class StudyImage:
    """A rendered study with its DICOM geometry.

    Attributes:
        rendered: HU (X, Y, Z) int16, labels, fracture voxels.
        affine: RAS affine of the (X, Y, Z) grid.
        file_numbers: (Z,) file number of each sorted slice.
        pixel_spacing, z_spacing, thickness: mm.
    """

    rendered: Rendered
    affine: np.ndarray
    file_numbers: np.ndarray
    pixel_spacing: float
    z_spacing: float
    thickness: float


def render_study(cfg: SynthConfig, plan: StudyPlan, fractures: bool = True) -> StudyImage:
    """Draw the geometry, anatomy, fractures and noise of one study.

    Args:
        fractures: False renders the same study intact (same anatomy and noise), which is how
            tests locate the fractured voxels independently of the generator's bookkeeping.
    """
    geo_rng, frac_rng, noise_rng = (np.random.default_rng(s) for s in
                                    np.random.SeedSequence([cfg.seed, plan.index]).spawn(3))
    ps = round(float(geo_rng.uniform(*cfg.pixel_spacing)), 6)
    spacings = np.array(list(REAL_Z_SPACING))
    weights = np.array(list(REAL_Z_SPACING.values()), float)
    real = float(geo_rng.choice(spacings, p=weights / weights.sum()))
    step = round(float(np.clip(real * cfg.z_spacing_scale, *cfg.z_spacing_clip)), 4)
    ratios = np.array(list(THICKNESS_RATIOS))
    ratio = float(geo_rng.choice(ratios, p=np.array(list(THICKNESS_RATIOS.values()))))
    thickness = round(step * ratio, 4)
    if plan.thickness_mm:  # a site profile's contiguous slices of one thickness
        step = thickness = round(float(plan.thickness_mm), 4)
    scale = float(geo_rng.uniform(*cfg.size_scale))
    centre_lps = geo_rng.uniform(-20.0, 20.0, size=2)  # image centre, LPS x/y (mm)
    c2_z = float(geo_rng.uniform(-150.0, 100.0))
    noise = float(geo_rng.uniform(*cfg.noise_hu))
    # the C2 body sits near the image centre, shifted forward so the whole neck is in view
    back = 12.0 * scale
    centre_ras = np.array([-centre_lps[0], -centre_lps[1]])
    c2_xy = centre_ras + np.array([geo_rng.uniform(-6, 6), back + geo_rng.uniform(-6, 6)])
    anat = sample_anatomy(geo_rng, c2_xy, c2_z, scale)
    top = anat.top_of_c1() + float(geo_rng.uniform(*cfg.top_margin_mm))
    bottom = anat.bottom_of("C7") - float(geo_rng.uniform(*cfg.bottom_margin_mm))
    n = int(math.floor((top - bottom) / step)) + 1
    if n > cfg.max_slices:
        need = (anat.top_of_c1() + 2.0) - (anat.bottom_of("C7") - 2.0)
        n = cfg.max_slices
        if (n - 1) * step < need:
            raise ValueError(f"{plan.uid}: {n} slices of {step} mm cannot hold C1..C7 "
                             f"({need:.0f} mm); raise max_slices or z_spacing_clip")
        bottom = max(bottom, top - (n - 1) * step)
        bottom = min(bottom, anat.bottom_of("C7") - 2.0)
    half = 0.5 * (cfg.size - 1) * ps
    first = [round(float(centre_lps[0] - half), 3), round(float(centre_lps[1] - half), 3),
             round(bottom, 3)]
    affine = geometry.affine_from_dicom(IOP, [ps, ps], first, step)
    shape = (cfg.size, cfg.size, n)
    kinds = plan.fractures if fractures else {}
    rendered = render(anat, affine, shape, kinds, frac_rng, noise_rng, noise)
    if cfg.bone_hu_scale != 1.0 or cfg.hu_offset != 0.0:  # another scanner's calibration
        hu = rendered.hu.astype(np.float32)
        hu = np.where(hu > 0, hu * cfg.bone_hu_scale, hu) + cfg.hu_offset
        rendered.hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    k = np.arange(n)
    file_numbers = plan.start + (k if plan.reversed else (n - 1 - k))
    return StudyImage(rendered, affine, file_numbers.astype(np.int64), ps, step, thickness)


def fracture_boxes(image: StudyImage, uid: str, pad_mm: float = 2.0) -> list[dict[str, Any]]:
    """``train_bounding_boxes.csv`` rows: per fracture and axial slice, the pixel box around the
    voxels the fracture changed, grown by ``pad_mm`` and clipped to the image.

    x, y are the column and row of the box's top-left pixel; width, height in pixels;
    slice_number is the file number of the slice.
    """
    nx, ny, _ = image.rendered.hu.shape
    pad = max(1, int(round(pad_mm / image.pixel_spacing)))
    rows = []
    for name in VERTEBRAE:
        idx = image.rendered.fracture_voxels.get(name)
        if idx is None or len(idx) == 0:
            continue
        for k in np.unique(idx[:, 2]):
            sel = idx[idx[:, 2] == k]
            x0, x1 = max(0, sel[:, 0].min() - pad), min(nx - 1, sel[:, 0].max() + pad)
            y0, y1 = max(0, sel[:, 1].min() - pad), min(ny - 1, sel[:, 1].max() + pad)
            rows.append({"StudyInstanceUID": uid, "x": float(x0), "y": float(y0),
                         "width": float(x1 - x0 + 1), "height": float(y1 - y0 + 1),
                         "slice_number": int(image.file_numbers[k])})
    return sorted(rows, key=lambda r: (r["slice_number"], r["x"], r["y"]))
