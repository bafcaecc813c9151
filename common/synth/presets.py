"""Configuration of the synthetic dataset: the ``tiny``, ``demo`` and ``full`` presets.

Every number that shapes a generated dataset lives in :class:`SynthConfig`; a preset is a
:class:`SynthConfig` with chosen values, and any field can be overridden by keyword
(``generate(out, preset="demo", n_train=20)``) or by a ``cspine synth`` flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.labels import OVERALL, PREVALENCE, TARGETS, VERTEBRAE

#: Median z spacing from IPP (mm) → number of RSNA train studies (RSNA_FACTS.md §3.5, the 17
#: "other" studies left out). Synthetic studies draw their spacing from this table, times the
#: preset's ``z_spacing_scale`` and clipped to ``z_spacing_clip``.
REAL_Z_SPACING: dict[float, int] = {
    0.625: 869, 0.4: 322, 1.0: 269, 0.8: 218, 0.3125: 146, 0.5: 114, 0.45: 50, 0.7: 14,
}
#: SliceThickness / spacing ratios: equal in 57 % of studies, thicker (overlapping
#: reconstructions) in the rest (RSNA_FACTS.md §3.5: 1139 equal, 878 thicker).
THICKNESS_RATIOS: dict[float, float] = {1.0: 0.57, 1.25: 0.18, 1.5: 0.15, 1.6: 0.10}

#: The real train-set rates (RSNA_FACTS.md §3.1).
REAL_PREVALENCE: dict[str, float] = dict(PREVALENCE)
#: The demo preset doubles every vertebra's rate and makes 60 % of studies positive, so that the
#: small validation folds of a ~100-study dataset still hold positives of every vertebra.
DEMO_PREVALENCE: dict[str, float] = {**{v: 2 * PREVALENCE[v] for v in VERTEBRAE}, OVERALL: 0.60}


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic dataset (same config + seed → same bytes).

    Attributes:
        preset: name of the preset this config started from (informational).
        seed: master seed; every study derives its own generator from (seed, study index).
        n_train, n_test: number of studies under ``train_images/`` and ``test_images/``.
        size: Rows = Columns of every slice (pixels).
        pixel_spacing: (min, max) in-plane pixel size in mm, drawn uniformly per study.
        z_spacing_scale: factor applied to the real z-spacing draw (``REAL_Z_SPACING``).
        z_spacing_clip: (min, max) z spacing in mm after scaling.
        max_slices: upper bound on slices per study (the field of view is cut at the bottom).
        top_margin_mm, bottom_margin_mm: (min, max) of the field of view above the top of C1
            and below the bottom of C7, drawn per study.
        size_scale: (min, max) anatomy scale factor per study (1 = average adult).
        prevalence: per-target positive rate, keys C1..C7 and patient_overall. Exactly
            round(n * patient_overall) studies of each split are positive; each positive study
            has at least one fractured vertebra and the per-vertebra rates match in expectation.
        jpeg_fraction: share of studies written as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70).
        reversed_fraction: share of studies numbered feet-first (file 1 = the lowest slice).
        offset_start_fraction: share of studies whose file numbers start at 2 or 59, not 1.
        mask_fraction: share of train studies with ``segmentations/<UID>.nii``.
        uint16_mask_fraction: share of those masks stored as uint16 (the rest uint8).
        box_fraction: share of positive train studies with rows in train_bounding_boxes.csv.
        fragment_fraction: share of fractures that are displaced fragments (the rest cracks).
        noise_hu: (min, max) standard deviation of the Gaussian image noise per study (HU).
        workers: processes used to write studies (results do not depend on it).
        uid_base: first numeric suffix of the study UIDs ``1.2.826.0.1.3680043.<n>``.
        test_types: the prediction types ``test.csv`` / ``sample_submission.csv`` ask for per
            test study (default all eight; e.g. ``("C1",)`` for the shape of the real public
            test.csv, or C1..C7 only).
        test_without_images: extra studies listed in ``test.csv`` that have no folder under
            ``test_images/`` (the real public test.csv lists three such studies).
        site: name of the :data:`SITES` profile applied (informational; "" = none).
        manufacturers: each study's ``Manufacturer`` header is one of these, drawn per study
            (empty: the tag is not written, like the RSNA files).
        kernels: ``ConvolutionKernel`` values, drawn per study (empty: not written).
        slice_thickness_mm: when given, each study's slice spacing = ``SliceThickness`` is one
            of these (mm, drawn per study) instead of the real-spacing draw.
        bone_hu_scale: factor on every HU above 0 (another scanner's bone calibration / kVp).
        hu_offset: HU added to every voxel after the scale.
        contrast_fraction: share of studies whose header names a ``ContrastBolusAgent``.
        demographics: write ``PatientAge`` (18–95 y) and ``PatientSex`` (M/F) per study.
    """

    preset: str = "tiny"
    seed: int = 0
    n_train: int = 12
    n_test: int = 3
    size: int = 64
    pixel_spacing: tuple[float, float] = (2.0, 2.4)
    z_spacing_scale: float = 4.5
    z_spacing_clip: tuple[float, float] = (2.5, 3.5)
    max_slices: int = 64
    top_margin_mm: tuple[float, float] = (4.0, 20.0)
    bottom_margin_mm: tuple[float, float] = (8.0, 40.0)
    size_scale: tuple[float, float] = (0.92, 1.08)
    prevalence: dict[str, float] = field(default_factory=lambda: dict(REAL_PREVALENCE))
    jpeg_fraction: float = 0.3
    reversed_fraction: float = 0.1
    offset_start_fraction: float = 0.1
    mask_fraction: float = 1.0
    uint16_mask_fraction: float = 0.5
    box_fraction: float = 1.0
    fragment_fraction: float = 0.3
    noise_hu: tuple[float, float] = (8.0, 25.0)
    workers: int = 2
    uid_base: int = 10000
    test_types: tuple[str, ...] = TARGETS
    test_without_images: int = 0
    site: str = ""
    manufacturers: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    slice_thickness_mm: tuple[float, ...] = ()
    bone_hu_scale: float = 1.0
    hu_offset: float = 0.0
    contrast_fraction: float = 0.0
    demographics: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return json_ready(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """The fields that change the data (everything but ``workers``): the resume key."""
        d = self.to_dict()
        d.pop("workers")
        for name, default in SITE_DEFAULTS.items():  # datasets written before site options
            if d.get(name) == default:  # existed keep their identity
                d.pop(name)
        return d

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        if self.n_train < 0 or self.n_test < 0 or self.n_train + self.n_test == 0:
            raise ValueError("n_train and n_test must be >= 0 and not both 0")
        if not 16 <= self.size <= 1024:
            raise ValueError(f"size {self.size} outside 16..1024 pixels")
        if self.max_slices < 8:
            raise ValueError(f"max_slices {self.max_slices} < 8")
        for name in ("jpeg_fraction", "reversed_fraction", "offset_start_fraction",
                     "mask_fraction", "uint16_mask_fraction", "box_fraction",
                     "fragment_fraction", "contrast_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} outside [0, 1]")
        missing = [k for k in (*VERTEBRAE, OVERALL) if k not in self.prevalence]
        if missing:
            raise ValueError(f"prevalence lacks {missing}")
        p_all = self.prevalence[OVERALL]
        for v in VERTEBRAE:
            if not 0.0 <= self.prevalence[v] <= p_all:
                raise ValueError(f"prevalence[{v}]={self.prevalence[v]} must lie in "
                                 f"[0, patient_overall={p_all}]")
        if p_all > 0 and sum(self.prevalence[v] for v in VERTEBRAE) < p_all:
            raise ValueError("sum of C1..C7 prevalences must be >= patient_overall (each "
                             "positive study has at least one fractured vertebra)")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        bad = [t for t in self.test_types if t not in TARGETS]
        if not self.test_types or bad or len(set(self.test_types)) != len(self.test_types):
            raise ValueError(f"test_types {list(self.test_types)} must be distinct names among "
                             f"{', '.join(TARGETS)}")
        if self.test_without_images < 0:
            raise ValueError("test_without_images must be >= 0")
        if any(not 0.2 <= t <= 6.0 for t in self.slice_thickness_mm):
            raise ValueError(f"slice_thickness_mm {self.slice_thickness_mm} outside 0.2..6 mm")
        if not 0.5 <= self.bone_hu_scale <= 2.0:
            raise ValueError(f"bone_hu_scale {self.bone_hu_scale} outside 0.5..2")


#: The site-describing fields and their neutral values (a config at these values writes the
#: same bytes as before the fields existed).
SITE_DEFAULTS: dict[str, Any] = {"site": "", "manufacturers": [], "kernels": [],
                                 "slice_thickness_mm": [], "bone_hu_scale": 1.0,
                                 "hu_offset": 0.0, "contrast_fraction": 0.0,
                                 "demographics": False}

#: Named "other hospital" profiles: overrides applied by ``make_config(site=...)`` /
#: ``cspine synth --site``. ``site-b``: two vendors and kernels, thicker slices (1.5 or
#: 2.5 mm), 12 % coarser pixels (``pixel_spacing_scale``: the preset's range times it), about
#: twice the noise, darker bone and a +30 HU offset, a third of the studies with contrast, and
#: patient age and sex in the headers.
SITES: dict[str, dict[str, Any]] = {
    "site-b": {"manufacturers": ("GE MEDICAL SYSTEMS", "SIEMENS"),
               "kernels": ("BONEPLUS", "Br64"), "slice_thickness_mm": (1.5, 2.5),
               "pixel_spacing_scale": 1.12, "noise_hu": (25.0, 45.0),
               "bone_hu_scale": 0.9, "hu_offset": 30.0, "contrast_fraction": 0.33,
               "demographics": True},
}


PRESETS: dict[str, SynthConfig] = {
    # Tests: ~15 studies of 64² × ≤64 slices at ~2.2 × 2.2 × 2.8 mm; a few seconds in all.
    "tiny": SynthConfig(preset="tiny"),
    # make demo: both stages learn on 2 CPU cores in minutes. ~1.35 mm pixels, ~1.5 mm slices.
    "demo": SynthConfig(
        preset="demo", n_train=100, n_test=10, size=112, pixel_spacing=(1.25, 1.45),
        z_spacing_scale=2.4, z_spacing_clip=(1.2, 2.2), max_slices=128,
        prevalence=dict(DEMO_PREVALENCE), mask_fraction=0.5, box_fraction=0.5),
    # Benchmarks: close to the real 512² × ~300 slices at ~0.33 mm pixels; few studies.
    "full": SynthConfig(
        preset="full", n_train=4, n_test=2, size=512, pixel_spacing=(0.30, 0.36),
        z_spacing_scale=1.0, z_spacing_clip=(0.3, 1.0), max_slices=1100,
        top_margin_mm=(10.0, 40.0), bottom_margin_mm=(20.0, 60.0),
        mask_fraction=0.5, box_fraction=0.5, noise_hu=(15.0, 40.0)),
}


def make_config(preset: str = "tiny", seed: int = 0, site: str | None = None,
                **overrides: Any) -> SynthConfig:
    """A preset with overrides applied and checked.

    Args:
        preset: ``"tiny"``, ``"demo"`` or ``"full"``.
        seed: master seed.
        site: a :data:`SITES` profile applied before ``overrides`` (None / "": none).
        **overrides: any :class:`SynthConfig` field; ``None`` values are ignored. ``prevalence``
            may be partial (missing keys keep the preset's values). ``size`` without
            ``pixel_spacing`` keeps the preset's field of view (the pixel spacing scales).

    Raises:
        ValueError: unknown preset or field, or a value out of range.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset]
    if site:
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; choose one of {sorted(SITES)}")
        profile = dict(SITES[site])
        scale = profile.pop("pixel_spacing_scale", None)
        if scale is not None:
            profile["pixel_spacing"] = tuple(round(p * scale, 6) for p in base.pixel_spacing)
        overrides = {**profile, "site": site,
                     **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown synth option(s) {unknown}; known: {sorted(names)}")
    clean = {k: v for k, v in overrides.items() if v is not None}
    if "prevalence" in clean:
        clean["prevalence"] = {**base.prevalence, **clean["prevalence"]}
    for k, v in clean.items():
        if isinstance(v, list):
            clean[k] = tuple(v)
    if "size" in clean and "pixel_spacing" not in clean:  # keep the field of view
        f = base.size / float(clean["size"])
        clean["pixel_spacing"] = tuple(round(p * f, 6) for p in base.pixel_spacing)
    cfg = dataclasses.replace(base, seed=int(seed), **clean)
    cfg.validate()
    return cfg


def config_from_dict(d: dict[str, Any]) -> SynthConfig:
    """Inverse of :meth:`SynthConfig.to_dict` (as stored in ``_synth_state.json``)."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    kw.setdefault("workers", 1)
    return SynthConfig(**kw)


def json_ready(obj: Any) -> Any:
    """Tuples → lists, recursively, so a config compares equal to its JSON round trip."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
