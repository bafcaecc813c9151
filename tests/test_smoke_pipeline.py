"""``make smoke``: the whole ``make demo`` chain on the ``tiny`` preset with the smoke configs, as
a subprocess, into temporary DATA and WORK folders; then the training targets again, which must
skip their finished work."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_smoke_runs_the_whole_chain_and_resumes(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("GNU make not installed")
    if not (REPO / ".venv" / "bin" / "cspine").exists():
        pytest.skip("needs the project venv (.venv, `make install`)")
    data, work = tmp_path / "data", tmp_path / "work"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_CACHE_DIR": str(tmp_path / "wandb"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb"), "OMP_NUM_THREADS": "2"}
    env.pop("MAKEFLAGS", None)
    cmd = ["make", "--no-print-directory", "smoke", f"DATA={data}", f"WORK={work}", "JOBS=2"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    for step in ("synth", "check-data", "folds", "stage1-prepare", "stage1-fit",
                 "crops", "stage2-fit", "evaluate", "submit", "report"):
        assert f"==> make {step} " in out, step
    assert "=== cspine run summary" in out and "stage 1 Dice (fold 0" in out
    assert "constant-prevalence baseline" in out and "total time:" in out
    assert "DICOM decodes per study: 1 (" in out  # each study decoded once in the whole run

    sub = pd.read_csv(work / "submission.csv")
    expected = pd.read_csv(data / "sample_submission.csv")
    assert sub["row_id"].tolist() == expected["row_id"].tolist()
    assert sub["fractured"].between(0, 1).all()
    for name in ("oof.csv", "metrics.json", "report/index.html", "stage1/run.json",
                 "stage2/fold0/run.json", "stage2/fold1/run.json"):
        assert (work / name).is_file(), name
    assert list((work / "stage1" / "wandb").glob("offline-run-*"))
    assert list((work / "stage2" / "fold0" / "wandb").glob("offline-run-*"))
    # the scorer reads the submission (solution: the synthetic test truth)
    truth = data / "_synth_truth" / "test_labels.csv"
    score = subprocess.run([str(REPO / ".venv/bin/cspine"), "score", str(truth),
                            str(work / "submission.csv")], capture_output=True, text=True)
    assert score.returncode == 0, score.stderr

    # a second run with the same configs reuses the trained models (training skips finished work)
    configs = ["STAGE1_CONFIG=configs/stage1/cpu.yaml -c configs/smoke/stage1.yaml",
               "STAGE2_CONFIG=configs/stage2/cpu.yaml -c configs/smoke/pipeline_stage2.yaml"]
    again = ["make", "--no-print-directory", "stage1-fit", "stage2-fit", f"DATA={data}",
             f"WORK={work}", "STAGE2_FOLDS=0 1", *configs]
    second = subprocess.run(again, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "stage 1 fit: done" in second.stdout
    assert "stage 2 fold 0: done" in second.stdout and "stage 2 fold 1: done" in second.stdout

    # changed settings: the finished fold is moved aside (not lost) and trained again
    old_run = (work / "stage2" / "fold0" / "run.json").read_text()
    changed = ["make", "--no-print-directory", "stage2-fit", "FOLD=0", f"DATA={data}",
               f"WORK={work}", *configs, "STAGE2_ARGS=--seed_everything 7"]
    third = subprocess.run(changed, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "stage 2 fold 0: the run in" in third.stdout and "other settings" in third.stdout
    assert (work / "stage2" / "fold0.stale-1" / "fold0" / "run.json").read_text() == old_run
    assert (work / "stage2" / "fold0" / "run.json").is_file()
    assert (work / "stage2" / "oof" / "fold0.csv").is_file()
