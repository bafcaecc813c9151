"""One line at the command boundary: an expected failure (bad path, unreadable input) is one
line naming the cause with exit status 2 and nothing written; ``--debug`` shows the traceback."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import axial_positions, write_series

from cspine.cli import main


@pytest.fixture
def study(tmp_path):
    write_series(tmp_path / "study", np.full((4, 8, 8), 1064, np.int16), axial_positions(4))
    return tmp_path / "study"


def test_convert_under_a_file_is_one_line(study, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["convert", str(study), str(blocker / "out.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cspine convert: error:" in err and "a_file" in err
    with pytest.raises(ValueError, match="is not a folder"):
        main(["--debug", "convert", str(study), str(blocker / "out.nii.gz")])


def test_align_mask_with_an_empty_mask_file_is_one_line(study, tmp_path, capsys):
    mask = tmp_path / "mask.nii"
    mask.write_bytes(b"")
    out = tmp_path / "aligned.nii.gz"
    assert main(["align-mask", str(study), str(mask), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mask.nii" in err
    assert not out.exists()


def _one_line(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cspine {command}: error:" in err, err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


def test_convert_to_a_non_nifti_name_is_refused_before_loading(study, tmp_path, capsys):
    assert main(["convert", str(study), str(tmp_path / "out.png")]) == 2
    _one_line(capsys, "convert", "out.png", ".nii or .nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]  # no temp file left


@pytest.mark.parametrize("kind", ["four_d", "garbage_gzip", "text"])
def test_align_mask_refuses_a_bad_mask_naming_it(study, tmp_path, capsys, kind):
    import nibabel as nib

    mask = tmp_path / ("mask.nii.gz" if kind != "text" else "mask.nii")
    if kind == "four_d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.uint8), np.eye(4)), mask)
    elif kind == "garbage_gzip":
        mask.write_bytes(np.random.default_rng(0).bytes(4000))
    else:
        mask.write_text("hello\n")
    out = tmp_path / "aligned.nii.gz"
    assert main(["align-mask", str(study), str(mask), str(out)]) == 2
    _one_line(capsys, "align-mask", mask.name)
    assert not out.exists()


def test_align_mask_with_an_all_zero_mask_is_flagged_not_a_crash(study, tmp_path, capsys):
    import nibabel as nib

    from common.dicom_io import load_series

    vol = load_series(study)
    mask = tmp_path / "zero.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(vol.shape, np.uint8), vol.affine), mask)
    out = tmp_path / "aligned.nii.gz"
    assert main(["align-mask", str(study), str(mask), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "status flagged" in printed and "empty_mask" in printed and out.is_file()


def test_check_data_refuses_an_unwritable_out_before_scanning(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["check-data", str(tmp_path), "--out", str(tmp_path / "a_file" / "qc.csv")]) == 2
    _one_line(capsys, "check-data", "a_file")


def test_check_data_names_an_unparsable_train_csv(tmp_path, study, capsys):
    """check-data is a census: a broken train.csv is reported (naming it) and the scan goes on."""
    import shutil

    import pandas as pd

    root = tmp_path / "rsna"
    shutil.copytree(study, root / "train_images" / "1.2.3")
    (root / "train.csv").write_text('StudyInstanceUID,C1\n"1.2.3\n')
    assert main(["check-data", str(root), "--out", str(tmp_path / "qc.csv")]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "train.csv: not a readable CSV table" in captured.err
    assert "dataset_error" in captured.out and "Traceback" not in captured.err
    assert pd.read_csv(tmp_path / "qc.csv")["status"].tolist() == ["ok"]


@pytest.mark.parametrize("content", [b"", b"\xca\xfe\x00\x01garbage"])
def test_score_names_an_unreadable_csv(tmp_path, capsys, content):
    solution = tmp_path / "train.csv"
    solution.write_text("StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"
                        "1.2.3,0,0,0,0,0,0,0,0\n")
    sub = tmp_path / "bad.csv"
    sub.write_bytes(content)
    assert main(["score", str(solution), str(sub)]) == 2
    _one_line(capsys, "score", "bad.csv")


def test_predict_names_a_file_that_is_not_a_checkpoint(study, tmp_path, capsys):
    fake = tmp_path / "fake.ckpt"
    fake.write_text("not a checkpoint\n")
    assert main(["predict", str(study), "--out", str(tmp_path / "out"), "--stage1-ckpt",
                 str(fake), "--stage2-ckpt", str(fake)]) == 2
    _one_line(capsys, "predict", "fake.ckpt", "not a readable checkpoint")
    assert not (tmp_path / "out").exists()


def test_a_script_on_standard_input_can_use_the_decode_pool(tmp_path):
    """``python - <<EOF`` has no main module file: the forkserver workers must not try to
    re-run ``<stdin>`` (each printed a FileNotFoundError traceback)."""
    import subprocess
    import sys

    write_series(tmp_path / "big", np.full((150, 8, 8), 1064, np.int16), axial_positions(150))
    script = ("from common.dicom_io import load_series\n"
              f"v = load_series({str(tmp_path / 'big')!r}, workers=2)\n"
              "print(v.shape, v.qc['decoder'])\n")
    run = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and "(8, 8, 150)" in run.stdout, run.stderr
    assert "Traceback" not in run.stderr and "<stdin>" not in run.stderr, run.stderr


def test_damaged_jpeg_pixels_are_one_line_saying_so(realdata, tmp_path, capsys):
    """A real JPEG Lossless series with one file's compressed stream overwritten: one line,
    naming the file and the cause (the decoders' own messages folded into it)."""
    import shutil

    study = tmp_path / "jpll"
    shutil.copytree(realdata / "derived_jpll" / "totalsegmentator_example_ct_jpll", study)
    victim = sorted(study.iterdir())[4]
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[-20000:-100] = bytes((0xFF if i % 3 else 0x00) for i in range(19900))
    victim.write_bytes(bytes(data))
    assert main(["convert", str(study), str(tmp_path / "out.nii.gz")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "cspine convert" in line]
    assert len(err) == 1 and "corrupt_file: the compressed pixel data is damaged" in err[0]
    assert victim.name in err[0] and not (tmp_path / "out.nii.gz").exists()
