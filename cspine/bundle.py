"""``cspine export-bundle WORK OUT``: a run's trained models in one folder for ``cspine predict``.

A bundle holds the networks — ``--format ckpt`` (default): ``stage1.ckpt`` and
``stage2_fold<k>.ckpt`` (the checkpoint each fold run chose); ``--format onnx``: ``stage1.onnx``
and ``stage2_fold<k>.onnx`` (:mod:`cspine.onnx_models`, for ONNX Runtime or another runtime) —
``stacker.json`` (when ``make evaluate`` fitted one) and ``bundle.json`` (file names, crop
settings, ``patient_overall`` rule and clip, for ONNX the networks' pre/post-processing
settings, provenance). Copy the folder anywhere and run
``cspine predict STUDY --out OUT --bundle BUNDLE``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from cspine.models import ModelSpec, models_from_work

FORMATS = ("ckpt", "onnx")


def export_bundle(work: str | os.PathLike, out: str | os.PathLike, fmt: str = "ckpt") -> Path:
    """Copy (``ckpt``) or export (``onnx``) the models of ``work`` into the bundle folder ``out``
    (replaced atomically).

    Returns:
        the path of ``out/bundle.json``.

    Raises:
        cspine.models.PredictError: the run has no finished stage-1 or stage-2 model.
    """
    from common.atomic import write_json

    if fmt not in FORMATS:
        raise ValueError(f"unknown bundle format {fmt!r}; choose from {', '.join(FORMATS)}")
    spec: ModelSpec = models_from_work(work)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        stage2 = []
        for k, ckpt in enumerate(spec.stage2):
            name = f"stage2_{Path(ckpt).parent.parent.name or k}.{fmt}"
            if name in stage2:
                name = f"stage2_{k}.{fmt}"
            stage2.append(name)
        onnx = _export_onnx(spec, tmp, stage2) if fmt == "onnx" else None
        if fmt == "ckpt":
            shutil.copy2(spec.stage1, tmp / "stage1.ckpt")
            for ckpt, name in zip(spec.stage2, stage2):
                shutil.copy2(ckpt, tmp / name)
        if spec.stacker is not None:
            shutil.copy2(spec.stacker, tmp / "stacker.json")
        write_json(tmp / "bundle.json", {
            "format": 1, "runtime": "onnx" if onnx else "torch", "onnx": onnx,
            "stage1": f"stage1.{fmt}", "stage2": stage2, "crops": spec.crops,
            "rule": spec.rule, "clip": list(spec.clip), "stacker": "stacker.json" if spec.stacker else None,
            "exported_from": str(Path(work).resolve()),
            "sources": {"stage1": str(spec.stage1), "stage2": [str(p) for p in spec.stage2]},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "bundle.json"


def _export_onnx(spec: ModelSpec, folder: Path, names: list[str]) -> dict:
    """Write the ONNX networks into ``folder``; returns their settings for ``bundle.json``."""
    import warnings

    from cspine.engine import StudyEngine
    from cspine.onnx_models import export_stage1, export_stage2

    engine = StudyEngine.from_spec(spec)
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        stage1 = export_stage1(engine.stage1, folder / "stage1.onnx")
        stage2 = [export_stage2(m, folder / name, engine.crop_config.shape)
                  for m, name in zip(engine.stage2, names)]
    return {"opset": 17, "stage1": stage1, "stage2": stage2}
