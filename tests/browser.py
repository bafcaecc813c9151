"""Open a page in real headless Chromium and say what it shows (the page tests' helper).

Chromium is Debian's ``chromium`` package (``make test`` installs it when missing, see the
Makefile's ``browser`` target), driven by Playwright's Python package with
``executable_path`` — Playwright never downloads a browser here. Without a browser the page
tests fail with a message saying how to install one; they are skipped only when
``CSPINE_NO_BROWSER=1`` is set on purpose.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The flags the closed network needs (without the background-networking ones Chromium hangs).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class PageCheck:
    """What the browser saw.

    Attributes:
        console: (type, text) of every console message and page error.
        images: (alt, complete, naturalWidth) of every ``<img>`` after load.
        tables: number of ``<table>`` elements.
        headings: the text of every ``h1``/``h2``/``h3``.
        failed_requests: URLs of requests that failed.
    """

    console: list[tuple[str, str]] = field(default_factory=list)
    images: list[tuple[str, bool, int]] = field(default_factory=list)
    tables: int = 0
    headings: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [c for c in self.console if c[0] in ("error", "pageerror")]


def browser_path() -> str:
    """The Chromium binary, or fail (skip only with ``CSPINE_NO_BROWSER=1``)."""
    path = os.environ.get("CHROMIUM") or next(
        (shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if path:
        return path
    if os.environ.get("CSPINE_NO_BROWSER") == "1":
        pytest.skip("CSPINE_NO_BROWSER=1: page not checked in a browser")
    pytest.fail("no Chromium on PATH: `make test` installs Debian's chromium package (as root, "
                "with apt); or install it yourself (apt-get install chromium), or set CHROMIUM=")


def check_page(html: str | os.PathLike, screenshot: str | os.PathLike | None = None,
               width: int = 1280) -> PageCheck:
    """Load ``html`` (a local file) in headless Chromium and inspect it after the load event."""
    from playwright.sync_api import sync_playwright

    exe = browser_path()
    out = PageCheck()
    with sync_playwright() as pw:  # Playwright gives the browser a fresh temporary profile
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: out.console.append((m.type, m.text)))
            page.on("pageerror", lambda e: out.console.append(("pageerror", str(e))))
            page.on("requestfailed", lambda r: out.failed_requests.append(r.url[:120]))
            page.goto(Path(html).resolve().as_uri(), wait_until="load", timeout=60_000)
            out.images = [tuple(x) for x in page.evaluate(
                "() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")]
            out.tables = page.locator("table").count()
            out.headings = page.locator("h1, h2, h3").all_inner_texts()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return out
