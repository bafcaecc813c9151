"""RSNA-layout index: tiny CSVs and folders in tmp_path, including every mismatch case."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.dataset import DatasetError, RSNADataset, load_exclusions
from common.labels import TARGETS

P = "1.2.826.0.1.3680043."
HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"


def _layout(root: Path, *, train: dict[str, str] | None = None, train_folders=(), test_folders=(),
            test_csv: list[str] | None = None, masks=(), boxes: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if train is not None:
        (root / "train.csv").write_text(HEADER + "".join(f"{u},{row}\n" for u, row in train.items()))
    for sub, uids in (("train_images", train_folders), ("test_images", test_folders)):
        for u in uids:
            (root / sub / u).mkdir(parents=True)
            (root / sub / u / "1.dcm").write_bytes(b"")
    if test_csv is not None:
        (root / "test.csv").write_text("row_id,StudyInstanceUID,prediction_type\n" + "".join(
            f"{u}_C1,{u},C1\n" for u in test_csv))
        (root / "sample_submission.csv").write_text("row_id,fractured\n" + "".join(
            f"{u}_C1,0.5\n" for u in test_csv))
    for name in masks:
        (root / "segmentations").mkdir(exist_ok=True)
        (root / "segmentations" / name).write_bytes(b"")
    if boxes is not None:
        (root / "train_bounding_boxes.csv").write_text(
            "StudyInstanceUID,x,y,width,height,slice_number\n" + boxes)
    return root


@pytest.fixture
def ds(tmp_path) -> RSNADataset:
    root = _layout(
        tmp_path / "data",
        train={P + "1": "1,1,0,0,0,0,0,0", P + "2": "0,0,0,0,0,0,0,0", P + "3": "1,0,0,0,0,0,0,1"},
        train_folders=[P + "1", P + "2", P + "99"],  # 3 has no folder, 99 no label
        test_folders=[P + "500", P + "501"],
        test_csv=[P + "500", P + "600"],  # 600 listed without folder, 501 folder not listed
        masks=[P + "1.nii", P + "2.nii.gz", P + "77.nii"],
        boxes=f"{P}1,10.5,20,30,40,101\n{P}1,11,21,31,41,102\n{P}3,1,2,3,4,7\n{P}88,1,2,3,4,5\n",
    )
    return RSNADataset(root)


def test_labels_and_uids(ds):
    assert ds.labels["StudyInstanceUID"].map(type).eq(str).all()
    assert list(ds.labels.columns[1:]) == ["patient_overall", *TARGETS[:-1]]
    assert ds.train_uids() == [P + "1", P + "2"]
    assert ds.test_uids() == [P + "500", P + "501"]
    assert ds.study_dir(P + "1") == ds.root / "train_images" / (P + "1")
    assert ds.study_dir(P + "501") == ds.root / "test_images" / (P + "501")
    with pytest.raises(DatasetError, match=P + "3"):
        ds.study_dir(P + "3")


def test_masks_and_boxes(ds):
    assert ds.mask_path(P + "1").name == P + "1.nii"
    assert ds.mask_path(P + "2").name == P + "2.nii.gz"
    assert ds.mask_path(P + "3") is None
    assert ds.mask_uids() == sorted([P + "1", P + "2", P + "77"])
    b = ds.boxes_for(P + "1")
    assert list(b["slice_number"]) == [101, 102] and b["slice_number"].dtype.kind == "i"
    assert b.loc[0, "x"] == 10.5
    assert ds.boxes_for(P + "2").empty


def test_problems_reported_not_raised(ds):
    kinds = {(p.kind, p.study) for p in ds.problems()}
    assert kinds == {
        ("label_without_folder", P + "3"),
        ("folder_without_label", P + "99"),
        ("mask_without_label", P + "77"),
        ("boxes_without_label", P + "88"),
        ("test_listed_without_folder", P + "600"),
        ("test_folder_not_listed", P + "501"),
    }
    assert all(str(p).startswith(p.kind) for p in ds.problems())


def test_submission_rows_and_prediction_uids(ds):
    assert ds.expected_submission_rows() == [P + "500_C1", P + "600_C1"]
    assert ds.prediction_uids() == [P + "500", P + "600", P + "501"]


def test_summary_counts(ds):
    s = ds.summary()
    assert s["train_labels"] == 3 and s["train_positive"] == 2
    assert s["train_folders"] == 3 and s["train_usable"] == 2
    assert s["test_listed"] == 2 and s["test_folders"] == 2
    assert s["masks"] == 3 and s["box_rows"] == 4 and s["box_studies"] == 3
    assert s["problems"] == 6


def test_missing_files_named_only_when_needed(tmp_path):
    root = _layout(tmp_path / "d", test_folders=[P + "5"])
    ds = RSNADataset(root)
    assert ds.test_uids() == [P + "5"]
    assert ds.expected_submission_rows() == [f"{P}5_{t}" for t in TARGETS]
    assert ds.summary()["train_labels"] == 0
    for what, name in ((lambda: ds.labels, "train.csv"), (ds.train_uids, "train.csv"),
                       (lambda: ds.boxes, "train_bounding_boxes.csv"),
                       (lambda: ds.test_table, "test.csv")):
        with pytest.raises(DatasetError, match=name):
            what()
    with pytest.raises(DatasetError, match="does not exist"):
        RSNADataset(tmp_path / "nope")


def test_train_folders_without_train_csv_is_a_problem(tmp_path):
    ds = RSNADataset(_layout(tmp_path / "d", train_folders=[P + "1"]))
    assert [p.kind for p in ds.problems()] == ["missing_file"]


def test_bad_label_values_rejected(tmp_path):
    ds = RSNADataset(_layout(tmp_path / "d", train={P + "1": "1,2,0,0,0,0,0,0"}))
    with pytest.raises(DatasetError, match="0/1"):
        _ = ds.labels


def test_exclusions_file():
    ex = load_exclusions()
    assert set(ex) == {P + s for s in ("20574", "29952", "8362", "8693", "20756", "23904")}
    assert all(len(reason) > 10 for reason in ex.values())


def test_paths_from_env_with_clear_errors(tmp_path, monkeypatch):
    from common.paths import data_root, folds_path, work_root

    monkeypatch.delenv("CSPINE_DATA", raising=False)
    monkeypatch.delenv("CSPINE_WORK", raising=False)
    with pytest.raises(RuntimeError, match="CSPINE_DATA"):
        data_root()
    monkeypatch.setenv("CSPINE_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$CSPINE_DATA"):
        data_root()
    assert data_root(tmp_path) == tmp_path  # an argument wins over the variable
    monkeypatch.setenv("CSPINE_WORK", str(tmp_path / "w"))
    assert work_root() == tmp_path / "w" and (tmp_path / "w").is_dir()
    assert folds_path() == tmp_path / "w" / "folds.csv"


def test_synthetic_tiny_dataset_end_to_end(tiny_data, tmp_path, capsys):
    """The synthetic RSNA layout: indexed without problems; boxes name existing files; folds and a
    prior submission score through the CLI."""
    import pandas as pd

    from common.folds import ensure_folds
    from common.metric import baseline_prevalence, constant_prediction, wide_to_submission
    from cspine.cli import main

    ds = RSNADataset(tiny_data)
    assert ds.problems() == []
    s = ds.summary()
    assert s["train_usable"] == s["train_labels"] > 0 and s["test_folders"] > 0
    for uid, numbers in ds.boxes.groupby("StudyInstanceUID")["slice_number"]:
        assert all((ds.study_dir(uid) / f"{n}.dcm").is_file() for n in numbers), uid
    folds = ensure_folds(ds.labels, tmp_path / "folds.csv", n_folds=3)
    assert sorted(folds["StudyInstanceUID"]) == ds.train_uids()
    sub = tmp_path / "sub.csv"
    prior = constant_prediction(ds.train_uids(), baseline_prevalence(ds.labels))
    wide_to_submission(prior).to_csv(sub, index=False)
    assert main(["score", str(tiny_data / "train.csv"), str(sub)]) == 0
    assert "competition_loss (study)" in capsys.readouterr().out
    assert len(pd.read_csv(sub)) == 8 * len(ds.train_uids())
