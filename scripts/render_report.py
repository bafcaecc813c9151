"""Render a report page in headless Chromium and save a screenshot (PNG).

    python scripts/render_report.py work/demo/report/index.html work/demo/report/screenshot.png

Chromium runs with no network features, a throw-away profile and no sandbox (containers).
Exit status 3 when no Chromium/Chrome binary is found (install: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """Path of the first Chromium-family binary on PATH (or ``$CHROMIUM``)."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def render(html: str | os.PathLike, png: str | os.PathLike, width: int = 1280,
           height: int = 3000, timeout: float = 120.0, browser: str | None = None) -> Path:
    """Screenshot ``html`` (a local file) into ``png`` with headless Chromium.

    Raises:
        FileNotFoundError: no browser, or the page does not exist.
        RuntimeError: Chromium failed or wrote no screenshot (its stderr tail is included).
    """
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no chromium/chrome binary on PATH (apt-get install chromium)")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html} not found")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cspine-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={width},{height}", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium exit {proc.returncode}: {proc.stderr[-800:]}")
    return png


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("html", type=Path, help="report page (WORK/report/index.html)")
    parser.add_argument("png", type=Path, help="screenshot to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    try:
        out = render(args.html, args.png, args.width, args.height)
    except FileNotFoundError as err:
        print(f"render_report: {err}", file=sys.stderr)
        return 3
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"render_report: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
