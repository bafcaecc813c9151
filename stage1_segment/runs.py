"""Stage-1 checkpoints by name and id, and the Dice of a predicted label map.

* :func:`resolve_checkpoint`: ``best`` (the best checkpoint recorded in ``last.ckpt``),
  ``last`` or a path → an existing checkpoint file (``make crops STAGE1_CKPT=...``,
  ``cspine export-mask --ckpt``);
* :func:`run_id`: the id of the weights written into every crop manifest row, so a changed
  stage-1 model re-crops;
* :func:`dice_per_vertebra`: Dice per vertebra of two label maps on one grid.

Prediction itself runs through the test-time engine (:mod:`cspine.engine`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from common.labels import VERTEBRAE


def resolve_checkpoint(spec: str | os.PathLike, ckpt_dir: str | os.PathLike) -> Path:
    """``best`` / ``last`` / a path → an existing checkpoint file.

    ``best`` is read from the ModelCheckpoint state stored in ``<ckpt_dir>/last.ckpt``
    (falling back to ``last.ckpt`` when no best was recorded).

    Raises:
        FileNotFoundError: naming the file that is missing and the step that makes it.
    """
    spec = str(spec)
    if spec not in ("best", "last"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        return path
    last = Path(ckpt_dir) / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"{last} not found: train stage 1 first (`make stage1-fit`)")
    if spec == "last":
        return last
    state = torch.load(last, map_location="cpu", weights_only=False)
    for key, cb in state.get("callbacks", {}).items():
        best = cb.get("best_model_path") if isinstance(cb, dict) else None
        if "ModelCheckpoint" in str(key) and best and Path(best).is_file():
            return Path(best)
    return last


def run_id(ckpt_path: str | os.PathLike | None) -> str:
    """``<checkpoint stem>-<sha1[:8]>`` of the weights used (``untrained`` without one)."""
    if not ckpt_path:
        return "untrained"
    digest = hashlib.sha1()
    with open(ckpt_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"{Path(ckpt_path).stem}-{digest.hexdigest()[:8]}"


def dice_per_vertebra(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Dice of each vertebra present in ``true`` (both uint8 (X, Y, Z) on the same grid)."""
    out = {}
    for i, name in enumerate(VERTEBRAE, start=1):
        t = true == i
        if t.any():
            p = pred == i
            out[name] = float(2 * (p & t).sum() / (p.sum() + t.sum()))
    return out
