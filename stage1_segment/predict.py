"""Batch prediction writer: masks and per-vertebra boxes for every cached study.

``python -m stage1_segment predict -c CONFIG --data.data_root DATA --data.work_dir WORK
--ckpt_path best`` runs Lightning's predict loop over every train and test study (the data
module prepares missing cache files first); this callback writes, under ``$WORK/stage1/predict``:

* ``masks/<UID>.nii.gz``: uint8 classes on the model grid with the model-grid affine (the same
  grid and affine as the cached CT), largest connected component per vertebra;
* ``boxes/<UID>.json``: per vertebra the box in model-grid voxels, RAS mm, original
  (column, row, sorted slice) indices and file numbers (:mod:`stage1_segment.boxes`), plus the
  grid and source geometry and the ``stage1_run`` id (checkpoint name + hash);
* ``boxes.csv``: the same boxes, one row per (study, vertebra);
* ``qc_predict.csv``: one row per study (vertebrae found, Dice against the mask where the study
  has one, seconds).

``ckpt_path`` may be ``best`` (the best checkpoint recorded in ``last.ckpt``), ``last`` or a path.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from common.atomic import write_csv, write_json
from common.labels import VERTEBRAE
from stage1_segment.boxes import vertebra_boxes
from stage1_segment.inference import largest_components
from stage1_segment.prepare import CachedStudy, load_cached


def resolve_checkpoint(spec: str | os.PathLike, ckpt_dir: str | os.PathLike) -> Path:
    """``best`` / ``last`` / a path → an existing checkpoint file.

    ``best`` is read from the ModelCheckpoint state stored in ``<ckpt_dir>/last.ckpt``
    (falling back to ``last.ckpt`` when no best was recorded).

    Raises:
        FileNotFoundError: naming the file that is missing and the step that makes it.
    """
    spec = str(spec)
    if spec not in ("best", "last"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        return path
    last = Path(ckpt_dir) / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"{last} not found: train stage 1 first (`make stage1-fit`)")
    if spec == "last":
        return last
    state = torch.load(last, map_location="cpu", weights_only=False)
    for key, cb in state.get("callbacks", {}).items():
        best = cb.get("best_model_path") if isinstance(cb, dict) else None
        if "ModelCheckpoint" in str(key) and best and Path(best).is_file():
            return Path(best)
    return last


def run_id(ckpt_path: str | os.PathLike | None) -> str:
    """``<checkpoint stem>-<sha1[:8]>`` of the weights used (``untrained`` without one)."""
    if not ckpt_path:
        return "untrained"
    digest = hashlib.sha1()
    with open(ckpt_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"{Path(ckpt_path).stem}-{digest.hexdigest()[:8]}"


def dice_per_vertebra(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Dice of each vertebra present in ``true`` (both uint8 (X, Y, Z) on the same grid)."""
    out = {}
    for i, name in enumerate(VERTEBRAE, start=1):
        t = true == i
        if t.any():
            p = pred == i
            out[name] = float(2 * (p & t).sum() / (p.sum() + t.sum()))
    return out


def write_study(out_dir: Path, study: CachedStudy, labels: np.ndarray, stage1_run: str,
                clean: bool = True) -> dict[str, Any]:
    """Clean one predicted label map and write its mask, boxes JSON; return the QC row.

    Args:
        out_dir: ``$WORK/stage1/predict``.
        study: the cached study (model-grid geometry and source geometry).
        labels: uint8 (X, Y, Z) predicted classes on the model grid.
        stage1_run: id of the weights (:func:`run_id`).
        clean: keep the largest connected component per vertebra.
    """
    from common.nifti_io import save_nifti

    t0 = time.perf_counter()
    mask = largest_components(labels) if clean else labels.astype(np.uint8)
    save_nifti(out_dir / "masks" / f"{study.uid}.nii.gz", mask, study.affine)
    boxes = vertebra_boxes(mask, study.affine, study.src_affine, study.src_shape,
                           study.file_numbers)
    write_json(out_dir / "boxes" / f"{study.uid}.json", {
        "study_uid": study.uid, "split": study.split, "stage1_run": stage1_run,
        "grid_affine": study.affine, "grid_shape": list(mask.shape),
        "src_affine": study.src_affine, "src_shape": list(study.src_shape),
        "vertebrae": boxes})
    row: dict[str, Any] = {"study_uid": study.uid, "split": study.split, "status": "ok",
                           "found": sum(b is not None for b in boxes.values()),
                           "missing": ";".join(k for k, b in boxes.items() if b is None),
                           "stage1_run": stage1_run}
    if study.label is not None:
        dice = dice_per_vertebra(mask, study.label)
        row["dice_mean"] = round(float(np.mean(list(dice.values()))), 4) if dice else np.nan
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def boxes_table(boxes_dir: Path, uids: Sequence[str]) -> pd.DataFrame:
    """One row per (study, vertebra) from the per-study boxes JSON files."""
    import json

    rows = []
    for uid in uids:
        path = boxes_dir / f"{uid}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        for name in VERTEBRAE:
            box = doc["vertebrae"].get(name)
            row = {"study_uid": uid, "split": doc["split"], "vertebra": name,
                   "present": box is not None, "stage1_run": doc["stage1_run"]}
            for key, value in (box or {}).items():
                if isinstance(value, list):
                    row.update({f"{key}_{ax}": v for ax, v in zip("xyz", value)})
                else:
                    row[key] = value
            rows.append(row)
    return pd.DataFrame(rows)


class Stage1PredictionWriter(BasePredictionWriter):
    """Write masks, boxes and the predict QC table during ``trainer.predict`` (module docstring).

    Args:
        output_dir: ``$WORK/stage1/predict`` (linked from ``data.work_dir`` by the CLI).
        clean: keep the largest connected component per vertebra.
    """

    def __init__(self, output_dir: str | None = None, clean: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.clean = clean
        self.rows: list[dict[str, Any]] = []
        self.stage1_run = "untrained"

    def on_predict_start(self, trainer, pl_module) -> None:  # noqa: D102
        if self.output_dir is None:
            raise ValueError("Stage1PredictionWriter needs output_dir (set data.work_dir)")
        self.rows = []
        self.stage1_run = run_id(trainer.ckpt_path)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: D102
        for path, labels in zip(prediction["path"], prediction["labels"]):
            study = load_cached(path)
            try:
                self.rows.append(write_study(self.output_dir, study, labels, self.stage1_run,
                                             self.clean))
            except Exception as exc:  # one bad study never stops the batch
                self.rows.append({"study_uid": study.uid, "split": study.split,
                                  "status": "failed", "reason": type(exc).__name__,
                                  "message": str(exc)})

    def on_predict_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        rows = self.rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        # a distributed sampler pads with repeated studies: keep one row each
        qc = pd.DataFrame(rows).drop_duplicates("study_uid").sort_values("study_uid")
        write_csv(self.output_dir / "qc_predict.csv", qc)
        write_csv(self.output_dir / "boxes.csv",
                  boxes_table(self.output_dir / "boxes", qc["study_uid"].tolist()))
        ok = qc[qc["status"] == "ok"]
        msg = (f"stage1 predict: {len(ok)}/{len(qc)} studies -> {self.output_dir} "
               f"(run {self.stage1_run})")
        if "dice_mean" in ok and ok["dice_mean"].notna().any():
            msg += f"; Dice vs masks (train studies, seen in training) {ok['dice_mean'].mean():.3f}"
        print(msg)
