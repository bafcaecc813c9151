"""Checkpoints of both stages: a ``ModelCheckpoint`` whose ``last.ckpt`` is really the last
epoch, and readable errors for files that are not checkpoints.

Lightning 2.6's ``save_last=True`` rewrites ``last.ckpt`` only in a step where a top-k checkpoint
was saved, so with ``save_top_k: 1`` it holds the best validation epoch: ``--ckpt_path last``
would then resume from an earlier epoch (repeating epochs, rewinding the LR schedule), and
anything read from "the last model" would have been chosen on the validation fold.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from typing import Any, Iterator

from pytorch_lightning.callbacks import ModelCheckpoint


@contextlib.contextmanager
def unreadable_checkpoint(path: str | os.PathLike) -> Iterator[None]:
    """Turn the ways ``torch.load`` fails on a file that is not a checkpoint (unpickling, zip,
    truncation and stream errors) into one ``ValueError`` naming ``path``; a missing file stays
    ``FileNotFoundError``."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first})"
                         ) from None


class EpochEndModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that also writes ``last.ckpt`` at the end of every
    epoch in which the top-k logic saved nothing, when ``save_last`` is on.

    Lightning saves either at the end of the training epoch or at the end of validation (its
    ``_should_save_on_train_epoch_end``); the extra save happens in the same hook.
    """

    def _save_last_if_missing(self, trainer: Any, at_train_epoch_end: bool) -> None:
        if not self.save_last or at_train_epoch_end != self._should_save_on_train_epoch_end(trainer):
            return
        if not self._should_skip_saving_checkpoint(trainer):  # also False if saved this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missing(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missing(trainer, at_train_epoch_end=False)


def add_checkpoint_group(parser: Any, monitor: str, mode: str, filename: str) -> None:
    """Both stages' checkpoint policy, as a ``checkpoint`` group of their LightningCLI parser
    (configurable as ``checkpoint.*`` in YAML or on the command line, one place for both):
    :class:`EpochEndModelCheckpoint` keeping the best by ``monitor`` (``mode``) plus
    ``last.ckpt`` = the end of the latest epoch (what a resume and the OOF rows use)."""
    parser.add_lightning_class_args(EpochEndModelCheckpoint, "checkpoint")
    parser.set_defaults({"checkpoint.monitor": monitor, "checkpoint.mode": mode,
                         "checkpoint.save_last": True, "checkpoint.save_top_k": 1,
                         "checkpoint.auto_insert_metric_name": False,
                         "checkpoint.filename": filename})
