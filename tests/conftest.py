"""Shared fixtures: the real files in ../shared (skipped with a reason when absent) and the
synthetic ``tiny`` dataset (generated once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CSPINE_SHARED", REPO.parent / "shared"))


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path} not found: real reference files live in ../shared beside the clone "
                    f"(set CSPINE_SHARED to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``../shared/realdata``: small real CT DICOM/NIfTI files (see its README)."""
    return _shared("realdata")


@pytest.fixture(scope="session")
def rsna_meta() -> Path:
    """``../shared/rsna_meta``: real per-slice geometry and labels of the RSNA train set."""
    return _shared("rsna_meta")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic RSNA-layout dataset, preset ``tiny`` (written once per session)."""
    from common.synth import generate

    out = tmp_path_factory.mktemp("synth") / "tiny"
    generate(out, preset="tiny", seed=0)
    return out
