"""``cspine export-bundle WORK OUT``: a run's trained models in one folder for ``cspine predict``.

A bundle holds ``stage1.ckpt``, ``stage2_fold<k>.ckpt`` (the checkpoint each fold run chose),
``stacker.json`` (when ``make evaluate`` fitted one) and ``bundle.json`` (file names, crop settings,
``patient_overall`` rule, provenance). Copy the folder anywhere and run
``cspine predict STUDY --out OUT --bundle BUNDLE``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from cspine.models import ModelSpec, models_from_work


def export_bundle(work: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy the models of ``work`` into the bundle folder ``out`` (replaced atomically).

    Returns:
        the path of ``out/bundle.json``.

    Raises:
        cspine.models.PredictError: the run has no finished stage-1 or stage-2 model.
    """
    from common.atomic import write_json

    spec: ModelSpec = models_from_work(work)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shutil.copy2(spec.stage1, tmp / "stage1.ckpt")
        stage2 = []
        for k, ckpt in enumerate(spec.stage2):
            name = f"stage2_{Path(ckpt).parent.parent.name or k}.ckpt"
            if name in stage2:
                name = f"stage2_{k}.ckpt"
            shutil.copy2(ckpt, tmp / name)
            stage2.append(name)
        if spec.stacker is not None:
            shutil.copy2(spec.stacker, tmp / "stacker.json")
        write_json(tmp / "bundle.json", {
            "format": 1, "stage1": "stage1.ckpt", "stage2": stage2, "crops": spec.crops,
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
