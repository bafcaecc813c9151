"""``cspine predict`` and ``cspine export-bundle`` on a synthetic study, the real
TotalSegmentator CT (DICOM and NIfTI) and bad inputs.

The models come from a real (very short) training run through the stages' own entry points on
the ``tiny`` preset (session fixture ``trained_work``): what they predict does not matter here;
the outputs' presence, geometry and atomicity do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from e2e_fixtures import ANATOMY_OFF, trained_run

from common.labels import TARGETS
from cspine.cli import main as cspine_main


@pytest.fixture(scope="session")
def trained_work(tiny_data, tmp_path_factory) -> Path:
    """WORK of a few-step run of both stages on ``tiny`` (shared, see e2e_fixtures)."""
    return trained_run(tiny_data, tmp_path_factory)


def _check_outputs(out: Path, ct_affine: np.ndarray, ct_shape: tuple[int, ...]) -> dict:
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["probabilities.json", "vertebrae_mask.nii.gz", "overview.png"])
    doc = json.loads((out / "probabilities.json").read_text())
    probs = doc["probabilities"]
    assert list(probs) == list(TARGETS)
    assert all(0.0 <= probs[t] <= 1.0 for t in TARGETS)
    assert {"total", "stage1", "stage2", "load_input"} <= set(doc["timing_s"])
    assert doc["versions"]["torch"]
    img = nib.load(out / "vertebrae_mask.nii.gz")
    assert img.shape == tuple(ct_shape) and img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, ct_affine, atol=1e-4)
    assert np.allclose(img.get_qform(), img.get_sform(), atol=1e-4)
    assert set(np.unique(np.asarray(img.dataobj))) <= set(range(8))
    png = (out / "overview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    return doc


def test_predict_synthetic_study(trained_work, tiny_data, tmp_path, capsys):
    from common.dicom_io import load_series

    study = sorted((tiny_data / "test_images").iterdir())[0]
    out = tmp_path / "pred"
    assert cspine_main(["predict", str(study), "--out", str(out), "--work", str(trained_work),
                        "--threshold", "0.0", "--threads", "1", "--saliency", *ANATOMY_OFF]) == 0
    printed = capsys.readouterr().out
    assert "time:" in printed and "patient_overall=" in printed
    volume = load_series(study)
    doc = _check_outputs(out, volume.affine, volume.shape)
    assert doc["study"] == study.name and doc["patient_overall_rule"] == "stacker"
    # threshold 0: every vertebra stage 1 found is flagged (one axial panel each)
    assert doc["flagged"] == [v for v in doc["probabilities"] if v != "patient_overall"]
    # the axial slice of each flagged vertebra with a crop is its saliency maximum, inside the CT
    points = doc["overview"]["axial_points_mm"]
    assert set(points) == set(doc["vertebrae_found"])
    from common import geometry

    for p in points.values():
        k = geometry.world_to_voxel(volume.affine, np.asarray([p]))[0][2]
        assert -0.5 <= k <= volume.shape[2] - 0.5
    # the mask written in CT geometry equals stage 1's own CT-grid inference
    from stage1_segment.inference import load_model, segment_volume

    model = load_model(doc["models"]["stage1"])
    mask = np.asarray(nib.load(out / "vertebrae_mask.nii.gz").dataobj)
    assert np.array_equal(mask, segment_volume(model, volume))
    # a second run into the same folder replaces the outputs and leaves no temp folder;
    # without --saliency the flagged vertebrae show their centre slices
    assert cspine_main(["predict", str(study), "--out", str(out), "--work",
                        str(trained_work), "--threshold", "0.0", *ANATOMY_OFF]) == 0
    again = json.loads((out / "probabilities.json").read_text())
    assert again["overview"]["axial_points_mm"] == {}
    assert again["probabilities"] == doc["probabilities"]
    assert [p.name for p in tmp_path.iterdir()] == ["pred"]


def test_export_bundle_then_predict(trained_work, tiny_data, tmp_path):
    bundle = tmp_path / "bundle"
    assert cspine_main(["export-bundle", str(trained_work), str(bundle)]) == 0
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["stage2"] == ["stage2_fold0.ckpt", "stage2_fold1.ckpt"]
    assert meta["crops"]["shape"] == [16, 16, 12] and meta["stacker"] == "stacker.json"
    moved = tmp_path / "elsewhere"
    shutil.move(bundle, moved)  # a bundle is self-contained
    study = sorted((tiny_data / "test_images").iterdir())[-1]
    out = tmp_path / "pred"
    assert cspine_main(["predict", str(study), "--out", str(out), "--bundle", str(moved)]) == 0
    doc = json.loads((out / "probabilities.json").read_text())
    assert doc["models"]["source"] == str(moved)


def test_predict_real_totalsegmentator_dicom(trained_work, realdata, tmp_path):
    """A real J2K CT series (20 slices, empty SOPClassUID): runs, outputs in the CT's geometry."""
    from common.dicom_io import load_series

    study = realdata / "totalsegmentator" / "example_ct_dicom"
    out = tmp_path / "ts"
    assert cspine_main(["predict", str(study), "--out", str(out), "--work",
                        str(trained_work)]) == 0
    volume = load_series(study)
    assert volume.shape == (512, 512, 20)
    _check_outputs(out, volume.affine, volume.shape)


def test_predict_real_nifti_ct(trained_work, realdata, tmp_path):
    """A NIfTI CT keeps its own (RAS) geometry in the output mask."""
    path = realdata / "totalsegmentator" / "example_ct_sm.nii.gz"
    img = nib.load(path)
    out = tmp_path / "nii"
    assert cspine_main(["predict", str(path), "--out", str(out), "--work",
                        str(trained_work)]) == 0
    doc = _check_outputs(out, img.affine, img.shape)
    assert doc["study"] == "example_ct_sm"


@pytest.mark.parametrize("case", ["missing", "not_dicom", "two_series", "truncated",
                                  "text_file", "no_models"])
def test_bad_input_one_line_error(case, trained_work, realdata, tmp_path, capsys):
    study = tmp_path / "study"
    work = trained_work
    if case == "not_dicom":
        study.mkdir()
        (study / "notes.txt").write_text("not an image\n")
    elif case == "two_series":
        study.mkdir()
        for src in ("totalsegmentator/example_ct_dicom", "pydicom/dicomdirtests_98892001_CT5N"):
            for f in sorted((realdata / src).iterdir())[:3]:
                shutil.copy(f, study / f"{src.split('/')[0]}_{f.name}")
    elif case == "truncated":
        shutil.copytree(realdata / "totalsegmentator" / "example_ct_dicom", study)
        victim = sorted(study.iterdir())[5]
        data = victim.read_bytes()
        victim.write_bytes(data[:len(data) // 2])
    elif case == "text_file":
        study = tmp_path / "scan.txt"
        study.write_text("hello\n")
    elif case == "no_models":
        study = realdata / "totalsegmentator" / "example_ct_dicom"
        work = tmp_path / "empty_work"
        work.mkdir()
    out = tmp_path / "out"
    assert cspine_main(["predict", str(study), "--out", str(out), "--work", str(work)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("cspine predict: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1]  # (a C decoder may print before it)
    err = errors[0]
    expected = {"missing": "no such file", "not_dicom": "no_images",
                "two_series": "multiple_series", "truncated": "corrupt_file",
                "text_file": "not a study folder", "no_models": "stage-1 model"}[case]
    assert expected in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_predict_uses_the_rule_make_evaluate_scored(tmp_path):
    import json

    from cspine.models import evaluated_rule
    from stage2_classify.aggregate import DEFAULT_RULE

    assert evaluated_rule(tmp_path) == DEFAULT_RULE == "max"  # nothing evaluated yet
    for rule in ("noisy_or", "stacker", "max"):
        (tmp_path / "metrics.json").write_text(json.dumps({"rule": rule}))
        assert evaluated_rule(tmp_path) == rule
    (tmp_path / "metrics.json").write_text(json.dumps({"rule": "median"}))  # not a rule
    assert evaluated_rule(tmp_path) == DEFAULT_RULE
    from cspine.models import ModelSpec

    # a spec that names the stacker but has none to apply falls back to the default rule
    assert ModelSpec(stage1=tmp_path, stage2=[], rule="stacker").rule == DEFAULT_RULE
    assert ModelSpec(stage1=tmp_path, stage2=[], rule="stacker",
                     stacker=tmp_path / "s.json").rule == "stacker"


def test_a_copied_work_uses_its_own_checkpoints(trained_work, tmp_path):
    """run.json records checkpoints relative to the run folder: the models of a copied WORK
    are the copy's files, never the original's (issue 12); older absolute records are mapped
    to the copy's checkpoints/ folder too."""
    from cspine.models import models_from_work

    copy = tmp_path / "copy"
    shutil.copytree(trained_work / "stage1", copy / "stage1")
    shutil.copytree(trained_work / "stage2", copy / "stage2")
    spec = models_from_work(copy)
    for path in [spec.stage1, *spec.stage2]:
        assert Path(path).resolve().is_relative_to(copy.resolve()), path
    run = copy / "stage2" / "fold0" / "run.json"
    doc = json.loads(run.read_text())
    doc["checkpoint"] = str((trained_work / "stage2" / "fold0" / doc["checkpoint"]).resolve())
    run.write_text(json.dumps(doc))
    assert Path(models_from_work(copy).stage2[0]).resolve().is_relative_to(copy.resolve())


def test_predict_dicom_and_cam_outputs(trained_work, tiny_data, tmp_path, capsys):
    """--dicom --cam --cam-nifti on a synthetic study: the SEG lands on the source slices (Dice
    1.0 against the NIfTI mask per vertebra), the SR holds the JSON's eight values, the CAM
    heatmap is in the CT geometry and nonzero only inside the flagged vertebrae's crops; a
    rerun without the options removes the optional files."""
    from seg_check import dice_per_vertebra, seg_back_on_grid

    from common.dicom_io import load_series
    from cspine import dicom_out

    study = sorted((tiny_data / "test_images").iterdir())[1]
    out = tmp_path / "pred"
    assert cspine_main(["predict", str(study), "--out", str(out), "--work", str(trained_work),
                        "--threshold", "0.0", "--threads", "1", "--dicom", "--cam",
                        "--cam-nifti", *ANATOMY_OFF]) == 0
    assert "warning" not in capsys.readouterr().err
    doc = json.loads((out / "probabilities.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(doc["outputs"]) == sorted(
        ["probabilities.json", "vertebrae_mask.nii.gz", "overview.png", "cam_heatmap.nii.gz",
         "vertebrae_seg.dcm", "report_sr.dcm"])
    volume = load_series(study)
    img = nib.load(out / "vertebrae_mask.nii.gz")
    mask = np.asarray(img.dataobj)
    headers = dicom_out.read_source_headers(volume)
    back = seg_back_on_grid(out / "vertebrae_seg.dcm", headers, mask.shape, img.affine)
    dice = dice_per_vertebra(back, mask)
    in_mask = {f"C{i}" for i in np.unique(mask) if 1 <= i <= 7}
    assert len(in_mask) >= 3 and set(dice) == in_mask and all(d == 1.0 for d in dice.values())
    sr = dicom_out.read_sr_probabilities(out / "report_sr.dcm")
    assert sr["probabilities"] == pytest.approx(doc["probabilities"])
    assert sr["flagged"] == doc["flagged"] and sr["study_uid"] == study.name
    assert f"run_id={doc['run_id']}" in sr["parameters"]
    assert "threshold_source=--threshold" in sr["parameters"]
    heat_img = nib.load(out / "cam_heatmap.nii.gz")
    heat = np.asarray(heat_img.dataobj)
    assert heat.shape == volume.shape and np.allclose(heat_img.affine, volume.affine, atol=1e-4)
    # 0..255 = CAM 0..1 per crop; on the CT grid the peak can fall between voxels (< 255)
    assert heat.dtype == np.uint8
    assert doc["cam"]["vertebrae"] == [v for v in doc["flagged"] if v in doc["vertebrae_found"]]
    assert doc["cam"]["layer"] == "net.features.19"  # SmallCNN3d of configs/stage2/cpu.yaml
    # the few-step models may find no positive evidence (an all-zero GradCAM): then the map is
    # empty; where it is not, it lies inside the flagged vertebrae's crops
    assert (heat.max() == 0) == (doc["cam"]["empty"] == doc["cam"]["vertebrae"])
    from common import geometry

    world = geometry.voxel_to_world(volume.affine, np.argwhere(heat > 0))
    near = np.zeros(len(world), bool)
    for v in set(doc["cam"]["vertebrae"]) - set(doc["cam"]["empty"]):
        lo, hi = (np.asarray(doc["boxes"][v][k]) for k in ("mm_lo", "mm_hi"))
        near |= np.all((world >= lo - 15) & (world <= hi + 15), axis=1)
    assert near.all()
    # a rerun without the options leaves exactly the three default outputs
    assert cspine_main(["predict", str(study), "--out", str(out), "--work",
                        str(trained_work)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["probabilities.json", "vertebrae_mask.nii.gz", "overview.png"])


def test_predict_dicom_of_a_nifti_ct_warns_and_writes_the_rest(trained_work, realdata,
                                                              tmp_path, capsys):
    path = realdata / "totalsegmentator" / "example_ct_sm.nii.gz"
    out = tmp_path / "nii"
    assert cspine_main(["predict", str(path), "--out", str(out), "--work", str(trained_work),
                        "--dicom"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("cspine predict: warning:")]
    assert len(warnings) == 1 and "example_ct_sm: no source DICOM" in warnings[0]
    assert "Traceback" not in "\n".join(err)
    img = nib.load(path)
    doc = _check_outputs(out, img.affine, img.shape)
    assert "no source DICOM" in doc["dicom"]["error"]
