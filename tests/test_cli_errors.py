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
    with pytest.raises(OSError):
        main(["--debug", "convert", str(study), str(blocker / "out.nii.gz")])


def test_align_mask_with_an_empty_mask_file_is_one_line(study, tmp_path, capsys):
    mask = tmp_path / "mask.nii"
    mask.write_bytes(b"")
    out = tmp_path / "aligned.nii.gz"
    assert main(["align-mask", str(study), str(mask), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mask.nii" in err
    assert not out.exists()
