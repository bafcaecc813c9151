"""A small, learnable stage-2 world without stage 1: crops, a manifest and the RSNA tables.

Each crop is a bright bone blob (the target vertebra, labelled in the mask) with parts of its
neighbours above and below; a fractured vertebra carries a dark crack (a thin plane of soft-tissue
HU) through its blob. Crops are written exactly as stage 1 writes them (``common.manifest``):
``image`` int16 (X, Y, Z) HU, ``mask`` uint8 (X, Y, Z) labels 0..7, ``affine`` voxel → RAS mm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import save_npz, write_csv
from common.labels import CLASS_INDEX, OVERALL, TARGETS, VERTEBRAE
from common.manifest import COLUMNS, SCHEMA_VERSION

UID = "StudyInstanceUID"
UID_ROOT = "1.2.826.0.1.3680043.99."


def make_crop(vertebra: str, fractured: bool, shape: tuple[int, int, int], rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic crop.

    Returns:
        (image int16 (X, Y, Z) HU, mask uint8 (X, Y, Z) 0..7, affine float64 (4, 4) voxel → RAS mm).
    """
    sx, sy, sz = shape
    x, y, z = np.meshgrid(np.arange(sx), np.arange(sy), np.arange(sz), indexing="ij")
    cx, cy, cz = (np.array(shape) - 1) / 2 + rng.normal(0, 0.5, 3)
    image = rng.normal(40, 25, shape)  # soft tissue
    mask = np.zeros(shape, np.uint8)
    idx = CLASS_INDEX[vertebra]
    for dz, label in ((-0.8 * sz, idx - 1), (0.0, idx), (0.8 * sz, idx + 1)):
        r = ((x - cx) / (0.32 * sx)) ** 2 + ((y - cy) / (0.32 * sy)) ** 2 \
            + ((z - cz - dz) / (0.3 * sz)) ** 2
        body = r <= 1.0
        image[body] = rng.normal(350, 30, int(body.sum()))
        image[body & (r > 0.6)] += 600  # cortical shell
        if 1 <= label <= 7:
            mask[body] = label
    if fractured:
        target = mask == idx
        normal = rng.normal(0, 1, 3)
        normal[2] += 2.0  # mostly axial cracks
        normal /= np.linalg.norm(normal)
        d = (x - cx) * normal[0] + (y - cy) * normal[1] + (z - cz) * normal[2]
        crack = target & (np.abs(d - rng.uniform(-1, 1)) < 0.9)
        image[crack] = rng.normal(0, 20, int(crack.sum()))
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    return np.clip(image, -1024, 3000).astype(np.int16), mask, affine


def make_stage2_world(root: Path, n_train: int = 30, n_test: int = 3,
                      shape: tuple[int, int, int] = (16, 16, 12), seed: int = 0,
                      absent: int = 2) -> dict[str, Path]:
    """Write a stage-2 input world under ``root``.

    Layout: ``data/`` (train.csv, test.csv, sample_submission.csv, train_bounding_boxes.csv,
    empty train_images/<uid> and test_images/<uid> folders), ``work/stage1/crops/vertebrae.csv``
    and its crops. ``absent`` train studies lose one vertebra (present=False), and the last test
    study is listed in test.csv but has no manifest rows at all (it must get the prior).

    Returns:
        ``{"data": data root, "work": work root, "manifest": manifest path}``.
    """
    rng = np.random.default_rng(seed)
    data, work = root / "data", root / "work"
    crops_dir = work / "stage1" / "crops"
    train_uids = [f"{UID_ROOT}{seed}.{i}" for i in range(n_train)]
    test_uids = [f"{UID_ROOT}{seed}.{1000 + i}" for i in range(n_test)]
    labels = rng.random((n_train, 7)) < 0.3
    labels[: max(1, n_train // 10)] = False  # some all-negative studies
    train = pd.DataFrame(labels.astype(int), columns=list(VERTEBRAE))
    train.insert(0, UID, train_uids)
    train.insert(1, OVERALL, train[list(VERTEBRAE)].max(axis=1))
    rows, boxes = [], []
    for s, uid in enumerate(train_uids + test_uids[:-1]):
        split = "train" if s < n_train else "test"
        (data / f"{split}_images" / uid).mkdir(parents=True, exist_ok=True)
        for j, v in enumerate(VERTEBRAE):
            frac = bool(split == "train" and labels[s, j])
            present = not (split == "train" and s < absent and j == 3)
            rows.append(_manifest_row(uid, split, v, present, shape, s, j))
            if present:
                save_npz(crops_dir / rows[-1]["crop_path"], **dict(zip(
                    ("image", "mask", "affine"), make_crop(v, frac, shape, rng))))
            if frac:
                lo = rows[-1]["file_number_lo"]
                boxes.append({UID: uid, "x": 10.0, "y": 10.0, "width": 20.0, "height": 20.0,
                              "slice_number": lo + shape[2] // 2})
    (data / "test_images" / test_uids[-1]).mkdir(parents=True, exist_ok=True)
    write_csv(data / "train.csv", train)
    sub = pd.DataFrame({"row_id": [f"{u}_{t}" for u in test_uids for t in TARGETS],
                        "fractured": 0.5})
    write_csv(data / "sample_submission.csv", sub)
    test = pd.DataFrame({"row_id": sub["row_id"], UID: [r.split("_")[0] for r in sub["row_id"]],
                         "prediction_type": [r.split("_", 1)[1] for r in sub["row_id"]]})
    write_csv(data / "test.csv", test)
    write_csv(data / "train_bounding_boxes.csv", pd.DataFrame(boxes, columns=[
        UID, "x", "y", "width", "height", "slice_number"]))
    manifest = crops_dir / "vertebrae.csv"
    write_csv(manifest, pd.DataFrame(rows, columns=list(COLUMNS)))
    return {"data": data, "work": work, "manifest": manifest}


def _manifest_row(uid: str, split: str, v: str, present: bool, shape: tuple[int, int, int],
                  s: int, j: int) -> dict:
    z0 = 10 * j
    return {
        "schema_version": SCHEMA_VERSION, "study_uid": uid, "split": split, "vertebra": v,
        "present": present, "crop_path": f"{uid}_{v}.npz" if present else "",
        "vox_lo_x": 0, "vox_lo_y": 0, "vox_lo_z": z0,
        "vox_hi_x": shape[0] - 1, "vox_hi_y": shape[1] - 1, "vox_hi_z": z0 + shape[2] - 1,
        "mm_lo_x": 0.0, "mm_lo_y": 0.0, "mm_lo_z": float(z0),
        "mm_hi_x": float(shape[0]), "mm_hi_y": float(shape[1]), "mm_hi_z": float(z0 + shape[2]),
        "file_number_lo": z0 + 1, "file_number_hi": z0 + shape[2],
        "voxels": 500 if present else 0, "margin_mm": 0.0,
        "spacing_x": 1.0, "spacing_y": 1.0, "spacing_z": 1.0,
        "fold": -1, "stage1_run": "fixture", "qc_status": "ok" if present else "absent",
    }


def make_crops_for_dataset(data_root: Path, work: Path, shape: tuple[int, int, int] = (16, 16, 12),
                           seed: int = 0, skip_test: int = 1) -> Path:
    """A stage-1-less manifest for an existing RSNA-layout dataset (e.g. the ``tiny`` preset).

    Train crops follow the dataset's train.csv labels; test studies get unlabelled crops, except
    the last ``skip_test`` test studies, which are left out of the manifest (as if stage 1 had
    failed on them). Returns the manifest path.
    """
    from common.dataset import RSNADataset

    rng = np.random.default_rng(seed)
    ds = RSNADataset(data_root)
    labels = ds.labels.set_index(UID)
    test = ds.listed_test_uids()
    studies = [(u, "train") for u in labels.index] + \
        [(u, "test") for u in test[: len(test) - skip_test]]
    crops_dir = work / "stage1" / "crops"
    rows = []
    for s, (uid, split) in enumerate(studies):
        for j, v in enumerate(VERTEBRAE):
            frac = split == "train" and bool(labels.at[uid, v])
            rows.append(_manifest_row(uid, split, v, True, shape, s, j))
            save_npz(crops_dir / rows[-1]["crop_path"], **dict(zip(
                ("image", "mask", "affine"), make_crop(v, frac, shape, rng))))
    manifest = crops_dir / "vertebrae.csv"
    write_csv(manifest, pd.DataFrame(rows, columns=list(COLUMNS)))
    return manifest
