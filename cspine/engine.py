"""The one test-time engine: a loaded CT → stage-1 labels → boxes → crops → stage-2 probabilities.

Every study goes through :class:`StudyEngine`, whoever asks::

    cspine predict STUDY ──────────────┐
    make submit   (cspine submit) ─────┼─> StudyEngine.run(volume) ─> StudyResult
    make crops    (cspine crops)  ─────┘   (stage-1 part only: score=False)

1. stage 1 (:func:`stage1_segment.inference.segment_to_grid`): the in-memory volume resampled
   onto the checkpoint's model grid, C1–C7 labels there (largest component per vertebra);
2. boxes (:func:`stage1_segment.boxes.vertebra_boxes`): per vertebra, from the labels and the
   float64 model-grid and CT affines held in memory (nothing goes through a file and back);
3. crops (:func:`stage1_segment.crops.crops_from_boxes`) with the crop settings stage 2 was
   trained with;
4. the anatomy check of the stage-1 labels (:func:`stage1_segment.anatomy.check_anatomy`: C1..C7
   in order down one column, adult sizes, on bone);
5. stage 2 (:func:`stage2_classify.inference.score_crops`): fold models averaged, the
   ``patient_overall`` rule and clip range of the run (:class:`cspine.models.ModelSpec`). A study
   whose segmentation fails the anatomy check is not scored: its probabilities are the models'
   training prior (clipped), ``probabilities_source`` says so, and the callers flag it.

The engine writes nothing; its callers write the per-study outputs (mask NIfTI in the CT
geometry, crops, probabilities, QC rows) once. The batch form (:mod:`cspine.batch`) maps it
over studies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from common.geometry import Volume
from common.labels import TARGETS, VERTEBRAE

Crop = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class StudyResult:
    """Everything the engine computed for one study.

    Attributes:
        study_uid: the volume's study UID.
        grid_labels: uint8 (X', Y', Z') stage-1 classes on the model grid (0 background,
            1..7 = C1..C7).
        grid_affine: float64 (4, 4) model-grid voxel → RAS mm.
        boxes: vertebra → box dict of :func:`stage1_segment.boxes.vertebra_box` (grid voxels,
            RAS mm, inclusive source (column, row, sorted slice) indices, file numbers) or None.
        crops: vertebra → (image int16 (X, Y, Z) HU, mask uint8 (X, Y, Z), affine float64
            (4, 4) crop voxel → RAS mm) or None (absent / too small).
        crop_status: vertebra → ``ok`` or why it has no crop.
        probabilities: target (C1..C7, patient_overall) → probability; None when stage 2 was
            not run (``score=False``).
        rule: the ``patient_overall`` rule used (None without stage 2).
        anatomy: the anatomy record (:func:`stage1_segment.anatomy.check_anatomy`: ``status``
            ``ok`` | ``implausible_segmentation``, ``reasons``, per-vertebra ``vertebrae``).
        probabilities_source: ``model``, or ``prior`` when the anatomy check failed (the
            probabilities are then the training prior, not the models' output); None without
            stage 2.
        timing_s: seconds per step (``stage1``, ``crops`` (boxes + crops), ``anatomy``,
            ``stage2``).
    """

    study_uid: str
    grid_labels: np.ndarray
    grid_affine: np.ndarray
    boxes: dict[str, dict[str, Any] | None]
    crops: dict[str, Crop | None]
    crop_status: dict[str, str]
    probabilities: dict[str, float] | None = None
    rule: str | None = None
    anatomy: dict[str, Any] | None = None
    probabilities_source: str | None = None
    timing_s: dict[str, float] = field(default_factory=dict)

    @property
    def implausible(self) -> bool:
        """Whether the anatomy check failed."""
        return bool(self.anatomy) and self.anatomy["status"] == "implausible_segmentation"

    def flagged(self, threshold: float) -> list[str]:
        """Vertebrae with p ≥ ``threshold`` — none for an implausible segmentation, whose
        probabilities are the prior and say nothing about this study."""
        if self.probabilities is None or self.implausible:
            return []
        return [v for v in VERTEBRAE if self.probabilities[v] >= threshold]

    def probabilities_note(self) -> str:
        """Where the probabilities come from, in one line (for the DICOM SR): ``model``, or
        ``prior (implausible_segmentation: <first reasons>)``."""
        if not self.implausible:
            return self.probabilities_source or "model"
        return f"prior (implausible_segmentation: {'; '.join(self.anatomy['reasons'][:2])})"

    @property
    def found(self) -> list[str]:
        """Vertebrae with a crop."""
        return [v for v in VERTEBRAE if self.crops.get(v) is not None]

    def to_json(self, volume: Volume) -> dict[str, Any]:
        """The JSON record of this result (``probabilities.json`` of ``cspine predict`` and of
        ``make submit``'s per-study folders): probabilities, vertebrae found, boxes, crop
        status, both grids' geometry, timings."""
        return {
            "study": self.study_uid,
            "probabilities": {t: float(self.probabilities[t]) for t in TARGETS}
            if self.probabilities is not None else None,
            "patient_overall_rule": self.rule,
            "probabilities_source": self.probabilities_source,
            "anatomy": self.anatomy,
            "vertebrae_found": self.found,
            "vertebrae_missing": [v for v in VERTEBRAE if v not in self.found],
            "crop_status": self.crop_status,
            "boxes": self.boxes,
            "grid": {"shape": list(self.grid_labels.shape),
                     "affine": np.asarray(self.grid_affine).tolist()},
            "ct": {"shape": list(volume.shape), "affine": np.asarray(volume.affine).tolist()},
            "timing_s": {k: round(v, 3) for k, v in self.timing_s.items()},
        }


class StudyEngine:
    """Loaded models and settings, applied to one in-memory study at a time.

    Args:
        stage1: a loaded :class:`stage1_segment.module.Stage1Module` (eval mode, on its device).
        crop_config: :class:`stage1_segment.crops.CropConfig` stage 2 was trained with.
        stage2: loaded fold models (:func:`stage2_classify.inference.load_models`); None for
            the stage-1 part only.
        rule: ``patient_overall`` rule (``max``, ``noisy_or``, ``stacker``).
        stacker: fitted :class:`stage2_classify.aggregate.Stacker` (rule ``stacker``).
        clip: final probability range.
        tta_flip: override of the stage-2 models' flip setting (None: as trained).
        resample_on_device: resample the model grid and the crops with torch on the networks'
            device (the volume crosses once) instead of SciPy on the CPU; None: on a GPU.
        anatomy_limits: limits of the anatomy check (default :class:`AnatomyLimits`).
    """

    def __init__(self, stage1, crop_config, stage2: Sequence | None = None,
                 rule: str = "max", stacker=None, clip: tuple[float, float] = (1e-3, 1 - 1e-3),
                 tta_flip: bool | None = None, resample_on_device: bool | None = None,
                 anatomy_limits=None) -> None:
        from stage1_segment.anatomy import AnatomyLimits
        from stage2_classify.inference import ensemble_prior

        self.stage1 = stage1
        self.crop_config = crop_config
        self.stage2 = list(stage2) if stage2 else []
        self.rule = rule
        self.stacker = stacker
        self.clip = tuple(float(c) for c in clip)
        self.tta_flip = tta_flip
        self.prior = ensemble_prior(self.stage2) if self.stage2 else None
        self.resample_on_device = resample_on_device
        self.anatomy_limits = anatomy_limits or AnatomyLimits()
        self.load_seconds = 0.0
        self.spec = None  # the ModelSpec it was loaded from (from_spec)

    @classmethod
    def from_spec(cls, spec, device: str = "cpu", stage2: bool = True,
                  tta_flip: bool | None = None, anatomy_limits=None) -> "StudyEngine":
        """Load the models a :class:`cspine.models.ModelSpec` names onto ``device``.

        Raises:
            PredictError: a checkpoint that cannot be loaded (one line naming the source).
        """
        import pickle
        import warnings
        import zipfile

        from cspine.models import PredictError, one_line
        from stage1_segment.crops import crop_config
        from stage1_segment.inference import load_model
        from stage2_classify.aggregate import Stacker
        from stage2_classify.inference import load_models

        t0 = time.perf_counter()
        try:
            if spec.runtime == "onnx":
                model1, models2 = _onnx_models(spec, device, stage2)
            else:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
                    model1 = load_model(spec.stage1, map_location=device)
                    models2 = load_models(spec.stage2, map_location=device) if stage2 else None
            stacker = Stacker.load(spec.stacker) if stage2 and spec.stacker else None
        except (OSError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
                zipfile.BadZipFile) as exc:  # missing, truncated or not a checkpoint
            detail = exc if isinstance(exc, (ValueError, OSError)) else \
                f"{type(exc).__name__}: {exc}"
            raise PredictError(one_line(f"cannot load the models from {spec.source}: {detail}")
                               ) from None
        engine = cls(model1, crop_config(spec.crops), models2, rule=spec.rule, stacker=stacker,
                     clip=spec.clip, tta_flip=tta_flip, anatomy_limits=anatomy_limits)
        engine.load_seconds = time.perf_counter() - t0
        engine.spec = spec
        return engine

    @property
    def differentiable(self) -> bool:
        """Whether the stage-2 models are torch modules (class-activation maps need gradients)."""
        import torch

        return bool(self.stage2) and isinstance(self.stage2[0], torch.nn.Module)

    @property
    def device(self) -> str:
        """The device the stage-1 network is on (``cpu``, ``cuda:0``)."""
        return str(next(self.stage1.parameters()).device)

    def run(self, volume: Volume, score: bool = True) -> StudyResult:
        """The engine on one loaded volume (module docstring, steps 1–5).

        Args:
            volume: the full-resolution CT (int16 HU (X, Y, Z), float64 affine).
            score: run stage 2 and the aggregation (False: stage 1, boxes and crops only).
        """
        from stage1_segment.anatomy import check_anatomy
        from stage1_segment.boxes import vertebra_boxes
        from stage1_segment.crops import crops_from_boxes
        from stage1_segment.inference import segment_to_grid

        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        hu_device = self._on_device(volume)
        labels, grid_affine = segment_to_grid(self.stage1, volume, hu_device=hu_device)
        timing["stage1"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        boxes = vertebra_boxes(labels, grid_affine, volume.affine, volume.shape,
                               volume.file_numbers)
        crops, status = crops_from_boxes(volume, labels, grid_affine, boxes, self.crop_config,
                                         hu_device)
        timing["crops"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        anatomy = check_anatomy(labels, grid_affine, volume.hu, volume.affine,
                                self.anatomy_limits)
        timing["anatomy"] = time.perf_counter() - t0
        result = StudyResult(study_uid=volume.study_uid, grid_labels=labels,
                             grid_affine=grid_affine, boxes=boxes, crops=crops,
                             crop_status=status, anatomy=anatomy, timing_s=timing)
        if score:
            t0 = time.perf_counter()
            if result.implausible:  # never report the models' output on a nonsense segmentation
                result.probabilities = self.prior_probabilities()
                result.probabilities_source = "prior"
            else:
                result.probabilities = self.score(crops)
                result.probabilities_source = "model"
            result.rule = self.rule
            timing["stage2"] = time.perf_counter() - t0
        return result

    def prior_probabilities(self) -> dict[str, float]:
        """The probabilities of a study with no usable crop (TARGETS): every vertebra at the
        models' training prior, ``patient_overall`` by the run's rule, clipped like any study."""
        return self.score({})

    def _on_device(self, volume: Volume):
        """``volume.hu`` on the networks' device when resampling there, else None."""
        import torch

        device = self.device
        on = self.resample_on_device
        if on is None:
            on = device.startswith("cuda")
        if not on:
            return None
        return torch.from_numpy(volume.hu).to(device)  # int16: half the bytes of float32

    def score(self, crops: dict[str, Crop | None]) -> dict[str, float]:
        """Stage 2 + aggregation of one study's crops → the 8 probabilities (TARGETS)."""
        from stage2_classify.inference import score_crops

        if not self.stage2:
            raise ValueError("this engine was loaded without stage-2 models")
        return score_crops(self.stage2, crops, rule=self.rule, stacker=self.stacker,
                           clip=self.clip, tta_flip=self.tta_flip, prior=self.prior)


def _onnx_models(spec, device: str, stage2: bool):
    """The ONNX Runtime adapters of an ONNX bundle (:mod:`cspine.onnx_models`)."""
    from cspine.onnx_models import OnnxStage1, OnnxStage2

    if not spec.onnx:
        raise ValueError(f"{spec.source}: bundle.json has runtime onnx but no onnx settings")
    model1 = OnnxStage1(spec.stage1, spec.onnx["stage1"], device)
    models2 = [OnnxStage2(p, s, device) for p, s in zip(spec.stage2, spec.onnx["stage2"])] \
        if stage2 else None
    if models2 and any(m.preprocess.to_dict() != models2[0].preprocess.to_dict() for m in models2):
        raise ValueError(f"{spec.source}: the stage-2 models' preprocessing differs")
    return model1, models2
