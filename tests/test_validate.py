"""``cspine validate``: operating points from OOF rows applied unchanged, recalibration held
apart from its scoring rows, the CSV input form, unreadable studies listed, subgroups from the
DICOM headers of a synthetic "other site", resume, and the page in a real browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import check_page
from e2e_fixtures import trained_run

from common import stats
from common.labels import OVERALL, TARGETS, VERTEBRAE
from cspine import val_stats

UID = "StudyInstanceUID"


def _frame(n: int, seed: int, signal: float = 0.4) -> pd.DataFrame:
    """A predictions.csv-like frame: random labels, scores that carry some signal."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 7)) < 0.2).astype(int)
    p = np.clip(signal * y + (1 - signal) * rng.random((n, 7)), 0.001, 0.999)
    f = pd.DataFrame(y, columns=list(VERTEBRAE))
    f[OVERALL] = y.max(axis=1)
    for j, v in enumerate(VERTEBRAE):
        f[f"p_{v}"] = p[:, j]
    f[f"p_{OVERALL}"] = p.max(axis=1)
    f[UID] = [f"1.2.{seed}.{i}" for i in range(n)]
    f["status"], f["reason"], f["path"] = "ok", "", ""
    return f


def _fake_evaluated_work(tmp_path: Path) -> tuple[Path, Path]:
    """A WORK with two OOF fold files and a DATA with train.csv; returns (work, data)."""
    oof = _frame(120, seed=1)
    data, work = tmp_path / "data", tmp_path / "work"
    (work / "stage2" / "oof").mkdir(parents=True)
    data.mkdir()
    labels = oof[[UID, OVERALL, *VERTEBRAE]]
    labels.to_csv(data / "train.csv", index=False)
    wide = oof[[UID]].copy()
    for t in TARGETS:
        wide[t] = oof[f"p_{t}"]
    wide["fold"] = np.arange(len(oof)) % 2
    for k in (0, 1):
        wide[wide["fold"] == k].to_csv(work / "stage2" / "oof" / f"fold{k}.csv", index=False)
    wide[[UID, "fold"]].to_csv(work / "folds.csv", index=False)
    return work, data


def test_operating_points_are_chosen_on_oof_rows_and_applied_unchanged(tmp_path):
    from stage2_classify.evaluate import evaluate

    work, data = _fake_evaluated_work(tmp_path)
    evaluate(work, data, rule="max")
    points = val_stats.oof_points(work)
    oof = pd.read_csv(work / "oof.csv")
    labels = pd.read_csv(data / "train.csv").set_index(UID).loc[oof[UID]]
    for group, cols in (("patient_overall", [OVERALL]), ("vertebrae", list(VERTEBRAE))):
        expect = stats.choose_thresholds(labels[cols].to_numpy(), oof[cols].to_numpy())
        assert points[group] == expect  # recorded from the OOF rows of the chosen rule
    site = _frame(80, seed=7, signal=0.2)  # another site: the same thresholds are used
    m = val_stats.validation_metrics(site, points, "sens90", prevalence=0.05, replicates=200)
    for name, pt in m["operating_points"][OVERALL].items():
        t = points[OVERALL][name]["threshold"]
        assert pt["threshold"] == t
        y, p = site[OVERALL].to_numpy(), site[f"p_{OVERALL}"].to_numpy()
        assert pt["site"]["tp"] == int(((p >= t) & (y == 1)).sum())
        assert pt["site"]["fp"] == int(((p >= t) & (y == 0)).sum())
    site_own = stats.choose_thresholds(site[OVERALL], site[f"p_{OVERALL}"])
    assert site_own["sens90"]["threshold"] != points[OVERALL]["sens90"]["threshold"]


def test_missing_operating_points_name_the_fix(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"rule": "max"}))
    with pytest.raises(ValueError, match="make evaluate"):
        val_stats.oof_points(tmp_path)


def test_recalibration_never_sees_its_scoring_rows():
    frame = _frame(100, seed=3)
    a = val_stats.recalibration(frame, 0.5, replicates=100, seed=5)
    fit, rep = set(a["fit_studies"]), set(a["report_studies"])
    assert not fit & rep and len(fit) + len(rep) == 100
    # changing the report rows (labels and scores) leaves the fitted maps unchanged
    other = frame.copy()
    sel = other[UID].isin(rep)
    other.loc[sel, f"p_{OVERALL}"] = other.loc[sel, f"p_{OVERALL}"] ** 3
    other.loc[sel, OVERALL] = 1 - other.loc[sel, OVERALL]
    b = val_stats.recalibration(other, 0.5, replicates=100, seed=5)
    for g in ("patient_overall", "vertebrae"):
        assert a["groups"][g]["a"] == b["groups"][g]["a"]
        assert a["groups"][g]["b"] == b["groups"][g]["b"]
    assert a["groups"][OVERALL]["ece_before"] != b["groups"][OVERALL]["ece_before"]
    # changing a fitting row changes the map
    other = frame.copy()
    sel = other[UID].isin(fit)
    other.loc[sel, f"p_{OVERALL}"] = other.loc[sel, f"p_{OVERALL}"] ** 2
    c = val_stats.recalibration(other, 0.5, replicates=100, seed=5)
    assert c["groups"][OVERALL]["a"] != a["groups"][OVERALL]["a"]


def test_header_groups_bins():
    rec = {"header": {"Manufacturer": "SIEMENS", "PatientAge": "067Y", "PatientSex": "F"},
           "thickness_mm": 2.5}
    g = val_stats.header_groups(rec)
    assert g["manufacturer"] == "SIEMENS" and g["age"] == "65-79 y" and g["sex"] == "female"
    assert g["slice_thickness"] == "2.0-3.0 mm" and g["contrast"] == "none recorded"
    assert val_stats.header_groups({"source": "nifti", "header": {}})["contrast"] == ""


def test_page_check_sees_a_broken_image_and_a_script_error(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><table><tr><td>x</td></tr></table>"
                    "<img alt='gone' src='missing.png'><script>undefinedThing();</script>"
                    "</body></html>")
    seen = check_page(page)
    assert seen.tables == 1
    assert seen.images == [("gone", True, 0)]
    assert any(kind == "pageerror" for kind, _ in seen.errors)


# ---------------------------------------------------------------------- end to end (tiny run)
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A tiny synthetic 'other site': two vendors, two slice thicknesses in two bins."""
    from common.synth import generate

    out = tmp_path_factory.mktemp("site") / "siteb"
    generate(out, preset="tiny", seed=11, site="site-b", slice_thickness_mm=(1.9, 3.5),
             max_slices=80, n_train=8, n_test=0, progress=False, workers=1)
    return out


@pytest.mark.slow
def test_validate_end_to_end_csv_form_subgroups_resume_and_page(site, tiny_data,
                                                                 tmp_path_factory, tmp_path):
    from common.dicom_io import load_series
    from common.nifti_io import save_nifti
    from cspine.cli import main

    work = trained_run(tiny_data, tmp_path_factory)
    labels = pd.read_csv(site / "train.csv", dtype={UID: str})
    uids = labels[UID].tolist()
    # the CSV form: DICOM folders (relative paths), one study as NIfTI, a missing study, and a
    # subgroup column of the site's own
    vol = load_series(site / "train_images" / uids[0])
    save_nifti(tmp_path / "first.nii.gz", vol.hu, vol.affine)
    rows = labels.drop(columns=[UID]).assign(
        study_dir=[f"{site.name}/train_images/{u}" for u in uids], nifti_path="",
        ward=["north", "south"] * 4)
    rows.loc[0, "study_dir"], rows.loc[0, "nifti_path"] = "", str(tmp_path / "first.nii.gz")
    rows = pd.concat([rows, rows.iloc[[1]].assign(study_dir="nowhere/none")], ignore_index=True)
    csv = site.parent / "site.csv"
    rows.to_csv(csv, index=False)
    out = tmp_path / "val"
    args = ["validate", str(csv), "--work", str(work), "--out", str(out), "--jobs", "1",
            "--min-subgroup", "2", "--replicates", "1000", "--recalibrate", "0.5",
            "--no-progress", "--dicom"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_listed"], m["n_scored"], m["n_unreadable"]) == (9, 8, 1)
    assert m["unreadable"][0]["reason"] == "no_images" and m["unreadable"][0]["path"]
    pred = pd.read_csv(out / "predictions.csv", dtype={UID: str}, keep_default_na=False)
    assert len(pred) == 9 and (pred["status"] == "unreadable").sum() == 1
    assert pred.loc[0, UID] == "first" and pred.loc[0, "status"] == "ok"
    # the few-step models segment at random: the anatomy check flags studies, and the metrics
    # count them (their probabilities are the prior, as the pipeline reports them)
    flagged = int((pred["anatomy"] == "implausible_segmentation").sum())
    assert m["n_implausible"] == flagged and flagged > 0
    # subgroups from the headers: two vendors, two thickness bins, and the CSV's column
    sub = m["subgroups"]
    vendors = {r["value"]: r["n"] for r in sub["manufacturer"]}
    assert vendors.get("GE MEDICAL SYSTEMS", 0) + vendors.get("SIEMENS", 0) == 7
    assert vendors["not recorded"] == 1  # the NIfTI study has no header
    bins = {r["value"] for r in sub["slice_thickness"]}
    assert {"1.0-2.0 mm", "> 3.0 mm"} <= bins
    assert {r["value"] for r in sub["ward"]} == {"north", "south"}
    small = [r for r in sub["manufacturer"] if r["n"] < 2]
    assert all("auc_overall" not in r and "note" in r for r in small)
    assert m["bootstrap"]["replicates"] == 1000
    assert set(m["recalibration"]["fit_studies"]).isdisjoint(m["recalibration"]["report_studies"])
    assert (out / "overviews" / f"{uids[1]}.png").is_file()
    # --dicom: the SR (and the SEG where stage 1 found a vertebra) per DICOM study; the NIfTI
    # study has no source DICOM: a warning in its record, its other outputs written
    assert (out / "dicom" / uids[1] / "report_sr.dcm").is_file()
    from cspine import dicom_out

    sr = dicom_out.read_sr_probabilities(out / "dicom" / uids[1] / "report_sr.dcm")
    assert sr["probabilities"] == pytest.approx(
        pred.set_index(UID).loc[uids[1], [f"p_{t}" for t in sr["probabilities"]]].astype(float)
        .rename(lambda c: c[2:]).to_dict())
    first = json.loads(next((out / "records").glob("*/first.json")).read_text())
    assert "no source DICOM" in first["dicom"]["error"] and first["warnings"]
    # a rerun skips every finished study
    assert main(args) == 0
    qc = pd.read_csv(out / "qc.csv", keep_default_na=False)
    assert (qc.loc[qc["status"] == "ok", "volume"] == "done").all()
    # the page in a real browser: tables, every image loaded, no console errors
    seen = check_page(out / "index.html")
    assert seen.errors == [] and seen.failed_requests == []
    assert seen.tables >= 8 and seen.images and all(ok and w > 0 for _, ok, w in seen.images)
    for h in ("1. Studies", "2. Discrimination", "3. Operating points", "4. Calibration",
              "5. Subgroups", "7. Error review"):
        assert any(x.startswith(h) for x in seen.headings), seen.headings
    errs = m["errors"]["false_negatives"] + m["errors"]["false_positives"]
    assert sum(1 for a, _, _ in seen.images if a.startswith("overview")) == len(errs)


@pytest.mark.slow
def test_validate_compare_two_runs_on_the_same_studies(site, tiny_data, tmp_path_factory,
                                                       tmp_path):
    from cspine.validate import validate

    work = trained_run(tiny_data, tmp_path_factory)
    m = validate(site, work, out=tmp_path / "cmp", compare=work, replicates=1000, jobs=1,
                 progress=False)
    c = m["compare"]
    assert c["n_studies"] == m["n_scored"] == 8
    for key in ("auc_overall", "comp_loss"):  # the same models: the difference is exactly 0
        assert c[key]["value"] == 0 or c[key]["value"] is None
    assert c["comp_loss"]["ci_low"] == 0 and c["comp_loss"]["ci_high"] == 0


def test_site_profile_headers_are_written_and_read_during_loading(site):
    import pydicom

    from common.dicom_io import load_series
    from common.synth import make_config

    studies = pd.read_csv(site / "_synth_truth" / "studies.csv")
    assert set(studies["Manufacturer"]) == {"GE MEDICAL SYSTEMS", "SIEMENS"}
    assert set(studies["thickness"]) == {1.9, 3.5}
    folder = next((site / "train_images").iterdir())
    header = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    vol = load_series(folder)
    assert vol.qc["header"]["Manufacturer"] == header.Manufacturer
    assert vol.qc["header"]["ConvolutionKernel"] == header.ConvolutionKernel
    assert vol.qc["header"]["PatientSex"] in ("M", "F") and vol.qc["header"]["PatientAge"]
    assert float(header.SliceThickness) == pytest.approx(vol.qc["step_mm"], abs=1e-3)
    # a config without a site keeps the identity (and so the bytes) it had before site options
    assert not {"site", "manufacturers", "hu_offset"} & set(make_config("tiny").identity())
    with pytest.raises(ValueError, match="unknown site"):
        make_config("tiny", site="nowhere")


def test_metrics_of_a_tiny_one_class_set_say_undefined_instead_of_failing():
    frame = _frame(3, seed=2)
    frame[list(TARGETS)] = 0
    points = {OVERALL: {"sens90": {"threshold": 0.5, "sensitivity": 0.9, "specificity": 0.8}},
              "vertebrae": {"sens90": {"threshold": 0.3, "sensitivity": 0.9,
                                       "specificity": 0.7}}}
    frame.loc[2, "status"], frame.loc[2, "reason"] = "unreadable", "no_images"
    m = val_stats.validation_metrics(frame, points, "sens90", prevalence=0.05, replicates=50)
    assert (m["n_scored"], m["n_unreadable"]) == (2, 1)
    assert m["auc"][OVERALL]["value"] is None and m["operating_points"][OVERALL]["sens90"][
        "site"]["sensitivity"]["value"] is None
    assert m["calibration"][OVERALL]["curve"]["observed"] == []


def test_bad_inputs_give_one_line_errors_naming_the_fix(tmp_path, capsys):
    from cspine.cli import main
    from cspine.validate import read_dataset

    assert main(["validate", str(tmp_path), "--work", str(tmp_path)]) == 2
    assert "make evaluate" in capsys.readouterr().err
    assert main(["validate", str(tmp_path), "--work", str(tmp_path), "--recalibrate", "2"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("study_dir,C1,C2\nx,0,1\n")
    with pytest.raises(ValueError, match="missing label columns"):
        read_dataset(bad)
    bad.write_text("C1,C2,C3,C4,C5,C6,C7\n0,0,0,0,0,0,0\n")
    with pytest.raises(ValueError, match="study_dir"):
        read_dataset(bad)
    bad.write_text("nifti_path,C1,C2,C3,C4,C5,C6,C7\na.nii.gz,0,2,0,0,0,0,0\n")
    with pytest.raises(ValueError, match="other than 0/1"):
        read_dataset(bad)
    good = tmp_path / "good.csv"
    good.write_text("nifti_path,C1,C2,C3,C4,C5,C6,C7,scanner\nct/a.nii.gz,0,1,0,0,0,0,0,X\n")
    (studies, cols) = read_dataset(good)
    assert cols == ["scanner"] and studies[0].uid == "a"
    assert studies[0].labels[OVERALL] == 1 and studies[0].path == str(tmp_path / "ct/a.nii.gz")
