"""The anatomy check of stage-1 output (stage1_segment/anatomy.py) and what the engine does with
a study that fails it (issue 16): C1..C7 in order down one column, adult sizes, on bone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from e2e_fixtures import trained_run

from common.labels import TARGETS, VERTEBRAE
from stage1_segment.anatomy import STATUS_IMPLAUSIBLE, STATUS_OFF, STATUS_OK, AnatomyLimits, check_anatomy

REPO = Path(__file__).resolve().parents[1]


def _spine(shape=(100, 100, 190)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A plausible spine on a 1-mm RAS grid: seven 40 x 36 x 18 mm bone blocks, 24 mm apart,
    C1 at the top (largest S). Returns (labels uint8, hu int16, affine)."""
    labels = np.zeros(shape, np.uint8)
    hu = np.full(shape, 30, np.int16)  # soft tissue
    for i in range(7):
        top = shape[2] - 12 - 24 * i
        labels[30:70, 32:68, top - 18:top] = i + 1
    hu[labels > 0] = 400
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-50.0, -50.0, -100.0)
    return labels, hu, affine


def _reasons(labels, hu, affine, limits: AnatomyLimits | None = None) -> list[str]:
    return check_anatomy(labels, affine, hu, affine, limits or AnatomyLimits())["reasons"]


def test_a_plausible_spine_passes():
    labels, hu, affine = _spine()
    rec = check_anatomy(labels, affine, hu, affine)
    assert rec["status"] == STATUS_OK and rec["reasons"] == []
    c3 = rec["vertebrae"]["C3"]
    assert c3["volume_ml"] == pytest.approx(40 * 36 * 18 / 1000)
    assert c3["extent_mm"] == [40.0, 36.0, 18.0] and c3["bone_fraction"] == 1.0
    assert rec["vertebrae"]["C1"]["centroid_mm"][2] > rec["vertebrae"]["C7"]["centroid_mm"][2]


def test_the_check_reads_patient_space_not_the_array():
    """The same spine stored upside down (a flipped S axis in the affine) still passes, and the
    same array read with C1 at the bottom fails."""
    labels, hu, affine = _spine()
    flipped = labels[:, :, ::-1].copy()
    hu_f = hu[:, :, ::-1].copy()
    aff_f = affine.copy()
    aff_f[2, 2] = -1.0
    aff_f[2, 3] = affine[2, 3] + labels.shape[2] - 1
    assert _reasons(flipped, hu_f, aff_f) == []
    assert any(r.startswith("order:") for r in _reasons(flipped, hu_f, affine))


@pytest.mark.parametrize("case, check", [
    ("swap_c1_c7", "order:"), ("shoulder", "column:"), ("no_c4", "missing:C4 between C3 and C5"),
    ("huge_c5", "size:C5 volume"), ("c3_on_fat", "bone:C3"), ("one_vertebra", "count:"),
    ("tiny_c2", "size:C2 volume"), ("far_c7", "missing:")])
def test_each_kind_of_nonsense_is_named(case, check):
    labels, hu, affine = _spine()
    if case == "swap_c1_c7":
        c1, c7 = labels == 1, labels == 7
        labels[c1], labels[c7] = 7, 1
    elif case == "shoulder":  # C6 and C7 moved 40 mm to the side, as onto a shoulder
        for v in (6, 7):
            sel = labels == v
            labels[sel] = 0
            idx = np.argwhere(sel)
            idx[:, 0] = np.clip(idx[:, 0] - 28, 0, None)
            labels[tuple(idx.T)] = v
        hu[:] = 30
        hu[labels > 0] = 400
    elif case == "no_c4":
        labels[labels == 4] = 0
    elif case == "huge_c5":
        z = np.argwhere(labels == 5)[:, 2]
        labels[:, :, z.min():z.max() + 1] = 5
        hu[labels == 5] = 400
    elif case == "c3_on_fat":
        hu[labels == 3] = -90
    elif case == "one_vertebra":
        labels[labels > 1] = 0
    elif case == "tiny_c2":
        idx = np.argwhere(labels == 2)
        keep = (idx[:, 0] < 38) & (idx[:, 1] < 40) & (idx[:, 2] < idx[:, 2].min() + 4)
        labels[labels == 2] = 0
        labels[tuple(idx[keep].T)] = 2
    elif case == "far_c7":  # C7 12 mm lower: an 18-mm gap
        sel = labels == 7
        labels[sel] = 0
        idx = np.argwhere(sel)
        idx[:, 2] -= 12
        labels[tuple(idx.T)] = 7
        hu[labels == 7] = 400
    rec = check_anatomy(labels, affine, hu, affine)
    assert rec["status"] == STATUS_IMPLAUSIBLE
    assert any(r.startswith(check) for r in rec["reasons"]), rec["reasons"]


def test_a_vertebra_cut_by_the_scan_is_not_held_to_the_lower_limits():
    labels, hu, affine = _spine()
    z = np.argwhere(labels == 7)[:, 2]
    labels[:, :, : z.min() + 15] = 0  # only 3 mm of C7 at the bottom of the scan
    labels = labels[:, :, z.min() + 15:]
    hu = hu[:, :, z.min() + 15:]
    assert check_anatomy(labels, affine, hu, affine)["vertebrae"]["C7"]["cut"]
    assert _reasons(labels, hu, affine) == []


def test_limits_are_configurable_and_checked(tmp_path):
    labels, hu, affine = _spine()
    assert _reasons(labels, hu, affine, AnatomyLimits(max_volume_ml=20.0))  # 25.9 mL blocks
    off = check_anatomy(labels, affine, hu, affine, AnatomyLimits(check=False, min_found=9))
    assert off["status"] == STATUS_OFF and off["reasons"] == []
    f = tmp_path / "limits.yaml"
    f.write_text("max_axial_step_mm: 10\nmin_extent_mm: [1, 2, 3]\n")
    limits = AnatomyLimits.from_file(f)
    assert limits.max_axial_step_mm == 10.0 and limits.min_extent_mm == (1.0, 2.0, 3.0)
    for text, message in [("max_volme_ml: 3\n", "unknown limit(s) max_volme_ml"),
                          ("min_extent_mm: 4\n", "min_extent_mm must be like"),
                          ("check: maybe\n", "check must be like"), ("- 1\n", "a mapping")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            AnatomyLimits.from_file(f)


def test_the_synthetic_ground_truth_passes(tiny_data):
    """Every mask of the tiny synthetic set, aligned onto its CT, passes the default check."""
    from common.dicom_io import load_series
    from common.nifti_io import align_mask

    masks = sorted((tiny_data / "segmentations").iterdir())
    assert masks
    for path in masks:
        uid = path.name.split(".nii")[0]
        volume = load_series(tiny_data / "train_images" / uid)
        classes, _ = align_mask(volume, path)
        rec = check_anatomy(classes, volume.affine, volume.hu, volume.affine)
        assert rec["status"] == STATUS_OK, (uid, rec["reasons"])


@pytest.fixture(scope="module")
def trained_work(tiny_data, tmp_path_factory) -> Path:
    return trained_run(tiny_data, tmp_path_factory)


def test_an_implausible_study_gets_the_prior_and_says_so(trained_work, tiny_data, tmp_path,
                                                         capsys):
    """The smoke run's one-epoch segmenter labels at random: with the default check, predict
    and submit report ``implausible_segmentation``, the prior instead of the models' output,
    nothing flagged, and the reason on the terminal and in the QC record."""
    import pandas as pd

    from cspine.cli import main
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work

    study = sorted((tiny_data / "test_images").iterdir())[0]
    assert main(["predict", str(study), "--out", str(tmp_path / "p"), "--work", str(trained_work),
                 "--threshold", "0"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: implausible_segmentation:" in printed
    doc = json.loads((tmp_path / "p" / "probabilities.json").read_text())
    assert doc["anatomy"]["status"] == STATUS_IMPLAUSIBLE and doc["anatomy"]["reasons"]
    assert doc["probabilities_source"] == "prior" and doc["flagged"] == []
    engine = StudyEngine.from_spec(models_from_work(trained_work))
    prior = engine.prior_probabilities()
    assert all(abs(doc["probabilities"][t] - prior[t]) < 1e-9 for t in TARGETS)
    # the models' own output differs from the prior: the check changed the answer
    from common.dicom_io import load_series

    scored = engine.score(engine.run(load_series(study), score=False).crops)
    assert any(abs(scored[t] - prior[t]) > 1e-6 for t in TARGETS)
    assert main(["submit", str(tiny_data), "--work", str(trained_work), "--out",
                 str(tmp_path / "sub.csv"), "--if-worse-than-prior", "go-on"]) == 0
    qc = pd.read_csv(trained_work / "stage2" / "submit_qc.csv")
    row = qc[qc["StudyInstanceUID"] == study.name].iloc[0]
    assert row["status"] == "prior:implausible_segmentation" and row["crops_used"] == 0
    assert row["anatomy"] == STATUS_IMPLAUSIBLE and isinstance(row["anatomy_reasons"], str)


def _demo_run() -> tuple[Path, Path] | None:
    """(WORK, DATA) of a finished `make demo` (env CSPINE_DEMO_WORK / CSPINE_DEMO_DATA, else
    work/demo and data/synth_demo), or None."""
    work = Path(os.environ.get("CSPINE_DEMO_WORK", REPO / "work" / "demo"))
    data = Path(os.environ.get("CSPINE_DEMO_DATA", REPO / "data" / "synth_demo"))
    done = (work / "stage1" / "run.json").is_file() and (work / "metrics.json").is_file()
    return (work, data) if done and (data / "test_images").is_dir() else None


@pytest.mark.slow
def test_demo_models_flag_real_necks_and_pass_their_own_test_studies(realdata):
    """With the demo models (trained on synthetic anatomy), the real head-and-neck CTs of
    openkbp fail the check, while the demo's own test studies pass it."""
    run = _demo_run()
    if run is None:
        pytest.skip("no finished demo run (make demo, or set CSPINE_DEMO_WORK and "
                    "CSPINE_DEMO_DATA)")
    work, data = run
    from common.dicom_io import load_series
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work
    from cspine.predict import load_input

    engine = StudyEngine.from_spec(models_from_work(work))
    for ct in sorted((realdata / "openkbp").glob("pt_*_ct.nii.gz")):
        result = engine.run(load_input(ct))
        assert result.implausible and result.probabilities_source == "prior", ct.name
    studies = sorted((data / "test_images").iterdir())[:6]
    assert studies
    for study in studies:
        result = engine.run(load_series(study), score=False)
        assert result.anatomy["status"] == STATUS_OK, (study.name, result.anatomy["reasons"])
    assert set(VERTEBRAE) >= set(result.found)
