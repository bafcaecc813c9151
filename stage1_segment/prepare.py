"""Prepare the stage-1 cache: each study's HU volume (and mask) resampled onto the model grid.

One ``.npz`` per study under ``$WORK/stage1/cache/<settings key>/<StudyInstanceUID>.npz``:

* ``image``: int16 (X, Y, Z) HU on the model grid (linear interpolation, outside = -1024);
* ``label``: uint8 (X, Y, Z) classes 0..7 (8 with thoracic="merge") on the same grid (nearest),
  only for studies with a segmentation;
* ``affine``: float64 (4, 4) model-grid voxel → RAS mm;
* ``src_affine``, ``src_shape``, ``file_numbers``: the DICOM volume's geometry, so that boxes
  can be mapped back to original (column, row, sorted slice) indices and file numbers.

The decoded full-resolution volume of every study prepared here is kept in
``$WORK/cache/volumes`` (:mod:`common.volume_cache`), so that ``make crops`` does not decode the
series again. The settings key is a hash of the grid settings, so a changed grid never reuses a
stale cache.
The HU window is *not* part of the key: it is applied when the cache is read (a model
hyperparameter). Files are written atomically and skipped when present, so an interrupted run
resumes where it stopped; a failing study becomes a row of ``$WORK/stage1/qc_prepare.csv`` and
the batch continues.

CLI: ``python -m stage1_segment.prepare -c configs/stage1/cpu.yaml --data-root DATA
--work-dir WORK --jobs 2`` (grid settings come from the ``data:`` section of the config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common import geometry
from common.atomic import save_npz, write_csv, write_json
from common.geometry import AIR_HU, Volume
from common.layout import WorkLayout

CACHE_VERSION = 1


@dataclass(frozen=True)
class GridSettings:
    """How a study is put onto the model grid (the cache key).

    Attributes:
        shape: fixed grid (X, Y, Z) voxels over the study's whole field of view (e.g. 128³); or
        spacing_mm: fixed voxel size (X, Y, Z) in mm (the grid shape then varies per study).
            Exactly one of the two is set.
        thoracic: T1–T12 → ``"background"`` or ``"merge"`` (class 8) in the cached labels.
    """

    shape: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    thoracic: str = "background"

    def __post_init__(self) -> None:
        if (self.shape is None) == (self.spacing_mm is None):
            raise ValueError("set exactly one of grid_shape and grid_spacing_mm")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
            if len(self.shape) != 3 or min(self.shape) < 8:
                raise ValueError(f"grid_shape must be 3 sizes >= 8, got {self.shape}")
        if self.spacing_mm is not None:
            object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
            if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
                raise ValueError(f"grid_spacing_mm must be 3 positive sizes, got {self.spacing_mm}")
        if self.thoracic not in ("background", "merge"):
            raise ValueError(f"thoracic must be 'background' or 'merge', got {self.thoracic!r}")

    def key(self) -> str:
        """Short stable hash of the settings (and the cache format version)."""
        blob = json.dumps({**asdict(self), "version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def grid_for(self, affine: np.ndarray, shape: Sequence[int]
                 ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Model-grid (affine, shape) covering the field of view of a volume (affine, shape)."""
        if self.shape is not None:
            return geometry.grid_for_shape(affine, shape, self.shape), self.shape
        return geometry.grid_for_spacing(affine, shape, self.spacing_mm)


@dataclass
class CachedStudy:
    """One cached study (see the module docstring for the arrays)."""

    uid: str
    split: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    src_affine: np.ndarray
    src_shape: tuple[int, int, int]
    file_numbers: np.ndarray


def cache_dir(work_dir: str | os.PathLike, settings: GridSettings) -> Path:
    """``$WORK/stage1/cache/<settings key>``."""
    return WorkLayout(work_dir).stage1_cache / settings.key()


def cache_path(work_dir: str | os.PathLike, settings: GridSettings, uid: str) -> Path:
    """The cache file of one study."""
    return cache_dir(work_dir, settings) / f"{uid}.npz"


def resample_volume(volume: Volume, settings: GridSettings) -> tuple[np.ndarray, np.ndarray]:
    """HU volume onto the model grid.

    Returns:
        (int16 (X', Y', Z') HU, linear interpolation, outside the FOV = -1024; grid affine).
    """
    affine, shape = settings.grid_for(volume.affine, volume.shape)
    hu = geometry.resample_to_grid(volume.hu, volume.affine, affine, shape, order=1,
                                   cval=float(AIR_HU), dtype=np.float32)  # int16 in, no copy
    return np.rint(hu).astype(np.int16), affine


def load_cached(path: str | os.PathLike) -> CachedStudy:
    """Read one cache file written by :func:`prepare_study`."""
    with np.load(path, allow_pickle=False) as z:
        label = z["label"] if bool(z["has_label"]) else None
        return CachedStudy(uid=str(z["uid"]), split=str(z["split"]), image=z["image"],
                           label=label, affine=z["affine"], src_affine=z["src_affine"],
                           src_shape=tuple(int(s) for s in z["src_shape"]),
                           file_numbers=z["file_numbers"])


def save_cached(path: str | os.PathLike, volume: Volume, split: str, image: np.ndarray,
                affine: np.ndarray, label: np.ndarray | None) -> None:
    """Write a study's cache file atomically (arrays as in the module docstring)."""
    save_npz(path, uid=np.array(volume.study_uid), split=np.array(split), image=image,
             label=label if label is not None else np.zeros((0, 0, 0), np.uint8),
             has_label=np.array(label is not None), affine=affine,
             src_affine=volume.affine, src_shape=np.array(volume.shape, dtype=np.int64),
             file_numbers=volume.file_numbers.astype(np.int64))


def prepare_study(uid: str, study_dir: str, mask_path: str | None, split: str, out: str,
                  settings: GridSettings, lenient: bool = False,
                  volume_cache: str | None = None) -> dict[str, Any]:
    """Load one study, resample it (and its mask) to the model grid, write the cache file.

    The decoded full-resolution volume is kept in ``volume_cache``
    (:mod:`common.volume_cache`) so that ``make crops`` does not decode the series again.
    Never raises: a failure is returned as a QC row with ``status="failed"``, the reason code
    (``SeriesError.reason`` / ``GeometryError.reason`` where available) and the message.
    """
    from common.nifti_io import align_mask
    from common.volume_cache import load_study

    t0 = time.perf_counter()
    row: dict[str, Any] = {"study_uid": uid, "split": split, "status": "prepared", "reason": "",
                           "message": "", "has_mask": mask_path is not None}
    try:
        volume, source = load_study(study_dir, lenient=lenient, cache_dir=volume_cache,
                                    keep=volume_cache is not None, workers=1)
        row.update(volume=source, src_shape="x".join(map(str, volume.shape)),
                   spacing_mm="x".join(f"{s:.3f}" for s in volume.spacing),
                   load_status=volume.qc.get("status", ""))
        image, affine = resample_volume(volume, settings)
        label = None
        if mask_path is not None:
            classes, mqc = align_mask(volume, mask_path, thoracic=settings.thoracic,
                                      lenient=lenient)
            row.update(mask_status=mqc.get("status", ""), mask_flags=";".join(mqc["flags"]))
            label = geometry.resample_to_grid(classes, volume.affine, affine, image.shape,
                                              order=0, cval=0, dtype=np.uint8)
        save_cached(out, volume, split, image, affine, label)
        row["grid_shape"] = "x".join(map(str, image.shape))
    except Exception as exc:  # one bad study never stops the batch
        row.update(status="failed", reason=getattr(exc, "reason", type(exc).__name__),
                   message=str(exc).splitlines()[0] if str(exc) else repr(exc))
        if not isinstance(exc, ValueError):
            row["message"] += " | " + traceback.format_exc(limit=3).replace("\n", " ")[-400:]
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def list_studies(data_root: str | os.PathLike, splits: Iterable[str] = ("train", "test"),
                 masked_only: bool = False) -> list[tuple[str, str, str, str | None]]:
    """(uid, split, study_dir, mask_path or None) for the studies of the given splits."""
    from common.dataset import RSNADataset

    ds = RSNADataset(data_root)
    out = []
    for split in splits:
        uids = ds.train_uids() if split == "train" else ds.test_uids()
        for uid in uids:
            mask = ds.mask_path(uid) if split == "train" else None
            if masked_only and mask is None:
                continue
            out.append((uid, split, str(ds.study_dir(uid)), str(mask) if mask else None))
    return out


def prepare_studies(data_root: str | os.PathLike, work_dir: str | os.PathLike,
                    settings: GridSettings, splits: Iterable[str] = ("train",),
                    masked_only: bool = True, jobs: int = 2, lenient: bool = False,
                    progress: bool = True) -> pd.DataFrame:
    """Prepare the cache for every study of ``splits``; skip studies already cached.

    Each study decoded here is also kept in the volume cache ``$WORK/cache/volumes``
    (:mod:`common.volume_cache`), which ``make crops`` reads instead of decoding it again.

    Args:
        data_root: RSNA-layout folder.
        work_dir: ``$WORK``; files go to ``$WORK/stage1/cache/<key>/``.
        settings: the grid settings (the cache key).
        splits: ``"train"`` and/or ``"test"``.
        masked_only: only train studies with a segmentation (what ``fit`` needs; the
            default: every other study goes straight through the engine in ``make crops`` /
            ``make submit``).
        jobs: worker processes (1 = in this process).
        lenient: repair loadable defects instead of rejecting (recorded in the QC record).
        progress: show a tqdm bar.

    Returns:
        The QC table (one row per study: status prepared / failed, or cached for a study
        cached before any record; a study found cached keeps the row of the run that prepared
        it, seconds included; ``this_run`` says what this run did: prepared / cached / failed),
        also written to ``$WORK/stage1/qc_prepare.csv``.
    """
    from common.volume_cache import volume_cache_dir

    studies = list_studies(data_root, splits, masked_only)
    volumes = os.fspath(volume_cache_dir(work_dir))
    folder = cache_dir(work_dir, settings)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "settings.json", {**asdict(settings), "version": CACHE_VERSION})
    qc_path = WorkLayout(work_dir).qc_prepare
    previous = _previous_rows(qc_path)
    rows, todo = [], []
    for uid, split, sdir, mask in studies:
        out = folder / f"{uid}.npz"
        if out.is_file():  # atomic writes: existing means complete; temp files are ignored
            # the row of the run that prepared it is kept (status, seconds): a later run that
            # finds everything cached must not erase the cold-run record
            rows.append({"status": "cached", "seconds": 0.0,
                         **previous.get(uid, {"study_uid": uid, "split": split,
                                              "has_mask": mask is not None}),
                         "this_run": "cached"})
        else:
            todo.append((uid, sdir, mask, split, str(out), settings, lenient, volumes))
    bar = tqdm(total=len(todo), desc="stage1 prepare", unit="study", disable=not progress)
    if jobs <= 1 or len(todo) <= 1:
        for args in todo:
            rows.append(prepare_study(*args))
            bar.update()
    else:
        from common.procs import pool_initializer
        init, initargs = pool_initializer()

        with ProcessPoolExecutor(max_workers=jobs, initializer=init, initargs=initargs) as pool:
            futures = [pool.submit(prepare_study, *args) for args in todo]
            for fut in as_completed(futures):
                rows.append(fut.result())
                bar.update()
    bar.close()
    qc = pd.DataFrame(rows)
    if len(qc):
        qc["this_run"] = qc.get("this_run", pd.Series(index=qc.index, dtype=object)).fillna(
            qc["status"])
    write_csv(qc_path, qc)
    failed = qc[qc["status"] == "failed"]
    if len(failed):
        tqdm.write(f"stage1 prepare: {len(failed)} of {len(qc)} studies failed, see "
                   f"{Path(work_dir) / 'stage1' / 'qc_prepare.csv'}; first: "
                   f"{failed.iloc[0]['study_uid']}: {failed.iloc[0]['message']}")
    return qc


def _previous_rows(qc_path: Path) -> dict[str, dict[str, Any]]:
    """QC rows of an earlier run by study (so a warm run keeps the details of the cold one)."""
    if not qc_path.is_file():
        return {}
    frame = pd.read_csv(qc_path, dtype={"study_uid": str}, keep_default_na=False)
    return {r["study_uid"]: r for r in frame.to_dict("records")}


def settings_from_config(data_cfg: dict[str, Any]) -> GridSettings:
    """GridSettings from a parsed config's ``data`` section (grid_shape, grid_spacing_mm,
    thoracic)."""
    return GridSettings(shape=data_cfg.get("grid_shape"),
                        spacing_mm=data_cfg.get("grid_spacing_mm"),
                        thoracic=data_cfg.get("thoracic", "background"))


def stage1_args(configs: Sequence[str | os.PathLike], data_root: str | os.PathLike,
                work_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> list[str]:
    """The stage-1 LightningCLI arguments of a step: ``-c`` per file, the roots, overrides."""
    return [*[a for c in configs for a in ("-c", str(c))], "--data.data_root", str(data_root),
            "--data.work_dir", str(work_dir), *overrides]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stage1_segment.prepare",
        description="Resample the segmented train studies (and their masks) onto the stage-1 "
                    "model grid and cache them under WORK/stage1/cache/<settings key>/ (the "
                    "decoded volumes under WORK/cache/volumes/); cached studies are skipped. "
                    "Settings (data: grid_shape, grid_spacing_mm, thoracic, lenient) come from "
                    "the stage-1 config read by the stage's own parser: -c files and any "
                    "--section.key value overrides, exactly as for `python -m stage1_segment "
                    "fit`.")
    parser.add_argument("-c", "--config", action="append", required=True,
                        help="stage-1 YAML (repeatable, later wins)")
    parser.add_argument("--data-root", required=True, help="RSNA-layout dataset folder")
    parser.add_argument("--work-dir", required=True, help="output root WORK")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--splits", nargs="+", default=["train"], choices=["train", "test"])
    parser.add_argument("--all-studies", action="store_true",
                        help="also studies without a segmentation (default: only the segmented "
                             "train studies that fit trains on)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from stage1_segment.cli import parse_settings

    args, overrides = build_parser().parse_known_args(argv)
    config = parse_settings(stage1_args(args.config, args.data_root, args.work_dir, overrides))
    data_cfg = config.data.as_dict()
    settings = settings_from_config(data_cfg)
    t0 = time.perf_counter()
    qc = prepare_studies(args.data_root, args.work_dir, settings, splits=args.splits,
                         masked_only=not args.all_studies, jobs=args.jobs,
                         lenient=bool(data_cfg.get("lenient")))
    counts = qc["this_run"].value_counts().to_dict() if len(qc) else {}
    print(f"stage1 prepare: {counts} in {time.perf_counter() - t0:.1f} s -> "
          f"{cache_dir(args.work_dir, settings)}")
    return 0 if counts.get("failed", 0) < len(qc) or not len(qc) else 1


if __name__ == "__main__":
    raise SystemExit(main())
