"""Per-vertebra crops from the full-resolution CT, and the manifest stage 2 reads.

For every study with a stage-1 prediction (``$WORK/stage1/predict``), the DICOM series is loaded
again at full resolution; each vertebra's box (from the predicted mask, mapped to original
indices by :mod:`stage1_segment.boxes`) grown by ``margin_mm`` is resampled to a fixed
``shape`` with :func:`common.geometry.crop_box`, and the predicted label map is resampled
(nearest) onto the same crop grid. Train studies with a ground-truth mask are cropped from the
*predicted* mask too, so that stage 2 trains on what it will see at test time.

Outputs under ``$WORK/stage1/crops/``: ``<UID>_<C#>.npz`` (``image`` int16 (X, Y, Z) HU,
``mask`` uint8 (X, Y, Z) full label map, ``affine`` crop voxel → RAS mm), the manifest
``vertebrae.csv`` (columns of :data:`common.manifest.COLUMNS`, 7 rows per study; an absent or
too small vertebra is a row with ``present=false``), ``rows/<UID>.json`` (per-study rows, the
resume record) and ``run.json``.

CLI: ``python -m stage1_segment.crops -c configs/stage1/cpu.yaml --data-root DATA
--work-dir WORK --jobs 2`` (settings from the config's ``crops:`` section).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
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
                  src_lo: Sequence[int], src_hi: Sequence[int], cfg: CropConfig) -> Crop:
    """Cut one box (inclusive source indices) plus margin out of the CT and the label map.

    Returns:
        (image int16 (shape) HU, outside the CT = -1024; mask uint8 (shape) full label map,
        nearest; crop affine voxel → RAS mm).
    """
    image, affine = geometry.crop_box(volume.hu.astype(np.float32), volume.affine, src_lo,
                                      src_hi, cfg.margin_mm, cfg.shape, order=1,
                                      cval=float(AIR_HU), dtype=np.float32)
    labels = geometry.resample_to_grid(mask, mask_affine, affine, cfg.shape, order=0, cval=0,
                                       dtype=np.uint8)
    return np.rint(image).astype(np.int16), labels, affine


def crops_for_volume(volume: Volume, mask: np.ndarray, mask_affine: np.ndarray | None,
                     cfg: CropConfig) -> dict[str, Crop | None]:
    """Crops of C1..C7 for one CT and a label map on any grid.

    Args:
        volume: the full-resolution CT (:func:`common.dicom_io.load_series`).
        mask: uint8 (X, Y, Z) classes, on the model grid or the CT grid.
        mask_affine: the mask's affine (None: the mask is on the CT grid).
        cfg: crop settings.

    Returns:
        vertebra name → (image, mask, affine) as in :func:`crop_vertebra`, or None when the
        vertebra is absent or smaller than ``cfg.min_volume_mm3``.
    """
    from stage1_segment.boxes import vertebra_boxes

    mask_affine = volume.affine if mask_affine is None else mask_affine
    boxes = vertebra_boxes(mask, mask_affine, volume.affine, volume.shape, volume.file_numbers)
    voxel_mm3 = abs(float(np.linalg.det(mask_affine[:3, :3])))
    return {name: crop_vertebra(volume, mask, mask_affine, box["src_lo"], box["src_hi"], cfg)
            if box is not None and box["voxels"] * voxel_mm3 >= cfg.min_volume_mm3 else None
            for name, box in boxes.items()}


def _row(uid: str, split: str, name: str, fold: int, run: str, cfg: CropConfig,
         status: str) -> dict[str, Any]:
    from common.manifest import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, "study_uid": uid, "split": split,
            "vertebra": name, "present": False, "crop_path": "", "margin_mm": cfg.margin_mm,
            "fold": fold, "stage1_run": run, "qc_status": status}


def crop_study(uid: str, split: str, study_dir: str, predict_dir: str, out_dir: str,
               cfg: CropConfig, fold: int) -> list[dict[str, Any]]:
    """Write the crops of one study; return its 7 manifest rows (never raises)."""
    from common.dicom_io import load_series
    from common.nifti_io import load_nifti

    boxes_path = Path(predict_dir) / "boxes" / f"{uid}.json"
    if not boxes_path.is_file():
        return [_row(uid, split, n, fold, "", cfg, "failed: no stage-1 prediction (see "
                     "qc_prepare.csv / qc_predict.csv)") for n in VERTEBRAE]
    doc = json.loads(boxes_path.read_text())
    run = doc["stage1_run"]
    try:
        mask, mask_affine = load_nifti(Path(predict_dir) / "masks" / f"{uid}.nii.gz")
        volume = load_series(study_dir, lenient=cfg.lenient, workers=1)
        voxel_mm3 = abs(float(np.linalg.det(mask_affine[:3, :3])))
        from stage1_segment.boxes import vertebra_boxes

        boxes = vertebra_boxes(np.asarray(mask), mask_affine, volume.affine, volume.shape,
                               volume.file_numbers)
    except Exception as exc:  # one bad study never stops the batch
        reason = getattr(exc, "reason", type(exc).__name__)
        return [_row(uid, split, n, fold, run, cfg, f"failed: {reason}: {exc}".splitlines()[0])
                for n in VERTEBRAE]
    rows = []
    for name, box in boxes.items():
        row = _row(uid, split, name, fold, run, cfg, "absent: not found by stage 1")
        if box is not None:
            row.update({f"vox_{e}_{a}": box[f"src_{e}"][i] for e in ("lo", "hi")
                        for i, a in enumerate("xyz")})
            row.update({f"mm_{e}_{a}": box[f"mm_{e}"][i] for e in ("lo", "hi")
                        for i, a in enumerate("xyz")})
            row.update(file_number_lo=box["file_number_lo"], file_number_hi=box["file_number_hi"],
                       voxels=box["voxels"])
            if box["voxels"] * voxel_mm3 < cfg.min_volume_mm3:
                row["qc_status"] = (f"absent: too small ({box['voxels'] * voxel_mm3:.0f} mm3 < "
                                    f"{cfg.min_volume_mm3:.0f})")
            else:
                image, labels, affine = crop_vertebra(volume, np.asarray(mask), mask_affine,
                                                      box["src_lo"], box["src_hi"], cfg)
                from common.atomic import save_npz

                rel = f"{uid}_{name}.npz"
                save_npz(Path(out_dir) / rel, image=image, mask=labels, affine=affine)
                sx, sy, sz = geometry.spacing_of(affine)
                row.update(present=True, crop_path=rel, spacing_x=round(float(sx), 4),
                           spacing_y=round(float(sy), 4), spacing_z=round(float(sz), 4),
                           qc_status="ok")
        rows.append(row)
    return rows


def _folds(data_root: Path, work_dir: Path, n_folds: int) -> dict[str, int]:
    from common.dataset import RSNADataset
    from common.folds import ensure_folds

    ds = RSNADataset(data_root)
    if not (data_root / "train.csv").is_file():
        return {}
    folds = ensure_folds(ds.labels, work_dir / "folds.csv", n_folds)
    return dict(zip(folds["StudyInstanceUID"], folds["fold"].astype(int)))


def make_crops(data_root: str | os.PathLike, work_dir: str | os.PathLike, cfg: CropConfig,
               jobs: int = 2, progress: bool = True) -> Path:
    """Crop every train and test study and write the manifest; returns its path.

    Studies whose ``rows/<UID>.json`` was written with the same stage-1 run and crop settings
    are reused (resume); all others are (re)cropped in ``jobs`` processes.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from common.atomic import write_csv, write_json
    from common.manifest import COLUMNS
    from stage1_segment.prepare import list_studies

    data_root, work_dir = Path(data_root), Path(work_dir)
    predict_dir, out_dir = work_dir / "stage1" / "predict", work_dir / "stage1" / "crops"
    rows_dir = out_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    fold_of = _folds(data_root, work_dir, cfg.n_folds)
    results: dict[str, list[dict[str, Any]]] = {}
    todo = []
    for uid, split, sdir, _ in list_studies(data_root, ("train", "test")):
        fold = int(fold_of.get(uid, -1)) if split == "train" else -1
        cached = _reuse(rows_dir / f"{uid}.json", predict_dir / "boxes" / f"{uid}.json", cfg)
        if cached is not None:
            results[uid] = cached
        else:
            todo.append((uid, split, sdir, str(predict_dir), str(out_dir), cfg, fold))
    bar = tqdm(total=len(todo), desc="stage1 crops", unit="study", disable=not progress)

    def done(uid: str, rows: list[dict[str, Any]]) -> None:
        results[uid] = rows
        write_json(rows_dir / f"{uid}.json", {"crop_key": cfg.key(), "rows": rows})
        bar.update()

    if jobs <= 1 or len(todo) <= 1:
        for args in todo:
            done(args[0], crop_study(*args))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(crop_study, *args): args[0] for args in todo}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    bar.close()
    frame = pd.DataFrame([r for uid in sorted(results) for r in results[uid]])
    frame = frame.reindex(columns=list(COLUMNS))
    manifest = out_dir / "vertebrae.csv"
    write_csv(manifest, frame)
    status = frame["qc_status"].str.split(":").str[0].value_counts().to_dict()
    write_json(out_dir / "run.json", {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_root": str(data_root), "crops": asdict(cfg), "crop_key": cfg.key(),
        "stage1_runs": sorted(set(frame["stage1_run"]) - {""}), "studies": len(results),
        "rows_by_status": status, "git_commit": _git_commit(), "versions": _versions()})
    return manifest


def _reuse(rows_path: Path, boxes_path: Path, cfg: CropConfig) -> list[dict[str, Any]] | None:
    if not rows_path.is_file() or not boxes_path.is_file():
        return None
    doc = json.loads(rows_path.read_text())
    run = json.loads(boxes_path.read_text())["stage1_run"]
    rows = doc.get("rows", [])
    if doc.get("crop_key") != cfg.key() or not rows or rows[0]["stage1_run"] != run:
        return None
    crops = [rows_path.parent.parent / r["crop_path"] for r in rows if r["present"]]
    return rows if all(p.is_file() for p in crops) else None


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


def build_parser() -> argparse.ArgumentParser:
    from stage1_segment.prepare import tool_parser

    return tool_parser("python -m stage1_segment.crops",
                       "Cut one crop per predicted vertebra from the full-resolution CT and "
                       "write WORK/stage1/crops/vertebrae.csv (the stage-2 manifest).", "crops")


def main(argv: Sequence[str] | None = None) -> int:
    from stage1_segment.prepare import read_config_sections

    args = build_parser().parse_args(argv)
    section = read_config_sections(args.config).get("crops", {}) or {}
    cfg = CropConfig(**{**section, "shape": tuple(section.get("shape", CropConfig.shape))})
    t0 = time.perf_counter()
    manifest = make_crops(args.data_root, args.work_dir, cfg, jobs=args.jobs)
    import pandas as pd

    frame = pd.read_csv(manifest, keep_default_na=False)
    print(f"stage1 crops: {int(frame['present'].astype(str).eq('True').sum())} crops, "
          f"{len(frame)} manifest rows in {time.perf_counter() - t0:.1f} s -> {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
