"""``cspine report`` / ``cspine summary`` on a real short run, on an empty run folder, and the
page opened in real headless Chromium (tests/browser.py: ``make test`` installs it; a missing
browser fails the test unless ``CSPINE_NO_BROWSER=1``)."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest
from browser import browser_path, check_page
from e2e_fixtures import trained_run

from cspine.cli import main as cspine_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tiny_data, tmp_path_factory) -> Path:
    return trained_run(tiny_data, tmp_path_factory)


def test_report_of_a_run(work, tiny_data, capsys):
    assert cspine_main(["check-data", str(tiny_data), "--out", str(work / "qc_data.csv")]) == 0
    assert cspine_main(["report", str(work)]) == 0
    page = (work / "report" / "index.html").read_text()
    for heading in ("1. Data census", "2. Stage 1", "3. Stage 2", "4. Quality control"):
        assert heading in page
    assert 'class="missing"' not in page  # every record of a full run was found
    assert "constant prevalence (baseline)" in page and "val_fold" not in page
    assert "validation Dice (best checkpoint" in page
    assert "Operating points (chosen on the OOF rows" in page and "sens90" in page
    # every image is embedded and decodes as PNG; the ones made here are also beside the page
    blobs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(blobs) == 4  # dice, overlays, roc, calibration
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in blobs)
    assert (work / "report" / "dice.png").is_file() and (work / "report" / "overlays.png").is_file()
    assert 'src="http' not in page and "<script" not in page  # self-contained, no network


def test_summary_of_a_run(work, capsys):
    assert cspine_main(["summary", str(work), "--seconds", "75"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 Dice (fold 0" in out and "C7=" in out
    assert "constant-prevalence baseline" in out and "AUC" in out
    assert "total time: 1.2 min" in out and str(work / "submission.csv") not in out


def test_report_and_summary_of_an_empty_run(tmp_path, capsys):
    assert cspine_main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count('class="missing"') >= 3 and "make stage1-fit" in page
    assert cspine_main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stage 1: no finished fit" in out and "stage 2: not evaluated" in out
    assert cspine_main(["report", str(tmp_path / "nope")]) == 2


def test_report_renders_in_headless_chromium(work, tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("render_report", REPO / "scripts" / "render_report.py")
    render = module_from_spec(spec)
    spec.loader.exec_module(render)
    exe = browser_path()
    assert cspine_main(["report", str(work)]) == 0
    png = tmp_path / "shot.png"
    try:
        render.render(work / "report" / "index.html", png, height=1600, browser=exe)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish in time")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    img = Image.open(png).convert("L")
    assert img.size == (1280, 1600)
    # a rendered page, not a blank one: many distinct grey levels (text, tables, plots)
    assert len(set(img.getdata())) > 50


def test_report_page_in_the_browser_shows_its_tables_and_images(work, tiny_data):
    assert cspine_main(["check-data", str(tiny_data), "--out", str(work / "qc_data.csv")]) == 0
    assert cspine_main(["report", str(work)]) == 0
    seen = check_page(work / "report" / "index.html")
    assert seen.errors == [] and seen.failed_requests == []
    assert len(seen.images) == 4 and all(ok and w > 0 for _, ok, w in seen.images), seen.images
    assert seen.tables >= 5
    for heading in ("1. Data census", "2. Stage 1", "3. Stage 2", "4. Quality control"):
        assert any(h.startswith(heading) for h in seen.headings), seen.headings
