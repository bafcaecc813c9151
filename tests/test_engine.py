"""One study, one path: the batch steps and ``cspine predict`` run the same engine and agree.

The models come from the shared few-step run on the ``tiny`` preset (tests/e2e_fixtures.py):
what they predict does not matter here, only that every path gives the same crops and the same
eight probabilities for the same study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from e2e_fixtures import ANATOMY_OFF, anatomy_off, trained_run

from common import geometry
from common.labels import TARGETS, VERTEBRAE

REPO = Path(__file__).resolve().parents[1]
#: the few-step tiny models may or may not beat the constant prior; these tests are about paths
GO_ON = ["--if-worse-than-prior", "go-on", *ANATOMY_OFF]


@pytest.fixture(scope="session")
def trained_work(tiny_data, tmp_path_factory) -> Path:
    return trained_run(tiny_data, tmp_path_factory)


def _engine(work: Path):
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work

    return StudyEngine.from_spec(models_from_work(work), anatomy_limits=anatomy_off())


def _predict_cli(study: Path, work: Path, out: Path) -> dict:
    from cspine.cli import main

    assert main(["predict", str(study), "--out", str(out), "--work", str(work),
                 *ANATOMY_OFF]) == 0
    return json.loads((out / "probabilities.json").read_text())


def _same_crop(a, b) -> None:
    image, mask, affine = a
    with np.load(b) as z:
        assert np.array_equal(image, z["image"]) and np.array_equal(mask, z["mask"])
        assert np.array_equal(affine, z["affine"])


def test_submit_and_predict_give_the_same_crops_and_probabilities(trained_work, tiny_data,
                                                                  tmp_path):
    from cspine.cli import main
    from cspine.predict import load_input

    out = tmp_path / "submission.csv"
    assert main(["submit", str(tiny_data), "--work", str(trained_work), "--out", str(out),
                 "--jobs", "2", *GO_ON]) == 0
    sub = pd.read_csv(out).set_index("row_id")["fractured"]
    expected = pd.read_csv(tiny_data / "sample_submission.csv")["row_id"].tolist()
    assert sub.index.tolist() == expected
    engine = _engine(trained_work)
    uids = list(dict.fromkeys(r.split("_", 1)[0] for r in expected))
    for uid in uids:
        study = tiny_data / "test_images" / uid
        doc = _predict_cli(study, trained_work, tmp_path / "predict" / uid)
        batch = json.loads((trained_work / "predict" / uid / "probabilities.json").read_text())
        for t in TARGETS:
            assert abs(doc["probabilities"][t] - sub[f"{uid}_{t}"]) < 1e-6, (uid, t)
            assert abs(batch["probabilities"][t] - sub[f"{uid}_{t}"]) < 1e-6, (uid, t)
        assert doc["boxes"] == batch["boxes"] and doc["vertebrae_found"] == batch["vertebrae_found"]
        # the crops `cspine predict` scores (engine on the volume as predict loads it) are the
        # crops the batch wrote
        result = engine.run(load_input(study))
        for v in VERTEBRAE:
            path = trained_work / "predict" / uid / "crops" / f"{v}.npz"
            assert (result.crops[v] is None) == (not path.exists()), (uid, v)
            if result.crops[v] is not None:
                _same_crop(result.crops[v], path)


def test_training_crops_are_the_engine_crops(trained_work, tiny_data):
    """``make crops`` (stage-1 part over the train studies) cut exactly what the engine cuts."""
    from common.manifest import read_manifest
    from cspine.predict import load_input

    manifest = read_manifest(trained_work / "stage1" / "crops" / "vertebrae.csv")
    assert set(manifest["split"]) == {"train"}
    engine = _engine(trained_work)
    for uid in manifest["study_uid"].unique()[:3]:
        result = engine.run(load_input(tiny_data / "train_images" / uid), score=False)
        rows = manifest[manifest["study_uid"] == uid].set_index("vertebra")
        for v in VERTEBRAE:
            assert bool(rows.at[v, "present"]) == (result.crops[v] is not None), (uid, v)
            if result.crops[v] is not None:
                _same_crop(result.crops[v], rows.at[v, "crop_path"])
                assert rows.at[v, "vox_lo_z"] == result.boxes[v]["src_lo"][2]


def test_each_study_is_decoded_once(trained_work, tiny_data):
    """stage-1 prepare decodes the segmented studies (kept in WORK/cache/volumes); crops reads
    them back and decodes only the others; submit decodes the test studies."""
    from cspine.cli import main
    from cspine.summary import decode_counts

    if not (trained_work / "stage2" / "submit_qc.csv").is_file():
        assert main(["submit", str(tiny_data), "--work", str(trained_work), *GO_ON]) == 0
    counts = decode_counts(trained_work)
    prep = pd.read_csv(trained_work / "stage1" / "qc_prepare.csv")
    crops = pd.read_csv(trained_work / "stage1" / "crops" / "qc_crops.csv")
    assert len(prep) and set(crops.loc[crops["study_uid"].isin(prep["study_uid"]),
                                       "volume"]) <= {"cache", "done"}
    n_train = len(pd.read_csv(tiny_data / "train.csv"))
    n_test = pd.read_csv(tiny_data / "sample_submission.csv")["row_id"].str.split("_").str[0].nunique()
    assert len(counts) == n_train + n_test
    assert set(counts.values()) == {1}, counts


def test_box_faces_on_voxel_centres_survive_float32_affines(rsna_meta):
    """Replaying real RSNA geometries: boxes from a float32-rounded grid affine (as a NIfTI
    stores it) equal those from the float64 one, also when faces fall on source voxel centres."""
    from stage1_segment.boxes import vertebra_boxes
    from stage1_segment.prepare import GridSettings

    meta = pd.read_csv(rsna_meta / "meta_train_clean.csv.zip", nrows=120_000)
    rng = np.random.default_rng(0)
    settings = GridSettings(shape=(64, 64, 64))
    checked = 0
    for uid, d in list(meta.groupby("StudyInstanceUID"))[:40]:
        d = d.sort_values("ImagePositionPatient_z")
        z = d["ImagePositionPatient_z"].to_numpy(float)
        if len(z) < 50 or np.ptp(np.diff(z)) > 1e-3:
            continue
        step = float(np.mean(np.diff(z)))
        src = np.diag([-0.5, -0.5, step, 1.0])
        src[:3, 3] = [250.0, 250.0, z[0]]
        shape = (512, 512, len(z))
        grid_affine, grid_shape = settings.grid_for(src, shape)
        labels = np.zeros(grid_shape, np.uint8)
        for i in range(1, 8):  # random boxes on the grid, faces anywhere
            lo = rng.integers(0, 50, 3)
            hi = lo + rng.integers(2, 14, 3)
            labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = i
        a = vertebra_boxes(labels, grid_affine, src, shape)
        b = vertebra_boxes(labels, grid_affine.astype(np.float32).astype(np.float64), src, shape)
        assert {k: v["src_lo"] + v["src_hi"] for k, v in a.items()} == \
            {k: v["src_lo"] + v["src_hi"] for k, v in b.items()}, uid
        checked += 1
    assert checked >= 10
    # a face exactly on a source voxel centre (grid voxel 0.5 below source voxel 10) keeps it
    src = np.eye(4)
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    grid[:3, 3] = 11.0  # grid voxel 0's lower face at 10.0 = source voxel centre 10
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    for aff in (grid, grid + 1e-5, grid - 1e-5):
        aff = aff.copy()
        aff[3] = [0, 0, 0, 1]
        box = vertebra_boxes(labels, aff, src, (40, 40, 40))["C1"]
        assert box["src_lo"] == [10, 10, 10] and box["src_hi"] == [14, 14, 14]


@pytest.mark.slow
@pytest.mark.realdata
def test_long_real_geometry_study_same_in_batch_and_predict(trained_work, tiny_data, rsna_meta,
                                                             tmp_path):
    """A 773-slice study at the real slice positions of RSNA study 9336 (synthetic pixels: a
    tiny test study resampled onto that geometry) gives the same crops and probabilities in
    ``cspine submit`` and ``cspine predict``."""
    from dicom_factory import write_series

    from common.dicom_io import load_series
    from cspine.cli import main

    uid = "1.2.826.0.1.3680043.9336"
    meta = pd.read_csv(rsna_meta / "meta_train_clean.csv.zip",
                       usecols=["StudyInstanceUID", "Slice", "ImagePositionPatient_x",
                                "ImagePositionPatient_y", "ImagePositionPatient_z"])
    d = meta[meta["StudyInstanceUID"] == uid].sort_values("Slice")
    assert len(d) == 773
    src = load_series(next((tiny_data / "test_images").iterdir()))
    # a 96x96 in-plane grid over the synthetic study's field of view, at the real z positions
    lps_origin = geometry.dicom_position_of_slice(src.affine, 0)
    fov = np.asarray(src.shape[:2]) * geometry.spacing_of(src.affine)[:2]
    spacing = float(fov.max() / 96)
    z = d["ImagePositionPatient_z"].to_numpy(float)
    z = z - z.mean() + float(geometry.dicom_position_of_slice(src.affine,
                                                                src.shape[2] // 2)[2])
    pos = np.column_stack([np.full(len(z), lps_origin[0]), np.full(len(z), lps_origin[1]), z])
    step = float(np.ptp(z) / (len(z) - 1))
    dst = geometry.affine_from_dicom([1, 0, 0, 0, 1, 0], (spacing, spacing),
                                     pos[np.argmin(z)], step)
    hu = geometry.resample_to_grid(src.hu.astype(np.float32), src.affine, dst, (96, 96, len(z)),
                                   order=1, cval=-1024.0, dtype=np.float32)
    order = np.argsort(np.argsort(z))  # file i holds sorted slice order[i]
    stored = np.stack([geometry.xyz_slice_to_pixels(hu, int(k)) for k in order])
    data = tmp_path / "data"
    write_series(data / "test_images" / uid, (np.rint(stored) + 1024).astype(np.int16), pos,
                 file_numbers=d["Slice"].tolist(), pixel_spacing=(spacing, spacing),
                 intercept=-1024.0)
    pd.DataFrame({"row_id": [f"{uid}_{t}" for t in TARGETS], "fractured": 0.5}).to_csv(
        data / "sample_submission.csv", index=False)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("stage1", "stage2", "metrics.json"):  # the trained run's models, by link
        os.symlink(trained_work / name, work / name)
    out = tmp_path / "sub.csv"
    assert main(["submit", str(data), "--work", str(work), "--out", str(out), *GO_ON]) == 0
    sub = pd.read_csv(out).set_index("row_id")["fractured"]
    doc = _predict_cli(data / "test_images" / uid, work, tmp_path / "one")
    batch = json.loads((work / "predict" / uid / "probabilities.json").read_text())
    assert batch["ct"]["shape"] == [96, 96, 773]
    for t in TARGETS:
        assert abs(doc["probabilities"][t] - sub[f"{uid}_{t}"]) < 1e-6, t
    assert doc["boxes"] == batch["boxes"]


@pytest.mark.slow
def test_two_shards_give_the_same_submission_as_one_process(trained_work, tiny_data, tmp_path):
    """``cspine submit --shard 0/2`` and ``1/2`` in two processes at once, then a merge, equal
    one process's submission (the form a Slurm array or torchrun runs)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("stage1", "stage2", "metrics.json"):
        os.symlink(trained_work / name, work / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cspine", "submit", str(tiny_data), "--work", str(work),
           "--jobs", "1", *GO_ON]
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        assert "run without --shard" in stdout
    assert not (work / "submission.csv").exists()
    merged = subprocess.run([*cmd, "--out", str(tmp_path / "merged.csv")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-2000:]
    qc = pd.read_csv(work / "stage2" / "submit_qc.csv")
    assert set(qc["volume"]) == {"done"}  # the merge ran no study again
    single = tmp_path / "single"
    single.mkdir()
    for name in ("stage1", "stage2", "metrics.json"):
        os.symlink(trained_work / name, single / name)
    one = subprocess.run([sys.executable, "-m", "cspine", "submit", str(tiny_data), "--work",
                          str(single), "--jobs", "2", *GO_ON], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    a = pd.read_csv(tmp_path / "merged.csv")
    b = pd.read_csv(single / "submission.csv")
    assert a["row_id"].tolist() == b["row_id"].tolist()
    assert np.allclose(a["fractured"], b["fractured"], atol=1e-7, rtol=0)


def test_parse_shard(monkeypatch):
    from cspine.batch import StudyTask, parse_shard, select_shard

    assert parse_shard(None) is None and parse_shard("0/1") is None
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard("auto") == (1, 2)
    tasks = [StudyTask(str(i), "test", "") for i in range(5)]
    assert [t.uid for t in select_shard(tasks, (1, 2))] == ["1", "3"]


def test_submit_on_a_synthetic_set_written_in_the_public_test_csv_shape(trained_work, tmp_path):
    """`cspine synth --test-types C1,patient_overall --test-without-images 2` writes the subset
    shape; submit answers exactly its rows, the two imageless studies on the prior."""
    from common.synth import generate
    from cspine.cli import main

    data = generate(tmp_path / "data", preset="tiny", seed=5, n_train=2, n_test=2,
                    test_types=("C1", "patient_overall"), test_without_images=2, progress=False)
    test = pd.read_csv(data / "test.csv", dtype=str)
    assert set(test["prediction_type"]) == {"C1", "patient_overall"} and len(test) == 8
    folders = {p.name for p in (data / "test_images").iterdir()}
    ghosts = sorted(set(test["StudyInstanceUID"]) - folders)
    assert len(ghosts) == 2
    work = tmp_path / "work"
    work.mkdir()
    for name in ("stage1", "stage2", "metrics.json"):
        os.symlink(trained_work / name, work / name)
    assert main(["submit", str(data), "--work", str(work), *GO_ON]) == 0
    sub = pd.read_csv(work / "submission.csv", dtype={"row_id": str})
    assert sub["row_id"].tolist() == test["row_id"].tolist()
    qc = pd.read_csv(work / "stage2" / "submit_qc.csv").set_index("StudyInstanceUID")
    assert (qc.loc[ghosts, "status"] == "prior:no_images").all()


def test_submit_writes_exactly_the_rows_test_csv_asks_for(trained_work, tiny_data, tmp_path):
    """The real public test.csv shape: a subset of types per study, one study without images;
    the submission holds exactly those rows in that order, the imageless study on the prior."""
    from cspine.cli import main

    data = tmp_path / "data"
    (data / "test_images").mkdir(parents=True)
    uids = [p.name for p in sorted((tiny_data / "test_images").iterdir())][:2]
    for uid in uids:
        os.symlink(tiny_data / "test_images" / uid, data / "test_images" / uid)
    ghost = "1.2.826.0.1.3680043.999999"
    rows = [(ghost, "C1"), (uids[1], "C3"), (uids[0], "patient_overall"), (uids[0], "C1")]
    pd.DataFrame({"row_id": [f"{u}_{t}" for u, t in rows],
                  "StudyInstanceUID": [u for u, _ in rows],
                  "prediction_type": [t for _, t in rows]}).to_csv(data / "test.csv", index=False)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("stage1", "stage2", "metrics.json"):
        os.symlink(trained_work / name, work / name)
    assert main(["submit", str(data), "--work", str(work), *GO_ON]) == 0
    sub = pd.read_csv(work / "submission.csv")
    assert sub["row_id"].tolist() == [f"{u}_{t}" for u, t in rows]
    assert sub["fractured"].between(1e-3, 1 - 1e-3).all()
    qc = pd.read_csv(work / "stage2" / "submit_qc.csv").set_index("StudyInstanceUID")
    assert qc.loc[ghost, "status"] == "prior:no_images"


def test_submit_refuses_a_model_worse_than_the_prior(trained_work, tiny_data, tmp_path, capsys):
    """make evaluate's OOF numbers say the rule loses to the constant prior: submit refuses
    (one line, exit 2, nothing written) unless told to go on or to submit the prior."""
    from cspine.cli import main

    work = tmp_path / "work"
    work.mkdir()
    for name in ("stage1", "stage2"):
        os.symlink(trained_work / name, work / name)
    metrics = json.loads((trained_work / "metrics.json").read_text())
    rule = metrics["rule"]
    metrics["rules"][rule]["comp_loss"] = metrics["baseline_prevalence"]["comp_loss"] + 0.05
    (work / "metrics.json").write_text(json.dumps(metrics))
    assert main(["submit", str(tiny_data), "--work", str(work)]) == 2
    err = capsys.readouterr().err
    assert "does not beat the constant prior" in err and len(err.strip().splitlines()) == 1
    assert not (work / "submission.csv").exists()
    assert main(["submit", str(tiny_data), "--work", str(work), "--if-worse-than-prior",
                 "prior"]) == 0
    sub = pd.read_csv(work / "submission.csv")
    qc = pd.read_csv(work / "stage2" / "submit_qc.csv")
    assert qc["status"].str.startswith("prior").all() and not (work / "predict").exists()
    types = sub["row_id"].str.split("_", n=1).str[1]
    assert sub.groupby(types)["fractured"].nunique().eq(1).all()  # one prior value per type


def test_submit_dicom_writes_seg_and_sr_per_study(trained_work, tiny_data, tmp_path):
    """``cspine submit --dicom``: each run study gets a SEG on its source slices (Dice 1.0
    against its mask) and an SR with its probabilities; studies finished by a run without
    --dicom are run again when --dicom asks for outputs they lack."""
    from seg_check import dice_per_vertebra, seg_back_on_grid

    from cspine import dicom_out
    from cspine.cli import main
    from cspine.predict import load_input

    work = tmp_path / "work"
    work.mkdir()
    for name in ("stage1", "stage2", "metrics.json"):
        os.symlink(trained_work / name, work / name)
    assert main(["submit", str(tiny_data), "--work", str(work), "--jobs", "1", *GO_ON]) == 0
    folders = sorted(p for p in (work / "predict").iterdir() if p.is_dir())
    assert folders and not list((work / "predict").glob("*/*.dcm"))
    assert main(["submit", str(tiny_data), "--work", str(work), "--jobs", "1", "--dicom",
                 *GO_ON]) == 0
    qc = pd.read_csv(work / "stage2" / "submit_qc.csv")
    assert "done" not in set(qc["volume"])  # studies without the DICOM outputs ran again
    folder = folders[0]
    doc = json.loads((folder / "probabilities.json").read_text())
    points = json.loads((trained_work / "metrics.json").read_text())["operating_points"]
    assert doc["threshold"] == points["vertebrae"]["sens90"]["threshold"]  # make evaluate's
    assert doc["threshold_source"].startswith("metrics.json operating_points.vertebrae.sens90")
    assert doc["dicom"]["seg"]["frames"] > 0
    img = nib.load(folder / "vertebrae_mask.nii.gz")
    mask = np.asarray(img.dataobj)
    headers = dicom_out.read_source_headers(load_input(tiny_data / "test_images" / folder.name))
    back = seg_back_on_grid(folder / "vertebrae_seg.dcm", headers, mask.shape, img.affine)
    assert all(d == 1.0 for d in dice_per_vertebra(back, mask).values())
    sr = dicom_out.read_sr_probabilities(folder / "report_sr.dcm")
    assert sr["probabilities"] == pytest.approx(doc["probabilities"])
    assert sr["flagged"] == doc["flagged"]
