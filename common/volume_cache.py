"""Decode once: a cache of decoded full-resolution DICOM volumes shared by the pipeline's steps.

In one run of the pipeline a study's DICOM is decoded at most once. ``make stage1-prepare``
decodes the segmented train studies for the stage-1 training cache and keeps each decoded
volume here; ``make crops`` (the stage-1 part of the test-time engine over the train studies)
reads them back instead of decoding the series a second time. Studies that only one step needs
(unsegmented train studies in ``crops``, test studies in ``submit``) are decoded by that step
and not kept.

Layout: ``$WORK/cache/volumes/<StudyInstanceUID>.npz`` (uncompressed; written atomically):

* ``hu``: int16 (X, Y, Z) HU, as :func:`common.dicom_io.load_series` returns it;
* ``affine``: float64 (4, 4) voxel → RAS mm; ``file_numbers``: int64 (Z,);
* ``qc``: the load's QC record (JSON text); ``source_files``: the decoded files' names in slice
  order (JSON text; for the DICOM outputs); ``key``: what the entry is valid for (JSON text):
  the series folder's file names, sizes and modification times, the ``lenient`` mode and the
  cache version. An entry whose key differs (files changed, other mode) is decoded again.

Cost on disk: 2 bytes per voxel, i.e. 0.5 MiB per 512² slice; on the RSNA train set only the
87 segmented studies are kept (about 87 × 300 slices × 0.5 MiB ≈ 13 GiB for typical lengths).
Delete the folder to reclaim the space; nothing is lost (it is decoded again when needed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import save_npz
from common.geometry import Volume
from common.layout import WorkLayout

CACHE_VERSION = 1


def volume_cache_dir(work_dir: str | os.PathLike) -> Path:
    """``$WORK/cache/volumes``."""
    return WorkLayout(work_dir).volume_cache


def series_key(study_dir: str | os.PathLike, lenient: bool) -> dict[str, Any]:
    """What a cached volume is valid for: the folder's files (name, size, mtime) and the mode."""
    files = []
    with os.scandir(study_dir) as it:
        for entry in it:
            try:
                st = entry.stat()
            except OSError:
                continue
            files.append([entry.name, int(st.st_size), int(st.st_mtime_ns)])
    return {"version": CACHE_VERSION, "lenient": bool(lenient), "files": sorted(files)}


def load_study(study_dir: str | os.PathLike, lenient: bool = False,
               cache_dir: str | os.PathLike | None = None, keep: bool = False,
               workers: int | None = None) -> tuple[Volume, str]:
    """A study's decoded volume: from the cache when valid, else decoded (and kept if ``keep``).

    Args:
        study_dir: the study's DICOM folder.
        lenient: load mode (part of the cache key).
        cache_dir: ``$WORK/cache/volumes`` (None: no cache, always decode).
        keep: write a freshly decoded volume into the cache.
        workers: decoder processes for :func:`common.dicom_io.load_series`.

    Returns:
        (the volume, ``"cache"`` or ``"decoded"``); ``volume.qc["load_seconds"]`` is the time
        spent here.

    Raises:
        SeriesError: as :func:`common.dicom_io.load_series`.
    """
    from common.dicom_io import load_series

    t0 = time.perf_counter()
    path = Path(cache_dir) / f"{Path(study_dir).name}.npz" if cache_dir else None
    cached = path is not None and path.is_file()
    key = series_key(study_dir, lenient) if cached or (path is not None and keep) else None
    if cached:
        volume = _read(path, key, Path(study_dir))
        if volume is not None:
            volume.qc["load_seconds"] = time.perf_counter() - t0
            return volume, "cache"
    volume = load_series(study_dir, lenient=lenient, workers=workers)
    if path is not None and keep:
        save_npz(path, hu=volume.hu, affine=volume.affine,
                 file_numbers=volume.file_numbers.astype(np.int64),
                 uid=np.array(volume.study_uid),
                 qc=np.array(json.dumps(volume.qc, default=str)),
                 key=np.array(json.dumps(key)),
                 source_files=np.array(json.dumps([Path(p).name for p in volume.source_files])))
    volume.qc["load_seconds"] = time.perf_counter() - t0
    return volume, "decoded"


def _read(path: Path, key: dict[str, Any] | None, study_dir: Path) -> Volume | None:
    """The cached volume, or None when the entry is stale or unreadable. The source files are
    stored by name (the key pins the folder's files) and put back under ``study_dir``; an entry
    written before they were stored has none (DICOM outputs then report it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            names = json.loads(str(z["source_files"])) if "source_files" in z.files else []
            return Volume(hu=z["hu"], affine=z["affine"], file_numbers=z["file_numbers"],
                          study_uid=str(z["uid"]), qc=json.loads(str(z["qc"])),
                          source_files=tuple(str(study_dir / n) for n in names))
    except (OSError, ValueError, KeyError):  # a damaged entry is decoded again
        return None
