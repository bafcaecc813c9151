"""One short, real training run on the ``tiny`` preset, shared by the end-to-end tests.

``trained_run(tiny_data, tmp_path_factory)`` runs, in this process and through each step's own
entry point: stage-1 fit (W&B offline) → ``cspine crops`` (the engine's stage-1 part over the
train studies) → stage-2 fit of folds 0 (W&B offline) and 1 → evaluate. Every step takes a few
training steps only; the models are not meant to be good. The run is made once per test session
(cached here, so that several test modules can use it) and its folder is returned.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE1 = ["-c", str(REPO / "configs/stage1/cpu.yaml"),
          "-c", str(REPO / "configs/smoke/stage1.yaml")]
STAGE2 = ["-c", str(REPO / "configs/stage2/cpu.yaml"),
          "-c", str(REPO / "configs/smoke/pipeline_stage2.yaml")]
#: The anatomy check off: the smoke runs' one-epoch stage-1 models segment at random, and tests
#: that compare the models' outputs need them scored (tests/test_anatomy.py tests the check on).
ANATOMY_OFF = ["--anatomy-limits", str(REPO / "configs/smoke/anatomy_off.yaml")]


def anatomy_off():
    """:class:`stage1_segment.anatomy.AnatomyLimits` with the check off (see ANATOMY_OFF)."""
    from stage1_segment.anatomy import AnatomyLimits

    return AnatomyLimits(check=False)
_RUNS: dict[str, Path] = {}
WANDB_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
             "WANDB_SILENT", "WANDB_RUN_ID")


def _wandb_offline(root: Path) -> dict[str, str | None]:
    """Switch W&B to offline mode with every folder under ``root``; return the old values."""
    old = {k: os.environ.get(k) for k in WANDB_ENV}
    os.environ.pop("WANDB_RUN_ID", None)
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
                      WANDB_CACHE_DIR=str(root / "cache"), WANDB_CONFIG_DIR=str(root / "config"),
                      WANDB_DATA_DIR=str(root / "data"))
    return old


def _restore(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def trained_run(tiny_data: Path, tmp_path_factory) -> Path:
    """The WORK folder of the shared short run (made on first use)."""
    key = str(tiny_data)
    if key in _RUNS:
        return _RUNS[key]
    import torch

    from cspine.cli import main as cspine_main
    from stage1_segment.cli import main as stage1_cli
    from stage2_classify.cli import cli_main as stage2_cli
    from stage2_classify.evaluate import evaluate

    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("e2e_work")
    old = _wandb_offline(tmp_path_factory.mktemp("wandb_env"))
    try:
        paths = [f"--data.data_root={tiny_data}", f"--data.work_dir={work}"]
        stage1_cli(["fit", *STAGE1, *paths, "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"])
        _finish_wandb()
        assert cspine_main(["crops", str(tiny_data), "--work", str(work), *STAGE1,
                            "--jobs", "1"]) == 0
        for fold in (0, 1):
            fold_dir = work / "stage2" / f"fold{fold}"
            logger = (["--trainer.logger.init_args.save_dir", str(fold_dir),
                       "--trainer.logger.init_args.name", f"stage2-fold{fold}"] if fold == 0
                      else ["--trainer.logger=false"])
            stage2_cli(["fit", *STAGE2, "--data.fold", str(fold),
                        "--data.manifest", str(work / "stage1/crops/vertebrae.csv"),
                        "--data.data_root", str(tiny_data),
                        "--data.folds_csv", str(work / "folds.csv"),
                        "--trainer.default_root_dir", str(fold_dir),
                        "--oof_dir", str(work / "stage2/oof"), *logger])
            _finish_wandb()
        evaluate(work, tiny_data, rule="stacker", clip=(1e-3, 1 - 1e-3))
    finally:
        _restore(old)
    _RUNS[key] = work
    return work
