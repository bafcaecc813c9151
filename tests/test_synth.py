"""The synthetic dataset (``common.synth``, ``cspine synth``): RSNA layout and headers, labels,
fractures and boxes, masks that only affine-based alignment puts on the bone, determinism and
resume. Uses the session ``tiny_data`` fixture plus a few 3-study datasets."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from common import geometry
from common.labels import OVERALL, PREVALENCE, TARGETS, VERTEBRAE
from common.synth import SynthStateError, generate, load_config, make_config, rerender
from common.synth.plan import plan_studies, vertebra_rates

REPO = Path(__file__).resolve().parents[1]
UID_RE = re.compile(r"^1\.2\.826\.0\.1\.3680043\.\d+$")
JPEG_LL = "1.2.840.10008.1.2.4.70"


def _studies(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "_synth_truth" / "studies.csv")


def _folder(root: Path, uid: str) -> Path:
    train = root / "train_images" / uid
    return train if train.exists() else root / "test_images" / uid


def _headers(folder: Path) -> dict[int, pydicom.Dataset]:
    return {int(p.stem): pydicom.dcmread(p, stop_before_pixels=True)
            for p in folder.glob("*.dcm")}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "_synth_state.json"}


def test_layout_and_tables(tiny_data):
    train = pd.read_csv(tiny_data / "train.csv")
    test = pd.read_csv(tiny_data / "test.csv")
    sub = pd.read_csv(tiny_data / "sample_submission.csv")
    boxes = pd.read_csv(tiny_data / "train_bounding_boxes.csv")
    assert list(train.columns) == ["StudyInstanceUID", OVERALL, *VERTEBRAE]
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert list(sub.columns) == ["row_id", "fractured"] and (sub["fractured"] == 0.5).all()
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height",
                                   "slice_number"]
    assert len(train) == 12 and test["StudyInstanceUID"].nunique() == 3
    assert set(sub["row_id"]) == set(test["row_id"])
    for uid, rows in test.groupby("StudyInstanceUID"):
        assert sorted(rows["prediction_type"]) == sorted(TARGETS)
        assert set(rows["row_id"]) == {f"{uid}_{t}" for t in TARGETS}
    uids = list(train["StudyInstanceUID"]) + list(test["StudyInstanceUID"].unique())
    assert len(set(uids)) == len(uids) and all(UID_RE.match(u) for u in uids)
    assert sorted(p.name for p in (tiny_data / "train_images").iterdir()) == sorted(
        train["StudyInstanceUID"])
    assert sorted(p.name for p in (tiny_data / "test_images").iterdir()) == sorted(
        test["StudyInstanceUID"].unique())
    masks = {p.name[:-4] for p in (tiny_data / "segmentations").glob("*.nii")}
    assert masks == set(train["StudyInstanceUID"])  # tiny: every train study has a mask
    assert set(boxes["StudyInstanceUID"]) <= set(train.loc[train[OVERALL] == 1,
                                                            "StudyInstanceUID"])


def test_dicom_headers_like_rsna(tiny_data):
    syntaxes, directions, starts = set(), set(), set()
    for folder in sorted((tiny_data / "train_images").iterdir()) + sorted(
            (tiny_data / "test_images").iterdir()):
        uid = folder.name
        heads = _headers(folder)
        numbers = sorted(heads)
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # contiguous
        starts.add(numbers[0])
        z = [float(heads[n].ImagePositionPatient[2]) for n in numbers]
        steps = np.diff(z)
        assert np.all(steps < 0) or np.all(steps > 0)
        directions.add("descending" if steps[0] < 0 else "ascending")
        assert np.allclose(np.abs(steps), abs(steps[0]), atol=1e-4)
        ts = {str(h.file_meta.TransferSyntaxUID) for h in heads.values()}
        assert len(ts) == 1
        syntaxes |= ts
        for n, h in heads.items():
            assert h.InstanceNumber == n
            assert h.SOPInstanceUID == f"{uid}.1.{n}" == h.file_meta.MediaStorageSOPInstanceUID
            assert h.SeriesInstanceUID == f"{uid}.1" and h.StudyInstanceUID == uid
            assert str(h.PatientID) == str(h.PatientName) == uid.rsplit(".", 1)[1]
            assert h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
            assert [float(v) for v in h.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert (h.Rows, h.Columns) == (64, 64)
            assert h.PhotometricInterpretation == "MONOCHROME2"
            assert (h.BitsAllocated, h.BitsStored, h.HighBit, h.PixelRepresentation) == (
                16, 16, 15, 1)
            assert (float(h.RescaleIntercept), float(h.RescaleSlope)) == (-1024.0, 1.0)
            assert (float(h.WindowCenter), float(h.WindowWidth)) == (500.0, 2000.0)
            assert float(h.SliceThickness) >= abs(steps[0]) - 1e-3
            assert h.file_meta.ImplementationVersionName == "PYDICOM 2.3.0"
            for absent in ("Modality", "SliceLocation", "FrameOfReferenceUID", "StudyDate"):
                assert absent not in h
    assert syntaxes == {"1.2.840.10008.1.2.1", JPEG_LL}
    assert directions == {"ascending", "descending"}
    assert starts - {1}, "some study must start at a file number other than 1"


def test_labels_consistent(tiny_data):
    train = pd.read_csv(tiny_data / "train.csv")
    truth = pd.read_csv(tiny_data / "_synth_truth" / "test_labels.csv")
    for frame in (train, truth):
        assert (frame[OVERALL] == frame[list(VERTEBRAE)].max(axis=1)).all()
    assert train[OVERALL].sum() == round(12 * PREVALENCE[OVERALL])
    studies = _studies(tiny_data).set_index("StudyInstanceUID")
    state = json.loads((tiny_data / "_synth_state.json").read_text())
    for frame in (train, truth):
        for _, row in frame.iterrows():
            fractured = {v for v in VERTEBRAE if row[v] == 1}
            listed = str(studies.loc[row["StudyInstanceUID"], "fractures"])
            assert {f.split(":")[0] for f in listed.split(";") if ":" in f} == fractured
            counts = state["complete"][row["StudyInstanceUID"]]["fractured_voxels"]
            assert set(counts) == fractured and all(c > 0 for c in counts.values())


def test_pixels_decode_to_the_phantom(tiny_data):
    """Every file (JPEG-LL and uncompressed) decodes to the re-rendered phantom's HU."""
    studies = _studies(tiny_data)
    assert (studies["transfer_syntax"] == "jpeg_lossless").any()
    for uid in studies["StudyInstanceUID"]:
        image = rerender(tiny_data, uid)
        by_number = {int(n): k for k, n in enumerate(image.file_numbers)}
        for path in _folder(tiny_data, uid).glob("*.dcm"):
            ds = pydicom.dcmread(path)
            k = by_number[int(path.stem)]
            hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
            want = geometry.xyz_slice_to_pixels(image.rendered.hu, k).astype(np.int32)
            assert np.array_equal(hu, want), path
            ipp = geometry.dicom_position_of_slice(image.affine, k)
            assert np.allclose([float(v) for v in ds.ImagePositionPatient], ipp, atol=1e-3)


def test_boxes_lie_on_the_fractures(tiny_data):
    boxes = pd.read_csv(tiny_data / "train_bounding_boxes.csv")
    assert len(boxes)
    darker = 0  # boxes where bone turned dark (a crack, or the gap a fragment left)
    for uid, rows in boxes.groupby("StudyInstanceUID"):
        broken, intact = rerender(tiny_data, uid), rerender(tiny_data, uid, fractures=False)
        assert np.array_equal(broken.affine, intact.affine)
        diff = broken.rendered.hu.astype(np.int32) - intact.rendered.hu
        changed_slices = set(np.flatnonzero(np.abs(diff).sum(axis=(0, 1)) > 0))
        box_slices = set()
        for _, b in rows.iterrows():
            k = int(np.flatnonzero(broken.file_numbers == b["slice_number"])[0])
            box_slices.add(k)
            x, y, w, h = (int(b[c]) for c in ("x", "y", "width", "height"))
            region = diff[x:x + w, y:y + h, k]
            assert (np.abs(region) > 150).any(), f"{uid} file {b['slice_number']}: no change"
            bone = intact.rendered.labels[x:x + w, y:y + h, k] > 0
            darker += bool(bone.any() and (region[bone] < -150).any())
        assert box_slices == changed_slices  # a box on every slice the fractures cross
    assert darker > 0.5 * len(boxes)


def test_nifti_masks_stored_like_rsna(tiny_data):
    dtypes, thoracic = set(), False
    for path in sorted((tiny_data / "segmentations").glob("*.nii")):
        uid = path.name[:-4]
        img = nib.load(path)
        hdr = img.header
        heads = _headers(tiny_data / "train_images" / uid)
        first = next(iter(heads.values()))
        assert img.shape == (first.Columns, first.Rows, len(heads))
        assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (2, 1)
        assert hdr["pixdim"][0] == -1
        assert np.allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        assert geometry.axcodes(img.affine) == "LAS"
        assert hdr.get_xyzt_units()[0] == "mm"
        dtypes.add(str(img.get_data_dtype()))
        values = set(np.unique(np.asarray(img.dataobj)).tolist())
        assert set(range(0, 8)) <= values <= set(range(0, 20))
        thoracic |= bool(values & set(range(8, 20)))
    assert dtypes == {"uint8", "uint16"} and thoracic


def test_mask_aligns_on_bone_and_flips_do_not(tiny_data, tmp_path):
    from common.dicom_io import load_series
    from common.nifti_io import align_mask

    studies = _studies(tiny_data)
    masked = studies[studies["mask"].notna()]
    picks = [masked[masked["direction"] == "ascending"].iloc[0],
             masked[masked["transfer_syntax"] == "jpeg_lossless"].iloc[0],
             masked[masked["first_file"] != 1].iloc[0]]
    for row in picks:
        uid = row["StudyInstanceUID"]
        vol = load_series(tiny_data / "train_images" / uid)
        path = tiny_data / "segmentations" / f"{uid}.nii"
        classes, qc = align_mask(vol, path)
        assert qc["method"] == "permutation" and qc["status"] == "ok", qc
        labels = rerender(tiny_data, uid).rendered.labels
        assert np.array_equal(classes, np.where(labels <= 7, labels, 0))  # exact voxels
        cervical = classes > 0
        bone_ok = (vol.hu[cervical] >= 150).mean()
        assert vol.hu[cervical].mean() > 400 and bone_ok > 0.9
        img = nib.load(path)
        stored = np.asarray(img.dataobj)
        for axis, what in ((0, "mirrored left-right"), (1, "mirrored front-back"),
                           (2, "flipped in z")):
            bad = tmp_path / f"{uid}_{axis}.nii"
            nib.save(nib.Nifti1Image(np.flip(stored, axis=axis).copy(), img.affine, img.header),
                     bad)
            wrong, qc_bad = align_mask(vol, bad)
            on = wrong > 0
            agree = (wrong[on] == classes[on]).mean()  # voxels on their own vertebra
            if axis == 0:  # the phantom is nearly left-right symmetric: only a small shift
                assert agree < 0.9, f"{uid}: {what} mask unchanged"
                continue
            assert agree < 0.25, f"{uid}: {what} mask still on its vertebrae"
            assert (vol.hu[on] >= 150).mean() < bone_ok - 0.3, f"{uid}: {what} on bone"
            assert qc_bad["status"] == "flagged", qc_bad


def test_deterministic_and_independent_of_workers(tiny_data, tmp_path):
    again = generate(tmp_path / "again", preset="tiny", seed=0, workers=1, progress=False)
    assert _tree_digest(again) == _tree_digest(tiny_data)
    other = make_config("tiny", seed=1)
    assert [p.uid for p in plan_studies(other)] != [p.uid for p in plan_studies(load_config(
        tiny_data))]


def test_resume_after_interruption_and_refusals(tmp_path):
    out = tmp_path / "ds"
    kw = dict(preset="tiny", seed=3, n_train=2, n_test=1, workers=1, progress=False)
    generate(out, **kw)
    before = _tree_digest(out)
    state_path = out / "_synth_state.json"
    state = json.loads(state_path.read_text())
    uid = next(iter(state["complete"]))
    del state["complete"][uid]  # as if the run had stopped before this study finished
    state_path.write_text(json.dumps(state))
    folder = _folder(out, uid)
    for p in sorted(folder.glob("*.dcm"))[:3]:
        p.unlink()
    generate(out, **kw)
    assert _tree_digest(out) == before
    with pytest.raises(SynthStateError, match="different config"):
        generate(out, **{**kw, "seed": 4})
    generate(out, overwrite=True, **{**kw, "seed": 4})
    assert _tree_digest(out) != before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SynthStateError, match="not written by"):
        generate(foreign, overwrite=True, **kw)
    assert (foreign / "notes.txt").exists()


def test_cli(tmp_path, capsys):
    from cspine.cli import main

    out = tmp_path / "cli"
    args = ["synth", str(out), "--preset", "tiny", "--n-train", "2", "--n-test", "1",
            "--workers", "1", "--no-progress"]
    assert main(args) == 0
    assert (out / "train.csv").exists()
    assert main(args + ["--seed", "5"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "x"), "--jpeg-fraction", "2"]) == 2


@pytest.mark.parametrize("prevalence", [dict(PREVALENCE),
                                        {**{v: 2 * PREVALENCE[v] for v in VERTEBRAE},
                                         OVERALL: 0.6}])
def test_vertebra_rates_reproduce_the_prevalence(prevalence):
    q, single = vertebra_rates(prevalence)
    assert not single
    qa = np.array([q[v] for v in VERTEBRAE])
    p_any = 1 - np.prod(1 - qa)
    marginal = prevalence[OVERALL] * qa / p_any
    assert np.allclose(marginal, [prevalence[v] for v in VERTEBRAE], rtol=1e-6)


def test_demo_plan_counts():
    cfg = make_config("demo")
    plans = plan_studies(cfg)
    train = [p for p in plans if p.split == "train"]
    assert len(train) == 100 and len(plans) == 110
    assert sum(p.labels[OVERALL] for p in train) == 60
    assert sum(p.mask for p in train) == 50 and not any(p.mask for p in plans[100:])
    assert sum(p.jpeg for p in plans) == 33 and sum(p.reversed for p in plans) == 11
    assert {p.start for p in plans} == {1, 2, 59}
    assert all(p.labels[OVERALL] for p in plans if p.boxes)
    wide = make_config("demo", size=224)  # --size keeps the field of view
    assert np.allclose(np.array(wide.pixel_spacing) * 224, np.array(cfg.pixel_spacing) * 112)
    with pytest.raises(ValueError, match="jpeg_fraction"):
        make_config("demo", jpeg_fraction=1.5)
    with pytest.raises(ValueError, match="unknown synth option"):
        make_config("demo", n_trian=3)


def test_figure(tiny_data, tmp_path):
    from common.synth.figure import make_figure

    png = tmp_path / "fig.png"
    uid = make_figure(tiny_data, png)
    assert UID_RE.match(uid) and png.stat().st_size > 10_000


@pytest.mark.skipif(not (REPO / "cspine" / "commands" / "check_data.py").exists(),
                    reason="cspine check-data (cspine/commands/check_data.py) not written yet")
def test_check_data_passes(tiny_data, tmp_path):
    from cspine.cli import main

    qc = tmp_path / "qc_data.csv"
    assert main(["check-data", str(tiny_data), "--out", str(qc)]) == 0
    table = pd.read_csv(qc)
    assert len(table) == 15
    assert set(table["status"]) == {"ok"}, table[table["status"] != "ok"].to_string()
