"""One ``run.json`` schema for both stages' fits.

Written at the end of a fit (rank 0), in the run folder (``WORK/stage1``,
``WORK/stage2/fold<k>``); its presence means the run finished (:mod:`cspine.runs`). Keys:

* ``schema`` (1), ``stage`` (``stage1`` | ``stage2``);
* ``checkpoint``: the checkpoint every later step uses (stage 1: the best by the monitor;
  stage 2: ``--oof_checkpoint``, ``last`` by default), and ``best_checkpoint``,
  ``last_checkpoint`` — all relative to the run folder (:func:`common.paths.run_relative`), so
  a copied or moved WORK keeps working;
* ``monitor``, ``best_score``, ``epochs``;
* ``metrics``: the run's validation figures (stage 1: Dice per vertebra of the best checkpoint;
  stage 2: the fold's out-of-fold loss and counts);
* ``config``: the resolved config (plain data), and any stage-specific keys beside them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SCHEMA = 1


def write_run_record(run_dir: str | os.PathLike, stage: str, checkpoint: str | os.PathLike,
                     best_checkpoint: str | os.PathLike | None,
                     last_checkpoint: str | os.PathLike | None, monitor: str | None,
                     best_score: float | None, epochs: int, metrics: dict[str, Any],
                     config: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Write ``run_dir/run.json`` atomically (schema of the module docstring); returns it."""
    from common.atomic import write_json
    from common.paths import run_relative

    def rel(p: str | os.PathLike | None) -> str | None:
        return run_relative(p, run_dir) if p else None

    path = Path(run_dir) / "run.json"
    write_json(path, {"schema": SCHEMA, "stage": stage, "checkpoint": rel(checkpoint),
                      "best_checkpoint": rel(best_checkpoint),
                      "last_checkpoint": rel(last_checkpoint), "monitor": monitor,
                      "best_score": None if best_score is None else float(best_score),
                      "epochs": int(epochs), "metrics": metrics, "config": config, **extra})
    return path
