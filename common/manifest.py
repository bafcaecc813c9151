"""The stage-1 → stage-2 hand-off: one row per (study, vertebra), and nothing else.

Stage 1 writes ``<stage1_run>/vertebrae.csv``; stage 2 reads only that file (never a glob) and
refuses a file whose ``schema_version`` differs from :data:`SCHEMA_VERSION`.

Crop files (``crop_path``, relative to the manifest's folder) are ``.npz`` archives with:

* ``image``: int16 (X, Y, Z) HU, resampled from the full-resolution CT onto the crop grid;
* ``mask``: uint8 (X, Y, Z) stage-1 label map (0 = background, 1–7 = C1–C7) on the crop grid;
* ``affine``: float64 (4, 4) crop voxel → RAS mm.

Axis order and world frame are those of :mod:`common.geometry`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.labels import VERTEBRAE
from common.tables import read_csv

SCHEMA_VERSION = 1

#: Column → meaning. Voxel boxes are inclusive indices of the source CT array (X, Y, Z)
#: (X = column, Y = row, Z = sorted slice); world boxes are RAS mm; file numbers are the
#: ``<n>.dcm`` numbers of the lowest/highest slice of the box.
COLUMNS: dict[str, str] = {
    "schema_version": "int, equals SCHEMA_VERSION",
    "study_uid": "StudyInstanceUID",
    "split": "train or test",
    "vertebra": "C1..C7",
    "present": "bool: stage 1 found this vertebra (crop written)",
    "crop_path": "str: crop .npz relative to the manifest folder; empty when absent",
    "vox_lo_x": "int", "vox_lo_y": "int", "vox_lo_z": "int",
    "vox_hi_x": "int", "vox_hi_y": "int", "vox_hi_z": "int",
    "mm_lo_x": "float", "mm_lo_y": "float", "mm_lo_z": "float",
    "mm_hi_x": "float", "mm_hi_y": "float", "mm_hi_z": "float",
    "file_number_lo": "int", "file_number_hi": "int",
    "voxels": "int: stage-1 voxels of this vertebra on the model grid",
    "margin_mm": "float",
    "spacing_x": "float: crop voxel size mm", "spacing_y": "float", "spacing_z": "float",
    "fold": "int: fold from the shared fold file, -1 for test studies",
    "stage1_run": "str: run id of the stage-1 model",
    "qc_status": "ok / absent / failed, with reason after a colon",
}


class ManifestError(ValueError):
    """The manifest is missing, malformed or of another schema version."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a crop manifest; ``crop_path`` is made absolute.

    Raises:
        ManifestError: missing columns, wrong schema version, bad vertebra names.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found (run `make crops` first)")
    df = read_csv(path, keep_default_na=False, dtype={"crop_path": str, "study_uid": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing columns {missing}")
    versions = set(df["schema_version"].astype(int))
    if versions and versions != {SCHEMA_VERSION}:
        raise ManifestError(f"{path}: schema_version {sorted(versions)}, expected {SCHEMA_VERSION}")
    bad = set(df["vertebra"]) - set(VERTEBRAE)
    if bad:
        raise ManifestError(f"{path}: unknown vertebra names {sorted(bad)}")
    df["present"] = df["present"].astype(str).str.lower().isin(["true", "1"])
    df["crop_path"] = [str(path.parent / p) if p else "" for p in df["crop_path"]]
    return df
