"""Where the trained models of a run are: a training folder (``WORK``) or an exported bundle.

:class:`ModelSpec` names the stage-1 checkpoint, the stage-2 fold checkpoints, the crop settings
stage 2 was trained with, the ``patient_overall`` rule and the stacker; ``cspine predict`` and
``cspine export-bundle`` read it from a ``WORK`` folder (:func:`models_from_work`) or a bundle
(:func:`models_from_bundle`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.layout import WorkLayout
from common.paths import run_resolve
from stage2_classify.aggregate import DEFAULT_CLIP, DEFAULT_RULE, RULES


class PredictError(RuntimeError):
    """Input or model problem that stops a prediction; the message is one line for the user."""


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (error messages are printed on one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@dataclass
class ModelSpec:
    """Where the trained models are and how their outputs are combined.

    Attributes:
        stage1: stage-1 checkpoint (``.ckpt``).
        stage2: stage-2 fold checkpoints (averaged in probability space).
        crops: crop settings of ``stage1_segment.crops.CropConfig`` used to train stage 2.
        rule: ``patient_overall`` rule (from a WORK folder: the rule ``make evaluate`` recorded
            in ``metrics.json``, unless the user overrides it).
        clip: final probability range (from a WORK folder: the one ``make evaluate`` recorded).
        stacker: ``stacker.json`` fitted by ``make evaluate`` (None: not used).
        source: the WORK folder or bundle the spec was read from.
        runtime: ``torch`` (checkpoints) or ``onnx`` (an ONNX bundle, :mod:`cspine.onnx_models`).
        onnx: the ONNX networks' settings from ``bundle.json`` (``runtime == "onnx"``).
    """

    stage1: Path
    stage2: list[Path]
    crops: dict[str, Any] = field(default_factory=dict)
    rule: str = DEFAULT_RULE
    clip: tuple[float, float] = DEFAULT_CLIP
    stacker: Path | None = None
    source: str = ""
    runtime: str = "torch"
    onnx: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.rule == "stacker" and self.stacker is None:  # no fitted stacker to apply
            self.rule = DEFAULT_RULE

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage1"] = str(self.stage1)
        d["stage2"] = [str(p) for p in self.stage2]
        d["stacker"] = str(self.stacker) if self.stacker else None
        d["clip"] = [float(c) for c in self.clip]
        return d


def _existing(path: str | os.PathLike, *fallbacks: Path) -> Path:
    """``path`` if it exists, else the first fallback that does (moved WORK folders)."""
    for cand in (Path(path), *fallbacks):
        if cand.is_file():
            return cand
    raise PredictError(f"checkpoint {path} not found (nor {', '.join(map(str, fallbacks))})")


def models_from_work(work: str | os.PathLike, rule: str | None = None,
                     clip: tuple[float, float] | None = None) -> ModelSpec:
    """The models of a training run folder ``WORK`` (``make demo`` / the stage targets).

    Stage 1: ``WORK/stage1/run.json`` → ``checkpoint`` (:mod:`common.run_record`; else
    ``checkpoints/last.ckpt``);
    stage 2: every ``WORK/stage2/fold<k>/run.json`` → ``checkpoint``; crop settings from
    ``WORK/stage1/crops/run.json``; the ``patient_overall`` rule and clip range that
    ``make evaluate`` recorded (``WORK/metrics.json``) unless ``rule`` / ``clip`` override them
    (the one rule source of ``make submit`` and ``cspine predict``); ``WORK/stage2/stacker.json``
    for the stacker rule.

    Raises:
        PredictError: naming the missing file and the make target that writes it.
    """
    work = Path(work)
    layout = WorkLayout(work)
    s1 = layout.stage1
    if (s1 / "run.json").is_file():
        record = json.loads((s1 / "run.json").read_text())
        best = record.get("checkpoint") or record.get("best_checkpoint") or ""  # older runs
        stage1 = _existing(run_resolve(best, s1) if best else s1 / "checkpoints" / "last.ckpt",
                           s1 / "checkpoints" / "last.ckpt")
    elif (s1 / "checkpoints" / "last.ckpt").is_file():
        stage1 = s1 / "checkpoints" / "last.ckpt"
    else:
        raise PredictError(f"no stage-1 model in {s1} (run.json or checkpoints/last.ckpt): "
                           f"run `make stage1-fit WORK={work}` or pass --stage1-ckpt")
    stage2 = []
    for run in sorted(layout.stage2.glob("fold*/run.json")):
        ckpt = run_resolve(json.loads(run.read_text())["checkpoint"], run.parent)
        stage2.append(_existing(ckpt))
    if not stage2:
        raise PredictError(f"no stage-2 fold runs in {work / 'stage2'} (fold<k>/run.json): run "
                           f"`make stage2-fit WORK={work}` or pass --stage2-ckpt")
    crops_run = s1 / "crops" / "run.json"
    crops = json.loads(crops_run.read_text()).get("crops", {}) if crops_run.is_file() else {}
    stacker = layout.stacker
    recorded_rule, recorded_clip = evaluated_settings(work)
    rule = rule or recorded_rule
    if rule not in RULES:
        raise PredictError(f"unknown patient_overall rule {rule!r}; choose from {', '.join(RULES)}")
    if rule == "stacker" and not stacker.is_file():
        raise PredictError(f"rule stacker needs {stacker}: run `make evaluate WORK={work}` (it "
                           f"fits the stacker on the out-of-fold predictions)")
    return ModelSpec(stage1=stage1, stage2=stage2, crops=crops, rule=rule,
                     clip=tuple(clip) if clip else recorded_clip,
                     stacker=stacker if rule == "stacker" else None, source=str(work))


def evaluated_settings(work: Path) -> tuple[str, tuple[float, float]]:
    """The ``patient_overall`` rule and clip range that ``make evaluate`` recorded
    (``WORK/metrics.json`` → ``rule``, ``clip``), else the defaults."""
    rule, clip = DEFAULT_RULE, DEFAULT_CLIP
    metrics = WorkLayout(work).metrics
    if metrics.is_file():
        doc = json.loads(metrics.read_text())
        if doc.get("rule") in RULES:
            rule = str(doc["rule"])
        if isinstance(doc.get("clip"), list) and len(doc["clip"]) == 2:
            clip = (float(doc["clip"][0]), float(doc["clip"][1]))
    return rule, clip


#: Operating point ("flagged": p ≥ it) when neither the user nor ``metrics.json`` gives one.
DEFAULT_THRESHOLD = 0.5


#: The out-of-fold operating point that flags a vertebra by default (the one ``cspine validate``
#: reports by default too): the pooled C1..C7 threshold at 90 % sensitivity.
DEFAULT_POINT = "sens90"


def operating_point(work: Path | None) -> tuple[float, str]:
    """The flagging threshold and its source, from ``WORK/metrics.json``: an explicit
    ``operating_point`` number in (0, 1) (``"metrics.json"``), else the pooled-vertebra
    threshold that ``make evaluate`` chose on the out-of-fold rows at :data:`DEFAULT_POINT`
    (``"metrics.json operating_points.vertebrae.sens90 (out of fold)"``), else
    (:data:`DEFAULT_THRESHOLD`, ``"default"``)."""
    metrics = WorkLayout(work).metrics if work is not None else None
    doc: dict[str, Any] = {}
    if metrics is not None and metrics.is_file():
        try:
            doc = json.loads(metrics.read_text())
        except ValueError:
            doc = {}
    value = doc.get("operating_point") if isinstance(doc, dict) else None
    if isinstance(value, (int, float)) and 0.0 < float(value) < 1.0:
        return float(value), "metrics.json"
    point = ((doc.get("operating_points") or {}).get("vertebrae") or {}).get(DEFAULT_POINT) \
        if isinstance(doc, dict) else None
    value = point.get("threshold") if isinstance(point, dict) else None
    if isinstance(value, (int, float)) and 0.0 < float(value) < 1.0:
        return float(value), f"metrics.json operating_points.vertebrae.{DEFAULT_POINT} (out of fold)"
    return DEFAULT_THRESHOLD, "default"


def evaluated_rule(work: Path) -> str:
    """The ``patient_overall`` rule that ``make evaluate`` recorded (or the default)."""
    return evaluated_settings(work)[0]


def models_from_bundle(bundle: str | os.PathLike) -> ModelSpec:
    """The models of a bundle folder written by ``cspine export-bundle`` (``bundle.json``)."""
    bundle = Path(bundle)
    meta_path = bundle / "bundle.json"
    if not meta_path.is_file():
        raise PredictError(f"{bundle} is not a cspine bundle (no bundle.json): write one with "
                           f"`cspine export-bundle WORK {bundle}`")
    meta = json.loads(meta_path.read_text())
    return ModelSpec(stage1=_existing(bundle / meta["stage1"]),
                     stage2=[_existing(bundle / p) for p in meta["stage2"]],
                     crops=meta.get("crops", {}), rule=meta.get("rule", DEFAULT_RULE),
                     clip=tuple(meta.get("clip", DEFAULT_CLIP)),
                     stacker=bundle / meta["stacker"] if meta.get("stacker") else None,
                     source=str(bundle), runtime=meta.get("runtime", "torch"),
                     onnx=meta.get("onnx"))
