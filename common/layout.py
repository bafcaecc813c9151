"""The WORK folder's layout: every path a step writes or reads, named once.

Every step and the report take their paths from :class:`WorkLayout`; nothing else spells a WORK
sub-path. Records inside WORK (``run.json``) name their files relative to their own folder
(:func:`common.paths.run_relative`), so a copied or moved WORK keeps working.

::

    WORK/
      folds.csv  qc_data.csv  metrics.json  oof.csv  submission.csv
      cache/volumes/<UID>.npz                 decoded CT volumes (stage1-prepare; read by crops)
      stage1/  run.json  fit.fingerprint  checkpoints/  wandb/  configs/  qc_prepare.csv
               cache/<grid key>/<UID>.npz     model-grid training cache
               masks/<UID>.nii.gz             stage-1 labels in each train study's CT geometry
               crops/  vertebrae.csv  qc_crops.csv  run.json  rows/<UID>.json  <UID>_<C#>.npz
      stage2/  fold<k>/ (run.json, fit.fingerprint, checkpoints/, wandb/)  oof/fold<k>.csv
               stacker.json  submit_qc.csv  submit_timing.json
      predict/<UID>/  probabilities.json  vertebrae_mask.nii.gz  crops/<C#>.npz
      report/  index.html  roc.png  calibration.png …
      validation/<name>/                      cspine validate
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkLayout:
    """The paths of one WORK folder (nothing is created here)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # ------------------------------------------------------------------ top level
    @property
    def folds(self) -> Path:
        """``folds.csv``: the shared CV folds of both stages (``make folds``)."""
        return self.root / "folds.csv"

    @property
    def qc_data(self) -> Path:
        return self.root / "qc_data.csv"

    @property
    def metrics(self) -> Path:
        """``metrics.json`` of ``make evaluate`` (rule, clip, operating points)."""
        return self.root / "metrics.json"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def volume_cache(self) -> Path:
        """Decoded CT volumes, one ``<UID>.npz`` each (:mod:`common.volume_cache`)."""
        return self.root / "cache" / "volumes"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def predict(self) -> Path:
        """Per-test-study outputs of ``make submit``: ``predict/<UID>/``."""
        return self.root / "predict"

    def validation(self, name: str) -> Path:
        return self.root / "validation" / name

    # ------------------------------------------------------------------ stage 1
    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def stage1_checkpoints(self) -> Path:
        return self.stage1 / "checkpoints"

    @property
    def stage1_run(self) -> Path:
        return self.stage1 / "run.json"

    @property
    def stage1_cache(self) -> Path:
        """Model-grid training cache, one folder per grid key."""
        return self.stage1 / "cache"

    @property
    def qc_prepare(self) -> Path:
        return self.stage1 / "qc_prepare.csv"

    @property
    def stage1_masks(self) -> Path:
        return self.stage1 / "masks"

    @property
    def crops(self) -> Path:
        return self.stage1 / "crops"

    @property
    def manifest(self) -> Path:
        """``vertebrae.csv``: the stage-2 crop manifest (``make crops``)."""
        return self.crops / "vertebrae.csv"

    @property
    def qc_crops(self) -> Path:
        return self.crops / "qc_crops.csv"

    @property
    def crops_run(self) -> Path:
        return self.crops / "run.json"

    # ------------------------------------------------------------------ stage 2
    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    def fold(self, k: int) -> Path:
        return self.stage2 / f"fold{k}"

    @property
    def oof_dir(self) -> Path:
        return self.stage2 / "oof"

    def oof_fold(self, k: int) -> Path:
        return self.oof_dir / f"fold{k}.csv"

    @property
    def stacker(self) -> Path:
        return self.stage2 / "stacker.json"

    @property
    def submit_qc(self) -> Path:
        return self.stage2 / "submit_qc.csv"

    @property
    def submit_timing(self) -> Path:
        return self.stage2 / "submit_timing.json"
