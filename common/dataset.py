"""Index of a folder in the RSNA 2022 layout (RSNA_FACTS.md §2).

::

    root/
      train.csv                    StudyInstanceUID, patient_overall, C1 … C7 (0/1)
      test.csv                     row_id, StudyInstanceUID, prediction_type
      sample_submission.csv        row_id, fractured
      train_bounding_boxes.csv     StudyInstanceUID, x, y, width, height, slice_number
      train_images/<UID>/<n>.dcm
      test_images/<UID>/<n>.dcm
      segmentations/<UID>.nii[.gz]

Every file is optional until an operation needs it; then a :class:`DatasetError` names the missing
file. Inconsistencies (a label without a folder, a folder without a label, test.csv studies without
a folder) are never fatal: they are collected by :meth:`RSNADataset.problems`.

UIDs are always ``str``. ``slice_number`` in the boxes is the DICOM *file number* ``n`` of
``<n>.dcm`` (= InstanceNumber), not an index into the position-sorted volume; map it through
``Volume.file_numbers``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.labels import TARGETS
from common.tables import read_csv

UID = "StudyInstanceUID"
EXCLUSIONS_CSV = Path(__file__).with_name("exclusions.csv")
BOX_COLUMNS = (UID, "x", "y", "width", "height", "slice_number")


class DatasetError(FileNotFoundError):
    """A file or folder that an operation needs is missing or malformed."""


@dataclass(frozen=True)
class Problem:
    """One inconsistency in the dataset layout (reported, never raised)."""

    kind: str
    study: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.study}: {self.detail}"


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError(f"{path} not found: {what} needs {path.name} in the RSNA-layout folder "
                           f"{path.parent}")
    frame = read_csv(path, dtype={UID: str})
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing} (has {list(frame.columns)})")
    return frame


def _study_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


class RSNADataset:
    """Lazy index of an RSNA-layout folder.

    Args:
        root: the folder holding train.csv, train_images/, … (nothing is read until asked).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist or is not a directory")
        self.train_dir = self.root / "train_images"
        self.test_dir = self.root / "test_images"
        self.seg_dir = self.root / "segmentations"

    def __repr__(self) -> str:
        return f"RSNADataset({str(self.root)!r})"

    # ------------------------------------------------------------------ tables
    @functools.cached_property
    def labels(self) -> pd.DataFrame:
        """train.csv: one row per study, ``StudyInstanceUID`` (str) + TARGETS as int (+ extras)."""
        frame = _read_csv(self.root / "train.csv", (UID, *TARGETS), "the train labels")
        bad = frame[list(TARGETS)].isna().any(axis=1) | ~frame[list(TARGETS)].isin([0, 1]).all(axis=1)
        if bad.any():
            raise DatasetError(f"{self.root / 'train.csv'}: {int(bad.sum())} rows have labels other "
                               f"than 0/1, first study {frame.loc[bad, UID].iloc[0]}")
        dup = frame[UID][frame[UID].duplicated()]
        if len(dup):
            raise DatasetError(f"{self.root / 'train.csv'}: duplicate studies {dup.tolist()[:5]}")
        frame[list(TARGETS)] = frame[list(TARGETS)].astype(int)
        return frame

    @functools.cached_property
    def boxes(self) -> pd.DataFrame:
        """train_bounding_boxes.csv: x, y, width, height in pixels on file ``<slice_number>.dcm``."""
        frame = _read_csv(self.root / "train_bounding_boxes.csv", BOX_COLUMNS, "the bounding boxes")
        frame["slice_number"] = frame["slice_number"].astype(int)
        return frame

    def boxes_for(self, uid: str) -> pd.DataFrame:
        """The boxes of one study (empty frame if it has none); slice_number = DICOM file number."""
        b = self.boxes
        return b[b[UID] == str(uid)].reset_index(drop=True)

    @functools.cached_property
    def test_table(self) -> pd.DataFrame:
        """test.csv: row_id, StudyInstanceUID, prediction_type."""
        return _read_csv(self.root / "test.csv", ("row_id", UID, "prediction_type"), "the test list")

    @functools.cached_property
    def sample_submission(self) -> pd.DataFrame:
        """sample_submission.csv: row_id, fractured."""
        return _read_csv(self.root / "sample_submission.csv", ("row_id", "fractured"),
                         "the submission template")

    # ------------------------------------------------------------------ studies
    @functools.cached_property
    def _train_folders(self) -> list[str]:
        return _study_folders(self.train_dir)

    @functools.cached_property
    def _test_folders(self) -> list[str]:
        return _study_folders(self.test_dir)

    def train_uids(self) -> list[str]:
        """Studies with a train.csv row AND a train_images folder, sorted (needs train.csv)."""
        folders = set(self._train_folders)
        return sorted(u for u in self.labels[UID] if u in folders)

    def test_uids(self) -> list[str]:
        """Studies with a test_images folder, sorted (test.csv is not needed)."""
        return list(self._test_folders)

    def study_dir(self, uid: str) -> Path:
        """The DICOM folder of ``uid`` under train_images/ or test_images/.

        Raises:
            DatasetError: neither folder exists.
        """
        for base in (self.train_dir, self.test_dir):
            path = base / str(uid)
            if path.is_dir():
                return path
        raise DatasetError(f"study {uid}: no folder in {self.train_dir} or {self.test_dir}")

    def mask_path(self, uid: str) -> Path | None:
        """``segmentations/<UID>.nii`` or ``.nii.gz`` if present, else None."""
        for suffix in (".nii", ".nii.gz"):
            path = self.seg_dir / f"{uid}{suffix}"
            if path.is_file():
                return path
        return None

    def mask_uids(self) -> list[str]:
        """Studies with a segmentation file, sorted."""
        if not self.seg_dir.is_dir():
            return []
        names = (e.name for e in os.scandir(self.seg_dir) if e.is_file())
        return sorted({n[: -len(s)] for n in names for s in (".nii.gz", ".nii") if n.endswith(s)})

    def listed_test_uids(self) -> list[str]:
        """Studies named by test.csv (else by sample_submission.csv row_ids), in file order."""
        if (self.root / "test.csv").is_file():
            return list(dict.fromkeys(self.test_table[UID].astype(str)))
        if (self.root / "sample_submission.csv").is_file():
            ids = self.sample_submission["row_id"].astype(str).str.split("_", n=1).str[0]
            return list(dict.fromkeys(ids))
        return []

    def prediction_uids(self) -> list[str]:
        """Every study a predict run must produce: listed test studies, then unlisted folders.

        A listed study without a folder still needs its rows (it gets the prior at submission time).
        """
        listed = self.listed_test_uids()
        seen = set(listed)
        return listed + [u for u in self.test_uids() if u not in seen]

    def expected_submission_rows(self) -> list[str]:
        """The row_ids the scorer expects, in file order.

        test.csv's ``row_id`` column if present, else sample_submission.csv's; with neither, 8 rows
        (TARGETS order) for each test_images folder.
        """
        if (self.root / "test.csv").is_file():
            return self.test_table["row_id"].astype(str).tolist()
        if (self.root / "sample_submission.csv").is_file():
            return self.sample_submission["row_id"].astype(str).tolist()
        return [f"{u}_{t}" for u in self.test_uids() for t in TARGETS]

    # ------------------------------------------------------------------ census
    def problems(self) -> list[Problem]:
        """Layout inconsistencies, each as a :class:`Problem` (never raises for them)."""
        out: list[Problem] = []
        folders = set(self._train_folders)
        if (self.root / "train.csv").is_file():
            labelled = set(self.labels[UID])
            out += [Problem("label_without_folder", u, f"in train.csv, no {self.train_dir / u}")
                    for u in sorted(labelled - folders)]
            out += [Problem("folder_without_label", u, f"{self.train_dir / u} not in train.csv")
                    for u in sorted(folders - labelled)]
            for u in self.mask_uids():
                if u not in labelled:
                    out.append(Problem("mask_without_label", u, "segmentation not in train.csv"))
            if (self.root / "train_bounding_boxes.csv").is_file():
                out += [Problem("boxes_without_label", u, "in train_bounding_boxes.csv only")
                        for u in sorted(set(self.boxes[UID]) - labelled)]
        elif folders:
            out.append(Problem("missing_file", "-", f"{self.root / 'train.csv'} not found; "
                                                    f"{len(folders)} train folders unlabelled"))
        if (self.root / "test.csv").is_file():
            test_folders = set(self._test_folders)
            listed = list(dict.fromkeys(self.test_table[UID].astype(str)))
            out += [Problem("test_listed_without_folder", u,
                            "in test.csv, no test_images folder; predicted with the prior")
                    for u in listed if u not in test_folders]
            out += [Problem("test_folder_not_listed", u, "test_images folder not in test.csv; "
                                                         "predicted anyway")
                    for u in sorted(test_folders - set(listed))]
        return out

    def summary(self) -> dict[str, int]:
        """Counts for the data census (studies, folders, masks, boxes, problems)."""
        has = {name: (self.root / name).is_file() for name in
               ("train.csv", "test.csv", "sample_submission.csv", "train_bounding_boxes.csv")}
        out = {
            "train_labels": len(self.labels) if has["train.csv"] else 0,
            "train_positive": int(self.labels["patient_overall"].sum()) if has["train.csv"] else 0,
            "train_folders": len(self._train_folders),
            "train_usable": len(self.train_uids()) if has["train.csv"] else 0,
            "test_listed": int(self.test_table[UID].nunique()) if has["test.csv"] else 0,
            "test_folders": len(self._test_folders),
            "masks": len(self.mask_uids()),
            "box_rows": len(self.boxes) if has["train_bounding_boxes.csv"] else 0,
            "box_studies": int(self.boxes[UID].nunique()) if has["train_bounding_boxes.csv"] else 0,
            "submission_rows": len(self.expected_submission_rows()),
            "problems": len(self.problems()),
        }
        return out


def load_exclusions(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Known bad studies and why (``common/exclusions.csv`` by default): ``{uid: reason}``.

    Training may drop these through its config; prediction never drops a study.
    """
    frame = _read_csv(Path(path) if path is not None else EXCLUSIONS_CSV, (UID, "reason"),
                      "the exclusion list")
    return dict(zip(frame[UID].astype(str), frame["reason"].astype(str)))
