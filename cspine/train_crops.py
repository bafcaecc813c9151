"""``make crops``: the stage-1 part of the engine over the train studies → stage-2 training crops.

For every train study, :class:`cspine.engine.StudyEngine` (stage 1 only) segments the in-memory
volume (decoded once: a study that ``make stage1-prepare`` decoded comes from the volume cache),
computes the boxes from the float64 affines held in memory and cuts the crops — the same code,
on the same inputs, as ``cspine predict`` and ``make submit`` run at test time. Train studies
with a ground-truth mask are cropped from the *predicted* labels too, so that stage 2 trains on
what it will see.

Outputs under ``$WORK/stage1/``:

* ``crops/<UID>_<C#>.npz`` (``image`` int16 (X, Y, Z) HU, ``mask`` uint8 (X, Y, Z) label map,
  ``affine`` crop voxel → RAS mm) and the manifest ``crops/vertebrae.csv`` (columns of
  :data:`common.manifest.COLUMNS`, 7 rows per study; an absent or too small vertebra is a row
  with ``present=false``);
* ``masks/<UID>.nii.gz``: the predicted C1–C7 labels (uint8) on the study's own DICOM grid and
  affine (opens over the CT in ITK-SNAP / 3D Slicer; the report's overlays read it);
* ``crops/rows/<UID>.json``: the per-study record (manifest rows, QC row; the resume record:
  a study whose record has the same stage-1 run and crop settings is skipped);
* ``crops/qc_crops.csv``: one row per study (status, vertebrae found, Dice against the aligned
  ground truth on the model grid where the study has a mask, ``volume`` = decoded / cache /
  done, seconds); ``crops/run.json``.

CLI: ``cspine crops DATA --work WORK -c configs/stage1/cpu.yaml [--stage1-ckpt best]
[--jobs 2] [--shard i/N]`` (crop settings from the config's ``crops:`` section).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.labels import VERTEBRAE
from common.layout import WorkLayout
from cspine.batch import StudyTask, run_batch, select_shard


def train_tasks(data_root: Path, work_dir: Path, n_folds: int) -> list[StudyTask]:
    """Every train study with its fold (``$WORK/folds.csv``, made with ``n_folds`` if missing)."""
    from common.dataset import RSNADataset
    from common.folds import ensure_folds

    ds = RSNADataset(data_root)
    if not (data_root / "train.csv").is_file():
        return []
    folds = ensure_folds(ds.labels, WorkLayout(work_dir).folds, n_folds)
    fold_of = dict(zip(folds["StudyInstanceUID"], folds["fold"].astype(int)))
    return [StudyTask(uid, "train", str(ds.study_dir(uid)), int(fold_of.get(uid, -1)))
            for uid in ds.train_uids()]


def _row(task: StudyTask, name: str, run: str, cfg, status: str) -> dict[str, Any]:
    from common.manifest import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, "study_uid": task.uid, "split": task.split,
            "vertebra": name, "present": False, "crop_path": "", "margin_mm": cfg.margin_mm,
            "fold": task.fold, "stage1_run": run, "qc_status": status}


def manifest_rows(task: StudyTask, result, run: str, cfg, crops_dir: Path
                  ) -> list[dict[str, Any]]:
    """Write one study's crops; return its 7 manifest rows."""
    from common import geometry
    from common.atomic import save_npz

    rows = []
    for name in VERTEBRAE:
        box = result.boxes.get(name)
        row = _row(task, name, run, cfg, result.crop_status[name])
        if box is not None:
            row.update({f"vox_{e}_{a}": box[f"src_{e}"][i] for e in ("lo", "hi")
                        for i, a in enumerate("xyz")})
            row.update({f"mm_{e}_{a}": box[f"mm_{e}"][i] for e in ("lo", "hi")
                        for i, a in enumerate("xyz")})
            row.update(file_number_lo=box.get("file_number_lo"),
                       file_number_hi=box.get("file_number_hi"), voxels=box["voxels"])
        crop = result.crops.get(name)
        if crop is not None:
            image, labels, affine = crop
            rel = f"{task.uid}_{name}.npz"
            save_npz(crops_dir / rel, image=image, mask=labels, affine=affine)
            sx, sy, sz = geometry.spacing_of(affine)
            row.update(present=True, crop_path=rel, spacing_x=round(float(sx), 4),
                       spacing_y=round(float(sy), 4), spacing_z=round(float(sz), 4))
        rows.append(row)
    return rows


def _grid_truth(work_dir: Path, settings, uid: str, affine: np.ndarray, shape) -> np.ndarray | None:
    """The aligned ground truth on the model grid from the stage-1 cache, when it matches."""
    from stage1_segment.prepare import cache_path, load_cached

    path = cache_path(work_dir, settings, uid)
    if not path.is_file():
        return None
    study = load_cached(path)
    if study.label is None or tuple(study.label.shape) != tuple(shape) \
            or not np.allclose(study.affine, affine, atol=1e-6):
        return None
    return study.label


def make_crops(data_root: str | os.PathLike, work_dir: str | os.PathLike, cfg,
               stage1_ckpt: str | os.PathLike = "best", jobs: int = 2,
               shard: tuple[int, int] | None = None, device: str = "cpu",
               progress: bool = True) -> Path | None:
    """Crop every train study (module docstring); returns the manifest path (None for a shard).

    Args:
        data_root: RSNA-layout folder.
        work_dir: ``$WORK``.
        cfg: :class:`stage1_segment.crops.CropConfig`.
        stage1_ckpt: ``best`` / ``last`` (in ``$WORK/stage1/checkpoints``) or a path.
        jobs: loader processes.
        shard: (i, N): process only that shard and write only per-study records.
        device: torch device of the stage-1 network.
    """
    import pandas as pd

    from common import geometry
    from common.atomic import write_csv, write_json
    from common.manifest import COLUMNS
    from common.nifti_io import save_nifti
    from common.volume_cache import volume_cache_dir
    from cspine.engine import StudyEngine
    from stage1_segment.inference import grid_settings, load_model
    from stage1_segment.runs import dice_per_vertebra, resolve_checkpoint, run_id

    data_root, work_dir = Path(data_root), Path(work_dir)
    layout = WorkLayout(work_dir)
    crops_dir, masks_dir = layout.crops, layout.stage1_masks
    rows_dir = crops_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_checkpoint(stage1_ckpt, layout.stage1_checkpoints)
    run = run_id(ckpt)
    engine = StudyEngine(load_model(ckpt, map_location=device), cfg)
    settings = grid_settings(engine.stage1)
    tasks = train_tasks(data_root, work_dir, cfg.n_folds)
    mine = select_shard(tasks, shard)
    records: dict[str, list[dict[str, Any]]] = {}

    def current(task: StudyTask) -> dict[str, Any] | None:
        path = rows_dir / f"{task.uid}.json"
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        rows = doc.get("rows", [])
        if doc.get("crop_key") != cfg.key() or doc.get("stage1_run") != run or not rows:
            return None
        if not all((crops_dir / r["crop_path"]).is_file() for r in rows if r["present"]):
            return None
        records[task.uid] = rows
        return doc["qc"]

    def process(task: StudyTask, volume) -> dict[str, Any]:
        result = engine.run(volume, score=False)
        rows = manifest_rows(task, result, run, cfg, crops_dir)
        mask, _ = geometry.labels_to_grid(result.grid_labels, result.grid_affine,
                                          volume.affine, volume.shape)
        save_nifti(masks_dir / f"{task.uid}.nii.gz", mask, volume.affine)
        qc: dict[str, Any] = {"study_uid": task.uid, "split": task.split, "status": "ok",
                              "found": len(result.found),
                              "missing": ";".join(v for v in VERTEBRAE if v not in result.found),
                              "anatomy": result.anatomy["status"],
                              "anatomy_reasons": "; ".join(result.anatomy["reasons"]),
                              "stage1_run": run, **{f"{k}_s": round(v, 3)
                                                    for k, v in result.timing_s.items()}}
        truth = _grid_truth(work_dir, settings, task.uid, result.grid_affine,
                            result.grid_labels.shape)
        if truth is not None:
            dice = dice_per_vertebra(result.grid_labels, truth)
            qc.update({f"dice_{v}": round(d, 4) for v, d in dice.items()})
            qc["dice_mean"] = round(float(np.mean(list(dice.values()))), 4) if dice else np.nan
        write_json(rows_dir / f"{task.uid}.json", {"crop_key": cfg.key(), "stage1_run": run,
                                                   "rows": rows, "qc": qc})
        records[task.uid] = rows
        return qc

    def on_failure(task: StudyTask, fields: dict[str, Any]) -> dict[str, Any]:
        status = f"failed: {fields.get('reason')}: {fields.get('message')}"
        records[task.uid] = [_row(task, n, run, cfg, status) for n in VERTEBRAE]
        return {"study_uid": task.uid, "split": task.split, **fields, "stage1_run": run}

    t0 = time.perf_counter()
    qc = run_batch(mine, process, current, on_failure, lenient=cfg.lenient,
                   cache_dir=volume_cache_dir(work_dir), jobs=jobs, desc="crops",
                   progress=progress)
    if shard is not None:
        print(f"crops shard {shard[0]}/{shard[1]}: {len(mine)} studies in "
              f"{time.perf_counter() - t0:.1f} s; run without --shard to write the manifest")
        return None
    frame = pd.DataFrame([r for t in tasks for r in records[t.uid]])
    frame = frame.reindex(columns=list(COLUMNS))
    manifest = layout.manifest
    write_csv(manifest, frame)
    qc_frame = pd.DataFrame(qc)
    write_csv(layout.qc_crops, qc_frame)
    status = frame["qc_status"].astype(str).str.split(":").str[0].value_counts().to_dict()
    write_json(crops_dir / "run.json", {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_root": str(data_root), "crops": asdict(cfg), "crop_key": cfg.key(),
        "stage1_checkpoint": str(ckpt), "stage1_runs": sorted(set(frame["stage1_run"]) - {""}),
        "studies": len(tasks), "rows_by_status": status,
        "volumes": qc_frame["volume"].value_counts().to_dict() if len(qc_frame) else {},
        "git_commit": _git_commit(), "versions": _versions()})
    return manifest


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cspine", "torch", "monai", "numpy", "pydicom"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = ""
    return out


def summary_line(manifest: Path, seconds: float) -> str:
    """The line ``make crops`` prints."""
    import pandas as pd

    frame = pd.read_csv(manifest, keep_default_na=False)
    qc = pd.read_csv(manifest.parent / "qc_crops.csv", keep_default_na=False)
    volumes = ", ".join(f"{k} {v}" for k, v in qc["volume"].value_counts().items())
    return (f"crops: {int(frame['present'].astype(str).eq('True').sum())} crops, "
            f"{len(frame)} manifest rows, {len(qc)} train studies (volumes: {volumes}) in "
            f"{seconds:.1f} s -> {manifest}")


def crop_settings(configs: Sequence[str | os.PathLike], data_root: str | os.PathLike,
                  work_dir: str | os.PathLike, overrides: Sequence[str] = ()):
    """The :class:`CropConfig` of a stage-1 config (its ``crops`` group; ``lenient`` and
    ``n_folds`` linked from ``data``), read by the stage's own parser with ``overrides``."""
    from stage1_segment.cli import parse_settings
    from stage1_segment.crops import crop_config
    from stage1_segment.prepare import stage1_args

    config = parse_settings(stage1_args(configs, data_root, work_dir, overrides))
    return crop_config(config.crops.as_dict())
