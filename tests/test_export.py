"""The fast engine equals the plain path, and an ONNX bundle equals the checkpoints.

Models: the shared few-step run on the ``tiny`` preset (tests/e2e_fixtures.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_fixtures import ANATOMY_OFF, anatomy_off, trained_run

from common.labels import TARGETS


@pytest.fixture(scope="session")
def trained_work(tiny_data, tmp_path_factory) -> Path:
    return trained_run(tiny_data, tmp_path_factory)


def _test_studies(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "test_images").iterdir())


def test_engine_equals_the_plain_path(trained_work, tiny_data):
    """Batched flips, inference mode, no float copies: the same probabilities as the plain,
    straightforward path (cspine/reference.py) to 1e-4, with the same crops."""
    import numpy as np

    from common.dicom_io import load_series
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work
    from cspine.reference import plain_run

    engine = StudyEngine.from_spec(models_from_work(trained_work), anatomy_limits=anatomy_off())
    for study in _test_studies(tiny_data):
        volume = load_series(study)
        fast = engine.run(volume)
        plain = plain_run(engine, volume)
        for t in TARGETS:
            assert abs(fast.probabilities[t] - plain["probabilities"][t]) < 1e-4, (study.name, t)
        for v, crop in fast.crops.items():
            assert (crop is None) == (plain["crops"][v] is None)
            if crop is not None:
                for a, b in zip(crop, plain["crops"][v]):
                    assert np.array_equal(a, b), (study.name, v)


def test_onnx_bundle_gives_the_checkpoints_probabilities(trained_work, tiny_data, tmp_path):
    from cspine.cli import main

    bundle = tmp_path / "bundle_onnx"
    assert main(["export-bundle", str(trained_work), str(bundle), "--format", "onnx"]) == 0
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["runtime"] == "onnx" and (bundle / meta["stage1"]).suffix == ".onnx"
    assert not list(bundle.glob("*.ckpt"))
    for study in _test_studies(tiny_data)[:2]:
        a = tmp_path / "ckpt" / study.name
        b = tmp_path / "onnx" / study.name
        assert main(["predict", str(study), "--out", str(a), "--work", str(trained_work),
                     *ANATOMY_OFF]) == 0
        assert main(["predict", str(study), "--out", str(b), "--bundle", str(bundle),
                     *ANATOMY_OFF]) == 0
        pa = json.loads((a / "probabilities.json").read_text())
        pb = json.loads((b / "probabilities.json").read_text())
        for t in TARGETS:
            assert abs(pa["probabilities"][t] - pb["probabilities"][t]) < 1e-4, (study.name, t)
        assert pa["boxes"] == pb["boxes"]
        assert (b / "overview.png").stat().st_size > 1000
    # an ONNX bundle has no gradients: --cam gives one warning and centre slices; --dicom works
    c = tmp_path / "onnx_cam"
    assert main(["predict", str(study), "--out", str(c), "--bundle", str(bundle), "--cam",
                 "--dicom", "--threshold", "0.0"]) == 0
    pc = json.loads((c / "probabilities.json").read_text())
    assert pc["cam"] == {"method": "gradcam", "error": "no gradients"}
    assert len(pc["warnings"]) == 1 and "no gradients" in pc["warnings"][0]
    assert pc["overview"]["axial_points_mm"] == {}
    assert (c / "vertebrae_seg.dcm").is_file() and (c / "report_sr.dcm").is_file()


def test_resampling_on_the_device_path_gives_the_same_results(trained_work, tiny_data):
    """The GPU path (model grid and crops resampled by torch grid_sample where the networks
    are) agrees with SciPy on the CPU: crops within 1 HU, probabilities to 1e-4 (run on the
    CPU here; a GPU machine runs the same code with the tensors on the device)."""
    import numpy as np

    from common.dicom_io import load_series
    from cspine.engine import StudyEngine
    from cspine.models import models_from_work

    spec = models_from_work(trained_work)
    cpu = StudyEngine.from_spec(spec, anatomy_limits=anatomy_off())
    dev = StudyEngine.from_spec(spec, anatomy_limits=anatomy_off())
    dev.resample_on_device = True
    for study in _test_studies(tiny_data):
        volume = load_series(study)
        a, b = cpu.run(volume), dev.run(volume)
        assert np.array_equal(a.grid_labels, b.grid_labels) or \
            (a.grid_labels != b.grid_labels).mean() < 1e-3
        for v in a.crops:
            if a.crops[v] is None or b.crops[v] is None:
                continue
            if a.boxes[v] != b.boxes[v]:  # a label differing at an edge moved the box by a voxel
                gap = np.abs(np.subtract(a.boxes[v]["grid_lo"], b.boxes[v]["grid_lo"])).max()
                gap = max(gap, np.abs(np.subtract(a.boxes[v]["grid_hi"],
                                                  b.boxes[v]["grid_hi"])).max())
                assert gap <= 1, (study.name, v, a.boxes[v], b.boxes[v])
                continue
            diff = np.abs(a.crops[v][0].astype(int) - b.crops[v][0].astype(int))
            assert diff.max() <= 1 and np.array_equal(a.crops[v][2], b.crops[v][2])
        if a.boxes == b.boxes:  # same crops in: the same probabilities out
            for t in TARGETS:
                assert abs(a.probabilities[t] - b.probabilities[t]) < 1e-4, (study.name, t)
