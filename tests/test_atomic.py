"""Atomic writes: complete file or nothing, normal permissions, no temp files left behind."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from common import atomic


def test_write_json_and_mode(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic.write_json(path, {"x": np.int64(3), "arr": np.arange(2)})
    assert path.read_text().strip().startswith("{")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~atomic._UMASK
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_failure_leaves_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "b.txt"
    atomic.write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["b.txt"]


def test_save_npz_keeps_suffix(tmp_path):
    atomic.save_npz(tmp_path / "c.npz", image=np.zeros((2, 2), np.int16))
    with np.load(tmp_path / "c.npz") as z:
        assert z["image"].dtype == np.int16
