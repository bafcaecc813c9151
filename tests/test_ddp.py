"""Both stages' ``fit`` under Lightning DDP with 2 CPU processes (gloo), as subprocesses (the DDP
launcher re-runs the command line for rank 1): rank-only work must not deadlock the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from stage2_fixtures import make_crops_for_dataset

REPO = Path(__file__).resolve().parents[1]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stage1_fit_under_ddp(tiny_data, tmp_path):
    work = tmp_path / "work"
    out = _run(["stage1_segment", "fit", "-c", str(REPO / "configs/stage1/cpu.yaml"),
                "-c", str(REPO / "configs/smoke/stage1.yaml"), "--data.data_root", str(tiny_data),
                "--data.work_dir", str(work), "--trainer.logger", "false", *DDP], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    run = json.loads((work / "stage1" / "run.json").read_text())
    assert "val/dice_mean" in run["metrics"] and run["schema"] == 1
    assert (work / "stage1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_stage2_fit_and_oof_under_ddp(tiny_data, tmp_path):
    work = tmp_path / "work"
    manifest = make_crops_for_dataset(tiny_data, work)
    out = _run(["stage2_classify", "fit", "-c", str(REPO / "configs/stage2/cpu.yaml"),
                "-c", str(REPO / "configs/smoke/stage2.yaml"), "--data.manifest", str(manifest),
                "--data.data_root", str(tiny_data), "--data.folds_csv", str(work / "folds.csv"),
                "--data.n_folds", "2", "--trainer.default_root_dir", str(work / "stage2" / "fold0"),
                "--oof_dir", str(work / "stage2" / "oof"), *DDP], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    run = json.loads((work / "stage2" / "fold0" / "run.json").read_text())
    assert run["checkpoint"].endswith("last.ckpt") and run["metrics"]["val_studies"] > 0
    assert (work / "stage2" / "oof" / "fold0.csv").is_file()
